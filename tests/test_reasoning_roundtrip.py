"""Reasoning blocks go back to the provider that made them, unchanged, in the next turn of a tool loop.

Wire bodies follow the public references:
- Anthropic extended thinking: the assistant turn's `thinking` (with `signature`) and
  `redacted_thinking` (with `data`) blocks precede its `tool_use`; when thinking is enabled the next
  request must carry them unchanged in that assistant message. Streamed, a thinking block is a
  `content_block_start` then `thinking_delta` and `signature_delta` deltas.
- OpenAI Responses (stateless): `reasoning` output items (`id`, `summary`, `encrypted_content` with
  `include: ["reasoning.encrypted_content"]`) are passed back as input items before the turn's
  `function_call` items.
"""

from __future__ import annotations

import json
from typing import Any

from dsrs import LM, Message, Request, Tool
from dsrs.cache import cache_key
from scripted import Reply

KEY = "sk-test-0123456789"
WEATHER = Tool("get_weather", "Current weather for a city",
               {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})  # fmt: skip
RESULT = '{"temp_c": 18}'
ASK = [Message.user("Weather in Paris?")]

# -- Anthropic --------------------------------------------------------------------------------
THINKING = {"type": "thinking", "thinking": "The user wants the weather; call the tool.", "signature": "EqQBCgIYAhIM1gbcDa9"}
REDACTED = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIw"}
TOOL_USE = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}
THINK_CFG = {"thinking": {"type": "enabled", "budget_tokens": 2048}}


def _an_msg(content: list[dict[str, Any]], stop: str) -> dict[str, Any]:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 30, "output_tokens": 5}}  # fmt: skip


def _ev(kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **data}


AN_FINAL = Reply(json=_an_msg([{"type": "text", "text": "18 C in Paris"}], "end_turn"))
AN_TOOL = Reply(json=_an_msg([THINKING, REDACTED, TOOL_USE], "tool_use"))
AN_TOOL_STREAM = Reply(sse=[
    _ev("message_start", message=_an_msg([], None)),  # type: ignore[arg-type]
    _ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
    _ev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "The user wants the weather; "}),
    _ev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "call the tool."}),
    _ev("content_block_delta", index=0, delta={"type": "signature_delta", "signature": THINKING["signature"]}),
    _ev("content_block_stop", index=0),
    _ev("content_block_start", index=1, content_block=REDACTED),
    _ev("content_block_stop", index=1),
    _ev("content_block_start", index=2, content_block={**TOOL_USE, "input": {}}),
    _ev("content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": "{\"city\": \"Paris\"}"}),
    _ev("content_block_stop", index=2),
    _ev("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None}, usage={"output_tokens": 5}),
    _ev("message_stop")])  # fmt: skip
AN_EXPECTED = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": [THINKING, REDACTED, TOOL_USE]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": RESULT}]}]  # fmt: skip


def _anthropic(scripted: Any, spec: str = "anthropic/claude-sonnet-4-5") -> LM:
    return LM(spec, base_url=scripted.url + "/v1", api_key=KEY, retries=0, tools=[WEATHER], extra=THINK_CFG)


async def _first(lm: LM, streamed: bool) -> Any:
    if streamed:
        return [x async for x in lm.astream(ASK)][-1].completion
    return await lm.acall(ASK)


def _follow(first: Any) -> list[Message]:
    return ASK + [Message.from_completion(first), Message.tool(first.tool_calls[0].id, RESULT)]


async def _anthropic_round(scripted: Any, streamed: bool) -> None:
    scripted.script(AN_TOOL_STREAM if streamed else AN_TOOL, AN_FINAL)
    lm = _anthropic(scripted)
    first = await _first(lm, streamed)
    assert first.finish_reason == "tool_calls" and first.text == ""
    assert "signature" not in repr(first) and "EqQB" not in repr(first)  # opaque, kept out of reprs
    second = await lm.acall(_follow(first))
    assert second.text == "18 C in Paris"
    sent = scripted.requests[1].json
    assert sent["messages"] == AN_EXPECTED  # thinking blocks unchanged, before tool_use
    assert sent["thinking"] == THINK_CFG["thinking"]


async def test_anthropic_thinking_goes_back_before_tool_use(scripted: Any) -> None:
    await _anthropic_round(scripted, streamed=False)


async def test_anthropic_streamed_thinking_goes_back(scripted: Any) -> None:
    await _anthropic_round(scripted, streamed=True)


# -- OpenAI Responses -------------------------------------------------------------------------
RS_ITEM = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Need the weather tool."}],
           "encrypted_content": "gAAAAABoAAAA-opaque"}  # fmt: skip
FC_ITEM = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
           "arguments": "{\"city\":\"Paris\"}", "status": "completed"}  # fmt: skip
MSG_ITEM = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "18 C in Paris", "annotations": []}]}  # fmt: skip
RS_CFG = {"include": ["reasoning.encrypted_content"], "store": False}
USAGE = {"input_tokens": 30, "output_tokens": 5, "total_tokens": 35}


def _response(output: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "status": "completed", "error": None,
            "incomplete_details": None, "model": "o4-mini", "output": output, "usage": USAGE}  # fmt: skip


RS_TOOL = Reply(json=_response([RS_ITEM, FC_ITEM]))
RS_TOOL_STREAM = Reply(sse=[
    _ev("response.output_item.added", output_index=0, item={**RS_ITEM, "summary": [], "encrypted_content": None}),
    _ev("response.output_item.done", output_index=0, item=RS_ITEM),
    _ev("response.output_item.added", output_index=1, item={**FC_ITEM, "arguments": ""}),
    _ev("response.function_call_arguments.delta", item_id="fc_1", output_index=1, delta="{\"city\":\"Paris\"}"),
    _ev("response.output_item.done", output_index=1, item=FC_ITEM),
    _ev("response.completed", response=_response([RS_ITEM, FC_ITEM]))])  # fmt: skip
RS_FINAL = Reply(json=_response([MSG_ITEM]))
RS_EXPECTED = [
    {"role": "user", "content": "Weather in Paris?"},
    RS_ITEM,
    FC_ITEM,  # the item after a reasoning item goes back as it came, its id "fc_1" included
    {"type": "function_call_output", "call_id": "call_1", "output": RESULT}]  # fmt: skip


def _responses(scripted: Any) -> LM:
    return LM("openai-responses/o4-mini", base_url=scripted.url + "/v1", api_key=KEY, retries=0, tools=[WEATHER],
              extra=RS_CFG)  # fmt: skip


async def _responses_round(scripted: Any, streamed: bool) -> None:
    scripted.script(RS_TOOL_STREAM if streamed else RS_TOOL, RS_FINAL)
    lm = _responses(scripted)
    first = await _first(lm, streamed)
    assert first.finish_reason == "tool_calls"
    assert "gAAAA" not in repr(first)
    second = await lm.acall(_follow(first))
    assert second.text == "18 C in Paris"
    sent = scripted.requests[1].json
    assert sent["input"] == RS_EXPECTED  # the reasoning item unchanged, before the function_call
    assert sent["include"] == ["reasoning.encrypted_content"] and sent["store"] is False


async def test_responses_reasoning_items_go_back_before_function_call(scripted: Any) -> None:
    await _responses_round(scripted, streamed=False)


async def test_responses_streamed_reasoning_items_go_back(scripted: Any) -> None:
    await _responses_round(scripted, streamed=True)


# -- across providers, cache --------------------------------------------------------------------
async def test_reasoning_is_never_sent_to_another_provider(scripted: Any) -> None:
    scripted.script(AN_TOOL, RS_FINAL, RS_TOOL, AN_FINAL)
    # Anthropic's thinking blocks do not go to a Responses provider: it gets the plain turn
    await _responses(scripted).acall(_follow(await _anthropic(scripted).acall(ASK)))
    assert scripted.requests[1].json["input"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "toolu_01", "name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
        {"type": "function_call_output", "call_id": "toolu_01", "output": RESULT}]  # fmt: skip
    # nor do Responses reasoning items go to Anthropic
    await _anthropic(scripted).acall(_follow(await _responses(scripted).acall(ASK)))
    assert scripted.requests[3].json["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]}  # fmt: skip


async def test_cache_key_and_cached_completion_keep_reasoning(scripted: Any) -> None:
    scripted.script(AN_TOOL)
    first = await _anthropic(scripted).with_cache(True).acall(ASK)
    assert first.reasoning == ({"provider": "anthropic", "block": THINKING}, {"provider": "anthropic", "block": REDACTED})
    with_r, without = Message.from_completion(first), Message.assistant(first.text, first.tool_calls)
    assert with_r != without and Message.coerce(with_r.to_json()) == with_r
    assert cache_key("anthropic", Request("m", (with_r,))) != cache_key("anthropic", Request("m", (without,)))
    # a cache hit still carries the blocks, so a cached first turn can be continued
    again = await _anthropic(scripted).with_cache(True).acall(ASK)
    assert again.usage.cache_hit and again.reasoning == first.reasoning
    assert len(scripted.requests) == 1
