"""Fuzzing every protocol's decoder, answered whole and streamed, through the real `LM`.

Answers are JSON shapes close to each provider's documented ones, with any node swapped for a
wrong type (null, a string where a number goes, a huge or negative number, a list, NaN) or left
out; streams also get junk items (`data: 0`), CR/CRLF/LF line ends, bytes that are not UTF-8,
over-long lines and arbitrary chunk boundaries. Whole answers replace `dsrs.http.post_json`,
streams `dsrs.http._chunks` (so the real SSE/NDJSON splitter runs); one test of each kind goes
through the real aiohttp client against tests/scripted.py.

The promise checked: only `dsrs.errors.DsrsError` escapes, and a completion that comes back has
its fields' types (text str; tool calls with str id/name and dict arguments; token counts and
cost non-negative ints, cost possibly None).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsrs import LM, StreamEnd, errors, http
from dsrs.types import Completion, ToolCall
from scripted import Reply, ScriptedServer

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
          "cache_write_tokens")  # fmt: skip


# -- shapes -------------------------------------------------------------------------------------------
class Choice:
    """One of several templates."""

    def __init__(self, *options: Any) -> None:
        self.options = options


class Opt:
    """A key present only now and then (e.g. Gemini's promptFeedback, which blocks the answer)."""

    def __init__(self, template: Any) -> None:
        self.template = template


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([-1, 2**53, 2**64, 10**30]),
    st.floats(), st.sampled_from(["lots", "12", "", "\x00", "é" * 3]), st.just([]), st.just({}),
    st.lists(st.integers(-3, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
N = st.integers(0, 100_000)
P = st.integers(600, 100_000)  # prompt tokens, of which the cached or written ones (C) are a part
C = st.integers(0, 500)
TEXT = st.integers(0, 19).flatmap(lambda i: st.just("L" * 3000) if i == 0 else st.text(max_size=12))  # the long one
# crosses the event cap the stream tests lower to 2048 bytes
NAME = st.sampled_from(["get_weather", "search", "", "x" * 40])
ID = st.sampled_from(["call_1", "call_2", "id-9", ""])
ARGS = st.one_of(st.dictionaries(st.sampled_from(["city", "q", "n"]), st.one_of(st.text(max_size=5), N), max_size=3)
                 .map(json.dumps), st.sampled_from(["{", "[]", "null", "5", '{"a": '])).filter(lambda _: True)  # fmt: skip
DICT = st.dictionaries(st.sampled_from(["city", "q"]), st.one_of(st.text(max_size=5), N), max_size=2)
SMALL = st.integers(0, 2)


@st.composite
def shaped(draw: Any, template: Any) -> Any:
    rate = draw(st.sampled_from([0, 0, 1, 2, 4]))  # out of 24: some answers are clean, most are not
    return _fill(draw, template, rate)


def _fill(draw: Any, t: Any, rate: int) -> Any:
    if rate and draw(st.integers(0, 23)) < rate:
        return draw(JUNK)
    if isinstance(t, Choice):
        return _fill(draw, draw(st.sampled_from(t.options)), rate)
    if isinstance(t, dict):
        out = {}
        for k, v in t.items():
            if isinstance(v, Opt):
                if draw(st.integers(0, 9)) == 0:
                    out[k] = _fill(draw, v.template, rate)
                continue
            if rate and draw(st.integers(0, 23)) < rate:
                continue  # a key left out
            out[k] = _fill(draw, v, rate)
        return out
    if isinstance(t, list):
        return [_fill(draw, t[0], rate) for _ in range(draw(st.integers(0, 3)))]
    if isinstance(t, st.SearchStrategy):
        return draw(t)
    return t


# the documented shapes (the API references of each provider), one template per answer or stream item
OAI_USAGE = {"prompt_tokens": P, "completion_tokens": N, "total_tokens": N,
             "prompt_tokens_details": {"cached_tokens": C}, "completion_tokens_details": {"reasoning_tokens": N}}  # fmt: skip
OAI_FINISH = st.sampled_from(["stop", "length", "tool_calls", "content_filter", None])
OAI = {"id": ID, "object": "chat.completion", "model": NAME, "usage": OAI_USAGE,
       "choices": [{"index": 0, "finish_reason": OAI_FINISH, "message": {
           "role": "assistant", "content": Choice(TEXT, None, [{"type": "text", "text": TEXT}]),
           "tool_calls": [{"id": ID, "type": "function", "function": {"name": NAME, "arguments": ARGS}}]}}]}  # fmt: skip
OAI_CHUNK = {"id": ID, "model": NAME, "usage": Choice(None, OAI_USAGE),
             "choices": [{"index": 0, "finish_reason": OAI_FINISH, "delta": {
                 "content": Choice(TEXT, None),
                 "tool_calls": [{"index": SMALL, "id": ID, "function": {"name": NAME, "arguments": TEXT}}]}}]}  # fmt: skip

RESP_USAGE = {"input_tokens": P, "output_tokens": N, "total_tokens": N, "input_tokens_details": {"cached_tokens": C},
              "output_tokens_details": {"reasoning_tokens": N}}  # fmt: skip
RESP_ITEM = Choice(
    {"type": "message", "role": "assistant", "content": [Choice({"type": "output_text", "text": TEXT},
                                                               {"type": "refusal", "refusal": TEXT})]},
    {"type": "function_call", "call_id": ID, "name": NAME, "arguments": ARGS},
    {"type": "reasoning", "id": ID, "summary": st.just([]), "encrypted_content": TEXT},
)  # fmt: skip
RESP = {"id": ID, "object": "response", "model": NAME, "output": [RESP_ITEM], "usage": RESP_USAGE,
        "status": st.sampled_from(["completed", "incomplete", "failed"]),
        "incomplete_details": Opt({"reason": st.sampled_from(["max_output_tokens", "content_filter"])}),
        "error": Opt({"code": "server_error", "message": TEXT})}  # fmt: skip
RESP_EVENT = Choice(
    {"type": "response.output_text.delta", "delta": TEXT},
    {"type": "response.output_item.done", "item": RESP_ITEM},
    {"type": "response.completed", "response": RESP},
    {"type": "response.incomplete", "response": RESP},
    {"type": "response.failed", "response": RESP},
    {"type": "error", "code": "server_error", "message": TEXT},
)

ANT_USAGE = {"input_tokens": N, "output_tokens": N, "cache_read_input_tokens": N, "cache_creation_input_tokens": N}
ANT_BLOCK = Choice({"type": "text", "text": TEXT}, {"type": "tool_use", "id": ID, "name": NAME, "input": DICT},
                   {"type": "thinking", "thinking": TEXT, "signature": TEXT}, {"type": "redacted_thinking", "data": TEXT})  # fmt: skip
ANT_STOP = st.sampled_from(["end_turn", "max_tokens", "tool_use", "stop_sequence", "refusal", None])
ANT = {"id": ID, "type": "message", "role": "assistant", "model": NAME, "content": [ANT_BLOCK],
       "stop_reason": ANT_STOP, "usage": ANT_USAGE}  # fmt: skip
ANT_EVENT = Choice(
    {"type": "message_start", "message": {"id": ID, "type": "message", "model": NAME, "content": st.just([]), "usage": ANT_USAGE}},
    {"type": "content_block_start", "index": SMALL, "content_block": ANT_BLOCK},
    {"type": "content_block_delta", "index": SMALL, "delta": Choice(
        {"type": "text_delta", "text": TEXT}, {"type": "input_json_delta", "partial_json": TEXT},
        {"type": "thinking_delta", "thinking": TEXT}, {"type": "signature_delta", "signature": TEXT})},
    {"type": "content_block_stop", "index": SMALL},
    {"type": "message_delta", "delta": {"stop_reason": ANT_STOP}, "usage": {"output_tokens": N}},
    {"type": "message_stop"},
    {"type": "error", "error": {"type": "overloaded_error", "message": TEXT}},
)  # fmt: skip

GEM_PART = Choice({"text": TEXT}, {"text": TEXT, "thought": True}, {"text": TEXT, "thoughtSignature": TEXT},
                  {"functionCall": {"name": NAME, "args": DICT, "id": Opt(ID)}, "thoughtSignature": Opt(TEXT)})  # fmt: skip
GEM = {"candidates": [{"content": {"role": "model", "parts": [GEM_PART]},
                       "finishReason": st.sampled_from(["STOP", "MAX_TOKENS", "SAFETY", "OTHER"])}],
       "usageMetadata": {"promptTokenCount": P, "candidatesTokenCount": N, "totalTokenCount": N,
                         "thoughtsTokenCount": N, "cachedContentTokenCount": C},
       "modelVersion": NAME, "responseId": ID, "promptFeedback": Opt({"blockReason": "SAFETY"})}  # fmt: skip

OLL = {"model": NAME, "created_at": "2025-01-01T00:00:00Z", "done": st.booleans(),
       "message": {"role": "assistant", "content": TEXT, "tool_calls": [{"function": {"name": NAME, "arguments": DICT}}]},
       "done_reason": st.sampled_from(["stop", "length"]), "prompt_eval_count": N, "eval_count": N}  # fmt: skip

CO_USAGE = {"billed_units": {"input_tokens": P, "output_tokens": N}, "tokens": {"input_tokens": P, "output_tokens": N},
            "cached_tokens": C}  # fmt: skip
CO_FINISH = st.sampled_from(["COMPLETE", "MAX_TOKENS", "TOOL_CALL", "STOP_SEQUENCE", "ERROR"])
CO = {"id": ID, "finish_reason": CO_FINISH, "usage": CO_USAGE,
      "message": {"role": "assistant", "content": Choice([{"type": "text", "text": TEXT}], TEXT),
                  "tool_calls": [{"id": ID, "type": "function", "function": {"name": NAME, "arguments": ARGS}}]}}  # fmt: skip
CO_EVENT = Choice(
    {"type": "message-start", "id": ID},
    {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": TEXT}}}},
    {"type": "tool-call-start", "index": SMALL, "delta": {"message": {"tool_calls": {
        "id": ID, "type": "function", "function": {"name": NAME, "arguments": TEXT}}}}},
    {"type": "tool-call-delta", "index": SMALL, "delta": {"message": {"tool_calls": {"function": {"arguments": TEXT}}}}},
    {"type": "message-end", "delta": {"finish_reason": CO_FINISH, "usage": CO_USAGE}},
)  # fmt: skip

# model -> (whole answer, stream item, the item that usually ends a stream, stream format)
PROTOCOLS: dict[str, tuple[Any, Any, Any, str]] = {
    "openai/gpt-4o-mini": (OAI, OAI_CHUNK, "[DONE]", "sse"),
    "groq/llama-3.1-8b-instant": (OAI, OAI_CHUNK, "[DONE]", "sse"),  # a compatible service
    "openai-responses/gpt-4o-mini": (RESP, RESP_EVENT, {"type": "response.completed", "response": RESP}, "sse"),
    "anthropic/claude-3-5-haiku-latest": (ANT, ANT_EVENT, {"type": "message_stop"}, "sse"),
    "gemini/gemini-2.0-flash": (GEM, GEM, GEM, "sse"),
    "ollama/llama3.2": (OLL, OLL, {**OLL, "done": True}, "ndjson"),
    "cohere/command-r": (CO, CO_EVENT, {"type": "message-end", "delta": {"finish_reason": CO_FINISH,
                                                                        "usage": CO_USAGE}}, "sse"),
}  # fmt: skip
RAW_ITEMS = st.sampled_from(["0", "null", "[]", '"x"', "{", "[DONE]", "true", '{"error": 5}', '{"type": 7}', "1e999"])


@st.composite
def stream_bytes(draw: Any, model: str) -> list[bytes]:
    """A whole stream as the chunks it arrives in."""
    _, item, end, fmt = PROTOCOLS[model]
    rate = draw(st.sampled_from([0, 0, 0, 1, 2, 4]))  # one rate for the whole stream: some are clean
    items: list[Any] = [_fill(draw, item, rate) for _ in range(draw(st.integers(0, 6)))]
    if draw(st.integers(0, 2)) == 0:  # a junk item (`data: 0`, `data: {`...) somewhere
        items.insert(draw(st.integers(0, len(items))), draw(RAW_ITEMS))
    if draw(st.integers(0, 3)):
        items.append(end if isinstance(end, str) else _fill(draw, end, rate))
    out = []
    for it in items:
        data = it if isinstance(it, str) else json.dumps(it)
        if fmt == "ndjson":
            out.append(data + draw(st.sampled_from(["\n", "\r\n"])))
            continue
        le = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        name = it.get("type") if isinstance(it, dict) and isinstance(it.get("type"), str) else None
        out.append((f"event: {name}{le}" if name else "") + f"data: {data}{le}{le}")
    raw = "".join(out).encode()
    if draw(st.integers(0, 5)) == 0:  # a byte that is not UTF-8, anywhere
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80"])) + raw[at:]
    cuts = sorted({min(c, len(raw)) for c in draw(st.lists(st.integers(0, 4000), max_size=6))} | {0, len(raw)})
    return [raw[a:b] for a, b in zip(cuts, cuts[1:])]


# -- the checks -----------------------------------------------------------------------------------------
def check_completion(c: Any) -> None:
    assert isinstance(c, Completion), type(c)
    assert type(c.text) is str
    assert isinstance(c.tool_calls, tuple)
    for t in c.tool_calls:
        assert isinstance(t, ToolCall) and type(t.id) is str and type(t.name) is str and type(t.arguments) is dict
    for f in COUNTS:
        v = getattr(c.usage, f)
        assert type(v) is int and v >= 0, (f, v)
    cost = c.usage.cost_msats
    assert cost is None or (type(cost) is int and cost >= 0), cost
    assert type(c.finish_reason) is str and type(c.model) is str


def lm(model: str, base_url: str = "http://127.0.0.1:9") -> LM:
    return LM(model, api_key="sk-fuzz-secret", base_url=base_url + ("" if "ollama" in model else "/v1"), retries=0)


async def _whole(model: str, base_url: str = "http://127.0.0.1:9") -> None:
    try:
        c = await lm(model, base_url).acall("hi")
    except errors.DsrsError as e:
        assert "sk-fuzz-secret" not in str(e)
        return
    check_completion(c)


async def _streamed(model: str, base_url: str = "http://127.0.0.1:9") -> None:
    items: list[Any] = []
    try:
        async for x in lm(model, base_url).astream("hi"):
            items.append(x)
    except errors.DsrsError as e:
        assert "sk-fuzz-secret" not in str(e)
        assert all(type(x) is str for x in items)
        return
    assert items and isinstance(items[-1], StreamEnd)
    assert all(type(x) is str for x in items[:-1])
    check_completion(items[-1].completion)


def fuzz_whole(model: str, payload: Any) -> None:
    async def post_json(ep: Any, body: Any) -> Any:
        return payload

    with mock.patch.object(http, "post_json", post_json):
        asyncio.run(_whole(model))


def fuzz_stream(model: str, chunks: list[bytes]) -> None:
    async def feed(ep: Any, body: Any) -> Any:
        for c in chunks:
            if c:
                yield c

    with mock.patch.object(http, "_chunks", feed), mock.patch.object(http, "MAX_EVENT_BYTES", 2048):
        asyncio.run(_streamed(model))


def _whole_test(model: str) -> Any:
    @FUZZ
    @given(shaped(PROTOCOLS[model][0]))
    def test(payload: Any) -> None:
        fuzz_whole(model, payload)

    return test


def _stream_test(model: str) -> Any:
    @FUZZ
    @given(stream_bytes(model))
    def test(chunks: list[bytes]) -> None:
        fuzz_stream(model, chunks)

    return test


test_openai_chat_whole = _whole_test("openai/gpt-4o-mini")
test_openai_chat_stream = _stream_test("openai/gpt-4o-mini")
test_compatible_service_whole = _whole_test("groq/llama-3.1-8b-instant")
test_compatible_service_stream = _stream_test("groq/llama-3.1-8b-instant")
test_responses_whole = _whole_test("openai-responses/gpt-4o-mini")
test_responses_stream = _stream_test("openai-responses/gpt-4o-mini")
test_anthropic_whole = _whole_test("anthropic/claude-3-5-haiku-latest")
test_anthropic_stream = _stream_test("anthropic/claude-3-5-haiku-latest")
test_gemini_whole = _whole_test("gemini/gemini-2.0-flash")
test_gemini_stream = _stream_test("gemini/gemini-2.0-flash")
test_ollama_whole = _whole_test("ollama/llama3.2")
test_ollama_stream = _stream_test("ollama/llama3.2")
test_cohere_whole = _whole_test("cohere/command-r")
test_cohere_stream = _stream_test("cohere/command-r")


# -- specific answers that once came back with the wrong types ---------------------------------------
def _raises_format_error(model: str, payload: Any) -> None:
    async def post_json(ep: Any, body: Any) -> Any:
        return payload

    async def go() -> None:
        try:
            await lm(model).acall("hi")
        except errors.ResponseFormatError:
            return
        raise AssertionError(f"no ResponseFormatError for {payload!r}")

    with mock.patch.object(http, "post_json", post_json):
        asyncio.run(go())


def test_wrong_types_that_decoded_quietly_are_response_format_errors() -> None:
    msg = {"role": "assistant", "content": "ok"}
    ok_usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    for bad in ({"content": 5}, {"content": "ok", "tool_calls": [{"id": 3, "function": {"name": "f"}}]}):
        _raises_format_error("openai/gpt-4o-mini", {"choices": [{"message": bad}], "usage": ok_usage})
    for usage in ({"prompt_tokens": "lots", "completion_tokens": 2}, {"prompt_tokens": -5, "completion_tokens": 2},
                  {"prompt_tokens": 1e300, "completion_tokens": 2}, {"prompt_tokens": math.nan, "completion_tokens": 1},
                  {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 9}}):  # fmt: skip
        _raises_format_error("openai/gpt-4o-mini", {"choices": [{"message": msg}], "usage": usage})
    _raises_format_error("anthropic/claude-3-5-haiku-latest",
                         {"content": [{"type": "text", "text": "ok"}], "usage": {"input_tokens": 3, "output_tokens": -1}})
    _raises_format_error("ollama/llama3.2", {"message": {"content": ["x"]}, "done": True, "eval_count": 1})
    _raises_format_error("gemini/gemini-2.0-flash",
                         {"candidates": [{"content": {"parts": [{"text": 7}]}, "finishReason": "STOP"}]})
    _raises_format_error("cohere/command-r", {"message": {"content": "ok"}, "id": 5, "finish_reason": "COMPLETE"})


def test_an_integral_float_count_is_taken_as_an_int() -> None:
    async def post_json(ep: Any, body: Any) -> Any:
        return {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5.0, "completion_tokens": 2, "total_tokens": 7}}  # fmt: skip

    with mock.patch.object(http, "post_json", post_json):
        c = asyncio.run(lm("openai/gpt-4o-mini").acall("hi"))
    assert c.usage.prompt_tokens == 5 and type(c.usage.prompt_tokens) is int


def test_a_non_string_text_delta_is_a_response_format_error_before_it_reaches_the_caller() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": 5}}]}
    fuzz_stream("openai/gpt-4o-mini", [f"data: {json.dumps(chunk)}\n\n".encode()])  # checks only typed errors escape

    async def feed(ep: Any, body: Any) -> Any:
        yield f"data: {json.dumps(chunk)}\n\n".encode()

    async def go() -> list[Any]:
        return [x async for x in lm("openai/gpt-4o-mini").astream("hi")]

    with mock.patch.object(http, "_chunks", feed):
        try:
            asyncio.run(go())
        except errors.ResponseFormatError as e:
            assert "text delta" in str(e)
        else:
            raise AssertionError("a non-string delta was yielded")


# -- through the real client and server -------------------------------------------------------------------
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(st.sampled_from(list(PROTOCOLS)), st.data())
def test_fuzzed_answers_through_the_real_server(scripted_server: ScriptedServer, model: str, data: Any) -> None:
    whole = data.draw(shaped(PROTOCOLS[model][0]))
    chunks = data.draw(stream_bytes(model))
    ctype = "application/x-ndjson" if PROTOCOLS[model][3] == "ndjson" else "text/event-stream"
    scripted_server.script(Reply(body=json.dumps(whole).encode(), headers={"Content-Type": "application/json"}),
                           Reply(body=b"".join(chunks), headers={"Content-Type": ctype}))  # fmt: skip
    asyncio.run(_whole(model, scripted_server.url))
    with mock.patch.object(http, "MAX_EVENT_BYTES", 2048):
        asyncio.run(_streamed(model, scripted_server.url))
