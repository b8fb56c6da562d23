"""The LM: immutable builders over a backend, and the one call path every LM shares.

`BaseLM` does, once for every kind of LM (HTTP providers, the embedded engine, the Codex CLI,
Pylon): request normalisation, cache, retries, pricing and usage hooks. Subclasses only say
which backend answers (`_make_backend`).
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any

from . import _sync, pricing
from .budget import guard
from .cache import Cache, cache_key, default_cache
from .errors import ConfigurationError, DsrsError
from .providers.base import Backend, Secret
from .retry import RetryPolicy
from .settings import current
from .types import Completion, Message, Request, StreamEnd, Tool

Input = str | Message | dict[str, Any] | Sequence[Message | dict[str, Any]]

# Options that become Request fields (change the answer) vs. options of the connection.
_REQUEST_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop", "num_ctx", "tools", "tool_choice",
                   "response_format", "extra")  # fmt: skip
_CLIENT_FIELDS = ("base_url", "api_key", "timeout", "retries", "cache", "headers", "api_version", "retry_policy",
                  "budget")  # fmt: skip


def to_messages(x: Input) -> tuple[Message, ...]:
    if isinstance(x, str):
        return (Message("user", x),)
    if isinstance(x, (Message, dict)):
        return (Message.coerce(x),)
    msgs = tuple(Message.coerce(m) for m in x)
    if not msgs:
        raise ConfigurationError("no messages to send", hint="pass a prompt string or a list of messages")
    return msgs


_SECRET_HEADER = re.compile(r"auth|key|token|secret|cookie|signature", re.I)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# option -> (valid?, what it must be, an example)
_CHECKS: dict[str, tuple[Any, str, str]] = {
    "max_tokens": (lambda v: _count(v) and v > 0, "a positive whole number of tokens", "1024"),
    "num_ctx": (lambda v: _count(v) and v > 0, "a positive whole number of tokens", "8192"),
    "temperature": (lambda v: _number(v) and 0 <= v <= 2, "a number from 0 to 2", "0.7"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]", "0.9"),
    "seed": (_count, "a whole number", "42"),
    "timeout": (lambda v: _number(v) and v > 0, "a positive number of seconds", "60"),
    "retries": (lambda v: _count(v) and v >= 0, "a whole number >= 0", "2"),
}


def _float(x: Any) -> float | None:
    return None if x is None else float(x)  # 0 and 0.0 must be one cache key


class BaseLM:
    """Shared builders and call path. Instances are immutable: every `with_*` returns a copy."""

    provider: str = ""
    model: str = ""

    def __init__(self, **opts: Any) -> None:
        self._opts: dict[str, Any] = {}
        self._backend_obj: Backend | None = None
        self._set(opts)

    # -- builders ---------------------------------------------------------------------------
    def _set(self, opts: dict[str, Any]) -> None:
        for k, v in opts.items():
            if k not in _REQUEST_FIELDS and k not in _CLIENT_FIELDS and k not in self._extra_options():
                raise ConfigurationError(
                    f"unknown option {k!r} for {type(self).__name__}",
                    hint="known: " + ", ".join(_REQUEST_FIELDS + _CLIENT_FIELDS + self._extra_options()),
                )
            if k == "api_key" and v is not None and not isinstance(v, Secret):
                v = Secret(v)
            if k == "stop" and isinstance(v, str):
                v = (v,)
            check = _CHECKS.get(k)
            if check is not None and v is not None and not check[0](v):
                raise ConfigurationError(f"{k} must be {check[1]}, got {v!r:.40}", hint=f"e.g. with_{k}({check[2]})")
            self._opts[k] = v

    def _extra_options(self) -> tuple[str, ...]:
        return ()

    def _with(self, **opts: Any) -> Any:
        new = copy.copy(self)
        new._opts = dict(self._opts)
        new._backend_obj = None
        new._set(opts)
        return new

    def with_cache(self, enabled: bool | Cache = True) -> Any:
        return self._with(cache=enabled)

    def with_max_tokens(self, n: int) -> Any:
        return self._with(max_tokens=n)

    def with_temperature(self, t: float) -> Any:
        return self._with(temperature=t)

    def with_top_p(self, p: float) -> Any:
        return self._with(top_p=p)

    def with_seed(self, seed: int) -> Any:
        return self._with(seed=seed)

    def with_stop(self, *stop: str) -> Any:
        return self._with(stop=tuple(stop))

    def with_base_url(self, url: str) -> Any:
        return self._with(base_url=url)

    def with_num_ctx(self, n: int) -> Any:
        return self._with(num_ctx=n)

    def with_api_key(self, key: str) -> Any:
        return self._with(api_key=key)

    def with_timeout(self, seconds: float | Any) -> Any:
        if hasattr(seconds, "total_seconds"):  # datetime.timedelta, like the spec's Duration
            seconds = seconds.total_seconds()
        return self._with(timeout=float(seconds))

    def with_retries(self, n: int) -> Any:
        return self._with(retries=n)

    def with_budget(self, budget: Any) -> Any:
        """Reserve every call's worst case on this `dsrs.Budget` (see dsrs.budget)."""
        return self._with(budget=budget)

    def with_options(self, **opts: Any) -> Any:
        return self._with(**opts)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._opts)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._opts.items() if k not in ("api_key", "headers", "retry_policy")}
        if "api_key" in self._opts:
            shown["api_key"] = "**********"
        args = "".join(f", {k}={v!r}" for k, v in shown.items())
        return f"{type(self).__name__}({self.provider}/{self.model!r}{args})"

    # -- the backend ------------------------------------------------------------------------
    def _make_backend(self) -> Backend:
        raise NotImplementedError

    @property
    def backend(self) -> Backend:
        if self._backend_obj is None:
            self._backend_obj = self._make_backend()
        return self._backend_obj

    # -- requests ---------------------------------------------------------------------------
    def request(self, prompt: Input, **overrides: Any) -> Request:
        """The normalized request this LM would send for `prompt`."""
        if overrides:
            bad = [k for k in overrides if k not in _REQUEST_FIELDS]
            if bad:
                raise ConfigurationError(
                    f"{', '.join(map(repr, bad))} cannot be set per call",
                    hint="per call: " + ", ".join(_REQUEST_FIELDS) + f"; for the rest use {type(self).__name__}.with_options(...)",
                )
        o = self._opts if not overrides else {**self._opts, **overrides}
        tools = o.get("tools") or ()
        stop = o.get("stop") or ()
        return Request(
            model=self.model,
            messages=to_messages(prompt),
            max_tokens=o.get("max_tokens"),
            temperature=_float(o.get("temperature")),
            top_p=_float(o.get("top_p")),
            seed=o.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            num_ctx=o.get("num_ctx"),
            tools=tuple(t if isinstance(t, Tool) else Tool(**t) for t in tools),
            tool_choice=o.get("tool_choice"),
            response_format=o.get("response_format"),
            extra=o.get("extra") or {},
        )

    def _cache(self) -> Cache | None:
        c = self._opts.get("cache")
        if not c:
            return None
        if isinstance(c, Cache):
            return c
        return default_cache()

    def _cache_scope(self) -> dict[str, Any] | None:
        """Connection options that change the answer too (an API version, beta headers), never secrets."""
        o = self._opts
        headers = {k.lower(): v for k, v in (o.get("headers") or {}).items() if not _SECRET_HEADER.search(k)}
        scope = {k: v for k, v in (("api_version", o.get("api_version")), ("headers", headers)) if v}
        return scope or None

    def _lookup(self, req: Request, started: float) -> tuple[Cache | None, str | None, Completion | None]:
        cache = self._cache()
        if cache is None:
            return None, None, None
        key = cache_key(self.provider, req, self._cache_scope())
        hit = cache.get(key)
        if hit is not None and current().on_usage:
            hit = self._finish(hit, started)
        return cache, key, hit

    def _retry(self) -> RetryPolicy:
        p = self._opts.get("retry_policy") or _DEFAULT_RETRY
        n = self._opts.get("retries")
        return p if n is None else RetryPolicy(n, p.sleep, p.rand)

    def _finish(self, c: Completion, started: float) -> Completion:
        c.usage = pricing.apply(c.usage, self.provider, self.model)
        c.provider = c.provider or self.provider
        hooks = current().on_usage
        if hooks:
            c.latency_s = time.perf_counter() - started
            for h in hooks:
                h(c)
        return c

    # -- calls ------------------------------------------------------------------------------
    def acall(self, prompt: Input, **overrides: Any) -> Coroutine[Any, Any, Completion]:
        """Send one request and return its completion (text, tool calls, usage with cost).

        (Returns `acomplete`'s coroutine itself: one frame fewer on every resumption.)"""
        return self.acomplete(self.request(prompt, **overrides))

    async def acomplete(self, req: Request) -> Completion:
        started = time.perf_counter()
        cache, key, hit = self._lookup(req, started)
        if hit is not None:
            return hit
        backend = self.backend
        async with guard(self, req) as hold:
            try:  # the first try is awaited here, the rest (if any) by the retry policy
                c = await backend.complete(req)
            except DsrsError as e:
                c = await self._retry().run(lambda: backend.complete(req), e)
            c = self._finish(c, started)
            hold.settle(c.usage)
        if key is not None:
            cache.put(key, c)  # type: ignore[union-attr]
        return c

    def __call__(self, prompt: Input, **overrides: Any) -> Completion:
        return _sync.run(self.acall(prompt, **overrides))

    async def astream(self, prompt: Input, **overrides: Any) -> AsyncIterator[str | StreamEnd]:
        """Text deltas as they arrive, then one `StreamEnd` holding the completion and usage.

        Failures before the first delta are retried like any call; after it they propagate.
        """
        req = self.request(prompt, **overrides)
        started = time.perf_counter()
        cache, key, hit = self._lookup(req, started)
        if hit is not None:
            if hit.text:
                yield hit.text
            yield StreamEnd(hit)
            return
        backend = self.backend
        agen = None

        async def first() -> Any:
            nonlocal agen
            hold.sending()  # a cancelled stream settles to what was streamed (dsrs.budget)
            agen = backend.stream(req).__aiter__()
            try:
                return await agen.__anext__()
            except BaseException:
                await agen.aclose()
                raise

        async with guard(self, req) as hold:
            item = await self._retry().run(first)
            assert agen is not None
            try:
                while True:
                    if isinstance(item, Completion):
                        c = self._finish(item, started)
                        hold.settle(c.usage)
                        if key is not None:
                            cache.put(key, c)  # type: ignore[union-attr]
                        yield StreamEnd(c)
                        return
                    hold.streamed(item)
                    yield item
                    item = await agen.__anext__()
            finally:
                await agen.aclose()

    def stream(self, prompt: Input, **overrides: Any) -> Iterator[str | StreamEnd]:
        return _sync.iterate(self.astream(prompt, **overrides))


_DEFAULT_RETRY = RetryPolicy()


class LM(BaseLM):
    """`LM("provider/model", **options)`: any provider in the registry behind one interface."""

    def __init__(self, model: str, **opts: Any) -> None:
        from .registry import resolve

        self.service, self.model = resolve(model)
        self.provider = self.service.name
        super().__init__(**opts)

    def _make_backend(self) -> Backend:
        from .registry import protocol

        return protocol(self.service).Client(self.service, self.model, self._opts)

    @property
    def local(self) -> bool:
        return self.service.local
