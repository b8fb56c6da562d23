"""The Anthropic Messages wire, server side: a `POST /v1/messages` body in, a message or its SSE events out.

A body becomes the same `requests.Call` the OpenAI endpoints make (dsrs's normal forms: `Message`,
`Tool`, `ToolCall`), so it runs over the same lanes, keys, budgets, ledger and metrics. Out, a
`Completion` becomes an Anthropic message (text and `tool_use` blocks, `stop_reason`, `usage`,
plus the gateway's `dsrs` extra), a stream becomes Anthropic's events (`message_start`,
`content_block_start`/`_delta`/`_stop`, `message_delta`, `message_stop`), and a `WireError`
becomes Anthropic's error shape, `{"type": "error", "error": {"type", "message"}}`.

In: `system` (a string or text blocks, joined by a blank line), `messages` of text, image,
`tool_use` and `tool_result` blocks (a user turn's tool results become tool messages before its
text; `is_error` is not carried: the result's text is), `max_tokens` (required, as Anthropic
requires it), `stop_sequences`, `temperature` and `top_p` (0 to 1), `top_k` (passed to the lane as
a provider parameter: lanes whose API has no top_k refuse it), `tools` (custom tools;
`cache_control` is dropped), `tool_choice` (`auto`, `any`, `tool`, `none`; not
`disable_parallel_tool_use`), `output_config.format` (a JSON schema: the lane's structured output),
`stream`. Ignored, as they do not change the answer: `metadata`, `service_tier`, `cache_control`,
`inference_geo`, `speed`, `diagnostics`, `user_profile_id`, `workspace_id`, and
`output_config.effort` (as the OpenAI endpoints ignore `reasoning_effort`); thinking blocks in
assistant turns are not replayed (as the Responses endpoint drops reasoning items). Anything else
that would change the answer (server tools, `thinking` enabled, document blocks) is a 400.

Errors: Anthropic's types by status (400 invalid_request_error, 401 authentication_error, 402
billing_error, 403 permission_error, 404 not_found_error, 413 request_too_large, 429
rate_limit_error, 500 api_error, 504 timeout_error, 529 overloaded_error). A budget that refuses
(and an upstream whose quota is spent) is 402 billing_error, Anthropic's error for "out of credits
or spend limit reached", with `x-should-retry: false`; a key's rate limit stays 429 with retry-after.
"""

from __future__ import annotations

import json
from typing import Any

from .. import errors
from ..providers import convert
from ..types import Completion, LmUsage, Message, ToolCall
from .replies import dsrs_extra, new_id
from .requests import Call, WireError, _array, _flag, _kind, _model, _number, _obj, _string, bad

# -- in -------------------------------------------------------------------------------------------
_KNOWN = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k", "tools",
          "tool_choice", "stream", "thinking", "output_config"}  # fmt: skip
# Accepted and ignored: they do not change the answer (where, how fast, for whom, cache hints).
_IGNORED = {"metadata", "service_tier", "cache_control", "inference_geo", "speed", "diagnostics", "user_profile_id",
            "workspace_id"}  # fmt: skip


def parse(body: Any) -> Call:
    model = _model(body)
    for k, v in body.items():
        if k not in _KNOWN and k not in _IGNORED and v is not None:
            raise bad(f"{k}: extra inputs are not permitted", k, "unknown_parameter")
    thinking = body.get("thinking")
    if thinking is not None and _obj(thinking, "thinking").get("type") != "disabled":
        raise bad("thinking is not supported by this gateway: leave it out or send {'type': 'disabled'}", "thinking",
                  "unsupported_parameter")  # fmt: skip
    o: dict[str, Any] = {}
    max_tokens = _number(body, "max_tokens", int, 1)
    if max_tokens is None:
        raise bad("max_tokens: field required (the most tokens to generate, e.g. 1024)", "max_tokens",
                  "missing_required_parameter")  # fmt: skip
    o["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        v = _number(body, name, float, 0, 1)
        if v is not None:
            o[name] = v
    top_k = _number(body, "top_k", int, 0)
    if top_k is not None:
        o["extra"] = {"top_k": top_k}
    stop = _array(body.get("stop_sequences"), "stop_sequences")
    if not all(isinstance(s, str) for s in stop):
        raise bad("stop_sequences must be an array of strings", "stop_sequences")
    if stop:
        o["stop"] = tuple(stop)
    tools = [_tool(t, f"tools[{i}]") for i, t in enumerate(_array(body.get("tools"), "tools"))]
    if tools:
        o["tools"] = tuple(tools)
    if body.get("tool_choice") is not None:
        o["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _obj(body["output_config"], "output_config").get("format") if body.get("output_config") is not None else None
    if fmt is not None:
        schema = _obj(fmt, "output_config.format").get("schema")
        if fmt.get("type") != "json_schema" or not isinstance(schema, dict):
            raise bad("output_config.format must be {'type': 'json_schema', 'schema': {...}}", "output_config.format")
        o["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    msgs = _system(body.get("system"))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty array", "messages", "missing_required_parameter")
    for i, m in enumerate(raw):
        msgs += _turn(m, f"messages[{i}]")
    return Call(model, tuple(msgs), o, _flag(body, "stream"))


def _system(system: Any) -> list[Message]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [Message.system(system)]
    texts = []
    for i, b in enumerate(_array(system, "system")):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise bad(f"system[{i}] must be a text block {{'type': 'text', 'text': ...}}", f"system[{i}]")
        texts.append(b["text"])
    return [Message.system("\n\n".join(texts))] if texts else []


def _turn(m: Any, where: str) -> list[Message]:
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise bad(f"{where}: role must be user or assistant", f"{where}.role")
    role, content = m["role"], m.get("content")
    if isinstance(content, str):
        return [Message(role, content)]
    blocks = _array(content, f"{where}.content")
    out: list[Message] = []
    parts: list[dict[str, Any]] = []
    calls: list[ToolCall] = []
    for j, b in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image" and role == "user":
            try:
                parts.append(Message.part(b))
            except errors.ConfigurationError as e:
                raise bad(f"{at}: {e.message}", at, "unsupported_content") from None
        elif kind == "tool_result" and role == "user":
            out.append(Message.tool(_string(b.get("tool_use_id"), f"{at}.tool_use_id") or "", _result_text(b, at)))
        elif kind == "tool_use" and role == "assistant":
            name = _string(b.get("name"), f"{at}.name")
            if not name:
                raise bad(f"{at}: a tool_use block needs a name", f"{at}.name")
            args = _obj(b.get("input") or {}, f"{at}.input")
            calls.append(convert.tool_call(_string(b.get("id"), f"{at}.id") or "", name, args))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # the lane's own reasoning is not replayed
        else:
            raise bad(f"{at}: content block type {kind!r} is not supported in a {role} turn", at, "unsupported_content")
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    if any(p["type"] == "image" for p in parts):
        out.append(Message("user", text, parts=tuple(parts)))
    elif role == "assistant":
        out.append(Message.assistant(text, tuple(calls)))
    elif parts or not out:
        out.append(Message("user", text))
    return out


def _result_text(b: dict[str, Any], at: str) -> str:
    c = b.get("content")
    if c is None or isinstance(c, str):
        return c or ""
    out = []
    for k, p in enumerate(_array(c, f"{at}.content")):
        if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise bad(f"{at}.content[{k}]: a tool result may hold text blocks only", f"{at}.content",
                      "unsupported_content")  # fmt: skip
        out.append(p["text"])
    return "".join(out)


def _tool(t: Any, where: str) -> Any:
    if not isinstance(t, dict):
        raise bad(f"{where} must be an object, not {_kind(t)}", where)
    if t.get("type") not in (None, "custom"):
        raise bad(f"{where}: tool type {t['type']!r} (a server tool) is not supported: send custom tools "
                  "{'name', 'description', 'input_schema'}", where, "unsupported_parameter")  # fmt: skip
    try:
        return convert.tool({k: v for k, v in t.items() if k != "cache_control"})
    except errors.ConfigurationError as e:
        raise bad(f"{where}: {e.message}", where) from None


def _tool_choice(tc: Any) -> Any:
    kind = _obj(tc, "tool_choice").get("type")
    if kind in ("auto", "any", "none"):
        return {"any": "required"}.get(kind, kind)
    if kind == "tool":
        name = _string(tc.get("name"), "tool_choice.name")
        if not name:
            raise bad("tool_choice: {'type': 'tool'} needs the tool's name", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    raise bad("tool_choice.type must be auto, any, tool or none", "tool_choice.type")


# -- out ------------------------------------------------------------------------------------------
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def usage(u: LmUsage) -> dict[str, Any]:
    """Anthropic's usage: `input_tokens` excludes the cache reads and writes, which are counted apart."""
    return {"input_tokens": max(0, u.prompt_tokens - u.cached_tokens - u.cache_write_tokens),
            "output_tokens": u.completion_tokens, "cache_creation_input_tokens": u.cache_write_tokens,
            "cache_read_input_tokens": u.cached_tokens}  # fmt: skip


def _tool_use(t: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": t.id or new_id("toolu_"), "name": t.name, "input": t.arguments}


def message(c: Completion, model: str, lane: str | None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": c.text}] if c.text or not c.tool_calls else []
    content += [_tool_use(t) for t in c.tool_calls]
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": _STOP.get(c.finish_reason, "end_turn"), "stop_sequence": None, "usage": usage(c.usage),
            "dsrs": dsrs_extra(c, lane)}  # fmt: skip


class MessagesStream:
    """The events of one streamed message (each a dict with its `type`, sent as `event: <type>`)."""

    def __init__(self, model: str) -> None:
        self.mid, self.model, self.index = new_id("msg_"), model, 0
        self.text_open = False

    def start(self) -> list[dict[str, Any]]:
        # the input tokens are known only at the end (from the lane's usage): message_delta carries them
        msg: dict[str, Any] = {"id": self.mid, "type": "message", "role": "assistant", "model": self.model,
                               "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage(LmUsage())}  # fmt: skip
        return [{"type": "message_start", "message": msg}]

    def _open_text(self) -> list[dict[str, Any]]:
        self.text_open = True
        return [{"type": "content_block_start", "index": self.index, "content_block": {"type": "text", "text": ""}}]

    def delta(self, text: str) -> list[dict[str, Any]]:
        out = [] if self.text_open else self._open_text()
        delta = {"type": "text_delta", "text": text}
        return [*out, {"type": "content_block_delta", "index": self.index, "delta": delta}]

    def _close(self) -> dict[str, Any]:
        ev = {"type": "content_block_stop", "index": self.index}
        self.index += 1
        return ev

    def end(self, c: Completion, lane: str | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.text_open and c.text:  # an answer that came whole (a cache hit): one delta
            out += self.delta(c.text)
        if self.text_open:
            out.append(self._close())
            self.text_open = False
        for t in c.tool_calls:
            block = {**_tool_use(t), "input": {}}
            out += [{"type": "content_block_start", "index": self.index, "content_block": block},
                    {"type": "content_block_delta", "index": self.index,
                     "delta": {"type": "input_json_delta", "partial_json": json.dumps(t.arguments)}},
                    self._close()]  # fmt: skip
        out.append({"type": "message_delta", "delta": {"stop_reason": _STOP.get(c.finish_reason, "end_turn"),
                                                       "stop_sequence": None},
                    "usage": usage(c.usage), "dsrs": dsrs_extra(c, lane)})  # fmt: skip
        out.append({"type": "message_stop"})
        return out

    def failed(self, w: WireError) -> dict[str, Any]:
        return error_body(w)[1]


# -- errors out -----------------------------------------------------------------------------------
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
          504: "timeout_error", 529: "overloaded_error"}  # fmt: skip


def error_body(w: WireError) -> tuple[int, dict[str, Any]]:
    """The status and Anthropic-shaped body of a gateway error (the headers stay `w.headers`)."""
    status = 402 if w.type == "insufficient_quota" else w.status  # a spent budget or quota: billing_error
    kind = _TYPES.get(status)
    if kind is None:
        kind = "invalid_request_error" if status < 500 else "overloaded_error" if status == 503 and \
            w.code != "budget_unavailable" else "api_error"  # fmt: skip
    return status, {"type": "error", "error": {"type": kind, "message": w.message}, "request_id": None}
