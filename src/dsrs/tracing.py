"""OpenTelemetry spans for LM calls, LaneMux routing and the gateway (the GenAI semantic conventions).

On only when `opentelemetry-api` is importable and a tracer provider is configured (the global one,
set by `trace.set_tracer_provider(...)` or `opentelemetry-instrument`, or one given to
`configure(tracer_provider=...)`). Otherwise nothing here imports OpenTelemetry, and the call path
reads one module flag, `ON`. dsrs looks for the provider once, at its first call: configure the
provider before that, or call `dsrs.tracing.configure()` after.

Spans:
- `chat {model}` (CLIENT), one per LM call, stream or not (a stream's span ends when the stream ends
  or is abandoned): `gen_ai.operation.name`, `gen_ai.provider.name` (which replaced `gen_ai.system`),
  `gen_ai.request.*` (model, max_tokens, temperature, top_p, seed, stop_sequences),
  `gen_ai.response.*` (model, id, finish_reasons), `gen_ai.usage.input_tokens`/`output_tokens`,
  `server.address`/`server.port`, `error.type` on failure; and dsrs's own `dsrs.cost_msats`,
  `dsrs.cost_source`, `dsrs.cache_hit` (true on a cache hit), `dsrs.abandoned` (a stream its
  consumer left). Retries are `dsrs.retry` events (delay, error type).
- `dsrs.route` (INTERNAL), one per LaneMux call: the route decision (`dsrs.route.policy`,
  `dsrs.lane` that answered, `dsrs.route.skipped`, retry and fallback counts), with `dsrs.retry`,
  `dsrs.wait` and `dsrs.fallback` events as they happen. Each lane attempt is a child
  `chat {model}` span carrying `dsrs.lane` (token and cost attributes live on these only, so
  sums over spans count each call once).
- `{METHOD} {route}` (SERVER), one per gateway request, continuing the caller's `traceparent`:
  `http.*`, `gen_ai.request.model`, `dsrs.lane`, `dsrs.gateway.key` (the key's name, never the key).

Prompts and answers are not recorded unless asked for (`configure(capture_content=True)` or
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`): then `gen_ai.input.messages` and
`gen_ai.output.messages` hold them as JSON, and error spans carry the error text. Keys and other
secrets never appear (error texts are scrubbed before they get here).
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .types import StreamEnd

T = TypeVar("T")

# True until the first call looks (and finds no provider), or while a provider is in use. Read on the
# hot path as `tracing.ON`; set only here.
ON = True
_tracer: Any = None  # the opentelemetry Tracer, when on
_resolved = False
_provider: Any = None  # a provider given to configure(); None: the global one
_enabled = True
_capture: bool | None = None  # None: from the environment
_CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

# dsrs service names -> the semantic conventions' well-known provider names (others are kept as they are)
_PROVIDERS = {"gemini": "gcp.gemini", "mistral": "mistral_ai", "xai": "x_ai", "azure": "azure.ai.openai",
              "codex": "openai", "openai-responses": "openai"}  # fmt: skip


def configure(tracer_provider: Any = None, *, enabled: bool = True, capture_content: bool | None = None) -> bool:
    """Look again for a tracer provider (or use `tracer_provider`), and say whether spans are on.

    `enabled=False` turns dsrs's spans off even when a provider is configured. `capture_content`:
    record prompts and answers (`gen_ai.input.messages`/`gen_ai.output.messages`); None follows
    `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`."""
    global _provider, _enabled, _capture, _resolved
    _provider, _enabled, _capture, _resolved = tracer_provider, enabled, capture_content, False
    return _resolve() is not None


def _resolve() -> Any:
    """The tracer to use, or None (and `ON` off). Imports OpenTelemetry only when a provider is there."""
    global ON, _tracer, _resolved
    provider = _provider
    if provider is None and _enabled:
        mod = sys.modules.get("opentelemetry.trace")  # nobody imported it: nobody configured a provider
        if mod is None and os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"):
            try:
                import opentelemetry.trace as mod
            except ImportError:
                mod = None
        if mod is not None:
            found = mod.get_tracer_provider()
            if not isinstance(found, (mod.ProxyTracerProvider, mod.NoOpTracerProvider)):
                provider = found
    _resolved = True
    if provider is None or not _enabled:
        _tracer, ON = None, False
        return None
    global _CAPTURING, _attach, _detach, _in_context, _CLIENT, _Status, _ERROR
    from opentelemetry import context, trace

    from . import __version__

    _CAPTURING = _capture if _capture is not None else os.environ.get(_CAPTURE_ENV, "").strip().lower() == "true"
    _attach, _detach, _in_context = context.attach, context.detach, trace.set_span_in_context
    _CLIENT, _Status, _ERROR = trace.SpanKind.CLIENT, trace.Status, trace.StatusCode.ERROR
    _tracer = provider.get_tracer("dsrs", __version__, schema_url="https://opentelemetry.io/schemas/1.37.0")
    ON = True
    return _tracer


# OpenTelemetry's functions and constants, bound when spans are turned on
_CAPTURING = False
_attach: Any = None
_detach: Any = None
_in_context: Any = None
_CLIENT: Any = None
_Status: Any = None
_ERROR: Any = None


def _get() -> Any:
    return _tracer if _resolved else _resolve()


def capturing() -> bool:
    """Are prompts and answers recorded on spans (see `configure`)."""
    return _CAPTURING


# -- attributes ---------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _server(url: str) -> tuple[str, int] | None:
    try:
        u = urlsplit(url)
        host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        return None
    return (host, port) if host else None


def _request_attrs(req: Any) -> dict[str, Any]:
    """The request's own attributes (those it sets), added when the span ends: set once, they cost
    the SDK one pass (it checks every attribute, about a microsecond each)."""
    a: dict[str, Any] = {}
    if req.max_tokens is not None:
        a["gen_ai.request.max_tokens"] = req.max_tokens
    if req.temperature is not None:
        a["gen_ai.request.temperature"] = req.temperature
    if req.top_p is not None:
        a["gen_ai.request.top_p"] = req.top_p
    if req.seed is not None:
        a["gen_ai.request.seed"] = req.seed
    if req.stop:
        a["gen_ai.request.stop_sequences"] = req.stop
    if req.response_format is not None:
        a["gen_ai.output.type"] = "json"
    if _CAPTURING:
        a["gen_ai.input.messages"] = json.dumps([_message(m) for m in req.messages], ensure_ascii=False)
    return a


def _message(m: Any) -> dict[str, Any]:
    """A message in the conventions' input-messages shape."""
    parts: list[dict[str, Any]] = []
    if m.parts:
        for p in m.parts:
            parts.append({"type": "text", "content": p["text"]} if p["type"] == "text" else
                         {"type": "uri", "modality": "image", "uri": p["url"]} if "url" in p else
                         {"type": "blob", "modality": "image", "mime_type": p.get("media_type")})  # fmt: skip
    elif m.role == "tool":
        parts.append({"type": "tool_call_response", "id": m.tool_call_id, "response": m.content})
    elif m.content:
        parts.append({"type": "text", "content": m.content})
    for t in m.tool_calls:
        parts.append({"type": "tool_call", "id": t.id, "name": t.name, "arguments": t.arguments})
    return {"role": m.role, "parts": parts}


def _output(c: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "content": c.text}] if c.text else []
    parts += [{"type": "tool_call", "id": t.id, "name": t.name, "arguments": t.arguments} for t in c.tool_calls]
    return {"role": "assistant", "parts": parts, "finish_reason": c.finish_reason}


def _error_attrs(e: BaseException) -> dict[str, Any]:
    a: dict[str, Any] = {"error.type": type(e).__name__}
    code, status = getattr(e, "code", None), getattr(e, "status", None)
    if isinstance(code, str) and code:
        a["dsrs.error.code"] = code
    if isinstance(status, int):
        a["http.response.status_code"] = status
    return a


def _failed(span: Any, e: BaseException) -> None:
    """End `span` for a call that raised `e`; a consumer that left (cancellation, a closed stream)
    is not an error of the call: the span says `dsrs.abandoned`."""
    if isinstance(e, Exception):
        span.set_attributes(_error_attrs(e))
        span.set_status(_Status(_ERROR, str(e)[:500] if _CAPTURING else type(e).__name__))
    else:
        span.set_attribute("dsrs.abandoned", True)
    span.end()


def _ctx(span: Any) -> Any:
    return _attach(_in_context(span))


# -- LM calls (dsrs.lm) -------------------------------------------------------------------------------
class _Call:
    """One `chat {model}` span and what fills it in when it ends: the LM and its request. A LaneMux
    opens one per lane attempt, before it knows the request; the lane's LM then says both."""

    __slots__ = ("span", "lm", "req")

    def __init__(self, span: Any, lm: Any, req: Any) -> None:
        self.span, self.lm, self.req = span, lm, req

    def _attrs(self) -> dict[str, Any]:
        a = _request_attrs(self.req) if self.req is not None else {}
        base = getattr(getattr(self.lm, "_backend_obj", None), "base", None)
        if isinstance(base, str):
            server = _server(base)
            if server is not None:
                a["server.address"], a["server.port"] = server
        return a

    def answered(self, c: Any) -> None:
        span = self.span
        if span.is_recording():  # (a span a sampler dropped costs nothing more)
            u = c.usage
            a = self._attrs()
            a["gen_ai.usage.input_tokens"] = u.prompt_tokens
            a["gen_ai.usage.output_tokens"] = u.completion_tokens
            a["gen_ai.response.finish_reasons"] = (c.finish_reason,)
            if c.model:
                a["gen_ai.response.model"] = c.model
            if c.id:
                a["gen_ai.response.id"] = c.id
            if u.cached_tokens:
                a["gen_ai.usage.cache_read.input_tokens"] = u.cached_tokens
            if u.cost_msats is not None:
                a["dsrs.cost_msats"] = u.cost_msats
            if u.cost_source is not None:
                a["dsrs.cost_source"] = u.cost_source.value
            if u.cache_hit:
                a["dsrs.cache_hit"] = True
            if _CAPTURING:
                a["gen_ai.output.messages"] = json.dumps([_output(c)], ensure_ascii=False)
            span.set_attributes(a)
        span.end()

    def failed(self, e: BaseException) -> None:
        if self.span.is_recording():
            self.span.set_attributes(self._attrs())
        _failed(self.span, e)


# The lane attempt an LM call below may take as its own span (set by the LaneMux around a lane call).
_ATTEMPT: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("dsrs_lane_attempt", default=None)


def _chat_span(t: Any, provider: str, model: str, lane: str | None = None) -> Any:
    """A `chat {model}` span, started with the attributes a sampler may look at."""
    a: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": _PROVIDERS.get(provider, provider) or "dsrs"}
    if model:
        a["gen_ai.request.model"] = model
    if lane is not None:
        a["dsrs.lane"] = lane
    return t.start_span(f"chat {model}" if model else "chat", kind=_CLIENT, attributes=a)


async def complete(lm: Any, req: Any, call: Coroutine[Any, Any, T]) -> T:
    """Run one LM call (`call`, for `req`) in a `chat {model}` span, or in the lane attempt's span
    a LaneMux opened for it (which the LaneMux ends)."""
    t = _get()
    if t is None:
        return await call
    att = _ATTEMPT.get()
    if att is not None:
        att.lm, att.req = lm, req
        held = _ATTEMPT.set(None)  # LMs this call makes in turn open their own spans
        try:
            return await call
        finally:
            _ATTEMPT.reset(held)
    this = _Call(_chat_span(t, lm.provider, req.model or lm.model), lm, req)
    token = _ctx(this.span)
    try:
        c = await call
    except BaseException as e:
        this.failed(e)
        raise
    finally:
        _detach(token)
    this.answered(c)
    return c


async def stream(lm: Any, prompt: Any, overrides: dict[str, Any],
                 inner: Callable[[Any, dict[str, Any], Any], AsyncIterator[Any]]) -> AsyncIterator[Any]:  # fmt: skip
    """`lm.astream(...)` in a `chat {model}` span that ends with the stream, or when it is abandoned
    (or in the LaneMux's lane attempt span). `inner(prompt, overrides, req)`: the LM's own stream."""
    t = _get()
    if t is None:
        agen = inner(prompt, overrides, None)
    else:
        req = lm.request(prompt, **overrides)
        att = _ATTEMPT.get()
        if att is not None:  # the lane attempt's span, current already; the LaneMux ends it
            att.lm, att.req = lm, req
            agen = _follow(att.span, inner(prompt, overrides, req), None, None)
        else:
            this = _Call(_chat_span(t, lm.provider, req.model or lm.model), lm, req)
            agen = _follow(this.span, inner(prompt, overrides, req), this.answered, this.failed)
    try:
        async for item in agen:
            yield item
    finally:  # closed with this generator (`async for` alone would leave it to the garbage collector)
        await _close(agen)


async def _follow(span: Any, agen: Any, answered: Callable[[Any], None] | None, failed: Callable[[BaseException], None] | None,
                  attempt: _Call | None = None) -> AsyncIterator[Any]:  # fmt: skip
    """Pass `agen`'s items on. `span` is the current span during the first step (where retries and
    fallbacks happen), with `attempt` as the lane attempt an LM below may take. The span ends with
    the stream: `answered(completion)` at its `StreamEnd`, else `failed(error)` (a consumer that
    left: `GeneratorExit`). Without callbacks the items just pass."""
    token = _ctx(span)
    held = _ATTEMPT.set(attempt)
    try:
        item = await agen.__anext__()
    except BaseException as e:
        if failed is not None:
            failed(_stopped(e))
        await _close(agen)
        raise
    finally:
        _ATTEMPT.reset(held)
        _detach(token)
    ended = failed is None
    try:
        while True:
            if not ended and isinstance(item, StreamEnd):
                answered(item.completion)  # type: ignore[misc]
                ended = True
            yield item
            item = await agen.__anext__()
    except StopAsyncIteration:
        if not ended:
            failed(_stopped(StopAsyncIteration()))  # type: ignore[misc]
            ended = True
    except BaseException as e:
        if not ended:
            failed(e)  # type: ignore[misc]
            ended = True
        raise
    finally:
        if not ended:
            failed(GeneratorExit())  # type: ignore[misc]
        await _close(agen)


def _stopped(e: BaseException) -> BaseException:
    if isinstance(e, StopAsyncIteration):
        from .errors import ResponseFormatError

        return ResponseFormatError("the stream ended without a final completion")
    return e


async def _close(agen: Any) -> None:
    try:
        await agen.aclose()
    except Exception:
        pass


def retrying(policy: Any) -> Any:
    """`policy` with each retry recorded as a `dsrs.retry` event on the current span (its delay, the
    error being retried: the policy sleeps while that error is being handled)."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return policy
    sleep, n = policy.sleep, [0]

    def traced_sleep(seconds: float) -> Awaitable[None]:
        e = sys.exc_info()[1]
        n[0] += 1
        a: dict[str, Any] = {"dsrs.retry.attempt": n[0], "dsrs.retry.delay_s": float(seconds)}
        if e is not None:
            a.update(_error_attrs(e))
        span.add_event("dsrs.retry", a)
        return sleep(seconds)  # type: ignore[no-any-return]

    return dataclasses.replace(policy, sleep=traced_sleep)


# -- LaneMux (dsrs.lanes.mux) -------------------------------------------------------------------------
def _route_attrs(span: Any, d: Any) -> None:
    if d is None:
        return
    a: dict[str, Any] = {"dsrs.route.policy": d.policy, "dsrs.route.retries": d.retries,
                         "dsrs.route.fallbacks": d.fallbacks}  # fmt: skip
    if d.cached:
        a["dsrs.cache_hit"] = True
    if d.lane:
        a["dsrs.lane"] = d.lane
    if d.requested_lane:
        a["dsrs.route.requested_lane"] = d.requested_lane
    skipped = d.skipped
    if skipped:
        a["dsrs.route.skipped"] = [f"{k}: {v}" for k, v in skipped.items()]
    span.set_attributes(a)


def _route_failed(span: Any, e: BaseException) -> None:
    _route_attrs(span, getattr(e, "route", None))
    _failed(span, e)


def _route_answered(span: Any, c: Any) -> None:
    _route_attrs(span, getattr(c, "route", None))
    span.end()


async def route(mux: Any, call: Coroutine[Any, Any, T]) -> T:
    """A LaneMux call in a `dsrs.route` span holding the route decision."""
    t = _get()
    if t is None:
        return await call
    span = t.start_span("dsrs.route", attributes={"dsrs.route.lanes": list(mux.names)})
    token = _ctx(span)
    held = _ATTEMPT.set(None)  # a LaneMux below a lane routes in its own span; its lanes open theirs
    try:
        c = await call
    except BaseException as e:
        _route_failed(span, e)
        raise
    finally:
        _ATTEMPT.reset(held)
        _detach(token)
    _route_answered(span, c)
    return c


async def route_stream(mux: Any, agen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A LaneMux stream in a `dsrs.route` span that starts with its first step and ends with it."""
    t = _get()
    if t is not None:
        span = t.start_span("dsrs.route", attributes={"dsrs.route.lanes": list(mux.names)})
        agen = _follow(span, agen, lambda c: _route_answered(span, c), lambda e: _route_failed(span, e))
    try:
        async for item in agen:
            yield item
    finally:
        await _close(agen)


def _lane_call(t: Any, lane: Any) -> _Call:
    lm = lane.lm
    return _Call(_chat_span(t, getattr(lm, "provider", "") or "", getattr(lm, "model", "") or "", lane.name), lm, None)


async def lane(lane: Any, call: Awaitable[T]) -> T:
    """One lane attempt of a LaneMux in a `chat {model}` span with `dsrs.lane` (the lane's LM fills in
    the request; a nested LaneMux routes in its own span instead)."""
    t = _get()
    if t is None or lane.nested:
        return await call
    this = _lane_call(t, lane)
    token = _ctx(this.span)
    held = _ATTEMPT.set(this)
    try:
        c = await call
    except BaseException as e:
        this.failed(e)
        raise
    finally:
        _ATTEMPT.reset(held)
        _detach(token)
    this.answered(c)
    return c


def lane_stream(lane: Any, agen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """One streamed lane attempt in a `chat {model}` span that ends with the lane's stream."""
    t = _get()
    if t is None or lane.nested:
        return agen
    this = _lane_call(t, lane)
    return _follow(this.span, agen, this.answered, this.failed, this)


def attempt(a: Any) -> None:
    """A LaneMux attempt that failed (`dsrs.lanes.route.Attempt`): a `dsrs.retry`, `dsrs.wait`,
    `dsrs.fallback` or `dsrs.raise` event on the route span."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        attrs: dict[str, Any] = {"dsrs.lane": a.lane}
        if a.waited_s:
            attrs["dsrs.retry.delay_s"] = float(a.waited_s)
        if a.error:
            attrs["error.type"] = a.error.split(":", 1)[0]
        span.add_event(f"dsrs.{a.outcome}", attrs)


# -- the gateway (dsrs.gateway.app) -------------------------------------------------------------------
def server_middlewares(info_key: Any) -> list[Any]:
    """The gateway's tracing middleware when spans are on (else none). `info_key`: the request entry
    the handlers fill in (model, lane, key name)."""
    if not ON or _get() is None:
        return []
    from aiohttp import web
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    @web.middleware
    async def traced(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        t = _get()
        if t is None:
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        a: dict[str, Any] = {"http.request.method": request.method, "url.path": request.path}
        if route:
            a["http.route"] = route
        span = t.start_span(f"{request.method} {route}" if route else request.method, kind=SpanKind.SERVER,
                            context=propagate.extract(request.headers), attributes=a)  # fmt: skip
        token = _ctx(span)
        try:
            resp = await handler(request)
        except BaseException as e:
            _gateway_info(span, request, info_key)
            _failed(span, e)
            raise
        finally:
            _detach(token)
        _gateway_info(span, request, info_key)
        span.set_attribute("http.response.status_code", resp.status)
        if resp.status >= 500:
            span.set_attribute("error.type", str(resp.status))
            span.set_status(_Status(_ERROR))
        span.end()
        return resp

    return [traced]


def _gateway_info(span: Any, request: Any, info_key: Any) -> None:
    info = request.get(info_key) or {}
    a = {k: info[f] for k, f in (("gen_ai.request.model", "model"), ("dsrs.lane", "lane"), ("dsrs.gateway.key", "key"))
         if isinstance(info.get(f), str)}  # fmt: skip
    if a:
        span.set_attributes(a)


__all__ = ["ON", "configure", "capturing"]
