"""Budgets whose books live in Redis, booked by Lua scripts (`RedisBudget`).

What keeps a Redis budget from being overspent when Redis fails (each one a decision):

- **Books.** One hash per budget (`dsrs:budget:<name>`): spent, reserved, open, calls, released,
  unpriced_calls, `held` (outage allowances, below), `expired`, an `epoch` (a random id written
  when the books are created) and `seq` (bumped by every script). Open reservations sit in
  `...:open` (id -> msats) with a deadline each in `...:leases`. Every script checks that the
  books are the ones this client knew (same epoch, seq not lower than it last saw) before booking.
- **Redis down, `on_down="fail_closed"`** (default): every call is refused (`BudgetExceededError`
  code `budget_unavailable`).
- **Redis down, `on_down="local"`**: a process may spend, in-process, only money Redis had already
  set aside for it: its *outage allowance* (`outage_msats`, default a tenth of the limit), held
  in Redis (`held`) while Redis answers, so no other process can book it. The process's own
  calls may use its allowance when the shared pool runs dry (the allowance then shrinks), so the
  whole limit stays usable. So what all processes spend during an outage is at most the sum of
  their allowances, which Redis counted: `spent + reserved + held <= limit` at all times. A
  process that never heard from Redis has no allowance and refuses calls. When Redis answers
  again, what was spent in-process and the reservations still open go to Redis in one script.
- **Settles that cannot reach Redis** are kept by the process and handed over with the next script
  that reaches Redis (in-flight reservations at an outage are never stuck reserved by a live
  process). **Reservations of a process that died** expire after `lease_s` (default 600 s): Redis
  books their whole amount as spent (the call may have been billed) and keeps a note; a settle
  arriving after that corrects the booking to the actual cost (a release takes it back). An
  allowance whose process stopped talking to Redis for `lease_s` is booked as spent the same way
  (the process may be cut off and spending it) and given back when that process returns. Expiry
  never frees money that may have been spent.
- **Redis restarted empty, or from an old snapshot**: a client that knew the books (their epoch
  and seq) finds them missing, re-created or behind what it saw. It marks the books lost in Redis
  (so every process, new ones too, refuses) and refuses calls with code `budget_unavailable`
  (`on_down="local"`: books on its allowance as if Redis were down) until an operator calls
  `RedisBudget.restore(spent_msats)` with what was really spent (the providers' bills, the usage
  ledger), or `reset()` for a new period. Settles for reservations the lost books no longer know
  still book their spend. What survives a restart is what Redis persisted: run Redis with
  `appendonly yes` (`appendfsync always` loses nothing; `everysec` up to a second, which the
  seq check catches only while a process that saw the lost writes is running). Books that vanish
  while no dsrs process that knew them is running cannot be told from a new budget.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from ..budget import Budget, Reservation
from ..errors import APIConnectionError, BudgetExceededError, ConfigurationError
from .state import RedisState

log = logging.getLogger("dsrs.redis")

# Every script starts with this. KEYS: books (hash), open (hash id -> msats; '@'..owner -> allowance),
# leases (zset id -> deadline in ms), swept (hash id -> msats booked as spent at expiry).
# ARGV[1..8]: epoch known ('' none), seq known, epoch to create, owner, lease ms, limit,
# allowance target, op. Returns early {'lost', why} when the books are not the ones this client knew.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes on Redis < 5
local B, O, L, S = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local known, owner, lease = ARGV[1], ARGV[4], tonumber(ARGV[5])
local limit, target = tonumber(ARGV[6]), tonumber(ARGV[7])
local function num(f) return tonumber(redis.call('HGET', B, f) or '0') end
local function add(f, n) if n ~= 0 then redis.call('HINCRBY', B, f, n) end end
local lost = redis.call('HGET', B, 'lost')
if lost then return {'lost', lost} end
local epoch = redis.call('HGET', B, 'epoch')
local why = nil
if not epoch then
  if known ~= '' then why = 'Redis no longer has these books (restarted empty, or the key was deleted)' end
elseif known ~= '' and epoch ~= known then
  if redis.call('HGET', B, 'restored') ~= epoch then why = 'the books were re-created after Redis lost them' end
elseif known ~= '' and num('seq') < tonumber(ARGV[2]) then
  why = 'the books went back in time (Redis restarted from an old snapshot)'
end
if why then
  redis.call('HSET', B, 'lost', why)
  return {'lost', why}
end
if not epoch then redis.call('HSET', B, 'epoch', ARGV[3], 'seq', 0) end
add('seq', 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', L, '-inf', now)) do
  local a = tonumber(redis.call('HGET', O, id) or '0')
  redis.call('ZREM', L, id)
  redis.call('HDEL', O, id)
  redis.call('HSET', S, id, a)
  add('spent', a)
  if string.sub(id, 1, 1) == '@' then add('held', -a) else
    add('reserved', -a); add('open', -1); add('calls', 1); add('expired', 1)
  end
end
local mine = '@' .. owner
local function finish(id, how)  -- how: '' release, else msats spent
  local a = redis.call('HGET', O, id)
  if a then
    a = tonumber(a)
    redis.call('HDEL', O, id); redis.call('ZREM', L, id)
    add('reserved', -a); add('open', -1)
    if how == '' then add('released', 1) else add('spent', tonumber(how)); add('calls', 1) end
    return
  end
  a = redis.call('HGET', S, id)
  if a then  -- expired, booked as spent: correct it to the truth
    redis.call('HDEL', S, id); add('expired', -1)
    if how == '' then add('spent', -tonumber(a)); add('calls', -1); add('released', 1)
    else add('spent', tonumber(how) - tonumber(a)) end
  elseif how ~= '' then  -- a reservation the books lost (restored since): its spend still counts
    add('spent', tonumber(how)); add('calls', 1)
  end
end
local function allowance()  -- this process's outage allowance, resized to what is free
  local own = tonumber(redis.call('HGET', O, mine) or '0')
  local back = redis.call('HGET', S, mine)
  if back then redis.call('HDEL', S, mine); add('spent', -tonumber(back)) end
  if target == 0 and own == 0 then return 0 end
  local free = limit - num('spent') - num('reserved') - (num('held') - own)
  local new = math.max(0, math.min(target, free))
  add('held', new - own)
  if new > 0 then
    redis.call('HSET', O, mine, new); redis.call('ZADD', L, now + lease, mine)
  else
    redis.call('HDEL', O, mine); redis.call('ZREM', L, mine)
  end
  return new
end
local function answer(verdict, n)
  return {verdict, n, allowance(), redis.call('HGETALL', B)}
end
"""
# ARGV[9..]: amount, unpriced, allow_unpriced, soft, id. Mirrors Budget.reserve line by line; an
# own allowance counts as free for this process.
_RESERVE = _PRELUDE + """
local amount = tonumber(ARGV[9])
local unpriced, allow, soft = ARGV[10] == '1', ARGV[11] == '1', ARGV[12] == '1'
local own = tonumber(redis.call('HGET', O, mine) or '0')
local left = math.max(0, limit - num('spent') - num('reserved') - num('held') + own)
if unpriced and not (allow or soft) then return answer('unpriced', left) end
local over = 0
if (not unpriced) and amount > left then
  if not soft then return answer('exceeded', left) end
  over = 1
end
add('reserved', amount); add('open', 1)
if unpriced then add('unpriced_calls', 1) end
redis.call('HSET', O, ARGV[13], amount); redis.call('ZADD', L, now + lease, ARGV[13])
return answer('ok', over)
"""
# What this process could not book in Redis, handed over in one step. ARGV[9..12]: spent, calls,
# released, unpriced_calls booked in-process; ARGV[13]: the number of settles kept back, then
# (id, how) per settle, then (id, msats) per reservation still open in-process. A lost reply
# means a second hand-over: counted twice, never lost.
_SYNC = _PRELUDE + """
add('spent', tonumber(ARGV[9])); add('calls', tonumber(ARGV[10]))
add('released', tonumber(ARGV[11])); add('unpriced_calls', tonumber(ARGV[12]))
local n = tonumber(ARGV[13])
for i = 14, 13 + 2 * n, 2 do finish(ARGV[i], ARGV[i + 1]) end
for i = 14 + 2 * n, #ARGV, 2 do
  redis.call('HSET', O, ARGV[i], ARGV[i + 1]); redis.call('ZADD', L, now + lease, ARGV[i])
  add('reserved', tonumber(ARGV[i + 1])); add('open', 1)
end
return answer('ok', 0)
"""
# Operator: new books (a new epoch every client accepts) with `spent` msats spent. ARGV[9]: spent.
_RESTORE = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'restored', ARGV[3], 'seq', 0, 'spent', ARGV[9])
return 'ok'
"""
_FIELDS = ("spent", "reserved", "open", "calls", "released", "unpriced_calls", "held", "expired")
ON_DOWN = ("fail_closed", "local")


class RedisReservation(Reservation):
    __slots__ = ("rid",)

    def __init__(self, budget: Budget, amount: int, unpriced: bool, rid: str) -> None:
        super().__init__(budget, amount, unpriced)
        self.rid = rid


class _Lost(Exception):
    """The books in Redis are not the ones this client knew (see the module notes)."""


class RedisBudget(Budget):
    """A `Budget` shared by every process using the same Redis and `name`.

    The limit is this process's own (from its config); the books (spent, reserved, counts) are
    shared. `on_down`: "fail_closed" refuses calls while Redis is unreachable or has lost the books;
    "local" books them in-process on this process's outage allowance (`outage_msats`, default a
    tenth of the limit), set aside in Redis while it answers. `lease_s`: after how long the
    reservations of a process that stopped talking to Redis are booked as spent.
    """

    def __init__(self, state: RedisState, name: str, limit_msats: int, *, on_down: str = "fail_closed",
                 outage_msats: int | None = None, lease_s: float = 600.0, **kw: Any) -> None:  # fmt: skip
        if on_down not in ON_DOWN:
            raise ConfigurationError(f"unknown on_down {on_down!r} for budget {name!r}", hint="use " + " or ".join(ON_DOWN))
        if not name:
            raise ConfigurationError("a Redis budget needs a name (its key in Redis)")
        if outage_msats is not None and (isinstance(outage_msats, bool) or not isinstance(outage_msats, int)
                                         or outage_msats < 0):  # fmt: skip
            raise ConfigurationError(f"outage_msats must be a non-negative int of msats, got {outage_msats!r}",
                                     hint="e.g. outage_msats=limit_msats // 10 (the default with on_down=\"local\")")  # fmt: skip
        if not lease_s > 0:
            raise ConfigurationError(f"lease_s must be positive, got {lease_s!r}")
        super().__init__(limit_msats, name=name, **kw)
        self.state = state
        self._errors: tuple[type[BaseException], ...] = (_Lost, *state.errors)  # Redis lost or unreachable
        self.on_down = on_down
        if outage_msats is None:
            outage_msats = limit_msats // 10 if on_down == "local" else 0
        self.outage_msats = outage_msats
        self.lease_ms = int(lease_s * 1000)
        base = state.key("budget", name)
        self._keys = (base, base + ":open", base + ":leases", base + ":swept")
        self._owner = uuid.uuid4().hex
        self._epoch, self._seq = "", 0  # the books this client knows
        self._lost: str | None = None  # why the books are not trusted, once a script said so
        self._last: dict[str, int] = dict.fromkeys(_FIELDS, 0)
        self._allowance = 0  # this process's outage allowance at the last answer
        self._local: Budget | None = None  # the in-process books while Redis is down or lost ("local")
        self._local_open: dict[str, Reservation] = {}  # rid -> its booking on _local, not yet in Redis
        self._pending: list[tuple[str, str]] = []  # settles (rid, spent or '') Redis has not booked yet
        self._sync_lock = threading.RLock()  # guards the fields above

    # Counts live in Redis; Budget.__init__ assigns these, which is ignored.
    calls = property(lambda self: self.state_counts()["calls"], lambda self, v: None)
    released = property(lambda self: self.state_counts()["released"], lambda self, v: None)
    unpriced_calls = property(lambda self: self.state_counts()["unpriced_calls"], lambda self, v: None)

    def state_counts(self) -> dict[str, int]:
        """spent, reserved, open, calls, released, unpriced_calls, held, expired from Redis (last known
        when down). First hands over what this process booked while Redis could not."""
        try:
            self._sync_local()
            raw = self.state.call(lambda: self.state.client.hgetall(self._keys[0]))
        except self._errors:
            return dict(self._last)
        epoch = raw.get("epoch")
        with self._sync_lock:  # the check the scripts make (a script says why, at the next booking)
            if raw.get("lost") or (self._epoch and epoch != self._epoch and raw.get("restored") != epoch) or (
                    self._epoch and epoch == self._epoch and int(raw.get("seq", 0)) < self._seq):  # fmt: skip
                self._lost = self._lost or raw.get("lost") or "the books in Redis are not the ones this process knew"
                return dict(self._last)
            self._lost = None  # restored since (or never lost): availability shows it before the next booking
        self._last = {f: int(raw.get(f, 0)) for f in _FIELDS}
        return dict(self._last)

    @property
    def lost(self) -> str | None:
        """Why the books in Redis are not trusted (lost in a restart, see the module notes), else None."""
        return self._lost

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
        if not self.state.up or self._lost:
            return 0 if self.on_down == "fail_closed" else self._fallback().available_msats
        return max(0, self.limit_msats - c["spent"] - c["reserved"] - c["held"] + self._allowance)

    def reset(self) -> None:
        """Forget all spending and open reservations of this budget in Redis (a new period)."""
        self.restore(0)

    def restore(self, spent_msats: int) -> None:
        """Operator: new books for this budget with `spent_msats` spent (what was really spent this
        period: the providers' bills, the usage ledger), after Redis lost them. Every process accepts
        them; what a process booked in-process meanwhile is added when it next reaches Redis."""
        if isinstance(spent_msats, bool) or not isinstance(spent_msats, int) or spent_msats < 0:
            raise ConfigurationError(f"restore needs a non-negative int of msats spent, got {spent_msats!r}")
        epoch = uuid.uuid4().hex
        script = self.state.script("budget_restore", _RESTORE)
        try:
            self.state.call(lambda: script(keys=self._keys, args=self._args(epoch) + [spent_msats]))
        except self.state.errors:
            raise APIConnectionError(
                f"cannot write the books of {self._label()}: Redis is unreachable",
                code="redis_unavailable",
                hint="bring Redis back, then restore() or reset() again",
            ) from None
        log.warning("budget %r: books restored in Redis with %d msats spent", self.name, spent_msats)

    def __repr__(self) -> str:
        c = self._last
        return (f"RedisBudget({self.limit_msats} msats {'soft' if self.soft else 'hard'}, {self.name!r}: "
                f"spent {c['spent']}, reserved {c['reserved']}, redis {'up' if self.state.up else 'down'})")  # fmt: skip

    # -- talking to Redis -------------------------------------------------------------------
    def _args(self, epoch: str | None = None) -> list[Any]:
        return [self._epoch, self._seq, epoch or uuid.uuid4().hex, self._owner, self.lease_ms, self.limit_msats,
                0 if self.soft else self.outage_msats, ""]  # fmt: skip

    def _run(self, name: str, source: str, args: list[Any]) -> tuple[str, int]:
        """Run one booking script; keep the books' identity, counters and allowance it answers with.
        Raises `_Lost` when the books are not the ones this client knew, Redis errors when down."""
        script = self.state.script(name, source)
        out = self.state.call(lambda: script(keys=self._keys, args=self._args() + args))
        if out[0] == "lost":
            with self._sync_lock:
                if self._lost is None:
                    log.error("budget %r: %s; refusing to book on them until restored", self.name, out[1])
                self._lost = str(out[1])
            raise _Lost(self._lost)
        verdict, n, allowance, flat = out
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        with self._sync_lock:
            epoch, seq = raw.get("epoch", ""), int(raw.get("seq", 0))
            if epoch != self._epoch or seq > self._seq:
                self._epoch, self._seq = epoch, seq
            self._last = {f: int(raw.get(f, 0)) for f in _FIELDS}
            self._allowance = int(allowance)
            self._lost = None
        return verdict, int(n)

    def _fallback(self) -> Budget:
        with self._sync_lock:
            if self._local is None:
                if self.soft:
                    left = max(0, self.limit_msats - self._last["spent"] - self._last["reserved"])
                else:
                    left = self._allowance  # set aside in Redis for this process: nobody else books it
                self._local = Budget(left, soft=self.soft, on_soft_limit=self.on_soft_limit,
                                     allow_unpriced=self.allow_unpriced, name=f"{self.name} (local, Redis down)")  # fmt: skip
                log.warning("budget %r books locally on %d msats while Redis is down", self.name, left)
            return self._local

    def _reserve_local(self, worst_case_msats: int | None) -> Reservation:
        """Book on the in-process budget (on_down="local"); `_sync_local` hands it to Redis later."""
        with self._sync_lock:
            local = self._fallback().reserve(worst_case_msats)
            rid = uuid.uuid4().hex
            self._local_open[rid] = local
        return RedisReservation(self, local.amount, local.unpriced, rid)

    def _sync_local(self) -> None:
        """Before Redis books anything after an outage: hand over the settles Redis missed, what was
        spent in-process and the reservations still open (one atomic script), then drop the local
        books. Raises the Redis error or `_Lost` when Redis cannot take them (they stay)."""
        if self._local is None and not self._pending:
            return
        with self._sync_lock:
            local, pending = self._local, list(self._pending)
            if local is None and not pending:
                return
            args: list[Any] = [0, 0, 0, 0] if local is None else [local.spent_msats, local.calls, local.released,
                                                                   local.unpriced_calls]  # fmt: skip
            args.append(len(pending))
            for rid, how in pending:
                args += [rid, how]
            for rid, r in self._local_open.items():
                args += [rid, r.amount]
            self._run("budget_sync", _SYNC, args)
            if local is not None:
                log.warning("budget %r: handed to Redis %d msats spent in-process and %d open reservations",
                            self.name, args[0], len(self._local_open))  # fmt: skip
            self._local, self._local_open = None, {}
            del self._pending[: len(pending)]

    def reserve(self, worst_case_msats: int | None) -> Reservation:
        unpriced = worst_case_msats is None
        amount = 0 if unpriced else int(worst_case_msats)  # type: ignore[arg-type]
        if amount < 0:
            raise ConfigurationError(f"a reservation cannot be negative ({amount})")
        rid = uuid.uuid4().hex
        try:
            self._sync_local()
            verdict, n = self._run("budget_reserve", _RESERVE,
                                   [amount, int(unpriced), int(self.allow_unpriced), int(self.soft), rid])  # fmt: skip
        except self._errors as e:
            if self.on_down == "local":
                return self._reserve_local(worst_case_msats)
            lost = isinstance(e, _Lost)
            raise BudgetExceededError(
                f"{self._label()} cannot be checked: {e if lost else 'Redis is unreachable'}, so the call is refused",
                limit_msats=self.limit_msats,
                needed_msats=amount,
                code="budget_unavailable",
                hint="restore the books with RedisBudget.restore(<msats really spent>) or reset() them for a new "
                "period; run Redis with appendonly yes so that a restart keeps them" if lost
                else "bring Redis back, or set on_down = \"local\" to book in-process meanwhile",
            ) from None
        if verdict in ("unpriced", "exceeded"):
            raise self._refusal(verdict, amount, n)
        r = RedisReservation(self, amount, unpriced, rid)
        return self._over_soft_limit(r) if n else r

    def _finish(self, r: Reservation, spent: int | None) -> None:
        with self._sync_lock:
            if r.done:
                return
            r.done = True
            local = self._local_open.pop(r.rid, None)  # type: ignore[attr-defined]
            if local is None:
                self._pending.append((r.rid, "" if spent is None else str(int(spent))))  # type: ignore[attr-defined]
        if local is not None:  # booked in-process and not handed to Redis yet
            local.budget._finish(local, spent)
            return
        try:
            self._sync_local()  # this settle goes with whatever else Redis has not booked yet
        except self._errors:
            log.warning("budget %r: could not book a settle of %d msats in Redis; kept until it answers",
                        self.name, r.amount)  # fmt: skip
