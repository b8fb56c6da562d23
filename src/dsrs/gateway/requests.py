"""The OpenAI wire, server side, incoming: Chat Completions and Responses requests in, errors out.

A request body is validated and becomes a `Call` (messages + the options `BaseLM.acall` takes),
reusing the client side's normal forms (`convert.tool_call`, `Message.coerce`; the client side lives
in `providers.openai_chat` and `providers.responses`); anything the gateway refuses, and any dsrs
error a lane raises, becomes a `WireError`: an OpenAI-shaped error with status, type, code and param.
Parameters that do not change the answer (`user`, `metadata`, `store`, Codex's `reasoning`,
`include`, `prompt_cache_key`...) are accepted and ignored; answer-changing parameters dsrs cannot
honour (`n > 1`, penalties, logprobs, images, `previous_response_id`) are a 400, never dropped
silently. Hosted and custom tools (web_search, Codex's apply_patch grammar) are not offered to
lanes: lanes get the function tools.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, cast

from .. import errors
from ..providers import convert
from ..types import Message, Role, Tool


class WireError(Exception):
    """A request the gateway refuses, as an OpenAI error: status, type, code, param."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> WireError:
    return WireError(400, message, code=code, param=param)


@dataclass
class Call:
    """One incoming request in dsrs terms."""

    model: str  # the name the client asked for (a configured model or lane)
    messages: tuple[Message, ...]
    options: dict[str, Any] = field(default_factory=dict)  # BaseLM.acall overrides
    stream: bool = False
    include_usage: bool = False  # chat streams: the usage chunk was asked for


# Accepted and ignored: they do not change the answer.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options", "prompt_cache_key",
            "safety_identifier", "reasoning", "reasoning_effort", "include", "client_metadata", "truncation",
            "background", "prompt_cache_retention", "modalities", "verbosity"}  # fmt: skip
# Accepted when they ask for the default.
_DEFAULTS = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": 0,
             "logit_bias": {}, "previous_response_id": None, "conversation": None, "prompt": None}  # fmt: skip


def _check_rest(body: dict[str, Any], known: set[str]) -> None:
    for k, v in body.items():
        if k in known or k in _IGNORED or v is None:
            continue
        if k in _DEFAULTS and v == _DEFAULTS[k]:
            continue
        if k in _DEFAULTS:
            raise bad(f"{k}={json.dumps(v)[:40]} is not supported by this gateway", k, "unsupported_parameter")
        raise bad(f"unrecognized request argument: {k}", k, "unknown_parameter")


def _model(body: Any) -> str:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise bad("you must provide a model parameter", "model", "missing_required_parameter")
    return m


def _number(body: dict[str, Any], name: str, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int))
            or not math.isfinite(v)):  # fmt: skip
        raise bad(f"{name} must be {'an integer' if kind is int else 'a finite number'}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"{name}={v} is out of range [{lo}, {hi if hi is not None else 'inf'}]", name)
    return v


def _sampling(body: dict[str, Any], max_name: str) -> dict[str, Any]:
    o: dict[str, Any] = {}
    mt = _number(body, max_name, int, 1)
    if mt is not None:
        o["max_tokens"] = mt
    for name, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1)):
        v = _number(body, name, float, lo, hi)
        if v is not None:
            o[name] = v
    return o


def _obj(v: Any, param: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise bad(f"{param} must be an object, not {_kind(v)}", param)
    return v


def _array(v: Any, param: str) -> list[Any]:
    """A JSON array (None: empty)."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise bad(f"{param} must be an array, not {_kind(v)}", param)
    return v


def _string(v: Any, param: str) -> str | None:
    if v is not None and not isinstance(v, str):
        raise bad(f"{param} must be a string, not {_kind(v)}", param)
    return v


def _flag(body: dict[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(f"{name} must be true or false, not {_kind(v)}", name)
    return bool(v)


def _kind(v: Any) -> str:
    """The JSON type of a value, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(type(v), type(v).__name__)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def may_hold_surrogates(raw: bytes) -> bool:
    """Does this JSON text escape a UTF-16 surrogate (`\\ud800`...)? Only then are strings checked."""
    return _SURROGATE_ESCAPE.search(raw) is not None


def _no_lone_surrogate(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("the request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is "
                  "not text: send valid Unicode", None, "invalid_json") from None  # fmt: skip


def check_depth(body: Any, limit: int = 64, surrogates: bool = False) -> None:
    """Refuse JSON nested deeper than `limit` (no request needs it; deep nesting only exhausts the stack),
    and with `surrogates`, any string or key holding a lone UTF-16 surrogate (JSON escapes allow it,
    UTF-8 cannot carry it to a provider)."""
    todo = [(body, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                raise bad(f"the request body is nested deeper than {limit} levels", None, "invalid_json")
            if surrogates and isinstance(v, dict):
                for k in v:
                    _no_lone_surrogate(k)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
        elif surrogates and isinstance(v, str):
            _no_lone_surrogate(v)


def _text(content: Any, where: str) -> str:
    """Text of a content field: a string or a list of text parts; anything else is a 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, str):
                out.append(p)
                continue
            kind = p.get("type") if isinstance(p, dict) else None
            if kind in ("text", "input_text", "output_text"):
                out.append(str(p.get("text") or ""))
            elif kind == "refusal":
                out.append(str(p.get("refusal") or ""))
            else:
                raise bad(f"{where}: content part type {kind!r} is not supported (text only)", where, "unsupported_content")
        return "".join(out)
    raise bad(f"{where}: content must be a string or a list of text parts", where)


def _tool_choice_from_responses(tc: Any) -> Any:
    if isinstance(tc, dict) and tc.get("type") == "function" and tc.get("name"):
        return {"type": "function", "function": {"name": tc["name"]}}
    return tc


def _check_choice(tc: Any, param: str) -> None:
    if isinstance(tc, dict):
        if tc.get("function") is not None:
            _string(_obj(tc["function"], f"{param}.function").get("name"), f"{param}.function.name")
        _string(tc.get("name"), f"{param}.name")
        _string(tc.get("type"), f"{param}.type")
    elif not isinstance(tc, str):
        raise bad(f"{param} must be a string or an object, not {_kind(tc)}", param)
    try:
        convert.tool_choice(tc)
    except errors.ConfigurationError as e:
        raise bad(e.message, param) from None


def _check_format(rf: Any, param: str) -> None:
    _obj(rf, param)
    if rf.get("json_schema") is not None:
        js = _obj(rf["json_schema"], f"{param}.json_schema")
        _string(js.get("name"), f"{param}.json_schema.name")
    try:
        convert.output(rf)
    except errors.ConfigurationError as e:
        raise bad(e.message, param) from None


# -- Chat Completions in --------------------------------------------------------------------------
_CHAT_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
               "tools", "tool_choice", "response_format", "stream", "stream_options", "functions"}  # fmt: skip


def parse_chat(body: Any) -> Call:
    model = _model(body)
    _check_rest(body, _CHAT_KNOWN)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty array", "messages", "missing_required_parameter")
    msgs = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"{where}: role must be system, developer, user, assistant or tool", where)
        role = "system" if m["role"] == "developer" else m["role"]
        calls = []
        for j, tc in enumerate(_array(m.get("tool_calls"), f"{where}.tool_calls")):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(fn, dict) or not fn.get("name") or not isinstance(fn["name"], str):
                raise bad(f"{where}.tool_calls[{j}] needs function.name (a string)", f"{where}.tool_calls")
            cid = _string(tc.get("id"), f"{where}.tool_calls[{j}].id")
            calls.append(convert.tool_call(cid or "", fn["name"], fn.get("arguments")))
        call_id = _string(m.get("tool_call_id"), f"{where}.tool_call_id")
        if role == "tool" and not call_id:
            raise bad(f"{where}: a tool message needs tool_call_id", f"{where}.tool_call_id")
        name = _string(m.get("name"), f"{where}.name")
        msgs.append(Message(cast(Role, role), _text(m.get("content"), where), tuple(calls), call_id, name))
    if body.get("functions"):
        raise bad("the legacy 'functions' parameter is not supported: use 'tools'", "functions", "unsupported_parameter")
    o = _sampling(body, "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens")
    seed = _number(body, "seed", int)
    if seed is not None:
        o["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise bad("stop must be a string or an array of up to 4 strings", "stop")
        if stop:
            o["stop"] = tuple(stop)
    tools = []
    for j, t in enumerate(_array(body.get("tools"), "tools")):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not fn.get("name") or not isinstance(fn["name"], str):
            raise bad(f"tools[{j}] must be {{'type': 'function', 'function': {{'name': ...}}}}", f"tools[{j}]")
        tools.append(_tool(fn, f"tools[{j}].function"))
    if tools:
        o["tools"] = tuple(tools)
    if body.get("tool_choice") is not None:
        _check_choice(body["tool_choice"], "tool_choice")
        o["tool_choice"] = body["tool_choice"]
    rf = body.get("response_format")
    if rf is not None and _obj(rf, "response_format").get("type") != "text":
        _check_format(rf, "response_format")
        o["response_format"] = rf
    stream = _flag(body, "stream")
    opts = body.get("stream_options")
    include = _obj(opts, "stream_options").get("include_usage") if opts is not None else None
    if include is not None and not isinstance(include, bool):
        raise bad(f"stream_options.include_usage must be true or false, not {_kind(include)}", "stream_options.include_usage")
    return Call(model, tuple(msgs), o, stream, bool(include) and stream)


def _tool(fn: dict[str, Any], where: str) -> Tool:
    params = fn.get("parameters")
    params = {"type": "object", "properties": {}} if params is None else _obj(params, f"{where}.parameters")
    return Tool(fn["name"], _string(fn.get("description"), f"{where}.description") or "", params)


# -- Responses in ---------------------------------------------------------------------------------
_RESP_KNOWN = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
               "text", "stream"}  # fmt: skip


def parse_responses(body: Any) -> Call:
    model = _model(body)
    _check_rest(body, _RESP_KNOWN)
    msgs: list[Message] = []
    if body.get("instructions"):
        msgs.append(Message("system", _text(body["instructions"], "instructions")))
    raw = body.get("input")
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad("input must be a string or a non-empty array of items", "input", "missing_required_parameter")
    for i, it in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(it, dict):
            raise bad(f"{where} must be an object", where)
        kind = it.get("type") or "message"
        if kind == "message":
            role = it.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise bad(f"{where}: role must be system, developer, user or assistant", where)
            msgs.append(Message("system" if role == "developer" else role, _text(it.get("content"), where)))
        elif kind in ("function_call", "custom_tool_call"):
            args = it.get("arguments") if kind == "function_call" else {"input": it.get("input") or ""}
            cid = _string(it.get("call_id"), f"{where}.call_id") or _string(it.get("id"), f"{where}.id") or ""
            call = convert.tool_call(cid, _string(it.get("name"), f"{where}.name") or "", args)
            if msgs and msgs[-1].role == "assistant":
                last = msgs[-1]
                msgs[-1] = Message("assistant", last.content, last.tool_calls + (call,))
            else:
                msgs.append(Message.assistant("", (call,)))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out = it.get("output")
            text = out if isinstance(out, str) else _text(out, where) if isinstance(out, list) else json.dumps(out)
            msgs.append(Message.tool(_string(it.get("call_id"), f"{where}.call_id") or "", text))
        elif kind == "reasoning":
            continue  # the lane's own reasoning is not replayed
        else:
            raise bad(f"{where}: input item type {kind!r} is not supported", where, "unsupported_content")
    o = _sampling(body, "max_output_tokens")
    tools = []
    for j, t in enumerate(_array(body.get("tools"), "tools")):
        if not isinstance(t, dict):
            raise bad(f"tools[{j}] must be an object", f"tools[{j}]")
        if t.get("type") == "function":
            if not t.get("name") or not isinstance(t["name"], str):
                raise bad(f"tools[{j}] needs a name (a string)", f"tools[{j}]")
            tools.append(_tool(t, f"tools[{j}]"))
    if tools:
        o["tools"] = tuple(tools)
    tc = body.get("tool_choice")
    if tc is not None and tools:
        tc = _tool_choice_from_responses(tc)
        _check_choice(tc, "tool_choice")
        o["tool_choice"] = tc
    fmt = _obj(body["text"], "text").get("format") if body.get("text") is not None else None
    if fmt is not None and _obj(fmt, "text.format").get("type") not in (None, "text"):
        rf = fmt
        if fmt.get("type") == "json_schema":
            rf = {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
        _check_format(rf, "text.format")
        o["response_format"] = rf
    return Call(model, tuple(msgs), o, _flag(body, "stream"))


# -- errors out -----------------------------------------------------------------------------------
def from_error(e: BaseException, lane: str | None = None) -> WireError:
    """The OpenAI-style answer to a dsrs error (never the provider's secrets: errors are scrubbed).
    `lane`: the lane that failed, named in transport errors instead of the upstream's address."""
    if isinstance(e, WireError):
        return e
    if isinstance(e, errors.APIConnectionError):
        return _transport(e, lane)
    msg = str(e)
    if isinstance(e, errors.BudgetExceededError):
        no_retry = {"x-should-retry": "false"}
        if e.code == "budget_unavailable":
            return WireError(503, msg, type="server_error", code=e.code, headers=no_retry)
        return WireError(429, msg, type="insufficient_quota", code=e.code or "budget_exceeded", headers=no_retry)
    if isinstance(e, errors.RateLimitError):
        h = {"retry-after": str(max(1, round(e.retry_after)))} if e.retry_after else {}
        return WireError(429, msg, type="rate_limit_error", code="rate_limit_exceeded", headers=h)
    if isinstance(e, errors.QuotaExceededError):
        return WireError(429, msg, type="insufficient_quota", code="insufficient_quota", headers={"x-should-retry": "false"})
    if isinstance(e, errors.ContextWindowExceededError):
        return WireError(400, msg, code="context_length_exceeded", param="messages")
    if isinstance(e, (errors.ConfigurationError, errors.BadRequestError)):
        return WireError(400, msg, code=e.code or "invalid_request")
    if isinstance(e, (errors.AuthenticationError, errors.PermissionDeniedError)):
        # The upstream's credentials, not the client's: a 401 here would blame the wrong key.
        return WireError(502, msg, type="upstream_error", code="upstream_authentication")
    if isinstance(e, errors.DsrsError):
        status = 503 if type(e).__name__ == "NoLaneAvailableError" else 502
        return WireError(status, msg, type="upstream_error", code=e.code or "upstream_error")
    return WireError(500, "internal gateway error", type="server_error", code="internal_error")


_CLASS = re.compile(r"([A-Za-z_][\w.]*): ")  # transport errors' text starts with the library's error class


def _transport(e: errors.APIConnectionError, lane: str | None) -> WireError:
    """A connection failure or timeout, told as which lane failed and the error class: the error's own
    text and hint name the upstream's host and port, which stay private to the gateway."""
    m = _CLASS.match(e.message or "")
    cls = m.group(1) if m else type(e).__name__
    where = "/".join(x for x in (e.provider, e.model) if x)
    who = " ".join(x for x in (f"[{where}]" if where else "", f"lane {lane!r}" if lane else "the lane") if x)
    if isinstance(e, errors.TimeoutError):
        return WireError(504, f"{who}: no answer from its upstream within the timeout ({cls})", type="timeout",
                         code="upstream_timeout")  # fmt: skip
    return WireError(502, f"{who}: could not reach its upstream ({cls})", type="upstream_error", code="upstream_unreachable")
