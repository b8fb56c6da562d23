"""The answer cache: a memory LRU in front of a SQLite file (JSON rows, mode 0600).

The key is a hash of a canonical JSON of everything that changes the answer (provider, model,
the formatted messages, every sampling and provider parameter) and `KEY_VERSION`; never
credentials or base URLs. A corrupt database is moved aside and rebuilt, with a warning; a locked,
full or unwritable one, or a row that is not a dsrs answer, is a miss, never an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from . import _sqlite
from .types import Completion, CostSource, LmUsage, Request

KEY_VERSION = 1
log = logging.getLogger("dsrs.cache")


# Built once: `json.dumps` with options builds a new encoder on every call.
_KEY_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def cache_key(provider: str, req: Request, scope: dict[str, Any] | None = None) -> str:
    """`scope`: connection options that change the answer (API version, beta headers); never secrets."""
    doc = {"v": KEY_VERSION, "provider": provider, "request": req.canonical()}
    if scope:
        doc["scope"] = scope
    return hashlib.sha256(_KEY_JSON.encode(doc).encode()).hexdigest()


class Store(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...
    def put(self, key: str, value: dict[str, Any]) -> None: ...


class MemoryLRU:
    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._d: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


def default_dir() -> Path:
    from .settings import current

    d = current().cache_dir or os.environ.get("DSRS_CACHE_DIR")
    if d:
        return Path(d)
    import platformdirs

    return Path(platformdirs.user_cache_dir("dsrs"))


class SqliteStore:
    """One table of JSON rows, shared by every store on the same file in this process.

    `put` queues the row for a background writer thread (`dsrs._sqlite`): a commit is an fsync,
    which must not stall the event loop. A row queued but not yet committed is still found by `get`.
    `flush()` waits for the writes; interpreter exit flushes too. A locked, full, unwritable or
    corrupt file never fails a call (see `dsrs._sqlite`)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else default_dir() / "cache.sqlite3"
        self.file = _sqlite.shared(self.path, _SCHEMA, log, "the dsrs cache", "answers are not cached")

    def get(self, key: str) -> dict[str, Any] | None:
        blob = self.file.pending.get(key)
        if blob is None:
            row = self.file.read(lambda db: db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone(), None)
            if row is None:
                return None
            blob = row[0]
        try:
            v = json.loads(blob)
        except (ValueError, TypeError):  # not JSON, or not text: another program's row
            return None
        return v if isinstance(v, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        blob = json.dumps(value, ensure_ascii=False)
        self.file.write(_PUT, (key, blob, time.time()), key, blob)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


_SCHEMA = ("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)",)
_PUT = "INSERT OR REPLACE INTO answers (key, value, created) VALUES (?, ?, ?)"


_HIT = {"cost_msats": 0, "cost_source": CostSource.CACHE.value, "cache_hit": True, "calls": 1}


class Cache:
    """Memory first, then the shared store; a hit comes back marked and free."""

    def __init__(self, store: Store | None = None, memory: MemoryLRU | None = None) -> None:
        self.memory = memory or MemoryLRU()
        self._store = store

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = SqliteStore()
        return self._store

    def get(self, key: str) -> Completion | None:
        blob = self.memory.get(key)
        if blob is not None:  # written by `put` in this process
            v = json.loads(blob)  # a fresh object per hit: callers may mutate what they get
            # marked as a hit while decoding (one usage object, not a decode then a `replace` copy)
            return Completion.from_json({**v, "usage": {**v["usage"], **_HIT}})
        v = self.store.get(key)
        c = _decode(v) if v is not None else None
        if c is not None:
            self.memory.put(key, json.dumps(v, ensure_ascii=False))
        return c

    def put(self, key: str, c: Completion) -> None:
        v = c.to_json()
        v["v"] = KEY_VERSION
        self.memory.put(key, json.dumps(v, ensure_ascii=False))  # text: later mutation of `c` cannot reach it
        self.store.put(key, v)


_COUNTS = tuple(f.name for f in dataclasses.fields(LmUsage) if f.type in ("int", int))  # token counts


def _decode(v: Any) -> Completion | None:
    """A stored row as a cache hit, or None when it is not a dsrs answer of this key version
    (another program's row, a key collision, wrong types): a miss, never an error or a wrong answer."""
    try:
        if not isinstance(v, dict) or v.get("v", KEY_VERSION) != KEY_VERSION or not isinstance(v["usage"], dict):
            return None
        c = Completion.from_json({**v, "usage": {**v["usage"], **_HIT}})
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    u = c.usage
    ok = (
        isinstance(c.text, str) and all(type(n) is int and n >= 0 for n in (getattr(u, f) for f in _COUNTS))
        and type(u.estimated) is bool
        and all(isinstance(x, str) for x in (c.finish_reason, c.model, c.provider)) and isinstance(c.id, (str, type(None)))
        and all(isinstance(t.id, str) and isinstance(t.name, str) and isinstance(t.arguments, dict) for t in c.tool_calls)
        and all(isinstance(r, dict) for r in c.reasoning)
    )  # fmt: skip
    return c if ok else None


_default: Cache | None = None


def default_cache() -> Cache:
    global _default
    if _default is None:
        _default = Cache()
    return _default
