"""The answer cache: a memory LRU in front of a SQLite file (JSON rows, mode 0600).

The key is a hash of a canonical JSON of everything that changes the answer (provider, model,
the formatted messages, every sampling and provider parameter) and `KEY_VERSION`; never
credentials or base URLs. A corrupt database is moved aside and rebuilt, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from .types import Completion, CostSource, Request

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


def private_file(path: Path) -> None:
    """Create `path` (and its folder) readable by this user only: 0600 in a 0700 folder."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)


class SqliteStore:
    """One table of JSON rows. Opened on first use; thread-safe."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else default_dir() / "cache.sqlite3"
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            private_file(self.path)
            try:
                self._db = self._connect()
            except sqlite3.DatabaseError as e:
                self._rebuild(e)
        return self._db  # type: ignore[return-value]

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)")
        db.execute("SELECT count(*) FROM answers").fetchone()
        return db

    def _rebuild(self, err: Exception) -> None:
        aside = self.path.with_suffix(f".corrupt-{int(time.time())}")
        log.warning("dsrs cache %s is unreadable (%s); moved it to %s and started a new one", self.path, err, aside)
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                p.rename(Path(str(aside) + suffix))
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        self._db = self._connect()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            try:
                row = self._open().execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
            except sqlite3.DatabaseError as e:
                self._rebuild(e)
                return None
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except ValueError:
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        blob = json.dumps(value, ensure_ascii=False)
        with self._lock:
            try:
                self._open().execute(
                    "INSERT OR REPLACE INTO answers (key, value, created) VALUES (?, ?, ?)", (key, blob, time.time())
                )
            except sqlite3.DatabaseError as e:
                self._rebuild(e)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


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
        if blob is not None:
            v = json.loads(blob)  # a fresh object per hit: callers may mutate what they get
        else:
            v = self.store.get(key)
            if v is None:
                return None
            self.memory.put(key, json.dumps(v, ensure_ascii=False))
        # marked as a hit while decoding (one usage object, not a decode then a `replace` copy)
        return Completion.from_json({**v, "usage": {**v["usage"], **_HIT}})

    def put(self, key: str, c: Completion) -> None:
        v = c.to_json()
        self.memory.put(key, json.dumps(v, ensure_ascii=False))  # text: later mutation of `c` cannot reach it
        self.store.put(key, v)


_default: Cache | None = None


def default_cache() -> Cache:
    global _default
    if _default is None:
        _default = Cache()
    return _default
