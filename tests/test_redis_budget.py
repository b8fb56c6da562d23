"""A Redis budget is never overspent when Redis fails: killed (SIGKILL) mid-load and restarted with its
data (append-only file) or empty, rolled back to an old snapshot, with two clients (each its own
connection pool, as two processes) sharing one budget. Every test runs a real redis-server on
127.0.0.1 and asserts that what was billed stays within the limit."""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid
from typing import Any

import pytest

from dsrs.errors import APIConnectionError, BudgetExceededError, ConfigurationError
from dsrs.redis_state import RedisBudget, RedisState
from redis_fixture import RedisServer


class AofRedis(RedisServer):
    """A redis-server with `appendonly yes` and `appendfsync always`: a restart keeps every write."""

    @staticmethod
    def _spawn(port: int, workdir: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [RedisServer.binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", workdir, "--protected-mode", "yes"],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _pair(srv: RedisServer, limit: int, **kw: Any) -> list[RedisBudget]:
    """Two clients of one budget, each with its own connection pool (as two processes)."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    return [RedisBudget(RedisState(srv.url, prefix=prefix, timeout=2.0), "b", limit, **kw) for _ in range(2)]


def test_on_down_local_never_books_more_than_redis_set_aside_even_with_stale_counters() -> None:
    """Client A last heard from Redis when nothing was spent; B then spent 8,000 of 10,000. Redis dies:
    both book locally as much as they can. The old fallback gave A the whole 10,000 it remembered
    (and B its 2,000): 20,000 billed on a 10,000 budget."""
    srv = RedisServer.start()
    try:
        a, b = _pair(srv, 10_000, on_down="local")
        billed = 0
        a.reserve(0).settle(0)  # A's last answer: nothing spent
        for _ in range(8):
            b.reserve(1_000).settle(1_000)
            billed += 1_000
        srv.stop()
        for client in (a, b):
            while True:
                try:
                    r = client.reserve(100)
                except BudgetExceededError:
                    break
                r.settle(100)
                billed += 100
        assert a.state.up is False and b.state.up is False
        assert billed <= 10_000
        assert billed > 8_000  # the allowances are usable during the outage
    finally:
        srv.kill()


def test_settles_that_miss_redis_are_booked_when_it_returns() -> None:
    """Reservations in flight when Redis died settle while it is down: once it is back (with its data),
    they are booked; the old code left them reserved forever."""
    srv = RedisServer.start()
    try:
        (b,) = _pair(srv, 10_000)[:1]
        held = [b.reserve(2_000) for _ in range(3)]
        srv.stop(save=True)
        held[0].settle(1_500)
        held[1].release()
        held[2].settle(None)  # unknown: the whole reservation
        srv.restart()
        other = RedisBudget(RedisState(srv.url, prefix=b.state.prefix), "b", 10_000)
        assert b.state_counts()["open"] == 0
        c = other.state_counts()
        assert (c["spent"], c["reserved"], c["open"], c["calls"], c["released"]) == (3_500, 0, 0, 2, 1)
        assert other.available_msats == 6_500
    finally:
        srv.kill()


def test_reservations_of_a_silent_process_expire_as_spent_and_a_late_settle_corrects_them() -> None:
    srv = RedisServer.start()
    try:
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        gone = RedisBudget(RedisState(srv.url, prefix=prefix), "b", 10_000, lease_s=0.05)
        alive = RedisBudget(RedisState(srv.url, prefix=prefix), "b", 10_000)
        r1, r2 = gone.reserve(3_000), gone.reserve(2_000)
        time.sleep(0.2)  # past the lease: any later script books both as spent (they may have been billed)
        alive.reserve(0).release()
        c = alive.state_counts()
        assert (c["spent"], c["reserved"], c["open"], c["expired"]) == (5_000, 0, 0, 2)
        r1.settle(1_000)  # the process was only slow: its settle books the truth
        r2.release()
        c = alive.state_counts()
        assert (c["spent"], c["reserved"], c["open"], c["expired"], c["calls"]) == (1_000, 0, 0, 0, 1)
        assert alive.available_msats == 9_000
    finally:
        srv.kill()


def test_redis_restarted_empty_refuses_until_the_books_are_restored() -> None:
    """The old code started an empty Redis from zero: 8,000 spent, then 10,000 more."""
    srv = RedisServer.start()
    try:
        a, b = _pair(srv, 10_000)
        a.reserve(8_000).settle(8_000)
        b.reserve(0).release()
        srv.restart()  # empty
        for client in (a, b, RedisBudget(RedisState(srv.url, prefix=a.state.prefix), "b", 10_000)):
            with pytest.raises(BudgetExceededError) as ei:
                client.reserve(1_000)  # the third is a process started after the restart
            assert ei.value.code == "budget_unavailable" and "restore" in (ei.value.hint or "")
        assert a.available_msats == 0 and a.lost and "restarted empty" in a.lost
        a.restore(8_000)  # the operator, from the providers' bills
        assert b.available_msats == 2_000 and b.lost is None  # seen before any booking (LaneMux asks this first)
        with pytest.raises(BudgetExceededError) as ei:
            b.reserve(2_001)
        assert ei.value.code == "budget_exceeded"
        b.reserve(2_000).settle(2_000)
        assert a.spent_msats == 10_000
    finally:
        srv.kill()


def test_redis_rolled_back_to_an_old_snapshot_is_refused() -> None:
    srv = RedisServer.start()
    try:
        a, b = _pair(srv, 10_000, on_down="local")  # each may spend 1,000 (a tenth) during an outage
        a.reserve(2_000).settle(2_000)
        a.state.client.save()  # the snapshot a restart will load: 2,000 spent
        b.reserve(5_000).settle(5_000)
        a.reserve(0).release()
        srv.restart()  # comes back from the snapshot, without B's 5,000
        billed = 7_000
        for client in (a, b):  # each books on its allowance only, as if Redis were down
            while True:
                try:
                    client.reserve(250).settle(250)
                except BudgetExceededError:
                    break
                billed += 250
        assert billed <= 10_000
        assert a.lost and "snapshot" in a.lost
    finally:
        srv.kill()


def test_restore_without_redis_and_bad_options_are_typed_errors() -> None:
    srv = RedisServer.start()
    try:
        (b,) = _pair(srv, 10_000)[:1]
        for bad in ({"outage_msats": -1}, {"outage_msats": 1.5}, {"lease_s": 0}):
            with pytest.raises(ConfigurationError):
                RedisBudget(b.state, "b", 10_000, **bad)
        srv.stop()
        with pytest.raises(APIConnectionError) as ei:
            b.restore(0)
        assert ei.value.code == "redis_unavailable" and "Redis is unreachable" in str(ei.value)
    finally:
        srv.kill()


def test_a_raising_on_soft_limit_releases_the_redis_reservation() -> None:
    """As in-process: the callback stopped the call, so nothing was sent and nothing stays booked
    (the old code left the reservation open in Redis for good)."""
    srv = RedisServer.start()
    try:

        def stop(budget: Any, needed: int) -> None:
            raise RuntimeError("over the soft limit: stop")

        (b,) = _pair(srv, 1_000, soft=True, on_soft_limit=stop)[:1]
        b.reserve(800).settle(800)
        with pytest.raises(RuntimeError):
            b.reserve(500)
        c = b.state_counts()
        assert (c["spent"], c["reserved"], c["open"], c["released"]) == (800, 0, 0, 1)
    finally:
        srv.kill()


class _Load:
    """Four threads per client book random calls; the upstream "bills" each call up to its worst case."""

    def __init__(self, budgets: list[RedisBudget], seed: int) -> None:
        self.budgets = budgets
        self.rnd = random.Random(seed)
        self.lock = threading.Lock()
        self.billed = 0

    def call(self, b: RedisBudget, rnd: random.Random) -> None:
        wc = rnd.randrange(200, 1_500)
        try:
            r = b.reserve(wc)
        except BudgetExceededError:
            return
        cost = rnd.randrange(wc // 2, wc + 1)
        with self.lock:
            self.billed += cost
        r.settle(cost)

    def run(self, ops: int, kill_at: int | None = None, srv: RedisServer | None = None) -> None:
        """`ops` calls per thread; with `kill_at`, the thread that sees that much billed SIGKILLs Redis
        (others are mid-call), and every thread then makes `ops` more calls against the dead Redis."""
        killed = threading.Event()

        def worker(b: RedisBudget, rnd: random.Random) -> None:
            n = before = 0
            while n < ops:
                self.call(b, rnd)
                if kill_at is None or killed.is_set():
                    n += 1
                    continue
                before += 1
                with self.lock:
                    if (self.billed >= kill_at or before > 2_000) and not killed.is_set():
                        assert srv is not None
                        srv.stop()
                        killed.set()

        threads = [threading.Thread(target=worker, args=(b, random.Random(self.rnd.randrange(1 << 30))))
                   for b in self.budgets for _ in range(4)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if kill_at is not None:
            assert killed.is_set() and self.billed >= kill_at


@pytest.mark.parametrize("on_down", ["fail_closed", "local"])
def test_kill_mid_load_then_restart_with_the_append_only_file(on_down: str) -> None:
    srv = AofRedis.start()
    try:
        budgets = _pair(srv, 100_000, on_down=on_down)
        load = _Load(budgets, 1)
        load.run(10, kill_at=60_000, srv=srv)
        assert load.billed <= 100_000
        srv.restart()  # with every write it acknowledged
        load.run(60)
        assert load.billed <= 100_000
        budgets[1].state_counts()  # hands over what it booked while Redis could not
        c = budgets[0].state_counts()
        assert budgets[0].state.up and c["spent"] + c["reserved"] >= load.billed  # nothing billed was forgotten
    finally:
        srv.kill()


@pytest.mark.parametrize("on_down", ["fail_closed", "local"])
def test_kill_mid_load_then_restart_empty(on_down: str) -> None:
    srv = RedisServer.start()
    try:
        budgets = _pair(srv, 100_000, on_down=on_down)
        load = _Load(budgets, 2)
        load.run(10, kill_at=60_000, srv=srv)
        srv.restart()  # empty
        before = load.billed
        load.run(30)
        assert load.billed <= 100_000
        if on_down == "fail_closed":
            assert load.billed == before  # refused until restored
        budgets[0].restore(load.billed)  # the operator, from the bills
        load.run(60)
        assert load.billed <= 100_000
        c = budgets[1].state_counts()
        assert c["spent"] + c["reserved"] >= load.billed
    finally:
        srv.kill()


@pytest.mark.parametrize(("persist", "on_down"), [(True, "local"), (False, "local"), (False, "fail_closed")])
def test_two_gateways_never_overspend_when_redis_is_killed_mid_load(
    scripted: Any, monkeypatch: pytest.MonkeyPatch, persist: bool, on_down: str
) -> None:
    """Two gateways (each its own runtime and Redis connections, as two processes) share a 10,000 msats budget; each upstream answer bills
    601 msats. Redis is SIGKILLed once 8 answers were billed and restarted (from its append-only file,
    or empty) while the clients keep calling: what the scripted upstream billed stays within the limit."""
    import openai

    from gateway_fixture import CLIENT_KEY, InProcessGateway
    from scripted import chat_reply

    srv = (AofRedis if persist else RedisServer).start()
    gws: list[InProcessGateway] = []
    try:
        scripted.script(default=chat_reply("ok", prompt_tokens=5, completion_tokens=1000))
        doc = {
            "redis": {"url": srv.url, "on_down": on_down},
            "lanes": {"remote": {"lm": "openai/gpt-4o-mini", "base_url": scripted.url + "/v1",
                                 "api_key_env": "UPSTREAM_KEY", "options": {"retries": 0}}},
            "budgets": {"shared": {"limit_msats": 10_000}},
            "gateway": {"budget": "shared"},
            "keys": {"alice": {"key_env": "CLIENT_KEY"}},
        }  # fmt: skip
        monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream-test")
        gws = [InProcessGateway(doc), InProcessGateway(doc)]  # each its own runtime and Redis pool
        clients = [openai.OpenAI(base_url=g.url + "/v1", api_key=CLIENT_KEY, max_retries=0) for g in gws]
        lock, killed = threading.Lock(), threading.Event()

        def call(i: int) -> None:
            try:
                clients[i % 2].chat.completions.create(
                    model="remote", messages=[{"role": "user", "content": f"question {uuid.uuid4().hex}"}],
                    max_tokens=1000)  # fmt: skip
            except openai.APIStatusError as e:
                assert e.code in ("budget_exceeded", "budget_unavailable"), e

        def worker(i: int, after_kill: int) -> None:
            for _ in range(40):  # until the kill (or the budget runs out first, which the asserts catch)
                call(i)
                with lock:
                    if not killed.is_set() and len(scripted.requests) >= 8:
                        srv.stop()
                        killed.set()
                if killed.is_set():
                    break
            for _ in range(after_kill):
                call(i)

        def phase(after_kill: int) -> None:
            threads = [threading.Thread(target=worker, args=(i, after_kill)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        phase(2)
        assert killed.is_set() and len(scripted.requests) >= 8
        assert 601 * len(scripted.requests) <= 10_000
        srv.restart()
        phase(4)
        assert 601 * len(scripted.requests) <= 10_000
    finally:
        for g in gws:
            g.close()
        srv.kill()
