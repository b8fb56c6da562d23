"""One lane of a LaneMux: a name, an LM, hints, and the lane's health (circuit, latency, rate-limit pause)."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import budget as budgets
from ..errors import ConfigurationError, DsrsError
from ..lm import BaseLM, Input, to_messages
from ..types import Completion, Request, StreamEnd
from .circuit import CircuitBreaker

# Hints a lane may carry (each overrides what the LM itself says).
HINTS = ("cost_msats", "latency_s", "context_window", "tools", "json_schema", "streaming")
EWMA_ALPHA = 0.3


class Ewma:
    """Exponentially weighted moving average of observed latency, in seconds (a racing update from
    another thread may be lost: an estimate, kept lock-free on the hot path)."""

    def __init__(self, alpha: float = EWMA_ALPHA) -> None:
        self.alpha = alpha
        self.value: float | None = None
        self.samples = 0

    def add(self, x: float) -> None:
        v = self.value
        self.value = x if v is None else self.alpha * x + (1 - self.alpha) * v
        self.samples += 1


@dataclass(eq=False)
class Lane:
    name: str
    lm: Any
    hints: dict[str, Any] = field(default_factory=dict)
    budget: budgets.Budget | None = None
    circuit: CircuitBreaker = field(default_factory=CircuitBreaker)
    latency: Ewma = field(default_factory=Ewma)
    paused_until: float = 0.0  # a rate limit with a long Retry-After: skip the lane until then
    calls: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        from .mux import LaneMux

        self.nested = isinstance(self.lm, LaneMux)
        self.budgets_here: tuple[budgets.Budget, ...] = (self.budget,) if self.budget is not None else ()
        self.context_window: int | None = self.hints.get("context_window") or self.lm_options.get("num_ctx")
        self._backed = not self.nested and hasattr(self.lm, "_make_backend") and hasattr(self.lm, "_backend_obj")
        for k in self.hints:
            if k not in HINTS:
                raise ConfigurationError(f"unknown lane hint {k!r} for lane {self.name!r}", hint="known: " + ", ".join(HINTS))
        if not callable(getattr(self.lm, "acall", None)) or not callable(getattr(self.lm, "astream", None)):
            raise ConfigurationError(
                f"lane {self.name!r}: {self.lm!r:.80} is not an LM", hint="pass an LM, CodexSdkLM, PylonLM or LaneMux"
            )
        # The mux owns retries (one budget for retries and fallbacks): the lane's LM is called with
        # its own retries off, and its retry count says how often the mux may retry this lane.
        policy = getattr(self.lm, "_retry", None)
        self.max_retries: int = policy().max_retries if policy and not self.nested else 0
        with_retries = getattr(self.lm, "with_retries", None)
        self.call_lm = with_retries(0) if with_retries and not self.nested else self.lm
        if not self.nested and not isinstance(self.lm, BaseLM):
            self.call_lm = Budgeted(self.call_lm)  # an LM of the user's own: the lane books its budgets


    # -- what the lane can do ---------------------------------------------------------------
    def can(self, what: str) -> bool:
        if what in self.hints:
            return bool(self.hints[what])
        service = getattr(self.lm, "service", None)
        return bool(getattr(service, what, True))


    @property
    def lm_options(self) -> dict[str, Any]:
        opts = getattr(self.lm, "_opts", None)  # BaseLM's, without the copy `.options` makes
        return opts if opts is not None else (getattr(self.lm, "options", None) or {})

    def lane_request(self, prompt: Any, opts: dict[str, Any]) -> Request | None:
        """The request this lane's LM would send (its own options filling what `opts` leaves unset)."""
        req = getattr(self.call_lm, "request", None)
        return req(prompt, **opts) if req and not self.nested else None

    def misfit(self, opts: dict[str, Any], request: Callable[[], Request], stream: bool) -> str | None:
        """Why this lane cannot do the request at all (capability filters). `opts`: the request
        options the call sets; `request()` builds the whole request when the check needs it."""
        tools, rf = opts.get("tools"), opts.get("response_format") or {}
        rf = {"type": "json_schema"} if isinstance(rf, type) else rf  # a pydantic model class (see convert)
        if not (tools or rf or stream or self.context_window):
            return None
        if tools and not self.can("tools"):
            return "does not support tools"
        if rf.get("type") == "json_schema" and not self.can("json_schema"):
            return "does not support structured (JSON-schema) output"
        if stream and not self.can("streaming"):
            return "does not stream"
        ctx = self.context_window
        if ctx:
            req = request()
            need = typical_tokens(req) + (req.max_tokens or 0)
            if need > ctx:
                return f"needs about {need} tokens, context window is {ctx}"
        return None

    def unavailable(self, lane_req: Callable[[], Request | None], extra: tuple[budgets.Budget, ...] = ()) -> str | None:
        """Why this lane cannot take a request right now (key, circuit, rate limit, budget).

        `extra`: budgets from above (the mux's) that apply besides the lane's own."""
        if self._backed and self.call_lm._backend_obj is None:
            try:
                self.call_lm.backend  # noqa: B018 - builds the backend once: a missing key shows here
            except DsrsError as e:
                return f"unavailable: {e.message}" + (f" ({e.hint})" if e.hint else "")
        if not self.circuit.closed and self.circuit.state == "open":
            return f"circuit open (probe in {self.circuit.retry_in():.1f}s)"
        if self.paused_until:
            now = self.circuit.clock()
            if now < self.paused_until:
                return f"rate limited for {self.paused_until - now:.1f}s more"
        if not self.nested:
            found = budgets.applicable(self.call_lm, extra + self.budgets_here if self.budgets_here else extra)
            if found:
                why = budgets.refusal(self.call_lm, lane_req() or Request(self.lm.model, ()), found)
                if why:
                    return f"budget: {why}"
        return None


    def pause(self, seconds: float, clock: Any = time.monotonic) -> None:
        self.paused_until = max(self.paused_until, clock() + seconds)


def typical_tokens(req: Request) -> int:
    """A typical (not worst-case) prompt size: ~4 UTF-8 bytes per token, for context-window fits."""
    size = sum(len(m.content.encode("utf-8")) for m in req.messages)
    return math.ceil(size / 4) + 4 * len(req.messages)


_REQUEST_OPTIONS = ("max_tokens", "temperature", "top_p", "seed", "stop", "num_ctx", "tools", "tool_choice",
                    "response_format", "extra")  # fmt: skip


class Budgeted:
    """A lane's LM of the user's own (anything with `acall`/`astream` that is not a dsrs `BaseLM`, which
    books its budgets itself): every budget that applies is reserved around each call by the same
    rules as any LM's (`dsrs.budget`), from the worst case of its `provider`/`model` (or its own
    `worst_case_msats(req)`), and settled to the answer's `usage.cost_msats` (unknown: the worst case
    is kept). An LM whose price is unknown is refused by a hard budget unless it allows unpriced calls."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.provider: str = getattr(lm, "provider", "") or ""
        self.model: str = getattr(lm, "model", "") or ""
        own = getattr(lm, "worst_case_msats", None)
        if own is not None:
            self.worst_case_msats = own

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lm, name)

    def __repr__(self) -> str:
        return f"Budgeted({self.lm!r})"

    def request(self, prompt: Input, **opts: Any) -> Request:
        own = getattr(self.lm, "request", None)
        if callable(own):
            return own(prompt, **opts)  # type: ignore[no-any-return]
        fields = {k: v for k, v in opts.items() if k in _REQUEST_OPTIONS}
        stop = fields.get("stop")
        if isinstance(stop, str):
            fields["stop"] = (stop,)
        return Request(self.model, to_messages(prompt), **fields)

    def _hold(self, prompt: Input, opts: dict[str, Any]) -> budgets.Hold:
        found = budgets.applicable(self.lm)
        return budgets.reserve(self, self.request(prompt, **opts), found) if found else budgets.NO_HOLD

    async def acall(self, prompt: Input, **opts: Any) -> Completion:
        hold = self._hold(prompt, opts)
        try:
            c = await self.lm.acall(prompt, **opts)
        except BaseException as e:
            hold.fail(e)
            raise
        hold.settle(getattr(c, "usage", None))
        return c  # type: ignore[no-any-return]

    async def astream(self, prompt: Input, **opts: Any) -> AsyncIterator[Any]:
        hold = self._hold(prompt, opts)
        agen = self.lm.astream(prompt, **opts)
        try:
            async for item in agen:
                if isinstance(item, StreamEnd):
                    hold.settle(item.usage)
                yield item
        except BaseException as e:
            hold.fail(e)
            raise
        finally:
            hold.keep()  # no-op once settled; a stream that ended without its usage keeps the worst case
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()
