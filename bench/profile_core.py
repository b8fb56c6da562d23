"""Profile dsrs's call path against the local bench server (127.0.0.1 only).

    python bench/profile_core.py                       # cProfile, 5,000 sequential calls
    python bench/profile_core.py --tool pyinstrument   # sampling profile of the same
    python bench/profile_core.py --concurrency 256 --delay 20
    python bench/profile_core.py --calls 1000 --tool none   # plain run: wrap in callgrind for counts

For figures that do not move with machine load, count instructions with callgrind: run
`valgrind --tool=callgrind python bench/profile_core.py --tool none --calls N --port P` for two
values of N (server started separately: `python bench/server.py --cpu 0`) and divide the
difference of the totals by the difference of N (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "What is the capital of France?"


async def run(base: str, calls: int, conc: int, cache: bool) -> None:
    from dsrs import LM, http

    lm = LM("openai/bench").with_base_url(base).with_api_key("k")
    if cache:
        lm = lm.with_cache(True)
    for _ in range(100):  # warm: connections, imports, caches
        await lm.acall(PROMPT)

    async def worker(n: int) -> None:
        for _ in range(n):
            await lm.acall(PROMPT)

    await asyncio.gather(*(worker(calls // conc) for _ in range(conc)))
    await http.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--delay", type=int, default=0, help="server delay per call, ms")
    ap.add_argument("--cache", action="store_true", help="with_cache(True): profile memory hits")
    ap.add_argument("--tool", choices=("cprofile", "pyinstrument", "none"), default="cprofile")
    ap.add_argument("--port", type=int, help="an already running bench/server.py")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    if not 0 < args.calls <= 1_000_000 or not 0 < args.concurrency <= 1024:
        sys.exit("--calls in 1..1,000,000 and --concurrency in 1..1024")

    server = None
    port = args.port
    if port is None:
        server = subprocess.Popen([sys.executable, str(HERE / "server.py"), "--cpu", "0"], stdout=subprocess.PIPE,
                                  text=True)  # fmt: skip
        port = int(server.stdout.readline().split()[1])  # type: ignore[union-attr]
    try:
        if len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(0, {1})
        base = f"http://127.0.0.1:{port}/delay={args.delay}/v1"
        coro = run(base, args.calls, args.concurrency, args.cache)
        if args.tool == "none":
            asyncio.run(coro)
        elif args.tool == "pyinstrument":
            from pyinstrument import Profiler

            with Profiler(interval=0.0002, async_mode="disabled") as p:
                asyncio.run(coro)
            p.print(show_all=False)
        else:
            prof = cProfile.Profile()
            prof.enable()
            asyncio.run(coro)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
