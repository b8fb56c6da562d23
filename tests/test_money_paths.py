"""Money through the whole call path: whatever fails, every request a provider may have billed is
booked, and no budget is ever overspent.

A scripted provider bills each request it receives by a rule a real provider follows: an answer it
started (a 200, whole or malformed, an error inside a 200, a cut stream, a stall the client gave up
on, a dropped connection) is billed at its usage; an HTTP error answer is not. Hypothesis draws the
faults, the mix of calls (plain, streamed, abandoned streams, cancelled at any await, through an LM
or a LaneMux), usage hooks that raise and the budget's size; the calls run concurrently, and
afterwards the budget must hold `billed <= spent <= limit` with nothing left reserved.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsrs
from dsrs import LM, Budget, LaneMux, pricing
from dsrs.worst_case import worst_case
from dsrs.retry import RetryPolicy
from scripted import Reply, ScriptedServer, Seen

PROMPT = "What is two plus two?"
MAX_TOKENS = 40
PROMPT_TOKENS = 12  # what the scripted provider counts: below dsrs's upper estimate, as a real tokenizer's


def cost(completion: int) -> int:
    c = pricing.cost_msats("openai", "gpt-4o-mini", PROMPT_TOKENS, completion)
    assert c is not None
    return c


def usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion}


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


# fault -> (reply for a plain request, reply for a streamed one, billed?)
def replies(fault: str, completion: int) -> tuple[Reply, Reply, bool]:
    answer = {"id": "c1", "model": "gpt-4o-mini", "usage": usage(completion),
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}]}
    words = [chunk("four "), chunk("is "), chunk("the "), chunk("answer", "stop")]
    stream = Reply(sse=[*words, {"choices": [], "usage": usage(completion)}, "[DONE]"])
    error = {"error": {"message": "boom", "type": "server_error", "code": None}}
    table: dict[str, tuple[Reply, Reply, bool]] = {
        "ok": (Reply(json=answer), stream, True),
        "429": (Reply(status=429, json={"error": {"message": "slow down", "type": "rate_limit_error"}},
                      headers={"retry-after-ms": "1"}), Reply(status=429, json=error), False),
        "quota": (Reply(status=429, json={"error": {"message": "no credit", "code": "insufficient_quota"}}),
                  Reply(status=429, json={"error": {"message": "no credit", "code": "insufficient_quota"}}), False),
        "500": (Reply(status=500, json=error), Reply(status=503, json=error), False),
        "stall": (Reply(json=answer, delay=3600), Reply(sse=[*words], chunk_delay=3600), True),
        "drop": (Reply(drop=True), Reply(sse=words[:2], cut=True), True),
        "malformed": (Reply(body=b'{"choices": [{"message": '), Reply(sse=["{not json"]), True),
        "inband": (Reply(json=error), Reply(sse=[words[0], error]), True),
        "untyped": (Reply(json={**answer, "usage": "lots"}), Reply(sse=[words[0], {"choices": "x"}]), True),
    }
    return table[fault]


class BillingServer(ScriptedServer):
    """Answers plain and streamed requests from their own queues and bills what it receives."""

    def __init__(self) -> None:
        self.queues: dict[bool, deque[tuple[Reply, int]]] = {False: deque(), True: deque()}
        self.billed = 0
        self.run = 0
        super().__init__()

    def load(self, plan: list[tuple[str, int]]) -> str:
        """Queue this example's answers; returns the run id its requests must carry (a request of an
        earlier example that arrives late is answered but neither billed here nor given these answers)."""
        self.run += 1
        self.billed = 0
        self.requests.clear()
        for q in self.queues.values():
            q.clear()
        for fault, completion in plan:
            plain, streamed, billed = replies(fault, completion)
            bill = cost(MAX_TOKENS if fault == "stall" else completion) if billed else 0
            self.queues[False].append((plain, bill))
            self.queues[True].append((streamed, bill))
        return str(self.run)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        self.requests.append(Seen(request.method, request.path, {}, {}, body, raw))
        q = self.queues[bool(body.get("stream"))]
        if q and request.headers.get("x-run") == str(self.run):
            reply, bill = q.popleft()
        else:
            reply, bill = Reply(status=500, json={"error": {"message": "no answer for this request"}}), 0
        self.billed += bill
        return await self.answer(request, reply)


@pytest.fixture(scope="module")
def billing() -> Any:
    s = BillingServer()
    yield s
    s.close()


async def _no_sleep(_: float) -> None:
    return None


CALLS = st.sampled_from(["call", "stream", "abandon", "cancel"])
FAULTS = st.sampled_from(["ok", "ok", "ok", "429", "quota", "500", "stall", "drop", "malformed", "inband", "untyped"])


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    plan=st.lists(st.tuples(FAULTS, st.integers(1, MAX_TOKENS)), min_size=1, max_size=24),
    calls=st.lists(st.tuples(CALLS, st.integers(0, 6)), min_size=1, max_size=8),
    budget_calls=st.integers(0, 10),
    via_mux=st.booleans(),
    hook_raises=st.booleans(),
)
def test_every_billed_request_is_booked_and_no_budget_is_overspent(
    billing: BillingServer, plan: list[tuple[str, int]], calls: list[tuple[str, int]], budget_calls: int,
    via_mux: bool, hook_raises: bool,
) -> None:
    run = billing.load(plan)
    retry = RetryPolicy(2, _no_sleep, lambda: 0.0)
    base = (LM("openai/gpt-4o-mini").with_base_url(billing.url).with_api_key("sk-test-key")
            .with_max_tokens(MAX_TOKENS).with_timeout(0.5).with_options(retry_policy=retry, headers={"x-run": run}))  # fmt: skip
    wc = worst_case("openai", "gpt-4o-mini", base.request(PROMPT))
    assert wc is not None and wc >= cost(MAX_TOKENS)
    budget = Budget(wc * budget_calls + wc // 2)
    lm: Any = (LaneMux().add_lane("a", base).add_lane("b", base).with_budget(budget) if via_mux
               else base.with_budget(budget))  # fmt: skip

    def hook(c: Any) -> None:
        if hook_raises:
            raise RuntimeError("a usage hook that fails")

    async def one(kind: str, awaits: int) -> None:
        if kind == "call":
            await lm.acall(PROMPT)
        elif kind == "stream":
            async for _ in lm.astream(PROMPT):
                pass
        elif kind == "abandon":
            agen = lm.astream(PROMPT)
            await agen.__anext__()
            await agen.aclose()
        else:  # cancelled after `awaits` turns of the loop: at whatever await the call is in
            task = asyncio.ensure_future(lm.acall(PROMPT))
            for _ in range(awaits):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run() -> list[Any]:
        with dsrs.context(on_usage=hook):
            return await asyncio.gather(*(one(k, n) for k, n in calls), return_exceptions=True)

    outcomes = asyncio.run(run())
    for o in outcomes:  # only typed errors (or the end of a stream with no item) come out
        assert o is None or isinstance(o, (dsrs.DsrsError, StopAsyncIteration)), repr(o)
    assert budget.open_reservations == 0 and budget.reserved_msats == 0
    assert budget.spent_msats <= budget.limit_msats
    assert budget.spent_msats >= billing.billed, (budget, billing.billed, plan, calls)


# -- the worst case is an upper bound ------------------------------------------------------------
def test_worst_case_reads_caps_and_choices_from_extra_and_the_cap_the_protocol_sends() -> None:
    from dsrs.worst_case import estimate_prompt_tokens

    lm = LM("openai/gpt-4o-mini", api_key="k", max_tokens=100)
    req = lm.request(PROMPT)
    p = estimate_prompt_tokens(req)
    price = lambda out: pricing.worst_case_msats("openai", "gpt-4o-mini", p, out)  # noqa: E731
    assert worst_case("openai", "gpt-4o-mini", req) == price(100)
    # n choices multiply the output; a larger cap in extra (top level or nested) wins
    assert worst_case("openai", "gpt-4o-mini", lm.request(PROMPT, extra={"n": 3})) == price(300)
    assert worst_case("openai", "gpt-4o-mini", lm.request(PROMPT, extra={"max_completion_tokens": 900})) == price(900)
    nested = {"generationConfig": {"maxOutputTokens": 500, "candidateCount": 2}}
    assert worst_case("openai", "gpt-4o-mini", lm.request(PROMPT, extra=nested)) == price(1000)
    # digits and punctuation can be a token per byte: the prompt bound is one token per byte
    digits = lm.request("1,2;3." * 100)
    assert estimate_prompt_tokens(digits) >= 600
    # Anthropic's Messages API requires max_tokens and dsrs sends 4096 when none is set: that, not the
    # model's 64k output cap, bounds the call; the same model through a service that sends none gets 64k
    from dsrs.worst_case import lm_worst_case

    claude = LM("anthropic/claude-sonnet-4-5", api_key="k")
    creq = claude.request(PROMPT)
    cp = estimate_prompt_tokens(creq)
    assert lm_worst_case(claude, creq) == pricing.worst_case_msats("anthropic", "claude-sonnet-4-5", cp, 4096)
    assert worst_case("anthropic", "claude-sonnet-4-5", creq) == pricing.worst_case_msats(
        "anthropic", "claude-sonnet-4-5", cp, 64_000)


async def test_a_raising_soft_limit_callback_stops_the_call_and_books_nothing(scripted: Any) -> None:
    def stop(b: Budget, needed: int) -> None:
        raise RuntimeError("over the soft limit: stop")

    b = Budget(1, soft=True, on_soft_limit=stop)
    lm = LM("openai/gpt-4o-mini").with_base_url(scripted.url).with_api_key("k").with_max_tokens(10).with_budget(b)
    scripted.script()
    with pytest.raises(RuntimeError, match="stop"):
        await lm.acall("hi")
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (0, 0, 0) and scripted.requests == []


async def test_a_raising_usage_hook_keeps_the_answer_and_its_cost(scripted: Any, caplog: Any) -> None:
    from scripted import chat_reply

    scripted.script(chat_reply("paid for", prompt_tokens=10, completion_tokens=5))
    b = Budget(10**9)
    lm = LM("openai/gpt-4o-mini").with_base_url(scripted.url).with_api_key("k").with_max_tokens(10).with_budget(b)

    def hook(c: Any) -> None:
        raise ValueError("a broken hook")

    with dsrs.context(on_usage=hook):
        c = await lm.acall("hi")
    assert c.text == "paid for" and b.spent_msats == c.usage.cost_msats == cost_of(10, 5)
    assert "on_usage hook raised" in caplog.text


def cost_of(prompt: int, completion: int) -> int | None:
    return pricing.cost_msats("openai", "gpt-4o-mini", prompt, completion)


class OwnLM:
    """An LM of the user's own: anything with acall/astream (not a dsrs BaseLM)."""

    provider, model = "openai", "gpt-4o-mini"

    def __init__(self) -> None:
        self.calls = 0

    async def acall(self, prompt: Any, **opts: Any) -> Any:
        self.calls += 1
        if self.calls == 2:
            raise dsrs.errors.ResponseFormatError("garbled (but billed)")
        return dsrs.Completion("ok", dsrs.LmUsage(prompt_tokens=10, completion_tokens=5, cost_msats=cost_of(10, 5), calls=1))

    async def astream(self, prompt: Any, **opts: Any) -> Any:
        yield "ok"


async def test_lane_budgets_are_booked_on_an_lm_of_the_users_own() -> None:
    own = OwnLM()
    b = Budget(10**9)
    mux = LaneMux().add_lane("own", own, budget=b)
    c = await mux.acall("hi", max_tokens=20)
    assert c.text == "ok" and b.spent_msats == cost_of(10, 5)
    with pytest.raises(dsrs.errors.ResponseFormatError):
        await mux.acall("hi", max_tokens=20)  # failed after it may have been billed: the worst case stays
    req = dsrs.types.Request("gpt-4o-mini", (dsrs.Message.user("hi"),), max_tokens=20)
    assert b.spent_msats == cost_of(10, 5) + worst_case("openai", "gpt-4o-mini", req)
    assert (b.reserved_msats, b.open_reservations) == (0, 0)
    tight = Budget(1)  # cannot cover the worst case: the lane is skipped, nothing is called
    with pytest.raises(dsrs.BudgetExceededError):
        await LaneMux().add_lane("own", own, budget=tight).acall("hi", max_tokens=20)
    assert own.calls == 2


def test_ctrl_c_on_a_sync_call_cancels_it_and_books_its_worst_case(scripted: Any, tmp_path: Any) -> None:
    """A sync call interrupted while it waits (Ctrl-C) is cancelled, not left pending on the thread's
    loop: its reservation ends at once (kept at the worst case: the request had left)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    scripted.script(Reply(json={}, delay=3600))
    script = tmp_path / "interrupted.py"
    script.write_text(f"""
import json, sys
import dsrs
from dsrs import LM, Budget
b = Budget(10**9)
lm = LM("openai/gpt-4o-mini", base_url={scripted.url!r}, api_key="k", max_tokens=40, budget=b)
try:
    lm("hi")
except KeyboardInterrupt:
    print(json.dumps([b.spent_msats, b.reserved_msats, b.open_reservations]), flush=True)
""")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the request reached the server
            if scripted.requests:
                break
            time.sleep(0.1)
        assert scripted.requests, "the call never reached the server"
        os.kill(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    spent, reserved, open_ = json.loads(out.strip().splitlines()[-1])
    wc = worst_case("openai", "gpt-4o-mini", LM("openai/gpt-4o-mini", max_tokens=40).request("hi"))
    assert (spent, reserved, open_) == (wc, 0, 0), err
