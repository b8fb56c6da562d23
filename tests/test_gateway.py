"""The gateway in one process: the official openai SDK, unmodified, against lanes on the real llama.cpp
server and on the scripted server (whose recorded requests show exactly what reached the upstream)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web

from conftest import FEW_SHOT
from gateway_fixture import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, InProcessGateway, free_port, get
from scripted import Reply, chat_reply


@pytest.fixture(autouse=True)
def _upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream-secret-42")


def _llama_lane(llama_server: Any, **opts: Any) -> dict[str, Any]:
    return {"lm": "llamacpp/gemma", "base_url": llama_server.url + "/v1",
            "options": {"temperature": 0.0, "max_tokens": 8, **opts}}  # fmt: skip


def _scripted_lane(scripted: Any, **opts: Any) -> dict[str, Any]:
    return {"lm": "openai/gpt-4o-mini", "base_url": scripted.url + "/v1", "api_key_env": "UPSTREAM_KEY",
            "options": {"retries": 0, **opts}}  # fmt: skip


@pytest.fixture
def gateway(llama_server: Any, scripted: Any) -> Iterator[InProcessGateway]:
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"local": _llama_lane(llama_server), "remote": _scripted_lane(scripted)},
        "models": {"gpt-5.5": {"lanes": ["local"]}},
        "budgets": {"team": {"limit_msats": 2_000}},
        "keys": {"alice": {"key_env": "CLIENT_KEY"},
                 "bob": {"key_env": "OTHER_KEY", "budget": "team", "rpm": 4, "models": ["remote"]}},
    })  # fmt: skip
    yield gw
    gw.close()


def sdk(gw: InProcessGateway, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def post(url: str, body: bytes, key: str | None = CLIENT_KEY, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- the real llama.cpp server behind the gateway -------------------------------------------------
def test_chat_completion_through_the_gateway(gateway: InProcessGateway, llama_server: Any) -> None:
    r = sdk(gateway).chat.completions.create(model="local", messages=[{"role": "user", "content": FEW_SHOT}], max_tokens=4)
    direct = llama_server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": FEW_SHOT}],
                                                        "max_tokens": 4, "temperature": 0.0})  # fmt: skip
    assert r.object == "chat.completion" and r.model == "local"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert r.usage.completion_tokens == direct["usage"]["completion_tokens"] == 4
    assert r.choices[0].finish_reason == "length"
    extra = r.model_extra["dsrs"]
    assert extra["lane"] == "local" and extra["provider"] == "llamacpp" and extra["cost_msats"] == 0


def test_chat_stream_through_the_gateway(gateway: InProcessGateway) -> None:
    client = sdk(gateway)
    full = client.chat.completions.create(model="gpt-5.5", messages=[{"role": "user", "content": FEW_SHOT}], max_tokens=6)
    chunks = list(client.chat.completions.create(model="gpt-5.5", messages=[{"role": "user", "content": FEW_SHOT}],
                                                 max_tokens=6, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_responses_through_the_gateway(gateway: InProcessGateway) -> None:
    client = sdk(gateway)
    r = client.responses.create(model="local", input=FEW_SHOT, max_output_tokens=4)
    assert r.object == "response" and "Paris" in r.output_text
    assert r.usage.output_tokens == 4 and r.usage.input_tokens > 10
    with client.responses.stream(model="local", input=[{"role": "user", "content": [{"type": "input_text", "text": FEW_SHOT}]}],
                                 max_output_tokens=4) as s:  # fmt: skip
        kinds = [ev.type for ev in s]
        final = s.get_final_response()
    assert final.output_text == r.output_text
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
    assert final.usage.output_tokens == 4


def test_models_health_metrics(gateway: InProcessGateway) -> None:
    ids = {m.id: m.model_extra["dsrs"] for m in sdk(gateway).models.list()}
    assert ids["gpt-5.5"]["lanes"] == ["local"] and ids["remote"]["model"] == "gpt-4o-mini"
    assert [m.id for m in sdk(gateway, OTHER_KEY).models.list()] == ["remote"]  # bob may only use "remote"
    status, health = get(gateway.url + "/health", ADMIN_KEY)
    assert status == 200 and health["status"] == "ok" and health["redis"] is None and health["budget_mode"] == "local"
    sdk(gateway).chat.completions.create(model="local", messages=[{"role": "user", "content": FEW_SHOT}], max_tokens=2)
    status, text = get(gateway.url + "/metrics", ADMIN_KEY)
    assert status == 200
    assert 'dsrs_lane_calls_total{lane="local"} 1' in text
    assert 'dsrs_lane_tokens_total{kind="completion",lane="local"} 2' in text
    assert 'dsrs_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text


# -- client keys, bad input -----------------------------------------------------------------------
def test_missing_or_wrong_key_is_401_and_nothing_reaches_the_upstream(gateway: InProcessGateway, scripted: Any) -> None:
    scripted.script(default=chat_reply("should not happen"))
    for key in ("sk-wrong", CLIENT_KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as ei:
            sdk(gateway, key).chat.completions.create(model="remote", messages=[{"role": "user", "content": "hi"}])
        assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"
    status, body = post(gateway.url + "/v1/responses", b'{"model": "remote", "input": "hi"}', key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, "nope").models.list()
    assert scripted.requests == []
    assert gateway.runtime.budgets["team"].spent_msats == 0
    assert gateway.runtime.budgets["team"].open_reservations == 0


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(gateway: InProcessGateway, scripted: Any) -> None:
    url = gateway.url + "/v1/chat/completions"
    status, body = post(url, b'{"model": "remote", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json" and body["error"]["type"] == "invalid_request_error"
    status, body = post(url, b'[1, 2]')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = post(url, json.dumps({"model": "remote", "messages": []}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(url, json.dumps({"model": "remote", "messages": [{"role": "user", "content": "x"}], "n": 3}).encode())
    assert status == 400 and body["error"]["code"] == "unsupported_parameter" and body["error"]["param"] == "n"
    status, body = post(url, json.dumps({"model": "remote", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}).encode())
    assert status == 400 and body["error"]["code"] == "unknown_parameter"
    status, body = post(url, json.dumps({"model": "remote", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:"}}]}]}).encode())  # fmt: skip
    assert status == 400 and body["error"]["code"] == "unsupported_content"
    status, body = post(url, json.dumps({"model": "remote", "messages": [{"role": "user", "content": "x" * 5_000_000}]}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError) as ei:
        sdk(gateway).chat.completions.create(model="gpt-9-ultra", messages=[{"role": "user", "content": "x"}])
    assert ei.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # bob's key may not use "local"
        sdk(gateway, OTHER_KEY).chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as ei:
        sdk(gateway).chat.completions.create(model="remote", messages=[{"role": "user", "content": "x"}], temperature=7)
    assert ei.value.param == "temperature"
    status, body = get(gateway.url + "/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "not_found"
    assert scripted.requests == []
    scripted.script(chat_reply("still here"))
    r = sdk(gateway).chat.completions.create(model="remote", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "still here"


def test_upstream_errors_map_to_openai_errors(gateway: InProcessGateway, scripted: Any) -> None:
    client = sdk(gateway)
    msgs = [{"role": "user", "content": "x"}]
    scripted.script(Reply(429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                          "code": "insufficient_quota"}}))  # fmt: skip
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model="remote", messages=msgs)
    assert ei.value.code == "insufficient_quota"
    scripted.script(Reply(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}))
    with pytest.raises(openai.InternalServerError) as ei:  # the upstream's key, not the client's: 502
        client.chat.completions.create(model="remote", messages=msgs)
    assert ei.value.status_code == 502 and ei.value.code == "upstream_authentication"
    assert "sk-upstream-secret-42" not in str(ei.value.body)
    scripted.script(Reply(400, {"error": {"message": "maximum context length is 128000 tokens",
                                          "code": "context_length_exceeded"}}))  # fmt: skip
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="remote", messages=msgs)
    assert ei.value.code == "context_length_exceeded"
    scripted.script(Reply(503, {"error": {"message": "overloaded"}}))
    with pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model="remote", messages=msgs)
    assert ei.value.status_code == 502
    assert [r.headers["authorization"] for r in scripted.requests] == ["Bearer sk-upstream-secret-42"]


def test_tools_round_trip_on_both_wires(gateway: InProcessGateway, scripted: Any) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
    call = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    reply = Reply(json={"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                                     "finish_reason": "tool_calls"}],
                        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}})  # fmt: skip
    scripted.script(reply, reply)
    r = sdk(gateway).chat.completions.create(model="remote", messages=[{"role": "user", "content": "weather?"}],
                                             tools=[tool], tool_choice="auto", max_tokens=50)  # fmt: skip
    tc = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert (tc.id, tc.function.name, json.loads(tc.function.arguments)) == ("call_7", "get_weather", {"city": "Paris"})
    sent = scripted.requests[0].json
    assert sent["tools"] == [tool] and sent["tool_choice"] == "auto" and sent["max_completion_tokens"] == 50
    assert sent["messages"] == [{"role": "user", "content": "weather?"}]

    resp = sdk(gateway).responses.create(
        model="remote", instructions="be brief",
        input=[{"role": "user", "content": "weather?"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "cold"}],
        tools=[{"type": "function", "name": "get_weather", "description": "weather in a city",
                "parameters": tool["function"]["parameters"]}, {"type": "web_search"}],
    )  # fmt: skip
    fc = [o for o in resp.output if o.type == "function_call"][0]
    assert (fc.call_id, fc.name, fc.arguments) == ("call_7", "get_weather", '{"city": "Paris"}')
    sent = scripted.requests[1].json
    assert sent["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "cold", "tool_call_id": "call_1"},
    ]  # fmt: skip
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]  # hosted tools are not offered to lanes


# -- budgets and rate limits (in-process state) ---------------------------------------------------
def test_key_budget_refuses_before_sending(gateway: InProcessGateway, scripted: Any) -> None:
    # worst case of one call = prompt estimate + 1000 output tokens at gpt-4o-mini list price ~ 603 msats
    scripted.script(default=chat_reply("ok", prompt_tokens=5, completion_tokens=1000))
    client = sdk(gateway, OTHER_KEY)
    ok = 0
    with pytest.raises(openai.RateLimitError) as ei:
        for _ in range(5):
            client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hello"}], max_tokens=1000)
            ok += 1
    assert ei.value.code == "budget_exceeded" and ei.value.type == "insufficient_quota"
    assert ei.value.response.headers["x-should-retry"] == "false"
    team = gateway.runtime.budgets["team"]
    assert ok == 3 == len(scripted.requests)
    assert team.spent_msats == 3 * 601 <= team.limit_msats and team.open_reservations == 0


def test_rate_limit_per_key(gateway: InProcessGateway, scripted: Any) -> None:
    scripted.script(default=chat_reply("ok"))
    client = sdk(gateway, OTHER_KEY)
    seen = []
    for _ in range(5):
        try:
            client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hello"}], max_tokens=5)
            seen.append(200)
        except openai.RateLimitError as e:
            seen.append(e.code)
            assert 1 <= int(e.response.headers["retry-after"]) <= 60
    # rpm = 4 per clock minute: the fifth is refused (unless a minute boundary fell in between)
    assert seen[:4] == [200] * 4
    assert seen[4] == "rate_limit_exceeded" or len(scripted.requests) == 5
    assert len(scripted.requests) == seen.count(200)


# -- a client disconnecting mid-stream ------------------------------------------------------------
class SlowUpstream:
    """An OpenAI chat server that streams one chunk, then waits; records when its stream is cancelled."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.started = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        ready = threading.Event()

        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"id": "c", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "Hello"}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return resp

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            app = web.Application()
            app.router.add_post("/v1/chat/completions", handle)
            self.runner = web.AppRunner(app, handler_cancellation=True)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_client_disconnect_mid_stream_cancels_the_upstream(scripted: Any) -> None:
    up = SlowUpstream()
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"slow": {"lm": "openai/gpt-4o-mini", "base_url": f"http://127.0.0.1:{up.port}/v1",
                           "api_key_env": "UPSTREAM_KEY", "options": {"retries": 0, "max_tokens": 100}},
                  "remote": _scripted_lane(scripted)},
        "budgets": {"all": {"limit_msats": 10_000}},
        "gateway": {"budget": "all"},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        body = json.dumps({"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)  # fmt: skip
            got = b""
            while b"Hello" not in got:
                got += s.recv(4096)
            assert b"200 OK" in got and b"text/event-stream" in got
            budget = gw.runtime.budgets["all"]
            assert budget.open_reservations == 1 and budget.reserved_msats > 0
        assert up.cancelled.wait(30), "the upstream stream was not cancelled"
        # the budget's rule for an abandoned stream: the worst case stays booked
        for _ in range(300):
            if budget.open_reservations == 0:
                break
            threading.Event().wait(0.01)
        assert budget.open_reservations == 0 and budget.reserved_msats == 0
        from dsrs import pricing
        from dsrs.worst_case import MESSAGE_OVERHEAD

        # an abandoned stream keeps its worst case (the provider may go on generating): "hi" is 2 bytes
        worst = pricing.cost_msats("openai", "gpt-4o-mini", 2 + MESSAGE_OVERHEAD, 100)  # max_tokens 100
        assert budget.spent_msats == worst
        scripted.script(chat_reply("after"))
        r = sdk(gw).chat.completions.create(model="remote", messages=[{"role": "user", "content": "x"}], max_tokens=5)
        assert r.choices[0].message.content == "after"
    finally:
        gw.close()
        up.close()


def test_config_errors_are_clear() -> None:
    from dsrs.errors import ConfigurationError
    from dsrs.gateway.config import parse

    lane = {"lm": "openai/gpt-4o-mini"}
    cases = [
        ({"lanes": {}}, "no lanes"),
        ({"lanes": {"a": lane}}, "require_keys is on but no client keys"),
        ({"lanes": {"a": lane}, "keys": {"k": {"key_env": "NOPE_UNSET"}}}, "NOPE_UNSET is empty or unset"),
        ({"lanes": {"a": {"lm": "openai/x", "budget": "zzz"}}, "gateway": {"require_keys": False}}, "budget 'zzz' is not defined"),
        ({"lanes": {"a": lane}, "models": {"m": {"lanes": ["b"]}}, "gateway": {"require_keys": False}}, "lanes must name defined lanes"),
        ({"lanes": {"a": lane}, "redis": {"on_down": "maybe"}, "gateway": {"require_keys": False}}, "on_down"),
        ({"lanes": {"a": {**lane, "colour": 1}}, "gateway": {"require_keys": False}}, "unknown setting 'colour'"),
    ]
    for doc, words in cases:
        with pytest.raises(ConfigurationError, match=words):
            parse(doc, env={})


def test_a_model_over_several_lanes_falls_back_and_counts_it(llama_server: Any, scripted: Any) -> None:
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"remote": _scripted_lane(scripted), "local": _llama_lane(llama_server),
                  "pylon-local": {"kind": "pylon", "model": "gemma", "base_url": llama_server.url + "/v1",
                                  "options": {"mode": "local", "backend": "llamacpp", "max_tokens": 4,
                                              "temperature": 0}}},
        "models": {"auto": {"lanes": ["remote", "local"], "policy": "priority"}},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        scripted.script(Reply(503, {"error": {"message": "overloaded", "type": "server_error"}}))
        r = sdk(gw).chat.completions.create(model="auto", messages=[{"role": "user", "content": FEW_SHOT}], max_tokens=4,
                                            temperature=0)  # fmt: skip
        assert "Paris" in r.choices[0].message.content and r.model == "auto"
        assert r.model_extra["dsrs"]["lane"] == "local" and r.model_extra["dsrs"]["provider"] == "llamacpp"
        assert len(scripted.requests) == 1  # tried first, failed, fell back
        _, text = get(gw.url + "/metrics", ADMIN_KEY)
        assert 'dsrs_lane_fallbacks_total{lane="remote"} 1' in text and 'dsrs_lane_calls_total{lane="local"} 1' in text
        ids = {m.id: m.model_extra["dsrs"]["lanes"] for m in sdk(gw).models.list()}
        assert ids["auto"] == ["remote", "local"]
        p = sdk(gw).chat.completions.create(model="pylon-local", messages=[{"role": "user", "content": FEW_SHOT}])
        assert p.choices[0].message.content == r.choices[0].message.content
        assert p.model_extra["dsrs"]["cost_msats"] == 0 and p.usage.completion_tokens == 4
    finally:
        gw.close()


def test_serve_command_rejects_a_bad_config_with_status_2(tmp_path: Any) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "dsrs.toml"
    cfg.write_text('[lanes.a]\nlm = "openai/gpt-4o-mini"\n')
    p = subprocess.run([sys.executable, "-m", "dsrs.gateway", "--config", str(cfg)], capture_output=True, timeout=60)
    assert p.returncode == 2 and b"require_keys is on but no client keys" in p.stderr
    p = subprocess.run([sys.executable, "-m", "dsrs.gateway", "--config", str(tmp_path / "nope.toml")],
                       capture_output=True, timeout=60)  # fmt: skip
    assert p.returncode == 2 and b"does not exist" in p.stderr


def test_an_upstream_stream_cut_after_the_first_chunk_becomes_an_error_event(gateway: InProcessGateway, scripted: Any) -> None:
    first = {"id": "c", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}
    scripted.script(Reply(sse=[first], cut=True), Reply(sse=[first], cut=True))
    seen = []
    with pytest.raises(openai.APIError) as ei:
        for chunk in sdk(gateway).chat.completions.create(model="remote", messages=[{"role": "user", "content": "x"}],
                                                          max_tokens=5, stream=True):  # fmt: skip
            seen += [c.delta.content for c in chunk.choices]
    assert "Hel" in seen and "[openai/gpt-4o-mini]" in str(ei.value)
    assert "127.0.0.1" not in str(ei.value)  # the upstream's address stays private
    with sdk(gateway).responses.stream(model="remote", input="x", max_output_tokens=5) as s:
        kinds = [ev.type for ev in s]
    assert kinds[-1] == "response.failed" and "response.output_text.delta" in kinds
    # the server is fine afterwards
    scripted.script(chat_reply("fine"))
    r = sdk(gateway).responses.create(model="remote", input="x", max_output_tokens=5)
    assert r.output_text == "fine" and r.status == "completed"


def test_the_documented_config_example_parses() -> None:
    import tomllib

    from dsrs.gateway import config

    doc = config.__doc__ or ""
    start = doc.index("```toml") + len("```toml")
    cfg = config.parse(tomllib.loads(doc[start:doc.index("```", start)]), env={"ALICE_KEY": "sk-alice-distinct-123"})
    assert sorted(cfg.lanes) == ["codex", "local", "swarm"] and cfg.lanes["swarm"].kind == "pylon"
    assert cfg.models["gpt-5.5"].lanes == ("local", "swarm") and cfg.keys["alice"].budget == "key:alice"
    assert cfg.keys["alice"].sha256 == config.key_hash("sk-alice-distinct-123")
    assert "sk-alice" not in repr(cfg) and cfg.keys["alice"].sha256 not in repr(cfg)


# -- malformed fields: a 400 naming the field, never a 500 ------------------------------------------
@pytest.fixture
def remote_gateway(scripted: Any) -> Iterator[InProcessGateway]:
    gw = InProcessGateway({"cache": {"enabled": False}, "lanes": {"remote": _scripted_lane(scripted)},
                           "keys": {"alice": {"key_env": "CLIENT_KEY"}}})  # fmt: skip
    yield gw
    gw.close()


def _post_raw(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


_USER = [{"role": "user", "content": "x"}]
_CHAT_CASES: list[tuple[dict[str, Any], str]] = [
    ({"response_format": "json_object"}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": "s"}}, "response_format.json_schema"),
    ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream": "false"}, "stream"),
    ({"tools": 5}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]}, "tools[0].function.parameters"),
    ({"tool_choice": {"type": "function", "function": "f"}}, "tool_choice.function"),
    ({"tool_choice": 5}, "tool_choice"),
    ({"messages": [{"role": "assistant", "content": "a", "tool_calls": 5}, *_USER]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "tool", "tool_call_id": 5, "content": "r"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "name": ["n"]}]}, "messages[0].name"),
]
_RESPONSES_CASES: list[tuple[dict[str, Any], str]] = [
    ({"tools": 5}, "tools"),
    ({"text": "json"}, "text"),
    ({"text": {"format": "json"}}, "text.format"),
    ({"stream": 1}, "stream"),
    ({"input": [{"type": "function_call_output", "call_id": 5, "output": "r"}]}, "input[0].call_id"),
]


def test_malformed_fields_are_400s_naming_the_field(remote_gateway: InProcessGateway, scripted: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    chat, responses = remote_gateway.url + "/v1/chat/completions", remote_gateway.url + "/v1/responses"
    cases = [(chat, {"model": "remote", "messages": _USER, **extra}, p) for extra, p in _CHAT_CASES]
    cases += [(responses, {"model": "remote", "input": "x", **extra}, p) for extra, p in _RESPONSES_CASES]
    for url, body, param in cases:
        status, text = _post_raw(url, json.dumps(body).encode())
        err = json.loads(text)["error"]
        assert (status, err["param"], err["type"]) == (400, param, "invalid_request_error"), (body, text)
        assert param.rsplit(".", 1)[-1].split("[")[0] in err["message"]
    # NaN and Infinity are not finite numbers (Python's json reads them; the range check must not pass them)
    for value in (b"NaN", b"Infinity", b"-Infinity"):
        status, text = _post_raw(chat, b'{"model": "remote", "messages": [{"role": "user", "content": "x"}], "temperature": %s}' % value)
        assert status == 400 and json.loads(text)["error"]["param"] == "temperature", text
    status, text = _post_raw(responses, b'{"model": "remote", "input": "x", "top_p": NaN}')
    assert status == 400 and json.loads(text)["error"]["param"] == "top_p"
    # JSON nested past the parser's recursion limit, and deep but parseable
    for depth in (100_000, 100):
        status, text = _post_raw(chat, b'{"model": "remote", "messages": [{"role": "user", "content": "x"}], "metadata": '
                                 + b"[" * depth + b"]" * depth + b"}")  # fmt: skip
        assert status == 400 and json.loads(text)["error"]["code"] == "invalid_json", text[:300]
    assert scripted.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no tracebacks logged
    scripted.script(chat_reply("still here"))
    r = sdk(remote_gateway).chat.completions.create(model="remote", messages=_USER)
    assert r.choices[0].message.content == "still here"


def _paths(v: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if at:
        yield at
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        yield from _paths(x, (*at, k))


def _replaced(v: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    out = dict(v) if isinstance(v, dict) else list(v)
    out[path[0]] = _replaced(v[path[0]], path[1:], new)
    return out


def test_any_field_of_the_wrong_type_is_never_a_500(remote_gateway: InProcessGateway, scripted: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Every field (at every depth) of a full request on both wires, replaced by each JSON type."""
    fn = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}
    chat = {"model": "remote", "messages": [
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "a", "tool_calls": [{"id": "c1", "type": "function",
                                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r", "name": "f"},
        {"role": "user", "content": [{"type": "text", "text": "x"}]}],
        "max_tokens": 5, "temperature": 0.5, "top_p": 1, "seed": 1, "stop": ["z"],
        "tools": [{"type": "function", "function": fn}], "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}},
        "stream": False, "stream_options": {"include_usage": True}}  # fmt: skip
    responses = {"model": "remote", "instructions": "i", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "x"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "r"}],
        "max_output_tokens": 5, "temperature": 0.5, "tools": [{"type": "function", **fn}], "tool_choice": "auto",
        "text": {"format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}}}, "stream": False}  # fmt: skip
    scripted.script(default=chat_reply("ok"))
    seen: dict[int, int] = {}
    for url, base in ((remote_gateway.url + "/v1/chat/completions", chat), (remote_gateway.url + "/v1/responses", responses)):
        for path in _paths(base):
            for new in (5, 1.5, "x", [], [[1]], {}, {"a": {}}, False, None):
                status, text = _post_raw(url, json.dumps(_replaced(base, path, new)).encode())
                seen[status] = seen.get(status, 0) + 1
                assert status in (200, 400, 404), (path, new, status, text[:300])  # 404: an unknown model name
                if status != 200:
                    assert json.loads(text)["error"]["type"] == "invalid_request_error"
    assert seen[200] > 50 and seen[400] > 50  # both kinds were exercised
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_transport_errors_name_the_lane_and_error_class_not_the_upstream_address(scripted: Any) -> None:
    dead = {"lm": "openai/gpt-4o-mini", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "UPSTREAM_KEY",
            "options": {"retries": 0}}  # fmt: skip
    gw = InProcessGateway({"cache": {"enabled": False}, "lanes": {"dead": dead, "dead2": dead},
                           "models": {"both": {"lanes": ["dead", "dead2"]}},
                           "keys": {"alice": {"key_env": "CLIENT_KEY"}}})  # fmt: skip
    try:
        client = sdk(gw)
        for model, lane in (("dead", "dead"), ("both", "dead2")):  # "both": the last lane tried is named
            with pytest.raises(openai.InternalServerError) as ei:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
            err = ei.value.body
            assert ei.value.status_code == 502 and err["code"] == "upstream_unreachable", err
            assert err["message"] == f"[openai/gpt-4o-mini] lane {lane!r}: could not reach its upstream (ClientConnectorError)"
            with pytest.raises(openai.InternalServerError) as ei:
                with client.responses.stream(model=model, input="x") as s:
                    list(s)
            assert ei.value.status_code == 502 and ei.value.body["message"] == err["message"]
        status, body = _post_raw(gw.url + "/v1/chat/completions", json.dumps(
            {"model": "dead", "messages": [{"role": "user", "content": "x"}], "stream": True}).encode())  # fmt: skip
        assert status == 502 and "127.0.0.1" not in body and ":9" not in body and "lane 'dead'" in body
    finally:
        gw.close()


# -- issue 14: every booked call accounted; slow clients; admin key; logs; models/{id}; serve --init --
def _wait_for(cond: Any, what: str, tries: int = 3000) -> None:
    """Poll `cond` (10 ms apart, up to 30 s: a bound far above need, never a timing assertion)."""
    for _ in range(tries):
        if cond():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"never happened: {what}")


def _ledger_rows(gw: InProcessGateway, lane: str) -> list[Any]:
    return [r for r in gw.runtime.ledger.rows() if r.lane == lane]


def test_an_abandoned_stream_is_in_the_ledger_metrics_and_counters_as_booked(scripted: Any) -> None:
    from dsrs import pricing
    from dsrs.worst_case import MESSAGE_OVERHEAD

    up = SlowUpstream()
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"abandoned-lane": {"lm": "openai/gpt-4o-mini", "base_url": f"http://127.0.0.1:{up.port}/v1",
                                     "api_key_env": "UPSTREAM_KEY", "options": {"retries": 0, "max_tokens": 100}}},
        "budgets": {"all": {"limit_msats": 10_000}},
        "gateway": {"budget": "all"},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        stream = sdk(gw).chat.completions.create(model="abandoned-lane", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True)  # fmt: skip
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        stream.close()  # the client walks away mid-stream
        assert up.cancelled.wait(30), "the upstream stream was not cancelled"
        budget = gw.runtime.budgets["all"]
        worst = pricing.cost_msats("openai", "gpt-4o-mini", 2 + MESSAGE_OVERHEAD, 100)
        _wait_for(lambda: budget.open_reservations == 0, "the reservation settled")
        assert budget.spent_msats == worst > 0  # by design: the provider may go on generating
        _wait_for(lambda: 'status="499"' in get(gw.url + "/metrics", ADMIN_KEY)[1], "the request was counted")
        _, text = get(gw.url + "/metrics", ADMIN_KEY)
        assert f'dsrs_lane_msats_total{{lane="abandoned-lane"}} {worst}' in text
        assert 'dsrs_lane_unsettled_total{lane="abandoned-lane",reason="abandoned"} 1' in text
        assert 'dsrs_gateway_requests_total{endpoint="/v1/chat/completions",status="499"} 1' in text
        _wait_for(lambda: _ledger_rows(gw, "abandoned-lane"), "the ledger row")
        (row,) = _ledger_rows(gw, "abandoned-lane")
        assert row.cost_msats == worst and row.cost_source == "estimate" and row.estimated
        assert row.program == "key:alice" and row.model == "gpt-4o-mini"
    finally:
        gw.close()
        up.close()


def test_an_abandoned_stream_without_budgets_has_a_row_of_unknown_cost() -> None:
    up = SlowUpstream()
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"unbudgeted-lane": {"lm": "openai/gpt-4o-mini", "base_url": f"http://127.0.0.1:{up.port}/v1",
                                      "api_key_env": "UPSTREAM_KEY", "options": {"retries": 0}}},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        with sdk(gw).chat.completions.create(model="unbudgeted-lane", messages=[{"role": "user", "content": "hi"}],
                                             stream=True) as stream:  # fmt: skip
            next(iter(stream))
        assert up.cancelled.wait(30), "the upstream stream was not cancelled"
        _wait_for(lambda: _ledger_rows(gw, "unbudgeted-lane"), "the ledger row")
        (row,) = _ledger_rows(gw, "unbudgeted-lane")
        assert row.cost_msats is None and row.estimated and row.program == "key:alice"  # unknown, not 0
        _, text = get(gw.url + "/metrics", ADMIN_KEY)
        assert 'dsrs_lane_unsettled_total{lane="unbudgeted-lane",reason="abandoned"} 1' in text
        assert 'dsrs_lane_msats_total{lane="unbudgeted-lane"}' not in text
    finally:
        gw.close()
        up.close()


def test_a_call_that_timed_out_after_sending_is_in_the_ledger_and_metrics(scripted: Any) -> None:
    from dsrs import pricing
    from dsrs.worst_case import MESSAGE_OVERHEAD

    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"stalling-lane": _scripted_lane(scripted, timeout=0.5, max_tokens=50)},
        "budgets": {"all": {"limit_msats": 10_000}},
        "gateway": {"budget": "all"},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        scripted.script(Reply(delay=60, json=chat_reply("late").json))
        with pytest.raises(openai.APIStatusError) as ei:
            sdk(gw).chat.completions.create(model="stalling-lane", messages=[{"role": "user", "content": "hey"}])
        assert ei.value.status_code == 504
        worst = pricing.cost_msats("openai", "gpt-4o-mini", 3 + MESSAGE_OVERHEAD, 50)
        assert gw.runtime.budgets["all"].spent_msats == worst  # a timeout may have been billed
        _, text = get(gw.url + "/metrics", ADMIN_KEY)
        assert f'dsrs_lane_msats_total{{lane="stalling-lane"}} {worst}' in text
        assert 'dsrs_lane_unsettled_total{lane="stalling-lane",reason="error"} 1' in text
        _wait_for(lambda: _ledger_rows(gw, "stalling-lane"), "the ledger row")
        (row,) = _ledger_rows(gw, "stalling-lane")
        assert row.cost_msats == worst and row.cost_source == "estimate"
    finally:
        gw.close()


def test_a_call_the_client_abandons_is_in_the_ledger_metrics_and_counters_as_booked(scripted: Any) -> None:
    from dsrs import pricing
    from dsrs.worst_case import MESSAGE_OVERHEAD

    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"left-lane": _scripted_lane(scripted, max_tokens=40)},
        "budgets": {"all": {"limit_msats": 10_000}},
        "gateway": {"budget": "all"},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        scripted.script(Reply(delay=120, json=chat_reply("late").json))
        impatient = openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=1.0)
        with pytest.raises(openai.APITimeoutError):  # the client gives up and closes its connection
            impatient.chat.completions.create(model="left-lane", messages=[{"role": "user", "content": "hello"}])
        budget = gw.runtime.budgets["all"]
        worst = pricing.cost_msats("openai", "gpt-4o-mini", 5 + MESSAGE_OVERHEAD, 40)
        _wait_for(lambda: budget.open_reservations == 0, "the reservation settled")
        assert budget.spent_msats == worst  # the request had gone out: it may be billed
        _wait_for(lambda: 'status="499"' in get(gw.url + "/metrics", ADMIN_KEY)[1], "the request was counted")
        _, text = get(gw.url + "/metrics", ADMIN_KEY)
        assert f'dsrs_lane_msats_total{{lane="left-lane"}} {worst}' in text
        assert 'dsrs_lane_unsettled_total{lane="left-lane",reason="abandoned"} 1' in text
        _wait_for(lambda: _ledger_rows(gw, "left-lane"), "the ledger row")
        (row,) = _ledger_rows(gw, "left-lane")
        assert row.cost_msats == worst and row.cost_source == "estimate" and row.program == "key:alice"
    finally:
        gw.close()


def test_a_timed_out_lane_before_a_fallback_answered_is_booked_on_that_lane(scripted: Any) -> None:
    from dsrs import pricing
    from dsrs.worst_case import MESSAGE_OVERHEAD

    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"first-slow": _scripted_lane(scripted, timeout=0.5, max_tokens=30),
                  "then-ok": _scripted_lane(scripted, max_tokens=30)},
        "models": {"both": {"lanes": ["first-slow", "then-ok"]}},
        "budgets": {"all": {"limit_msats": 10_000}},
        "gateway": {"budget": "all"},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        scripted.script(Reply(delay=120, json=chat_reply("late").json), chat_reply("answer", 5, 2))
        r = sdk(gw).chat.completions.create(model="both", messages=[{"role": "user", "content": "hey"}])
        assert r.choices[0].message.content == "answer" and r.model_extra["dsrs"]["lane"] == "then-ok"
        worst = pricing.cost_msats("openai", "gpt-4o-mini", 3 + MESSAGE_OVERHEAD, 30)
        answer = r.model_extra["dsrs"]["cost_msats"]
        assert gw.runtime.budgets["all"].spent_msats == worst + answer
        _, text = get(gw.url + "/metrics", ADMIN_KEY)
        assert f'dsrs_lane_msats_total{{lane="first-slow"}} {worst}' in text
        assert 'dsrs_lane_unsettled_total{lane="first-slow",reason="error"} 1' in text
        _wait_for(lambda: _ledger_rows(gw, "first-slow") and _ledger_rows(gw, "then-ok"), "both ledger rows")
        assert [r.cost_msats for r in _ledger_rows(gw, "first-slow")] == [worst]
        assert [r.cost_msats for r in _ledger_rows(gw, "then-ok")] == [answer]
    finally:
        gw.close()


def test_metrics_need_the_admin_key_and_health_is_minimal_without_it(remote_gateway: InProcessGateway) -> None:
    url = remote_gateway.url
    for key in (None, CLIENT_KEY, "sk-wrong"):
        status, body = get(url + "/metrics", key)
        assert status == 401 and body["error"]["code"] == "admin_key_required"
    status, text = get(url + "/metrics", ADMIN_KEY)
    assert status == 200 and "# TYPE" in text or text == "\n"
    assert get(url + "/health") == (200, {"status": "ok"})
    assert get(url + "/health", CLIENT_KEY) == (200, {"status": "ok"})
    status, full = get(url + "/health", ADMIN_KEY)
    assert status == 200 and full["budget_mode"] == "local" and full["models"] == ["remote"]


def test_public_metrics_and_admin_key_settings() -> None:
    from dsrs.errors import ConfigurationError
    from dsrs.gateway.config import key_hash, parse

    lane = {"lanes": {"a": {"lm": "openai/gpt-4o-mini"}}, "keys": {"k": {"key_env": "K"}}}
    assert parse({**lane, "gateway": {"public_metrics": True}}, env={"K": "sk-k-1"}).public_metrics
    cfg = parse(lane, env={"K": "sk-k-1", "DSRS_ADMIN_KEY": "sk-admin-1"})
    assert cfg.admin_sha256 == key_hash("sk-admin-1") and "sk-admin-1" not in repr(cfg) and cfg.admin_sha256 not in repr(cfg)
    assert parse(lane, env={"K": "sk-k-1"}).admin_sha256 is None  # no admin key: /metrics is closed to all
    with pytest.raises(ConfigurationError, match="ADMIN_X .*empty or unset"):
        parse({**lane, "gateway": {"admin_key_env": "ADMIN_X"}}, env={"K": "sk-k-1"})
    with pytest.raises(ConfigurationError, match="admin key is also a client key"):
        parse(lane, env={"K": "sk-same", "DSRS_ADMIN_KEY": "sk-same"})


def test_require_keys_false_with_keys_defined_is_refused() -> None:
    from dsrs.errors import ConfigurationError
    from dsrs.gateway.config import parse

    doc = {"lanes": {"a": {"lm": "openai/gpt-4o-mini"}}, "keys": {"k": {"key_env": "K"}}, "gateway": {"require_keys": False}}
    with pytest.raises(ConfigurationError, match="bypass the keys' budgets, rate limits and model lists") as ei:
        parse(doc, env={"K": "sk-k-1"})
    assert "require_keys = true" in (ei.value.hint or "")


def _recv_all(s: socket.socket) -> bytes:
    """Everything until the server closes (a 60 s socket timeout fails the test instead of hanging)."""
    s.settimeout(60)
    got = b""
    while True:
        part = s.recv(65536)
        if not part:
            return got
        got += part


def test_stalled_connections_are_closed(scripted: Any) -> None:
    gw = InProcessGateway({
        "cache": {"enabled": False}, "lanes": {"remote": _scripted_lane(scripted)},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
        "gateway": {"header_timeout_s": 0.5, "body_timeout_s": 0.5},
    })  # fmt: skip
    socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(3)]
    try:
        silent, half_headers, half_body = socks
        half_headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bear")
        half_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"mo")  # fmt: skip
        assert _recv_all(silent) == b""  # closed: headers never came
        assert _recv_all(half_headers) == b""
        answer = _recv_all(half_body)
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        assert scripted.requests == []
        scripted.script(chat_reply("ok"))  # the server is fine
        r = sdk(gw).chat.completions.create(model="remote", messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content == "ok"
    finally:
        for s in socks:
            s.close()
        gw.close()


def test_one_client_address_holds_a_capped_number_of_connections(scripted: Any) -> None:
    gw = InProcessGateway({
        "cache": {"enabled": False}, "lanes": {"remote": _scripted_lane(scripted)},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
        "gateway": {"max_connections_per_client": 2, "header_timeout_s": 600},
    })  # fmt: skip
    held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", gw.port)) as third:  # accepted after the two: over the cap
            busy = _recv_all(third)
        assert busy.startswith(b"HTTP/1.1 503") and b"too_many_connections" in busy
        held.pop().close()  # a slot frees when a connection closes
        scripted.script(default=chat_reply("ok"))

        def answered() -> bool:
            try:
                return sdk(gw).chat.completions.create(model="remote", messages=[{"role": "user", "content": "x"}]) is not None
            except openai.InternalServerError:  # 503 while the server has not yet seen the close
                return False

        _wait_for(answered, "a call once a connection closed")
    finally:
        for s in held:
            s.close()
        gw.close()


def test_a_lone_surrogate_is_a_400_and_logs_no_error(remote_gateway: InProcessGateway, scripted: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    for body in (b'{"model": "remote", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
                 b'{"model": "remote", "input": [{"role": "user", "content": "\\udfff"}]}',
                 b'{"model": "remote", "messages": [{"role": "user", "content": "x", "\\ud83d": 1}]}'):  # fmt: skip
        path = "/v1/responses" if b'"input"' in body else "/v1/chat/completions"
        status, text = _post_raw(remote_gateway.url + path, body)
        assert status == 400 and json.loads(text)["error"]["code"] == "invalid_json", text
    assert scripted.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    scripted.script(chat_reply("pair ok"))  # a proper surrogate pair is an emoji, and fine
    status, text = _post_raw(remote_gateway.url + "/v1/chat/completions",
                             b'{"model": "remote", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}')  # fmt: skip
    assert status == 200 and scripted.requests[0].json["messages"][0]["content"] == "\U0001f600"


def test_malformed_requests_are_logged_in_bounded_warnings(remote_gateway: InProcessGateway,
                                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    from dsrs.gateway.logs import LIMIT

    caplog.set_level(logging.DEBUG)
    for raw in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"z" * 131072 + b"\r\n",
                b"GET /" + b"\x01" * 100_000 + b" HTTP/1.1\r\n\r\n"):  # fmt: skip
        with socket.create_connection(("127.0.0.1", remote_gateway.port)) as s:
            s.sendall(raw)
            assert _recv_all(s).startswith(b"HTTP/1.0 400")
    server = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert server, "aiohttp logged nothing about the malformed requests"
    for r in server:
        text = caplog.handler.format(r)
        assert len(text) < 2 * LIMIT + 500 and r.levelno <= logging.WARNING, (r.levelname, len(text))
    assert get(remote_gateway.url + "/health") == (200, {"status": "ok"})


def test_access_log_line_per_request_without_keys_or_prompts(remote_gateway: InProcessGateway, scripted: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="dsrs.gateway.access")
    scripted.script(chat_reply("the secret answer"))
    sdk(remote_gateway).chat.completions.create(model="remote", messages=[{"role": "user", "content": "my private prompt"}])
    with pytest.raises(openai.NotFoundError):
        sdk(remote_gateway).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    lines = [r.getMessage() for r in caplog.records if r.name == "dsrs.gateway.access"]
    ok = [ln for ln in lines if ln.startswith("POST /v1/chat/completions 200")]
    assert len(ok) == 1 and "model=remote lane=remote key=alice" in ok[0] and "tokens=" in ok[0] and "latency_ms=" in ok[0]
    assert "msats=" in ok[0] and "tokens=-" not in ok[0]
    assert any(ln.startswith("POST /v1/chat/completions 404") and "model=nope" in ln for ln in lines)
    for ln in lines:
        assert CLIENT_KEY not in ln and "private prompt" not in ln and "secret answer" not in ln


def test_get_one_model_by_id(gateway: InProcessGateway) -> None:
    m = sdk(gateway).models.retrieve("gpt-5.5")
    assert m.id == "gpt-5.5" and m.object == "model" and m.model_extra["dsrs"]["lanes"] == ["local"]
    with pytest.raises(openai.NotFoundError):
        sdk(gateway).models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):  # bob may only use "remote"
        sdk(gateway, OTHER_KEY).models.retrieve("gpt-5.5")
    assert sdk(gateway, OTHER_KEY).models.retrieve("remote").id == "remote"
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, "sk-wrong").models.retrieve("remote")


def test_serve_init_writes_a_sample_that_serves_on_the_printed_port(tmp_path: Any) -> None:
    import os
    import signal
    import subprocess
    import sys

    path = tmp_path / "dsrs.toml"
    gw = [sys.executable, "-m", "dsrs.gateway"]
    p = subprocess.run([*gw, "--init", str(path)], capture_output=True, timeout=60)
    assert p.returncode == 0 and path.exists() and b"dsrs serve --config" in p.stdout
    p = subprocess.run([*gw, "--init", str(path)], capture_output=True, timeout=60)
    assert p.returncode == 2 and b"already exists" in p.stderr  # never overwritten
    p = subprocess.run(gw, capture_output=True, timeout=60)
    assert p.returncode == 2 and b"--init" in p.stderr
    p = subprocess.run([*gw, "--config", str(tmp_path / "missing.toml")], capture_output=True, timeout=60)
    assert p.returncode == 2 and b"dsrs serve --init" in p.stderr
    env = {**os.environ, "DSRS_CLIENT_KEY": "sk-sample-client-1", "OPENAI_API_KEY": "sk-not-used"}
    proc = subprocess.Popen([*gw, "--config", str(path), "--port", "0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        line = proc.stdout.readline().decode()  # type: ignore[union-attr]
        assert line.startswith("dsrs gateway on http://127.0.0.1:"), line
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        assert port > 0
        assert get(f"http://127.0.0.1:{port}/health") == (200, {"status": "ok"})
        ids = [m.id for m in openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-sample-client-1").models.list()]
        assert ids == ["local", "openai", "default"]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
