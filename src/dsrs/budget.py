"""Budgets in msats: reserve the worst case before a call, settle to the actual cost, release on failure.

A `Budget` is attached to an LM (`lm.with_budget(b)`), to a lane (`mux.add_lane(..., budget=b)`,
or `mux.with_budget(b)` for all lanes), or globally / per program (`dsrs.configure(budget=b)`,
`with dsrs.context(budget=b): ...`). Every budget that applies to a call is reserved, all or
nothing, by `guard`, which `BaseLM` runs once around every call (after the cache, around the
retries): so a budget is checked where the provider and model, hence the price, are known.

Rules (each one a decision):

- **Atomic.** `reserve` checks and books under a `threading.Lock` with no await inside, so no
  interleaving of asyncio tasks or threads can book past the limit: `spent + reserved <= limit`
  holds for hard budgets whenever the provider charged no more than the worst case.
- **Worst case** = every prompt token uncached plus the most output the request allows, at list
  price, unless the LM prices itself (`lm.worst_case_msats(req)`, e.g. a swarm bid): the bounds
  are in `dsrs.worst_case`. Set `max_tokens` to make budgets tight.
- **Hard limit**: `BudgetExceededError` before anything is sent. **Soft limit** (`soft=True`):
  the call goes ahead and `on_soft_limit(budget, needed_msats)` is called (default: a logged
  warning); a callback that raises stops the call before anything is sent, nothing booked.
- **Unknown price** (a model not in the price table, or an LM that cannot bound a call, such as
  a Codex CLI turn): a hard budget refuses the call (`BudgetExceededError`, code `unpriced`) unless
  the budget was made with `allow_unpriced=True`, in which case the call reserves 0, settles to its
  actual cost when known, and is counted in `unpriced_calls`. Free local models price at 0.
- **One reservation per attempt.** `BaseLM` reserves before each try (retries included) and ends
  each reservation when that try ends: a try that timed out keeps its worst case even when a later
  retry succeeds, exactly as when a LaneMux falls back to another lane.
- **Settle**: to `usage.cost_msats`, after pricing and before any usage hook runs (a hook that
  raises cannot undo the booking). An unknown actual cost (`None`) keeps the whole reservation. A
  provider charging more than the worst case is recorded as spent all the same (the truth), which
  can leave the budget over its limit: later calls are then refused.
- **Failure**: only an error that proves nothing was billed releases the reservation: one raised
  before anything was sent (`ConfigurationError`, a budget refusal, a connection that never
  opened) or an error answer over HTTP (status >= 400; such errors carry `billed = False`). An
  error that says what the failed call already cost (an int `spent_msats`, e.g. a swarm job paid
  and then failed) settles to that amount; one with `spent_unknown = True` keeps the worst case.
  **Everything else keeps the worst case**, since the provider may have done and billed the work:
  timeouts, resets, undecodable answers, error objects inside a 200 answer or a stream, exceptions
  from our own code, cancellation, and a stream the caller abandons (the provider may go on
  generating after the disconnect, reasoning and tool-call arguments included; what was in flight
  is unknowable).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from .errors import BudgetExceededError, ConfigurationError
from .settings import current
from .types import Request
from .worst_case import lm_worst_case

log = logging.getLogger("dsrs.budget")

class Reservation:
    """Money booked on one budget for one call: `settle(actual)` or `release()`, once."""

    __slots__ = ("budget", "amount", "unpriced", "done")

    def __init__(self, budget: Budget, amount: int, unpriced: bool) -> None:
        self.budget = budget
        self.amount = amount
        self.unpriced = unpriced
        self.done = False

    def settle(self, actual_msats: int | None) -> None:
        """Turn the booking into spending: `actual_msats`, or the whole reservation when unknown."""
        self.budget._finish(self, self.amount if actual_msats is None else int(actual_msats))

    def release(self) -> None:
        """Nothing was spent: give the booking back."""
        self.budget._finish(self, None)

    def __repr__(self) -> str:
        return f"Reservation({self.amount} msats, {'done' if self.done else 'open'})"


class Budget:
    """A spending limit in msats, shared by any number of concurrent calls (tasks or threads)."""

    def __init__(
        self,
        limit_msats: int,
        *,
        soft: bool = False,
        on_soft_limit: Callable[[Budget, int], None] | None = None,
        allow_unpriced: bool = False,
        name: str | None = None,
    ) -> None:
        if isinstance(limit_msats, bool) or not isinstance(limit_msats, int) or limit_msats < 0:
            raise ConfigurationError(
                f"a budget limit must be a non-negative int of msats, got {limit_msats!r}",
                hint="Budget(10_000) is 10 sats",
            )
        self.limit_msats = limit_msats
        self.soft = soft
        self.on_soft_limit = on_soft_limit
        self.allow_unpriced = allow_unpriced
        self.name = name
        self._lock = threading.Lock()
        self._spent = 0
        self._reserved = 0
        self._open = 0
        self.calls = 0  # settled reservations
        self.released = 0  # released reservations
        self.unpriced_calls = 0

    # -- state ------------------------------------------------------------------------------
    @property
    def spent_msats(self) -> int:
        return self._spent

    @property
    def reserved_msats(self) -> int:
        return self._reserved

    @property
    def open_reservations(self) -> int:
        return self._open

    @property
    def available_msats(self) -> int:
        with self._lock:
            return max(0, self.limit_msats - self._spent - self._reserved)

    def can_cover(self, worst_case_msats: int | None) -> str | None:
        """Why this budget would refuse a call with this worst case now, or None if it would not."""
        if self.soft:
            return None
        if worst_case_msats is None:
            return None if self.allow_unpriced else "its price is unknown (Budget(..., allow_unpriced=True) allows it)"
        avail = self.available_msats
        if worst_case_msats > avail:
            return f"worst case {worst_case_msats} msats > {avail} msats left of {self._label()}"
        return None

    def _label(self) -> str:
        return f"budget {self.name!r}" if self.name else f"budget {self.limit_msats} msats"

    def __repr__(self) -> str:
        kind = "soft" if self.soft else "hard"
        return (
            f"Budget({self.limit_msats} msats {kind}{', ' + repr(self.name) if self.name else ''}: "
            f"spent {self._spent}, reserved {self._reserved})"
        )

    # -- booking ----------------------------------------------------------------------------
    def reserve(self, worst_case_msats: int | None) -> Reservation:
        """Book the worst case of one call, or raise `BudgetExceededError` (hard limits only)."""
        unpriced = worst_case_msats is None
        amount = 0 if unpriced else int(worst_case_msats)  # type: ignore[arg-type]
        if amount < 0:
            raise ConfigurationError(f"a reservation cannot be negative ({amount})")
        over = False
        with self._lock:
            if unpriced and not (self.allow_unpriced or self.soft):
                refused = "unpriced"
            elif not unpriced and self._spent + self._reserved + amount > self.limit_msats:
                refused = "" if self.soft else "exceeded"
                over = True
            else:
                refused = ""
            if not refused:
                self._reserved += amount
                self._open += 1
                if unpriced:
                    self.unpriced_calls += 1
            left = max(0, self.limit_msats - self._spent - self._reserved)
        if refused:
            raise self._refusal(refused, amount, left)
        r = Reservation(self, amount, unpriced)
        return self._over_soft_limit(r) if over else r

    def _refusal(self, verdict: str, amount: int, left: int) -> BudgetExceededError:
        """The error for a refused reservation: `verdict` "unpriced" or "exceeded" (`left` msats left)."""
        if verdict == "unpriced":
            return BudgetExceededError(
                f"{self._label()} cannot bound this call's cost: the model is not in the price table, "
                "or the LM cannot bound a call (a Codex CLI turn makes as many requests as it needs)",
                limit_msats=self.limit_msats,
                code="unpriced",
                hint="use a priced model, set usage pricing, or allow unpriced calls "
                "(Budget(..., allow_unpriced=True); allow_unpriced = true in a gateway config)",
            )
        return BudgetExceededError(
            f"{self._label()} cannot cover this call: worst case {amount} msats, {left} msats left",
            limit_msats=self.limit_msats,
            needed_msats=amount,
            code="budget_exceeded",
            hint="raise the limit, lower max_tokens, or use a cheaper lane",
        )

    def _over_soft_limit(self, r: Reservation) -> Reservation:
        """Tell `on_soft_limit` (default: a warning); a callback that raises stops the call before
        anything is sent, and nothing stays booked."""
        try:
            if self.on_soft_limit is not None:
                self.on_soft_limit(self, r.amount)
            else:
                log.warning("%s is over its soft limit (call needs up to %d msats)", self._label(), r.amount)
        except BaseException:
            r.release()
            raise
        return r

    def _finish(self, r: Reservation, spent: int | None) -> None:
        with self._lock:
            if r.done:
                return
            r.done = True
            self._reserved -= r.amount
            self._open -= 1
            if spent is None:
                self.released += 1
            else:
                self._spent += spent
                self.calls += 1


# -- the hook BaseLM calls -----------------------------------------------------------------------
_scoped: contextvars.ContextVar[tuple[Budget, ...]] = contextvars.ContextVar("dsrs_budgets", default=())


class _Scope:
    __slots__ = ("budgets", "token")

    def __init__(self, budgets: tuple[Budget, ...]) -> None:
        self.budgets = budgets

    def __enter__(self) -> None:
        self.token = _scoped.set(_scoped.get() + self.budgets)

    def __exit__(self, *exc: object) -> None:
        _scoped.reset(self.token)


_NO_SCOPE = contextlib.nullcontext()


def scope(budgets: Sequence[Budget]) -> contextlib.AbstractContextManager[None]:
    """Apply `budgets` to every LM call made inside this `with` block (how lanes pass theirs down)."""
    return _Scope(tuple(budgets)) if budgets else _NO_SCOPE


def applicable(lm: Any, extra: Sequence[Budget] = ()) -> tuple[Budget, ...]:
    """Every budget a call on `lm` here (plus `extra`) must reserve against, each once."""
    opts = getattr(lm, "_opts", None)  # BaseLM's options without the copy `.options` makes
    if opts is None:
        opts = getattr(lm, "options", None) or {}
    own, scoped, glob = opts.get("budget"), _scoped.get(), current().budget
    if own is None and not scoped and not extra and glob is None:
        return ()
    found: list[Budget] = []
    for b in (own, *extra, *scoped, glob):
        if b is not None and all(b is not x for x in found):
            if not isinstance(b, Budget):
                raise ConfigurationError(f"a budget must be a dsrs.Budget, got {b!r:.60}")
            found.append(b)
    return tuple(found)


def refusal(lm: Any, req: Request, budgets: Sequence[Budget] | None = None) -> str | None:
    """Why some budget would refuse `req` on `lm` right now (a LaneMux skip reason), or None."""
    budgets = applicable(lm) if budgets is None else budgets
    if not budgets:
        return None
    wc = lm_worst_case(lm, req)
    for b in budgets:
        why = b.can_cover(wc)
        if why:
            return why
    return None


class Hold:
    """The reservations of one attempt of one call on every budget that applies.

    Made by `reserve(lm, req, budgets)` just before the request goes out; ended exactly once by
    `settle(usage)` (the answer came) or `fail(error)` (the rules in the module notes).
    """

    __slots__ = ("reservations",)

    def __init__(self, reservations: list[Reservation]) -> None:
        self.reservations = reservations

    def settle(self, usage: Any) -> None:
        self.settle_msats(getattr(usage, "cost_msats", None))

    def settle_msats(self, cost: int | None) -> None:
        """Spent `cost` msats on every budget (None: unknown, the whole reservation is kept)."""
        for r in self.reservations:
            r.settle(cost)

    def release(self) -> None:
        for r in self.reservations:
            r.release()

    def keep(self) -> None:
        for r in self.reservations:
            r.settle(None)

    def fail(self, e: BaseException) -> None:
        """The attempt ended with `e`: book what the provider may have billed."""
        spent = getattr(e, "spent_msats", None)
        if getattr(e, "spent_unknown", False):
            self.keep()
        elif isinstance(spent, int) and not isinstance(spent, bool):
            self.settle_msats(spent)
        elif not_billed(e):
            self.release()
        else:  # anything else after the request may have left: outcome unknown, the worst case stays
            self.keep()


NO_HOLD = Hold([])  # the hold when no budget applies: nothing to book


def not_billed(e: BaseException) -> bool:
    """Does `e` prove the provider billed nothing? Only errors raised before anything was sent
    (bad settings, budget refusals, no connection) and error answers over HTTP (status >= 400) do;
    everything else after a request left (timeouts, resets, undecodable or in-band error answers,
    exceptions from hooks or our own code) may have been billed."""
    return isinstance(e, (ConfigurationError, BudgetExceededError)) or getattr(e, "billed", None) is False


def reserve(lm: Any, req: Request, budgets: Sequence[Budget]) -> Hold:
    """Reserve `req`'s worst case on `lm` against every budget in `budgets`, all or nothing."""
    wc = lm_worst_case(lm, req)
    held: list[Reservation] = []
    try:
        for b in budgets:
            held.append(b.reserve(wc))
    except BaseException as e:
        for r in held:
            r.release()
        if isinstance(e, BudgetExceededError):
            e.provider, e.model = e.provider or lm.provider or None, e.model or lm.model or None
            e.args = (str(e),)
        raise
    return Hold(held)


class _NoGuard:
    """`guard` when no budget applies: nothing to reserve or undo."""

    __slots__ = ()

    async def __aenter__(self) -> Hold:
        return NO_HOLD

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_GUARD = _NoGuard()


def guard(lm: Any, req: Request) -> contextlib.AbstractAsyncContextManager[Hold]:
    """`async with guard(lm, req) as hold:` reserves on every budget that applies to `lm`, and on
    leaving settles by the rules above (`hold.settle(usage)` inside the block books the answer).
    For code that calls a provider itself; `BaseLM` uses `reserve` and `Hold` per attempt."""
    budgets = applicable(lm)
    if not budgets:
        return _NO_GUARD
    return _guard(lm, req, budgets)


@contextlib.asynccontextmanager
async def _guard(lm: Any, req: Request, budgets: tuple[Budget, ...]) -> AsyncIterator[Hold]:
    hold = reserve(lm, req, budgets)
    try:
        yield hold
    except BaseException as e:
        hold.fail(e)
        raise
    else:
        hold.keep()  # no-op when the call settled; otherwise the cost is unknown
