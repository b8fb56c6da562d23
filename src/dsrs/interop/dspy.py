"""dspy programs on dsrs: `dspy.configure(lm=dsrs.interop.dspy.lm(mux))` (`pip install 'dsrs[dspy]'`, dspy 3.4).

`lm(x)` wraps any dsrs LM (`LM`, `LaneMux`, `CodexSdkLM`, `PylonLM`) as a dspy 3.4 custom engine
(`dspy.LM(model, engine=..., async_engine=...)`, protocol in `dspy/clients/engines/base.py`): dspy's
canonical `dspy.lm15.Request` becomes one dsrs call, and the dsrs `Completion` becomes a
`dspy.lm15.Response`. What goes where:

- messages, system prompt (and `developer` turns) become dsrs messages; images, tool calls and tool
  results are carried; `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, tools, tool choice and
  response format become dsrs options; `top_k`, the penalties and `Config.extensions` go to
  `extra` (passed to the provider). What dsrs cannot send (hosted tools, a reasoning dial, logprobs,
  a provider prompt cache) is refused with `dspy.lm15.UnsupportedFeatureError`, never dropped.
- tokens reach dspy's usage tracker and history through `Response.usage`. The cost, in integer
  msats, is added to the usage tracker as `cost_msats` (so `Prediction.get_lm_usage()` shows it) and,
  for the LM `lm()` returns, written into each history entry as `cost` (USD, dspy's convention) with
  `cost_details = {"kind": "dsrs", "currency": "USD", "cost_msats": ..., "cost_source": ...}`, and
  the LaneMux route as `route` (also in `Response.provider_data["dsrs"]`).
- every call is recorded in the dsrs usage ledger with its lane (`program="dspy"` unless given).
- dsrs errors become the lm15 errors dspy expects: a quota error, a budget refusal or an unpaid
  Lightning invoice is a `BillingError` (dspy never retries it), a rate limit a `RateLimitError` (with
  `retry_after`), 5xx a `ServerError`, a timeout a `TimeoutError`, a connection failure a
  `TransportError`, a bad request `InvalidRequestError` / `ContextLengthError`; the dsrs error is the
  `__cause__`.
- dsrs already retries (the official SDKs' rule) and a LaneMux falls back, so `lm()` sets dspy's own
  `num_retries=0` and `cache=False` (use `with_cache(True)` on the dsrs LM: its cache costs 0 and is
  booked); pass either to `lm()` to change them. Budgets apply as for any dsrs call.

dspy is imported when `lm()` (or an engine) is first used, never by `import dsrs`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    ConfigurationError,
    ConflictError,
    ContextWindowExceededError,
    DsrsError,
    MissingApiKeyError,
    NotFoundError,
    PermissionDeniedError,
    ProviderUnavailableError,
    QuotaExceededError,
    RateLimitError,
    TimeoutError,
    UnsupportedFeatureError,
)
from ..types import Completion, Message, Role, StreamEnd, Tool, ToolCall

__all__ = ["DsrsEngine", "AsyncDsrsEngine", "lm", "to_dsrs", "to_response", "to_lm15_error"]

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_call", "content_filter": "content_filter",
           "error": "error"}  # fmt: skip  (dsrs "unknown" -> "stop": lm15 has no unknown reason)
_SUPPORTED_PARAMS = frozenset({"temperature", "max_tokens", "top_p", "stop", "seed", "response_format", "tools",
                               "tool_choice", "top_k", "frequency_penalty", "presence_penalty"})  # fmt: skip


def _lm15() -> Any:
    from dspy import lm15  # type: ignore[import-untyped]

    return lm15


# -- request: dspy.lm15.Request -> (dsrs messages, dsrs options) -----------------------------------------
def _refuse(what: str, feature: str) -> Any:
    return _lm15().UnsupportedFeatureError(f"dsrs cannot send {what}", feature=feature, provider="dsrs")


def _text_of(parts: Any, where: str) -> str:
    """Text of prompt parts (system, tool results): text parts joined, JSON data parts as JSON."""
    lm15 = _lm15()
    out = []
    for p in (parts,) if isinstance(parts, str) else parts:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, lm15.TextPart):
            out.append(p.text)
        elif isinstance(p, lm15.DataPart):
            out.append(json.dumps(p.value, ensure_ascii=False))
        else:
            raise _refuse(f"a {getattr(p, 'type', type(p).__name__)} part in {where}", where)
    return "".join(out)


def _image(p: Any, where: str) -> dict[str, Any]:
    detail = {"detail": p.detail} if getattr(p, "detail", None) else {}
    if p.url:
        return {"type": "image", "url": p.url, **detail}
    if p.data:
        return {"type": "image", "data": p.data, "media_type": p.media_type, **detail}
    raise _refuse("an image by file id or local path (give a URL or base64 data)", where)


def _messages(request: Any) -> list[Message]:
    lm15 = _lm15()
    out: list[Message] = []
    if request.system is not None:
        out.append(Message.system(_text_of(request.system, "system")))
    for i, m in enumerate(request.messages):
        where = f"messages[{i}]"
        if m.role == "tool":
            for p in m.parts:
                out.append(Message("tool", _text_of(p.content, where), tool_call_id=p.id, name=p.name))
            continue
        texts: list[str] = []
        parts: list[dict[str, Any]] = []
        calls: list[ToolCall] = []
        for p in m.parts:
            if isinstance(p, lm15.TextPart):
                texts.append(p.text)
                parts.append({"type": "text", "text": p.text})
            elif isinstance(p, lm15.DataPart):
                t = json.dumps(p.value, ensure_ascii=False)
                texts.append(t)
                parts.append({"type": "text", "text": t})
            elif isinstance(p, lm15.ImagePart) and m.role in ("user", "developer"):
                parts.append(_image(p, where))
            elif isinstance(p, lm15.ToolCallPart) and m.role == "assistant":
                calls.append(ToolCall(p.id, p.name, dict(p.input)))
            elif isinstance(p, (lm15.ThinkingPart, lm15.RefusalPart, lm15.CitationPart)) and m.role == "assistant":
                continue  # the model's own annotations of an earlier turn: not sent back (as dspy's LiteLLM path)
            else:
                raise _refuse(f"a {p.type} part in a {m.role} message", where)
        role: Role = "system" if m.role == "developer" else m.role
        text = "".join(texts)
        has_image = any(p["type"] == "image" for p in parts)
        if has_image and role != "user":
            raise _refuse("an image in a developer message", where)
        out.append(Message(role, text, tuple(calls), parts=tuple(parts) if has_image else ()))
    return out


def _response_format(rf: dict[str, Any]) -> dict[str, Any]:
    if rf.get("type") == "json_schema" and "json_schema" not in rf:  # lm15's flat spelling -> OpenAI's
        inner = {k: rf[k] for k in ("name", "schema", "strict", "description") if k in rf}
        inner.setdefault("name", "output")
        return {"type": "json_schema", "json_schema": inner}
    return dict(rf)


def _options(request: Any) -> dict[str, Any]:
    c = request.config
    for name, what in (("reasoning", "a reasoning dial"), ("logprobs", "a logprobs request"),
                       ("cache", "a provider prompt-cache setting"), ("probabilities", "a probabilities request"),
                       ("service_tier", "a service tier"), ("store", "a store flag")):  # fmt: skip
        if getattr(c, name, None) is not None:
            raise _refuse(what + " (set it on the dsrs LM with extra=...)", f"config.{name}")
    opts: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        v = getattr(c, name)
        if v is not None:
            opts[name] = v
    if c.stop:
        opts["stop"] = tuple(c.stop)
    if c.response_format is not None:
        opts["response_format"] = _response_format(c.response_format)
    extra: dict[str, Any] = dict(c.extensions or {})
    for name in ("top_k", "frequency_penalty", "presence_penalty"):
        v = getattr(c, name)
        if v is not None:
            extra[name] = v
    if c.user_id is not None:
        extra["user"] = c.user_id
    if request.tools:
        lm15 = _lm15()
        tools = []
        for i, t in enumerate(request.tools):
            if not isinstance(t, lm15.FunctionTool):
                raise _refuse(f"the hosted tool {t.name!r}", f"tools[{i}]")
            tools.append(Tool(t.name, t.description or "", dict(t.parameters)))
        opts["tools"] = tuple(tools)
    tc = c.tool_choice
    if tc is not None:
        if len(tc.allowed) > 1:
            raise _refuse("a tool choice limited to several tools", "config.tool_choice.allowed")
        opts["tool_choice"] = {"name": tc.allowed[0]} if tc.allowed and tc.mode != "none" else tc.mode
        if tc.parallel is not None:
            extra["parallel_tool_calls"] = tc.parallel
    if extra:
        opts["extra"] = extra
    return opts


def to_dsrs(request: Any) -> tuple[list[Message], dict[str, Any]]:
    """A `dspy.lm15.Request` as the dsrs call it becomes: (messages, per-call options)."""
    return _messages(request), _options(request)


# -- response: dsrs Completion -> dspy.lm15.Response -------------------------------------------------------
def _plain(x: Any) -> Any:
    """JSON-safe data (route decisions hold dataclasses and nested decisions)."""
    return json.loads(json.dumps(x, default=lambda o: o.to_json() if hasattr(o, "to_json") else str(o)))


def _route_json(c: Completion) -> Any:
    r = c.route
    if r is None:
        return None
    return _plain(r.to_json() if hasattr(r, "to_json") else r)


def _lane(c: Completion) -> str | None:
    r = c.route
    lane = r.get("lane") if isinstance(r, dict) else getattr(r, "lane", None)
    return lane if isinstance(lane, str) else None


def _dsrs_data(c: Completion) -> dict[str, Any]:
    u = c.usage
    usd = u.cost_usd
    d: dict[str, Any] = {
        "provider": c.provider or None, "model": c.model or None, "cost_msats": u.cost_msats,
        "cost_usd": float(usd) if usd is not None else None,
        "cost_source": getattr(u.cost_source, "value", u.cost_source), "cache_hit": u.cache_hit,
        "estimated": u.estimated, "finish_reason": c.finish_reason, "lane": _lane(c), "route": _route_json(c),
    }  # fmt: skip
    raw_args = {t.id: t.raw_arguments for t in c.tool_calls if t.raw_arguments is not None}
    if raw_args:
        d["unparsed_tool_arguments"] = raw_args
    return d


def _usage(c: Completion) -> Any:
    u = c.usage
    return _lm15().Usage(
        input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens,
        cache_read_tokens=u.cached_tokens or None, cache_write_tokens=u.cache_write_tokens or None,
        reasoning_tokens=u.reasoning_tokens or None,
    )  # fmt: skip


def _call_parts(c: Completion) -> list[Any]:
    lm15 = _lm15()
    return [lm15.ToolCallPart(t.id or f"call_{i}", t.name, dict(t.arguments)) for i, t in enumerate(c.tool_calls)]


def to_response(c: Completion, model: str) -> Any:
    """A dsrs `Completion` as a `dspy.lm15.Response` (`provider_data["dsrs"]`: cost, cost source, lane, route)."""
    lm15 = _lm15()
    parts = ([lm15.TextPart(c.text)] if c.text or not c.tool_calls else []) + _call_parts(c)
    return lm15.Response(
        id=c.id or None, model=c.model or model, message=lm15.Message.assistant(parts),
        finish_reason=_FINISH.get(c.finish_reason, "stop"), usage=_usage(c), provider_data={"dsrs": _dsrs_data(c)},
    )  # fmt: skip


# -- errors ------------------------------------------------------------------------------------------------
def to_lm15_error(e: DsrsError) -> Any:
    """The `dspy.lm15` error dspy expects for a dsrs error (raise it `from e`)."""
    lm15 = _lm15()
    from ..pylon.errors import PaymentError, PaymentRequiredError

    kw: dict[str, Any] = {"provider": e.provider or "dsrs", "status": e.status, "provider_code": e.code}
    msg = str(e)
    if isinstance(e, BudgetExceededError):
        kw["provider_code"] = e.code or "budget_exceeded"
        return lm15.BillingError(msg, **kw)
    if isinstance(e, (QuotaExceededError, PaymentRequiredError)) or (
            isinstance(e, PaymentError) and not getattr(e, "spent_unknown", False)):  # fmt: skip
        return lm15.BillingError(msg, **kw)
    if isinstance(e, RateLimitError):
        return lm15.RateLimitError(msg, retry_after=e.retry_after, **kw)
    if isinstance(e, ContextWindowExceededError):
        return lm15.ContextLengthError(msg, **kw)
    if isinstance(e, BadRequestError):
        return lm15.InvalidRequestError(msg, **kw)
    if isinstance(e, NotFoundError):
        return lm15.UnsupportedModelError(msg, **kw)
    if isinstance(e, (AuthenticationError, PermissionDeniedError)):
        return lm15.AuthError(msg, **kw)
    if isinstance(e, TimeoutError):
        return lm15.TimeoutError(msg, **kw)
    if isinstance(e, APIConnectionError):
        return lm15.TransportError(msg, **kw)
    if isinstance(e, (ProviderUnavailableError, ConflictError)):
        return lm15.ServerError(msg, **kw)
    if isinstance(e, MissingApiKeyError):
        return lm15.NotConfiguredError(msg, provider=kw["provider"])
    if isinstance(e, UnsupportedFeatureError):
        return lm15.UnsupportedFeatureError(msg, **kw)
    if isinstance(e, ConfigurationError):
        return lm15.ConfigurationError(msg, **kw)
    return lm15.ProviderError(msg, **kw)  # malformed answers (billed), safety refusals, swarm job failures


# -- the engines -------------------------------------------------------------------------------------------
class _Base:
    supports_function_calling = True
    supports_response_schema = True
    supports_reasoning = False
    supported_params = _SUPPORTED_PARAMS

    def __init__(self, dsrs_lm: Any, *, program: str | None = "dspy", ledger: bool = True) -> None:
        if not callable(getattr(dsrs_lm, "acall", None)) or not callable(getattr(dsrs_lm, "astream", None)):
            raise ConfigurationError(f"not a dsrs LM: {dsrs_lm!r:.80}",
                                     hint="pass a dsrs LM, LaneMux, CodexSdkLM or PylonLM")  # fmt: skip
        self.lm = dsrs_lm
        self.program = program
        self.ledger = ledger

    def _prepare(self, request: Any) -> tuple[list[Message], dict[str, Any]]:
        from dspy.clients.engines.base import validate_request  # type: ignore[import-untyped]

        validate_request(request)
        return to_dsrs(request)

    def _done(self, c: Completion, request: Any, started: float) -> Any:
        if self.ledger:
            from .. import ledger

            ledger.record(c, lane=_lane(c), program=self.program, latency_s=time.perf_counter() - started)
        _track_cost(request.model, c)
        return to_response(c, request.model)

    def _end_events(self, c: Completion, request: Any, started: float, first_index: int) -> Iterator[Any]:
        lm15 = _lm15()
        response = self._done(c, request, started)
        for i, p in enumerate(_call_parts(c)):
            yield lm15.StreamDeltaEvent(lm15.ToolCallDelta(json.dumps(p.input), first_index + i, p.id, p.name))
        yield lm15.StreamEndEvent(response.finish_reason, response.usage, response.provider_data)


def _track_cost(model: str, c: Completion) -> None:
    """The call's msats into dspy's usage tracker (beside the tokens dspy records from `Response.usage`)."""
    from dspy.dsp.utils.settings import settings  # type: ignore[import-untyped]

    tracker = settings.usage_tracker
    if tracker is not None and c.usage.cost_msats is not None:
        tracker.add_usage(model, {"cost_msats": c.usage.cost_msats})


def _mapped(e: DsrsError) -> Any:
    err = to_lm15_error(e)
    err.__cause__ = e
    return err


class DsrsEngine(_Base):
    """dspy's sync engine protocol (`complete`, `stream`, `close`) over a dsrs LM."""

    def complete(self, request: Any) -> Any:
        messages, opts = self._prepare(request)
        started = time.perf_counter()
        try:
            c = self.lm(messages, **opts)
        except DsrsError as e:
            raise _mapped(e) from e
        return self._done(c, request, started)

    def stream(self, request: Any) -> Iterator[Any]:
        lm15 = _lm15()
        messages, opts = self._prepare(request)
        started = time.perf_counter()
        it = self.lm.stream(messages, **opts)
        try:
            yield lm15.StreamStartEvent(model=request.model)
            for item in it:
                if isinstance(item, StreamEnd):
                    yield from self._end_events(item.completion, request, started, 1)
                elif item:
                    yield lm15.StreamDeltaEvent(lm15.TextDelta(item, 0))
        except DsrsError as e:
            raise _mapped(e) from e
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        pass  # the dsrs LM is borrowed: its connections are pooled per event loop and outlive this engine


class AsyncDsrsEngine(_Base):
    """dspy's async engine protocol (`async complete`, `stream`, `aclose`) over a dsrs LM."""

    async def complete(self, request: Any) -> Any:
        messages, opts = self._prepare(request)
        started = time.perf_counter()
        try:
            c = await self.lm.acall(messages, **opts)
        except DsrsError as e:
            raise _mapped(e) from e
        return self._done(c, request, started)

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        lm15 = _lm15()
        messages, opts = self._prepare(request)
        started = time.perf_counter()
        agen = self.lm.astream(messages, **opts)
        try:
            yield lm15.StreamStartEvent(model=request.model)
            async for item in agen:
                if isinstance(item, StreamEnd):
                    for ev in self._end_events(item.completion, request, started, 1):
                        yield ev
                elif item:
                    yield lm15.StreamDeltaEvent(lm15.TextDelta(item, 0))
        except DsrsError as e:
            raise _mapped(e) from e
        finally:
            await agen.aclose()

    async def aclose(self) -> None:
        pass


# -- the dspy.LM ------------------------------------------------------------------------------------------
_LM_CLASS: Any = None


def _lm_class() -> Any:
    """`DspyLM`: a `dspy.LM` whose history entries carry the dsrs cost (USD and msats) and route.
    Built on first use so that importing this module does not import dspy."""
    global _LM_CLASS
    if _LM_CLASS is None:
        import dspy

        class DspyLM(dspy.LM):  # type: ignore[misc]
            """A `dspy.LM` over a dsrs LM (see `dsrs.interop.dspy`)."""

            def _get_initial_kwargs(self, *, temperature: Any, max_tokens: Any, **kwargs: Any) -> dict[str, Any]:
                # dsrs sends each model's own token parameter; dspy's rule for OpenAI reasoning models (chosen
                # by the model name: temperature 1.0, max_tokens >= 16000) is for its own engines, not this one
                kw = dict(temperature=temperature, max_tokens=max_tokens, **kwargs)
                if kw.get("rollout_id") is None:
                    kw.pop("rollout_id", None)
                return kw

            def update_history(self, entry: dict[str, Any]) -> None:
                responses = entry.get("response")
                data = getattr(responses, "provider_data", None) or {}
                d = data.get("dsrs") if isinstance(data, dict) else None
                if isinstance(d, dict):
                    entry["cost"] = d.get("cost_usd")
                    entry["cost_details"] = (
                        {"kind": "dsrs", "currency": "USD", "cost_msats": d["cost_msats"],
                         "cost_source": d.get("cost_source")}
                        if d.get("cost_msats") is not None else
                        {"kind": "unknown", "reason": "dsrs has no price for this model", "cost_source": None}
                    )  # fmt: skip
                    entry["route"] = d.get("route")
                    entry["lane"] = d.get("lane")
                super().update_history(entry)

        DspyLM.__module__ = __name__
        DspyLM.__qualname__ = "DspyLM"
        _LM_CLASS = DspyLM
    return _LM_CLASS


def __getattr__(name: str) -> Any:
    if name == "DspyLM":
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _model_name(x: Any) -> str:
    provider, model = getattr(x, "provider", "") or "", getattr(x, "model", "") or ""
    name = "/".join(s for s in (provider, model) if s) or type(x).__name__.lower()
    return "dsrs/" + name


def lm(dsrs_lm: Any, *, model: str | None = None, program: str | None = "dspy", ledger: bool = True,
       num_retries: int = 0, cache: bool = False, **kwargs: Any) -> Any:  # fmt: skip
    """A `dspy.LM` that runs on `dsrs_lm` (an LM, LaneMux, CodexSdkLM or PylonLM).

    `model`: the name dspy shows (history, usage tracker); default `dsrs/<provider>/<model>`.
    `program`: the ledger's program column; `ledger=False` records nothing. `num_retries` and
    `cache` are dspy's own (off: dsrs retries, falls back and caches). Other keywords
    (`temperature`, `max_tokens`, `callbacks`...) go to `dspy.LM`."""
    cls = _lm_class()
    return cls(model or _model_name(dsrs_lm), engine=DsrsEngine(dsrs_lm, program=program, ledger=ledger),
               async_engine=AsyncDsrsEngine(dsrs_lm, program=program, ledger=ledger), num_retries=num_retries,
               cache=cache, **kwargs)  # fmt: skip
