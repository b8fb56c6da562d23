"""Predict: one signature, answered by an LM through an adapter, with usage summed over every call.

    qa = Predict("question -> answer")
    result = qa(question="What is the capital of France?")
    result.answer, result.lm_usage.total_tokens, result.lm_usage.cost_msats

The LM is the per-call `lm=`, else the one given to Predict, else `dsrs.configure(...)`'s. The
adapter is Predict's, else the configured one, else the completion adapter for base models and
the chat adapter for the rest. A parse failure is retried once with the JSON adapter; then an
`AdapterParseError` carries the raw text. Every call is recorded in the usage ledger.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from .. import _sync, ledger
from ..errors import ConfigurationError, ResponseFormatError
from ..settings import current
from ..types import Completion
from .adapters import Adapter, AdapterParseError, JSONAdapter, options, resolve
from .prediction import Prediction
from .signature import Signature, SignatureError

_RESERVED = ("lm", "lane")


def with_lane(lm: Any, lane: str) -> Any:
    """The LM pinned to one lane; only a LaneMux (anything with `with_lane`) has lanes."""
    pin = getattr(lm, "with_lane", None)
    if pin is None:
        raise ConfigurationError(
            f"lane {lane!r} was asked for, but the LM {lm!r:.80} has no lanes",
            hint="configure a LaneMux (dsrs.configure(LaneMux().add_lane(...))) or pass lm= a LaneMux",
        )
    return pin(lane)


def route_lane(c: Completion) -> str | None:
    """The lane that answered, from a LaneMux's route decision (an object or a dict)."""
    r = c.route
    if r is None:
        return None
    lane = r.get("lane") if isinstance(r, dict) else getattr(r, "lane", None)
    return lane if isinstance(lane, str) else None


class Predict:
    def __init__(self, signature: Signature | type[Signature] | str, *, demos: Iterable[Mapping[str, Any]] = (),
                 lm: Any = None, adapter: Any = None, instructions: str | None = None) -> None:  # fmt: skip
        sig = Signature.coerce(signature)
        if instructions is not None:
            sig = sig.with_instructions(instructions)
        for f in sig.inputs:
            if f.name in _RESERVED:
                raise SignatureError(f"input field {f.name!r} is reserved by Predict", hint="rename the field")
        self.signature = sig
        self.demos = [self._demo(d) for d in demos]
        self.lm = lm
        self.adapter = adapter

    def _demo(self, d: Mapping[str, Any]) -> dict[str, Any]:
        d = _as_dict(d)
        missing = [f.name for f in self.signature.fields if f.name not in d]
        if missing:
            raise SignatureError(f"a demo lacks {missing} (demos need every field of {self.signature})")
        return d

    def __repr__(self) -> str:
        return f"Predict({self.signature!r}, demos={len(self.demos)})"

    # -- one call ---------------------------------------------------------------------------
    def _inputs(self, inputs: Mapping[str, Any] | None, kw: dict[str, Any]) -> dict[str, Any]:
        values = {**_as_dict(inputs or {}), **kw}
        missing = [f.name for f in self.signature.inputs if f.name not in values]
        if missing:
            raise SignatureError(
                f"missing input {', '.join(repr(m) for m in missing)} for {self.signature}",
                hint="inputs: " + ", ".join(f.name for f in self.signature.inputs),
            )
        return {f.name: values[f.name] for f in self.signature.inputs}

    def _lm(self, lm: Any, lane: str | None) -> Any:
        lm = lm if lm is not None else self.lm if self.lm is not None else current().lm
        if lm is None:
            raise ConfigurationError(
                "no LM configured", hint="dsrs.configure(dsrs.LM('embedded/gemma-3-270m')), or pass lm= to Predict"
            )
        return with_lane(lm, lane) if lane is not None else lm

    def _adapter(self, lm: Any) -> Adapter:
        return resolve(self.adapter if self.adapter is not None else current().adapter, lm)

    async def _settle(self, adapter: Adapter, lm: Any, values: dict[str, Any], lane: str | None,
                      c: Completion) -> Prediction:  # fmt: skip
        """Parse the answer; on a parse failure retry once with the JSON adapter, then raise the typed error."""
        attempts = [(getattr(adapter, "name", type(adapter).__name__), c.text)]
        usage = c.usage
        out = _parse(adapter, self.signature, c)
        if isinstance(out, AdapterParseError) and not isinstance(adapter, JSONAdapter):
            first = out
            c = await self._call(JSONAdapter(), lm, values, lane)
            usage = usage + c.usage
            attempts.append(("json", c.text))
            out = _parse(JSONAdapter(), self.signature, c)
            if isinstance(out, AdapterParseError):
                out = AdapterParseError(f"{first.message}; retried with the JSON adapter: {out.message}",
                                        raw=attempts[0][1], field=out.field, adapter="json")  # fmt: skip
        if isinstance(out, AdapterParseError):
            out.lm_usage, out.attempts = usage, attempts
            out.message += f" (the model wrote {attempts[0][1].strip()[:80]!r})"
            out.provider, out.model = c.provider or None, c.model or None
            raise out
        return Prediction(out, lm_usage=usage, completion=c, inputs=values, lane=lane or route_lane(c))

    async def _call(self, adapter: Adapter, lm: Any, values: dict[str, Any], lane: str | None) -> Completion:
        """One LM call with this adapter's prompt, recorded in the ledger."""
        started = time.perf_counter()
        prompt = adapter.format(self.signature, values, self.demos)
        c: Completion = await lm.acall(prompt, **options(adapter, self.signature, lm))
        self._record(c, lane, started)
        return c

    def _record(self, c: Completion, lane: str | None, started: float) -> None:
        elapsed = time.perf_counter() - started
        ledger.record(c, lane=lane or route_lane(c), program=str(self.signature), latency_s=elapsed)

    async def aforward(self, inputs: Mapping[str, Any] | None = None, /, *, lm: Any = None, lane: str | None = None,
                       **kw: Any) -> Prediction:  # fmt: skip
        values = self._inputs(inputs, kw)
        model = self._lm(lm, lane)
        adapter = self._adapter(model)
        c = await self._call(adapter, model, values, lane)
        return await self._settle(adapter, model, values, lane, c)

    async def astream(self, inputs: Mapping[str, Any] | None = None, /, *, lm: Any = None, lane: str | None = None,
                      **kw: Any) -> AsyncIterator[str | Prediction]:  # fmt: skip
        """The model's raw text as it arrives, then the Prediction."""
        values = self._inputs(inputs, kw)
        model = self._lm(lm, lane)
        adapter = self._adapter(model)
        started = time.perf_counter()
        c = None
        async for item in model.astream(adapter.format(self.signature, values, self.demos),
                                        **options(adapter, self.signature, model)):  # fmt: skip
            if isinstance(item, str):
                yield item
            else:
                c = item.completion
        if c is None:
            raise ResponseFormatError("the stream ended without its final completion",
                                      provider=getattr(model, "provider", None))  # fmt: skip
        self._record(c, lane, started)
        yield await self._settle(adapter, model, values, lane, c)

    def forward(self, inputs: Mapping[str, Any] | None = None, /, **kw: Any) -> Prediction:
        return _sync.run(self.aforward(inputs, **kw))

    __call__ = forward

    def forward_with_lane(self, inputs: Mapping[str, Any], lane: str, **kw: Any) -> Prediction:
        """Answer on one named lane of the configured LaneMux."""
        return _sync.run(self.aforward(inputs, lane=lane, **kw))

    async def aforward_with_lane(self, inputs: Mapping[str, Any], lane: str, **kw: Any) -> Prediction:
        return await self.aforward(inputs, lane=lane, **kw)

    # -- many calls -------------------------------------------------------------------------
    async def abatch(self, items: Sequence[Mapping[str, Any]], concurrency: int = 8, *, progress: bool | None = None,
                     lm: Any = None, lane: str | None = None,
                     on_result: Callable[[int, Prediction], None] | None = None) -> list[Prediction]:  # fmt: skip
        """Answer every item, `concurrency` at a time, in input order. A failed item is a
        Prediction with `ok=False` and its `error`; the others are unaffected. `on_result(i, p)`
        sees each result as it lands (e.g. to save it)."""
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        items = list(items)
        results: list[Prediction | None] = [None] * len(items)
        queue = iter(enumerate(items))
        bar = _bar(len(items), progress, str(self.signature))

        async def worker() -> None:
            for i, x in queue:
                try:
                    r = await self.aforward(x, lm=lm, lane=lane)
                except Exception as e:
                    r = Prediction.failed(e, inputs=_as_dict(x) if isinstance(x, Mapping) else None)
                results[i] = r
                bar.advance(r.ok)
                if on_result is not None:
                    on_result(i, r)

        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)) or 1)))
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def batch(self, items: Sequence[Mapping[str, Any]], concurrency: int = 8, **kw: Any) -> list[Prediction]:
        return _sync.run(self.abatch(items, concurrency, **kw))


def _as_dict(x: Any) -> dict[str, Any]:
    if isinstance(x, Mapping):
        return dict(x)
    if isinstance(x, Prediction):
        return {**x.inputs, **x.to_dict()}
    raise SignatureError(f"inputs must be a mapping of field names to values, got {type(x).__name__}")


def _parse(adapter: Adapter, sig: Signature, c: Completion) -> dict[str, Any] | AdapterParseError:
    try:
        return adapter.parse(sig, c.text)
    except AdapterParseError as e:
        return e
    except ValueError as e:  # a user adapter's own parse error
        return AdapterParseError(str(e), raw=c.text, adapter=getattr(adapter, "name", type(adapter).__name__))


class _Bar:
    """A progress bar on stderr (rich when installed, else a plain counter line)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.done, self.failed = total, 0, 0
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            from rich.console import Console

            self.rich: Any = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[failed]} failed"), TimeRemainingColumn(),
                                      console=Console(stderr=True))  # fmt: skip
            self.task = self.rich.add_task(label[:40], total=total, failed=0)
            self.rich.start()
        except ImportError:
            self.rich = None

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if self.rich is not None:
            self.rich.update(self.task, advance=1, failed=self.failed)
        else:
            print(f"\r{self.done}/{self.total} done, {self.failed} failed", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()
        else:
            print(file=sys.stderr)


class _NoBar:
    def advance(self, ok: bool) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, progress: bool | None, label: str) -> _Bar | _NoBar:
    if progress is None:
        progress = sys.stderr.isatty()
    return _Bar(total, label) if progress and total else _NoBar()
