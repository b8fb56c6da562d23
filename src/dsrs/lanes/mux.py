"""LaneMux: named lanes, each an LM, chosen by availability and a policy, with fallback. Itself an LM.

Routing one request:

1. **Rank** the lanes by the policy (`priority`, `cheapest`, `fastest`, or a function).
2. **Try** them in that order. When a lane's turn comes it is skipped, with the reason in the
   route decision, if it cannot do the request (tools, JSON-schema output, streaming, context
   window) or is unavailable now (no key, circuit open, paused by a long Retry-After, a budget
   that cannot cover the worst case). Lanes after the one that answers are never checked.
3. **Retry or fall back.** The mux owns retries: a lane's LM is called with its own retries off,
   and its retry count (`LM.with_retries(n)`, default 2) is how often the mux retries that lane
   before falling back. One budget covers every retry and fallback: `mux.with_retries(n)` allows
   `n` attempts after the first in total (default: the number of lanes + 1); a lane is retried
   only while the budget still leaves one attempt for every lane queued after it. Backoff delays
   and sleeping come from the mux's retry policy (`mux.with_options(retry_policy=...)`).
   - transport errors, timeouts, malformed answers, 5xx: retried on the lane, then fall back; a
     5xx with a Retry-After falls back at once while a queued lane's circuit is not open (with no
     such lane, it is retried as the provider's SDK would);
   - `RateLimitError`: a Retry-After up to `rate_limit_wait` seconds (default 5) is waited out
     on the same lane; a longer one pauses the lane for that long and the request moves on;
   - `QuotaExceededError`, auth errors, missing keys, budget refusals: fall back at once;
   - `BadRequestError` and other non-fallback errors are raised: another lane would refuse too;
   - `ContextWindowExceededError` falls back only to lanes declaring a larger `context_window`;
   - streams fall back only before their first chunk; after it, errors propagate.
4. `mux.with_timeout(s)` bounds the whole routed call (every lane, retry and wait; for a stream,
   every chunk too) and raises `dsrs.TimeoutError` when it runs out. A lane call that ends in
   anything but a dsrs error (a bug in a user's LM, a cancellation) still ends a half-open probe.
5. Every completion carries `completion.route`, a `RouteDecision`; every error raised by the mux
   carries `error.route` too.

Explicit selection (`mux.with_lane("premium")`) pins the request to that lane (its retries apply,
no fallback). Lanes nest: a lane may itself be a LaneMux (it keeps its own retry budget).
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from functools import partial
from typing import Any

from .. import budget as budgets
from .. import tracing
from ..cache import cache_key
from ..errors import (
    BudgetExceededError,
    ConfigurationError,
    ContextWindowExceededError,
    DsrsError,
    RateLimitError,
    ResponseFormatError,
    TimeoutError,
    UnsupportedFeatureError,
)
from ..lm import _REQUEST_FIELDS, BaseLM, Input, _messages
from ..retry import should_retry
from ..types import Completion, Request, StreamEnd
from . import policy as policies
from .circuit import CircuitBreaker
from .lane import Lane, typical_tokens
from .route import Attempt, Candidate, NoLaneAvailableError, RouteDecision

DEFAULT_RATE_LIMIT_WAIT = 5.0  # seconds: a shorter Retry-After is waited out on the same lane
_NOT_FOR_MUX = ("base_url", "api_key", "headers", "api_version")


class _LazyRequest:
    """The whole Request of a routed call, built only if a check needs it."""

    __slots__ = ("mux", "prompt", "opts", "req")

    def __init__(self, mux: Any, prompt: Any, opts: dict[str, Any], req: Request | None) -> None:
        self.mux, self.prompt, self.opts, self.req = mux, prompt, opts, req

    def get(self) -> Request:
        if self.req is None:
            self.req = self.mux.request(self.prompt, **self.opts)
        return self.req


def _fields(req: Request) -> dict[str, Any]:
    """The request fields the caller set, to pass to a lane (its own options fill the rest)."""
    out = {}
    for f in _REQUEST_FIELDS:
        v = getattr(req, f)
        if v is not None and v != () and v != {}:
            out[f] = v
    return out


def _ended_by(lane: Lane, e: BaseException) -> None:
    """A call ended by something other than a dsrs error: a cancellation or an interrupt says
    nothing about the lane; a bug or an untyped error from its LM counts as a failure. Either
    way a half-open circuit's probe slot is given back, so the circuit never stays stuck."""
    if isinstance(e, Exception):
        lane.failures += 1
        lane.circuit.failure()
    else:  # asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit
        lane.circuit.neutral()


class LaneMux(BaseLM):
    """`LaneMux().add_lane("premium", lm).add_lane("local", other)`: an LM over named lanes."""

    provider = "lanemux"
    model = ""

    def __init__(self, **opts: Any) -> None:
        self._lanes: tuple[Lane, ...] = ()
        super().__init__(**opts)

    # -- builders ---------------------------------------------------------------------------
    def _extra_options(self) -> tuple[str, ...]:
        return ("policy", "lane", "rate_limit_wait")

    def _set(self, opts: dict[str, Any]) -> None:
        for k, v in opts.items():
            if k in _NOT_FOR_MUX:
                raise ConfigurationError(
                    f"{k!r} belongs to a lane's LM, not to the LaneMux", hint="set it on the LM you pass to add_lane"
                )
            if k == "policy":
                policies.resolve(v)
            if k == "lane" and v is not None and v not in self.names:
                raise ConfigurationError(f"no lane named {v!r}", hint="lanes: " + (", ".join(self.names) or "none"))
            if k == "budget" and v is not None and not isinstance(v, budgets.Budget):
                raise ConfigurationError(f"a budget must be a dsrs.Budget, got {v!r:.60}")
        super()._set(opts)

    def add_lane(
        self,
        name: str,
        lm: Any,
        *,
        budget: budgets.Budget | None = None,
        circuit: CircuitBreaker | None = None,
        **hints: Any,
    ) -> LaneMux:
        """A new mux with one more lane. Hints: cost_msats, latency_s, context_window, tools, json_schema, streaming."""
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a lane name must be a non-empty string, got {name!r}")
        if name in self.names:
            raise ConfigurationError(f"there is already a lane named {name!r}")
        if lm is self:
            raise ConfigurationError("a LaneMux cannot be its own lane")
        lane = Lane(name, lm, dict(hints), budget, circuit or CircuitBreaker())
        new: LaneMux = self._with()
        new._lanes = self._lanes + (lane,)
        return new

    def with_lane(self, name: str | None) -> LaneMux:
        """Pin calls to one lane (None: automatic selection again)."""
        return self._with(lane=name)

    def with_policy(self, policy: str | policies.Score) -> LaneMux:
        return self._with(policy=policy)

    def with_rate_limit_wait(self, seconds: float) -> LaneMux:
        return self._with(rate_limit_wait=float(seconds))

    @property
    def lanes(self) -> tuple[Lane, ...]:
        return self._lanes

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(lane.name for lane in self._lanes)

    def lane(self, name: str) -> Lane:
        for lane in self._lanes:
            if lane.name == name:
                return lane
        raise ConfigurationError(f"no lane named {name!r}", hint="lanes: " + (", ".join(self.names) or "none"))

    def __repr__(self) -> str:
        inner = ", ".join(f"{lane.name}={lane.lm!r}" for lane in self._lanes)
        pinned = self._opts.get("lane")
        return f"LaneMux({inner}{', lane=' + repr(pinned) if pinned else ''}, policy={self._policy_name()!r})"

    def _make_backend(self) -> Any:
        raise ConfigurationError("a LaneMux has no backend of its own; its lanes do")

    @classmethod
    async def auto_detect(cls, **kw: Any) -> LaneMux:
        """Lanes built from what this machine can reach (see dsrs.lanes.detect)."""
        from .detect import auto_detect

        return await auto_detect(**kw)

    # -- routing ----------------------------------------------------------------------------
    def _policy_name(self) -> str:
        p = self._opts.get("policy") or "priority"
        return p if isinstance(p, str) else getattr(p, "__name__", "custom")

    def _budgets(self) -> tuple[budgets.Budget, ...]:
        b = self._opts.get("budget")
        return (b,) if b is not None else ()

    def _plan(self, prompt: Input, opts: dict[str, Any], request: Callable[[], Request], d: RouteDecision) -> list[Lane]:
        if not self._lanes:
            raise ConfigurationError("this LaneMux has no lanes", hint="add_lane(name, lm) or await LaneMux.auto_detect()")
        pinned = self._opts.get("lane")
        policy = self._opts.get("policy") or "priority"
        if policy == "priority":  # the hot path: the order lanes were added
            lanes = list(self._lanes) if pinned is None else [lane for lane in self._lanes if lane.name == pinned]
            d.order = self.names if pinned is None else tuple(lane.name for lane in lanes)
            return lanes
        ok = []
        for i, lane in enumerate(self._lanes):
            if pinned is not None and lane.name != pinned:
                continue
            # the lane's own request (its options filling what the caller left unset), for scoring
            ok.append((i, lane, lane.lane_request(prompt, opts) or request()))
        ranked = policies.rank(ok, policy)
        d.candidates = [Candidate(lane.name, score) for score, _, lane in ranked]
        return [lane for _, _, lane in ranked]

    def _rate_limit_wait(self) -> float:
        w = self._opts.get("rate_limit_wait")
        return DEFAULT_RATE_LIMIT_WAIT if w is None else float(w)

    def _verdict(
        self, lane: Lane, e: DsrsError, n: int, left: int, queue: list[Lane], request: Callable[[], Request]
    ) -> tuple[str, float]:
        """What to do after lane `lane` failed with `e` on its attempt number `n` (0-based)."""
        pol = self._retry()
        spare = left > len(queue)  # retry this lane only with budget to spare for every lane still queued
        if isinstance(e, (BudgetExceededError, UnsupportedFeatureError)):
            lane.circuit.neutral()
            action, wait = "fallback", 0.0
        elif isinstance(e, ContextWindowExceededError):
            lane.circuit.neutral()
            req = request()
            need = typical_tokens(req) + (req.max_tokens or 0)
            have = lane.context_window or 0
            queue[:] = [q for q in queue if (q.context_window or 0) > max(have, need)]
            action, wait = "fallback", 0.0
        elif not e.fallback:
            lane.circuit.neutral()
            return "raise", 0.0
        elif isinstance(e, RateLimitError):
            lane.circuit.neutral()  # the lane works, it is busy: paused below instead of counted
            ra = e.retry_after
            wait_max = self._rate_limit_wait()
            if ra is not None and ra <= wait_max and n < lane.max_retries and spare:
                action, wait = "wait", ra
            elif ra is None and not queue and n < lane.max_retries and spare:
                action, wait = "retry", pol.delay(n, None)
            else:
                if ra is not None:
                    lane.pause(ra, lane.circuit.clock)
                action, wait = "fallback", 0.0
        else:
            lane.circuit.failure()
            ra = getattr(e, "retry_after", None)
            if ra is not None and any(q.circuit.state != "open" for q in queue):
                # a 5xx saying "come back later": another lane takes the call now (only a 429 waits)
                action, wait = "fallback", 0.0
            elif should_retry(e) and n < lane.max_retries and spare:  # the provider's own SDK rule (dsrs.retry)
                action, wait = "retry", pol.delay(n, ra, e.provider)
            else:
                action, wait = "fallback", 0.0
        if left <= 0 or (action == "fallback" and not queue):
            return "raise", 0.0
        return action, wait

    async def _route(
        self, prompt: Input, opts: dict[str, Any], req: Request | None, stream: bool,
        failed: tuple[Lane, DsrsError] | None = None,
    ) -> Any:
        """Route one call: `prompt` and the request options (the mux's, then the call's) go to the
        lanes as given, each lane filling in its own options; a `Request` is built only when needed
        (scoring, context-window checks), keeping the hot path as short as a single LM's.

        Returns the completion (its `route` set), or for a stream `(lane, (agen, first item), route)`.
        `failed`: the first lane's first attempt, already made by `_first`, and its error."""
        d = RouteDecision(self._policy_name(), self._opts.get("lane"))
        # No closures in this coroutine: captured variables would become cells, and every object
        # an in-flight call keeps alive is one more for the garbage collector to walk under load.
        request = _LazyRequest(self, prompt, opts, req).get
        queue = self._plan(prompt, opts, request, d)
        if not queue:
            raise self._none_available(d)
        extra = self._budgets()
        retries = self._opts.get("retries")
        left = len(self._lanes) + 1 if retries is None else retries  # attempts allowed after the first
        last: DsrsError | None = None
        while queue:
            lane = queue.pop(0)
            pending = failed[1] if failed is not None and failed[0] is lane else None
            failed = None
            # checked when the lane's turn comes: capability filters first, then availability
            if pending is None:
                why = lane.misfit(opts, request, stream) or lane.unavailable(partial(lane.lane_request, prompt, opts), extra)
                if why:
                    d.skip(lane.name, why)
                    continue
                if not lane.circuit.allow():
                    d.skip(lane.name, f"circuit {lane.circuit.state}: not taking calls now")
                    continue
            n = 0
            while True:
                started = time.perf_counter()
                try:
                    if pending is not None:  # the attempt `_first` made
                        error, pending = pending, None
                        raise error
                    lane.calls += 1
                    with budgets.scope(extra + lane.budgets_here if lane.budgets_here else extra):
                        if stream:
                            agen = lane.call_lm.astream(prompt, **opts)
                            if tracing.ON:
                                agen = tracing.lane_stream(lane, agen)
                            try:
                                first = await agen.__anext__()
                            except StopAsyncIteration:
                                raise ResponseFormatError("the lane's stream ended without a completion") from None
                            except BaseException:
                                await agen.aclose()
                                raise
                            result: Any = (agen, first)
                        else:
                            call = lane.call_lm.acall(prompt, **opts)
                            result = await (tracing.lane(lane, call) if tracing.ON else call)
                except DsrsError as e:
                    lane.failures += 1
                    last = e
                    action, wait = self._verdict(lane, e, n, left, queue, request)
                    d.attempts.append(Attempt(lane.name, action, f"{type(e).__name__}: {e}", wait, getattr(e, "route", None)))
                    if tracing.ON:
                        tracing.attempt(d.attempts[-1])
                    if action == "raise":
                        e.route = d  # type: ignore[attr-defined]
                        raise
                    left -= 1
                    if action == "fallback":
                        break
                    await self._retry().sleep(wait)
                    n += 1
                    continue
                except BaseException as e:
                    _ended_by(lane, e)
                    raise
                d.lane = lane.name
                if stream:
                    d.attempts.append(Attempt(lane.name, "ok"))
                else:
                    lane.circuit.success()
                    lane.latency.add(time.perf_counter() - started)
                    d.attempts.append(Attempt(lane.name, "ok", route=getattr(result, "route", None)))
                    result.route = d  # a fresh completion from the lane (cache hits are fresh copies too)
                    return result
                return lane, result, d
        if last is None:
            raise self._none_available(d)
        last.route = d  # type: ignore[attr-defined]
        raise last

    def _none_available(self, d: RouteDecision) -> DsrsError:
        why = d.skipped
        text = "; ".join(f"{k}: {v}" for k, v in why.items())
        err: DsrsError
        if any(v.startswith("budget:") for v in why.values()):  # more budget would have made a lane usable
            err = BudgetExceededError(f"no lane's budget covers this request ({text})", code="budget_exceeded",
                                      hint="raise a budget, lower max_tokens, or add a cheaper lane")  # fmt: skip
        else:
            err = NoLaneAvailableError(f"no lane can take this request ({text})", provider=self.provider,
                                       hint="add a lane, set the missing keys, or wait for circuits to close")  # fmt: skip
        err.route = d  # type: ignore[attr-defined]
        return err

    def _cache_key(self, req: Request) -> str:
        lanes = ",".join(f"{lane.name}={getattr(lane.lm, 'provider', '')}/{getattr(lane.lm, 'model', '')}" for lane in self._lanes)
        return cache_key(f"lanemux[{lanes}]", req)

    # -- calls ------------------------------------------------------------------------------
    def _call_opts(self, overrides: dict[str, Any]) -> dict[str, Any]:
        opts = {k: v for k, v in self._opts.items() if k in _REQUEST_FIELDS}
        if overrides:
            opts.update(overrides)
        return opts

    # `acall`/`acomplete` return the routing coroutine itself rather than awaiting it: every
    # suspension of an HTTP call resumes through each coroutine frame above it, so each frame
    # saved here is paid back several times per call.
    def acall(self, prompt: Input | None = None, *, messages: Input | None = None,
              **overrides: Any) -> Coroutine[Any, Any, Completion]:  # fmt: skip
        """Send one request through the lanes (awaitable, like every LM's `acall`)."""
        if messages is not None:
            prompt = _messages(prompt, messages)
        opts = self._call_opts(overrides)
        if self._opts.get("cache"):  # (a prompt of None is refused by the lane's LM, as a ConfigurationError)
            coro = self._cached(prompt, opts, None)  # type: ignore[arg-type]
        else:
            coro = self._start(prompt, opts, None)  # type: ignore[arg-type]
        timeout = self._opts.get("timeout")
        if timeout is not None:
            coro = self._within(coro, timeout)
        return tracing.route(self, coro) if tracing.ON else coro

    def acomplete(self, req: Request) -> Coroutine[Any, Any, Completion]:
        if self._opts.get("cache"):
            coro = self._cached(req.messages, _fields(req), req)
        else:
            coro = self._start(req.messages, _fields(req), req)
        timeout = self._opts.get("timeout")
        if timeout is not None:
            coro = self._within(coro, timeout)
        return tracing.route(self, coro) if tracing.ON else coro

    async def _within(self, coro: Coroutine[Any, Any, Completion], seconds: float) -> Completion:
        """`with_timeout(s)` on a mux bounds the whole routed call: every lane, retry and wait."""
        c: Completion = await self._bounded(coro, asyncio.get_running_loop().time() + seconds, seconds)
        return c

    async def _bounded(self, aw: Any, deadline: float, seconds: float) -> Any:
        cm = asyncio.timeout_at(deadline)
        try:
            async with cm:
                return await aw
        except builtins.TimeoutError:
            if not cm.expired():  # a lane's own timeout, raised as it is
                raise
            raise TimeoutError(
                f"the LaneMux call did not finish within {seconds:g} s (all lanes, retries and waits)",
                provider=self.provider, hint="raise the mux's with_timeout(...), or lower lane retries and timeouts",
            ) from None  # fmt: skip

    def _start(self, prompt: Input, opts: dict[str, Any], req: Request | None) -> Coroutine[Any, Any, Any]:
        """The routing coroutine for one call: `_first` when the first lane in priority order can
        simply be called (the common case), else the general `_route`."""
        lanes = self._lanes
        policy = self._opts.get("policy")
        if lanes and (policy is None or policy == "priority") and self._opts.get("lane") is None:
            lane = lanes[0]
            if lane.circuit.closed and not lane.misfit(opts, _LazyRequest(self, prompt, opts, req).get, False):
                if not lane.unavailable(partial(lane.lane_request, prompt, opts), self._budgets()):
                    return self._first(lane, prompt, opts, req)
        return self._route(prompt, opts, req, False)

    async def _first(self, lane: Lane, prompt: Input, opts: dict[str, Any], req: Request | None) -> Completion:
        """The fast path: call the first lane; on success build the route decision afterwards (an
        in-flight call keeps almost nothing alive for the GC); on failure hand over to `_route`."""
        started = time.perf_counter()
        lane.calls += 1
        extra = self._budgets()
        try:
            with budgets.scope(extra + lane.budgets_here if lane.budgets_here else extra):
                call = lane.call_lm.acall(prompt, **opts)
                result = await (tracing.lane(lane, call) if tracing.ON else call)
        except DsrsError as e:
            return await self._route(prompt, opts, req, False, (lane, e))  # type: ignore[no-any-return]
        except BaseException as e:
            _ended_by(lane, e)
            raise
        lane.circuit.success()
        lane.latency.add(time.perf_counter() - started)
        d = RouteDecision(self._policy_name(), None, lane=lane.name, order=self.names)
        d.attempts.append(Attempt(lane.name, "ok", route=getattr(result, "route", None)))
        result.route = d
        return result

    async def _cached(self, prompt: Input, opts: dict[str, Any], req: Request | None) -> Completion:
        cache = self._cache()
        req = req or self.request(prompt, **opts)
        key = self._cache_key(req)
        hit = cache.get(key)  # type: ignore[union-attr]
        if hit is not None:
            return replace(hit, route=RouteDecision(self._policy_name(), self._opts.get("lane"), cached=True))
        c: Completion = await self._route(prompt, opts, req, False)
        cache.put(key, c)  # type: ignore[union-attr]
        return c

    def astream(self, prompt: Input | None = None, *, messages: Input | None = None,
                **overrides: Any) -> AsyncIterator[str | StreamEnd]:  # fmt: skip
        """Deltas from the first lane that starts streaming; falls back only before the first chunk."""
        if messages is not None:
            prompt = _messages(prompt, messages)
        agen = self._routed_stream(prompt, overrides)
        return tracing.route_stream(self, agen) if tracing.ON else agen

    async def _routed_stream(self, prompt: Input | None, overrides: dict[str, Any]) -> AsyncIterator[str | StreamEnd]:
        timeout: float | None = self._opts.get("timeout")
        routed = self._route(prompt, self._call_opts(overrides), None, stream=True)  # type: ignore[arg-type]  # None: refused by the lane's LM
        deadline: float | None = None
        if timeout is None:
            lane, (agen, item), d = await routed
        else:  # the deadline covers routing and every later chunk
            deadline = asyncio.get_running_loop().time() + timeout
            lane, (agen, item), d = await self._bounded(routed, deadline, timeout)
        started = time.perf_counter()
        ended = False
        try:
            while True:
                if isinstance(item, StreamEnd):
                    ended = True
                    lane.circuit.success()
                    lane.latency.add(time.perf_counter() - started)
                    if lane.nested:
                        d.attempts[-1].route = item.completion.route
                    yield StreamEnd(replace(item.completion, route=d))
                    return
                yield item
                try:
                    nxt = agen.__anext__()
                    item = await (nxt if deadline is None else self._bounded(nxt, deadline, timeout or 0.0))
                except StopAsyncIteration:
                    ended = True
                    lane.circuit.failure()
                    raise ResponseFormatError("the lane's stream ended without its final usage") from None
                except DsrsError as e:
                    ended = True
                    if e.fallback:
                        lane.circuit.failure()
                    d.attempts.append(Attempt(lane.name, "raise", f"{type(e).__name__}: {e} (after the first chunk)"))
                    e.route = d  # type: ignore[attr-defined]
                    raise
        finally:
            if not ended:
                lane.circuit.neutral()
            await agen.aclose()


__all__ = ["LaneMux"]
