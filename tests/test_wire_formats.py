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


# -- Gemini: thought signatures, made-up call ids ------------------------------------------------
GM_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


def _gm(parts, finish="STOP"):
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 3, "totalTokenCount": 13},
            "modelVersion": "gemini-3-pro-preview", "responseId": "r1"}  # fmt: skip


def _fc(name, **sig):
    return {"functionCall": {"name": name, "args": {"city": "Paris"}}, **sig}


async def _gemini_loop(scripted, fake_retry, streamed):
    first = _gm([_fc("get_weather", thoughtSignature="SIG_A")])
    second = _gm([_fc("get_time", thoughtSignature="SIG_B")])
    final = _gm([{"text": "18 C, 14:00"}, {"text": "", "thoughtSignature": "SIG_C"}])
    replies = [Reply(sse=[r]) for r in (first, second, final)] if streamed else [Reply(json=r) for r in (first, second, final)]
    scripted.script(*replies, Reply(json=_gm([{"text": "ok"}])))
    lm = LM("gemini/gemini-3-pro-preview", base_url=scripted.url + "/v1beta", api_key=KEY, retry_policy=fake_retry,
            tools=GM_TOOLS)  # fmt: skip

    async def call(msgs):
        if streamed:
            return [x async for x in lm.astream(msgs)][-1].completion
        return await lm.acall(msgs)

    msgs = [dsrs.Message.user("Weather and time in Paris?")]
    for result in ('{"temp_c": 18}', '{"time": "14:00"}'):
        c = await call(msgs)
        msgs += [dsrs.Message.from_completion(c), dsrs.Message.tool(c.tool_calls[0].id, result)]
    c = await call(msgs)
    assert c.text == "18 C, 14:00" and c.finish_reason == "stop"
    msgs += [dsrs.Message.from_completion(c), dsrs.Message.user("Thanks")]
    await lm.acall(msgs)
    ids = [m.tool_calls[0].id for m in msgs if m.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("gemini-call-") for i in ids)
    assert scripted.requests[3].json["contents"] == [
        {"role": "user", "parts": [{"text": "Weather and time in Paris?"}]},
        {"role": "model", "parts": [_fc("get_weather", thoughtSignature="SIG_A")]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 18}}}]},
        {"role": "model", "parts": [_fc("get_time", thoughtSignature="SIG_B")]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_time", "response": {"time": "14:00"}}}]},
        {"role": "model", "parts": [{"text": "18 C, 14:00", "thoughtSignature": "SIG_C"}]},
        {"role": "user", "parts": [{"text": "Thanks"}]}]  # fmt: skip
    assert "SIG_" not in repr(c)


async def test_gemini_thought_signatures_go_back_and_results_keep_their_function(scripted, fake_retry):
    await _gemini_loop(scripted, fake_retry, streamed=False)


async def test_gemini_streamed_thought_signatures_go_back(scripted, fake_retry):
    await _gemini_loop(scripted, fake_retry, streamed=True)


async def test_gemini_parallel_calls_keep_the_signature_on_the_first_part(scripted, fake_retry):
    scripted.script(Reply(json=_gm([_fc("get_weather", thoughtSignature="SIG_P"), _fc("get_time")])),
                    Reply(json=_gm([{"text": "done"}])))  # fmt: skip
    lm = LM("gemini/gemini-3-pro-preview", base_url=scripted.url + "/v1beta", api_key=KEY, retry_policy=fake_retry,
            tools=GM_TOOLS)  # fmt: skip
    c = await lm.acall("Weather and time in Paris?")
    a, b = c.tool_calls
    await lm.acall([dsrs.Message.user("Weather and time in Paris?"), dsrs.Message.from_completion(c), dsrs.Message.tool(b.id, '"14:00"'),
                    dsrs.Message.tool(a.id, '"18 C"')])  # fmt: skip
    assert scripted.requests[1].json["contents"][1:] == [
        {"role": "model", "parts": [_fc("get_weather", thoughtSignature="SIG_P"), _fc("get_time")]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_time", "response": {"result": "14:00"}}},
                                   {"functionResponse": {"name": "get_weather", "response": {"result": "18 C"}}}]}]  # fmt: skip


# -- Ollama: made-up call ids, results under the right function ----------------------------------
async def test_ollama_results_go_back_under_their_own_function(scripted, fake_retry):
    def reply(name):
        return Reply(json={"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "done": True,
                           "done_reason": "stop", "prompt_eval_count": 9, "eval_count": 3,
                           "message": {"role": "assistant", "content": "",
                                       "tool_calls": [{"function": {"name": name, "arguments": {"city": "Paris"}}}]}})  # fmt: skip

    scripted.script(reply("get_weather"), reply("get_time"), Reply(json={
        "model": "llama3.2", "done": True, "done_reason": "stop", "message": {"role": "assistant", "content": "ok"}}))
    lm = LM("ollama/llama3.2", base_url=scripted.url, retry_policy=fake_retry, tools=GM_TOOLS)
    msgs = [dsrs.Message.user("Weather and time in Paris?")]
    for result in ("18 C", "14:00"):
        c = await lm.acall(msgs)
        msgs += [dsrs.Message.from_completion(c), dsrs.Message.tool(c.tool_calls[0].id, result)]
    await lm.acall(msgs)
    sent = scripted.requests[2].json["messages"]
    assert [(m["role"], m.get("tool_name")) for m in sent] == [
        ("user", None), ("assistant", None), ("tool", "get_weather"), ("assistant", None), ("tool", "get_time")]
    assert msgs[1].tool_calls[0].id != msgs[3].tool_calls[0].id


# -- tools, tool_choice and response_format in every common spelling ------------------------------
_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
_TOOL_SHAPES = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": _PARAMS}},
    {"type": "function", "name": "get_weather", "description": "Weather", "parameters": _PARAMS},  # Responses
    {"name": "get_weather", "description": "Weather", "input_schema": _PARAMS},  # Anthropic
    {"name": "get_weather", "description": "Weather", "parameters": _PARAMS},
]


@pytest.mark.parametrize("shape", _TOOL_SHAPES, ids=["openai", "responses", "anthropic", "plain"])
async def test_tool_dicts_of_every_shape_reach_each_provider(scripted, fake_retry, shape):
    scripted.script(chat_reply("ok"), _an_reply([{"type": "text", "text": "ok"}]))
    await _openai(scripted, fake_retry, tools=[shape]).acall("hi")
    await _anthropic(scripted, fake_retry, tools=[shape]).acall("hi")
    assert scripted.requests[0].json["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": _PARAMS}}]
    assert scripted.requests[1].json["tools"] == [
        {"name": "get_weather", "description": "Weather", "input_schema": _PARAMS}]


@pytest.mark.parametrize("bad", [{"type": "function", "function": {"description": "no name"}}, "get_weather",
                                 {"name": "f", "parameters": _PARAMS, "input_schema": _PARAMS},
                                 {"name": "f", "parameters": "not a schema"}])  # fmt: skip
async def test_a_bad_tool_is_a_configuration_error_naming_the_shapes(scripted, fake_retry, bad):
    with pytest.raises(dsrs.ConfigurationError) as e:
        await _openai(scripted, fake_retry, tools=[bad]).acall("hi")
    assert "input_schema" in str(e.value) and "'function'" in str(e.value)
    assert scripted.requests == []


_FORCED = [{"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"},
           {"type": "function", "name": "get_weather"}, {"name": "get_weather"}]  # fmt: skip


@pytest.mark.parametrize("choice, openai, anthropic", [
    ("auto", "auto", {"type": "auto"}), ("none", "none", {"type": "none"}),
    ("required", "required", {"type": "any"}), ("any", "required", {"type": "any"}),
    ({"type": "any"}, "required", {"type": "any"}),
    *[(c, {"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"})
      for c in _FORCED],
])  # fmt: skip
async def test_tool_choice_spellings_are_encoded_per_provider(scripted, fake_retry, choice, openai, anthropic):
    scripted.script(chat_reply("ok"), _an_reply([{"type": "text", "text": "ok"}]))
    await _openai(scripted, fake_retry, tools=_TOOL_SHAPES[:1], tool_choice=choice).acall("hi")
    await _anthropic(scripted, fake_retry, tools=_TOOL_SHAPES[:1], tool_choice=choice).acall("hi")
    assert scripted.requests[0].json["tool_choice"] == openai
    assert scripted.requests[1].json["tool_choice"] == anthropic


@pytest.mark.parametrize("choice", ["sometimes", {"type": "function"}, {"function": "get_weather"}, 3])
async def test_a_bad_tool_choice_is_refused_before_sending(scripted, fake_retry, choice):
    with pytest.raises(dsrs.ConfigurationError):
        await _openai(scripted, fake_retry, tools=_TOOL_SHAPES[:1], tool_choice=choice).acall("hi")
    assert scripted.requests == []


async def test_a_form_the_provider_cannot_do_is_refused_before_sending(scripted, fake_retry):
    lm = LM("ollama/llama3.2", base_url=scripted.url, retry_policy=fake_retry, tools=_TOOL_SHAPES[:1])
    with pytest.raises(dsrs.UnsupportedFeatureError):
        await lm.acall("hi", tool_choice={"type": "tool", "name": "get_weather"})
    assert scripted.requests == []


async def test_response_format_may_be_a_pydantic_model(scripted, fake_retry):
    from pydantic import BaseModel

    class Answer(BaseModel):
        city: str
        population: int

    schema = Answer.model_json_schema()
    scripted.script(chat_reply('{"city": "Paris", "population": 2100000}'),
                    Reply(json=_gm([{"text": "{}"}])))  # fmt: skip
    await _openai(scripted, fake_retry, response_format=Answer).acall("hi")
    assert scripted.requests[0].json["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "Answer", "schema": schema}}
    gm = LM("gemini/gemini-2.5-flash", base_url=scripted.url + "/v1beta", api_key=KEY, retry_policy=fake_retry)
    await gm.acall("hi", response_format=Answer)
    assert scripted.requests[1].json["generationConfig"] == {"responseMimeType": "application/json",
                                                             "responseJsonSchema": schema}
    assert _openai(scripted, fake_retry).request("hi", response_format=Answer) == \
        _openai(scripted, fake_retry).request("hi", response_format={"type": "json_schema", "json_schema": {
            "name": "Answer", "schema": schema}})  # one cache key whichever way it was given  # fmt: skip


@pytest.mark.parametrize("bad", [dict, {"type": "yaml"}, "json", {"type": "json_schema", "json_schema": {}}])
async def test_a_bad_response_format_is_a_configuration_error(scripted, fake_retry, bad):
    with pytest.raises(dsrs.ConfigurationError) as e:
        await _openai(scripted, fake_retry, response_format=bad).acall("hi")
    assert e.value.hint and scripted.requests == []


# -- Responses: items after a reasoning item keep their ids ---------------------------------------
async def test_responses_items_after_reasoning_go_back_with_their_ids(scripted, fake_retry):
    rs = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA-opaque"}
    msg = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]}
    fcs = [{"type": "function_call", "id": f"fc_{i}", "call_id": f"call_{i}", "name": "get_weather",
            "arguments": '{"city":"Paris"}', "status": "completed"} for i in (1, 2)]  # fmt: skip

    def resp(output):
        return Reply(json={"id": "resp_1", "object": "response", "status": "completed", "model": "o4-mini",
                           "output": output, "usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12}})

    scripted.script(resp([rs, msg, *fcs]), resp([msg]), resp([msg]))
    lm = LM("openai-responses/o4-mini", base_url=scripted.url + "/v1", api_key=KEY, retry_policy=fake_retry,
            tools=_TOOL_SHAPES[:1])  # fmt: skip
    c = await lm.acall("Weather in Paris and Lyon?")
    assert c.text == "Checking." and [t.id for t in c.tool_calls] == ["call_1", "call_2"]
    turn = [dsrs.Message.user("Weather in Paris and Lyon?"), dsrs.Message.from_completion(c),
            dsrs.Message.tool("call_1", "18 C"), dsrs.Message.tool("call_2", "17 C")]  # fmt: skip
    last = await lm.acall(turn)
    assert scripted.requests[1].json["input"] == [
        {"role": "user", "content": "Weather in Paris and Lyon?"}, rs, msg, *fcs,
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
        {"type": "function_call_output", "call_id": "call_2", "output": "17 C"}]  # fmt: skip
    # an answer without reasoning goes back in the plain form, as before
    await lm.acall(turn + [dsrs.Message.from_completion(last), dsrs.Message.user("Thanks")])
    assert scripted.requests[2].json["input"][-2:] == [{"role": "assistant", "content": "Checking."},
                                                       {"role": "user", "content": "Thanks"}]  # fmt: skip


# -- images: sent as each provider documents, or refused; never dropped ----------------------------
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
URL = "https://example.com/cat.jpg"
LOOK = {"role": "user", "content": [
    {"type": "text", "text": "What is in these images?"},
    {"type": "image_url", "image_url": {"url": URL}},
    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}}]}  # fmt: skip


async def test_images_reach_openai_chat_responses_anthropic_and_gemini(scripted, fake_retry):
    rs_ok = Reply(json={"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1",
                        "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                                    "content": [{"type": "output_text", "text": "a cat", "annotations": []}]}],
                        "usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12}})  # fmt: skip
    scripted.script(chat_reply("a cat"), rs_ok, _an_reply([{"type": "text", "text": "a cat"}]),
                    Reply(json=_gm([{"text": "a cat"}])))  # fmt: skip
    await _openai(scripted, fake_retry).acall([LOOK])
    await LM("openai-responses/gpt-4.1", base_url=scripted.url, api_key=KEY, retry_policy=fake_retry).acall([LOOK])
    await _anthropic(scripted, fake_retry).acall([LOOK])
    await LM("gemini/gemini-2.5-flash", base_url=scripted.url, api_key=KEY, retry_policy=fake_retry).acall([LOOK])
    oa, rs, an, gm = (r.json for r in scripted.requests)
    assert oa["messages"] == [LOOK]
    assert rs["input"] == [{"role": "user", "content": [
        {"type": "input_text", "text": "What is in these images?"},
        {"type": "input_image", "image_url": URL, "detail": "auto"},
        {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "low"}]}]  # fmt: skip
    assert an["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is in these images?"},
        {"type": "image", "source": {"type": "url", "url": URL}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]  # fmt: skip
    assert gm["contents"] == [{"role": "user", "parts": [
        {"text": "What is in these images?"}, {"fileData": {"fileUri": URL}},
        {"inlineData": {"mimeType": "image/png", "data": PNG}}]}]  # fmt: skip


async def test_images_reach_ollama_as_base64_and_urls_are_refused(scripted, fake_retry):
    scripted.script(Reply(json={"model": "llava", "done": True, "done_reason": "stop",
                                "message": {"role": "assistant", "content": "a dot"}}))  # fmt: skip
    lm = LM("ollama/llava", base_url=scripted.url, retry_policy=fake_retry)
    anthropic_shaped = {"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "text", "text": "What is this?"}]}  # fmt: skip
    await lm.acall([anthropic_shaped])
    assert scripted.requests[0].json["messages"] == [{"role": "user", "content": "What is this?", "images": [PNG]}]
    with pytest.raises(dsrs.UnsupportedFeatureError):
        await lm.acall([LOOK])
    assert len(scripted.requests) == 1


@pytest.mark.parametrize("spec", ["embedded/gemma-3-270m", "cohere/command-a-03-2025", "deepseek/deepseek-chat"])
async def test_an_lm_that_cannot_take_images_refuses_them(scripted, fake_retry, spec):
    lm = LM(spec, base_url=scripted.url, api_key=KEY, retry_policy=fake_retry)
    with pytest.raises(dsrs.UnsupportedFeatureError) as e:
        await lm.acall([LOOK])
    assert "images" in str(e.value) and scripted.requests == []
    assert lm.request([{"role": "user", "content": [{"type": "text", "text": "text parts are fine"}]}])


@pytest.mark.parametrize("part", [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                                  {"type": "file", "file": {"file_id": "file-1"}},
                                  {"type": "image_url", "image_url": {"url": "cat.jpg"}}, "not a part"])  # fmt: skip
async def test_an_unsupported_part_is_a_configuration_error_not_dropped(scripted, fake_retry, part):
    with pytest.raises(dsrs.ConfigurationError) as e:
        await _openai(scripted, fake_retry).acall([{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}])
    assert "image" in str(e.value) and scripted.requests == []


def test_images_are_in_the_cache_key_and_round_trip():
    from dsrs.cache import cache_key

    lm = LM("openai/gpt-4o-mini", api_key=KEY)
    other = {"role": "user", "content": [{"type": "text", "text": "What is in these images?"},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/dog.jpg"}}]}
    a, b = lm.request([LOOK]), lm.request([other])
    assert a.messages[0].content == b.messages[0].content == "What is in these images?"
    assert cache_key("openai", a) != cache_key("openai", b)
    assert cache_key("openai", a) != cache_key("openai", lm.request("What is in these images?"))
    m = a.messages[0]
    assert dsrs.Message.coerce(m.to_json()) == m
    assert dsrs.Message.user("What is in these images?", [URL, f"data:image/png;base64,{PNG}"]).parts == m.parts[:2] + (
        {"type": "image", "data": PNG, "media_type": "image/png"},)
    with pytest.raises(dsrs.ConfigurationError):
        dsrs.Message.coerce({"role": "assistant", "content": LOOK["content"]})
    # text parts of every spelling still join into plain text, with no parts kept
    said = dsrs.Message.coerce({"role": "assistant", "content": [{"type": "output_text", "text": "a ", "annotations": []},
                                                                 {"type": "text", "text": "cat"}]})  # fmt: skip
    assert (said.content, said.parts) == ("a cat", ())


def test_codex_and_pylon_refuse_images():
    for lm in (dsrs.CodexSdkLM(), dsrs.PylonLM.new_local()):
        with pytest.raises(dsrs.UnsupportedFeatureError):
            lm.request([LOOK])
        assert lm.request("text is fine").messages[0].content == "text is fine"


async def test_a_lane_mux_takes_a_pydantic_response_format(scripted, fake_retry):
    from pydantic import BaseModel

    class Answer(BaseModel):
        city: str

    scripted.script(chat_reply('{"city": "Paris"}'))
    mux = dsrs.LaneMux().add_lane("deepseek", LM("deepseek/deepseek-chat", base_url=scripted.url, api_key=KEY)) \
        .add_lane("openai", _openai(scripted, fake_retry))  # fmt: skip
    out = await mux.acall("Capital of France?", response_format=Answer)
    assert out.route.lane == "openai" and out.route.skipped == {
        "deepseek": "does not support structured (JSON-schema) output"}
    assert scripted.requests[0].json["response_format"]["json_schema"]["schema"] == Answer.model_json_schema()


@pytest.mark.parametrize("after, sleeps_wanted, attempts", [("90", [90.0], 2), ("300", [], 1)])
async def test_a_lane_mux_retries_a_5xx_as_openai_python_does(scripted, fake_retry, sleeps, after, sleeps_wanted,
                                                              attempts):  # fmt: skip
    scripted.script(Reply(503, json={"error": {"message": "busy", "type": "server_error"}},
                          headers={"retry-after": after}), chat_reply("ok"))  # fmt: skip
    mux = dsrs.LaneMux().with_options(retry_policy=fake_retry).add_lane("openai", _openai(scripted, fake_retry))
    try:
        await mux.acall("hi")
    except dsrs.DsrsError:
        pass
    assert sleeps == sleeps_wanted and len(scripted.requests) == attempts
