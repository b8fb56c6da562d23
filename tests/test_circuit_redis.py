"""Lane circuits shared through a real redis-server (dsrs.redis_state.circuit): several LaneMux
instances (each with its own Redis connection, like gateway replicas) and two gateways.

One clock (tests/test_lanes.py's `Clock`) is injected into every circuit: cooldowns and the shared
state's refresh move only when a test moves it. Nothing here asserts on elapsed time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from typing import Any

import openai
import pytest

from dsrs import LM, LaneMux
from dsrs.redis_state import RedisState
from dsrs.redis_state.circuit import RedisCircuit
from gateway_fixture import CLIENT_KEY, InProcessGateway
from redis_fixture import RedisServer, redis_server  # noqa: F401 - the fixture
from scripted import Reply, ScriptedServer, chat_reply


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def pair():
    servers = [ScriptedServer() for _ in range(2)]
    yield servers
    for s in servers:
        s.close()


@pytest.fixture
def ab(pair):
    return [s.script() for s in pair]


def err(status: int) -> Reply:
    return Reply(status, json={"error": {"message": "down", "type": "server_error", "code": None}})


def lm(s: ScriptedServer) -> LM:
    return LM("openai/gpt-4o-mini").with_base_url(s.url).with_api_key("k").with_retries(0)


def replica(url: str, prefix: str, a: Any, b: Any, clock: Clock, **kw: Any) -> tuple[LaneMux, RedisCircuit]:
    """One 'gateway replica': its own Redis connection, a mux over lanes a and b, a's circuit shared."""
    kw = {"failures": 2, "cooldown_s": 10, "refresh_s": 1, **kw}
    cb = RedisCircuit(RedisState(url, prefix=prefix), "a", clock=clock, **kw)
    mux = LaneMux().add_lane("a", a, circuit=cb).add_lane("b", lm(b))
    return mux, cb


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


async def test_a_lane_one_replica_opens_is_skipped_by_the_other_and_recovery_closes_it_everywhere(
        redis_server: RedisServer, ab: list[ScriptedServer]) -> None:  # fmt: skip
    a, b = ab
    clock, p = Clock(), prefix()
    one, c1 = replica(redis_server.url, p, lm(a), b, clock)
    two, c2 = replica(redis_server.url, p, lm(a), b, clock)
    a.script(default=err(500))
    b.script(default=chat_reply("from b"))
    assert (await two.acall("hi")).text == "from b"  # two has seen lane a fail once (below its threshold)
    assert len(a.requests) == 1 and c2.state == "closed"
    for _ in range(2):
        assert (await one.acall("hi")).text == "from b"
    assert len(a.requests) == 3 and c1.state == "open"
    raw = c1.redis.client.hgetall(p + "circuit:a")
    assert float(raw["until"]) == clock.t + 10 and raw["probes"] == "0"
    clock.t += 1  # two's view of the shared state is now a refresh old: it reads Redis and skips a
    out = await two.acall("hi")
    assert out.text == "from b" and len(a.requests) == 3
    assert out.route.skipped["a"] == "circuit open (probe in 9.0s)" and c2.state == "open"
    assert c2.opened == 0  # two never counted enough failures itself: it follows Redis
    # after the cooldown one probe goes to a (from either replica); it succeeds and closes a everywhere
    clock.t += 9
    a.script(default=chat_reply("a is back"))
    assert (await two.acall("hi")).text == "a is back" and c2.state == "closed"
    assert c1.redis.client.exists(p + "circuit:a") == 0
    clock.t += 1
    assert (await one.acall("hi")).text == "a is back" and c1.state == "closed"
    assert len(a.requests) == 2  # since a came back: the probe and one's call


async def test_a_failed_probe_reopens_for_everyone(redis_server: RedisServer, ab: list[ScriptedServer]) -> None:
    a, b = ab
    clock, p = Clock(), prefix()
    one, c1 = replica(redis_server.url, p, lm(a), b, clock, failures=1)
    two, c2 = replica(redis_server.url, p, lm(a), b, clock, failures=1)
    a.script(default=err(503))
    b.script(default=chat_reply("from b"))
    await one.acall("hi")
    clock.t += 10  # half-open
    assert c2.state == "half_open"
    await two.acall("hi")  # two's probe fails: open again, for one too
    assert len(a.requests) == 2 and c2.state == "open" and c2.opened == 1
    assert float(c1.redis.client.hget(p + "circuit:a", "until")) == clock.t + 10
    clock.t += 1
    assert c1.state == "open" and (await one.acall("hi")).text == "from b" and len(a.requests) == 2


class Gate:
    """An LM of the test's own around lane a's real LM: each call waits until the test opens the gate."""

    def __init__(self, inner: LM) -> None:
        self.inner = inner
        self.open = threading.Event()
        self.entered = 0

    async def acall(self, prompt: Any, **opts: Any) -> Any:
        self.entered += 1
        while not self.open.is_set():
            await asyncio.sleep(0.005)
        return await self.inner.acall(prompt, **opts)

    async def astream(self, prompt: Any, **opts: Any) -> Any:
        yield await self.acall(prompt, **opts)


def test_half_open_lets_exactly_one_probe_through_across_replicas_under_concurrency(
        redis_server: RedisServer, ab: list[ScriptedServer]) -> None:  # fmt: skip
    """Two replicas in two threads, 16 concurrent calls each, right after the cooldown: one call
    probes lane a (held in flight by the gate), the 31 others go to b; the probe's success closes a."""
    a, b = ab
    clock, p = Clock(), prefix()
    gate = Gate(lm(a))
    replicas = [replica(redis_server.url, p, gate, b, clock, failures=1) for _ in range(2)]
    a.script(default=err(500))
    b.script(default=chat_reply("from b"))
    gate.open.set()
    asyncio.run(replicas[0][0].acall("hi"))  # a fails once: open everywhere
    assert len(a.requests) == 1 and gate.entered == 1
    gate.open.clear()
    gate.entered = 0
    a.script(default=chat_reply("a is back"))
    clock.t += 10
    done: list[str] = []
    lock = threading.Lock()

    def run(mux: LaneMux) -> list[str]:
        async def one() -> str:
            text = (await mux.acall("hi")).text
            with lock:
                done.append(text)
            return text

        async def all16() -> list[str]:
            return list(await asyncio.gather(*(one() for _ in range(16))))

        return asyncio.run(all16())

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(run, m) for m, _ in replicas]
        try:
            deadline = time.monotonic() + 60  # a bound on the wait, not an assertion on time
            while len(done) < 31 and time.monotonic() < deadline and not any(f.done() for f in futs):
                time.sleep(0.01)
            assert len(done) == 31 and set(done) == {"from b"}  # everyone but the probe went to b...
            assert gate.entered == 1 and len(a.requests) == 0  # ...while exactly one probe waits at a
        finally:
            gate.open.set()
        out = [x for f in futs for x in f.result(60)]
    assert sorted(out) == ["a is back"] + ["from b"] * 31 and len(a.requests) == 1
    clock.t += 1
    assert [c.state for _, c in replicas] == ["closed", "closed"]


def test_a_probe_that_says_nothing_gives_its_slot_back_and_a_dead_prober_loses_it(redis_server: RedisServer) -> None:
    clock, p = Clock(), prefix()
    one = RedisCircuit(RedisState(redis_server.url, prefix=p), "x", failures=1, cooldown_s=10, probe_lease_s=60,
                       clock=clock)  # fmt: skip
    two = RedisCircuit(RedisState(redis_server.url, prefix=p), "x", failures=1, cooldown_s=10, probe_lease_s=60,
                       clock=clock)  # fmt: skip
    one.failure()
    clock.t += 10
    assert one.allow() and not two.allow() and not one.allow()
    one.neutral()  # cancelled: the slot is free again
    assert two.allow() and not one.allow()
    clock.t += 60  # two took the slot and never reported back (it died): after the lease, another may probe
    assert one.allow()
    one.success()
    assert one.state == "closed" and two.allow()  # two still saw half-open: Redis says closed


def test_redis_down_falls_back_to_the_local_breaker_and_rejoins(ab: list[ScriptedServer],
                                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    a, b = ab
    srv = RedisServer.start()
    try:
        clock, p = Clock(), prefix()
        one, c1 = replica(srv.url, p, lm(a), b, clock, retry_s=0)
        two, c2 = replica(srv.url, p, lm(a), b, clock, retry_s=0)
        a.script(default=err(500))
        b.script(default=chat_reply("from b"))
        srv.stop(save=False)
        with caplog.at_level(logging.WARNING, logger="dsrs.redis"):
            for _ in range(4):  # calls still work; lane a opens after 2 failures, here alone
                assert asyncio.run(one.acall("hi")).text == "from b"
        assert len(a.requests) == 2 and c1.state == "open" and not c1.shared
        lost = [r for r in caplog.records if "circuit of lane 'a'" in r.getMessage()]
        assert len(lost) == 1 and "own breaker decides" in lost[0].getMessage()  # logged once
        srv.restart()  # empty: the open decided alone is published when one sees Redis again
        deadline = time.monotonic() + 30
        while not c1.shared and time.monotonic() < deadline:  # a background ping finds Redis back
            c1.closed  # noqa: B018 - a look at the circuit, as a call makes
            time.sleep(0.01)
        assert c1.shared and c1.state == "open"
        assert float(c1.redis.client.hget(p + "circuit:a", "until")) == clock.t + 10
        out = asyncio.run(two.acall("hi"))
        assert out.text == "from b" and len(a.requests) == 2 and c2.state == "open"
    finally:
        srv.kill()


# -- the gateway: [circuit] in the config, two gateways on one Redis --------------------------------
def test_two_gateways_share_a_lane_circuit(redis_server: RedisServer, ab: list[ScriptedServer],
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    a, b = ab
    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream-secret-42")
    flaky, steady = f"flaky-{uuid.uuid4().hex[:8]}", f"steady-{uuid.uuid4().hex[:8]}"  # keys of their own in Redis
    doc = {
        "redis": {"url": redis_server.url},
        "cache": {"enabled": False},
        "circuit": {"failures": 2, "cooldown_s": 600, "refresh_s": 600},
        "lanes": {n: {"lm": "openai/gpt-4o-mini", "base_url": s.url + "/v1", "api_key_env": "UPSTREAM_KEY",
                      "options": {"retries": 0}} for n, s in ((flaky, a), (steady, b))},
        "models": {"m": {"lanes": [flaky, steady]}, "m2": {"lanes": [flaky, steady]}},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
        "gateway": {"max_connections_per_client": 0},
    }  # fmt: skip
    gws = [InProcessGateway(doc) for _ in range(2)]
    try:
        c1 = gws[0].runtime._circuits[flaky]
        assert isinstance(c1, RedisCircuit) and c1.failures == 2 and c1.cooldown_s == 600 and c1.refresh_s == 600
        assert gws[0].runtime.routes["m"].target.lane(flaky).circuit is gws[0].runtime.routes["m2"].target.lane(flaky).circuit  # fmt: skip
        a.script(default=err(502))
        b.script(default=chat_reply("steady"))
        clients = [openai.OpenAI(base_url=g.url + "/v1", api_key=CLIENT_KEY, max_retries=0) for g in gws]
        for _ in range(2):
            r = clients[0].chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
            assert r.choices[0].message.content == "steady"
        assert len(a.requests) == 2 and c1.state == "open"
        for model in ("m", "m2", "m"):  # the other gateway never sends to flaky: it read the open from Redis
            r = clients[1].chat.completions.create(model=model, messages=[{"role": "user", "content": "q"}])
            assert r.choices[0].message.content == "steady"
        assert len(a.requests) == 2 and len(b.requests) == 5
        assert gws[1].runtime._circuits[flaky].state == "open"
    finally:
        for g in gws:
            g.close()


def test_circuit_config_is_validated() -> None:
    from dsrs.errors import ConfigurationError
    from dsrs.gateway.config import parse

    base = {"lanes": {"x": {"lm": "openai/gpt-4o-mini"}}, "gateway": {"require_keys": False}}
    assert parse(base, env={}).circuit.shared is True
    cfg = parse({**base, "circuit": {"failures": 3, "cooldown_s": 5, "shared": False}}, env={})
    assert (cfg.circuit.failures, cfg.circuit.cooldown_s, cfg.circuit.shared) == (3, 5.0, False)
    for bad, msg in (({"failures": 0}, "failures must be at least 1"), ({"cooldown_s": -1}, "cooldown_s must be"),
                     ({"probes": 2}, "unknown setting 'probes'")):  # fmt: skip
        with pytest.raises(ConfigurationError, match=msg):
            parse({**base, "circuit": bad}, env={})
