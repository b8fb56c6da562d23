"""`POST /v1/messages`: the official anthropic SDK, unmodified, against the gateway; lanes on the scripted
OpenAI-compatible server (whose recorded requests show exactly what reached the upstream) and on the
real llama.cpp server. The same lanes, keys, budgets, ledger and metrics as /v1/chat/completions."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from conftest import FEW_SHOT
from gateway_fixture import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, InProcessGateway, get
from scripted import Reply, chat_reply
from test_gateway import SlowUpstream, _ledger_rows, _recv_all, _wait_for


@pytest.fixture(autouse=True)
def _upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream-secret-42")


def _scripted_lane(scripted: Any, **opts: Any) -> dict[str, Any]:
    return {"lm": "openai/gpt-4o-mini", "base_url": scripted.url + "/v1", "api_key_env": "UPSTREAM_KEY",
            "options": {"retries": 0, **opts}}  # fmt: skip


@pytest.fixture
def gateway(scripted: Any) -> Iterator[InProcessGateway]:
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"remote": _scripted_lane(scripted)},
        "models": {"claude-via-dsrs": {"lanes": ["remote"]}},
        "budgets": {"team": {"limit_msats": 2_000}},
        "keys": {"alice": {"key_env": "CLIENT_KEY"},
                 "bob": {"key_env": "OTHER_KEY", "budget": "team", "models": ["remote"]},
                 "carol": {"key_env": "CAROL_KEY", "rpm": 1}},
    }, env={"CAROL_KEY": CAROL_KEY})  # fmt: skip
    yield gw
    gw.close()


CAROL_KEY = "sk-client-carol-1111111111"


def sdk(gw: InProcessGateway, key: str = CLIENT_KEY, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, **kw)


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip


def _stream_reply(texts: list[str], prompt: int = 9, completion: int = 3, calls: list[dict[str, Any]] | None = None,
                  finish: str = "stop") -> Reply:  # fmt: skip
    """An OpenAI chat stream: role, text deltas, tool call deltas, the finish, the usage chunk, [DONE]."""
    items: list[Any] = [_chunk({"role": "assistant", "content": ""})]
    items += [_chunk({"content": t}) for t in texts]
    items += [_chunk({"tool_calls": [c]}) for c in calls or ()]
    items += [_chunk({}, finish),
              {"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [],
               "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}},
              "[DONE]"]  # fmt: skip
    return Reply(sse=items)


_WEATHER = {"name": "get_weather", "description": "weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip
_OPENAI_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                                    "parameters": _WEATHER["input_schema"]}}  # fmt: skip


def _tool_call_reply(args: str = '{"city": "Paris"}') -> Reply:
    call = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": args}}
    return Reply(json={"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
                                    "finish_reason": "tool_calls"}],
                       "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}})  # fmt: skip


# -- plain messages -------------------------------------------------------------------------------
def test_a_plain_message_with_a_system_prompt(gateway: InProcessGateway, scripted: Any) -> None:
    scripted.script(chat_reply("Bonjour", usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                                                 "prompt_tokens_details": {"cached_tokens": 4}}))  # fmt: skip
    r = sdk(gateway).messages.create(model="remote", max_tokens=50, system="Answer in French.",
                                     messages=[{"role": "user", "content": "hello"}], stop_sequences=["\n\n", "END"],
                                     metadata={"user_id": "u-1"}, service_tier="auto",
                                     extra_body={"temperature": 0.2, "top_p": 0.9})  # this SDK has no sampling arguments

    assert isinstance(r, anthropic.types.Message)
    assert (r.type, r.role, r.model, r.stop_reason, r.stop_sequence) == ("message", "assistant", "remote", "end_turn", None)
    assert [(b.type, b.text) for b in r.content] == [("text", "Bonjour")]
    assert r.id.startswith("msg_")
    assert (r.usage.input_tokens, r.usage.cache_read_input_tokens, r.usage.output_tokens) == (8, 4, 3)  # 12 in all
    assert r.model_extra["dsrs"]["lane"] == "remote" and r.model_extra["dsrs"]["provider"] == "openai"
    (seen,) = scripted.requests
    assert seen.path == "/v1/chat/completions" and seen.headers["authorization"] == "Bearer sk-upstream-secret-42"
    assert seen.json == {"model": "gpt-4o-mini",
                         "messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"}],
                         "max_completion_tokens": 50, "temperature": 0.2, "top_p": 0.9, "stop": ["\n\n", "END"]}  # fmt: skip
    assert CLIENT_KEY not in json.dumps(seen.headers)


def test_an_image_block_reaches_the_lane(gateway: InProcessGateway, scripted: Any) -> None:
    scripted.script(chat_reply("a red dot"))
    png = "iVBORw0KGgo="
    r = sdk(gateway).messages.create(model="remote", max_tokens=20, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
        {"type": "text", "text": "What is this?"}]}])  # fmt: skip
    assert r.content[0].text == "a red dot"
    assert scripted.requests[0].json["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "text", "text": "What is this?"}]}]  # fmt: skip


def test_system_blocks_content_blocks_and_bearer_auth(gateway: InProcessGateway, scripted: Any) -> None:
    scripted.script(chat_reply("ok"))
    client = anthropic.Anthropic(base_url=gateway.url, auth_token=CLIENT_KEY, max_retries=0)  # Authorization: Bearer
    r = client.messages.create(
        model="claude-via-dsrs", max_tokens=20,
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "ok"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Sure:"}]},
                  {"role": "user", "content": "go"}],
    )  # fmt: skip
    assert r.content[0].text == "ok" and r.model == "claude-via-dsrs"
    assert scripted.requests[0].json["messages"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."}, {"role": "user", "content": "Say ok"},
        {"role": "assistant", "content": "Sure:"}, {"role": "user", "content": "go"}]  # fmt: skip


def test_structured_output_and_top_k_reach_the_lane(gateway: InProcessGateway, scripted: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    scripted.script(chat_reply('{"city": "Paris"}'))
    r = sdk(gateway).messages.create(model="remote", max_tokens=40, messages=[{"role": "user", "content": "capital?"}],
                                     output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
                                     extra_body={"top_k": 5})  # fmt: skip
    assert json.loads(r.content[0].text) == {"city": "Paris"}
    sent = scripted.requests[0].json
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert sent["top_k"] == 5 and "effort" not in json.dumps(sent)


def test_unknown_paths_under_messages_answer_in_anthropic_shape(gateway: InProcessGateway) -> None:
    with pytest.raises(anthropic.NotFoundError) as ei:  # the gateway has no token counting
        sdk(gateway).messages.count_tokens(model="remote", messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["type"] == "error" and ei.value.body["error"]["type"] == "not_found_error"


# -- streaming ------------------------------------------------------------------------------------
def test_stream_helper_and_raw_stream(gateway: InProcessGateway, scripted: Any) -> None:
    scripted.script(_stream_reply(["Bon", "jour", "!"], prompt=9, completion=3), _stream_reply(["Hi"], 4, 1))
    with sdk(gateway).messages.stream(model="remote", max_tokens=30, messages=[{"role": "user", "content": "hello"}]) as s:
        texts = list(s.text_stream)
        final = s.get_final_message()
    assert texts == ["Bon", "jour", "!"]
    assert [(b.type, b.text) for b in final.content] == [("text", "Bonjour!")]
    assert final.stop_reason == "end_turn" and (final.usage.input_tokens, final.usage.output_tokens) == (9, 3)
    sent = scripted.requests[0].json
    assert sent["stream"] is True and sent["max_completion_tokens"] == 30

    events = list(sdk(gateway).messages.create(model="remote", max_tokens=30, stream=True,
                                               messages=[{"role": "user", "content": "hey"}]))  # fmt: skip
    assert [e.type for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                        "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    assert events[0].message.role == "assistant" and events[0].message.content == []
    assert events[1].index == 0 and events[1].content_block.type == "text"
    assert events[2].delta.type == "text_delta" and events[2].delta.text == "Hi"
    assert events[4].delta.stop_reason == "end_turn" and events[4].usage.output_tokens == 1
    assert events[4].usage.input_tokens == 4
    assert len({events[0].message.id}) == 1 and events[0].message.id.startswith("msg_")


def test_a_stream_cut_by_the_upstream_after_the_first_text_is_an_error_event(gateway: InProcessGateway,
                                                                             scripted: Any) -> None:  # fmt: skip
    scripted.script(Reply(sse=[_chunk({"role": "assistant", "content": "Hel"})], cut=True))
    got = []
    with pytest.raises(anthropic.APIStatusError) as ei:
        for ev in sdk(gateway).messages.create(model="remote", max_tokens=30, stream=True,
                                               messages=[{"role": "user", "content": "hey"}]):  # fmt: skip
            got.append(ev.type)
    assert got[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert ei.value.body["type"] == "error" and ei.value.body["error"]["type"] == "api_error"
    assert "message_stop" not in got


# -- tools ----------------------------------------------------------------------------------------
def test_a_tool_use_round_trip(gateway: InProcessGateway, scripted: Any) -> None:
    scripted.script(_tool_call_reply(), chat_reply("It is sunny in Paris.", 30, 7))
    client = sdk(gateway)
    first = client.messages.create(model="remote", max_tokens=100, tools=[_WEATHER], tool_choice={"type": "any"},
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])  # fmt: skip
    assert first.stop_reason == "tool_use"
    text, use = first.content
    assert (text.type, text.text) == ("text", "Let me look.")
    assert (use.type, use.id, use.name, use.input) == ("tool_use", "call_7", "get_weather", {"city": "Paris"})
    assert scripted.requests[0].json == {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "max_completion_tokens": 100, "tools": [_OPENAI_WEATHER], "tool_choice": "required"}  # fmt: skip

    second = client.messages.create(
        model="remote", max_tokens=100, tools=[_WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": first.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 24 C"},
                                               {"type": "text", "text": "Short answer please."}]}],
    )  # fmt: skip
    assert second.content[0].text == "It is sunny in Paris." and second.stop_reason == "end_turn"
    assert scripted.requests[1].json == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": "Let me look.",
                      "tool_calls": [{"id": "call_7", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "content": "sunny, 24 C", "tool_call_id": "call_7"},
                     {"role": "user", "content": "Short answer please."}],
        "max_completion_tokens": 100, "tools": [_OPENAI_WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip


def test_a_streamed_tool_use(gateway: InProcessGateway, scripted: Any) -> None:
    calls = [{"index": 0, "id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
             {"index": 0, "function": {"arguments": '{"city": '}}, {"index": 0, "function": {"arguments": '"Oslo"}'}}]  # fmt: skip
    scripted.script(_stream_reply([], 15, 6, calls=calls, finish="tool_calls"))
    with sdk(gateway).messages.stream(model="remote", max_tokens=60, tools=[_WEATHER], tool_choice={"type": "auto"},
                                      messages=[{"role": "user", "content": "Oslo?"}]) as s:  # fmt: skip
        kinds = [ev.type for ev in s]
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    (use,) = final.content
    assert (use.type, use.id, use.name, use.input) == ("tool_use", "call_9", "get_weather", {"city": "Oslo"})
    assert "input_json" in kinds and kinds[-1] == "message_stop"
    assert scripted.requests[0].json["tool_choice"] == "auto"


# -- errors ---------------------------------------------------------------------------------------
def test_errors_in_anthropic_shape(gateway: InProcessGateway, scripted: Any) -> None:
    scripted.script(default=chat_reply("should not happen"))
    for key in ("sk-wrong", CLIENT_KEY + "x"):
        with pytest.raises(anthropic.AuthenticationError) as ei:
            sdk(gateway, key).messages.create(model="remote", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert ei.value.status_code == 401
        assert ei.value.body == {"type": "error", "error": {"type": "authentication_error", "message": ei.value.body["error"]["message"]},
                                 "request_id": None}  # fmt: skip
    with pytest.raises(anthropic.BadRequestError) as ei:  # max_tokens is required, as by Anthropic
        sdk(gateway).post("/v1/messages", cast_to=object, body={"model": "remote", "messages": [{"role": "user", "content": "x"}]})
    assert ei.value.body["error"]["type"] == "invalid_request_error" and "max_tokens" in ei.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as ei:
        sdk(gateway).messages.create(model="claude-9", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):  # bob's key may not use this model
        sdk(gateway, OTHER_KEY).messages.create(model="claude-via-dsrs", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    bad: list[tuple[dict[str, Any], str]] = [
        ({"temperature": 1.5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ]  # fmt: skip
    for extra, word in bad:
        body = {"model": "remote", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], **extra}
        with pytest.raises(anthropic.BadRequestError) as ei:
            sdk(gateway).post("/v1/messages", cast_to=object, body=body)
        assert ei.value.body["error"]["type"] == "invalid_request_error" and word in ei.value.body["error"]["message"], extra
    assert scripted.requests == []


def test_upstream_errors_and_limits_in_anthropic_shape(gateway: InProcessGateway, scripted: Any) -> None:
    client = sdk(gateway)
    msgs = [{"role": "user", "content": "x"}]
    scripted.script(Reply(429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                          "code": "insufficient_quota"}}))  # fmt: skip
    with pytest.raises(anthropic.PaymentRequiredError) as ei:  # the lane's quota is spent: billing, not a retry
        client.messages.create(model="remote", max_tokens=5, messages=msgs)
    assert ei.value.body["error"]["type"] == "billing_error"
    scripted.script(Reply(429, {"error": {"message": "slow down", "type": "requests"}}, headers={"retry-after": "7"}))
    with pytest.raises(anthropic.RateLimitError) as ei:
        client.messages.create(model="remote", max_tokens=5, messages=msgs)
    assert ei.value.body["error"]["type"] == "rate_limit_error" and ei.value.response.headers["retry-after"] == "7"
    scripted.script(Reply(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}))
    with pytest.raises(anthropic.InternalServerError) as ei:  # the upstream's key, not the client's: 502
        client.messages.create(model="remote", max_tokens=5, messages=msgs)
    assert ei.value.status_code == 502 and ei.value.body["error"]["type"] == "api_error"
    assert "sk-upstream-secret-42" not in json.dumps(ei.value.body)
    scripted.script(Reply(400, {"error": {"message": "maximum context length is 128000 tokens",
                                          "code": "context_length_exceeded"}}))  # fmt: skip
    with pytest.raises(anthropic.BadRequestError) as ei:
        client.messages.create(model="remote", max_tokens=5, messages=msgs)
    assert ei.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.APIStatusError) as ei:
        client.messages.create(model="remote", max_tokens=5, messages=[{"role": "user", "content": "x" * 5_000_000}])
    assert ei.value.status_code == 413 and ei.value.body["error"]["type"] == "request_too_large"
    assert len(scripted.requests) == 1  # since the last script: the 400 reached the upstream, the 413 did not


def test_budget_exhausted_is_a_402_billing_error(gateway: InProcessGateway, scripted: Any) -> None:
    # bob's budget: 2000 msats; the worst case of one call (prompt + 1000 output tokens at gpt-4o-mini prices) ~ 601
    scripted.script(default=chat_reply("ok", prompt_tokens=5, completion_tokens=1000))
    client = sdk(gateway, OTHER_KEY)
    ok = 0
    with pytest.raises(anthropic.PaymentRequiredError) as ei:
        for _ in range(4):
            client.messages.create(model="remote", max_tokens=1000, messages=[{"role": "user", "content": "hello"}])
            ok += 1
    assert ei.value.status_code == 402 and ei.value.body["error"]["type"] == "billing_error"
    assert ei.value.response.headers["x-should-retry"] == "false"
    team = gateway.runtime.budgets["team"]
    assert ok == 3 == len(scripted.requests)
    assert team.spent_msats == 3 * 601 <= team.limit_msats and team.open_reservations == 0
    with pytest.raises(anthropic.PaymentRequiredError):  # a stream is refused before its 200, the same way
        client.messages.create(model="remote", max_tokens=1000, stream=True, messages=[{"role": "user", "content": "x"}])
    assert len(scripted.requests) == 3 and team.open_reservations == 0


def test_a_keys_rate_limit_is_a_429_rate_limit_error(gateway: InProcessGateway, scripted: Any) -> None:
    scripted.script(default=chat_reply("ok"))
    client = sdk(gateway, CAROL_KEY)  # rpm = 1 per clock minute: of 3 quick calls, at most 2 windows let one through
    answered = 0
    with pytest.raises(anthropic.RateLimitError) as ei:
        for _ in range(3):
            client.messages.create(model="remote", max_tokens=5, messages=[{"role": "user", "content": "x"}])
            answered += 1
    assert 1 <= answered <= 2 and len(scripted.requests) == answered
    assert ei.value.body["error"]["type"] == "rate_limit_error" and 1 <= int(ei.value.response.headers["retry-after"]) <= 60


# -- the same books as a chat completion ----------------------------------------------------------
def test_a_message_is_booked_exactly_like_a_chat_completion(scripted: Any, caplog: pytest.LogCaptureFixture) -> None:
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"books": _scripted_lane(scripted)},
        "budgets": {"all": {"limit_msats": 100_000}},
        "gateway": {"budget": "all"},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    caplog.set_level(logging.INFO, logger="dsrs.gateway.access")
    try:
        budget = gw.runtime.budgets["all"]
        scripted.script(chat_reply("same", 40, 10, model="gpt-4o-mini"), chat_reply("same", 40, 10, model="gpt-4o-mini"),
                        _stream_reply(["same"], 40, 10))
        openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0).chat.completions.create(
            model="books", max_tokens=64, messages=[{"role": "user", "content": "hello"}])  # fmt: skip
        after_chat = budget.spent_msats
        sdk(gw).messages.create(model="books", max_tokens=64, messages=[{"role": "user", "content": "hello"}])
        after_message = budget.spent_msats
        with sdk(gw).messages.stream(model="books", max_tokens=64, messages=[{"role": "user", "content": "hello"}]) as s:
            s.until_done()
        assert after_chat > 0 and after_message == 2 * after_chat and budget.spent_msats == 3 * after_chat
        assert [r.json for r in scripted.requests[:2]] == [scripted.requests[0].json] * 2  # the same upstream request
        _wait_for(lambda: len(_ledger_rows(gw, "books")) == 3, "three ledger rows")
        rows = _ledger_rows(gw, "books")
        assert {(r.cost_msats, r.prompt_tokens, r.completion_tokens, r.program, r.model) for r in rows} == {
            (after_chat, 40, 10, "key:alice", "gpt-4o-mini")}  # fmt: skip
        _, text = get(gw.url + "/metrics", ADMIN_KEY)
        assert 'dsrs_lane_calls_total{lane="books"} 3' in text
        assert 'dsrs_lane_tokens_total{kind="prompt",lane="books"} 120' in text
        assert f'dsrs_lane_msats_total{{lane="books"}} {3 * after_chat}' in text
        assert 'dsrs_gateway_requests_total{endpoint="/v1/messages",status="200"} 2' in text
        assert 'dsrs_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
        lines = [r.getMessage() for r in caplog.records if r.name == "dsrs.gateway.access"]
        mine = [ln for ln in lines if ln.startswith("POST /v1/messages 200")]
        assert len(mine) == 2 and all("model=books lane=books key=alice tokens=50" in ln for ln in mine)
        assert not any(CLIENT_KEY in ln for ln in lines)
    finally:
        gw.close()


def test_an_abandoned_message_stream_is_booked_in_ledger_metrics_and_budget() -> None:
    from dsrs import pricing
    from dsrs.worst_case import MESSAGE_OVERHEAD

    up = SlowUpstream()
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"left": {"lm": "openai/gpt-4o-mini", "base_url": f"http://127.0.0.1:{up.port}/v1",
                           "api_key_env": "UPSTREAM_KEY", "options": {"retries": 0}}},
        "budgets": {"all": {"limit_msats": 10_000}},
        "gateway": {"budget": "all"},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        stream = sdk(gw).messages.create(model="left", max_tokens=100, stream=True, messages=[{"role": "user", "content": "hi"}])
        first = next(iter(stream))
        assert first.type == "message_start"
        stream.close()  # the client walks away mid-stream
        assert up.cancelled.wait(30), "the upstream stream was not cancelled"
        budget = gw.runtime.budgets["all"]
        worst = pricing.cost_msats("openai", "gpt-4o-mini", 2 + MESSAGE_OVERHEAD, 100)
        _wait_for(lambda: budget.open_reservations == 0, "the reservation settled")
        assert budget.spent_msats == worst > 0  # the provider may go on generating: the worst case stays booked
        _wait_for(lambda: 'status="499"' in get(gw.url + "/metrics", ADMIN_KEY)[1], "the request was counted")
        _, text = get(gw.url + "/metrics", ADMIN_KEY)
        assert f'dsrs_lane_msats_total{{lane="left"}} {worst}' in text
        assert 'dsrs_lane_unsettled_total{lane="left",reason="abandoned"} 1' in text
        assert 'dsrs_gateway_requests_total{endpoint="/v1/messages",status="499"} 1' in text
        _wait_for(lambda: _ledger_rows(gw, "left"), "the ledger row")
        (row,) = _ledger_rows(gw, "left")
        assert row.cost_msats == worst and row.cost_source == "estimate" and row.program == "key:alice"
    finally:
        gw.close()
        up.close()


# -- the real llama.cpp server behind the gateway -------------------------------------------------
def test_messages_on_the_real_llama_cpp_lane(llama_server: Any) -> None:
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"local": {"lm": "llamacpp/gemma", "base_url": llama_server.url + "/v1", "options": {"temperature": 0.0}}},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        client = sdk(gw)
        r = client.messages.create(model="local", max_tokens=4, messages=[{"role": "user", "content": FEW_SHOT}],
                                   extra_body={"temperature": 0.0})  # fmt: skip
        direct = llama_server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": FEW_SHOT}],
                                                            "max_tokens": 4, "temperature": 0.0})  # fmt: skip
        assert r.content[0].text == direct["choices"][0]["message"]["content"] and "Paris" in r.content[0].text
        assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 4
        # Anthropic's input_tokens leave out cache reads (llama.cpp reuses the prompt of an earlier call)
        assert r.usage.input_tokens + r.usage.cache_read_input_tokens == direct["usage"]["prompt_tokens"]
        assert r.model_extra["dsrs"]["provider"] == "llamacpp" and r.model_extra["dsrs"]["cost_msats"] == 0
        with client.messages.stream(model="local", max_tokens=4, extra_body={"temperature": 0.0},
                                    messages=[{"role": "user", "content": FEW_SHOT}]) as s:  # fmt: skip
            streamed = "".join(s.text_stream)
            final = s.get_final_message()
        assert streamed == r.content[0].text and final.usage.output_tokens == 4 and final.stop_reason == "max_tokens"
        # llama.cpp speaks Anthropic Messages itself: the same SDK against it gives the same answer and events
        own = anthropic.Anthropic(base_url=llama_server.url, api_key="unused", max_retries=0)
        theirs = own.messages.create(model="gemma", max_tokens=4, messages=[{"role": "user", "content": FEW_SHOT}],
                                     extra_body={"temperature": 0.0})  # fmt: skip
        assert (theirs.content[0].text, theirs.stop_reason, theirs.usage.output_tokens) == (
            r.content[0].text, r.stop_reason, r.usage.output_tokens)  # fmt: skip

        def kinds(c: anthropic.Anthropic, model: str) -> list[str]:
            evs = c.messages.create(model=model, max_tokens=4, stream=True, extra_body={"temperature": 0.0},
                                    messages=[{"role": "user", "content": FEW_SHOT}])  # fmt: skip
            out: list[str] = []
            for ev in evs:
                if ev.type != "ping" and (not out or out[-1] != ev.type):  # a run of deltas counts once
                    out.append(ev.type)
            return out

        assert kinds(client, "local") == kinds(own, "gemma") == [
            "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
            "message_stop"]  # fmt: skip
    finally:
        gw.close()


# -- a malformed HTTP request gets a fixed 400, never an echo of its bytes --------------------------
def test_a_malformed_request_is_answered_without_echoing_its_bytes(gateway: InProcessGateway,
                                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    key = CLIENT_KEY.encode()
    for raw in (b"GET /\x00\xff" + key + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + key + b"\x01\r\nContent-Length: 2\r\n\r\n{}",
                b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key + b"\r\nContent-Length: " + key + b"\r\n\r\n",
                key + b" " + key + b"\r\n\r\n"):  # fmt: skip
        with socket.create_connection(("127.0.0.1", gateway.port)) as s:
            s.sendall(raw)
            got = _recv_all(s)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 400 Bad Request\r\n"), got[:200]
        assert body == b"400 Bad Request: the request is not valid HTTP", got[:300]
        assert key not in got
    assert not [r for r in caplog.records if CLIENT_KEY in caplog.handler.format(r)]
    assert get(gateway.url + "/health") == (200, {"status": "ok"})
