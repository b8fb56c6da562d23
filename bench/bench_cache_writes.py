"""Cache-miss throughput with the SQLite cache on vs off (loopback only).

    python bench/bench_cache_writes.py [--calls 2000] [--conc 16]

Starts bench/server.py (or tests/scripted.py without the bench extra), then runs N distinct prompts (every call a cache miss, so every call
writes one row) through `LM("openai/bench")` at a fixed concurrency: once without a cache, once
with `Cache(SqliteStore(<temp dir>))`. Prints calls/s for both. The figure that matters is the
ratio: a cache write must not cost the event loop an fsync per call.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# tests/scripted.py in its own process, when bench/server.py's httptools is not installed
SCRIPTED = (
    "import sys, time; sys.path.insert(0, sys.argv[1]); from scripted import ScriptedServer, chat_reply; "
    "s = ScriptedServer(); s.script(default=chat_reply('Paris')); s.requests = type('L', (list,), "
    "{'append': lambda self, x: None})(); print('PORT', s.port, flush=True); time.sleep(1e6)"
)


def start_server() -> tuple[subprocess.Popen[str], int]:
    try:
        import httptools  # noqa: F401

        argv = [sys.executable, str(HERE / "server.py"), "--port", "0"]
    except ImportError:
        argv = [sys.executable, "-c", SCRIPTED, str(HERE.parent / "tests")]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    return p, int(line.split()[1])


async def run(url: str, calls: int, conc: int, cache: object, tag: str) -> float:
    import dsrs

    lm = dsrs.LM("openai/bench", base_url=url, api_key="k")
    if cache is not None:
        lm = lm.with_cache(cache)
    await lm.acall(f"warm {tag}")
    todo = iter(range(calls))

    async def worker() -> None:
        for i in todo:
            await lm.acall(f"{tag} prompt {i}")

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return calls / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--conc", type=int, default=16)
    a = ap.parse_args()
    from dsrs.cache import Cache, SqliteStore

    server, port = start_server()
    url = f"http://127.0.0.1:{port}/v1"
    try:
        with tempfile.TemporaryDirectory() as d:
            off = asyncio.run(run(url, a.calls, a.conc, None, "off"))
            store = SqliteStore(Path(d) / "cache.sqlite3")
            on = asyncio.run(run(url, a.calls, a.conc, Cache(store), "on"))
            t = time.perf_counter()
            getattr(store, "flush", lambda: None)()
            drain = time.perf_counter() - t
            store.close()
        print(f"cache off: {off:,.0f} calls/s; SQLite cache on: {on:,.0f} calls/s ({on / off:.2f}x); "
              f"flush after the run: {drain * 1000:.0f} ms")  # fmt: skip
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
