"""Retries and error mapping against a scripted server: error types, attempts and the waits asked for."""

from __future__ import annotations

import email.utils
import time

import pytest

import dsrs
from dsrs import LM
from dsrs.retry import RetryPolicy, parse_retry_after
from scripted import Reply, chat_reply


def lm_for(scripted, fake_retry, **kw):
    return LM("openai/gpt-4o-mini", base_url=scripted.url + "/v1", api_key="sk-test", retry_policy=fake_retry, **kw)


def err(status, code=None, etype=None, message="nope", headers=None):
    return Reply(status, json={"error": {"message": message, "type": etype, "code": code}}, headers=headers or {})


async def test_request_is_exactly_the_openai_wire_format(scripted, fake_retry):
    scripted.script(chat_reply("hello", 11, 3))
    lm = lm_for(scripted, fake_retry).with_max_tokens(50).with_temperature(0.2).with_seed(7).with_stop("END")
    c = await lm.acall([dsrs.Message.system("be brief"), dsrs.Message.user("hi")])
    (seen,) = scripted.requests
    assert seen.method == "POST" and seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 50,
        "temperature": 0.2,
        "seed": 7,
        "stop": ["END"],
    }
    assert c.text == "hello"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (11, 3, 14)
    # gpt-4o-mini: 0.15 USD/M in, 0.60 USD/M out; 1 USD = 1,000,000 msats by default
    assert c.usage.cost_msats == 4  # ceil((11*0.15 + 3*0.6) / 1e6 * 1e6) = ceil(3.45)
    assert c.usage.cost_source is dsrs.CostSource.PRICE_TABLE


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # -ms wins
    ],
)
async def test_429_honours_retry_after(scripted, fake_retry, sleeps, headers, expected):
    scripted.script(err(429, "rate_limit_exceeded", headers=headers), chat_reply("ok"))
    c = await lm_for(scripted, fake_retry).acall("hi")
    assert c.text == "ok"
    assert sleeps == [expected]
    assert len(scripted.requests) == 2


async def test_retry_after_http_date(scripted, fake_retry, sleeps):
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    scripted.script(err(429, headers={"retry-after": when}), chat_reply("ok"))
    await lm_for(scripted, fake_retry).acall("hi")
    assert 3.0 <= sleeps[0] <= 5.0


async def test_rate_limit_exhausts_retries_and_carries_retry_after(scripted, fake_retry, sleeps):
    scripted.script(default=err(429, "rate_limit_exceeded", headers={"retry-after": "2"}))
    with pytest.raises(dsrs.RateLimitError) as e:
        await lm_for(scripted, fake_retry).acall("hi")
    assert e.value.retry_after == 2.0
    assert e.value.status == 429 and e.value.provider == "openai" and e.value.model == "gpt-4o-mini"
    assert len(scripted.requests) == 3 and sleeps == [2.0, 2.0]
    assert e.value.attempts == 3


async def test_backoff_schedule_without_retry_after(scripted, sleeps):
    async def sleep(s):
        sleeps.append(s)

    policy = RetryPolicy(4, sleep, lambda: 1.0)  # jitter factor at its floor (0.75)
    scripted.script(default=Reply(503, json={"error": {"message": "down"}}))
    lm = LM("openai/gpt-4o", base_url=scripted.url + "/v1", api_key="k", retry_policy=policy)
    with pytest.raises(dsrs.ProviderUnavailableError):
        await lm.acall("hi")
    assert sleeps == [0.375, 0.75, 1.5, 3.0]
    assert RetryPolicy(9, sleep, lambda: 0.0).delay(8, None) == 8.0  # capped at 8 s


async def test_5xx_then_success(scripted, fake_retry, sleeps):
    scripted.script(Reply(500, json={"error": {"message": "boom"}}), Reply(502, body=b"bad gateway"), chat_reply("ok"))
    c = await lm_for(scripted, fake_retry).acall("hi")
    assert c.text == "ok" and len(scripted.requests) == 3 and sleeps == [0.5, 1.0]


async def test_insufficient_quota_is_never_retried(scripted, fake_retry, sleeps):
    scripted.script(default=err(429, "insufficient_quota", "insufficient_quota", "You exceeded your current quota"))
    with pytest.raises(dsrs.QuotaExceededError) as e:
        await lm_for(scripted, fake_retry).acall("hi")
    assert not isinstance(e.value, dsrs.RateLimitError)
    assert len(scripted.requests) == 1 and sleeps == []


async def test_402_is_quota(scripted, fake_retry):
    scripted.script(default=Reply(402, json={"error": {"message": "Insufficient credits", "code": 402}}))
    with pytest.raises(dsrs.QuotaExceededError):
        await lm_for(scripted, fake_retry).acall("hi")
    assert len(scripted.requests) == 1


@pytest.mark.parametrize(
    "status, should_retry, attempts",
    [(429, "false", 1), (400, "true", 3), (503, "false", 1)],
)
async def test_x_should_retry_overrides(scripted, fake_retry, status, should_retry, attempts):
    scripted.script(default=err(status, headers={"x-should-retry": should_retry}))
    with pytest.raises(dsrs.DsrsError):
        await lm_for(scripted, fake_retry).acall("hi")
    assert len(scripted.requests) == attempts


@pytest.mark.parametrize(
    "reply, exc",
    [
        (err(401, "invalid_api_key", "invalid_request_error"), dsrs.AuthenticationError),
        (err(403), dsrs.PermissionDeniedError),
        (err(404, "model_not_found"), dsrs.NotFoundError),
        (err(400, "context_length_exceeded", "invalid_request_error"), dsrs.ContextWindowExceededError),
        (err(400, None, "invalid_request_error"), dsrs.BadRequestError),
    ],
)
async def test_errors_are_typed_and_not_retried(scripted, fake_retry, sleeps, reply, exc):
    scripted.script(default=reply)
    with pytest.raises(exc) as e:
        await lm_for(scripted, fake_retry).acall("hi")
    assert len(scripted.requests) == 1 and sleeps == []
    assert "openai/gpt-4o-mini" in str(e.value) and f"HTTP {reply.status}" in str(e.value)


async def test_classification_ignores_message_text(scripted, fake_retry):
    # a plain 400 whose text talks about context length is still just a bad request
    scripted.script(default=err(400, None, None, "maximum context length is 8192 tokens"))
    with pytest.raises(dsrs.BadRequestError) as e:
        await lm_for(scripted, fake_retry).acall("hi")
    assert not isinstance(e.value, dsrs.ContextWindowExceededError)


async def test_malformed_200_is_a_format_error_and_not_retried(scripted, fake_retry):
    # as in the official SDKs: the provider answered (and billed); asking again would pay twice
    scripted.script(default=Reply(200, body=b'{"choices": [', headers={"Content-Type": "application/json"}))
    with pytest.raises(dsrs.ResponseFormatError):
        await lm_for(scripted, fake_retry).acall("hi")
    assert len(scripted.requests) == 1


async def test_stream_cut_midway(scripted, fake_retry):
    chunk = {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}
    scripted.script(Reply(sse=[chunk, chunk], cut=True))
    got = []
    with pytest.raises(dsrs.DsrsError) as e:
        async for item in lm_for(scripted, fake_retry).astream("hi"):
            got.append(item)
    assert got == ["Hel", "Hel"]  # what arrived was delivered; the break is an error, not a silent end
    assert isinstance(e.value, (dsrs.ResponseFormatError, dsrs.APIConnectionError))
    assert len(scripted.requests) == 1  # no retry after the first chunk


async def test_stream_failure_before_first_chunk_is_retried(scripted, fake_retry, sleeps):
    chunks = [
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c1", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
        "[DONE]",
    ]  # fmt: skip
    scripted.script(err(503), Reply(sse=chunks))
    items = [i async for i in lm_for(scripted, fake_retry).astream("hi")]
    assert items[0] == "Hi" and items[-1].usage.total_tokens == 4 and sleeps == [0.5]
    assert scripted.requests[1].json["stream"] is True
    assert scripted.requests[1].json["stream_options"] == {"include_usage": True}


async def test_stream_tool_calls_are_assembled(scripted, fake_retry):
    def tc(**fn):
        return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, **fn}]}}]}

    scripted.script(Reply(sse=[
        tc(id="call_1", function={"name": "get_weather", "arguments": ""}),
        tc(function={"arguments": '{"city": '}),
        tc(function={"arguments": '"Paris"}'}),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        "[DONE]",
    ]))  # fmt: skip
    items = [i async for i in lm_for(scripted, fake_retry).astream("weather?")]
    (call,) = items[-1].completion.tool_calls
    assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", {"city": "Paris"})
    assert items[-1].completion.finish_reason == "tool_calls"


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after-ms": "10"}) == 0.01
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=lambda: 1445412470.0) == 10.0


def test_large_retry_after_falls_back_to_backoff():
    p = RetryPolicy(2, rand=lambda: 0.0)
    assert p.delay(0, 120.0) == 0.5  # over 60 s: ignored, like the official SDKs
    assert p.delay(1, 0) == 1.0


def test_google_error_details_are_read():
    def body(status, code, *details):
        return {"error": {"code": code, "status": status, "message": "m", "details": list(details)}}

    info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}
    e = dsrs.errors.from_response(400, body("INVALID_ARGUMENT", 400, info), provider="gemini", model="g")
    assert isinstance(e, dsrs.AuthenticationError)

    retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34s"}
    minute = {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
              "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]}  # fmt: skip
    e = dsrs.errors.from_response(429, body("RESOURCE_EXHAUSTED", 429, minute, retry), provider="gemini", model="g")
    assert isinstance(e, dsrs.RateLimitError) and e.retry_after == 34.0 and e.code == "RESOURCE_EXHAUSTED"

    day = {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
           "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}  # fmt: skip
    e = dsrs.errors.from_response(429, body("RESOURCE_EXHAUSTED", 429, day), provider="gemini", model="g")
    assert isinstance(e, dsrs.QuotaExceededError)


async def test_gemini_retry_delay_from_the_body_is_waited(scripted, fake_retry, sleeps):
    body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "slow down", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34s"}]}}  # fmt: skip
    ok = Reply(json={"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}],
                     "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4}})  # fmt: skip
    scripted.script(Reply(429, json=body), ok)
    lm = LM("gemini/gemini-2.5-flash", base_url=scripted.url, api_key="g", retry_policy=fake_retry)
    assert (await lm.acall("hi")).text == "hi"
    assert sleeps == [34.0]


async def test_missing_usage_is_unknown_cost_not_free(scripted, fake_retry):
    reply = chat_reply("ok")
    del reply.json["usage"]
    scripted.script(reply)
    c = await lm_for(scripted, fake_retry).acall("hi")
    assert c.usage.cost_msats is None and c.usage.estimated


async def test_per_call_options_are_checked(scripted, fake_retry):
    lm = lm_for(scripted, fake_retry)
    for bad in ({"temprature": 0.2}, {"timeout": 1}, {"api_key": "other"}):
        with pytest.raises(dsrs.ConfigurationError):
            await lm.acall("hi", **bad)
    assert scripted.requests == []
