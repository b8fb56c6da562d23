"""What `CodexSdkLM` adds over a bare `codex exec --json` of the same turn, in one run.

    python bench/bench_codex.py               # 15 alternating pairs (~10 s)
    python bench/bench_codex.py --runs 30

Both sides run the real Codex CLI (DSRS_TEST_CODEX_BIN, else the copy scripts/test installs)
against a local scripted Responses-API server (tests/responses_server.py, 127.0.0.1) that
answers one text turn at once. Per pair, in alternating order:

- bare: `codex exec --json ... -` as a plain subprocess, with exactly the argv and environment
  `CodexSdkLM` builds for this turn (taken from its own backend, so they cannot drift), a new
  session, the prompt on stdin and stdin closed; timed from spawn to exit;
- dsrs: `await lm.acall(prompt)` on the same `CodexSdkLM` (timed around the call).

HOME and CODEX_HOME are fresh private temp dirs (an empty HOME keeps the CLI's login shells off
the user's ~/.bashrc). One unrecorded warm-up pair first. Prints medians, p10/p90, the median
of the per-pair overhead (dsrs - bare) and the load average. Bounded: --runs pairs, a 60 s
timeout per call, --max-seconds for the whole run; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # responses_server, scripted
sys.path.insert(0, str(ROOT / "src"))

from responses_server import ResponsesServer, text  # noqa: E402

from dsrs.codex_sdk import TAG_ENV, CodexSdkLM, render_prompt, tagged  # noqa: E402

CODEX_BIN = os.environ.get("DSRS_TEST_CODEX_BIN") or os.path.expanduser(
    "~/.cache/dsrs-test/codex-0.169.0/node_modules/.bin/codex"
)
MODEL = "gpt-5.5"  # a slug of the CLI's bundled catalog
PROMPT = "What is the capital of France?"
REPLY = "Paris."
CALL_TIMEOUT = 60.0


def bare(argv: list[str], env: dict[str, str], prompt: str, out_dir: str) -> float:
    """One bare `codex exec` turn; seconds from spawn to exit. Output goes to files (read after
    the clock stops), so the time is the process's own and no pipe reader is involved. The wait
    is a blocking waitpid (`Popen.wait(timeout)` polls with sleeps of up to 50 ms, which would
    inflate the bare figure); a timer kills the group if the call outlives CALL_TIMEOUT."""
    token = uuid.uuid4().hex
    env = {**env, TAG_ENV: token}  # what dsrs sets too (one more variable, same size)
    out_path, err_path = os.path.join(out_dir, "out.jsonl"), os.path.join(out_dir, "err.txt")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env, start_new_session=True)
        watchdog = threading.Timer(CALL_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        try:
            assert proc.stdin is not None
            proc.stdin.write(prompt.encode())
            proc.stdin.close()
            proc.wait()
            dt = time.perf_counter() - t0
        finally:
            watchdog.cancel()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group, and anything the CLI left behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pid in tagged(token):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
    events = [json.loads(line) for line in Path(out_path).read_text().splitlines() if line.startswith("{")]
    texts = [e["item"].get("text") for e in events if e.get("type") == "item.completed"]
    if proc.returncode != 0 or not any(e.get("type") == "turn.completed" for e in events) or REPLY not in texts:
        raise SystemExit(f"bare codex exec failed (exit {proc.returncode}): {Path(err_path).read_text()[-2000:]}")
    return dt


async def dsrs_call(lm: CodexSdkLM) -> float:
    t0 = time.perf_counter()
    c = await lm.acall(PROMPT)
    dt = time.perf_counter() - t0
    if c.text != REPLY:
        raise SystemExit(f"dsrs call answered {c.text!r}")
    return dt


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def main_async(args: argparse.Namespace) -> int:
    if not os.access(CODEX_BIN, os.X_OK):
        raise SystemExit(f"Codex CLI missing at {CODEX_BIN}: set DSRS_TEST_CODEX_BIN or run scripts/test")
    tmp = tempfile.mkdtemp(prefix="dsrs-bench-codex-")
    home, codex_home, ws, out_dir = (os.path.join(tmp, d) for d in ("home", "codex-home", "ws", "out"))
    for d in (home, codex_home, ws, out_dir):
        os.mkdir(d)
    server = ResponsesServer()
    try:
        lm = (
            CodexSdkLM()
            .with_binary(CODEX_BIN)
            .with_model(MODEL)
            .with_codex_home(codex_home)
            .with_working_dir(ws)
            .with_env({"HOME": home})
            .with_base_url(server.base_url)
            .with_api_key("bench-key")
            .with_timeout(CALL_TIMEOUT)
        )
        # The bare side's command line and environment, from the same code dsrs runs per call.
        backend = lm._make_backend()
        req = lm.request(PROMPT)
        instructions, prompt = render_prompt(req)
        argv, env = backend.argv(req, instructions, None), backend.env()
        server.turns(*(text(REPLY) for _ in range(2 * (args.runs + 1))))
        load0 = os.getloadavg()
        print(f"codex {subprocess.run([CODEX_BIN, '--version'], capture_output=True, text=True, timeout=30).stdout.strip()}"
              f" at {CODEX_BIN}")  # fmt: skip
        print("argv:", " ".join(a if a == argv[0] or " " not in a else repr(a) for a in argv))
        deadline = time.monotonic() + args.max_seconds
        bare_s: list[float] = []
        dsrs_s: list[float] = []
        for i in range(args.runs + 1):  # pair 0 is the unrecorded warm-up
            if time.monotonic() > deadline:
                print(f"stopped after {len(bare_s)} pairs: --max-seconds {args.max_seconds:g} reached")
                break
            if i % 2 == 0:
                b = bare(argv, env, prompt, out_dir)
                d = await dsrs_call(lm)
            else:
                d = await dsrs_call(lm)
                b = bare(argv, env, prompt, out_dir)
            if i:
                bare_s.append(b)
                dsrs_s.append(d)
        load1 = os.getloadavg()
        n_resp = len(server.responses())
        server.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not bare_s:
        return 1
    diffs = [(d - b) for b, d in zip(bare_s, dsrs_s)]
    ms = 1000.0
    print(f"\n{len(bare_s)} pairs (+1 warm-up), {n_resp} POST /v1/responses served, {os.cpu_count()} cores; "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start, "
          f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at end\n")  # fmt: skip
    print(f"{'':28} {'median':>8} {'p10':>8} {'p90':>8}   (ms)")
    for name, xs in (("bare codex exec", bare_s), ("dsrs CodexSdkLM.acall", dsrs_s), ("overhead (dsrs - bare)", diffs)):
        print(f"{name:28} {statistics.median(xs) * ms:8.1f} {pct(xs, 0.1) * ms:8.1f} {pct(xs, 0.9) * ms:8.1f}")
    print(f"\nmedian overhead: {statistics.median(diffs) * ms:.1f} ms per call "
          f"({statistics.median(diffs) / statistics.median(bare_s) * 100:.1f}% of a bare turn); "
          f"difference of medians: {(statistics.median(dsrs_s) - statistics.median(bare_s)) * ms:.1f} ms")  # fmt: skip
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="recorded pairs (bare, dsrs), default 15")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="stop starting pairs after this long")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
