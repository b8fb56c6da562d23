"""dsrs vs raw aiohttp vs raw httpx against one fast local OpenAI-compatible server, in one run.

    python bench/bench_core.py            # full run, a few minutes
    python bench/bench_core.py --quick    # ~30 s, smaller counts

The server (bench/server.py) is pinned to core 0; each client runs in its own process pinned
to core 1, on the default asyncio loop. Every client sends the same request (same body, same
headers) to 127.0.0.1 only. Measured, per client:

- cold import: `import <client>` in a fresh interpreter, median of several runs;
- sequential per-call latency p50/p99, no server delay;
- throughput at concurrency 64 and 256 with a 20 ms server delay (calls/s and client CPU/call);
- streaming: client time per SSE chunk (server sends N chunks back to back);
- memory-cache hit latency (dsrs `with_cache(True)`, the second and later identical calls);
- RSS after 10,000 and 20,000 calls (the growth between them should be ~0).

A full run does 3 rounds (httpx 1) after a short unrecorded warm-up of the server, and keeps
each client's best figure per metric: load from anything else on the machine only makes
figures worse. Every loop is bounded in count and time. Needs the bench extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLIENTS = ("aiohttp", "httpx", "dsrs")
SERVER_CPU, CLIENT_CPU = 0, 1
PROMPT = "What is the capital of France?"

FULL = {"imports": 9, "rounds": 3, "warmup": 300, "seq": 3000, "tp_secs": 3.0, "tp_warm": 0.5, "chunks": 1000,
        "streams": 30, "hits": 20000, "rss_calls": 20000, "rss_conc": 16, "rss_secs": 120.0}  # fmt: skip
QUICK = {"imports": 5, "rounds": 1, "warmup": 100, "seq": 1000, "tp_secs": 1.0, "tp_warm": 0.3, "chunks": 500,
         "streams": 10, "hits": 5000, "rss_calls": 6000, "rss_conc": 16, "rss_secs": 25.0}  # fmt: skip
WARM = {**QUICK, "warmup": 0, "seq": 300, "tp_secs": 0.5, "streams": 2, "hits": 10, "rss_calls": 200}
# Of several rounds, the best figure of each client counts (like timeit): other work on the
# machine only ever makes a figure worse. httpx runs one round (it is the slow reference).
BEST = {"p50_us": min, "p99_us": min, "c64_calls_s": max, "c256_calls_s": max, "c256_cpu_us": min,
        "stream_us_chunk": min, "hit_us": min}  # fmt: skip

MODES = {"full": FULL, "quick": QUICK, "warm": WARM}

IMPORTS = {
    "aiohttp": "import aiohttp",
    "httpx": "import httpx",
    "dsrs": "import dsrs",
    "dsrs+LM": "import dsrs; dsrs.LM('openai/bench')",
}


# -- the clients ------------------------------------------------------------------------------
def body(stream: bool = False) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        b["stream"] = True
        b["stream_options"] = {"include_usage": True}
    return b


HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer k"}


class RawAiohttp:
    """What a careful hand-written aiohttp client does: one pooled session, POST, json.loads."""

    async def start(self) -> None:
        import aiohttp

        self.s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), skip_auto_headers=("User-Agent",))

    async def call(self, base: str) -> str:
        async with self.s.post(base + "/chat/completions", data=json.dumps(body()), headers=HEADERS) as r:
            r.raise_for_status()
            payload = json.loads(await r.read())
        return payload["choices"][0]["message"]["content"]

    async def stream(self, base: str) -> int:
        n = 0
        async with self.s.post(base + "/chat/completions", data=json.dumps(body(True)), headers=HEADERS) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                for ch in chunk["choices"]:
                    if ch["delta"].get("content"):
                        n += 1
        return n

    async def stop(self) -> None:
        await self.s.close()


class RawHttpx:
    async def start(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.c = httpx.AsyncClient(limits=limits, timeout=60.0)

    async def call(self, base: str) -> str:
        r = await self.c.post(base + "/chat/completions", content=json.dumps(body()), headers=HEADERS)
        r.raise_for_status()
        return json.loads(r.content)["choices"][0]["message"]["content"]

    async def stream(self, base: str) -> int:
        n = 0
        async with self.c.stream("POST", base + "/chat/completions", content=json.dumps(body(True)),
                                 headers=HEADERS) as r:  # fmt: skip
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:].strip()
                if data == "[DONE]":
                    break
                for ch in json.loads(data)["choices"]:
                    if ch["delta"].get("content"):
                        n += 1
        return n

    async def stop(self) -> None:
        await self.c.aclose()


class Dsrs:
    async def start(self) -> None:
        from dsrs import LM

        self.LM = LM
        self.lms: dict[str, Any] = {}

    def lm(self, base: str) -> Any:
        lm = self.lms.get(base)
        if lm is None:
            lm = self.lms[base] = self.LM("openai/bench").with_base_url(base).with_api_key("k")
        return lm

    async def call(self, base: str) -> str:
        return (await self.lm(base).acall(PROMPT)).text

    async def stream(self, base: str) -> int:
        n = 0
        async for x in self.lm(base).astream(PROMPT):
            if isinstance(x, str):
                n += 1
        return n

    async def stop(self) -> None:
        from dsrs import http

        await http.aclose()


# -- phases (run inside one client process) -----------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def throughput(cl: Any, base: str, conc: int, secs: float, warm: float) -> dict[str, float]:
    done = 0
    stop = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            await cl.call(base)
            done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(conc)]
    await asyncio.sleep(warm)
    n0, t0, c0 = done, time.perf_counter(), time.process_time()
    await asyncio.sleep(secs)
    n1, t1, c1 = done, time.perf_counter(), time.process_time()
    stop = True
    _, pending = await asyncio.wait(tasks, timeout=30.0)
    for t in pending:
        t.cancel()
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception():
            raise t.exception()  # type: ignore[misc]
    calls = n1 - n0
    return {"calls_s": calls / (t1 - t0), "cpu_us": (c1 - c0) / max(calls, 1) * 1e6}


async def rss_phase(cl: Any, base: str, total: int, conc: int, secs: float) -> dict[str, float]:
    half = total // 2
    started = 0
    marks: dict[str, float] = {}
    deadline = time.monotonic() + secs

    async def worker() -> None:
        nonlocal started
        while started < total and time.monotonic() < deadline:
            started += 1
            await cl.call(base)

    async def run_to(n: int) -> None:
        nonlocal total
        total = n
        await asyncio.gather(*(worker() for _ in range(conc)))

    gc.collect()
    marks["rss_start_mb"] = rss_mb()
    await run_to(half)
    gc.collect()
    marks["rss_half_mb"], marks["rss_half_calls"] = rss_mb(), started
    await run_to(2 * half)
    gc.collect()
    marks["rss_end_mb"], marks["rss_end_calls"] = rss_mb(), started
    marks["rss_growth_mb"] = marks["rss_end_mb"] - marks["rss_half_mb"]
    return marks


async def run_client(name: str, port: int, cfg: dict[str, Any]) -> dict[str, Any]:
    root = f"http://127.0.0.1:{port}"
    fast, slow = f"{root}/v1", f"{root}/delay=20/v1"
    streaming = f"{root}/chunks={cfg['chunks']}/v1"
    cl: Any = {"aiohttp": RawAiohttp, "httpx": RawHttpx, "dsrs": Dsrs}[name]()
    await cl.start()
    out: dict[str, Any] = {}
    assert "Paris" in await cl.call(fast)

    for _ in range(cfg["warmup"]):
        await cl.call(fast)
    lat = []
    for _ in range(cfg["seq"]):
        t = time.perf_counter_ns()
        await cl.call(fast)
        lat.append((time.perf_counter_ns() - t) / 1000.0)
    out["p50_us"], out["p99_us"] = pct(lat, 0.5), pct(lat, 0.99)

    for conc in (64, 256):
        r = await throughput(cl, slow, conc, cfg["tp_secs"], cfg["tp_warm"])
        out[f"c{conc}_calls_s"], out[f"c{conc}_cpu_us"] = r["calls_s"], r["cpu_us"]

    times = []
    for _ in range(cfg["streams"]):
        t = time.perf_counter()
        n = await cl.stream(streaming)
        times.append(time.perf_counter() - t)
        assert n == cfg["chunks"], (n, cfg["chunks"])
    out["stream_us_chunk"] = statistics.median(times) / cfg["chunks"] * 1e6

    if name == "dsrs":
        lm = cl.lm(fast).with_cache(True)
        first = await lm.acall(PROMPT)
        assert not first.usage.cache_hit
        hits = []
        for _ in range(cfg["hits"]):
            t = time.perf_counter_ns()
            c = await lm.acall(PROMPT)
            hits.append((time.perf_counter_ns() - t) / 1000.0)
        assert c.usage.cache_hit and c.text == first.text
        out["hit_us"] = statistics.median(hits)

    out.update(await rss_phase(cl, fast, cfg["rss_calls"], cfg["rss_conc"], cfg["rss_secs"]))
    await cl.stop()
    return out


# -- the driver ---------------------------------------------------------------------------------
def pin(cpu: int) -> None:
    try:
        if len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        pass


def import_ms(stmt: str, runs: int) -> float:
    code = (
        f"import os,time\ntry: os.sched_setaffinity(0,{{{CLIENT_CPU}}})\nexcept Exception: pass\n"
        f"t=time.perf_counter()\n{stmt}\nprint(time.perf_counter()-t)"
    )
    xs = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        xs.append(float(r.stdout.strip()) * 1000)
    return statistics.median(xs)


def run_one(client: str, port: int, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--client", client, "--port", str(port), "--mode", mode]
    with tempfile.TemporaryDirectory(prefix="dsrs-bench-") as cache_dir:  # a cold cache for every run
        env = {**os.environ, "DSRS_CACHE_DIR": cache_dir}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode:
        sys.exit(f"client {client} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_server() -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen(
        [sys.executable, str(HERE / "server.py"), "--port", "0", "--cpu", str(SERVER_CPU)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("PORT "):
        p.kill()
        sys.exit(f"the bench server did not start: {line!r}")
    return p, int(line.split()[1])


TARGETS = {  # metric: (kind, bound) where the dsrs figure (or its ratio to raw aiohttp) must hold
    "import_ms": ("abs<=", 100.0),
    "p50_us": ("ratio<=", 1.15),
    "c256_calls_s": ("ratio>=", 0.9),
    "hit_us": ("abs<=", 20.0),
    "rss_growth_mb": ("abs<=", 1.0),
}
ROWS = [
    ("import_ms", "cold import, ms (median)", "{:.0f}"),
    ("import_lm_ms", "import + LM(...) built, ms", "{:.0f}"),
    ("p50_us", "sequential p50, µs", "{:.0f}"),
    ("p99_us", "sequential p99, µs", "{:.0f}"),
    ("c64_calls_s", "calls/s, c=64, 20 ms delay", "{:,.0f}"),
    ("c256_calls_s", "calls/s, c=256, 20 ms delay", "{:,.0f}"),
    ("c256_cpu_us", "client CPU per call at c=256, µs", "{:.0f}"),
    ("stream_us_chunk", "stream, µs per chunk", "{:.1f}"),
    ("hit_us", "memory-cache hit, µs (median)", "{:.1f}"),
    ("rss_half_mb", "RSS after half the calls, MB", "{:.1f}"),
    ("rss_end_mb", "RSS after all calls, MB", "{:.1f}"),
    ("rss_growth_mb", "RSS growth, second half, MB", "{:+.2f}"),
]


def verdict(key: str, d: float | None, a: float | None) -> str:
    t = TARGETS.get(key)
    if t is None or d is None:
        return ""
    kind, bound = t
    if kind.startswith("ratio"):
        if not a:
            return ""
        v = d / a
        ok = v <= bound if kind == "ratio<=" else v >= bound
        return f"{'ok ' if ok else 'MISS'} ({kind[5:]} {bound}x aiohttp)"
    ok = d <= bound
    return f"{'ok ' if ok else 'MISS'} (<= {bound:g})"


def table(res: dict[str, dict[str, Any]], calls: int) -> str:
    head = ["metric", *CLIENTS, "dsrs/aiohttp", "target"]
    lines = ["| " + " | ".join(head) + " |", "| --- " + "| ---: " * (len(head) - 2) + "| --- |"]
    for key, label, fmt in ROWS:
        label = label.replace("all calls", f"{calls:,} calls").replace("half the calls", f"{calls // 2:,} calls")
        vals = [res[c].get(key) for c in CLIENTS]
        cells = [fmt.format(v) if v is not None else "" for v in vals]
        a, d = res["aiohttp"].get(key), res["dsrs"].get(key)
        ratio = f"{d / a:.2f}x" if a and d is not None and "rss" not in key else ""
        lines.append("| " + " | ".join([label, *cells, ratio, verdict(key, d, a)]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts, ~30 s")
    ap.add_argument("--json", metavar="PATH", help="also write the raw figures here")
    ap.add_argument("--clients", default=",".join(CLIENTS), help=argparse.SUPPRESS)
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run one client's phases
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("full", "quick", "warm"), default="full", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL

    if args.client:  # child process: one client, pinned to its core
        pin(CLIENT_CPU)
        print(json.dumps(asyncio.run(run_client(args.client, args.port, MODES[args.mode]))))
        return

    if len(os.sched_getaffinity(0)) < 2:
        print("warning: fewer than 2 cores; server and client share one", file=sys.stderr)
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    res: dict[str, dict[str, Any]] = {c: {} for c in CLIENTS}
    for c in CLIENTS:
        res[c]["import_ms"] = import_ms(IMPORTS[c], cfg["imports"])
    res["dsrs"]["import_lm_ms"] = import_ms(IMPORTS["dsrs+LM"], cfg["imports"])
    server, port = start_server()
    try:
        run_one("aiohttp", port, "warm")  # warm the server up; not recorded
        clients = args.clients.split(",")
        for rnd in range(cfg["rounds"]):
            for c in clients:
                if rnd and c == "httpx":
                    continue
                got = run_one(c, port, "quick" if args.quick else "full")
                for k, v in got.items():
                    old = res[c].get(k)
                    res[c][k] = v if old is None or k not in BEST else BEST[k](old, v)
                print(f"  round {rnd + 1}: {c} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(10)

    import aiohttp
    import httpx

    print(f"\ndsrs benchmark ({'quick' if args.quick else 'full'}), Python {sys.version.split()[0]}, "
          f"aiohttp {aiohttp.__version__}, httpx {httpx.__version__}, default asyncio loop in clients, "
          f"best of {cfg['rounds']} round(s), {time.perf_counter() - started:.0f} s, "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end ({os.cpu_count()} cores)\n")  # fmt: skip
    print(table(res, cfg["rss_calls"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg, "results": res}, indent=2))


if __name__ == "__main__":
    main()
