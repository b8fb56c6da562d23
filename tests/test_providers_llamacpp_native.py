"""The Responses and Anthropic Messages providers against the real llama.cpp server (Gemma 3 270M).

llama.cpp serves `/v1/responses` and `/v1/messages` itself; the pass-through chat template makes
both behave as plain completions of the few-shot prompt. Usage must equal what the server
reports for the same raw request. Cached-token counts depend on the server's prompt cache
state, so the comparison is on prompt, completion and total tokens, and the cached count is
checked against the server's own body for our request.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import FEW_SHOT
from dsrs import LM, Message, StreamEnd, errors


def responses_lm(srv: Any) -> LM:
    return LM("openai-responses/gemma", base_url=srv.url + "/v1", api_key="sk-local", retries=0)


def anthropic_lm(srv: Any) -> LM:
    return LM("anthropic/gemma", base_url=srv.url + "/v1", api_key="sk-local", retries=0)


async def _stream(lm: LM, prompt: Any) -> tuple[list[str], StreamEnd]:
    deltas, ends = [], []
    async for item in lm.astream(prompt):
        (ends if isinstance(item, StreamEnd) else deltas).append(item)
    assert len(ends) == 1
    return deltas, ends[0]


# -- Responses API --------------------------------------------------------------------------
async def test_responses_text_and_usage_match_the_server(llama_server: Any) -> None:
    raw = llama_server.post("/v1/responses", {"model": "gemma", "input": [{"role": "user", "content": FEW_SHOT}],
                                              "max_output_tokens": 1, "temperature": 0})  # fmt: skip
    c = await responses_lm(llama_server).with_max_tokens(1).with_temperature(0).acall(FEW_SHOT)
    assert c.text == " Paris" == raw["output"][0]["content"][0]["text"]
    assert c.provider == "openai-responses" and c.id and c.id.startswith("resp_")
    u = raw["usage"]
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (
        u["input_tokens"], u["output_tokens"], u["total_tokens"])  # fmt: skip
    assert c.usage.cached_tokens == c.raw["usage"]["input_tokens_details"]["cached_tokens"]
    assert c.usage.calls == 1


async def test_responses_stop_passes_through_extra_to_a_server_that_takes_it(llama_server: Any) -> None:
    # The Responses protocol has no `stop`: with_stop is refused, extra={"stop": ...} reaches llama.cpp.
    lm = responses_lm(llama_server).with_max_tokens(8).with_temperature(0)
    with pytest.raises(errors.UnsupportedFeatureError):
        await lm.with_stop("\n").acall(FEW_SHOT)
    c = await lm.acall(FEW_SHOT, extra={"stop": ["\n"]})
    assert c.text == " Paris" and c.finish_reason == "stop"


async def test_responses_stream(llama_server: Any) -> None:
    lm = responses_lm(llama_server).with_max_tokens(3).with_temperature(0)
    full = await lm.acall(FEW_SHOT)
    deltas, end = await _stream(lm, FEW_SHOT)
    assert deltas[0] == " Paris" and "".join(deltas) == end.completion.text == full.text
    assert len(deltas) == 3
    assert (end.usage.prompt_tokens, end.usage.completion_tokens, end.usage.total_tokens) == (
        full.usage.prompt_tokens, 3, full.usage.prompt_tokens + 3)  # fmt: skip
    assert end.usage.cost_msats is None  # "gemma" has no OpenAI price: never a guess


async def test_responses_instructions_count_as_prompt(llama_server: Any) -> None:
    lm = responses_lm(llama_server).with_max_tokens(1).with_temperature(0)
    raw = llama_server.post("/v1/responses", {"model": "gemma", "input": [{"role": "user", "content": FEW_SHOT}],
                                              "instructions": "Answer.", "max_output_tokens": 1, "temperature": 0})
    c = await lm.acall([Message.system("Answer."), Message.user(FEW_SHOT)])
    assert c.usage.prompt_tokens == raw["usage"]["input_tokens"]
    assert c.text == raw["output"][0]["content"][0]["text"]


async def test_responses_context_overflow_is_typed(llama_server: Any) -> None:
    with pytest.raises(errors.ContextWindowExceededError) as ei:
        await responses_lm(llama_server).with_max_tokens(1).acall("word " * 5000)
    assert ei.value.status == 400 and "sk-local" not in str(ei.value)


# -- Anthropic Messages -----------------------------------------------------------------------
async def test_anthropic_text_stop_and_usage_match_the_server(llama_server: Any) -> None:
    raw = llama_server.post("/v1/messages", {"model": "gemma", "messages": [{"role": "user", "content": FEW_SHOT}],
                                             "max_tokens": 8, "stop_sequences": ["\n"], "temperature": 0})  # fmt: skip
    c = await anthropic_lm(llama_server).with_max_tokens(8).with_stop("\n").with_temperature(0).acall(FEW_SHOT)
    assert c.text == " Paris" == raw["content"][0]["text"]
    assert c.finish_reason == "stop"
    u = raw["usage"]
    prompt = u["input_tokens"] + u.get("cache_read_input_tokens", 0) + u.get("cache_creation_input_tokens", 0)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (
        prompt, u["output_tokens"], prompt + u["output_tokens"])  # fmt: skip
    assert c.usage.cached_tokens == c.raw["usage"].get("cache_read_input_tokens", 0)


async def test_anthropic_max_tokens_is_length(llama_server: Any) -> None:
    c = await anthropic_lm(llama_server).with_max_tokens(2).with_temperature(0).acall(FEW_SHOT)
    assert c.finish_reason == "length" and c.usage.completion_tokens == 2 and c.text.startswith(" Paris")


async def test_anthropic_stream(llama_server: Any) -> None:
    lm = anthropic_lm(llama_server).with_max_tokens(8).with_stop("\n").with_temperature(0)
    full = await lm.acall(FEW_SHOT)
    deltas, end = await _stream(lm, FEW_SHOT)
    assert "".join(deltas) == end.completion.text == " Paris"
    assert end.completion.finish_reason == "stop"
    assert (end.usage.prompt_tokens, end.usage.completion_tokens, end.usage.total_tokens) == (
        full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens)  # fmt: skip


async def test_anthropic_system_goes_top_level(llama_server: Any) -> None:
    raw = llama_server.post("/v1/messages", {"model": "gemma", "system": "Answer.", "max_tokens": 4,
                                             "stop_sequences": ["\n"], "temperature": 0,
                                             "messages": [{"role": "user", "content": FEW_SHOT}]})  # fmt: skip
    c = await anthropic_lm(llama_server).with_max_tokens(4).with_stop("\n").with_temperature(0).acall(
        [Message.system("Answer."), Message.user(FEW_SHOT)])  # fmt: skip
    u = raw["usage"]
    assert c.usage.prompt_tokens == u["input_tokens"] + u.get("cache_read_input_tokens", 0) + u.get(
        "cache_creation_input_tokens", 0)  # fmt: skip
    assert c.text == raw["content"][0]["text"]


async def test_anthropic_context_overflow_is_typed(llama_server: Any) -> None:
    with pytest.raises(errors.ContextWindowExceededError):
        await anthropic_lm(llama_server).with_max_tokens(1).acall("word " * 5000)
