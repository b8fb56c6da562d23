"""`dsrs run`: answer every row of a JSONL file with a signature, resumable by row content."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .ask import DEFAULT_MODEL
from .show import _msats

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

    from ..errors import ConfigurationError

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

    from ..errors import ConfigurationError

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

    from ..errors import ConfigurationError

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

        from ..errors import ConfigurationError

        mod, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ConfigurationError(f"cannot load the signature {spec!r}: {e}") from None
    return spec


def _check_inputs(sig: Any, rows: list[dict[str, Any]], path: str) -> None:
    """Every row has every input field of the signature, or nothing is sent."""
    from ..errors import ConfigurationError

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
    from ..lm import LM

    if args.lane:
        from ..lanes import LaneMux

        lm: Any = await LaneMux.auto_detect()
        lm.with_lane(args.lane)  # an unknown lane raises here
    else:
        lm = LM(args.model or DEFAULT_MODEL)
        getattr(lm, "backend", None)  # builds the client: a missing key or base URL raises here
        if lm.provider == "embedded":  # the model file and the engine, which the first call would load
            import asyncio
            import importlib.util

            from ..errors import ConfigurationError
            from ..providers import embedded

            await asyncio.to_thread(embedded.model_path, lm.model)
            if importlib.util.find_spec("xllamacpp") is None:
                raise ConfigurationError("the embedded engine is not installed", provider="embedded",
                                         hint="pip install 'dsrs[local]'")  # fmt: skip
    if args.max_tokens:
        lm = lm.with_max_tokens(args.max_tokens)
    return lm


async def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import signal

    from ..errors import ConfigurationError
    from ..predict import Predict, values
    from ..types import LmUsage

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
