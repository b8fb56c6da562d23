"""Chaos benchmark for LaneMux (a script, not a test): many calls through 3 lanes against a fault server.

    python bench/bench_lanes_chaos.py [--calls 10000] [--concurrency 256]

A fault server (its own process, loopback only) answers each lane's requests with injected faults,
per lane rates: 429 with a short or a long Retry-After, 500/503, connection resets, stalls (past
the lane's timeout), malformed JSON, quota errors. One mux-wide hard Budget sized below what all
calls would cost. Prints answered %, retries, fallbacks, p50/p99 latency, msats over budget (must
be 0), and the mux's overhead over a single LM against a healthy server (bench/server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
OK = {
    "id": "c", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
}  # fmt: skip
# lane -> fault probabilities (the rest answers normally)
FAULTS = {
    "a": {"429short": 0.05, "429long": 0.05, "500": 0.08, "reset": 0.04, "stall": 0.02, "malformed": 0.04, "quota": 0.02},
    "b": {"429short": 0.03, "500": 0.05, "reset": 0.02, "stall": 0.01, "malformed": 0.02},
    "c": {"500": 0.02, "reset": 0.01},
}
STALL_S = 1.5
LANE_TIMEOUT_S = 0.5


def fault_server(q: Any) -> None:
    from aiohttp import web

    rnd = random.Random(7)

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        roll, acc, fault = rnd.random(), 0.0, None
        for name, p in FAULTS[request.match_info["lane"]].items():
            acc += p
            if roll < acc:
                fault = name
                break
        err = {"error": {"message": "injected", "type": "server_error", "code": None}}
        if fault == "429short":
            return web.json_response(err, status=429, headers={"retry-after-ms": "20"})
        if fault == "429long":
            return web.json_response(err, status=429, headers={"retry-after": "30"})
        if fault == "500":
            return web.json_response(err, status=500)
        if fault == "quota":
            return web.json_response({"error": {"message": "quota", "code": "insufficient_quota"}}, status=429)
        if fault == "reset":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if fault == "stall":
            await asyncio.sleep(STALL_S)
        if fault == "malformed":
            return web.Response(body=b'{"choices": [', content_type="application/json")
        return web.json_response(OK)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{lane}/v1/chat/completions", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        q.put(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def run_calls(call: Any, n: int, conc: int) -> tuple[list[float], list[Any], list[BaseException]]:
    lat: list[float] = []
    outs: list[Any] = []
    errs: list[BaseException] = []
    it = iter(range(n))

    async def worker() -> None:
        for _ in it:
            t = time.perf_counter()
            try:
                outs.append(await call())
                lat.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - counted
                errs.append(e)

    await asyncio.gather(*(worker() for _ in range(conc)))
    return lat, outs, errs


async def chaos(port: int, calls: int, conc: int) -> None:
    from dsrs import LM, Budget, LaneMux, pricing

    base = f"http://127.0.0.1:{port}"
    mux = LaneMux()
    for name in "abc":
        lm = LM("openai/gpt-4o-mini").with_base_url(f"{base}/{name}/v1").with_api_key("k").with_timeout(LANE_TIMEOUT_S)
        mux = mux.add_lane(name, lm)
    mux = mux.with_max_tokens(16)
    per_call = pricing.cost_msats("openai", "gpt-4o-mini", OK["usage"]["prompt_tokens"], OK["usage"]["completion_tokens"])
    budget = Budget(per_call * calls * 3 // 4)  # less than all calls cost: refusals must happen, never overspend
    mux = mux.with_budget(budget)
    t0 = time.perf_counter()
    lat, outs, errs = await run_calls(lambda: mux.acall("What is the capital of France?"), calls, conc)
    wall = time.perf_counter() - t0
    retries = sum(c.route.retries for c in outs)
    fallbacks = sum(c.route.fallbacks for c in outs)
    by_lane: dict[str, int] = {}
    for c in outs:
        by_lane[c.route.lane] = by_lane.get(c.route.lane, 0) + 1
    kinds: dict[str, int] = {}
    for e in errs:
        kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
    for e in errs:
        r = getattr(e, "route", None)
        if r is not None:
            retries += r.retries
            fallbacks += r.fallbacks
    print(f"chaos: {calls} calls, concurrency {conc}, 3 lanes, {wall:.1f} s")
    refused = kinds.get("BudgetExceededError", 0)
    print(f"  answered        {100 * len(outs) / calls:.2f} % of all, {100 * len(outs) / (calls - refused):.2f} % of "
          f"those the budget allowed; by lane {dict(sorted(by_lane.items()))}")  # fmt: skip
    print(f"  errors          {dict(sorted(kinds.items()))}")
    print(f"  retries         {retries}   fallbacks {fallbacks}")
    print(f"  latency         p50 {1000 * pct(lat, 0.5):.1f} ms   p99 {1000 * pct(lat, 0.99):.1f} ms")
    print(f"  budget          limit {budget.limit_msats} msats, spent {budget.spent_msats}, "
          f"reserved {budget.reserved_msats}, open {budget.open_reservations}")  # fmt: skip
    print(f"  msats over budget {max(0, budget.spent_msats - budget.limit_msats)}")
    print(f"  circuits opened {[lane.circuit.opened for lane in mux.lanes]}")


async def overhead(port: int, calls: int, conc: int, rounds: int = 5) -> None:
    """Interleaved rounds (LM, mux, LM, mux...) against the healthy server; the median ratio."""
    from dsrs import LM, LaneMux

    lm = LM("openai/bench").with_base_url(f"http://127.0.0.1:{port}/v1").with_api_key("k")
    mux = LaneMux().add_lane("only", lm).add_lane("spare", lm)
    await run_calls(lambda: lm.acall("hi"), 2000, conc)  # warm up the pool
    rates: dict[str, list[float]] = {"lm": [], "mux": []}
    ratios = []
    for _ in range(rounds):
        took = {}
        for name, target in (("lm", lm), ("mux", mux)):
            t = time.perf_counter()
            _, outs, errs = await run_calls(lambda target=target: target.acall("hi"), calls, conc)
            assert not errs and len(outs) == calls, errs[:3]
            took[name] = time.perf_counter() - t
            rates[name].append(calls / took[name])
        ratios.append(took["mux"] / took["lm"] - 1)
        print(f"  round: LM {calls / took['lm']:.0f} calls/s, LaneMux {calls / took['mux']:.0f} calls/s")
    print(f"healthy server, {calls} calls at concurrency {conc}, {rounds} interleaved rounds (medians):")
    print(f"  single LM {statistics.median(rates['lm']):.0f} calls/s   LaneMux {statistics.median(rates['mux']):.0f} "
          f"calls/s   mux overhead {100 * statistics.median(ratios):+.1f} %")  # fmt: skip


async def cpu_overhead(n: int = 20_000) -> None:
    """The mux's own CPU per call, without the network: an in-process LM that answers at once."""
    from dsrs import LaneMux
    from dsrs.lm import BaseLM
    from dsrs.types import Completion, LmUsage

    class Instant:
        async def complete(self, req: Any) -> Completion:
            return Completion("Paris", LmUsage(12, 2, 14, calls=1))

    class InstantLM(BaseLM):
        provider, model = "llamacpp", "instant"

        def _make_backend(self) -> Any:
            return Instant()

    lm = InstantLM()
    mux = LaneMux().add_lane("only", lm).add_lane("spare", lm)
    per: dict[str, list[float]] = {"lm": [], "mux": []}
    for _ in range(5):
        for name, target in (("lm", lm), ("mux", mux)):
            t = time.perf_counter()
            for _ in range(n // 5):
                await target.acall("hi")
            per[name].append(1e6 * (time.perf_counter() - t) / (n // 5))
    a, b = statistics.median(per["lm"]), statistics.median(per["mux"])
    print(f"in-process LM (no network): LM {a:.1f} us/call, LaneMux {b:.1f} us/call: the mux adds {b - a:.1f} us/call")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=256)
    a = ap.parse_args()
    q: Any = multiprocessing.Queue()
    proc = multiprocessing.Process(target=fault_server, args=(q,), daemon=True)
    proc.start()
    fast = subprocess.Popen([sys.executable, os.path.join(HERE, "server.py"), "--port", "0"], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        port = q.get(timeout=30)
        line = fast.stdout.readline()  # type: ignore[union-attr]
        fast_port = int(line.split()[1])
        asyncio.run(chaos(port, a.calls, a.concurrency))
        asyncio.run(overhead(fast_port, a.calls, a.concurrency))
        asyncio.run(cpu_overhead())
    finally:
        proc.terminate()
        fast.terminate()


if __name__ == "__main__":
    main()
