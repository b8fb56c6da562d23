"""The cache and ledger files under faults: locked, full, unwritable, corrupt, foreign rows, forks,
and SQLite writes kept off the caller's (event loop's) thread.

Faults are real SQLite states, made by real means:
- locked: a second sqlite3 connection holds the file (an exclusive lock blocks reads too; a
  BEGIN IMMEDIATE blocks writes), and every connection waits only 50 ms for a lock;
- full: `PRAGMA max_page_count` on every connection makes SQLite answer SQLITE_FULL;
- unwritable: the tests run as root, who ignores permission bits, so the folder is placed under a
  regular file: mkdir fails with ENOTDIR for root too;
- corrupt: garbage bytes where the database should be.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dsrs
from dsrs import LM
from dsrs.cache import KEY_VERSION, Cache, SqliteStore
from dsrs.ledger import Ledger, default_ledger
from dsrs.types import Completion, CostSource, LmUsage, ToolCall
from scripted import chat_reply

_connect = sqlite3.connect


@pytest.fixture
def short_locks(monkeypatch):
    """Every SQLite connection waits at most 50 ms for another connection's lock."""
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: _connect(*a, **{**kw, "timeout": 0.05}))


@pytest.fixture
def one_warning_per_run(monkeypatch):
    """'At most one warning a minute' becomes 'one warning', whatever the machine's speed."""
    from dsrs._sqlite import SqliteFile

    monkeypatch.setattr(SqliteFile, "warn_every", float("inf"))


def completion(text="Paris", **kw):
    return Completion(text, LmUsage(10, 2, 12, cost_msats=5, cost_source=CostSource.PRICE_TABLE, calls=1),
                      model="gpt-4o", provider="openai", **kw)  # fmt: skip


def moved_aside(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name)


# -- locked is not corrupt ------------------------------------------------------------------------


def test_a_cache_locked_by_another_connection_is_a_miss_and_is_never_moved_aside(tmp_path, caplog, short_locks):
    path = tmp_path / "c.sqlite3"
    store = SqliteStore(path)
    store.put("k", {"a": 1})
    store.close()
    holder = _connect(path, isolation_level=None)  # another program holds the whole file
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING, logger="dsrs.cache"):
            assert SqliteStore(path).get("k") is None  # a miss, not an exception
        assert moved_aside(tmp_path) == []  # the shared cache is healthy: it stays where it is
        assert "is locked by another process" in caplog.text and "SQLITE_BUSY" in caplog.text
    finally:
        holder.rollback()
        holder.close()
    assert SqliteStore(path).get("k") == {"a": 1}


def test_a_write_lock_held_elsewhere_skips_the_write_with_one_warning(tmp_path, caplog, short_locks,
                                                                     one_warning_per_run):  # fmt: skip
    path = tmp_path / "c.sqlite3"
    store = SqliteStore(path)
    store.put("kept", {"a": 1})
    store.flush()
    holder = _connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is writing and does not let go
    try:
        with caplog.at_level(logging.WARNING, logger="dsrs.cache"):
            for i in range(3):
                store.put(f"skipped{i}", {"a": i})
                store.flush()
            assert store.get("kept") == {"a": 1}  # WAL: reads go on beside the held write lock
    finally:
        holder.rollback()
        holder.close()
    assert len([r for r in caplog.records if "locked" in r.getMessage()]) == 1
    assert store.file.dropped == 3 and moved_aside(tmp_path) == []
    store.put("after", {"a": 9})
    store.flush()
    assert _connect(path).execute("SELECT count(*) FROM answers").fetchone() == (2,)


def test_a_locked_ledger_is_not_moved_aside_and_reading_it_raises_a_typed_error(tmp_path, short_locks):
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).record(completion())
    Ledger(path).close()
    holder = _connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(dsrs.DsrsError, match="could not read the usage ledger") as e:
            Ledger(path).rows()
        assert e.value.code == "SQLITE_BUSY" and "try again" in str(e.value)
    finally:
        holder.rollback()
        holder.close()
    assert moved_aside(tmp_path) == [] and len(Ledger(path).rows()) == 1


# -- full is not corrupt --------------------------------------------------------------------------


def test_a_full_disk_skips_cache_writes_with_one_warning_and_keeps_the_file(tmp_path, caplog, monkeypatch):
    def small_disk(*a, **kw):
        db = _connect(*a, **kw)
        db.execute("PRAGMA max_page_count = 16")  # 64 KB: SQLITE_FULL beyond it
        return db

    monkeypatch.setattr(sqlite3, "connect", small_disk)
    path = tmp_path / "c.sqlite3"
    store = SqliteStore(path)
    store.put("kept", {"text": "small"})
    store.flush()
    with caplog.at_level(logging.WARNING, logger="dsrs.cache"):
        store.put("big1", {"text": "x" * 200_000})
        store.flush()
        store.put("big2", {"text": "y" * 200_000})
        store.flush()
    assert moved_aside(tmp_path) == []
    assert len([r for r in caplog.records if "disk is full" in r.getMessage()]) == 1
    fresh = Cache(SqliteStore(path))
    assert fresh.store.get("kept") == {"text": "small"} and fresh.store.get("big1") is None


# -- unwritable: run without it, one warning ------------------------------------------------------


async def test_an_unwritable_cache_dir_runs_uncached_with_one_warning(scripted, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root can mkdir anywhere, but not under a regular file
    cache = Cache(SqliteStore(blocker / "dsrs" / "cache.sqlite3"))
    scripted.script(default=chat_reply("Paris"))
    lm = LM("openai/gpt-4o", base_url=scripted.url + "/v1", api_key="sk-x").with_cache(cache)
    with caplog.at_level(logging.WARNING, logger="dsrs.cache"):
        answers = [(await lm.acall(f"q{i}")).text for i in range(3)]
    assert answers == ["Paris"] * 3 and len(scripted.requests) == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "dsrs.cache"]
    assert len(warnings) == 1 and "could not write the dsrs cache" in warnings[0] and "DSRS_CACHE_DIR" in warnings[0]


def test_an_unwritable_dsrs_cache_dir_never_fails_a_program(scripted, tmp_path):
    """The default cache and ledger of a whole program (a fresh process) under an unusable DSRS_CACHE_DIR."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    scripted.script(default=chat_reply("[[ answer ]]\nParis\n\n[[ end ]]"))
    prog = (
        "import dsrs\n"
        f"lm = dsrs.LM('openai/gpt-4o-mini', base_url={scripted.url + '/v1'!r}, api_key='sk-x').with_cache(True)\n"
        "qa = dsrs.Predict('question -> answer', lm=lm)\n"
        "print([qa(question=q).answer for q in ('a', 'b', 'a')])\n"
    )
    env = dict(os.environ, DSRS_CACHE_DIR=str(blocker / "dsrs"))
    env.pop("DSRS_REDIS_URL", None)
    env.pop("DSRS_LEDGER", None)
    r = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['Paris', 'Paris', 'Paris']"
    assert r.stderr.count("could not write the dsrs cache") == 1, r.stderr
    assert r.stderr.count("could not write the usage ledger") == 1, r.stderr


def test_an_unwritable_ledger_drops_rows_with_one_warning_and_counts_them(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    led = Ledger(blocker / "ledger.sqlite3")
    with caplog.at_level(logging.WARNING, logger="dsrs.ledger"):
        for _ in range(3):
            led.record(completion())
    assert caplog.text.count("could not write the usage ledger") == 1
    assert led.dropped == 3 and led.rows() == []


# -- corrupt: moved aside, rebuilt ----------------------------------------------------------------


def test_a_corrupt_ledger_is_moved_aside_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"garbage, not SQLite " * 500)
    led = Ledger(path)
    with caplog.at_level(logging.WARNING, logger="dsrs.ledger"):
        led.record(completion(), lane="premium")
        led.record(completion("Rome"), lane="local")
        rows = led.rows()
    assert [(r.lane, r.total_tokens, r.cost_msats) for r in rows] == [("premium", 12, 5), ("local", 12, 5)]
    assert "is unreadable" in caplog.text and "SQLITE_NOTADB" in caplog.text
    (aside,) = moved_aside(tmp_path)
    assert aside.startswith("ledger.corrupt-") and (tmp_path / aside).read_bytes().startswith(b"garbage")


def test_a_cache_corrupted_on_disk_is_rebuilt_once(tmp_path, caplog):
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"\x00garbage" * 1000)
    store = SqliteStore(path)
    with caplog.at_level(logging.WARNING, logger="dsrs.cache"):
        store.put("k", {"a": 1})  # found corrupt by the writer: moved aside, the row written to the new file
        store.flush()
        assert store.get("k") == {"a": 1}
        assert SqliteStore(path).get("other") is None
    assert len(moved_aside(tmp_path)) == 1 and caplog.text.count("is unreadable") == 1
    assert _connect(path).execute("SELECT value FROM answers").fetchall() == [('{"a": 1}',)]


# -- foreign rows are misses ----------------------------------------------------------------------

GOOD = {**completion().to_json(), "v": KEY_VERSION}
FOREIGN = [
    "not json at all",
    "[1, 2, 3]",
    '"a string"',
    "null",
    json.dumps({"text": "Paris"}),  # no usage
    json.dumps({**GOOD, "text": 42}),
    json.dumps({**GOOD, "usage": "lots"}),
    json.dumps({**GOOD, "usage": {**GOOD["usage"], "prompt_tokens": "many"}}),
    json.dumps({**GOOD, "usage": {**GOOD["usage"], "completion_tokens": -2}}),
    json.dumps({**GOOD, "tool_calls": {"id": "x"}}),
    json.dumps({**GOOD, "tool_calls": [{"id": 1, "name": "f", "arguments": "{}"}]}),
    json.dumps({**GOOD, "reasoning": 7}),
    json.dumps({**GOOD, "v": KEY_VERSION + 1}),  # another key version's answer
]


@pytest.mark.parametrize("value", FOREIGN)
def test_a_foreign_cache_row_is_a_miss(tmp_path, value):
    path = tmp_path / "c.sqlite3"
    db = _connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)")
    db.execute("INSERT INTO answers VALUES ('k', ?, 0)", (value,))
    db.commit()
    assert Cache(SqliteStore(path)).get("k") is None


def test_a_foreign_table_is_a_miss_and_is_not_moved_aside(tmp_path, caplog):
    path = tmp_path / "c.sqlite3"
    db = _connect(path)
    db.execute("CREATE TABLE answers (id INTEGER PRIMARY KEY, body BLOB)")  # another program's table
    db.commit()
    cache = Cache(SqliteStore(path))
    with caplog.at_level(logging.WARNING, logger="dsrs.cache"):
        assert cache.get("k") is None
        cache.put("k", completion())
        cache.store.flush()  # type: ignore[attr-defined]
    assert moved_aside(tmp_path) == [] and "no such column" in caplog.text


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(sorted(GOOD) + ["usage." + k for k in sorted(GOOD["usage"])]), value=_json)
def test_any_row_is_a_well_typed_hit_or_a_miss(field, value):
    """Whatever another program put in a row: never an exception, never a badly typed answer."""
    row = json.loads(json.dumps(GOOD))
    if field.startswith("usage."):
        row["usage"][field[6:]] = value
    else:
        row[field] = value

    class Rows:
        def get(self, key):
            return row

        def put(self, key, value):
            raise AssertionError("not written")

    c = Cache(Rows()).get("k")  # type: ignore[arg-type]
    if c is not None:
        assert isinstance(c.text, str) and isinstance(c.model, str) and c.usage.cache_hit
        assert all(type(n) is int for n in (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens))
        assert all(isinstance(t, ToolCall) and isinstance(t.arguments, dict) for t in c.tool_calls)


# -- writes off the caller's thread ---------------------------------------------------------------


async def test_cache_and_ledger_writes_never_run_on_the_event_loop_thread(scripted, tmp_path, monkeypatch):
    statements: list[tuple[int, str]] = []

    def traced(*a, **kw):
        db = _connect(*a, **kw)
        db.set_trace_callback(lambda sql: statements.append((threading.get_ident(), sql)))
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    scripted.script(default=chat_reply("[[ answer ]]\nParis\n\n[[ end ]]"))
    lm = LM("openai/gpt-4o-mini", base_url=scripted.url + "/v1", api_key="sk-x")
    cache = Cache(SqliteStore(tmp_path / "c.sqlite3"))
    qa = dsrs.Predict("question -> answer", lm=lm.with_cache(cache))
    with dsrs.context(cache_dir=str(tmp_path)):
        for q in ("a", "b", "c"):
            assert (await qa.aforward(question=q)).answer == "Paris"
        cache.memory.clear()
        hit = await qa.aforward(question="a")  # found on disk, or among the writes not yet committed
        assert hit.lm_usage.cache_hit and len(scripted.requests) == 3
        assert len(default_ledger().rows()) == 4
    cache.store.flush()  # type: ignore[attr-defined]
    loop_thread = threading.get_ident()
    writes = [(tid, sql) for tid, sql in statements if sql.split()[0].upper() in ("INSERT", "BEGIN", "COMMIT")]
    assert any(sql.startswith("INSERT INTO calls") for _, sql in writes)  # the rows were written (batched) ...
    assert [sql for tid, sql in writes if tid == loop_thread] == []  # ... but not on the event loop's thread
    assert _connect(tmp_path / "c.sqlite3").execute("SELECT count(*) FROM answers").fetchone() == (3,)


def test_queued_writes_reach_the_file_at_interpreter_exit(tmp_path):
    prog = (
        "import sys; from dsrs.cache import SqliteStore; from dsrs.ledger import Ledger\n"
        "from dsrs.types import Completion, LmUsage\n"
        "s = SqliteStore(sys.argv[1] + '/c.sqlite3')\n"
        "for i in range(500): s.put(f'k{i}', {'i': i})\n"
        "Ledger(sys.argv[1] + '/ledger.sqlite3').record(Completion('x', LmUsage(1, 1, 2, calls=1)))\n"
    )  # no flush, no close: exit must write them
    r = subprocess.run([sys.executable, "-c", prog, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _connect(tmp_path / "c.sqlite3").execute("SELECT count(*) FROM answers").fetchone() == (500,)
    assert len(Ledger(tmp_path / "ledger.sqlite3").rows()) == 1


def test_a_forked_child_writes_with_its_own_writer_thread(tmp_path):
    path = tmp_path / "c.sqlite3"
    store = SqliteStore(path)
    store.put("parent", {"who": "parent"})
    store.flush()
    pid = os.fork()
    if pid == 0:  # the child: the parent's writer thread does not exist here
        code = 1
        try:
            store.put("child", {"who": "child"})
            code = 0 if store.file.flush(timeout=60) and store.get("child") == {"who": "child"} else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.put("parent2", {"who": "parent"})
    store.flush()
    rows = dict(_connect(path).execute("SELECT key, value FROM answers").fetchall())
    assert sorted(rows) == ["child", "parent", "parent2"]


def test_batched_writes_keep_order_and_the_last_value_of_a_key(tmp_path):
    store = SqliteStore(tmp_path / "c.sqlite3")
    led = Ledger(tmp_path / "ledger.sqlite3")
    for i in range(500):  # more rows than one statement holds
        store.put(f"k{i % 7}", {"i": i})
        led.record(completion(), lane=f"lane{i}")
    store.close()
    assert [SqliteStore(tmp_path / "c.sqlite3").get(f"k{j}") for j in range(7)] == [
        {"i": max(i for i in range(500) if i % 7 == j)} for j in range(7)]
    assert [r.lane for r in led.rows()] == [f"lane{i}" for i in range(500)]


def test_an_idle_writer_thread_ends_and_the_next_write_starts_another(tmp_path):
    import gc

    from dsrs import _sqlite

    store = SqliteStore(tmp_path / "c.sqlite3")
    store.file.idle_exit = 0.01  # this file only
    store.put("a", {"n": 1})
    first = store.file._thread
    first.join(timeout=60)  # it ends by itself once idle (no files' threads pile up in a long process)
    assert not first.is_alive() and store.file._thread is None
    store.put("b", {"n": 2})
    store.flush()
    assert store.file._thread is not first
    assert _connect(tmp_path / "c.sqlite3").execute("SELECT key FROM answers ORDER BY key").fetchall() == [("a",), ("b",)]
    store.close()
    where = os.path.abspath(tmp_path / "c.sqlite3")
    del store, first
    gc.collect()
    assert where not in _sqlite._registry  # a file no store uses is let go, with its connections
