"""One conformance suite for every wire protocol: the same cases run against each provider.

Each `Wire` row holds what the provider's public API reference documents: the request we must
send (path, auth headers, exact JSON body) and the bodies the provider answers with (text,
stream, tool calls, errors). The scripted server plays the provider; the tests assert both what
we send and what we parse. A new protocol is a new row here plus its module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from dsrs import LM, Message, StreamEnd, Tool, errors
from scripted import Reply

KEY = "sk-test-0123456789"
SYSTEM, QUESTION = "Be brief.", "Capital of France?"
WEATHER = Tool("get_weather", "Current weather for a city",
               {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})  # fmt: skip
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}  # fmt: skip
RESULT = '{"temp_c": 18}'
ARGS_JSON = json.dumps({"city": "Paris"})  # how we serialise arguments we send back


@dataclass
class Wire:
    id: str
    spec: str  # the LM model string
    base: str  # base URL suffix after the scripted server's address
    path: str
    stream_path: str
    headers: dict[str, str]  # auth and version headers we must send
    absent: tuple[str, ...]  # headers we must not send
    key_envs: tuple[str, ...]
    text_body: dict[str, Any]  # the exact body of the standard request
    stream_extra: dict[str, Any]  # keys that differ when streaming
    text: Reply
    stream: Reply
    usage: tuple[int, int, int, int, int]  # prompt, completion, total, cached, reasoning
    tool_reply: Reply
    tool_stream: Reply
    tool_id: str
    tools_key: str  # where the tool definitions go: "tools"
    tools_value: Any
    roundtrip: tuple[str, Any]  # (body key, expected value) of the request carrying the tool result
    final: Reply  # the answer after the tool result
    schema_part: tuple[str, Any]  # (body key, expected value) for the JSON-schema request
    errors: list[tuple[Reply, type[errors.DsrsError], str | None]] = field(default_factory=list)
    stream_error: tuple[Reply, type[errors.DsrsError]] | None = None
    cut: Reply | None = None  # a stream that stops after the first delta


def _err(status: int, body: Any, **headers: str) -> Reply:
    return Reply(status, json=body, headers=headers)


# ---------------------------------------------------------------------------------------------
# OpenAI Chat Completions (openai_chat)
_OA_TOOL_DEF = [{"type": "function", "function": {"name": "get_weather", "description": WEATHER.description,
                                                  "parameters": WEATHER.parameters}}]  # fmt: skip


def _oa_chunk(delta: dict[str, Any], finish: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **kw}  # fmt: skip


_OA_USAGE = {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
             "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}  # fmt: skip
OPENAI = Wire(
    id="openai_chat",
    spec="openai/gpt-4o-mini",
    base="/v1",
    path="/v1/chat/completions",
    stream_path="/v1/chat/completions",
    headers={"authorization": f"Bearer {KEY}"},
    absent=("x-api-key",),
    key_envs=("OPENAI_API_KEY",),
    text_body={"model": "gpt-4o-mini", "messages": [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": QUESTION}], "max_completion_tokens": 16, "temperature": 0.5},  # fmt: skip
    stream_extra={"stream": True, "stream_options": {"include_usage": True}},
    text=Reply(json={"id": "chatcmpl-9", "object": "chat.completion", "model": "gpt-4o-mini",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"},
                                  "finish_reason": "stop"}], "usage": _OA_USAGE}),  # fmt: skip
    stream=Reply(sse=[_oa_chunk({"role": "assistant", "content": ""}), _oa_chunk({"content": "Pa"}),
                      _oa_chunk({"content": "ris"}), _oa_chunk({}, "stop"),
                      {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [],
                       "usage": _OA_USAGE}, "[DONE]"]),  # fmt: skip
    usage=(20, 9, 29, 4, 2),
    tool_reply=Reply(json={"id": "chatcmpl-8", "object": "chat.completion", "model": "gpt-4o-mini",
                           "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                               "role": "assistant", "content": None, "tool_calls": [
                                   {"id": "call_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}}],
                           "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}}),  # fmt: skip
    tool_stream=Reply(sse=[
        _oa_chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        _oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
        _oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
        _oa_chunk({}, "tool_calls"), "[DONE]"]),  # fmt: skip
    tool_id="call_1",
    tools_key="tools",
    tools_value=_OA_TOOL_DEF,
    roundtrip=("messages", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS_JSON}}]},
        {"role": "tool", "content": RESULT, "tool_call_id": "call_1"}]),  # fmt: skip
    final=Reply(json={"id": "chatcmpl-7", "object": "chat.completion", "model": "gpt-4o-mini",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "18 C in Paris"},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46}}),  # fmt: skip
    schema_part=("response_format", {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA,
                                                                            "strict": True}}),  # fmt: skip
    errors=[
        (_err(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                              "param": None, "code": "invalid_api_key"}}), errors.AuthenticationError, None),  # fmt: skip
        (_err(429, {"error": {"message": "Rate limit reached", "type": "requests", "param": None,
                              "code": "rate_limit_exceeded"}}, **{"retry-after": "7"}), errors.RateLimitError, None),  # fmt: skip
        (_err(429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                              "param": None, "code": "insufficient_quota"}}), errors.QuotaExceededError, None),  # fmt: skip
        (_err(400, {"error": {"message": "maximum context length is 128000 tokens", "type": "invalid_request_error",
                              "param": "messages", "code": "context_length_exceeded"}}),
         errors.ContextWindowExceededError, None),  # fmt: skip
        (_err(404, {"error": {"message": "The model does not exist", "type": "invalid_request_error",
                              "param": None, "code": "model_not_found"}}), errors.NotFoundError, None),  # fmt: skip
        (_err(503, {"error": {"message": "The engine is currently overloaded", "type": "server_error",
                              "param": None, "code": None}}), errors.ProviderUnavailableError, None),  # fmt: skip
    ],
    stream_error=(Reply(sse=[_oa_chunk({"content": "Pa"}),
                             {"error": {"message": "server had an error", "type": "server_error", "code": None}}]),
                  errors.ProviderUnavailableError),  # fmt: skip
    cut=Reply(sse=[_oa_chunk({"content": "Pa"})], cut=True),
)

# ---------------------------------------------------------------------------------------------
# OpenAI Responses API (responses): `codex-...` bare names route here
_RESP_USAGE = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 9,
               "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 29}  # fmt: skip


def _response(output: list[dict[str, Any]], usage: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1741476542, "status": status, "error": None,
            "incomplete_details": None, "model": "codex-mini-latest", "output": output, "usage": usage}  # fmt: skip


_MSG_ITEM = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "Paris", "annotations": []}]}  # fmt: skip
_FC_ITEM = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
            "arguments": "{\"city\":\"Paris\"}", "status": "completed"}  # fmt: skip


def _ev(kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **data}


RESPONSES = Wire(
    id="responses",
    spec="codex-mini-latest",
    base="/v1",
    path="/v1/responses",
    stream_path="/v1/responses",
    headers={"authorization": f"Bearer {KEY}"},
    absent=("x-api-key",),
    key_envs=("OPENAI_API_KEY",),
    text_body={"model": "codex-mini-latest", "input": [{"role": "user", "content": QUESTION}],
               "instructions": SYSTEM, "max_output_tokens": 16, "temperature": 0.5},  # fmt: skip
    stream_extra={"stream": True},
    text=Reply(json=_response([{"type": "reasoning", "id": "rs_1", "summary": []}, _MSG_ITEM], _RESP_USAGE)),
    stream=Reply(sse=[
        _ev("response.created", response=_response([], None, "in_progress"), sequence_number=0),  # type: ignore[arg-type]
        _ev("response.output_item.added", output_index=0, item={**_MSG_ITEM, "content": []}, sequence_number=1),
        _ev("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta="Pa",
            sequence_number=2),
        _ev("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta="ris",
            sequence_number=3),
        _ev("response.output_item.done", output_index=0, item=_MSG_ITEM, sequence_number=4),
        _ev("response.completed", response=_response([_MSG_ITEM], _RESP_USAGE), sequence_number=5)]),  # fmt: skip
    usage=(20, 9, 29, 4, 2),
    tool_reply=Reply(json=_response([_FC_ITEM], {"input_tokens": 30, "output_tokens": 5, "total_tokens": 35})),
    tool_stream=Reply(sse=[
        _ev("response.output_item.added", output_index=0, item={**_FC_ITEM, "arguments": ""}),
        _ev("response.function_call_arguments.delta", item_id="fc_1", output_index=0, delta="{\"city\":"),
        _ev("response.function_call_arguments.delta", item_id="fc_1", output_index=0, delta="\"Paris\"}"),
        _ev("response.output_item.done", output_index=0, item=_FC_ITEM),
        _ev("response.completed", response=_response([_FC_ITEM], {"input_tokens": 30, "output_tokens": 5,
                                                                   "total_tokens": 35}))]),  # fmt: skip
    tool_id="call_1",
    tools_key="tools",
    tools_value=[{"type": "function", "name": "get_weather", "description": WEATHER.description,
                  "parameters": WEATHER.parameters, "strict": False}],  # fmt: skip
    roundtrip=("input", [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ARGS_JSON},
        {"type": "function_call_output", "call_id": "call_1", "output": RESULT}]),  # fmt: skip
    final=Reply(json=_response([{**_MSG_ITEM, "content": [{"type": "output_text", "text": "18 C in Paris",
                                                            "annotations": []}]}],
                               {"input_tokens": 40, "output_tokens": 6, "total_tokens": 46})),  # fmt: skip
    schema_part=("text", {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}),
    errors=OPENAI.errors,
    stream_error=(Reply(sse=[
        _ev("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta="Pa"),
        _ev("response.failed", response={**_response([], None, "failed"),  # type: ignore[arg-type]
                                         "error": {"code": "rate_limit_exceeded", "message": "slow down"}})]),
        errors.RateLimitError),  # fmt: skip
    cut=Reply(sse=[_ev("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0,
                       delta="Pa")], cut=True),  # fmt: skip
)

# ---------------------------------------------------------------------------------------------
# Anthropic Messages (anthropic)
_AN_USAGE = {"input_tokens": 14, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 4, "output_tokens": 9}


def _an_msg(content: list[dict[str, Any]], stop: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}  # fmt: skip


def _an_start(usage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return _ev("message_start", message=_an_msg([], None, {**usage, "output_tokens": 1}))  # type: ignore[arg-type]


_AN_TOOL_USE = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}
ANTHROPIC = Wire(
    id="anthropic",
    spec="anthropic/claude-sonnet-4-5",
    base="/v1",
    path="/v1/messages",
    stream_path="/v1/messages",
    headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    absent=("authorization",),
    key_envs=("ANTHROPIC_API_KEY",),
    text_body={"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": QUESTION}],
               "system": SYSTEM, "temperature": 0.5},  # fmt: skip
    stream_extra={"stream": True},
    text=Reply(json=_an_msg([{"type": "text", "text": "Paris"}], "end_turn", _AN_USAGE)),
    stream=Reply(sse=[
        _an_start({"input_tokens": 14, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 4}),
        _ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        _ev("ping"),
        _ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Pa"}),
        _ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "ris"}),
        _ev("content_block_stop", index=0),
        _ev("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage={"output_tokens": 9}),
        _ev("message_stop")]),  # fmt: skip
    usage=(20, 9, 29, 4, 0),  # prompt = input + cache writes + cache reads
    tool_reply=Reply(json=_an_msg([{"type": "text", "text": "Let me check."}, _AN_TOOL_USE], "tool_use",
                                  {"input_tokens": 30, "output_tokens": 5})),  # fmt: skip
    tool_stream=Reply(sse=[
        _an_start({"input_tokens": 30}),
        _ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        _ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Let me check."}),
        _ev("content_block_stop", index=0),
        _ev("content_block_start", index=1, content_block={**_AN_TOOL_USE, "input": {}}),
        _ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": ""}),
        _ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": "{\"city\": "}),
        _ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": "\"Paris\"}"}),
        _ev("content_block_stop", index=1),
        _ev("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None}, usage={"output_tokens": 5}),
        _ev("message_stop")]),  # fmt: skip
    tool_id="toolu_01",
    tools_key="tools",
    tools_value=[{"name": "get_weather", "description": WEATHER.description, "input_schema": WEATHER.parameters}],
    roundtrip=("messages", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}, _AN_TOOL_USE]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": RESULT}]}]),
    final=Reply(json=_an_msg([{"type": "text", "text": "18 C in Paris"}], "end_turn",
                             {"input_tokens": 40, "output_tokens": 6})),  # fmt: skip
    schema_part=("output_config", {"format": {"type": "json_schema", "schema": SCHEMA}}),
    errors=[
        (_err(401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
         errors.AuthenticationError, "authentication_error"),
        (_err(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens "
                    "has exceeded your per-minute rate limit"}}, **{"retry-after": "7"}), errors.RateLimitError,
         "rate_limit_error"),  # fmt: skip
        (_err(400, {"type": "error", "error": {"type": "billing_error", "message": "Your credit balance is too low"}}),
         errors.QuotaExceededError, "billing_error"),
        (_err(403, {"type": "error", "error": {"type": "permission_error", "message": "no access"}}),
         errors.PermissionDeniedError, "permission_error"),
        (_err(404, {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-x"}}),
         errors.NotFoundError, "not_found_error"),
        (_err(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long"}}),
         errors.ContextWindowExceededError, "invalid_request_error"),  # Anthropic's fixed text (dsrs.errors doc)
        (_err(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
         errors.ProviderUnavailableError, "overloaded_error"),
        (_err(500, {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}),
         errors.ProviderUnavailableError, "api_error"),
    ],
    stream_error=(Reply(sse=[_an_start({"input_tokens": 3}),
                             _ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Pa"}),
                             _ev("error", error={"type": "overloaded_error", "message": "Overloaded"})]),
                  errors.ProviderUnavailableError),  # fmt: skip
    cut=Reply(sse=[_an_start({"input_tokens": 3}),
                   _ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Pa"})], cut=True),
)

# ---------------------------------------------------------------------------------------------
# Gemini generateContent (gemini)
_GM_USAGE = {"promptTokenCount": 20, "candidatesTokenCount": 7, "thoughtsTokenCount": 2, "totalTokenCount": 29,
             "cachedContentTokenCount": 4}  # fmt: skip


def _gm(parts: list[dict[str, Any]], finish: str | None = "STOP", usage: dict[str, Any] | None = None) -> dict:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    d: dict[str, Any] = {"candidates": [cand], "modelVersion": "gemini-2.5-flash", "responseId": "gm-1"}
    if usage:
        d["usageMetadata"] = usage
    return d


def _gm_status(code: int, status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


GEMINI = Wire(
    id="gemini",
    spec="gemini/gemini-2.5-flash",
    base="/v1beta",
    path="/v1beta/models/gemini-2.5-flash:generateContent",
    stream_path="/v1beta/models/gemini-2.5-flash:streamGenerateContent",
    headers={"x-goog-api-key": KEY},
    absent=("authorization", "x-api-key"),
    key_envs=("GOOGLE_API_KEY", "GEMINI_API_KEY"),
    text_body={"contents": [{"role": "user", "parts": [{"text": QUESTION}]}],
               "systemInstruction": {"parts": [{"text": SYSTEM}]},
               "generationConfig": {"maxOutputTokens": 16, "temperature": 0.5}},  # fmt: skip
    stream_extra={},
    text=Reply(json=_gm([{"text": "thinking...", "thought": True}, {"text": "Paris"}], usage=_GM_USAGE)),
    stream=Reply(sse=[_gm([{"text": "Pa"}], None), _gm([{"text": "ris"}], "STOP", _GM_USAGE)]),
    usage=(20, 9, 29, 4, 2),  # completion = candidates + thoughts
    tool_reply=Reply(json=_gm([{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
                              usage={"promptTokenCount": 30, "candidatesTokenCount": 5, "totalTokenCount": 35})),
    tool_stream=Reply(sse=[_gm([{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}], "STOP",
                               {"promptTokenCount": 30, "candidatesTokenCount": 5, "totalTokenCount": 35})]),
    tool_id="gemini-call-*",  # Gemini gave no id: ours is made up (unique) and never sent back
    tools_key="tools",
    tools_value=[{"functionDeclarations": [{"name": "get_weather", "description": WEATHER.description,
                                            "parametersJsonSchema": WEATHER.parameters}]}],  # fmt: skip
    roundtrip=("contents", [
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 18}}}]}]),
    final=Reply(json=_gm([{"text": "18 C in Paris"}], usage={"promptTokenCount": 40, "candidatesTokenCount": 6,
                                                             "totalTokenCount": 46})),  # fmt: skip
    schema_part=("generationConfig", {"responseMimeType": "application/json", "responseJsonSchema": SCHEMA}),
    # Google errors carry the HTTP status as `code`; the class comes from `status` (dsrs.errors._BY_CODE)
    errors=[
        (_err(400, _gm_status(400, "INVALID_ARGUMENT", "Invalid JSON payload")), errors.BadRequestError,
         None),
        (_err(403, _gm_status(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers")),
         errors.PermissionDeniedError, None),
        (_err(404, _gm_status(404, "NOT_FOUND", "models/gemini-x is not found")), errors.NotFoundError, None),
        (_err(429, _gm_status(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted"), **{"retry-after": "7"}),
         errors.RateLimitError, None),
        (_err(503, _gm_status(503, "UNAVAILABLE", "The model is overloaded")), errors.ProviderUnavailableError,
         None),
        (Reply(json={"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]},
                     "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}}),
         errors.SafetyBlockedError, "SAFETY"),  # fmt: skip
        (Reply(json={"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
            {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True}]}]}),
         errors.SafetyBlockedError, "SAFETY"),  # fmt: skip
    ],
    stream_error=(Reply(sse=[_gm([{"text": "Pa"}], None), _gm_status(500, "INTERNAL", "An internal error")]),
                  errors.ProviderUnavailableError),  # fmt: skip
    cut=Reply(sse=[_gm([{"text": "Pa"}], None)], cut=True),
)

# ---------------------------------------------------------------------------------------------
# Ollama native (ollama)


def _ol(message: dict[str, Any], done: bool = True, **final: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"model": "llama3.2", "created_at": "2026-11-25T09:00:00.000Z", "message": message,
                         "done": done}  # fmt: skip
    if done:
        d.update({"done_reason": "stop", "total_duration": 4883583458, "load_duration": 1334875,
                  "prompt_eval_count": 20, "prompt_eval_duration": 342546000, "eval_count": 9,
                  "eval_duration": 4535599000, **final})  # fmt: skip
    return d


_OL_CALL = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
OLLAMA = Wire(
    id="ollama",
    spec="ollama/llama3.2",
    base="",
    path="/api/chat",
    stream_path="/api/chat",
    headers={},
    absent=("authorization", "x-api-key"),
    key_envs=(),
    text_body={"model": "llama3.2", "messages": [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": QUESTION}], "stream": False,
               "options": {"num_predict": 16, "temperature": 0.5}},  # fmt: skip
    stream_extra={"stream": True},
    text=Reply(json=_ol({"role": "assistant", "content": "Paris"})),
    stream=Reply(ndjson=[_ol({"role": "assistant", "content": "Pa"}, False),
                         _ol({"role": "assistant", "content": "ris"}, False),
                         _ol({"role": "assistant", "content": ""})]),  # fmt: skip
    usage=(20, 9, 29, 0, 0),
    tool_reply=Reply(json=_ol({"role": "assistant", "content": "", "tool_calls": [_OL_CALL]},
                              prompt_eval_count=30, eval_count=5)),  # fmt: skip
    tool_stream=Reply(ndjson=[_ol({"role": "assistant", "content": "", "tool_calls": [_OL_CALL]}, False),
                              _ol({"role": "assistant", "content": ""}, prompt_eval_count=30, eval_count=5)]),
    tool_id="ollama-call-*",  # Ollama gave no id: ours is made up (unique)
    tools_key="tools",
    tools_value=_OA_TOOL_DEF,
    roundtrip=("messages", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [_OL_CALL]},
        {"role": "tool", "content": RESULT, "tool_name": "get_weather"}]),  # fmt: skip
    final=Reply(json=_ol({"role": "assistant", "content": "18 C in Paris"})),
    schema_part=("format", SCHEMA),
    errors=[
        (_err(404, {"error": "model \"llama9\" not found, try pulling it first"}), errors.NotFoundError, None),
        (_err(400, {"error": "invalid options"}), errors.BadRequestError, None),
        (_err(500, {"error": "llama runner process has terminated"}), errors.ProviderUnavailableError, None),
        (_err(401, {"error": "unauthorized"}), errors.AuthenticationError, None),  # behind an auth proxy
    ],
    stream_error=(Reply(ndjson=[_ol({"role": "assistant", "content": "Pa"}, False),
                                {"error": "an error was encountered while running the model"}]),
                  errors.ProviderUnavailableError),  # fmt: skip
    cut=Reply(ndjson=[_ol({"role": "assistant", "content": "Pa"}, False)], cut=True),
)

# ---------------------------------------------------------------------------------------------
# Cohere v2 chat (cohere)
_CO_USAGE = {"billed_units": {"input_tokens": 12, "output_tokens": 9}, "tokens": {"input_tokens": 20,
             "output_tokens": 9}, "cached_tokens": 4}  # fmt: skip


def _co(message: dict[str, Any], finish: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "co-1", "finish_reason": finish, "message": {"role": "assistant", **message}, "usage": usage}


def _co_ev(kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **data}


_CO_CALL = {"id": "get_weather_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}  # fmt: skip
_CO_TOOL_USAGE = {"tokens": {"input_tokens": 30, "output_tokens": 5}}
COHERE = Wire(
    id="cohere",
    spec="cohere/command-a-03-2025",
    base="/v2",
    path="/v2/chat",
    stream_path="/v2/chat",
    headers={"authorization": f"Bearer {KEY}"},
    absent=("x-api-key",),
    key_envs=("CO_API_KEY", "COHERE_API_KEY"),
    text_body={"model": "command-a-03-2025", "messages": [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": QUESTION}], "stream": False, "max_tokens": 16, "temperature": 0.5},  # fmt: skip
    stream_extra={"stream": True},
    text=Reply(json=_co({"content": [{"type": "text", "text": "Paris"}]}, "COMPLETE", _CO_USAGE)),
    stream=Reply(sse=[
        _co_ev("message-start", id="co-1", delta={"message": {"role": "assistant", "content": [], "tool_plan": "",
                                                              "tool_calls": [], "citations": []}}),
        _co_ev("content-start", index=0, delta={"message": {"content": {"type": "text", "text": ""}}}),
        _co_ev("content-delta", index=0, delta={"message": {"content": {"text": "Pa"}}}),
        _co_ev("content-delta", index=0, delta={"message": {"content": {"text": "ris"}}}),
        _co_ev("content-end", index=0),
        _co_ev("message-end", delta={"finish_reason": "COMPLETE", "usage": _CO_USAGE})]),  # fmt: skip
    usage=(12, 9, 21, 4, 0),  # billed_units (what Cohere bills), not tokens
    tool_reply=Reply(json=_co({"tool_plan": "I will look up the weather.", "tool_calls": [_CO_CALL]}, "TOOL_CALL",
                              _CO_TOOL_USAGE)),  # fmt: skip
    tool_stream=Reply(sse=[
        _co_ev("message-start", id="co-2", delta={"message": {"role": "assistant"}}),
        _co_ev("tool-plan-delta", delta={"message": {"tool_plan": "I will look up the weather."}}),
        _co_ev("tool-call-start", index=0, delta={"message": {"tool_calls": {**_CO_CALL, "function": {
            "name": "get_weather", "arguments": ""}}}}),
        _co_ev("tool-call-delta", index=0, delta={"message": {"tool_calls": {"function": {"arguments": "{\"city\":"}}}}),
        _co_ev("tool-call-delta", index=0, delta={"message": {"tool_calls": {"function": {"arguments": "\"Paris\"}"}}}}),
        _co_ev("tool-call-end", index=0),
        _co_ev("message-end", delta={"finish_reason": "TOOL_CALL", "usage": _CO_TOOL_USAGE})]),  # fmt: skip
    tool_id="get_weather_1",
    tools_key="tools",
    tools_value=_OA_TOOL_DEF,
    roundtrip=("messages", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "get_weather_1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": ARGS_JSON}}]},
        {"role": "tool", "content": RESULT, "tool_call_id": "get_weather_1"}]),  # fmt: skip
    final=Reply(json=_co({"content": [{"type": "text", "text": "18 C in Paris"}]}, "COMPLETE",
                         {"tokens": {"input_tokens": 40, "output_tokens": 6}})),  # fmt: skip
    schema_part=("response_format", {"type": "json_object", "json_schema": SCHEMA}),
    errors=[
        (_err(401, {"id": "e1", "message": "invalid api token"}), errors.AuthenticationError, None),
        (_err(429, {"id": "e2", "message": "You are using a Trial key, which is limited to 10 API calls / minute."},
              **{"retry-after": "7"}), errors.RateLimitError, None),  # fmt: skip
        (_err(402, {"id": "e3", "message": "Please add a payment method"}), errors.QuotaExceededError, None),
        (_err(400, {"id": "e4", "message": "invalid request: message must not be empty"}), errors.BadRequestError,
         None),
        (_err(404, {"id": "e5", "message": "model 'command-x' not found"}), errors.NotFoundError, None),
        (_err(503, {"id": "e6", "message": "service unavailable"}), errors.ProviderUnavailableError, None),
    ],
    stream_error=None,
    cut=Reply(sse=[_co_ev("content-delta", index=0, delta={"message": {"content": {"text": "Pa"}}})], cut=True),
)

WIRES = [OPENAI, RESPONSES, ANTHROPIC, GEMINI, OLLAMA, COHERE]
by_id = pytest.mark.parametrize("w", WIRES, ids=[w.id for w in WIRES])


def make(w: Wire, scripted: Any, **opts: Any) -> LM:
    lm = LM(w.spec, base_url=scripted.url + w.base, retries=0, **opts)
    return lm if not w.key_envs else lm.with_api_key(KEY)


def std(lm: LM) -> LM:
    return lm.with_max_tokens(16).with_temperature(0.5)


STD_MESSAGES = [Message.system(SYSTEM), Message.user(QUESTION)]


def check_sent(w: Wire, seen: Any, path: str) -> None:
    assert seen.method == "POST"
    assert seen.path == path
    assert seen.headers["content-type"] == "application/json"
    for k, v in w.headers.items():
        assert seen.headers.get(k) == v, k
    for k in w.absent:
        assert k not in seen.headers, k
    assert KEY not in json.dumps(seen.query)  # never a key in the URL


# -- the cases ----------------------------------------------------------------------------------
@by_id
async def test_text(w: Wire, scripted: Any) -> None:
    scripted.script(w.text)
    c = await std(make(w, scripted)).acall(STD_MESSAGES)
    assert c.text == "Paris"
    assert c.finish_reason == "stop"
    assert c.tool_calls == ()
    (seen,) = scripted.requests
    check_sent(w, seen, w.path)
    assert seen.json == w.text_body
    assert seen.query == {}


@by_id
def test_sync_call_and_stream(w: Wire, scripted: Any) -> None:
    lm = std(make(w, scripted))
    scripted.script(w.text, w.stream)
    assert lm(STD_MESSAGES).text == "Paris"
    items = list(lm.stream(STD_MESSAGES))
    assert items[:-1] == ["Pa", "ris"] and items[-1].completion.text == "Paris"
    assert [r.json for r in scripted.requests] == [w.text_body, {**w.text_body, **w.stream_extra}]


@by_id
async def test_usage(w: Wire, scripted: Any) -> None:
    scripted.script(w.text)
    u = (await std(make(w, scripted)).acall(STD_MESSAGES)).usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens) == w.usage
    assert u.calls == 1 and not u.estimated


@by_id
async def test_stream(w: Wire, scripted: Any) -> None:
    scripted.script(w.stream)
    deltas, ends = [], []
    async for item in std(make(w, scripted)).astream(STD_MESSAGES):
        (ends if isinstance(item, StreamEnd) else deltas).append(item)
    assert deltas == ["Pa", "ris"]
    (end,) = ends
    assert end.completion.text == "Paris"
    assert end.completion.finish_reason == "stop"
    u = end.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens) == w.usage
    (seen,) = scripted.requests
    check_sent(w, seen, w.stream_path)
    assert seen.json == {**w.text_body, **w.stream_extra}
    assert seen.query == ({"alt": "sse"} if w.id == "gemini" else {})


@by_id
@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
async def test_tools_round_trip(w: Wire, scripted: Any, streamed: bool) -> None:
    scripted.script(w.tool_stream if streamed else w.tool_reply, w.final)
    lm = make(w, scripted).with_options(tools=[WEATHER])
    ask = [Message.user("Weather in Paris?")]
    if streamed:
        first = [x async for x in lm.astream(ask)][-1].completion
    else:
        first = await lm.acall(ask)
    assert first.finish_reason == "tool_calls"
    (call,) = first.tool_calls
    made_up = w.tool_id.endswith("*")  # a unique id of ours: only its prefix is known
    call_id = call.id[: len(w.tool_id) - 1] + "*" if made_up else call.id
    assert (call_id, call.name, call.arguments, call.raw_arguments) == (w.tool_id, "get_weather", {"city": "Paris"},
                                                                        None)  # fmt: skip
    sent = scripted.requests[0].json
    assert sent[w.tools_key] == w.tools_value
    # the tool result goes back in the next request, answering the call by its id
    follow = ask + [Message.assistant(first.text, first.tool_calls), Message.tool(call.id, RESULT)]
    second = await lm.acall(follow)
    assert second.text == "18 C in Paris"
    assert second.finish_reason == "stop"
    key, expected = w.roundtrip
    assert scripted.requests[1].json[key] == expected
    assert scripted.requests[1].json[w.tools_key] == w.tools_value


@by_id
async def test_tool_choice(w: Wire, scripted: Any) -> None:
    """Forcing a tool: each protocol's own spelling, or a clear error where it has none."""
    spelled = {
        "openai_chat": ("tool_choice", {"type": "function", "function": {"name": "get_weather"}}),
        "responses": ("tool_choice", {"type": "function", "name": "get_weather"}),
        "anthropic": ("tool_choice", {"type": "tool", "name": "get_weather"}),
        "gemini": ("toolConfig", {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}),
    }
    lm = make(w, scripted).with_options(tools=[WEATHER],
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    scripted.script(w.tool_reply)
    if w.id not in spelled:  # ollama has no tool_choice; cohere can only require some tool
        with pytest.raises(errors.UnsupportedFeatureError):
            await lm.acall("Weather in Paris?")
        assert scripted.requests == []
        return
    await lm.acall("Weather in Paris?")
    key, value = spelled[w.id]
    assert scripted.requests[0].json[key] == value


@by_id
async def test_structured_output(w: Wire, scripted: Any) -> None:
    scripted.script(w.text)
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    await make(w, scripted).acall(QUESTION, response_format=rf)
    key, value = w.schema_part
    assert scripted.requests[0].json[key] == value


@by_id
async def test_errors_are_typed(w: Wire, scripted: Any) -> None:
    assert w.errors
    for reply, cls, code in w.errors:
        scripted.script(reply)
        with pytest.raises(errors.DsrsError) as ei:
            await make(w, scripted).acall(QUESTION)
        e = ei.value
        assert type(e) is cls, (reply.json, e)
        assert e.provider == make(w, scripted).provider
        if code is not None:
            assert e.code == code
        if cls is errors.RateLimitError and "retry-after" in reply.headers:
            assert e.retry_after == 7.0  # type: ignore[attr-defined]
        assert KEY not in str(e) and KEY not in repr(e)
        assert len(scripted.requests) == 1  # retries=0: one request, no retry


@by_id
async def test_error_inside_stream(w: Wire, scripted: Any) -> None:
    if w.stream_error is None:  # Cohere documents no error event inside its stream
        reply, cls = Reply(sse=[_co_ev("content-delta", index=0, delta={"message": {"content": {"text": "Pa"}}}),
                                ("error", {"type": "error", "message": "internal"})]), errors.ProviderUnavailableError
    else:
        reply, cls = w.stream_error
    scripted.script(reply)
    got = []
    with pytest.raises(errors.DsrsError) as ei:
        async for item in make(w, scripted).astream(QUESTION):
            got.append(item)
    assert type(ei.value) is cls
    assert got == ["Pa"]


@by_id
async def test_cut_stream_is_an_error(w: Wire, scripted: Any) -> None:
    assert w.cut is not None
    scripted.script(w.cut)
    got = []
    with pytest.raises((errors.ResponseFormatError, errors.APIConnectionError)):
        async for item in make(w, scripted).astream(QUESTION):
            got.append(item)
    assert got == ["Pa"]


@by_id
async def test_key_from_each_env_var(w: Wire, scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    if not w.key_envs:
        assert not LM(w.spec).service.key_required  # Ollama: local, no key
        return
    for env in w.key_envs:
        for other in w.key_envs:
            monkeypatch.delenv(other, raising=False)
        monkeypatch.setenv(env, KEY)
        scripted.script(w.text)
        await LM(w.spec, base_url=scripted.url + w.base).acall(STD_MESSAGES)
        check_sent(w, scripted.requests[0], w.path)
    for other in w.key_envs:
        monkeypatch.delenv(other, raising=False)
    with pytest.raises(errors.MissingApiKeyError) as ei:
        await LM(w.spec, base_url=scripted.url + w.base).acall(QUESTION)
    assert w.key_envs[0] in str(ei.value)


# -- capability errors: refused before anything is sent ---------------------------------------
UNSUPPORTED = [
    ("responses", {"stop": ("\n",)}),
    ("responses", {"seed": 7}),
    ("anthropic", {"seed": 7}),
    ("anthropic", {"response_format": {"type": "json_object"}}),
    ("ollama", {"tools": [WEATHER], "tool_choice": "required"}),
    ("cohere", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
]


@pytest.mark.parametrize("wid,opts", UNSUPPORTED, ids=[f"{w}-{next(iter(o))}" for w, o in UNSUPPORTED])
async def test_unsupported_feature_is_refused_before_sending(wid: str, opts: dict[str, Any], scripted: Any) -> None:
    (w,) = [x for x in WIRES if x.id == wid]
    lm = make(w, scripted).with_options(**opts)
    with pytest.raises(errors.UnsupportedFeatureError) as ei:
        await lm.acall(QUESTION)
    with pytest.raises(errors.UnsupportedFeatureError):
        async for _ in lm.astream(QUESTION):
            pass
    assert scripted.requests == []
    assert ei.value.hint


async def test_service_without_json_schema_refuses_it(scripted: Any) -> None:
    lm = LM("deepseek/deepseek-chat", base_url=scripted.url, api_key=KEY)
    with pytest.raises(errors.UnsupportedFeatureError):
        await lm.acall(QUESTION, response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    assert scripted.requests == []


async def test_unknown_tool_choice_and_response_format_are_configuration_errors(scripted: Any) -> None:
    for wid in ("responses", "anthropic", "gemini", "ollama", "cohere"):
        (w,) = [x for x in WIRES if x.id == wid]
        with pytest.raises(errors.ConfigurationError):
            await make(w, scripted).acall(QUESTION, tools=[WEATHER], tool_choice="sometimes")
        with pytest.raises(errors.ConfigurationError):
            await make(w, scripted).acall(QUESTION, response_format={"type": "yaml"})
    assert scripted.requests == []


# -- protocol details the cases above do not reach ----------------------------------------------
async def test_responses_incomplete_and_bare_codex_name(scripted: Any) -> None:
    lm = LM("codex-mini-latest", base_url=scripted.url + "/v1", api_key=KEY)
    assert lm.provider == "codex"
    body = _response([_MSG_ITEM], {"input_tokens": 5, "output_tokens": 16, "total_tokens": 21}, "incomplete")
    body["incomplete_details"] = {"reason": "max_output_tokens"}
    scripted.script(Reply(json=body))
    c = await lm.acall(QUESTION)
    assert c.finish_reason == "length" and c.text == "Paris"
    scripted.script(Reply(json={**_response([], None, "failed"),  # type: ignore[arg-type]
                                "error": {"code": "server_error", "message": "boom"}}))
    with pytest.raises(errors.ProviderUnavailableError):
        await lm.with_retries(0).acall(QUESTION)
    scripted.script(Reply(json={**_response([], None, "failed"),  # type: ignore[arg-type]
                                "error": {"code": "invalid_prompt", "message": "flagged"}}))
    with pytest.raises(errors.BadRequestError) as ei:
        await lm.acall(QUESTION)
    assert ei.value.code == "invalid_prompt" and not ei.value.retryable
    assert len(scripted.requests) == 1


def _two(fn: Any) -> list[Any]:
    return [fn("c_a", "Paris"), fn("c_b", "Rome")]


PARALLEL_TAIL = {  # how each protocol carries two parallel calls and their two results
    "openai_chat": [
        {"role": "assistant", "content": None, "tool_calls": _two(lambda i, c: {
            "id": i, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}})},
        {"role": "tool", "content": "1", "tool_call_id": "c_a"}, {"role": "tool", "content": "2", "tool_call_id": "c_b"}],
    "responses": _two(lambda i, c: {"type": "function_call", "call_id": i, "name": "get_weather",
                                    "arguments": json.dumps({"city": c})})
    + [{"type": "function_call_output", "call_id": "c_a", "output": "1"},
       {"type": "function_call_output", "call_id": "c_b", "output": "2"}],
    "anthropic": [
        {"role": "assistant", "content": _two(lambda i, c: {"type": "tool_use", "id": i, "name": "get_weather",
                                                            "input": {"city": c}})},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c_a", "content": "1"},
                                     {"type": "tool_result", "tool_use_id": "c_b", "content": "2"}]}],
    "gemini": [
        {"role": "model", "parts": _two(lambda i, c: {"functionCall": {"name": "get_weather", "args": {"city": c},
                                                                       "id": i}})},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"result": 1}, "id": "c_a"}},
                                   {"functionResponse": {"name": "get_weather", "response": {"result": 2}, "id": "c_b"}}]}],
    "ollama": [
        {"role": "assistant", "tool_calls": _two(lambda i, c: {"function": {"name": "get_weather",
                                                                            "arguments": {"city": c}}})},
        {"role": "tool", "content": "1", "tool_name": "get_weather"},
        {"role": "tool", "content": "2", "tool_name": "get_weather"}],
    "cohere": [
        {"role": "assistant", "tool_calls": _two(lambda i, c: {
            "id": i, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}})},
        {"role": "tool", "content": "1", "tool_call_id": "c_a"}, {"role": "tool", "content": "2", "tool_call_id": "c_b"}],
}  # fmt: skip


@by_id
async def test_parallel_tool_results(w: Wire, scripted: Any) -> None:
    from dsrs import ToolCall

    scripted.script(w.final)
    calls = tuple(_two(lambda i, c: ToolCall(i, "get_weather", {"city": c})))
    c = await make(w, scripted).acall([Message.user("Two cities?"), Message.assistant("", calls),
                                       Message.tool("c_a", "1"), Message.tool("c_b", "2")])  # fmt: skip
    assert c.text == "18 C in Paris"
    key = w.roundtrip[0]
    assert scripted.requests[0].json[key][1:] == PARALLEL_TAIL[w.id]


async def test_anthropic_version_header_can_change_and_max_tokens_defaults(scripted: Any) -> None:
    scripted.script(ANTHROPIC.final)
    await make(ANTHROPIC, scripted, api_version="2099-01-01").acall(QUESTION)
    seen = scripted.requests[0]
    assert seen.headers["anthropic-version"] == "2099-01-01"
    assert seen.json["max_tokens"] == 4096  # required by the protocol: defaulted


async def test_gemini_ids_given_by_gemini_are_sent_back_and_stop_seed_go_to_generation_config(scripted: Any) -> None:
    scripted.script(Reply(json=_gm([{"functionCall": {"id": "fc-9", "name": "get_weather", "args": {}}}])),
                    GEMINI.final)  # fmt: skip
    lm = make(GEMINI, scripted).with_options(tools=[WEATHER]).with_seed(3).with_stop("END")
    first = await lm.acall("Weather?")
    assert first.tool_calls[0].id == "fc-9"
    await lm.acall([Message.user("Weather?"), Message.assistant("", first.tool_calls), Message.tool("fc-9", "sunny")])
    sent = scripted.requests[1].json
    assert sent["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {}, "id": "fc-9"}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"result": "sunny"},
                                                         "id": "fc-9"}}]}]  # fmt: skip
    assert sent["generationConfig"] == {"seed": 3, "stopSequences": ["END"]}


async def test_gemini_error_status_inside_a_stream_keeps_its_class(scripted: Any) -> None:
    scripted.script(Reply(sse=[_gm_status(400, "INVALID_ARGUMENT", "Invalid value at 'generation_config'")]))
    with pytest.raises(errors.BadRequestError) as ei:
        async for _ in make(GEMINI, scripted).astream(QUESTION):
            pass
    assert ei.value.code == "INVALID_ARGUMENT"  # the structured status, not the numeric HTTP code


async def test_gemini_tool_result_without_a_known_name_is_refused(scripted: Any) -> None:
    with pytest.raises(errors.ConfigurationError) as ei:
        await make(GEMINI, scripted).acall([Message.user("Weather?"), Message.tool("call_x", "sunny")])
    assert "call_x" in str(ei.value) and scripted.requests == []


async def test_gemini_max_tokens_finish(scripted: Any) -> None:
    scripted.script(Reply(json=_gm([{"text": "Par"}], "MAX_TOKENS", _GM_USAGE)))
    c = await make(GEMINI, scripted).acall(QUESTION)
    assert (c.text, c.finish_reason) == ("Par", "length")


async def test_ollama_num_ctx_options_and_tags(scripted: Any) -> None:
    from dsrs.providers import ollama

    lm = LM("ollama/llama3.2").with_base_url(scripted.url).with_num_ctx(8192).with_seed(42).with_stop("\n")
    scripted.script(OLLAMA.text)
    await lm.acall(QUESTION, top_p=0.9)
    assert scripted.requests[0].json["options"] == {"num_ctx": 8192, "seed": 42, "top_p": 0.9, "stop": ["\n"]}
    scripted.script(Reply(json=TAGS))
    assert await ollama.list_models(scripted.url) == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert (scripted.requests[0].method, scripted.requests[0].path) == ("GET", "/api/tags")


async def test_ollama_host_env_without_scheme(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", scripted.url.removeprefix("http://"))
    scripted.script(OLLAMA.text)
    assert (await LM("ollama/llama3.2").acall(QUESTION)).text == "Paris"


TAGS = {"models": [
    {"name": "llama3.2:latest", "model": "llama3.2:latest", "modified_at": "2026-10-01T10:00:00Z", "size": 2019393189,
     "digest": "a80c4f17acd5", "details": {"format": "gguf", "family": "llama", "parameter_size": "3.2B",
                                           "quantization_level": "Q4_K_M"}},
    {"name": "qwen2.5:0.5b", "model": "qwen2.5:0.5b", "modified_at": "2026-10-02T10:00:00Z", "size": 397821319,
     "digest": "a8b0c5157701", "details": {"format": "gguf", "family": "qwen2", "parameter_size": "494.03M",
                                           "quantization_level": "Q4_K_M"}}]}  # fmt: skip


def test_official_ollama_client_parses_our_scripted_replies(scripted: Any) -> None:
    """The replies the Ollama rows script are what the official `ollama` client understands."""
    import ollama as official

    client = official.Client(host=scripted.url)
    scripted.script(OLLAMA.text)
    r = client.chat(model="llama3.2", messages=[{"role": "user", "content": QUESTION}],
                    options={"num_ctx": 8192})  # fmt: skip
    assert r.message.content == "Paris" and r.prompt_eval_count == 20 and r.eval_count == 9 and r.done
    assert scripted.requests[0].json["options"] == {"num_ctx": 8192}
    scripted.script(OLLAMA.stream)
    chunks = list(client.chat(model="llama3.2", messages=[{"role": "user", "content": QUESTION}], stream=True))
    assert "".join(c.message.content for c in chunks) == "Paris" and chunks[-1].done_reason == "stop"
    scripted.script(OLLAMA.tool_reply)
    r = client.chat(model="llama3.2", messages=[{"role": "user", "content": "Weather?"}], tools=[OLLAMA.tools_value[0]])
    (tc,) = r.message.tool_calls
    assert (tc.function.name, dict(tc.function.arguments)) == ("get_weather", {"city": "Paris"})
    # and what the official client sends for a tool round trip is what we send
    scripted.script(OLLAMA.final)
    client.chat(model="llama3.2", messages=OLLAMA.roundtrip[1], tools=[OLLAMA.tools_value[0]])
    assert scripted.requests[-1].json["messages"] == OLLAMA.roundtrip[1]
    scripted.script(Reply(json=TAGS))
    assert [m.model for m in client.list().models] == ["llama3.2:latest", "qwen2.5:0.5b"]
    scripted.script(OLLAMA.errors[0][0])
    with pytest.raises(official.ResponseError) as ei:
        client.chat(model="llama9", messages=[{"role": "user", "content": "hi"}])
    assert ei.value.status_code == 404
