"""State several processes share through Redis: the answer cache, budgets, rate limits, the usage ledger.

`RedisState(url)` holds one connection pool (redis-py, sync: every call is one loopback round
trip) and whether Redis answered last time. Everything else takes a `RedisState`:

- `RedisStore`: a `cache.Store` (get/put of JSON dicts under `dsrs:cache:<key>`, never pickle).
  Redis down: a miss, and nothing stored. The cache never fails a call.
- `RedisBudget`: a `dsrs.Budget` whose books live in Redis, booked by Lua scripts, so
  reserve/settle/release are atomic across processes with exactly `Budget`'s rules (hard/soft,
  unpriced, settle to the actual cost, unknown cost keeps the reservation). Redis down:
  `on_down="fail_closed"` (default) refuses every call with `BudgetExceededError` code
  `budget_unavailable`; `on_down="local"` books on an in-process `Budget` holding what was left at
  the last answer from Redis; when Redis answers again, what was spent and is still reserved
  in-process goes to Redis in one script before Redis books anything else. A reservation whose
  settle cannot reach Redis stays reserved there (never lost in the budget's favour).
- `RateLimiter`: requests per minute per name (fixed one-minute windows, `INCR` + `EXPIRE`);
  Redis down: counted in this process instead.
- `RedisLedger`: the usage ledger (`ledger.Ledger`'s record/rows/summary) on a Redis stream.

Secrets never go to Redis: client keys are stored by their configured name only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from .budget import Budget, Reservation
from .errors import BudgetExceededError, ConfigurationError

log = logging.getLogger("dsrs.redis")

PREFIX = "dsrs:"


class RedisState:
    """One Redis connection pool and whether Redis is reachable (`up`, `last_error`)."""

    def __init__(self, url: str, *, timeout: float = 1.0, prefix: str = PREFIX) -> None:
        try:
            import redis
        except ImportError as e:  # pragma: no cover - the extra is missing
            raise ConfigurationError(
                "Redis support needs the redis package", hint="pip install 'dsrs[gateway]'"
            ) from e
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.up = True
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._scripts: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RedisState({_safe_url(self.url)!r}, {'up' if self.up else 'down'})"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def script(self, name: str, source: str) -> Any:
        with self._lock:
            s = self._scripts.get(name)
            if s is None:
                s = self._scripts[name] = self.client.register_script(source)
            return s

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run one Redis operation, tracking `up`; Redis errors propagate."""
        try:
            out = fn()
        except self.errors as e:
            self._down(e)
            raise
        if not self.up:
            log.warning("Redis at %s is reachable again", _safe_url(self.url))
        self.up, self.last_error = True, None
        return out

    def _down(self, e: BaseException) -> None:
        if self.up:
            log.warning("Redis at %s is unreachable: %s", _safe_url(self.url), type(e).__name__)
        self.up, self.last_error = False, f"{type(e).__name__}: {e}"[:200]

    def ping(self) -> bool:
        try:
            self.call(self.client.ping)
        except self.errors:
            return False
        return True

    def close(self) -> None:
        self.client.close()


def _safe_url(url: str) -> str:
    """The URL without a password (redis://:secret@host -> redis://***@host)."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


# -- cache -------------------------------------------------------------------------------------
class RedisStore:
    """A `cache.Store` in Redis: JSON text under `dsrs:cache:<key>`, optionally expiring."""

    def __init__(self, state: RedisState, ttl_s: int | None = None) -> None:
        self.state = state
        self.ttl_s = ttl_s

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            blob = self.state.call(lambda: self.state.client.get(self.state.key("cache", key)))
        except self.state.errors:
            return None
        if blob is None:
            return None
        try:
            v = json.loads(blob)
        except ValueError:
            return None
        return v if isinstance(v, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        blob = json.dumps(value, ensure_ascii=False)
        try:
            self.state.call(lambda: self.state.client.set(self.state.key("cache", key), blob, ex=self.ttl_s))
        except self.state.errors:
            pass


# -- budgets -----------------------------------------------------------------------------------
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


# -- rate limits -------------------------------------------------------------------------------
_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class RateLimiter:
    """At most `per_minute` requests per name in each clock minute, shared through Redis when given."""

    def __init__(self, state: RedisState | None = None) -> None:
        self.state = state
        self._local: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, name: str, per_minute: int, now: float | None = None) -> float | None:
        """Count one request; None when allowed, else seconds until the next window."""
        now = time.time() if now is None else now
        window = int(now // 60)
        retry = 60 - (now % 60)
        n = None
        if self.state is not None:
            script = self.state.script("hit", _HIT)
            try:
                n = int(self.state.call(lambda: script(keys=(self.state.key("rate", name, str(window)),), args=(120,))))  # type: ignore[union-attr]
            except self.state.errors:
                n = None
        if n is None:
            with self._lock:
                for k in [k for k in self._local if k[1] < window]:
                    del self._local[k]
                n = self._local[(name, window)] = self._local.get((name, window), 0) + 1
        return None if n <= per_minute else retry


# -- the usage ledger --------------------------------------------------------------------------
class RedisLedger:
    """`ledger.Ledger` on the Redis stream `dsrs:usage` (capped near `maxlen` entries).

    `record` never waits for Redis: entries queue in memory and a writer thread sends them in
    pipelined batches. While Redis is down they wait (up to `backlog` entries, then the oldest
    are dropped with a warning) and go out when it is back; `flush()` (also at `close()` and at
    exit) sends what is queued.
    """

    def __init__(self, state: RedisState, maxlen: int = 1_000_000, backlog: int = 100_000) -> None:
        self.state = state
        self.maxlen = maxlen
        self.stream = state.key("usage")
        self._queue: deque[dict[str, Any]] = deque(maxlen=backlog)
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._sending = threading.Lock()  # one sender at a time: the writer thread or a flush
        self._closed = False

    @property
    def path(self) -> str:
        """Where the entries live (for messages; no password)."""
        return f"{_safe_url(self.state.url)} stream {self.stream}"

    def record(self, completion: Any, *, lane: str | None = None, program: str | None = None,
               latency_s: float | None = None) -> None:  # fmt: skip
        """One call, from its `Completion`. Never raises, never blocks on Redis."""
        u = completion.usage
        lat = completion.latency_s if completion.latency_s is not None else latency_s
        entry = {
            "time": repr(time.time()), "lane": lane or "", "provider": completion.provider or "",
            "model": completion.model or "", "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "cost_msats": "" if u.cost_msats is None else u.cost_msats,
            "cost_source": getattr(u.cost_source, "value", u.cost_source) or "", "cache_hit": int(u.cache_hit),
            "estimated": int(u.estimated), "latency_s": "" if lat is None else repr(lat), "program": program or "",
        }  # fmt: skip
        with self._wake:
            if len(self._queue) == self._queue.maxlen:
                log.warning("usage ledger backlog full (Redis down?): dropping the oldest entry")
            self._queue.append(entry)
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, daemon=True, name="dsrs-redis-ledger")
                self._writer.start()
                import atexit

                atexit.register(self.close)
            self._wake.notify()

    def _send(self) -> bool:
        """Send what is queued; False when Redis refused (the entries stay queued)."""
        with self._sending:
            return self._send_locked()

    def _send_locked(self) -> bool:
        while True:
            with self._wake:
                batch = [self._queue[i] for i in range(min(500, len(self._queue)))]
            if not batch:
                return True
            pipe = self.state.client.pipeline(transaction=False)
            for e in batch:
                pipe.xadd(self.stream, e, maxlen=self.maxlen, approximate=True)
            try:
                self.state.call(pipe.execute)
            except self.state.errors as e:
                log.warning("could not write the usage ledger to Redis (%s); %d entries wait", type(e).__name__,
                            len(self._queue))  # fmt: skip
                return False
            with self._wake:
                for _ in batch:
                    self._queue.popleft()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue:
                    return
            if not self._send():
                with self._wake:
                    self._wake.wait(1.0)  # Redis down: try again in a second

    def flush(self, timeout: float = 5.0) -> bool:
        """Send everything queued now; True when the queue is empty."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            if not self._send():
                return False
        return not self._queue

    def close(self) -> None:
        if self._closed:
            return
        if not self.flush():
            log.warning("usage ledger: %d entries could not reach Redis before closing", len(self._queue))
        with self._wake:
            self._closed = True
            self._wake.notify()

    def rows(self, since: float | None = None) -> list[Any]:
        from .ledger import Row

        self.flush()
        start = "-" if not since else str(int(since * 1000))
        raw = self.state.call(lambda: self.state.client.xrange(self.stream, min=start))
        out = []
        for _id, f in raw:
            out.append(Row(
                float(f["time"]), f["lane"] or None, f["provider"], f["model"], int(f["prompt_tokens"]),
                int(f["completion_tokens"]), int(f["total_tokens"]),
                int(f["cost_msats"]) if f["cost_msats"] != "" else None, f["cost_source"] or None,
                f["cache_hit"] == "1", f["estimated"] == "1", float(f["latency_s"]) if f["latency_s"] else None,
                f["program"] or None,
            ))  # fmt: skip
        return out

    def summary(self, by: str = "model", since: float | None = None) -> list[Any]:
        """Calls, tokens and cost grouped like `Ledger.summary` (model, provider, lane, day, program)."""
        import datetime

        from .ledger import Summary

        keyf: dict[str, Callable[[Any], str]] = {
            "model": lambda r: f"{r.provider}/{r.model}",
            "provider": lambda r: r.provider,
            "lane": lambda r: r.lane or "-",
            "day": lambda r: datetime.datetime.fromtimestamp(r.time, datetime.UTC).date().isoformat(),
            "program": lambda r: r.program or "-",
        }
        f = keyf.get(by)
        if f is None:
            raise ConfigurationError(f"cannot group usage by {by!r}", hint="by: " + ", ".join(keyf))
        groups: dict[str, list[Any]] = {}
        for r in self.rows(since):
            groups.setdefault(f(r), []).append(r)
        out = []
        for k, rs in groups.items():
            out.append(Summary(
                k, len(rs), sum(r.prompt_tokens for r in rs), sum(r.completion_tokens for r in rs),
                sum(r.total_tokens for r in rs), sum(r.cost_msats or 0 for r in rs),
                sum(r.cost_msats is None for r in rs), sum(r.cache_hit for r in rs),
                min(r.time for r in rs), max(r.time for r in rs),
            ))  # fmt: skip
        return sorted(out, key=lambda s: s.key if by == "day" else s.first)


def ledger_from_env() -> RedisLedger | None:
    """The shared usage ledger when DSRS_REDIS_URL is set (what `dsrs usage` reads), else None."""
    import os

    url = os.environ.get("DSRS_REDIS_URL")
    return RedisLedger(RedisState(url)) if url else None
