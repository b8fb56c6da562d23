"""The LM: immutable builders over a backend, and the one call path every LM shares.

`BaseLM` does, once for every kind of LM (HTTP providers, the embedded engine, the Codex CLI,
Pylon): request normalisation, cache, retries, pricing and usage hooks. Subclasses only say
which backend answers (`_make_backend`).
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, Self

from . import _sync, history, pricing, tracing
from .budget import NO_HOLD, Hold, applicable, reserve
from .cache import Cache, cache_key, default_cache
from .errors import ConfigurationError, DsrsError, ResponseFormatError, UnsupportedFeatureError
from .providers.base import Backend, Secret
from .retry import RetryPolicy
from .settings import current
from .types import Completion, Message, Request, StreamEnd

Input = str | Message | dict[str, Any] | Sequence[Message | dict[str, Any]]
log = logging.getLogger("dsrs.lm")

# Options that become Request fields (change the answer) vs. options of the connection.
_REQUEST_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop", "num_ctx", "tools", "tool_choice",
                   "response_format", "extra")  # fmt: skip
_CLIENT_FIELDS = ("base_url", "api_key", "timeout", "retries", "cache", "headers", "api_version", "retry_policy",
                  "budget")  # fmt: skip


def to_messages(x: Input | None) -> tuple[Message, ...]:
    if isinstance(x, str):
        return (Message("user", x),)
    if isinstance(x, (Message, dict)):
        return (Message.coerce(x),)
    if x is None:
        raise ConfigurationError("no prompt to send", hint="pass a prompt string, or messages=[{'role': 'user', 'content': ...}]")
    msgs = tuple(Message.coerce(m) for m in x)
    if not msgs:
        raise ConfigurationError("no messages to send", hint="pass a prompt string or a list of messages")
    return msgs


def _messages(prompt: Input | None, messages: Input) -> Input:
    """`messages=` (LiteLLM's and dspy's keyword) for the prompt argument; both at once is refused."""
    if prompt is not None:
        raise ConfigurationError("pass the prompt or messages=[...], not both",
                                 hint="lm(messages=[...]) and lm('text') or lm([...]) are the same call")  # fmt: skip
    return messages


# The spellings users bring from LiteLLM, dspy and the official SDKs, for the same options.
_ALIASES = {"api_base": "base_url", "num_retries": "retries", "max_retries": "retries",
            "max_completion_tokens": "max_tokens", "max_output_tokens": "max_tokens", "request_timeout": "timeout",
            "stop_sequences": "stop", "base_url_override": "base_url"}  # fmt: skip
# Options dsrs passes through `extra` rather than naming (they differ per provider).
_SPELLED_ELSEWHERE = {
    "reasoning_effort": "pass it as a provider parameter: extra={'reasoning_effort': 'low'} (OpenAI chat), "
    "extra={'reasoning': {'effort': 'low'}} (Responses), extra={'thinking': {...}} (Anthropic)",
    "n": "dsrs returns one completion per call: make several calls (extra={'n': k} reaches the provider, "
    "and budgets reserve for all k, but only the first choice is returned)",
}

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
            k = _ALIASES.get(k, k)
            if k not in _REQUEST_FIELDS and k not in _CLIENT_FIELDS and k not in self._extra_options():
                known = _REQUEST_FIELDS + _CLIENT_FIELDS + self._extra_options()
                close = [] if k in _SPELLED_ELSEWHERE else difflib.get_close_matches(k, known + tuple(_ALIASES), n=1)
                raise ConfigurationError(
                    f"unknown option {k!r} for {type(self).__name__}"
                    + (f": did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""),
                    hint=_SPELLED_ELSEWHERE.get(k) or "known: " + ", ".join(known),
                )
            if k == "stop" and isinstance(v, list):
                v = tuple(v)
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

    def _with(self, **opts: Any) -> Self:
        new = copy.copy(self)
        new._opts = dict(self._opts)
        new._backend_obj = None
        new._set(opts)
        return new

    def with_cache(self, enabled: bool | Cache = True) -> Self:
        return self._with(cache=enabled)

    def with_max_tokens(self, n: int) -> Self:
        return self._with(max_tokens=n)

    def with_temperature(self, t: float) -> Self:
        return self._with(temperature=t)

    def with_top_p(self, p: float) -> Self:
        return self._with(top_p=p)

    def with_seed(self, seed: int) -> Self:
        return self._with(seed=seed)

    def with_stop(self, *stop: str) -> Self:
        return self._with(stop=tuple(stop))

    def with_base_url(self, url: str) -> Self:
        return self._with(base_url=url)

    def with_num_ctx(self, n: int) -> Self:
        return self._with(num_ctx=n)

    def with_api_key(self, key: str) -> Self:
        return self._with(api_key=key)

    def with_timeout(self, seconds: float | Any) -> Self:
        if hasattr(seconds, "total_seconds"):  # datetime.timedelta, like the spec's Duration
            seconds = seconds.total_seconds()
        return self._with(timeout=float(seconds))

    def with_retries(self, n: int) -> Self:
        return self._with(retries=n)

    def with_budget(self, budget: Any) -> Self:
        """Reserve every call's worst case on this `dsrs.Budget` (see dsrs.budget)."""
        return self._with(budget=budget)

    def with_options(self, **opts: Any) -> Self:
        return self._with(**opts)

    @property
    def history(self) -> list[history.Entry]:
        """This LM's last calls (messages, answer, usage, route), oldest first: see `dsrs.history`."""
        return history.entries(lm=self)

    @property
    def options(self) -> dict[str, Any]:
        """The options set on this LM; the API key stays hidden (a `Secret`) and secret-looking
        headers (auth, key, token...) show as '**********'."""
        o = dict(self._opts)
        if o.get("headers"):
            o["headers"] = {k: "**********" if _SECRET_HEADER.search(k) else v for k, v in o["headers"].items()}
        return o

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
    def request(self, prompt: Input | None, **overrides: Any) -> Request:
        """The normalized request this LM would send for `prompt`."""
        if overrides:
            if not _ALIASES.keys().isdisjoint(overrides):
                overrides = {_ALIASES.get(k, k): v for k, v in overrides.items()}
            bad = [k for k in overrides if k not in _REQUEST_FIELDS]
            if bad:
                raise ConfigurationError(
                    f"{', '.join(map(repr, bad))} cannot be set per call",
                    hint="per call: " + ", ".join(_REQUEST_FIELDS) + f"; for the rest use {type(self).__name__}.with_options(...)",
                )
        o = self._opts if not overrides else {**self._opts, **overrides}
        tools = o.get("tools") or ()
        stop = o.get("stop") or ()
        choice, rf = o.get("tool_choice"), o.get("response_format")
        if tools or choice is not None or rf is not None:  # any common spelling, normalised once (or refused)
            from .providers import convert

            tools = tuple(convert.tool(t) for t in tools)
            choice, rf = convert.normal_tool_choice(choice), convert.response_format(rf)
        messages = to_messages(prompt)
        if not isinstance(prompt, str) and any(m.parts for m in messages) \
                and not getattr(getattr(self, "service", None), "images", False):  # refused, never dropped
            raise UnsupportedFeatureError(
                "this LM does not take images", provider=self.provider or None, model=self.model or None,
                hint="send text only, or use a provider that takes images (openai, anthropic, gemini, ollama...)")
        return Request(
            model=self.model,
            messages=messages,
            max_tokens=o.get("max_tokens"),
            temperature=_float(o.get("temperature")),
            top_p=_float(o.get("top_p")),
            seed=o.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            num_ctx=o.get("num_ctx"),
            tools=tools,
            tool_choice=choice,
            response_format=rf,
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

    def _retrying(self) -> RetryPolicy:
        """The retry policy of a failed call (each retry an event on its span when tracing)."""
        return tracing.retrying(self._retry()) if tracing.ON else self._retry()

    def _priced(self, c: Completion) -> Completion:
        c.usage = pricing.apply(c.usage, self.provider, self.model)
        c.provider = c.provider or self.provider
        return c

    def _finish(self, c: Completion, started: float) -> Completion:
        """Run the usage hooks (after the money is booked). A hook that raises is logged and the
        call still returns its answer: it has been paid for."""
        hooks = current().on_usage
        if hooks:
            c.latency_s = time.perf_counter() - started
            for h in hooks:
                try:
                    h(c)
                except Exception:
                    log.exception("an on_usage hook raised (the call's answer and cost are kept)")
        return c

    def _secrets(self) -> tuple[str, ...]:
        """Every secret this LM sends: its API key (explicit or from the environment) and the values
        of secret-looking headers."""
        found = [getattr(self._opts.get("api_key"), "get", lambda: None)(), getattr(self._backend_obj, "_key", None)]
        found += [v for k, v in (self._opts.get("headers") or {}).items() if _SECRET_HEADER.search(k)]
        return tuple(x for x in found if isinstance(x, str) and len(x) >= 4)

    def _failed(self, e: BaseException) -> BaseException:
        """The error a failed call raises: any exception a backend raised that is not a `DsrsError`
        becomes a `ResponseFormatError` (the provider may have answered and billed), and no error
        text carries a secret, whatever path it came by (HTTP errors, in-band errors, our own code)."""
        if not isinstance(e, Exception):
            return e  # cancellation, GeneratorExit, KeyboardInterrupt: as they are
        if not isinstance(e, DsrsError):
            err: DsrsError = ResponseFormatError(
                f"could not read the answer ({type(e).__name__}: {str(e)[:200]})",
                provider=self.provider, model=self.model,
                hint="the provider's answer did not have the shape its protocol promises; it may have been billed",
            )  # fmt: skip
            err.__cause__ = e
            e = err
        secrets = self._secrets()
        if secrets:
            _scrub_error(e, secrets)
        return e

    # -- calls ------------------------------------------------------------------------------
    def acall(self, prompt: Input | None = None, *, messages: Input | None = None, **overrides: Any) -> Coroutine[Any, Any, Completion]:
        """Send one request and return its completion (text, tool calls, usage with cost).
        `messages=[...]` is another spelling of the prompt (LiteLLM's and dspy's).

        (Returns `acomplete`'s coroutine itself: one frame fewer on every resumption.)"""
        return self.acomplete(self.request(prompt if messages is None else _messages(prompt, messages), **overrides))

    def acomplete(self, req: Request) -> Coroutine[Any, Any, Completion]:
        """Send `req` (a normalized request): cache, budgets, retries, pricing, history."""
        return tracing.complete(self, req, self._complete(req)) if tracing.ON else self._complete(req)

    async def _complete(self, req: Request) -> Completion:
        started = time.perf_counter()
        cache, key, hit = self._lookup(req, started)
        if hit is not None:
            return hit
        budgets = applicable(self)
        try:  # the first try is awaited here, the rest (if any) by the retry policy
            if budgets:
                c = await self._attempt(req, budgets)
            else:
                try:
                    c = self._priced(await self.backend.complete(req))
                except DsrsError:
                    raise
                except Exception as e:
                    raise self._failed(e) from e
        except DsrsError as e:
            try:
                c = await self._retrying().run(lambda: self._attempt(req, budgets), e)
            except DsrsError as e2:
                self._failed(e2)  # typed already: only scrubbed
                raise
        c = self._finish(c, started)
        if key is not None:
            cache.put(key, c)  # type: ignore[union-attr]
        history.record(self, req.messages, c)
        return c

    async def _attempt(self, req: Request, budgets: tuple[Any, ...]) -> Completion:
        """One try: reserve the worst case on every budget, send, settle to the priced answer or
        book what the failure may have cost (`Hold.fail`). Each retry reserves anew, so a try that
        timed out keeps its worst case even when a later one succeeds."""
        hold = reserve(self, req, budgets) if budgets else NO_HOLD
        try:
            c = self._priced(await self.backend.complete(req))
        except BaseException as e:
            err = self._failed(e)
            hold.fail(err)
            if err is e:
                raise
            raise err from e
        hold.settle(c.usage)
        return c

    def __call__(self, prompt: Input | None = None, *, messages: Input | None = None, **overrides: Any) -> Completion:
        return _sync.run(self.acall(prompt, messages=messages, **overrides))

    async def _open_stream(self, req: Request, budgets: tuple[Any, ...]) -> tuple[Any, Hold, Any]:
        """One try at a stream: reserve, send, wait for the first item. (agen, hold, first item)."""
        hold = reserve(self, req, budgets) if budgets else NO_HOLD
        agen = self.backend.stream(req).__aiter__()
        try:
            return agen, hold, await agen.__anext__()
        except BaseException as e:
            err = await self._abort(hold, agen, e)
            if err is e:
                raise
            raise err from e

    async def _abort(self, hold: Hold, agen: Any, e: BaseException) -> BaseException:
        """A stream failed (or its consumer left) with `e`: book what may have been billed, close the
        provider's stream, and return the error to raise."""
        err = self._failed(_ended(e))
        hold.fail(err)
        await _close(agen)
        return err

    def astream(self, prompt: Input | None = None, *, messages: Input | None = None,
                **overrides: Any) -> AsyncIterator[str | StreamEnd]:  # fmt: skip
        """Text deltas as they arrive, then one `StreamEnd` holding the completion and usage.

        Failures before the first delta are retried like any call; after it they propagate.
        """
        if messages is not None:
            prompt = _messages(prompt, messages)
        if tracing.ON:
            return tracing.stream(self, prompt, overrides, self._astream)
        return self._astream(prompt, overrides, None)

    async def _astream(self, prompt: Input | None, overrides: dict[str, Any], req: Request | None) -> AsyncIterator[str | StreamEnd]:
        if req is None:
            req = self.request(prompt, **overrides)
        started = time.perf_counter()
        cache, key, hit = self._lookup(req, started)
        if hit is not None:
            if hit.text:
                yield hit.text
            yield StreamEnd(hit)
            return
        budgets = applicable(self)
        try:
            agen, hold, item = await self._open_stream(req, budgets)
        except DsrsError as e:
            try:
                agen, hold, item = await self._retrying().run(lambda: self._open_stream(req, budgets), e)
            except DsrsError as e2:
                self._failed(e2)
                raise
        try:
            while not isinstance(item, Completion):
                yield item
                item = await agen.__anext__()
            c = self._priced(item)
            hold.settle(c.usage)
        except BaseException as e:  # an abandoned stream (GeneratorExit, cancellation) included
            err = await self._abort(hold, agen, e)
            if err is e:
                raise
            raise err from e
        await _close(agen)
        c = self._finish(c, started)
        if key is not None:
            cache.put(key, c)  # type: ignore[union-attr]
        history.record(self, req.messages, c)
        yield StreamEnd(c)

    def stream(self, prompt: Input | None = None, *, messages: Input | None = None, **overrides: Any) -> Iterator[str | StreamEnd]:
        return _sync.iterate(self.astream(prompt, messages=messages, **overrides))


_DEFAULT_RETRY = RetryPolicy()


async def _close(agen: Any) -> None:
    try:
        await agen.aclose()
    except Exception:  # a broken stream may fail to close: its first error is the one to tell
        pass


def _ended(e: BaseException) -> BaseException:
    """A stream that ended without its final completion is a malformed answer."""
    if isinstance(e, StopAsyncIteration):
        return ResponseFormatError("the stream ended without a final completion")
    return e


def _scrub_error(e: DsrsError, secrets: tuple[str, ...]) -> None:
    """Remove `secrets` from an error's text, and from the errors it was raised from."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, DsrsError):
            for attr in ("message", "hint"):
                v = getattr(x, attr, None)
                if isinstance(v, str) and any(s in v for s in secrets):
                    setattr(x, attr, _scrub(v, secrets))
            x.args = (str(x),)
        elif any(isinstance(a, str) and any(s in a for s in secrets) for a in x.args):
            x.args = tuple(_scrub(a, secrets) if isinstance(a, str) else a for a in x.args)
        x = x.__cause__ or x.__context__


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for sec in secrets:
        text = text.replace(sec, "[redacted]")
    return text


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

    @property
    def default_max_tokens(self) -> int | None:
        """The output cap this LM's protocol sends when the request sets none (Anthropic's
        Messages API requires one), or None when it sends none (the model's own cap applies)."""
        from .registry import protocol

        return getattr(protocol(self.service), "DEFAULT_MAX_TOKENS", None)
