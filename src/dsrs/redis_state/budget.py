"""Budgets whose books live in Redis, booked by Lua scripts (`RedisBudget`)."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from ..budget import Budget, Reservation
from ..errors import BudgetExceededError, ConfigurationError
from .state import RedisState

log = logging.getLogger("dsrs.redis")

# KEYS[1]: the budget's counters (hash); KEYS[2]: open reservations (hash id -> amount).
# ARGV: limit, amount, unpriced, allow_unpriced, soft, id. Mirrors Budget.reserve line by line.
_RESERVE = """
local limit = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local unpriced = ARGV[3] == '1'
local allow = ARGV[4] == '1'
local soft = ARGV[5] == '1'
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local over = 0
if unpriced and not (allow or soft) then
  return {'unpriced', math.max(0, limit - spent - reserved)}
end
if (not unpriced) and spent + reserved + amount > limit then
  if not soft then return {'exceeded', math.max(0, limit - spent - reserved)} end
  over = 1
end
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
redis.call('HINCRBY', KEYS[1], 'open', 1)
if unpriced then redis.call('HINCRBY', KEYS[1], 'unpriced_calls', 1) end
redis.call('HSET', KEYS[2], ARGV[6], amount)
return {'ok', over}
"""
# ARGV: id, spent ('' = release). A second finish of one reservation is a no-op, as in-process.
# Returns the counters after it (what an outage starting next would book locally from).
_FINISH = """
local amount = redis.call('HGET', KEYS[2], ARGV[1])
if amount then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'reserved', 0 - tonumber(amount))
  redis.call('HINCRBY', KEYS[1], 'open', -1)
  if ARGV[2] == '' then
    redis.call('HINCRBY', KEYS[1], 'released', 1)
  else
    redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
    redis.call('HINCRBY', KEYS[1], 'calls', 1)
  end
end
return redis.call('HGETALL', KEYS[1])
"""
# What one process booked in-process while Redis was down, handed over in one step when it answers
# again. ARGV: spent, calls, released, unpriced_calls, then id, amount per reservation still open.
_SYNC = """
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'calls', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'released', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'unpriced_calls', ARGV[4])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[i + 1])
  redis.call('HINCRBY', KEYS[1], 'open', 1)
end
return redis.call('HGETALL', KEYS[1])
"""
_FIELDS = ("spent", "reserved", "open", "calls", "released", "unpriced_calls")
ON_DOWN = ("fail_closed", "local")


class RedisReservation(Reservation):
    __slots__ = ("rid",)

    def __init__(self, budget: Budget, amount: int, unpriced: bool, rid: str) -> None:
        super().__init__(budget, amount, unpriced)
        self.rid = rid


class RedisBudget(Budget):
    """A `Budget` shared by every process using the same Redis and `name`.

    The limit is this process's own (from its config); the books (spent, reserved, counts) are
    shared. `on_down`: "fail_closed" refuses calls while Redis is unreachable, "local" books them
    on an in-process budget of what was left at the last answer.
    """

    def __init__(self, state: RedisState, name: str, limit_msats: int, *, on_down: str = "fail_closed",
                 **kw: Any) -> None:  # fmt: skip
        if on_down not in ON_DOWN:
            raise ConfigurationError(f"unknown on_down {on_down!r} for budget {name!r}", hint="use " + " or ".join(ON_DOWN))
        if not name:
            raise ConfigurationError("a Redis budget needs a name (its key in Redis)")
        super().__init__(limit_msats, name=name, **kw)
        self.state = state
        self.on_down = on_down
        self._keys = (state.key("budget", name), state.key("budget", name, "open"))
        self._last: dict[str, int] = dict.fromkeys(_FIELDS, 0)
        self._local: Budget | None = None  # the in-process books while Redis is down ("local")
        self._local_open: dict[str, Reservation] = {}  # rid -> its booking on _local, not yet in Redis
        self._sync_lock = threading.RLock()  # guards _local and _local_open

    # Counts live in Redis; Budget.__init__ assigns these, which is ignored.
    calls = property(lambda self: self.state_counts()["calls"], lambda self, v: None)
    released = property(lambda self: self.state_counts()["released"], lambda self, v: None)
    unpriced_calls = property(lambda self: self.state_counts()["unpriced_calls"], lambda self, v: None)

    def state_counts(self) -> dict[str, int]:
        """spent, reserved, open, calls, released, unpriced_calls from Redis (last known when down)."""
        try:
            raw = self.state.call(lambda: self.state.client.hgetall(self._keys[0]))
        except self.state.errors:
            return dict(self._last)
        self._last = {f: int(raw.get(f, 0)) for f in _FIELDS}
        return dict(self._last)

    @property
    def spent_msats(self) -> int:
        return self.state_counts()["spent"]

    @property
    def reserved_msats(self) -> int:
        return self.state_counts()["reserved"]

    @property
    def open_reservations(self) -> int:
        return self.state_counts()["open"]

    @property
    def available_msats(self) -> int:
        c = self.state_counts()
        if not self.state.up:
            if self.on_down == "fail_closed":
                return 0
            return self._fallback().available_msats
        return max(0, self.limit_msats - c["spent"] - c["reserved"])

    def reset(self) -> None:
        """Forget all spending and open reservations of this budget in Redis (a new period)."""
        self.state.call(lambda: self.state.client.delete(*self._keys))

    def __repr__(self) -> str:
        c = self._last
        return (f"RedisBudget({self.limit_msats} msats {'soft' if self.soft else 'hard'}, {self.name!r}: "
                f"spent {c['spent']}, reserved {c['reserved']}, redis {'up' if self.state.up else 'down'})")  # fmt: skip

    def _fallback(self) -> Budget:
        with self._sync_lock:
            if self._local is None:
                left = max(0, self.limit_msats - self._last["spent"] - self._last["reserved"])
                self._local = Budget(left, soft=self.soft, on_soft_limit=self.on_soft_limit,
                                     allow_unpriced=self.allow_unpriced, name=f"{self.name} (local, Redis down)")  # fmt: skip
                log.warning("budget %r books locally on %d msats while Redis is down", self.name, left)
            return self._local

    def _remember(self, flat: list[Any]) -> None:
        """Keep the counters a script returned (HGETALL's flat list): a next outage starts from them."""
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        self._last = {f: int(raw.get(f, 0)) for f in _FIELDS}

    def _reserve_local(self, worst_case_msats: int | None) -> Reservation:
        """Book on the in-process budget (Redis down, on_down="local"); `_sync_local` hands it to Redis later."""
        with self._sync_lock:
            local = self._fallback().reserve(worst_case_msats)
            rid = uuid.uuid4().hex
            self._local_open[rid] = local
        return RedisReservation(self, local.amount, local.unpriced, rid)

    def _sync_local(self) -> None:
        """Before Redis books anything after an outage: add what was spent in-process meanwhile and the
        reservations still open to Redis (one atomic script), then drop the local books. Raises the
        Redis error when Redis is still down (the local books stay). A reply lost after the script ran
        would hand the figures over twice on the next try: counted twice, never lost."""
        if self._local is None:
            return
        with self._sync_lock:
            local = self._local
            if local is None:
                return
            args: list[Any] = [local.spent_msats, local.calls, local.released, local.unpriced_calls]
            for rid, r in self._local_open.items():
                args += [rid, r.amount]
            script = self.state.script("sync", _SYNC)
            self._remember(self.state.call(lambda: script(keys=self._keys, args=args)))
            self._local, self._local_open = None, {}
            log.warning("budget %r: handed %d msats spent and %d open reservations booked while Redis was down to Redis",
                        self.name, args[0], (len(args) - 4) // 2)  # fmt: skip

    def reserve(self, worst_case_msats: int | None) -> Reservation:
        unpriced = worst_case_msats is None
        amount = 0 if unpriced else int(worst_case_msats)  # type: ignore[arg-type]
        if amount < 0:
            raise ConfigurationError(f"a reservation cannot be negative ({amount})")
        rid = uuid.uuid4().hex
        args = (self.limit_msats, amount, int(unpriced), int(self.allow_unpriced), int(self.soft), rid)
        script = self.state.script("reserve", _RESERVE)
        try:
            self._sync_local()
            verdict, n = self.state.call(lambda: script(keys=self._keys, args=args))
        except self.state.errors:
            if self.on_down == "local":
                return self._reserve_local(worst_case_msats)
            raise BudgetExceededError(
                f"{self._label()} cannot be checked: Redis is unreachable, so the call is refused",
                limit_msats=self.limit_msats,
                needed_msats=amount,
                code="budget_unavailable",
                hint="bring Redis back, or set on_down = \"local\" to book in-process meanwhile",
            ) from None
        if verdict in ("unpriced", "exceeded"):
            raise self._refusal(verdict, amount, int(n))
        if int(n):
            self._soft_limit(amount)
        return RedisReservation(self, amount, unpriced, rid)

    def _finish(self, r: Reservation, spent: int | None) -> None:
        if r.done:
            return
        with self._sync_lock:
            local = self._local_open.pop(r.rid, None)  # type: ignore[attr-defined]
        if local is not None:  # booked in-process and not handed to Redis yet
            r.done = True
            local.budget._finish(local, spent)
            return
        r.done = True
        script = self.state.script("finish", _FINISH)
        try:
            self._remember(self.state.call(lambda: script(keys=self._keys, args=(r.rid, "" if spent is None else int(spent)))))  # type: ignore[attr-defined]
        except self.state.errors:
            log.warning("budget %r: could not settle a reservation of %d msats (Redis down); it stays reserved",
                        self.name, r.amount)  # fmt: skip
