"""`POST /v1/embeddings` on the gateway: the OpenAI embeddings API over a configured lane.

The same checks, books and counters as chat completions (`Handlers._prepare`, `_done`, `_unsettled`):
client key (401 before the body is read), body size, JSON, model (404), the key's rate limit; then the
call runs in the scope of the key's and the gateway's budgets, and the answer is counted in /metrics
and the ledger (program `key:<name>`). The lane must be a single `lm` lane (a model name served by
several lanes is refused: vectors of different models do not mix); the `Embedder` gets the lane's
provider, model, key, base URL, timeout, retries, cache and budget.

Request: `model`, `input` (a string or a list of strings; token arrays are refused), `dimensions`,
`encoding_format` ("float", or "base64": little-endian float32, what the official SDKs ask for by
default), `user` (ignored). Answer: `{object: "list", data: [{object: "embedding", index,
embedding}], model, usage: {prompt_tokens, total_tokens}}`.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from array import array
from typing import Any

from aiohttp import web

from .. import budget
from ..embed import Embedder
from . import requests
from .app import _UNLIMITED, Handlers, _booked, _dumps, _error
from .runtime import Route, Runtime

# lane options an Embedder takes over (the rest, sampling options, are the chat lane's)
_TAKEN = ("base_url", "api_key", "timeout", "retries", "retry_policy", "headers", "api_version", "cache", "budget")


def parse(body: Any) -> requests.Call:
    model = requests._model(body)
    requests._check_rest(body, {"model", "input", "dimensions", "encoding_format"})
    raw = body.get("input")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise requests.bad("input must be a string or a non-empty array of strings", "input")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise requests.bad(f"input[{i}] is not a string: this gateway embeds text (token arrays are not supported)",
                               "input", "unsupported_input")  # fmt: skip
        if not t:
            raise requests.bad(f"input[{i}] is an empty string", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise requests.bad("encoding_format must be 'float' or 'base64'", "encoding_format")
    dims = requests._number(body, "dimensions", int, 1)
    return requests.Call(model, (), {"input": items, "encoding_format": fmt, "dimensions": dims})


def embedder(rt: Runtime, route: Route, dimensions: int | None) -> Embedder:
    """The Embedder for a route's lane, or a 400 when the route cannot embed."""
    lc = rt.cfg.lanes.get(route.lane) if route.lane else None
    if lc is None or lc.kind != "lm":
        why = ("several lanes (vectors of different models do not mix)" if route.lane is None
               else f"a {lc.kind} lane" if lc else "no lane")  # fmt: skip
        raise requests.bad(f"the model {route.name!r} cannot embed: it is served by {why}; embeddings need one LM lane",
                           "model", "model_not_embeddable")  # fmt: skip
    lm = route.target
    opts = {k: v for k, v in getattr(lm, "_opts", {}).items() if k in _TAKEN and v is not None}
    try:
        e = Embedder(f"{lm.provider}/{lm.model}", ledger=False, **opts)
    except Exception as err:
        raise requests.bad(f"the model {route.name!r} cannot embed: {err}", "model", "model_not_embeddable") from None
    return e.with_dimensions(dimensions) if dimensions is not None else e


def _b64(v: list[float]) -> str:
    a = array("f", v)
    if sys.byteorder != "little":
        a.byteswap()
    return base64.b64encode(a.tobytes()).decode()


async def handle(h: Handlers, request: web.Request) -> web.StreamResponse:
    track = budget.Budget(_UNLIMITED, allow_unpriced=True, name="request") if h.rt.cfg.budgets else None
    route = key = None
    try:
        key, call, route = await h._prepare(request, parse)
        e = embedder(h.rt, route, call.options["dimensions"])
        with budget.scope([*h.rt.budgets_for(key), *([track] if track is not None else ())]):
            r = await e.aembed(call.options["input"])
    except requests.WireError as w:
        return _error(w)
    except asyncio.CancelledError:
        if key is not None and route is not None:
            h._unsettled(request, key, route, _booked(track), "abandoned")
        raise
    except Exception as ex:
        err = h._failed(route, ex)
        if key is not None and route is not None and (track.spent_msats if track is not None else not budget.not_billed(ex)):
            h._unsettled(request, key, route, _booked(track), "error")
        return _error(err)
    h._done(request, key, route, r, track)
    enc = _b64 if call.options["encoding_format"] == "base64" else None
    data = [{"object": "embedding", "index": i, "embedding": enc(v) if enc else v} for i, v in enumerate(r.vectors)]
    u = r.usage
    body = {"object": "list", "data": data, "model": call.model,
            "usage": {"prompt_tokens": u.prompt_tokens, "total_tokens": u.total_tokens}}  # fmt: skip
    return web.json_response(body, dumps=_dumps)


def route(h: Handlers) -> Any:
    """The aiohttp handler for `POST /v1/embeddings` (app.py registers it)."""

    async def embeddings(request: web.Request) -> web.StreamResponse:
        return await handle(h, request)

    return embeddings
