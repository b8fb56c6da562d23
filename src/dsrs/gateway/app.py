"""The gateway's HTTP application (aiohttp.web): OpenAI-compatible endpoints over dsrs lanes.

Order of checks for a model call, each answered with an OpenAI-style error body: client key
(401, before the body is read: nothing parsed, nothing spent), body size (413), JSON (400),
model name (404), the key's rate limit (429). Then the call runs in the scope of the key's and
the gateway's budgets; the lane LM does cache, retries, pricing and budget booking itself.

Streams: the first item is awaited before the 200 is sent, so refusals and upstream errors
before any text are plain HTTP errors; after that an error becomes an error event. A client that
disconnects cancels its handler (`handler_cancellation`), which closes the upstream stream; the
budget guard then settles the reservation by its rule for abandoned calls.

Accounting: when budgets are configured, each model request books on a private unlimited `Budget`
too (in the same scope as the key's), so the gateway knows what this request booked, answered or
not (without budgets nothing is booked, and such a call's row says its cost is unknown). An answer is counted and
recorded in the ledger; whatever was booked beyond it (a stream or call the client abandoned, an
error after the request went out, failed attempts before a fallback answered) is recorded as well,
as a ledger row with cost_source "estimate" and no tokens, and in `dsrs_lane_msats_total` and
`dsrs_lane_unsettled_total{reason}`: the ledger and /metrics add up to what the budgets booked. A
request the client left is counted with status 499.

`/metrics` needs the admin key (unless `public_metrics = true`); `/health` says only its status
without it (for load balancers) and everything (Redis, budget mode, lost books, models) with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from .. import budget, tracing
from ..types import Completion, CostSource, LmUsage, StreamEnd
from . import anthropic_wire, bad_http, logs, replies, requests
from .config import Config, KeyConfig
from .metrics import Metrics
from .runtime import Route, Runtime

log = logging.getLogger("dsrs.gateway")

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


_UNLIMITED = 1 << 62  # the per-request tracking budget's limit: it only counts


def _error(w: requests.WireError, kind: str = "chat") -> web.Response:
    status, body = anthropic_wire.error_body(w) if kind == "messages" else (w.status, w.body())
    resp = web.json_response(body, status=status, headers=w.headers)
    if w.status == 408:
        resp.force_close()  # a body that stalls: do not wait for the rest of it
    return resp


@web.middleware
async def _count(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    m = request.app[METRICS]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
    started = time.perf_counter()
    try:
        resp = await handler(request)
    except web.HTTPException as e:  # unknown paths, wrong methods: OpenAI-style bodies too
        kind = "not_found" if e.status == 404 else "invalid_request_error"
        w = requests.WireError(e.status, f"{request.method} {request.path[:200]}: {e.reason}", type=kind)
        resp = _error(w, "messages" if request.path.startswith("/v1/messages") else "chat")  # Anthropic's shape there
        endpoint = "other"
    except asyncio.CancelledError:  # the client went away (handler_cancellation): 499, as nginx logs it
        m.inc("dsrs_gateway_requests_total", endpoint=endpoint, status=499)
        logs.access(request, endpoint if endpoint != "other" else request.path, 499, started)
        raise
    m.inc("dsrs_gateway_requests_total", endpoint=endpoint, status=resp.status)
    logs.access(request, endpoint if endpoint != "other" else request.path, resp.status, started)
    return resp


async def _body(request: web.Request, limit: int, timeout_s: float) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise requests.WireError(413, f"the request body is {request.content_length} bytes; the limit is {limit}",
                             code="request_too_large")  # fmt: skip
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise requests.WireError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large") from None
    except TimeoutError:
        raise requests.WireError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise requests.WireError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise requests.WireError(400, "the request body is nested too deeply", code="invalid_json") from None
    requests.check_depth(body, surrogates=requests.may_hold_surrogates(raw))
    return body


def _auth(rt: Runtime, request: web.Request) -> KeyConfig:
    header = request.headers.get("Authorization")
    if header is None and "x-api-key" in request.headers:  # the Anthropic SDK's header
        header = "Bearer " + request.headers["x-api-key"]
    key = rt.client(header)
    if key is None:
        raise requests.WireError(401, "a valid client API key is required (Authorization: Bearer <key>, or x-api-key)",
                             code="invalid_api_key")  # fmt: skip
    return key


def _route(rt: Runtime, key: KeyConfig, name: str) -> Route:
    route = rt.routes.get(name)
    if route is None or (key.models is not None and name not in key.models):
        raise requests.WireError(404, f"the model {name!r} does not exist or you do not have access to it",
                             code="model_not_found", param="model")  # fmt: skip
    return route


def _lane_of(route: Route, c: Any) -> str:
    return route.lane or getattr(getattr(c, "route", None), "lane", None) or route.name


class Handlers:
    def __init__(self, rt: Runtime, metrics: Metrics) -> None:
        self.rt, self.m = rt, metrics

    def _done(self, request: web.Request, key: KeyConfig, route: Route, c: Any, track: budget.Budget | None) -> str:
        lane = _lane_of(route, c)
        self.m.completion(lane, c)
        if self.rt.ledger is not None:
            self.rt.ledger.record(c, lane=lane, program=f"key:{key.name}")
        u = c.usage
        request[logs.INFO_KEY].update(lane=lane, tokens=u.total_tokens, msats=u.cost_msats)
        beyond = track.spent_msats - (u.cost_msats or 0) if track is not None else 0  # failed attempts before the
        if beyond > 0:  # answer that kept their worst case
            failed = {a.lane for a in getattr(c.route, "attempts", None) or () if a.outcome == "fallback"}
            self._unsettled(request, key, route, beyond, "error", count_request=False,
                            lane=failed.pop() if len(failed) == 1 else None)  # fmt: skip
        return lane

    def _unsettled(self, request: web.Request, key: KeyConfig, route: Route, msats: int | None, reason: str,
                   count_request: bool = True, lane: str | None = None) -> None:  # fmt: skip
        """Book in the ledger and the metrics what the budgets kept for a call that has no answer to
        show: `reason` "abandoned" (the client left) or "error" (it failed after the request went out).
        `msats` None: no budget applies, so nothing was booked and the cost is unknown."""
        info = request[logs.INFO_KEY]
        if info.get("unsettled"):  # once per request (a stream's end and its cancellation both come here)
            return
        info["unsettled"] = True
        lane = lane or route.lane or route.name
        self.m.inc("dsrs_lane_unsettled_total", lane=lane, reason=reason)
        if msats:
            self.m.inc("dsrs_lane_msats_total", msats, lane=lane)
        target = self.rt.lanes.get(lane)
        target = route.target if target is None else target
        src = CostSource.ESTIMATE if msats is not None else None
        c = Completion("", LmUsage(cost_msats=msats, cost_source=src, estimated=True, calls=1),
                       model=getattr(target, "model", "") or "", provider=getattr(target, "provider", "") or "")  # fmt: skip
        if self.rt.ledger is not None:
            self.rt.ledger.record(c, lane=lane, program=f"key:{key.name}")
        if count_request:
            info.update(lane=lane, msats=msats)

    def _failed(self, route: Route | None, e: BaseException) -> requests.WireError:
        tried = getattr(getattr(e, "route", None), "attempts", None)  # a LaneMux's: the last lane tried failed
        w = requests.from_error(e, tried[-1].lane if tried else route.lane or route.name if route else None)
        if w.status >= 500 and w.code == "internal_error":
            log.exception("gateway: unexpected error", exc_info=e)
        lane = getattr(getattr(e, "route", None), "lane", None) or (route.lane or route.name if route else "-")
        self.m.inc("dsrs_lane_errors_total", lane=lane, type=type(e).__name__)
        return w

    async def _prepare(self, request: web.Request, parse: Callable[[Any], requests.Call]) -> tuple[KeyConfig, requests.Call, Route]:
        key = _auth(self.rt, request)
        request[logs.INFO_KEY] = {"key": key.name}
        call = parse(await _body(request, self.rt.cfg.max_body_bytes, self.rt.cfg.body_timeout_s))
        request[logs.INFO_KEY]["model"] = call.model
        route = _route(self.rt, key, call.model)
        if key.rpm is not None:
            wait = self.rt.limiter.hit(key.name, key.rpm)
            if wait is not None:
                raise requests.WireError(429, f"rate limit of {key.rpm} requests per minute reached for this key",
                                     type="rate_limit_error", code="rate_limit_exceeded",
                                     headers={"retry-after": str(max(1, round(wait)))})  # fmt: skip
        return key, call, route

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, requests.parse_chat, "chat")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, requests.parse_responses, "responses")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, anthropic_wire.parse, "messages")

    async def _serve(self, request: web.Request, parse: Callable[[Any], requests.Call], kind: str) -> web.StreamResponse:
        route = key = None
        # what this request books, when budgets are configured (without any, nothing is booked, and the
        # worst-case estimate a booking costs is not worth making)
        track = budget.Budget(_UNLIMITED, allow_unpriced=True, name="request") if self.rt.cfg.budgets else None
        try:
            key, call, route = await self._prepare(request, parse)
            with budget.scope([*self.rt.budgets_for(key), *([track] if track is not None else ())]):
                if call.stream:
                    return await self._stream(request, key, call, route, kind, track)
                c = await route.target.acall(list(call.messages), **call.options)
        except requests.WireError as w:
            return _error(w, kind)
        except asyncio.CancelledError:  # the client left while the call ran: what it booked stays booked
            if key is not None and route is not None:
                self._unsettled(request, key, route, _booked(track), "abandoned")
            raise
        except Exception as e:
            err = self._failed(route, e)
            if key is not None and route is not None and (track.spent_msats if track is not None else not budget.not_billed(e)):
                self._unsettled(request, key, route, _booked(track), "error")
            return _error(err, kind)
        lane = self._done(request, key, route, c, track)
        if kind == "messages":
            body = anthropic_wire.message(c, call.model, lane)
        else:
            body = replies.chat_completion(c, call.model, replies.new_id("chatcmpl-"), lane) if kind == "chat" else replies.response(c, call.model, lane)
        return web.json_response(body, dumps=_dumps)

    async def _stream(self, request: web.Request, key: KeyConfig, call: requests.Call, route: Route, kind: str,
                      track: budget.Budget | None) -> web.StreamResponse:  # fmt: skip
        agen: AsyncIterator[Any] = route.target.astream(list(call.messages), **call.options)
        try:
            first = await agen.__anext__()  # errors before any text are plain HTTP errors
        except BaseException:
            await agen.aclose()  # type: ignore[attr-defined]
            raise
        out: Any = replies.ChatStream(call.model, call.include_usage) if kind == "chat" else replies.ResponsesStream(call.model)
        if kind == "messages":
            out = anthropic_wire.MessagesStream(call.model)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        outcome = "abandoned"  # until the stream ends or fails
        try:
            await resp.prepare(request)
            events = out.start()
            item = first
            while True:
                if isinstance(item, StreamEnd):
                    outcome = "done"
                    lane = self._done(request, key, route, item.completion, track)
                    events += out.end(item.completion, lane)
                    await resp.write(_sse(events, kind, done=True))
                    break
                if item:
                    events += out.delta(item)
                await resp.write(_sse(events, kind))
                events = []
                try:
                    item = await agen.__anext__()
                except (asyncio.CancelledError, ConnectionError):
                    raise
                except Exception as e:  # after the first chunk: an error event, then the end
                    outcome = "error"
                    w = self._failed(route, e)
                    ev = w.body() if kind == "chat" else out.failed(w)
                    await resp.write(_sse([ev], kind, done=kind == "chat"))
                    break
        except ConnectionError:  # the client went away while we wrote
            log.info("gateway: client disconnected mid-stream; upstream closed")
        finally:
            await agen.aclose()  # type: ignore[attr-defined]  # cancels the upstream call if it is still running
            if outcome != "done":  # closed: the budgets have booked by their rules; the ledger and metrics say the same
                self._unsettled(request, key, route, _booked(track), outcome)
        return resp

    def _model(self, name: str, route: Route) -> dict[str, Any]:
        lanes = list(self.rt.cfg.models[name].lanes) if name in self.rt.cfg.models else [name]
        target = self.rt.lanes[lanes[0]] if len(lanes) == 1 else route.target
        return {"id": name, "object": "model", "created": 0, "owned_by": "dsrs",
                "dsrs": {"lanes": lanes, "provider": getattr(target, "provider", ""),
                         "model": getattr(target, "model", "")}}  # fmt: skip

    async def models(self, request: web.Request) -> web.Response:
        try:
            key = _auth(self.rt, request)
        except requests.WireError as w:
            return _error(w)
        data = [self._model(n, r) for n, r in self.rt.routes.items() if key.models is None or n in key.models]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{id}`: one model, or the same 404 as a call to a model the key cannot use."""
        try:
            key = _auth(self.rt, request)
            name = request.match_info["id"]
            return web.json_response(self._model(name, _route(self.rt, key, name)))
        except requests.WireError as w:
            return _error(w)

    async def health(self, request: web.Request) -> web.Response:
        h = await asyncio.to_thread(self.rt.health)
        status = 200 if h["status"] == "ok" else 503
        if not self.rt.admin(request.headers.get("Authorization")):
            h = {"status": h["status"]}  # for load balancers; the details need the admin key
        return web.json_response(h, status=status)

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.rt.cfg.public_metrics and not self.rt.admin(request.headers.get("Authorization")):
            return _error(requests.WireError(401, "/metrics needs the gateway's admin key (Authorization: Bearer <admin key>)",
                                             code="admin_key_required"))  # fmt: skip
        if self.rt.redis is not None:
            self.m.set("dsrs_gateway_redis_up", 1 if self.rt.redis.up else 0)
        return web.Response(text=self.m.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})  # fmt: skip


def _booked(track: budget.Budget | None) -> int | None:
    return track.spent_msats if track is not None else None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(events: list[dict[str, Any]], kind: str, done: bool = False) -> bytes:
    if kind == "chat":
        text = "".join(f"data: {_dumps(e)}\n\n" for e in events) + ("data: [DONE]\n\n" if done else "")
    else:
        text = "".join(f"event: {e.get('type', 'error')}\ndata: {_dumps(e)}\n\n" for e in events)
    return text.encode()


def make_app(cfg: Config, runtime: Runtime | None = None) -> web.Application:
    rt = runtime or Runtime(cfg)
    m = Metrics()
    app = web.Application(middlewares=[*tracing.server_middlewares(logs.INFO_KEY), _count],  # (none when not tracing)
                          client_max_size=cfg.max_body_bytes)
    app[RUNTIME], app[METRICS] = rt, m
    h = Handlers(rt, m)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_post("/v1/responses", h.responses)
    app.router.add_post("/v1/messages", h.messages)  # Anthropic Messages
    from . import embeddings  # imports this module: loaded here, once it is complete

    app.router.add_post("/v1/embeddings", embeddings.route(h))
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/v1/models/{id:.+}", h.model)
    app.router.add_get("/health", h.health)
    app.router.add_get("/metrics", h.metrics)

    async def close(app: web.Application) -> None:
        from .. import http

        await http.aclose()
        if hasattr(rt.ledger, "close") and rt.redis is not None:
            await asyncio.to_thread(rt.ledger.close)  # send the queued usage entries
        if rt.redis is not None:
            rt.redis.close()

    app.on_cleanup.append(close)
    return app


_BUSY_BODY = json.dumps(requests.error_body("too many open connections from your address; close some and retry",
                                           "rate_limit_error", "too_many_connections")).encode()  # fmt: skip
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)  # fmt: skip


class _PerClient(asyncio.Protocol):
    """One connection, counted against its client address: over the cap it gets a 503 and is closed;
    otherwise aiohttp's own protocol handles it (every event is passed on)."""

    __slots__ = ("_make", "_open", "_cap", "_inner", "_host")

    def __init__(self, make: Callable[[], Any], open_: dict[str, int], cap: int) -> None:
        self._make, self._open, self._cap = make, open_, cap
        self._inner: Any = None
        self._host: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
        n = self._open.get(host, 0)
        if n >= self._cap:
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._open[host], self._host = n + 1, host
        self._inner = self._make()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._host is not None:
            left = self._open[self._host] - 1
            if left:
                self._open[self._host] = left
            else:
                del self._open[self._host]
            self._host = None
        if self._inner is not None:
            self._inner.connection_lost(exc)


class _Runner(web.AppRunner):
    """An AppRunner whose protocol factory (what the site listens with) caps connections per client address."""

    __slots__ = ("_cap", "_open")

    def __init__(self, app: web.Application, cap: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._cap = cap
        self._open: dict[str, int] = {}

    @property
    def server(self) -> Any:
        inner = super().server
        if inner is None:
            return inner
        make = bad_http.fixed_errors(inner)  # a malformed request's 400 does not echo its bytes
        return make if not self._cap else lambda: _PerClient(make, self._open, self._cap)


async def start(cfg: Config, host: str | None = None, port: int | None = None) -> web.AppRunner:
    """Start serving on the running loop; `await runner.cleanup()` stops. (`serve` runs until a signal.)

    Slow clients: a connection's request headers must arrive within `header_timeout_s` of its opening
    or of its previous answer (aiohttp's keep-alive timer, which also closes idle connections), a
    body within `body_timeout_s` (408), and one address holds at most `max_connections_per_client`."""
    logs.bound()
    runner = _Runner(make_app(cfg), cfg.max_connections_per_client, handler_cancellation=True, access_log=None,
                     keepalive_timeout=cfg.header_timeout_s)  # fmt: skip
    await runner.setup()
    site = web.TCPSite(runner, host or cfg.host, cfg.port if port is None else port, backlog=1024)
    await site.start()
    return runner


async def serve(cfg: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGINT or SIGTERM (or until cancelled), then stop cleanly."""
    import signal

    h, p = host or cfg.host, cfg.port if port is None else port
    runner = await start(cfg, h, p)
    p = runner.addresses[0][1] if runner.addresses else p  # the bound port (with --port 0, the one the OS chose)
    print(f"dsrs gateway on http://{h}:{p}/v1 ({len(runner.app[RUNTIME].routes)} models)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread: then cancelling the task stops it
            pass
    started = time.monotonic()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("gateway stopped after %.0f s", time.monotonic() - started)
