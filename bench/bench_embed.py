"""Embeddings: `Embedder.aembed` against a raw aiohttp POST of the same request, in one run.

A server process (aiohttp, 127.0.0.1) answers `POST /v1/embeddings` with a fixed OpenAI-shaped body
of N vectors of D floats (or base64 float32); the raw client posts the same JSON, parses it with
orjson and takes the vectors in index order (what any client must do); dsrs does that plus its
checks (one vector per input, finite numbers, one length), pricing and budget-free bookkeeping.
Then the embedded engine: `handle_embeddings` called directly vs `Embedder("embedded/...")`.
Prints medians and the dsrs/raw ratio per shape.

    python bench/bench_embed.py [--calls 200] [--no-engine] [--no-http]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import random
import socket
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def _body(n: int, d: int, b64: bool) -> bytes:
    import orjson

    rnd = random.Random(n * 10_000 + d)
    data = []
    for i in range(n):
        v = [rnd.uniform(-1, 1) for _ in range(d)]
        emb = base64.b64encode(struct.pack(f"<{d}f", *v)).decode() if b64 else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return orjson.dumps({"object": "list", "model": "bench", "data": data,
                         "usage": {"prompt_tokens": n * 8, "total_tokens": n * 8}})  # fmt: skip


def _serve(port: int, shapes: list[tuple[int, int, bool]]) -> None:
    from aiohttp import web

    bodies = {f"{n}x{d}{'b' if b else 'f'}": _body(n, d, b) for n, d, b in shapes}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=bodies[request.match_info["shape"]], content_type="application/json")

    app = web.Application()
    app.router.add_post("/{shape}/v1/embeddings", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http(port: int, shapes: list[tuple[int, int, bool]], calls: int) -> None:
    import aiohttp
    import orjson

    from dsrs import Embedder

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for _ in range(50):  # the server is up
            try:
                async with s.get(f"http://127.0.0.1:{port}/") as r:
                    await r.read()
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        print(f"{'shape':>16} | {'raw µs':>9} | {'dsrs µs':>9} | dsrs/raw")
        for n, d, b64 in shapes:
            shape = f"{n}x{d}{'b' if b64 else 'f'}"
            url = f"http://127.0.0.1:{port}/{shape}/v1"
            texts = [f"text number {i}" for i in range(n)]
            fmt = "base64" if b64 else "float"
            body = {"model": "text-embedding-3-small", "input": texts, "encoding_format": fmt}
            headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}

            async def raw() -> list[list[float]]:
                async with s.post(url + "/embeddings", data=orjson.dumps(body), headers=headers) as r:
                    p = orjson.loads(await r.read())
                items = sorted(p["data"], key=lambda x: x["index"])
                if b64:
                    return [list(struct.unpack(f"<{d}f", base64.b64decode(x["embedding"]))) for x in items]
                return [x["embedding"] for x in items]

            e = Embedder("openai/text-embedding-3-small", base_url=url, api_key="k", ledger=False,
                         encoding_format=fmt, batch_size=n)  # fmt: skip
            times: dict[str, list[float]] = {"raw": [], "dsrs": []}
            for i in range(calls + 10):  # alternating, the first 10 of each unrecorded
                for name, f in (("raw", raw), ("dsrs", lambda: e.aembed(texts))):
                    t = time.perf_counter()
                    await f()
                    if i >= 10:
                        times[name].append(time.perf_counter() - t)
            a, b = statistics.median(times["raw"]) * 1e6, statistics.median(times["dsrs"]) * 1e6
            print(f"{shape:>16} | {a:9.0f} | {b:9.0f} | {b / a:.2f}x")


async def _engine(calls: int) -> None:
    from dsrs import Embedder
    from dsrs.providers import embedded_embeddings

    texts = ["The cat sat on the mat.", "A cat was sitting on the rug.", "Quarterly revenue grew 5 percent.",
             "Paris is the capital of France."]  # fmt: skip
    eng = embedded_embeddings.engine("gemma-3-270m")
    e = Embedder("embedded/gemma-3-270m", ledger=False)
    await e.aembed(texts)
    times: dict[str, list[float]] = {"raw": [], "dsrs": []}
    for _ in range(calls):
        t = time.perf_counter()
        await asyncio.to_thread(eng.handle_embeddings, {"input": texts})
        times["raw"].append(time.perf_counter() - t)
        t = time.perf_counter()
        await e.aembed(texts)
        times["dsrs"].append(time.perf_counter() - t)
    a, b = statistics.median(times["raw"]) * 1e3, statistics.median(times["dsrs"]) * 1e3
    print(f"embedded engine, 4 sentences: handle_embeddings {a:.1f} ms, Embedder {b:.1f} ms, dsrs/raw {b / a:.2f}x"
          f" ({4 / b * 1e3:.1f} texts/s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--no-http", action="store_true")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    shapes = [(1, 1536, False), (64, 1536, False), (64, 1536, True), (2048, 256, False), (2048, 256, True)]
    if not args.no_http:
        port = _port()
        srv = multiprocessing.Process(target=_serve, args=(port, shapes), daemon=True)
        srv.start()
        try:
            asyncio.run(_http(port, shapes, args.calls))
        finally:
            srv.terminate()
            srv.join(10)
    if not args.no_engine:
        asyncio.run(_engine(max(5, args.calls // 20)))


if __name__ == "__main__":
    main()
