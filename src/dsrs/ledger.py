"""The usage ledger: one SQLite row per LM call a program made, beside the cache (`ledger.sqlite3`).

Rows hold when, which lane, provider and model, tokens, cost in msats and where that figure
came from, whether the cache answered, and latency. Never prompts, answers, keys or URLs.
`Predict` records every call it makes; `dsrs.usage(by="model"|"lane"|"day"|"provider"|"program")` sums them. With DSRS_REDIS_URL set,
rows go to the Redis stream several processes share instead (`dsrs.redis_state.RedisLedger`).
Set `DSRS_LEDGER=off` to record nothing. A ledger that cannot be written never fails a call.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _sqlite
from .errors import ConfigurationError, DsrsError

if TYPE_CHECKING:
    from .redis_state.ledger import RedisLedger

log = logging.getLogger("dsrs.ledger")

_COLUMNS = ("time", "lane", "provider", "model", "prompt_tokens", "completion_tokens", "total_tokens", "cost_msats",
            "cost_source", "cache_hit", "estimated", "latency_s", "program")  # fmt: skip
_INSERT = f"INSERT INTO calls ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SCHEMA = """CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, lane TEXT, provider TEXT, model TEXT,
    prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER,
    cost_msats INTEGER, cost_source TEXT, cache_hit INTEGER, estimated INTEGER, latency_s REAL, program TEXT)"""
_GROUPS = {
    "model": "provider || '/' || model",
    "provider": "provider",
    "lane": "coalesce(lane, '-')",
    "day": "date(time, 'unixepoch')",
    "program": "coalesce(program, '-')",
}


@dataclass(frozen=True, slots=True)
class Row:
    time: float
    lane: str | None
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_msats: int | None  # None: the price is unknown
    cost_source: str | None
    cache_hit: bool
    estimated: bool
    latency_s: float | None
    program: str | None


@dataclass(frozen=True, slots=True)
class Summary:
    key: str  # the model, lane, provider or UTC day
    calls: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_msats: int  # sum of the known costs
    unknown_cost_calls: int  # calls whose cost is unknown (not in cost_msats)
    cache_hits: int
    first: float  # unix time of the first and last call
    last: float


class Ledger:
    """`record` queues the row for the file's background writer (never an fsync on the caller's
    thread); `rows` and `summary` see every row this process recorded. A ledger file that is
    locked, full or unwritable drops rows with a warning (counted in `dropped`); a corrupt one is
    moved aside and started anew (`dsrs._sqlite`)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is None:
            from .cache import default_dir

            path = default_dir() / "ledger.sqlite3"
        self.path = Path(path)
        self.file = _sqlite.shared(self.path, (_SCHEMA,), log, "the usage ledger", "usage rows are not recorded")

    @property
    def dropped(self) -> int:
        """Rows this process could not write (locked, full or unwritable file)."""
        return self.file.dropped

    def record(self, completion: Any, *, lane: str | None = None, program: str | None = None,
               latency_s: float | None = None, at: float | None = None) -> None:  # fmt: skip
        """One call, from its `Completion` (`at`: unix time, default now). Errors are logged, never raised."""
        u = completion.usage
        src = getattr(u.cost_source, "value", u.cost_source)
        row = (time.time() if at is None else at, lane, completion.provider or "", completion.model or "", u.prompt_tokens,
               u.completion_tokens, u.total_tokens, u.cost_msats, src, int(u.cache_hit), int(u.estimated),
               completion.latency_s if completion.latency_s is not None else latency_s, program)  # fmt: skip
        self.file.write(_INSERT, row)

    def rows(self, since: float | None = None) -> list[Row]:
        q = f"SELECT {', '.join(_COLUMNS)} FROM calls WHERE time >= ? ORDER BY id"
        raw = self._read(q, since)
        return [Row(t, lane, prov, model, pt, ct, tt, cost, src, bool(hit), bool(est), lat, prog)
                for t, lane, prov, model, pt, ct, tt, cost, src, hit, est, lat, prog in raw]

    def summary(self, by: str = "model", since: float | None = None) -> list[Summary]:
        """Calls, tokens and cost grouped by model (provider/model), provider, lane or UTC day."""
        key = _GROUPS.get(by)
        if key is None:
            raise ConfigurationError(f"cannot group usage by {by!r}", hint="by: " + ", ".join(_GROUPS))
        q = (
            f"SELECT {key} AS k, count(*), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens),"
            " coalesce(sum(cost_msats), 0), sum(cost_msats IS NULL), sum(cache_hit), min(time), max(time)"
            " FROM calls WHERE time >= ? GROUP BY k ORDER BY " + ("k" if by == "day" else "min(time)")
        )
        return [Summary(*r) for r in self._read(q, since)]

    def _read(self, q: str, since: float | None) -> list[Any]:
        self.file.flush()
        if not self.path.exists():  # nothing recorded here: read as empty, create nothing
            return []
        try:
            return self.file.read_or_raise(lambda db: db.execute(q, (since or 0,)).fetchall(), [])
        except (sqlite3.Error, OSError) as e:
            raise DsrsError(f"could not read the usage ledger {self.path}: {e}",
                            code=getattr(e, "sqlite_errorname", None),
                            hint="another program may hold it locked; try again, or set DSRS_CACHE_DIR") from None  # fmt: skip

    def flush(self) -> None:
        """Wait until every row recorded so far is written."""
        self.file.flush()

    def close(self) -> None:
        self.file.close()


_ledgers: dict[object, Ledger | RedisLedger] = {}
_lock = threading.Lock()


def default_ledger() -> Ledger | RedisLedger:
    """The shared Redis ledger when DSRS_REDIS_URL is set (`dsrs.redis_state.RedisLedger`), else the
    SQLite ledger beside the current cache directory. One per place; same record/rows/summary."""
    from .cache import default_dir

    url = os.environ.get("DSRS_REDIS_URL")
    path = default_dir() / "ledger.sqlite3"
    where: object = ("redis", url) if url else path
    with _lock:
        led = _ledgers.get(where)
        if led is None:
            led = Ledger(path)
            if url:
                from .redis_state import ledger_from_env

                try:
                    led = ledger_from_env() or led  # never None here: DSRS_REDIS_URL is set
                except ConfigurationError as e:  # the redis package is missing: keep recording locally
                    log.warning("DSRS_REDIS_URL is set but %s; recording usage in %s instead", e, path)
            _ledgers[where] = led
        return led


def enabled() -> bool:
    return os.environ.get("DSRS_LEDGER", "").strip().lower() not in ("0", "off", "false", "no")


def record(completion: Any, *, lane: str | None = None, program: str | None = None,
           latency_s: float | None = None) -> None:  # fmt: skip
    if enabled():
        default_ledger().record(completion, lane=lane, program=program, latency_s=latency_s)


def usage(by: str = "model", since: float | None = None) -> list[Summary]:
    """The ledger summed by "model", "provider", "lane", "day" (UTC) or "program", optionally since a unix time."""
    return default_ledger().summary(by, since)
