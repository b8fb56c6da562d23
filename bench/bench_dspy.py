"""dspy on dsrs vs dspy's own engine, and dsrs with OpenTelemetry tracing on vs off, in one run.

    python bench/bench_dspy.py            # 3 rounds, ~2 minutes
    python bench/bench_dspy.py --quick    # 1 round, shorter phases
    python bench/bench_dspy.py --rounds 5

Same server for every client: bench/server.py (the fast fake OpenAI-compatible server) pinned to
core 0; each client in its own process pinned to core 1, on the default asyncio loop, sending the
same one-message chat request to 127.0.0.1 only. Clients:

- `dspy-native`: `dspy.LM("openai/bench", api_base=..., api_key=..., cache=False)`, dspy's native
  (lm15) engine; called as `await lm.acall(messages=[...])`;
- `dspy-dsrs`: `dsrs.interop.dspy.lm(LM("openai/bench")...)`, the same dspy.LM over dsrs's engine,
  called the same way (dspy's cache off, its history on, as by default, for both);
- `dsrs`: the dsrs LM itself (`await lm.acall(prompt)`), tracing off (no tracer provider);
- `dsrs+otel`: the same with an OpenTelemetry SDK `TracerProvider` and a `BatchSpanProcessor`
  to an exporter that drops the spans (so what is measured is making the spans, not shipping them);
  the same process also times a bare SDK span (start + end, no attributes) for comparison;
- `dsrs+otel-10%`: the same provider with a `ParentBased(TraceIdRatioBased(0.1))` sampler.

Per client: client CPU per call, sequential with no server delay (`time.process_time` over N calls),
and throughput at concurrency 256 with a 20 ms server delay (calls/s and CPU per call). A full run
does 3 rounds in alternating order and keeps each client's best figure (other work on the machine
only makes figures worse); the header prints the load average. Every loop is bounded in count and
time. Needs the bench, dspy and dev extras (httptools/uvloop for the server, dspy, opentelemetry-sdk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_core import CLIENT_CPU, pin, start_server  # noqa: E402

CLIENTS = ("dspy-native", "dspy-dsrs", "dsrs", "dsrs+otel", "dsrs+otel-10%")
PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": PROMPT}]
FULL = {"rounds": 3, "warmup": 300, "seq": 2000, "tp_secs": 3.0, "tp_warm": 0.5}
QUICK = {"rounds": 1, "warmup": 100, "seq": 600, "tp_secs": 1.5, "tp_warm": 0.3}
BEST = {"seq_cpu_us": min, "c256_calls_s": max, "c256_cpu_us": min, "bare_span_us": min}


def make_client(name: str, base: str) -> Any:
    """An async `call()` returning the answer's text, for one client."""
    if name.startswith("dspy"):
        import dspy

        if name == "dspy-native":
            dlm = dspy.LM("openai/bench", api_base=base, api_key="k", cache=False, num_retries=0)
        else:
            import dsrs.interop.dspy
            from dsrs import LM

            dlm = dsrs.interop.dspy.lm(LM("openai/bench").with_base_url(base).with_api_key("k"), ledger=False)

        async def call_dspy() -> str:
            out = await dlm.acall(messages=MESSAGES)
            return str(out[0]["text"] if isinstance(out[0], dict) else out[0])

        return call_dspy
    from dsrs import LM, tracing

    if name.startswith("dsrs+otel"):
        from opentelemetry.sdk.trace import TracerProvider, sampling
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Dropped(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        ratio = sampling.ParentBased(sampling.TraceIdRatioBased(0.1)) if name.endswith("10%") else None
        provider = TracerProvider(sampler=ratio) if ratio else TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropped()))
        assert tracing.configure(tracer_provider=provider)
    lm = LM("openai/bench").with_base_url(base).with_api_key("k")

    async def call_dsrs() -> str:
        return (await lm.acall(PROMPT)).text

    return call_dsrs


async def throughput(call: Any, conc: int, secs: float, warm: float) -> dict[str, float]:
    done, stop = 0, False

    async def worker() -> None:
        nonlocal done
        while not stop:
            await call()
            done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(conc)]
    await asyncio.sleep(warm)
    n0, t0, c0 = done, time.perf_counter(), time.process_time()
    await asyncio.sleep(secs)
    n1, t1, c1 = done, time.perf_counter(), time.process_time()
    stop = True
    _, pending = await asyncio.wait(tasks, timeout=60.0)
    for t in pending:
        t.cancel()
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception():
            raise t.exception()  # type: ignore[misc]
    calls = n1 - n0
    return {"calls_s": calls / (t1 - t0), "cpu_us": (c1 - c0) / max(calls, 1) * 1e6}


async def run_client(name: str, port: int, cfg: dict[str, Any]) -> dict[str, Any]:
    root = f"http://127.0.0.1:{port}"
    fast, slow = make_client(name, f"{root}/v1"), make_client(name, f"{root}/delay=20/v1")
    assert "Paris" in await fast()
    for _ in range(cfg["warmup"]):
        await fast()
    c0 = time.process_time()
    for _ in range(cfg["seq"]):
        await fast()
    out: dict[str, Any] = {"seq_cpu_us": (time.process_time() - c0) / cfg["seq"] * 1e6}
    r = await throughput(slow, 256, cfg["tp_secs"], cfg["tp_warm"])
    out["c256_calls_s"], out["c256_cpu_us"] = r["calls_s"], r["cpu_us"]
    if name.startswith("dsrs+otel"):
        from dsrs import tracing

        assert tracing.ON  # the spans were made
        if name == "dsrs+otel":  # a bare span of the same SDK, for scale
            from opentelemetry.trace import SpanKind

            tracer = tracing._tracer
            c0 = time.process_time()
            for _ in range(cfg["seq"] * 5):
                tracer.start_span("bare", kind=SpanKind.CLIENT).end()
            out["bare_span_us"] = (time.process_time() - c0) / (cfg["seq"] * 5) * 1e6
    return out


async def plain(name: str, port: int, calls: int) -> None:
    """Calls and nothing else, for instruction counts: `valgrind --tool=callgrind python bench/bench_dspy.py
    --plain dsrs+otel --calls N --port P` for two values of N, difference of the totals / difference of N."""
    call = make_client("dsrs+otel" if name == "bare-span" else name, f"http://127.0.0.1:{port}/v1")
    for _ in range(200):  # warm: connections, imports, caches
        await call()
    if name == "bare-span":
        from opentelemetry.trace import SpanKind

        from dsrs import tracing

        for _ in range(calls):
            tracing._tracer.start_span("bare", kind=SpanKind.CLIENT).end()
    else:
        for _ in range(calls):
            await call()


def run_one(client: str, port: int, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--client", client, "--port", str(port)] + (["--quick"] if quick else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode:
        sys.exit(f"client {client} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    ap.add_argument("--plain", metavar="CLIENT", help="only make --calls sequential calls with CLIENT (for callgrind; "
                    "CLIENT may also be 'bare-span': that many bare SDK spans), against --port")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.plain:
        asyncio.run(plain(args.plain, args.port, args.calls))
        return
    if args.client:
        pin(CLIENT_CPU)
        print(json.dumps(asyncio.run(run_client(args.client, args.port, cfg))))
        return
    started, load0 = time.perf_counter(), os.getloadavg()
    res: dict[str, dict[str, float]] = {c: {} for c in CLIENTS}
    server, port = start_server()
    try:
        run_one("dsrs", port, True)  # warm the server up; not recorded
        for rnd in range(cfg["rounds"]):
            for c in CLIENTS if rnd % 2 == 0 else tuple(reversed(CLIENTS)):
                for k, v in run_one(c, port, args.quick).items():
                    old = res[c].get(k)
                    res[c][k] = v if old is None else BEST[k](old, v)
                print(f"  round {rnd + 1}: {c} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(10)
    load1 = os.getloadavg()
    print(f"bench_dspy: {cfg['rounds']} round(s), best of each; load average {load0[0]:.2f} at start, "
          f"{load1[0]:.2f} at end ({time.perf_counter() - started:.0f} s)\n")
    rows = [("seq_cpu_us", "client CPU per call, sequential, µs", "{:.0f}"),
            ("c256_calls_s", "calls/s, c=256, 20 ms delay", "{:,.0f}"),
            ("c256_cpu_us", "client CPU per call at c=256, µs", "{:.0f}")]  # fmt: skip
    print("| metric | " + " | ".join(CLIENTS) + " | dspy-dsrs / dspy-native | dsrs+otel / dsrs |")
    print("| --- |" + " ---: |" * (len(CLIENTS) + 2))
    for key, label, fmt in rows:
        vals = [res[c][key] for c in CLIENTS]
        r1 = res["dspy-dsrs"][key] / res["dspy-native"][key]
        r2 = res["dsrs+otel"][key] / res["dsrs"][key]
        print(f"| {label} | " + " | ".join(fmt.format(v) for v in vals) + f" | {r1:.2f}x | {r2:.3f}x |")
    for c in ("dsrs+otel", "dsrs+otel-10%"):
        over = res[c]["c256_cpu_us"] / res["dsrs"]["c256_cpu_us"] - 1
        drop = 1 - res[c]["c256_calls_s"] / res["dsrs"]["c256_calls_s"]
        extra = res[c]["c256_cpu_us"] - res["dsrs"]["c256_cpu_us"]
        print(f"\n{c} at c=256: {over * 100:+.1f}% CPU per call ({extra:+.1f} µs), {drop * 100:.1f}% fewer calls/s "
              f"({'ok' if drop <= 0.05 else 'MISS'}: target <= 5%)", end="")
    print(f"\na bare span of the same SDK (start + end, no attributes, sequential): {res['dsrs+otel']['bare_span_us']:.1f} µs")
    cpu = res["dspy-dsrs"]["c256_cpu_us"] / res["dspy-native"]["c256_cpu_us"]
    print(f"dspy on dsrs at c=256: {cpu:.2f}x dspy-native's CPU per call, "
          f"{res['dspy-dsrs']['c256_calls_s'] / res['dspy-native']['c256_calls_s']:.2f}x its calls/s "
          f"({'ok' if cpu <= 1.0 else 'MISS'}: target <= 1.0x its CPU)")


if __name__ == "__main__":
    main()
