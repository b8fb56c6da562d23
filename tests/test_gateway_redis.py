"""Shared state through a real redis-server: the Redis budget behaves exactly like the in-process one,
two gateway processes share one budget and one cache, and Redis dying mid-run fails closed."""

from __future__ import annotations

import concurrent.futures
import random
import time
import uuid
from typing import Any

import openai
import pytest

from dsrs.budget import Budget
from dsrs.cache import Cache
from dsrs.errors import BudgetExceededError
from dsrs.redis_state import RateLimiter, RedisBudget, RedisLedger, RedisState, RedisStore
from dsrs.types import Completion, LmUsage
from gateway_fixture import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, GatewayProcess, InProcessGateway, get
from redis_fixture import RedisServer, redis_server  # noqa: F401 - the fixture
from scripted import chat_reply


@pytest.fixture(autouse=True)
def _upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream-secret-42")


def _state(srv: RedisServer) -> RedisState:
    return RedisState(srv.url, prefix=f"t{uuid.uuid4().hex[:8]}:")


# -- the pieces ----------------------------------------------------------------------------------
def test_redis_budget_matches_the_in_process_budget(redis_server: RedisServer) -> None:
    """The same random sequence of reserve/settle/release on both gives the same books and verdicts."""
    rnd = random.Random(7)
    for soft, allow in ((False, False), (False, True), (True, False)):
        local = Budget(5_000, soft=soft, allow_unpriced=allow, on_soft_limit=lambda b, n: None)
        shared = RedisBudget(_state(redis_server), "b", 5_000, soft=soft, allow_unpriced=allow,
                             on_soft_limit=lambda b, n: None)  # fmt: skip
        held: list[tuple[Any, Any]] = []
        for _ in range(300):
            op = rnd.random()
            if op < 0.5 or not held:
                wc = None if rnd.random() < 0.1 else rnd.randrange(0, 1500)
                out = []
                for b in (local, shared):
                    try:
                        out.append(b.reserve(wc))
                    except BudgetExceededError as e:
                        out.append(e.code)
                assert [x if isinstance(x, str) else "ok" for x in out] == [x if isinstance(x, str) else "ok" for x in out[::-1]]
                if not isinstance(out[0], str):
                    held.append((out[0], out[1]))
            else:
                a, b = held.pop(rnd.randrange(len(held)))
                how = rnd.random()
                actual = rnd.choice([None, 0, a.amount // 2, a.amount])
                for r in (a, b):
                    r.release() if how < 0.3 else r.settle(actual)
                    r.settle(5)  # a second finish is a no-op on both
            counts = shared.state_counts()
            assert (counts["spent"], counts["reserved"], counts["open"]) == (local.spent_msats, local.reserved_msats,
                                                                             local.open_reservations)  # fmt: skip
            assert (shared.calls, shared.released, shared.unpriced_calls) == (local.calls, local.released,
                                                                              local.unpriced_calls)  # fmt: skip
            assert shared.available_msats == local.available_msats
        if not soft:
            assert local.spent_msats + local.reserved_msats <= 5_000


def test_redis_budget_is_atomic_across_clients(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    budgets = [RedisBudget(RedisState(redis_server.url, prefix=prefix), "shared", 10_000) for _ in range(4)]

    def worker(b: RedisBudget) -> int:
        got = 0
        for _ in range(60):
            try:
                r = b.reserve(300)
            except BudgetExceededError:
                continue
            r.settle(290)
            got += 1
        return got

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        total = sum(ex.map(worker, budgets * 2))
    c = budgets[0].state_counts()
    assert c["spent"] == 290 * total <= 10_000 and c["open"] == 0 and c["reserved"] == 0
    assert total == 34  # 34 * 290 = 9860; a 35th needs 300 more than the 140 left


def test_redis_store_shares_answers_between_caches(redis_server: RedisServer) -> None:
    state = _state(redis_server)
    a, b = Cache(store=RedisStore(state)), Cache(store=RedisStore(state))
    c = Completion("Paris", LmUsage(5, 1, 6, cost_msats=3, calls=1), model="m", provider="p", id="x")
    a.put("k1", c)
    hit = b.get("k1")
    assert hit is not None and hit.text == "Paris" and hit.usage.cache_hit and hit.usage.cost_msats == 0
    assert b.get("k2") is None
    raw = state.client.get(state.key("cache", "k1"))
    assert raw.startswith("{") and '"Paris"' in raw  # JSON text, never pickle


def test_rate_limiter_and_ledger(redis_server: RedisServer) -> None:
    state = _state(redis_server)
    one, two = RateLimiter(state), RateLimiter(RedisState(redis_server.url, prefix=state.prefix))
    t = 1_000_000 * 60 + 5.0
    assert [one.hit("k", 3, t), two.hit("k", 3, t), one.hit("k", 3, t)] == [None, None, None]
    assert two.hit("k", 3, t) == 55.0
    assert one.hit("k", 3, t + 60) is None  # the next minute
    led = RedisLedger(state)
    for lane, cost in (("local", 0), ("remote", 601), ("remote", 599)):
        led.record(Completion("x", LmUsage(5, 1000, 1005, cost_msats=cost, calls=1), provider="openai", model="m"),
                   lane=lane, program="key:alice")  # fmt: skip
    s = {x.key: (x.calls, x.cost_msats, x.completion_tokens) for x in led.summary(by="lane")}
    assert s == {"local": (1, 0, 1000), "remote": (2, 1200, 2000)}
    assert [x.key for x in led.summary(by="program")] == ["key:alice"]


# -- gateway processes sharing one Redis --------------------------------------------------------
def _doc(scripted: Any, srv: RedisServer, **redis: Any) -> dict[str, Any]:
    return {
        "redis": {"url": srv.url, **redis},
        "lanes": {"remote": {"lm": "openai/gpt-4o-mini", "base_url": scripted.url + "/v1",
                             "api_key_env": "UPSTREAM_KEY", "options": {"retries": 0}}},
        "budgets": {"shared": {"limit_msats": 10_000}},
        "gateway": {"budget": "shared"},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}, "bob": {"key_env": "OTHER_KEY", "rpm": 3}},
    }  # fmt: skip


def test_two_gateway_processes_share_one_budget_and_cache(scripted: Any) -> None:
    srv = RedisServer.start()
    gws: list[GatewayProcess] = []
    try:
        # each call: worst case ~603 msats (1000 output tokens), actual 601
        scripted.script(default=chat_reply("ok", prompt_tokens=5, completion_tokens=1000))
        doc = _doc(scripted, srv)
        gws = [GatewayProcess(doc), GatewayProcess(doc)]
        clients = [openai.OpenAI(base_url=g.url + "/v1", api_key=CLIENT_KEY, max_retries=0) for g in gws]

        def call(i: int) -> Any:
            try:
                r = clients[i % 2].chat.completions.create(
                    model="remote", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=1000)
                return r.model_extra["dsrs"]["cost_msats"]
            except openai.RateLimitError as e:
                return e.code

        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            out = list(ex.map(call, range(48)))
        costs = [x for x in out if isinstance(x, int)]
        assert set(out) - set(costs) == {"budget_exceeded"}
        state = RedisState(srv.url)
        books = RedisBudget(state, "shared", 10_000).state_counts()
        assert books["spent"] == sum(costs) == 601 * len(costs) <= 10_000
        assert books["open"] == 0 and books["reserved"] == 0
        assert len(scripted.requests) == len(costs) >= 14  # nothing refused was sent; no overspend either
        # the answers were cached in Redis: a question answered by one process is a free hit on the other
        i = next(i for i, x in enumerate(out) if isinstance(x, int))
        n = len(scripted.requests)
        r = clients[(i + 1) % 2].chat.completions.create(
            model="remote", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=1000)
        assert r.model_extra["dsrs"]["cache_hit"] is True and r.model_extra["dsrs"]["cost_msats"] == 0
        assert r.choices[0].message.content == "ok" and len(scripted.requests) == n
        # rate limits are shared too: bob has 3 a minute across both processes
        bob = [openai.OpenAI(base_url=g.url + "/v1", api_key=OTHER_KEY, max_retries=0) for g in gws]
        codes = []
        for i in range(4):
            try:
                bob[i % 2].chat.completions.create(model="remote", messages=[{"role": "user", "content": "question 1"}],
                                                   max_tokens=1000)  # fmt: skip
                codes.append("ok")
            except openai.RateLimitError as e:
                codes.append(e.code)
        assert codes[:3] == ["ok", "ok", "ok"]
        assert codes[3] in ("rate_limit_exceeded", "ok")  # "ok" only if a minute boundary fell in between
        # the usage ledger has every call, by client key and lane
        want = len(costs) + 1 + codes.count("ok")  # the gateways write the ledger behind the answers
        for _ in range(500):
            rows = RedisLedger(state).rows()
            if len(rows) >= want:
                break
            time.sleep(0.01)
        assert sum(r.program == "key:alice" for r in rows) == len(costs) + 1
        assert sum(r.program == "key:bob" for r in rows) == codes.count("ok")
        assert {r.lane for r in rows} == {"remote"}
        # no secret reached Redis: not the client keys, not the upstream key
        blob = []
        for k in state.client.scan_iter(count=1000):
            kind = state.client.type(k)
            blob.append(k)
            if kind == "string":
                blob.append(state.client.get(k))
            elif kind == "hash":
                blob.append(repr(state.client.hgetall(k)))
            elif kind == "stream":
                blob.append(repr(state.client.xrange(k)))
        text = "\n".join(blob)
        assert "dsrs:usage" in text and "dsrs:budget:shared" in text and "dsrs:cache:" in text
        for secret in (CLIENT_KEY, OTHER_KEY, "sk-upstream-secret-42"):
            assert secret not in text
        status, metrics = get(gws[0].url + "/metrics", ADMIN_KEY)
        assert "dsrs_gateway_redis_up 1" in metrics
        for g in gws:  # SIGTERM: a clean stop
            err = g.close()
            assert g.proc.returncode == 0, err[-2000:]
    finally:
        for g in gws:
            g.close()
        srv.kill()


def test_redis_dying_mid_run_fails_closed_and_health_says_so(scripted: Any) -> None:
    srv = RedisServer.start()
    gw = InProcessGateway(_doc(scripted, srv))
    try:
        scripted.script(default=chat_reply("ok", prompt_tokens=5, completion_tokens=10))
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "a"}], max_tokens=20)
        status, health = get(gw.url + "/health", ADMIN_KEY)
        assert status == 200 and health["redis"]["up"] is True and health["budget_mode"] == "shared"
        srv.kill()
        with pytest.raises(openai.InternalServerError) as ei:
            client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "b"}], max_tokens=20)
        assert ei.value.status_code == 503 and ei.value.code == "budget_unavailable"
        assert len(scripted.requests) == 1  # refused before sending
        status, health = get(gw.url + "/health", ADMIN_KEY)
        assert status == 503 and health["status"] == "degraded"
        assert health["redis"]["up"] is False and health["budget_mode"] == "fail_closed"
        status, metrics = get(gw.url + "/metrics", ADMIN_KEY)
        assert "dsrs_gateway_redis_up 0" in metrics
    finally:
        gw.close()
        srv.kill()


def test_redis_restarted_empty_refuses_and_health_says_the_books_are_lost(scripted: Any) -> None:
    srv = RedisServer.start()
    gw = InProcessGateway(_doc(scripted, srv))
    try:
        scripted.script(default=chat_reply("ok", prompt_tokens=5, completion_tokens=10))
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "a"}], max_tokens=20)
        srv.restart()  # empty: what was spent is gone from Redis
        with pytest.raises(openai.APIStatusError) as ei:
            client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "b"}], max_tokens=20)
        assert ei.value.code == "budget_unavailable" and len(scripted.requests) == 1  # refused before sending
        status, health = get(gw.url + "/health", ADMIN_KEY)
        assert status == 503 and health["status"] == "degraded" and health["budget_mode"] == "books_lost"
        assert health["redis"]["up"] is True and "shared" in health["budgets_lost"]
    finally:
        gw.close()
        srv.kill()


def test_redis_dying_with_on_down_local_books_in_process(scripted: Any) -> None:
    srv = RedisServer.start()
    gw = InProcessGateway(_doc(scripted, srv, on_down="local"))
    try:
        scripted.script(default=chat_reply("ok", prompt_tokens=5, completion_tokens=10))
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "a"}], max_tokens=20)
        srv.kill()
        r = client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "b"}], max_tokens=20)
        assert r.choices[0].message.content == "ok" and len(scripted.requests) == 2
        status, health = get(gw.url + "/health", ADMIN_KEY)
        assert status == 200 and health["budget_mode"] == "local_fallback" and health["redis"]["up"] is False
        local = gw.runtime.budgets["shared"]._local
        assert local is not None and local.spent_msats == r.model_extra["dsrs"]["cost_msats"] > 0
    finally:
        gw.close()
        srv.kill()


def test_ledger_entries_wait_out_a_redis_outage() -> None:
    srv = RedisServer.start()
    try:
        state = RedisState(srv.url)
        led = RedisLedger(state)
        c = Completion("x", LmUsage(5, 7, 12, cost_msats=9, calls=1), provider="openai", model="m")
        led.record(c, lane="a", program="key:k")
        assert led.flush()
        srv.stop()
        for _ in range(3):
            led.record(c, lane="b", program="key:k")
        assert led.flush(timeout=0.5) is False and state.up is False
        srv.restart()  # an empty Redis: only what was queued during the outage arrives
        assert led.flush()
        assert [(r.lane, r.cost_msats, r.total_tokens) for r in led.rows()] == [("b", 9, 12)] * 3
        led.close()
    finally:
        srv.kill()


def test_on_down_local_hands_outage_spending_to_redis_when_it_returns() -> None:
    """4,000 spent before the outage and 5,000 during it: once Redis is back it knows 9,000 (and the
    reservation still open), so a 5,000 call is refused there, by every process."""
    srv = RedisServer.start()
    try:
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        b = RedisBudget(RedisState(srv.url, prefix=prefix), "b", 10_000, on_down="local", outage_msats=6_000)
        b.reserve(4_000).settle(4_000)
        assert b.state_counts()["spent"] == 4_000 and b.state_counts()["held"] == 6_000
        srv.stop(save=True)
        b.reserve(5_000).settle(5_000)  # booked in-process
        held = b.reserve(600)  # still open when Redis returns
        assert b.state.up is False and b._local is not None and b._local.spent_msats == 5_000
        srv.restart()  # Redis comes back with its data (the 4,000)
        with pytest.raises(BudgetExceededError) as ei:
            b.reserve(5_000)
        assert ei.value.code == "budget_exceeded" and b.state.up is True and b._local is None
        other = RedisBudget(RedisState(srv.url, prefix=prefix), "b", 10_000)  # another process's view
        assert other.state_counts() == {"spent": 9_000, "reserved": 600, "open": 1, "calls": 2, "released": 0,
                                        "unpriced_calls": 0, "held": 400, "expired": 0}  # fmt: skip
        held.settle(500)  # the reservation booked locally settles in Redis
        assert (other.spent_msats, other.reserved_msats, other.open_reservations) == (9_500, 0, 0)
        b.reserve(500).settle(500)
        with pytest.raises(BudgetExceededError):
            other.reserve(1)
        assert b.state_counts()["spent"] == 10_000
    finally:
        srv.kill()


def test_on_down_local_books_an_outage_on_the_allowance_redis_set_aside() -> None:
    """An outage is booked on the allowance Redis held for this process (here 6,000 of the 6,000 left)."""
    srv = RedisServer.start()
    try:
        b = RedisBudget(RedisState(srv.url, prefix=f"t{uuid.uuid4().hex[:8]}:"), "b", 10_000, on_down="local",
                        outage_msats=8_000)  # fmt: skip
        b.reserve(4_000).settle(4_000)
        srv.stop()
        with pytest.raises(BudgetExceededError) as ei:
            b.reserve(6_001)
        assert ei.value.code == "budget_exceeded" and b.state.up is False
        b.reserve(6_000).settle(6_000)
    finally:
        srv.kill()
