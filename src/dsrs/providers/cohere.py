"""Cohere v2 chat (`POST /chat`), bearer key from CO_API_KEY.

Messages and tool calls look like OpenAI's (arguments as JSON text); `top_p` is `p`, stop is
`stop_sequences`; `tool_choice` is only "REQUIRED" or "NONE"; structured output is
`response_format: {type: json_object, json_schema}`. The stream is SSE with typed events
(`content-delta`, `tool-call-start`, `tool-call-delta`, `message-end`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from .. import errors, http
from ..types import Completion, FinishReason, LmUsage, Message, Request
from . import convert
from .base import HttpBackend

_FINISH: dict[str, FinishReason] = {
    "COMPLETE": "stop", "STOP_SEQUENCE": "stop", "MAX_TOKENS": "length", "TOOL_CALL": "tool_calls",
    "ERROR": "error", "TIMEOUT": "error",
}  # fmt: skip


def _message(m: Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role}
    if m.content or not m.tool_calls:
        d["content"] = m.content
    if m.tool_calls:
        d["tool_calls"] = [{"id": t.id, "type": "function",
                            "function": {"name": t.name, "arguments": json.dumps(t.arguments)}}
                           for t in m.tool_calls]  # fmt: skip
    if m.role == "tool":
        d["tool_call_id"] = m.tool_call_id
    return d


def encode(req: Request, stream: bool, provider: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": req.model, "messages": [_message(m) for m in req.messages], "stream": stream}
    for key, v in (("max_tokens", req.max_tokens), ("temperature", req.temperature), ("p", req.top_p),
                   ("seed", req.seed), ("stop_sequences", list(req.stop) or None)):  # fmt: skip
        if v is not None:
            body[key] = v
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.parameters}} for t in req.tools]  # fmt: skip
    choice = convert.tool_choice(req.tool_choice)
    if choice is not None and choice[0] != "auto":
        if choice[0] == "tool":
            convert.refuse(provider, req.model, "forcing one named tool", "use tool_choice='required'")
        body["tool_choice"] = choice[0].upper()
    out = convert.output(req.response_format)
    if out is not None:
        body["response_format"] = {"type": "json_object"}
        if out.schema is not None:
            body["response_format"]["json_schema"] = out.schema
    body.update(req.extra)
    return body


def usage(u: dict[str, Any] | None) -> LmUsage:
    """Counts from `billed_units`, what Cohere bills; `tokens` (which adds the prompt template and
    other unbilled tokens) only when a server sends no billed units."""
    if not u:
        return LmUsage(calls=1, cost_msats=None, estimated=True)
    t = u.get("billed_units") or u.get("tokens") or {}
    p = int(t.get("input_tokens") or 0)
    c = int(t.get("output_tokens") or 0)
    return LmUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                   cached_tokens=int(u.get("cached_tokens") or 0), cost_msats=None, calls=1)  # fmt: skip


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content or () if p.get("type") == "text")


def decode(payload: Any, provider: str, model: str) -> Completion:
    msg = payload.get("message") if isinstance(payload, dict) else None
    if not isinstance(msg, dict):
        raise convert.malformed(payload, "a Cohere chat response", provider, model)
    calls = tuple(convert.tool_call(tc.get("id") or "", (tc.get("function") or {}).get("name", ""),
                                    (tc.get("function") or {}).get("arguments"))
                  for tc in msg.get("tool_calls") or ())  # fmt: skip
    finish = _FINISH.get(payload.get("finish_reason") or "", "unknown")
    return Completion(_text(msg.get("content")), usage(payload.get("usage")), calls, finish, model,
                      provider, payload.get("id"), raw=payload)  # fmt: skip


class Client(HttpBackend):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._ep = self.endpoint("/chat")

    async def complete(self, req: Request) -> Completion:
        self.check(req)
        payload = await http.post_json(self._ep, encode(req, False, self.service.name))
        return http.checked(decode(payload, self.service.name, self.model))

    async def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        self.check(req)
        name, model = self.service.name, self.model
        parts: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        rid = None
        async for _event, data in http.sse_events(self._ep, encode(req, True, name)):
            if data == "[DONE]":
                break
            ev = convert.chunk(data, name, model)
            kind = ev.get("type")
            delta = (ev.get("delta") or {}).get("message") or {}
            if kind == "message-start":
                rid = ev.get("id") or rid
            elif kind == "content-delta":
                text = _text([(delta.get("content") or {}) | {"type": "text"}])
                if text:
                    parts.append(text)
                    yield text
            elif kind in ("tool-call-start", "tool-call-delta"):
                tc = delta.get("tool_calls") or {}
                slot = calls.setdefault(ev.get("index", len(calls)), {"id": "", "name": "", "arguments": ""})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["name"] = fn.get("name") or slot["name"]
                slot["arguments"] += fn.get("arguments") or ""
            elif kind == "message-end":
                end = ev.get("delta") or {}
                tool_calls = tuple(convert.tool_call(c["id"], c["name"], c["arguments"])
                                   for _, c in sorted(calls.items()))  # fmt: skip
                yield http.checked(Completion("".join(parts), usage(end.get("usage")), tool_calls,
                                 _FINISH.get(end.get("finish_reason") or "", "unknown"), model, name, rid))
                return
            elif kind == "error" or "error" in ev:
                raise errors.from_response(502, ev, provider=name, model=model)
        raise convert.stream_cut(name, model)
