"""Issue 11 section 3: wire formats the providers accept, and errors/retries as each official SDK does them.

Bodies follow the providers' public API references; every test asserts the exact body sent or the
exact error class, against the scripted local server.
"""

from __future__ import annotations

import math

import pytest

import dsrs
from dsrs import LM
from dsrs.retry import parse_retry_after
from scripted import Reply, chat_reply

KEY = "sk-test-0123456789"


def _openai(scripted, fake_retry, **kw):
    return LM("openai/gpt-4o-mini", base_url=scripted.url + "/v1", api_key=KEY, retry_policy=fake_retry, **kw)


def _anthropic(scripted, fake_retry, **kw):
    return LM("anthropic/claude-sonnet-4-5", base_url=scripted.url + "/v1", api_key=KEY, retry_policy=fake_retry,
              **kw)  # fmt: skip


def _an_error(status, etype, message, headers=None):
    return Reply(status, json={"type": "error", "error": {"type": etype, "message": message}}, headers=headers or {})


def _an_reply(content, stop="end_turn"):
    return Reply(json={"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                       "content": content, "stop_reason": stop, "usage": {"input_tokens": 3, "output_tokens": 2}})


# -- retry-after, per SDK ------------------------------------------------------------------------
def _429(headers):
    return Reply(429, json={"error": {"message": "slow down", "type": "rate_limit_error", "code": None}},
                 headers=headers)  # fmt: skip


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "Infinity", "-inf"])
def test_non_finite_or_negative_retry_after_is_absent(value):
    assert parse_retry_after({"retry-after": value}) is None
    assert parse_retry_after({"retry-after-ms": value}) is None


async def test_openai_honours_retry_after_up_to_120s(scripted, fake_retry, sleeps):
    scripted.script(_429({"retry-after": "90"}), chat_reply("ok"))
    assert (await _openai(scripted, fake_retry).acall("hi")).text == "ok"
    assert sleeps == [90.0]


@pytest.mark.parametrize("headers", [{"retry-after": "121"}, {"retry-after": "121", "x-should-retry": "true"},
                                     {"retry-after-ms": "600000"}])  # fmt: skip
async def test_openai_does_not_retry_above_120s(scripted, fake_retry, sleeps, headers):
    # openai-python 3.x `_should_retry`: a finite Retry-After over MAX_RETRY_AFTER_DELAY means no retry at all
    scripted.script(_429(headers), chat_reply("ok"))
    with pytest.raises(dsrs.RateLimitError) as e:
        await _openai(scripted, fake_retry).acall("hi")
    assert e.value.retry_after and e.value.retry_after > 120
    assert len(scripted.requests) == 1 and sleeps == []


async def test_openai_compatible_and_responses_follow_openai_python(scripted, fake_retry, sleeps):
    scripted.script(_429({"retry-after": "100"}), chat_reply("ok"))
    lm = LM("groq/llama-3.3-70b", base_url=scripted.url, api_key=KEY, retry_policy=fake_retry)
    assert (await lm.acall("hi")).text == "ok" and sleeps == [100.0]
    scripted.script(_429({"retry-after": "130"}))
    rs = LM("openai-responses/o4-mini", base_url=scripted.url, api_key=KEY, retry_policy=fake_retry)
    with pytest.raises(dsrs.RateLimitError):
        await rs.acall("hi")
    assert len(scripted.requests) == 1


async def test_anthropic_honours_60s_and_backs_off_above(scripted, fake_retry, sleeps):
    ok = _an_reply([{"type": "text", "text": "ok"}])
    limited = _an_error(429, "rate_limit_error", "slow down", {"retry-after": "45"})
    scripted.script(limited, ok)
    assert (await _anthropic(scripted, fake_retry).acall("hi")).text == "ok"
    assert sleeps == [45.0]
    sleeps.clear()
    # anthropic-sdk-python: over 60 s the header is ignored and the usual backoff applies (it still retries)
    scripted.script(_an_error(429, "rate_limit_error", "slow down", {"retry-after": "90"}), ok)
    assert (await _anthropic(scripted, fake_retry).acall("hi")).text == "ok"
    assert sleeps == [0.5] and len(scripted.requests) == 2


async def test_infinite_retry_after_backs_off(scripted, fake_retry, sleeps):
    scripted.script(_429({"retry-after": "inf"}), chat_reply("ok"))
    assert (await _openai(scripted, fake_retry).acall("hi")).text == "ok"
    assert sleeps == [0.5]
    assert all(math.isfinite(s) for s in sleeps)


# -- Anthropic 400s that mean quota or context --------------------------------------------------
@pytest.mark.parametrize("message, exc", [
    ("Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or "
     "purchase credits.", dsrs.QuotaExceededError),
    ("prompt is too long: 208310 tokens > 200000 maximum", dsrs.ContextWindowExceededError),
    ("input length and `max_tokens` exceed context limit: 197626 + 8192 > 200000, decrease input length or "
     "`max_tokens` and try again", dsrs.ContextWindowExceededError),
])  # fmt: skip
async def test_anthropic_400_quota_and_context_are_typed(scripted, fake_retry, sleeps, message, exc):
    scripted.script(_an_error(400, "invalid_request_error", message))
    with pytest.raises(exc) as e:
        await _anthropic(scripted, fake_retry).acall("hi")
    assert type(e.value) is exc and e.value.status == 400 and e.value.hint
    assert len(scripted.requests) == 1 and sleeps == []


async def test_anthropic_rule_is_narrow(scripted, fake_retry):
    # another Anthropic 400 stays a bad request; the same text from another provider is not matched
    scripted.script(_an_error(400, "invalid_request_error", "messages: text content blocks must be non-empty"))
    with pytest.raises(dsrs.BadRequestError) as e:
        await _anthropic(scripted, fake_retry).acall("hi")
    assert type(e.value) is dsrs.BadRequestError
    scripted.script(Reply(400, json={"error": {"message": "prompt is too long: 9 tokens > 8 maximum",
                                               "type": "invalid_request_error", "code": None}}))  # fmt: skip
    with pytest.raises(dsrs.BadRequestError) as e:
        await _openai(scripted, fake_retry).acall("hi")
    assert type(e.value) is dsrs.BadRequestError


# -- Mistral streams -----------------------------------------------------------------------------
async def test_mistral_stream_sends_no_stream_options_and_reads_usage_from_last_chunk(scripted, fake_retry):
    def chunk(delta, finish=None, usage=None):
        c = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "mistral-small-latest",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            c["usage"] = usage
        return c

    scripted.script(Reply(sse=[chunk({"role": "assistant", "content": "Bon"}), chunk({"content": "jour"}),
                               chunk({"content": ""}, "stop", {"prompt_tokens": 7, "completion_tokens": 2,
                                                               "total_tokens": 9}), "[DONE]"]))  # fmt: skip
    lm = LM("mistral/mistral-small-latest", base_url=scripted.url + "/v1", api_key=KEY, retry_policy=fake_retry)
    out = [x async for x in lm.astream("Say hello in French")]
    assert "".join(x for x in out if isinstance(x, str)) == "Bonjour"
    assert scripted.requests[0].json == {"model": "mistral-small-latest", "stream": True,
                                         "messages": [{"role": "user", "content": "Say hello in French"}]}
    assert (out[-1].usage.prompt_tokens, out[-1].usage.completion_tokens) == (7, 2)
