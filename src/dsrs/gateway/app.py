"""The gateway's HTTP application (aiohttp.web): OpenAI-compatible endpoints over dsrs lanes.

Order of checks for a model call, each answered with an OpenAI-style error body: client key
(401, before the body is read: nothing parsed, nothing spent), body size (413), JSON (400),
model name (404), the key's rate limit (429). Then the call runs in the scope of the key's and
the gateway's budgets; the lane LM does cache, retries, pricing and budget booking itself.

Streams: the first item is awaited before the 200 is sent, so refusals and upstream errors
before any text are plain HTTP errors; after that an error becomes an error event. A client that
disconnects cancels its handler (`handler_cancellation`), which closes the upstream stream; the
budget guard then settles the reservation by its rule for abandoned calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from .. import budget
from ..types import StreamEnd
from . import replies, requests
from .config import Config, KeyConfig
from .metrics import Metrics
from .runtime import Route, Runtime

log = logging.getLogger("dsrs.gateway")

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


def _error(w: requests.WireError) -> web.Response:
    return web.json_response(w.body(), status=w.status, headers=w.headers)


@web.middleware
async def _count(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    m = request.app[METRICS]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
    try:
        resp = await handler(request)
    except web.HTTPException as e:  # unknown paths, wrong methods: OpenAI-style bodies too
        kind = "not_found" if e.status == 404 else "invalid_request_error"
        resp = web.json_response(requests.error_body(f"{request.method} {request.path}: {e.reason}", kind, None), status=e.status)
        endpoint = "other"
    m.inc("dsrs_gateway_requests_total", endpoint=endpoint, status=resp.status)
    return resp


async def _body(request: web.Request, limit: int) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise requests.WireError(413, f"the request body is {request.content_length} bytes; the limit is {limit}",
                             code="request_too_large")  # fmt: skip
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise requests.WireError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large") from None
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise requests.WireError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise requests.WireError(400, "the request body is nested too deeply", code="invalid_json") from None
    requests.check_depth(body)
    return body


def _auth(rt: Runtime, request: web.Request) -> KeyConfig:
    key = rt.client(request.headers.get("Authorization"))
    if key is None:
        raise requests.WireError(401, "a valid client API key is required (Authorization: Bearer <key>)",
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

    def _done(self, key: KeyConfig, route: Route, c: Any) -> str:
        lane = _lane_of(route, c)
        self.m.completion(lane, c)
        if self.rt.ledger is not None:
            self.rt.ledger.record(c, lane=lane, program=f"key:{key.name}")
        return lane

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
        call = parse(await _body(request, self.rt.cfg.max_body_bytes))
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

    async def _serve(self, request: web.Request, parse: Callable[[Any], requests.Call], kind: str) -> web.StreamResponse:
        route = None
        try:
            key, call, route = await self._prepare(request, parse)
            with budget.scope(self.rt.budgets_for(key)):
                if call.stream:
                    return await self._stream(request, key, call, route, kind)
                c = await route.target.acall(list(call.messages), **call.options)
        except requests.WireError as w:
            return _error(w)
        except Exception as e:
            return _error(self._failed(route, e))
        lane = self._done(key, route, c)
        body = replies.chat_completion(c, call.model, replies.new_id("chatcmpl-"), lane) if kind == "chat" else replies.response(c, call.model, lane)
        return web.json_response(body, dumps=_dumps)

    async def _stream(self, request: web.Request, key: KeyConfig, call: requests.Call, route: Route, kind: str) -> web.StreamResponse:
        agen: AsyncIterator[Any] = route.target.astream(list(call.messages), **call.options)
        try:
            first = await agen.__anext__()  # errors before any text are plain HTTP errors
        except BaseException:
            await agen.aclose()  # type: ignore[attr-defined]
            raise
        out: Any = replies.ChatStream(call.model, call.include_usage) if kind == "chat" else replies.ResponsesStream(call.model)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            events = out.start()
            item = first
            while True:
                if isinstance(item, StreamEnd):
                    lane = self._done(key, route, item.completion)
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
                    w = self._failed(route, e)
                    ev = w.body() if kind == "chat" else out.failed(w)
                    await resp.write(_sse([ev], kind, done=kind == "chat"))
                    break
        except ConnectionError:  # the client went away while we wrote
            log.info("gateway: client disconnected mid-stream; upstream closed")
        finally:
            await agen.aclose()  # type: ignore[attr-defined]  # cancels the upstream call if it is still running
        return resp

    async def models(self, request: web.Request) -> web.Response:
        try:
            key = _auth(self.rt, request)
        except requests.WireError as w:
            return _error(w)
        data = []
        for name, route in self.rt.routes.items():
            if key.models is not None and name not in key.models:
                continue
            lanes = list(self.rt.cfg.models[name].lanes) if name in self.rt.cfg.models else [name]
            target = self.rt.lanes[lanes[0]] if len(lanes) == 1 else route.target
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "dsrs",
                         "dsrs": {"lanes": lanes, "provider": getattr(target, "provider", ""),
                                  "model": getattr(target, "model", "")}})  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        h = await asyncio.to_thread(self.rt.health)
        return web.json_response(h, status=200 if h["status"] == "ok" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        if self.rt.redis is not None:
            self.m.set("dsrs_gateway_redis_up", 1 if self.rt.redis.up else 0)
        return web.Response(text=self.m.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})  # fmt: skip


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
    app = web.Application(middlewares=[_count], client_max_size=cfg.max_body_bytes)
    app[RUNTIME], app[METRICS] = rt, m
    h = Handlers(rt, m)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_post("/v1/responses", h.responses)
    app.router.add_get("/v1/models", h.models)
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


async def start(cfg: Config, host: str | None = None, port: int | None = None) -> web.AppRunner:
    """Start serving on the running loop; `await runner.cleanup()` stops. (`serve` runs until a signal.)"""
    runner = web.AppRunner(make_app(cfg), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host or cfg.host, cfg.port if port is None else port, backlog=1024)
    await site.start()
    return runner


async def serve(cfg: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGINT or SIGTERM (or until cancelled), then stop cleanly."""
    import signal

    h, p = host or cfg.host, cfg.port if port is None else port
    runner = await start(cfg, h, p)
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
