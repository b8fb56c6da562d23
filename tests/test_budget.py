"""Budgets: reserve the worst case, settle to the actual cost, release on failure, never overspend."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsrs
from dsrs import LM, Budget, BudgetExceededError, pricing
from dsrs.worst_case import MESSAGE_OVERHEAD, default_max_tokens, estimate_prompt_tokens, worst_case
from dsrs.types import Message, Request
from scripted import Reply, chat_reply

PRICED = "openai/gpt-4o-mini"


def lm_for(scripted, fake_retry, model=PRICED):
    return LM(model).with_base_url(scripted.url).with_api_key("k").with_options(retry_policy=fake_retry)


def cost(prompt, completion, model="gpt-4o-mini"):
    return pricing.cost_msats("openai", model, prompt, completion)


def invariant(b: Budget) -> None:
    with b._lock:
        assert b._spent + b._reserved <= b.limit_msats, b


# -- the Budget object -----------------------------------------------------------------------------
def test_reserve_settle_release_bookkeeping():
    b = Budget(1000)
    r1 = b.reserve(600)
    assert (b.reserved_msats, b.available_msats) == (600, 400)
    with pytest.raises(BudgetExceededError) as e:
        b.reserve(401)
    assert e.value.needed_msats == 401 and e.value.limit_msats == 1000 and "400 msats left" in str(e.value)
    r2 = b.reserve(400)
    r1.settle(250)  # actual below the worst case frees the rest
    assert (b.spent_msats, b.reserved_msats, b.available_msats) == (250, 400, 350)
    r2.release()
    r2.release()  # once only
    r1.settle(999)
    assert (b.spent_msats, b.reserved_msats, b.open_reservations, b.calls, b.released) == (250, 0, 0, 1, 1)
    r3 = b.reserve(100)
    r3.settle(None)  # unknown actual cost keeps the whole reservation
    assert b.spent_msats == 350


def test_bad_limits_are_clear_errors():
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(dsrs.ConfigurationError, match="non-negative int of msats"):
            Budget(bad)  # type: ignore[arg-type]


def test_soft_limit_calls_the_hook_and_lets_the_call_through():
    seen = []
    b = Budget(100, soft=True, on_soft_limit=lambda bud, need: seen.append((bud, need)))
    b.reserve(80).settle(80)
    assert seen == []
    b.reserve(50).settle(40)
    assert seen == [(b, 50)] and b.spent_msats == 120
    assert b.can_cover(10_000) is None


def test_unpriced_calls_refused_unless_allowed():
    with pytest.raises(BudgetExceededError) as e:
        Budget(1000).reserve(None)
    assert e.value.code == "unpriced" and "allow_unpriced=True" in str(e.value)
    b = Budget(1000, allow_unpriced=True)
    b.reserve(None).settle(None)
    assert (b.spent_msats, b.unpriced_calls, b.calls) == (0, 1, 1)


def test_worst_case_estimate_is_high_and_documented():
    req = Request("gpt-4o-mini", (Message.system("be brief"), Message.user("héllo wörld" * 10)), max_tokens=50)
    n = estimate_prompt_tokens(req)
    assert n == len(b"be brief") + len("héllo wörld".encode() * 10) + 2 * MESSAGE_OVERHEAD  # a token per byte
    assert worst_case("openai", "gpt-4o-mini", req) == pricing.worst_case_msats("openai", "gpt-4o-mini", n, 50)
    no_max = Request("gpt-4o", req.messages)
    assert worst_case("openai", "gpt-4o", no_max) == pricing.worst_case_msats("openai", "gpt-4o", n, 16_384)
    assert default_max_tokens("some-unknown-model") == 131_072
    assert worst_case("openai", "not-in-table", req) is None
    assert worst_case("llamacpp", "anything", req) == 0


# -- through the LM call path (guard) -------------------------------------------------------------
async def test_lm_settles_to_the_actual_cost(scripted, fake_retry):
    scripted.script(chat_reply("ok", prompt_tokens=1200, completion_tokens=300))
    b = Budget(10_000_000)
    c = await lm_for(scripted, fake_retry).with_budget(b).with_max_tokens(500).acall("hello")
    assert c.usage.cost_msats == cost(1200, 300) > 0
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (cost(1200, 300), 0, 0)
    assert "budget" in lm_for(scripted, fake_retry).with_budget(b).options


async def test_hard_limit_refuses_before_any_request(scripted, fake_retry):
    scripted.script(default=chat_reply())
    lm = lm_for(scripted, fake_retry).with_max_tokens(1000)
    need = worst_case("openai", "gpt-4o-mini", lm.request("hello"))
    b = Budget(need - 1)
    with pytest.raises(BudgetExceededError) as e:
        await lm.with_budget(b).acall("hello")
    assert scripted.requests == []
    assert e.value.provider == "openai" and e.value.needed_msats == need
    assert (b.spent_msats, b.reserved_msats) == (0, 0)
    await lm.with_budget(Budget(need)).acall("hello")  # exactly enough is enough
    assert len(scripted.requests) == 1


async def test_provider_error_releases_unknown_outcome_keeps(scripted, fake_retry):
    b = Budget(10_000_000)
    lm = lm_for(scripted, fake_retry).with_budget(b).with_max_tokens(100)
    scripted.script(Reply(400, json={"error": {"message": "bad", "type": "invalid_request_error"}}))
    with pytest.raises(dsrs.BadRequestError):
        await lm.acall("hello")
    assert (b.spent_msats, b.reserved_msats, b.released) == (0, 0, 1)
    scripted.script(default=Reply(200, body=b'{"choices": [', headers={"Content-Type": "application/json"}))
    with pytest.raises(dsrs.ResponseFormatError):
        await lm.acall("hello")  # billed or not, nobody knows: the worst case stays booked
    assert b.spent_msats == worst_case("openai", "gpt-4o-mini", lm.request("hello")) and b.reserved_msats == 0


async def test_unpriced_model_with_hard_budget(scripted, fake_retry):
    scripted.script(default=chat_reply())
    lm = lm_for(scripted, fake_retry, "openai/x")
    with pytest.raises(BudgetExceededError, match="cannot bound this call.s cost"):
        await lm.with_budget(Budget(10**9)).acall("hi")
    assert scripted.requests == []
    b = Budget(10**9, allow_unpriced=True)
    c = await lm.with_budget(b).acall("hi")
    assert c.usage.cost_msats is None and b.unpriced_calls == 1 and b.spent_msats == 0


async def test_global_program_and_lm_budgets_all_reserve_once(scripted, fake_retry):
    scripted.script(default=chat_reply("ok", prompt_tokens=10, completion_tokens=5))
    g, p, own = Budget(10**9), Budget(10**9), Budget(10**9)
    lm = lm_for(scripted, fake_retry).with_max_tokens(20)
    dsrs.configure(budget=g)
    try:
        with dsrs.context(budget=p):
            await lm.with_budget(own).acall("hi")
            await lm.with_budget(p).acall("hi")  # the same budget twice counts once
        await lm.acall("hi")
    finally:
        dsrs.configure(budget=None)
    one = cost(10, 5)
    assert (own.spent_msats, p.spent_msats, g.spent_msats) == (one, 2 * one, one)
    # the program budget refuses: the LM's own reservation is given back
    tight = Budget(1)
    with dsrs.context(budget=tight):
        with pytest.raises(BudgetExceededError):
            await lm.with_budget(own).acall("hi")
    assert own.reserved_msats == 0 and own.spent_msats == one


async def test_stream_settles_at_end_and_abandoned_stream_keeps_the_worst_case(scripted, fake_retry):
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}},
        "[DONE]",
    ]
    b = Budget(10**9)
    lm = lm_for(scripted, fake_retry).with_budget(b).with_max_tokens(64)
    scripted.script(Reply(sse=chunks), Reply(sse=chunks))
    items = [i async for i in lm.astream("hi")]
    assert items[-1].usage.cost_msats == b.spent_msats == cost(30, 2)
    agen = lm.astream("hi")
    assert await agen.__anext__() == "Hi"
    await agen.aclose()  # the consumer walks away: the provider may go on generating (and billing)
    assert b.spent_msats == cost(30, 2) + worst_case("openai", "gpt-4o-mini", lm.request("hi"))
    assert b.reserved_msats == 0 and b.open_reservations == 0


async def test_cancelled_stream_keeps_the_worst_case(scripted, fake_retry):
    first = {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}
    scripted.script(Reply(sse=[first], chunk_delay=3600))
    b = Budget(10**9)
    lm = lm_for(scripted, fake_retry).with_budget(b).with_max_tokens(64)
    got = asyncio.Queue()

    async def consume():
        async for item in lm.astream("hi"):
            await got.put(item)

    task = asyncio.create_task(consume())
    assert await got.get() == "Hello"
    task.cancel()  # e.g. the gateway's client disconnected
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.spent_msats == worst_case("openai", "gpt-4o-mini", lm.request("hi"))
    assert (b.reserved_msats, b.open_reservations) == (0, 0)


async def test_an_error_that_says_what_was_spent_settles_it():
    from dsrs.budget import guard

    lm = LM(PRICED).with_max_tokens(100)
    req = lm.request("hi")
    wc = worst_case("openai", "gpt-4o-mini", req)
    cases = ((123, False, None, 123), (0, False, None, 0), (None, True, None, wc), (None, False, False, 0),
             (None, False, None, wc))  # the last: an error that does not say nothing was billed keeps the worst case
    for spent, unknown, billed, expect in cases:
        b = Budget(10**9)
        e = dsrs.errors.APIError("failed after paying")
        if billed is not None:
            e.billed = billed
        if spent is not None:
            e.spent_msats = spent
        if unknown:
            e.spent_unknown = True
        with pytest.raises(dsrs.errors.APIError):
            async with guard(lm.with_budget(b), req):
                raise e
        assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (expect, 0, 0), (spent, unknown)


async def test_many_concurrent_calls_never_overspend(scripted, fake_retry):
    scripted.script(default=chat_reply("ok", prompt_tokens=40, completion_tokens=20))
    lm = lm_for(scripted, fake_retry).with_max_tokens(64)
    wc = worst_case("openai", "gpt-4o-mini", lm.request("hello there"))
    b = Budget(wc * 25 + wc // 2)
    lm = lm.with_budget(b)

    async def one():
        try:
            await lm.acall("hello there")
            return True
        except BudgetExceededError:
            return False

    done = await asyncio.gather(*(one() for _ in range(200)))
    ok = sum(done)
    assert 25 <= ok < 200  # at least what the worst case allows; refusals once it runs out
    assert b.spent_msats == ok * cost(40, 20) <= b.limit_msats
    assert (b.reserved_msats, b.open_reservations) == (0, 0)
    assert len(scripted.requests) == ok  # a refused call sends nothing


def test_threads_hammering_one_budget():
    b = Budget(50_000)
    violations = []

    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(2000):
            wc = rnd.randint(0, 900)
            try:
                r = b.reserve(wc)
            except BudgetExceededError:
                continue
            with b._lock:
                if b._spent + b._reserved > b.limit_msats:
                    violations.append((b._spent, b._reserved))
            roll = rnd.random()
            if roll < 0.5:
                r.settle(rnd.randint(0, wc))
            elif roll < 0.8:
                r.release()
            else:
                r.settle(None)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert violations == []
    assert b.spent_msats <= b.limit_msats and b.reserved_msats == 0 and b.open_reservations == 0
    assert b.calls + b.released > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.integers(0, 5_000),
    ops=st.lists(
        st.tuples(st.integers(0, 1_500), st.integers(0, 1_500), st.sampled_from(["settle", "release", "unknown",
                                                                                 "cancel"]), st.integers(0, 3)),
        min_size=1,
        max_size=60,
    ),  # fmt: skip
)
def test_property_random_interleavings_never_overspend(limit, ops):
    """Tasks reserve, yield to each other a random number of times, then settle, release or vanish."""
    b = Budget(limit)
    booked = []

    async def task(wc, actual, outcome, yields):
        try:
            r = b.reserve(wc)
        except BudgetExceededError:
            assert wc > limit - b.spent_msats - b.reserved_msats
            return
        booked.append(r)
        invariant(b)
        try:
            for _ in range(yields):
                await asyncio.sleep(0)
                invariant(b)
            if outcome == "cancel":
                raise asyncio.CancelledError
        except asyncio.CancelledError:
            r.settle(None)
            return
        if outcome == "settle":
            r.settle(min(actual, wc))
        elif outcome == "release":
            r.release()
        else:
            r.settle(None)
        invariant(b)

    async def main():
        await asyncio.gather(*(task(*op) for op in ops))

    asyncio.run(main())
    assert b.reserved_msats == 0 and b.open_reservations == 0
    assert b.spent_msats <= limit
    assert b.calls + b.released == len(booked) and all(r.done for r in booked)


async def test_an_lm_that_prices_itself_is_reserved_at_its_own_worst_case(scripted, fake_retry):
    """E.g. a swarm LM whose worst case is its bid, not a price-table row."""
    from dsrs.lm import LM as _LM

    class Bidding(_LM):
        def worst_case_msats(self, req):
            return 700

    scripted.script(default=chat_reply("ok"))
    b = Budget(1000)
    lm = Bidding("openai/not-in-table").with_base_url(scripted.url).with_api_key("k").with_budget(b)
    c = await lm.acall("hi")
    assert c.usage.cost_msats is None and b.spent_msats == 700  # unknown actual cost: the bid stays booked
    with pytest.raises(BudgetExceededError, match="worst case 700 msats, 300 msats left"):
        await lm.acall("hi")
