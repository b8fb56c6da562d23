"""The SQLite files of dsrs (the answer cache, the usage ledger): private files, failures told
apart by SQLite's error codes (never message text), and writes off the caller's thread.

- Corruption (SQLITE_CORRUPT, SQLITE_NOTADB) is the only failure that moves a file aside (to
  `<name>.corrupt-<time>`) and starts a new one, with a warning.
- A database another process holds locked (SQLITE_BUSY/LOCKED, after a busy timeout) is a miss
  for a read and a skipped write; the warning comes at most once every `warn_every` seconds.
- A full disk (SQLITE_FULL) skips writes, with one warning; writes are tried again a minute later.
- A file that cannot be created or written (an unwritable folder, SQLITE_READONLY/CANTOPEN/PERM)
  turns that file off for this process, with one warning: calls go on without it.
- `write()` only queues: one daemon thread per file commits what gathered in 50 ms in one
  transaction (a commit is an fsync, which must not stall an event loop; cache misses went from
  ~700 to ~110 µs of loop time each, bench/bench_cache_writes.py). `flush()` waits for it,
  `close()` flushes and stops it, interpreter exit flushes every file, and an idle writer ends
  after `idle_exit` seconds. A forked child starts with no writer thread and leaves what its
  parent queued to the parent. Reads stay on the caller's thread: an indexed read beside the
  writer (WAL), ~10 µs.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# SQLite's primary result codes (https://sqlite.org/rescode.html); extended codes keep them in the low byte.
_PERM, _BUSY, _LOCKED, _READONLY, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 5, 6, 8, 11, 13, 14, 26
CORRUPT, BUSY, FULL, UNWRITABLE, OTHER = "corrupt", "busy", "full", "unwritable", "other"
_FULL_PAUSE = 60.0  # seconds without writes after a full disk


def kind(e: BaseException) -> str:
    """What a failure means for the file: corrupt, busy, full, unwritable or other."""
    if isinstance(e, OSError):
        return UNWRITABLE
    code = getattr(e, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return OTHER
    return {_CORRUPT: CORRUPT, _NOTADB: CORRUPT, _BUSY: BUSY, _LOCKED: BUSY, _FULL: FULL, _READONLY: UNWRITABLE,
            _CANTOPEN: UNWRITABLE, _PERM: UNWRITABLE}.get(code & 0xFF, OTHER)  # fmt: skip


def private_file(path: Path) -> None:
    """Create `path` (and its folder) readable by this user only: 0600 in a 0700 folder."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)


_STOP = object()
_files: weakref.WeakSet[SqliteFile] = weakref.WeakSet()
_registry: weakref.WeakValueDictionary[str, SqliteFile] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()
_hooks_lock = threading.Lock()
_forked_leftovers: list[Any] = []  # a parent's connections in a forked child: never used, never closed
_hooks_installed = False


class SqliteFile:
    """One SQLite file: a reader connection for the caller's thread, one writer thread.

    `schema`: statements run on every new connection (CREATE TABLE IF NOT EXISTS ...).
    `what`/`without`: words for the warnings ("the dsrs cache", "answers are not cached")."""

    read_timeout = 0.1  # seconds a read waits for a lock: it runs on the caller's (event loop's) thread, and
    # in WAL mode only a holder of an exclusive lock (or a crash recovery) makes readers wait
    write_timeout = 10.0  # seconds a batch waits for another process's write lock (on the writer thread)
    warn_every = 60.0  # seconds between two warnings about a locked file
    idle_exit = 30.0  # seconds without writes after which the writer thread closes its connection and ends
    linger = 0.05  # seconds the writer waits for more rows after the first (`flush` cuts it short): fewer
    # commits, and fewer times the writer takes the GIL from the event loop's thread

    def __init__(self, path: Path, schema: tuple[str, ...], log: logging.Logger, what: str, without: str) -> None:
        self.path, self.schema, self.log, self.what, self.without = path, schema, log, what, without
        self.dropped = 0  # writes that were skipped: locked, full, unwritable
        self.off: str | None = None  # why this file is off for this process
        self._lock = threading.RLock()  # the reader connection, rebuilds (re-entered by a read that rebuilds)
        self._reader: sqlite3.Connection | None = None
        self._gen = 0  # bumped by every rebuild: connections of an older generation are stale
        self._prepared = -1  # the generation whose file `private_file` made
        self._full_until = 0.0
        self._warned: dict[str, float] = {}
        self._q: queue.SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._hurry = threading.Event()  # set by `flush`: the writer stops waiting for more rows
        self.pending: dict[Any, Any] = {}  # key -> value queued but not committed yet (see `write`)
        self._pending_lock = threading.Lock()
        _install_hooks()
        _files.add(self)

    # -- connections -------------------------------------------------------------------------------
    def _prepare(self) -> bool:
        """Make the file (0600) once per generation, on the caller's thread: a folder that cannot be
        written is known at the first call, not later on another thread."""
        if self.off:
            return False
        if self._prepared != self._gen:
            try:
                private_file(self.path)
            except OSError as e:
                self._failed(e, "open", self._gen)
                return False
            self._prepared = self._gen
        return True

    def _connect(self, timeout: float) -> sqlite3.Connection:
        private_file(self.path)
        db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # reads run beside the writer
            db.execute("PRAGMA synchronous=NORMAL")  # in WAL: durable across a crash of this process
            for stmt in self.schema:
                db.execute(stmt)
        except BaseException:
            db.close()
            raise
        return db

    def read(self, fn: Callable[[sqlite3.Connection], T], default: T) -> T:
        """`fn(connection)` on the reader connection; `default` (a miss) when the file is off, locked
        or broken (broken: rebuilt). Never raises for the file's sake."""
        if not self._prepare():
            return default
        with self._lock:
            gen = self._gen
            try:
                if self._reader is None:
                    self._reader = self._connect(self.read_timeout)
                return fn(self._reader)
            except (sqlite3.Error, OSError) as e:
                self._failed(e, "read", gen)
                return default

    def read_or_raise(self, fn: Callable[[sqlite3.Connection], T], empty: T) -> T:
        """For reports (the ledger's rows; flush first): corruption rebuilds and reads as `empty`;
        any other failure raises it (the caller turns it into a typed error)."""
        with self._lock:
            gen = self._gen
            try:
                if self._reader is None:
                    self._reader = self._connect(self.write_timeout)
                return fn(self._reader)
            except (sqlite3.Error, OSError) as e:
                if kind(e) != CORRUPT:
                    raise
                self._failed(e, "read", gen)
                return empty

    # -- writes ------------------------------------------------------------------------------------
    def write(self, sql: str, params: tuple[Any, ...], key: Any = None, value: Any = None) -> None:
        """Queue one statement for the writer thread. With `key`, `value` stays in `pending` until
        committed, so a read of that key in this process finds it meanwhile."""
        if not self._prepare():
            self.dropped += 1
            return
        if key is not None:
            with self._pending_lock:
                self.pending[key] = value
        with self._start_lock:  # (uncontended: ~0.1 µs) an idle writer cannot exit between these two lines
            (self._q or self._start()).put((sql, params, key, value))

    def _start(self) -> queue.SimpleQueue[Any]:
        """Under `_start_lock`."""
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        t = threading.Thread(target=self._run, args=(q,), name=f"dsrs-sqlite-writer:{self.path.name}", daemon=True)
        t.start()
        self._thread, self._q = t, q
        return q

    def _idle(self, q: queue.SimpleQueue[Any]) -> bool:
        """After `idle_exit` seconds without work: stop this writer (the next write starts one)."""
        with self._start_lock:
            if self._q is not q or not q.empty():
                return self._q is not q  # closed meanwhile: stop; else there is work: go on
            self._q = self._thread = None
            return True

    def _run(self, q: queue.SimpleQueue[Any]) -> None:
        db: sqlite3.Connection | None = None
        gen = -1
        while True:
            try:
                batch = [q.get(timeout=self.idle_exit)]
            except queue.Empty:
                if self._idle(q):
                    if db is not None:
                        db.close()
                    return
                continue
            if isinstance(batch[0], tuple):
                self._hurry.wait(self.linger)  # let a batch gather: one wake-up and one commit for many rows
                self._hurry.clear()
            while len(batch) < 5000:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            rows = [b for b in batch if isinstance(b, tuple)]
            if rows:
                db, gen = self._commit(db, gen, rows)
            for b in batch:
                if isinstance(b, threading.Event):
                    b.set()
            if _STOP in batch:
                if db is not None:
                    db.close()
                return

    def _commit(self, db: sqlite3.Connection | None, gen: int, rows: list[tuple[Any, ...]]) -> tuple[Any, int]:
        try:
            for attempt in (1, 2):  # a second time on the new file when the first found it corrupt
                if self.off or time.monotonic() < self._full_until:
                    self.dropped += len(rows)
                    return db, gen
                try:
                    if db is None or gen != self._gen:
                        if db is not None:
                            db.close()
                        db, gen = None, self._gen
                        db = self._connect(self.write_timeout)
                    stmts = [st for sql, group in itertools.groupby(rows, key=lambda r: r[0])
                             for st in _insert_many(sql, [params for _, params, _, _ in group])]  # fmt: skip
                    if len(stmts) == 1:  # one statement is its own transaction
                        db.execute(*stmts[0])
                        return db, gen
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        for st in stmts:
                            db.execute(*st)
                        db.execute("COMMIT")
                    except BaseException:
                        if db.in_transaction:
                            with contextlib.suppress(sqlite3.Error):
                                db.execute("ROLLBACK")
                        raise
                    return db, gen
                except Exception as e:  # the writer thread outlives any failure
                    k = kind(e)
                    self._failed(e, "write", gen)
                    if db is not None and k in (CORRUPT, UNWRITABLE):
                        db.close()
                        db = None
                    if k != CORRUPT or attempt == 2:
                        self.dropped += len(rows)
                        return db, gen
            return db, gen
        finally:
            with self._pending_lock:
                for _, _, key, value in rows:
                    if key is not None and self.pending.get(key) is value:
                        del self.pending[key]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed (or dropped). False on timeout."""
        done = threading.Event()
        with self._start_lock:  # so an idle writer cannot end between the check and the put
            q, t = self._q, self._thread
            if q is None or t is None or not t.is_alive() or t is threading.current_thread():
                return True
            q.put(done)
        self._hurry.set()
        return done.wait(timeout)

    def close(self) -> None:
        """Flush, stop the writer thread and close the connections (a later use reopens them)."""
        with self._start_lock:
            q, t = self._q, self._thread
            self._q = self._thread = None
        if q is not None and t is not None and t.is_alive():
            q.put(_STOP)
            t.join()
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- failures ----------------------------------------------------------------------------------
    def _failed(self, e: BaseException, op: str, gen: int) -> None:
        k = kind(e)
        code = getattr(e, "sqlite_errorname", None) or type(e).__name__
        if k == CORRUPT:
            self._rebuild(e, gen)
        elif k == BUSY:
            self._warn(BUSY, "%s %s is locked by another process (%s); this %s was skipped. The lock is held by "
                       "another program using the same file: if this persists, give each its own DSRS_CACHE_DIR",
                       self.what, self.path, code, op, every=self.warn_every)  # fmt: skip
        elif k == FULL:
            self._full_until = time.monotonic() + _FULL_PAUSE
            self._warn(FULL, "%s %s: the disk is full (%s); writes are skipped (tried again every %d s). Free "
                       "some space or point DSRS_CACHE_DIR elsewhere", self.what, self.path, code, _FULL_PAUSE)  # fmt: skip
        elif k == UNWRITABLE:
            self.off = f"{code}: {e}"
            self._warn(UNWRITABLE, "could not write %s %s (%s: %s); %s in this process. Point DSRS_CACHE_DIR at a "
                       "writable folder", self.what, self.path, code, e, self.without)  # fmt: skip
        else:
            self._warn(OTHER, "%s %s failed (%s: %s); this %s was skipped", self.what, self.path, code, e, op,
                       every=self.warn_every)  # fmt: skip

    def _warn(self, k: str, msg: str, *args: Any, every: float | None = None) -> None:
        now = time.monotonic()
        last = self._warned.get(k)
        if last is not None and (every is None or now - last < every):
            return
        self._warned[k] = now
        self.log.warning(msg, *args)

    def _rebuild(self, err: BaseException, gen: int) -> None:
        """Move the corrupt file aside and start a new one; once per generation (the reader and
        the writer may both see the same corruption)."""
        with self._lock:
            if gen != self._gen:
                return
            aside = self.path.with_suffix(f".corrupt-{int(time.time())}")
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            try:
                for suffix in ("", "-wal", "-shm"):
                    p = Path(str(self.path) + suffix)
                    if p.exists():
                        p.rename(Path(str(aside) + suffix))
                private_file(self.path)
            except OSError as e:
                self._failed(e, "rebuild", gen)
                return
            self._gen += 1
        self.log.warning("%s %s is unreadable (%s); moved it to %s and started a new one", self.what, self.path,
                         getattr(err, "sqlite_errorname", None) or err, aside)  # fmt: skip


def _insert_many(sql: str, rows: list[tuple[Any, ...]]) -> list[tuple[str, list[Any]]]:
    """`INSERT ... VALUES (?, ...)` for many rows as a few statements of many VALUES each: a
    statement releases and retakes the GIL once, `executemany` once per row (and each time the
    writer takes the GIL back, the event loop's thread waits)."""
    head, one = sql.rsplit(" VALUES ", 1)
    per = max(1, 900 // (one.count("?") or 1))  # SQLite allows at least 999 parameters a statement
    return [(f"{head} VALUES {', '.join([one] * len(rows[i : i + per]))}", [p for r in rows[i : i + per] for p in r])
            for i in range(0, len(rows), per)]  # fmt: skip


def shared(path: Path, schema: tuple[str, ...], log: logging.Logger, what: str, without: str) -> SqliteFile:
    """The one `SqliteFile` of this process for `path` (every store or ledger on it shares its writer)."""
    where = os.path.abspath(path)
    with _registry_lock:
        f = _registry.get(where)
        if f is None:
            f = _registry[where] = SqliteFile(Path(path), schema, log, what, without)
        return f


def flush_all(timeout: float = 10.0) -> None:
    """Commit what every file has queued (at interpreter exit; also for tests and shutdowns)."""
    for f in list(_files):
        f.flush(timeout)


def _install_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if not _hooks_installed:
            atexit.register(flush_all)
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _hooks_installed = True


def _after_fork_in_child() -> None:
    global _registry_lock, _hooks_lock
    _registry_lock, _hooks_lock = threading.Lock(), threading.Lock()
    for f in list(_files):
        # the parent's thread does not exist here, and its connections must not be used or closed
        # in the child (https://sqlite.org/howtocorrupt.html#fork); what it queued is the parent's
        _forked_leftovers.append((f._reader, f._q))
        f._reader = None
        f._q = f._thread = None
        f._lock = threading.RLock()
        f._start_lock = threading.Lock()
        f._pending_lock = threading.Lock()
        f._hurry = threading.Event()
        f.pending = {}
