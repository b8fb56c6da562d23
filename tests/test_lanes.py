"""LaneMux against fault-injecting local servers (one per lane) and the real llama.cpp server:
policies, every fallback rule, the circuit breaker, Retry-After wait vs switch, route decisions."""

from __future__ import annotations

import asyncio

import pytest

import dsrs
from conftest import FEW_SHOT
from dsrs import LM, Budget, LaneMux, StreamEnd
from dsrs.worst_case import worst_case
from dsrs.lanes import CircuitBreaker, NoLaneAvailableError, RouteDecision
from scripted import Reply, ScriptedServer, chat_reply


@pytest.fixture(scope="module")
def farm():
    servers = [ScriptedServer() for _ in range(3)]
    yield servers
    for s in servers:
        s.close()


@pytest.fixture
def srv(farm):
    return [s.script() for s in farm]


def lane_lm(s, model="gpt-4o-mini", **kw):
    return LM(f"openai/{model}", **kw).with_base_url(s.url).with_api_key("k")


def err(status, code=None, etype=None, headers=None):
    return Reply(status, json={"error": {"message": "nope", "type": etype, "code": code}}, headers=headers or {})


def mux3(srv, fake_retry, **kw):
    m = LaneMux().with_options(retry_policy=fake_retry)
    for name, s in zip("abc", srv, strict=True):
        m = m.add_lane(name, lane_lm(s, model=f"gpt-4o-mini-{name}"), **kw)
    return m


def chunks(*texts, usage=(3, 2)):
    out = [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in texts]
    out.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    out.append({"choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                         "total_tokens": sum(usage)}})  # fmt: skip
    return [*out, "[DONE]"]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- selection and route decisions -------------------------------------------------------------------
async def test_priority_answers_from_the_first_lane_with_a_full_route(srv, fake_retry):
    a, b, c = srv
    a.script(chat_reply("from a"))
    m = mux3(srv, fake_retry).with_max_tokens(7)
    out = await m.acall("hi")
    assert out.text == "from a" and out.provider == "openai"
    (seen,) = a.requests
    assert seen.json["model"] == "gpt-4o-mini-a" and seen.json["max_completion_tokens"] == 7
    assert b.requests == c.requests == []
    r = out.route
    assert isinstance(r, RouteDecision)
    assert (r.policy, r.lane, r.requested_lane, r.cached) == ("priority", "a", None, False)
    assert r.scores == {"a": 0.0, "b": 1.0, "c": 2.0} and r.skipped == {}
    assert [(x.lane, x.outcome) for x in r.attempts] == [("a", "ok")]
    assert r.to_json()["attempts"][0]["lane"] == "a" and "answered by a" in str(r)


async def test_5xx_is_retried_on_the_lane_then_falls_back(srv, fake_retry, sleeps):
    a, b, _ = srv
    a.script(default=err(500))
    b.script(chat_reply("from b"))
    out = await mux3(srv, fake_retry).acall("hi")
    assert out.text == "from b" and len(a.requests) == 3  # the lane's own 2 retries, by the mux
    assert sleeps == [0.5, 1.0]
    assert [(x.lane, x.outcome) for x in out.route.attempts] == [("a", "retry"), ("a", "retry"), ("a", "fallback"),
                                                                 ("b", "ok")]  # fmt: skip
    assert "ProviderUnavailableError" in out.route.attempts[0].error
    assert (out.route.retries, out.route.fallbacks) == (2, 1)


async def test_lane_retry_count_comes_from_the_lane_lm(srv, fake_retry, sleeps):
    a, b, _ = srv
    a.script(default=Reply(drop=True))  # connection reset
    b.script(chat_reply("from b"))
    m = LaneMux().with_options(retry_policy=fake_retry).add_lane("a", lane_lm(a).with_retries(0)).add_lane("b", lane_lm(b))
    out = await m.acall("hi")
    assert out.text == "from b" and len(a.requests) == 1 and sleeps == []
    assert "APIConnectionError" in out.route.attempts[0].error


async def test_malformed_json_and_stalls_fall_back(srv, fake_retry):
    a, b, c = srv
    a.script(default=Reply(200, body=b'{"choices": [', headers={"Content-Type": "application/json"}))
    b.script(default=Reply(delay=1.0, json={}))
    c.script(chat_reply("from c"))
    m = (LaneMux().with_options(retry_policy=fake_retry).add_lane("a", lane_lm(a).with_retries(0))
         .add_lane("b", lane_lm(b).with_timeout(0.2).with_retries(0)).add_lane("c", lane_lm(c)))  # fmt: skip
    out = await m.acall("hi")
    assert out.text == "from c"
    errs = [x.error.split(":")[0] for x in out.route.attempts[:2]]
    assert errs == ["ResponseFormatError", "TimeoutError"]


async def test_quota_switches_at_once(srv, fake_retry, sleeps):
    a, b, _ = srv
    a.script(err(429, code="insufficient_quota"))
    b.script(chat_reply("from b"))
    out = await mux3(srv, fake_retry).acall("hi")
    assert out.text == "from b" and len(a.requests) == 1 and sleeps == []
    assert out.route.attempts[0].outcome == "fallback" and "QuotaExceededError" in out.route.attempts[0].error


async def test_rate_limit_short_retry_after_waits_on_the_lane(srv, fake_retry, sleeps):
    a, b, _ = srv
    a.script(err(429, headers={"retry-after": "2"}), chat_reply("from a"))
    out = await mux3(srv, fake_retry).acall("hi")
    assert out.text == "from a" and sleeps == [2.0] and b.requests == []
    assert [(x.lane, x.outcome, x.waited_s) for x in out.route.attempts] == [("a", "wait", 2.0), ("a", "ok", 0.0)]


async def test_rate_limit_long_retry_after_switches_and_pauses_the_lane(srv, fake_retry, sleeps):
    a, b, _ = srv
    clock = Clock()
    a.script(err(429, headers={"retry-after": "30"}), chat_reply("a again"))
    b.script(default=chat_reply("from b"))
    m = (LaneMux().with_options(retry_policy=fake_retry).with_rate_limit_wait(10)
         .add_lane("a", lane_lm(a), circuit=CircuitBreaker(clock=clock)).add_lane("b", lane_lm(b)))  # fmt: skip
    out = await m.acall("hi")
    assert out.text == "from b" and sleeps == []
    out = await m.acall("hi")  # a is paused for its Retry-After
    assert out.text == "from b" and len(a.requests) == 1
    assert out.route.skipped["a"].startswith("rate limited for 30.0s")
    clock.t += 31
    assert (await m.acall("hi")).text == "a again"
    # with a threshold above the Retry-After, the same answer is waited out instead
    a.script(err(429, headers={"retry-after": "30"}), chat_reply("waited"))
    assert (await m.with_rate_limit_wait(60).acall("hi")).text == "waited" and sleeps == [30.0]


async def test_bad_request_does_not_fall_back(srv, fake_retry):
    a, b, _ = srv
    a.script(err(400, etype="invalid_request_error"))
    b.script(default=chat_reply("from b"))
    m = mux3(srv, fake_retry)
    with pytest.raises(dsrs.BadRequestError) as e:
        await m.acall("hi")
    assert b.requests == []
    assert [(x.lane, x.outcome) for x in e.value.route.attempts] == [("a", "raise")]
    assert m.lane("a").circuit._window.count(False) == 0  # the caller's mistake is not the lane's failure


async def test_context_window_falls_back_only_to_a_bigger_lane(srv, fake_retry):
    a, b, c = srv
    overflow = err(400, code="context_length_exceeded")
    a.script(overflow)
    b.script(default=chat_reply("from b"))
    c.script(chat_reply("from c"))
    m = (LaneMux().with_options(retry_policy=fake_retry).add_lane("a", lane_lm(a), context_window=8000)
         .add_lane("b", lane_lm(b)).add_lane("c", lane_lm(c), context_window=128_000))  # fmt: skip
    out = await m.acall("hi")
    assert out.text == "from c" and b.requests == []
    a.script(overflow)
    with pytest.raises(dsrs.ContextWindowExceededError) as e:  # no bigger lane: raised, not sent to b
        await LaneMux().add_lane("a", lane_lm(a), context_window=8000).add_lane("b", lane_lm(b)).acall("hi")
    assert [x.outcome for x in e.value.route.attempts] == ["raise"]
    assert b.requests == []


async def test_one_retry_budget_covers_retries_and_fallbacks(srv, fake_retry, sleeps):
    for s in srv:
        s.script(default=err(503))
    with pytest.raises(dsrs.ProviderUnavailableError) as e:
        await mux3(srv, fake_retry).with_retries(2).acall("hi")
    assert [len(s.requests) for s in srv] == [1, 1, 1]  # no spare budget for retries: each lane once
    assert [(x.lane, x.outcome) for x in e.value.route.attempts] == [("a", "fallback"), ("b", "fallback"),
                                                                     ("c", "raise")]  # fmt: skip
    for s in srv:
        s.script(default=err(503))
    with pytest.raises(dsrs.ProviderUnavailableError) as e:
        await mux3(srv, fake_retry).with_retries(1).acall("hi")
    assert [len(s.requests) for s in srv] == [1, 1, 0]
    # default budget: lanes + 1 retries after the first attempt
    for s in srv:
        s.script(default=err(503))
    with pytest.raises(dsrs.ProviderUnavailableError) as e:
        await mux3(srv, fake_retry).acall("hi")
    assert sum(len(s.requests) for s in srv) == 5
    assert [x.lane for x in e.value.route.attempts] == ["a", "a", "a", "b", "c"]


async def test_lane_without_key_is_skipped(srv, fake_retry):
    _, b, _ = srv
    b.script(chat_reply("from b"))
    m = LaneMux().add_lane("premium", LM("openai/gpt-4o")).add_lane("b", lane_lm(b))
    out = await m.acall("hi")
    assert out.text == "from b"
    assert "no API key for openai" in out.route.skipped["premium"] and "OPENAI_API_KEY" in out.route.skipped["premium"]
    with pytest.raises(NoLaneAvailableError) as e:
        await LaneMux().add_lane("premium", LM("openai/gpt-4o")).acall("hi")
    assert "premium" in e.value.route.skipped and "premium" in str(e.value)


# -- circuit breaker ---------------------------------------------------------------------------------
async def test_circuit_opens_half_opens_and_closes(srv, fake_retry):
    a, b, _ = srv
    clock = Clock()
    a.script(default=err(500))
    b.script(default=chat_reply("from b"))
    cb = CircuitBreaker(failures=2, cooldown_s=10, clock=clock)
    m = LaneMux().with_options(retry_policy=fake_retry).add_lane("a", lane_lm(a).with_retries(0), circuit=cb)
    m = m.add_lane("b", lane_lm(b))
    for _ in range(2):
        assert (await m.acall("hi")).text == "from b"
    assert cb.state == "open" and len(a.requests) == 2
    out = await m.acall("hi")
    assert len(a.requests) == 2 and out.route.skipped["a"] == "circuit open (probe in 10.0s)"
    clock.t += 10
    assert cb.state == "half_open"
    out = await m.acall("hi")  # the probe fails: open again
    assert len(a.requests) == 3 and cb.state == "open" and out.text == "from b"
    clock.t += 10
    a.script(default=chat_reply("a is back"))
    assert (await m.acall("hi")).text == "a is back" and cb.state == "closed"


def test_circuit_failure_rate_and_probe_slots():
    clock = Clock()
    cb = CircuitBreaker(failures=100, failure_rate=0.5, window=10, min_calls=10, cooldown_s=5, probes=1, clock=clock)
    for i in range(9):
        cb.failure() if i % 2 else cb.success()
    assert cb.state == "closed"
    cb.failure()  # 5 of 10 failed
    assert cb.state == "open" and not cb.allow() and cb.opened == 1
    clock.t += 5
    assert cb.allow() and not cb.allow()  # one probe at a time
    cb.neutral()
    assert cb.allow()
    cb.success()
    assert cb.state == "closed" and cb.allow() and cb.allow()


# -- policies ----------------------------------------------------------------------------------------
async def test_cheapest_uses_the_price_table_and_hints(srv, fake_retry):
    a, b, c = srv
    for s in srv:
        s.script(default=chat_reply("x"))
    m = (LaneMux().add_lane("big", lane_lm(a, "gpt-4o")).add_lane("unpriced", lane_lm(b, "mystery"))
         .add_lane("small", lane_lm(c, "gpt-4o-mini")).with_policy("cheapest").with_max_tokens(100))  # fmt: skip
    out = await m.acall("hello")
    req = LM("openai/gpt-4o").request("hello", max_tokens=100)
    assert out.route.lane == "small" and len(c.requests) == 1
    assert out.route.scores["big"] == worst_case("openai", "gpt-4o", req)
    assert out.route.scores["small"] == worst_case("openai", "gpt-4o-mini", req)
    assert out.route.scores["unpriced"] == float("inf")
    hinted = m.add_lane("swarm", lane_lm(a, "bid"), cost_msats=1)
    assert (await hinted.acall("hello")).route.lane == "swarm"


async def test_fastest_uses_observed_latency_then_hints(srv, fake_retry):
    a, b, _ = srv
    a.script(default=chat_reply("a"))
    b.script(default=chat_reply("b"))
    m = LaneMux().add_lane("a", lane_lm(a), latency_s=2.0).add_lane("b", lane_lm(b), latency_s=1.0).with_policy("fastest")
    assert (await m.acall("hi")).route.lane == "b"
    m.lane("b").latency.add(50.0)  # observed: b got slow (EWMA over the real call and this one)
    out = await m.acall("hi")
    assert out.route.lane == "a" and out.route.scores["b"] > 2.0


async def test_custom_scoring_function(srv, fake_retry):
    for s in srv:
        s.script(default=chat_reply("x"))

    def prefer_c(lane, req):
        return 0 if lane.name == "c" else 1

    out = await mux3(srv, fake_retry).with_policy(prefer_c).acall("hi")
    assert out.route.lane == "c" and out.route.policy == "prefer_c"
    with pytest.raises(dsrs.ConfigurationError, match="unknown lane policy"):
        LaneMux().with_policy("random")


async def test_capability_filters(srv, fake_retry):
    a, b, c = srv
    for s in srv:
        s.script(default=chat_reply("x"))
    m = (LaneMux().add_lane("notools", lane_lm(a), tools=False)
         .add_lane("deepseek", LM("deepseek/deepseek-chat").with_base_url(b.url).with_api_key("k"))
         .add_lane("any", lane_lm(c)))  # fmt: skip
    out = await m.acall("hi", tools=[dsrs.Tool("f")], response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}})
    assert out.route.lane == "any"
    assert out.route.skipped == {"notools": "does not support tools",
                                 "deepseek": "does not support structured (JSON-schema) output"}  # fmt: skip
    with pytest.raises(NoLaneAvailableError, match="context window is 10"):
        await LaneMux().add_lane("small", lane_lm(a), context_window=10).acall("hi", max_tokens=50)


# -- budgets -----------------------------------------------------------------------------------------
async def test_budget_that_cannot_cover_skips_the_lane(srv, fake_retry):
    a, b, _ = srv
    b.script(default=chat_reply("from b", prompt_tokens=10, completion_tokens=5))
    tight = Budget(1)
    m = LaneMux().add_lane("a", lane_lm(a), budget=tight).add_lane("b", lane_lm(b, "llama")).with_max_tokens(50)
    out = await m.acall("hi")
    assert out.route.lane == "b" and a.requests == []
    assert out.route.skipped["a"].startswith("budget: worst case")
    with pytest.raises(dsrs.BudgetExceededError, match="no lane's budget"):
        await m.with_lane("a").acall("hi")
    assert a.requests == []
    # a mux-wide budget is reserved by the lane that answers, once
    wide = Budget(10**9)
    out = await LaneMux().add_lane("b", lane_lm(b)).with_budget(wide).acall("hi", max_tokens=20)
    assert wide.spent_msats == out.usage.cost_msats > 0 and wide.reserved_msats == 0


async def test_concurrent_calls_through_lanes_never_overspend(srv, fake_retry):
    a, b, _ = srv
    a.script(default=chat_reply("a", prompt_tokens=40, completion_tokens=20))
    b.script(default=err(503))
    lm = lane_lm(a).with_max_tokens(64)
    wc = worst_case("openai", "gpt-4o-mini", lm.request("hello there"))
    budget = Budget(wc * 20)
    m = LaneMux().with_options(retry_policy=fake_retry).add_lane("b", lane_lm(b).with_retries(0)).add_lane("a", lm)
    m = m.with_budget(budget)

    async def one():
        try:
            await m.acall("hello there")
            return 1
        except (dsrs.BudgetExceededError, dsrs.ProviderUnavailableError, NoLaneAvailableError):
            return 0

    ok = sum(await asyncio.gather(*(one() for _ in range(150))))
    assert ok >= 20 and len(a.requests) == ok
    assert budget.spent_msats <= budget.limit_msats and budget.reserved_msats == 0 and budget.open_reservations == 0
    assert budget.spent_msats == len(a.requests) * pricing_cost(40, 20)


def pricing_cost(p, c):
    return dsrs.pricing.cost_msats("openai", "gpt-4o-mini", p, c)


# -- streaming ---------------------------------------------------------------------------------------
async def test_stream_falls_back_before_the_first_chunk_only(srv, fake_retry):
    a, b, _ = srv
    a.script(default=err(503))
    b.script(Reply(sse=chunks("Hel", "lo")))
    m = LaneMux().with_options(retry_policy=fake_retry).add_lane("a", lane_lm(a).with_retries(0)).add_lane("b", lane_lm(b))
    items = [i async for i in m.astream("hi")]
    assert items[:2] == ["Hel", "lo"] and isinstance(items[-1], StreamEnd)
    assert items[-1].completion.route.lane == "b" and items[-1].usage.total_tokens == 5
    assert b.requests[0].json["stream"] is True
    # cut after the first chunk: the error propagates, no other lane is tried
    a.script(Reply(sse=chunks("Hel", "lo")[:1], cut=True))
    b.script(default=Reply(sse=chunks("never")))
    got = []
    with pytest.raises(dsrs.DsrsError) as e:
        async for i in m.astream("hi"):
            got.append(i)
    assert got == ["Hel"] and b.requests == []
    assert e.value.route.attempts[-1].outcome == "raise"


async def test_stream_skips_lanes_that_cannot_stream(srv, fake_retry):
    a, b, _ = srv
    b.script(Reply(sse=chunks("ok")))
    m = LaneMux().add_lane("a", lane_lm(a), streaming=False).add_lane("b", lane_lm(b))
    items = [i async for i in m.astream("hi")]
    assert items[0] == "ok" and items[-1].completion.route.skipped == {"a": "does not stream"} and a.requests == []


# -- a mux is an LM ----------------------------------------------------------------------------------
async def test_lanes_nest_and_explicit_lane_pins(srv, fake_retry):
    a, b, c = srv
    a.script(default=err(500))
    b.script(default=chat_reply("from b"))
    c.script(default=chat_reply("from c"))
    inner = LaneMux().with_options(retry_policy=fake_retry).add_lane("a", lane_lm(a).with_retries(0)).add_lane("b", lane_lm(b))
    outer = LaneMux().add_lane("remote", inner).add_lane("local", lane_lm(c))
    out = await outer.acall("hi")
    assert out.text == "from b" and out.route.lane == "remote"
    nested = out.route.attempts[0].route
    assert nested.lane == "b" and [x.outcome for x in nested.attempts] == ["fallback", "ok"]
    assert (await outer.with_lane("local").acall("hi")).text == "from c"
    b.script(Reply(sse=chunks("streamed")))
    items = [i async for i in outer.astream("hi")]
    assert items[0] == "streamed" and items[-1].completion.route.attempts[0].route.lane == "b"
    with pytest.raises(dsrs.ConfigurationError, match="no lane named 'nope'"):
        outer.with_lane("nope")
    with pytest.raises(dsrs.ConfigurationError, match="belongs to a lane"):
        outer.with_base_url("http://x")
    with pytest.raises(dsrs.ConfigurationError, match="no lanes"):
        await LaneMux().acall("hi")


def test_configure_with_a_mux_and_sync_calls(srv, fake_retry):
    a, _, _ = srv
    a.script(default=chat_reply("sync a"))
    m = LaneMux().add_lane("a", lane_lm(a)).with_cache(True)
    dsrs.configure(m)
    try:
        assert dsrs.settings.current().lm is m
        assert m("hi").text == "sync a"
        again = m("hi")
        assert again.text == "sync a" and again.route.cached and len(a.requests) == 1
        a.script(Reply(sse=chunks("str", "eam")))
        items = list(m.stream("stream me"))
        assert items[:2] == ["str", "eam"] and items[-1].completion.route.lane == "a"
    finally:
        dsrs.configure(None)


async def test_failing_lane_falls_back_to_real_llamacpp(srv, fake_retry, llama_server):
    a, _, _ = srv
    a.script(default=err(502))
    local = LM("llamacpp/gemma", base_url=llama_server.url + "/v1").with_temperature(0).with_stop("\n")
    m = (LaneMux().with_options(retry_policy=fake_retry).add_lane("premium", lane_lm(a, "gpt-4o").with_retries(1))
         .add_lane("local", local)).with_max_tokens(8)  # fmt: skip
    out = await m.acall(FEW_SHOT)
    assert out.text == " Paris" and out.route.lane == "local" and out.usage.cost_msats == 0
    assert len(a.requests) == 2
    items = [i async for i in m.astream(FEW_SHOT)]
    assert "".join(i for i in items if isinstance(i, str)) == " Paris"
    assert items[-1].completion.route.lane == "local"


async def test_rate_limit_without_retry_after_switches_or_backs_off_on_the_last_lane(srv, fake_retry, sleeps):
    a, b, _ = srv
    a.script(err(429))
    b.script(chat_reply("from b"))
    m = LaneMux().with_options(retry_policy=fake_retry).add_lane("a", lane_lm(a)).add_lane("b", lane_lm(b))
    assert (await m.acall("hi")).text == "from b" and sleeps == []
    a.script(err(429), chat_reply("a after backoff"))
    out = await m.with_lane("a").acall("hi")  # no other lane: back off and retry
    assert out.text == "a after backoff" and sleeps == [0.5]
    assert [x.outcome for x in out.route.attempts] == ["retry", "ok"]


async def test_x_should_retry_false_moves_on_at_once(srv, fake_retry, sleeps):
    a, b, _ = srv
    a.script(err(503, headers={"x-should-retry": "false"}))
    b.script(chat_reply("from b"))
    out = await mux3(srv, fake_retry).acall("hi")
    assert out.text == "from b" and len(a.requests) == 1 and sleeps == []


# -- issue 14: 5xx Retry-After, a stuck half-open probe, the mux's own timeout ----------------------
async def test_5xx_with_retry_after_falls_back_at_once_while_another_lane_is_free(srv, fake_retry, sleeps):
    a, b, _ = srv
    a.script(default=err(503, headers={"retry-after": "60"}))
    b.script(chat_reply("from b"))
    out = await mux3(srv, fake_retry).acall("hi")
    assert out.text == "from b" and len(a.requests) == 1 and sleeps == []  # nothing waited out
    assert [(x.lane, x.outcome) for x in out.route.attempts] == [("a", "fallback"), ("b", "ok")]
    # with no other lane, the lane is retried as the provider's SDK would (tests/test_wire_formats.py)
    a.script(err(503, headers={"retry-after": "60"}), chat_reply("a again"))
    m = LaneMux().with_options(retry_policy=fake_retry).add_lane("a", lane_lm(a))
    assert (await m.acall("hi")).text == "a again" and sleeps == [60.0]


class Picky:
    """An LM of the user's own that post-processes a real LM's answer (and has a bug: KeyError)."""

    provider, model = "openai", "gpt-4o-mini"

    def __init__(self, lm):
        self.lm = lm

    async def acall(self, prompt, **opts):
        c = await self.lm.acall(prompt, **opts)
        return {"ok": c}[c.text]  # KeyError unless the answer is "ok"

    async def astream(self, prompt, **opts):
        yield await self.acall(prompt, **opts)


async def test_half_open_probe_ending_in_an_untyped_error_or_a_cancel_does_not_stick(srv, fake_retry):
    a, b, _ = srv
    clock = Clock()
    cb = CircuitBreaker(failures=1, cooldown_s=10, clock=clock)
    a.script(default=err(500))
    b.script(default=chat_reply("from b"))
    m = (LaneMux().with_options(retry_policy=fake_retry)
         .add_lane("a", Picky(lane_lm(a).with_retries(0)), circuit=cb).add_lane("b", lane_lm(b)))  # fmt: skip
    assert (await m.acall("hi")).text == "from b" and cb.state == "open"
    clock.t += 10
    a.script(default=chat_reply("not ok"))
    with pytest.raises(KeyError):  # the probe raises a non-dsrs error: raised, and the probe is over
        await m.acall("hi")
    assert cb.state == "open"  # counted as a failure, not stuck half-open with its slot taken
    clock.t += 10
    a.script(default=Reply(delay=3600, json={}))
    call = asyncio.ensure_future(m.acall("hi"))
    while not a.requests:
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert cb.state == "half_open" and cb.allow()  # the cancelled probe gave its slot back
    cb.neutral()
    a.script(default=chat_reply("ok"))
    assert (await m.acall("hi")).text == "ok" and cb.state == "closed"


async def test_mux_timeout_bounds_every_lane_retry_and_wait(srv, sleeps):
    a, b, _ = srv
    a.script(default=Reply(delay=3600, json={}))  # stalls: the lane's own timeout (60 s default) is far away
    b.script(default=chat_reply("from b"))
    m = LaneMux().add_lane("a", lane_lm(a)).add_lane("b", lane_lm(b)).with_timeout(0.3)
    with pytest.raises(dsrs.TimeoutError) as e:
        await m.acall("hi")
    assert "0.3 s" in str(e.value) and e.value.fallback and b.requests == []
    # waits count too: a 429 whose Retry-After is waited out on a lone lane, then another one
    a.script(default=err(429, headers={"retry-after": "4"}))
    with pytest.raises(dsrs.TimeoutError):
        await LaneMux().add_lane("a", lane_lm(a).with_retries(5)).with_timeout(0.3).acall("hi")
    # a stream: the deadline covers the chunks after the first
    a.script(Reply(sse=chunks("one", "two"), chunk_delay=3600))
    with pytest.raises(dsrs.TimeoutError):
        async for _ in LaneMux().add_lane("a", lane_lm(a)).with_timeout(0.3).astream("hi"):
            pass
    # within its deadline, a mux with a timeout answers as usual
    out = await m.with_lane("b").with_timeout(30).acall("hi")
    assert out.text == "from b" and out.route.lane == "b"
