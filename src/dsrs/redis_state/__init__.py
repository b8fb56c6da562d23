"""State several processes share through Redis: the answer cache, budgets, rate limits, the usage ledger.

`RedisState(url)` holds one connection pool (redis-py, sync: every call is one loopback round
trip) and whether Redis answered last time. Everything else takes a `RedisState`:

- `RedisStore`: a `cache.Store` (get/put of JSON dicts under `dsrs:cache:<key>`, never pickle).
  Redis down: a miss, and nothing stored. The cache never fails a call.
- `RedisBudget`: a `dsrs.Budget` whose books live in Redis, booked by Lua scripts, so
  reserve/settle/release are atomic across processes with exactly `Budget`'s rules (hard/soft,
  unpriced, settle to the actual cost, unknown cost keeps the reservation). Redis down:
  `on_down="fail_closed"` (default) refuses every call with `BudgetExceededError` code
  `budget_unavailable`; `on_down="local"` books in-process on this process's outage allowance,
  which Redis held for it while it answered; when Redis answers again, what was spent and is
  still reserved in-process, and every settle Redis missed, go to Redis in one script before
  Redis books anything else. Books that Redis lost (restarted empty or from an old snapshot) are
  refused until `restore()`d. See `dsrs.redis_state.budget` for what survives a restart.
- `RateLimiter`: requests per minute per name (fixed one-minute windows, `INCR` + `EXPIRE`);
  Redis down: counted in this process instead.
- `RedisLedger`: the usage ledger (`ledger.Ledger`'s record/rows/summary) on a Redis stream.
- `circuit.RedisCircuit` (import it from its module; it needs `dsrs.lanes`): a lane's circuit
  breaker shared by every process: a lane one opens is open for all, half-open lets one probe
  through across processes, recovery closes it everywhere; Redis is read at most once per
  `refresh_s` and written only on transitions. Redis down: this process's own breaker.

Secrets never go to Redis: client keys are stored by their configured name only.
"""

from __future__ import annotations

from .budget import ON_DOWN, RedisBudget, RedisReservation
from .ledger import RedisLedger, ledger_from_env
from .ratelimit import RateLimiter
from .state import PREFIX, RedisState, _safe_url
from .store import RedisStore

__all__ = [
    "ON_DOWN",
    "PREFIX",
    "RateLimiter",
    "RedisBudget",
    "RedisLedger",
    "RedisReservation",
    "RedisState",
    "RedisStore",
    "_safe_url",
    "ledger_from_env",
]
