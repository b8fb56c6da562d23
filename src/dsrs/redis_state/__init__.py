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
