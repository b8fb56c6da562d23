"""Anthropic Messages (`POST /messages`), `x-api-key` and `anthropic-version` headers.

System messages go to the top-level `system`; tool calls are `tool_use` blocks and tool results
`tool_result` blocks in the next user turn. `max_tokens` is required: it defaults to 4096.
Usage: Anthropic's `input_tokens` excludes cache reads and writes; `prompt_tokens` here is all
three, `cached_tokens` the cache reads, `cache_write_tokens` the writes (`cache_write_1h_tokens`
the part written for an hour, from `cache_creation.ephemeral_1h_input_tokens`). The protocol has
no seed and no schema-less JSON mode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .. import errors, http
from ..types import Completion, FinishReason, LmUsage, Message, Request
from . import convert
from .base import HttpBackend

VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "refusal": "content_filter", "model_context_window_exceeded": "length",
}  # fmt: skip


_THINKING = ("thinking", "redacted_thinking")


def _blocks(m: Message, provider: str) -> tuple[str, list[dict[str, Any]]]:
    if m.role == "tool":
        return "user", [{"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}]
    # thinking blocks go back unchanged (signature/data included), before the text and tool_use blocks
    blocks = convert.own_reasoning(m, provider) if m.role == "assistant" else []
    if m.parts:  # a user turn with images
        blocks += [_part(p) for p in m.parts]
    else:
        blocks += [{"type": "text", "text": m.content}] if m.content else []
    blocks += [{"type": "tool_use", "id": t.id, "name": t.name, "input": t.arguments} for t in m.tool_calls]
    return ("assistant" if m.role == "assistant" else "user"), blocks


def _part(p: dict[str, Any]) -> dict[str, Any]:
    if p["type"] == "text":
        return {"type": "text", "text": p["text"]}
    if "url" in p:
        return {"type": "image", "source": {"type": "url", "url": p["url"]}}
    return {"type": "image", "source": {"type": "base64", "media_type": p["media_type"], "data": p["data"]}}


def _messages(req: Request, provider: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in req.messages:
        if m.role == "system":
            continue
        role, blocks = _blocks(m, provider)
        if out and out[-1]["role"] == role:  # consecutive tool results share one user turn
            out[-1]["content"] += blocks
        else:
            out.append({"role": role, "content": blocks or [{"type": "text", "text": ""}]})
    for msg in out:  # a lone text block is sent as a plain string
        c = msg["content"]
        if len(c) == 1 and c[0]["type"] == "text":
            msg["content"] = c[0]["text"]
    return out


def encode(req: Request, stream: bool, provider: str) -> dict[str, Any]:
    if req.seed is not None:
        convert.refuse(provider, req.model, "seed", "drop with_seed(...) for this provider")
    body: dict[str, Any] = {
        "model": req.model,
        "max_tokens": req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS,
        "messages": _messages(req, provider),
    }
    system = convert.system_text(req.messages)
    if system is not None:
        body["system"] = system
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.stop:
        body["stop_sequences"] = list(req.stop)
    if req.tools:
        body["tools"] = [{"name": t.name, "description": t.description, "input_schema": t.parameters}
                         for t in req.tools]  # fmt: skip
    choice = convert.tool_choice(req.tool_choice)
    if choice is not None:
        mode, name = choice
        body["tool_choice"] = {"type": "tool", "name": name} if mode == "tool" else {
            "type": {"required": "any"}.get(mode, mode)}  # fmt: skip
    out = convert.output(req.response_format)
    if out is not None:
        if out.schema is None:
            convert.refuse(provider, req.model, "JSON mode without a schema",
                           "pass response_format={'type': 'json_schema', 'json_schema': {'schema': {...}}}")  # fmt: skip
        body["output_config"] = {"format": {"type": "json_schema", "schema": out.schema}}
    if stream:
        body["stream"] = True
    body.update(req.extra)
    return body


def usage(u: dict[str, Any] | None) -> LmUsage:
    if not u:
        return LmUsage(calls=1, cost_msats=None, estimated=True)
    read = u.get("cache_read_input_tokens") or 0
    write = u.get("cache_creation_input_tokens") or 0
    # cache_creation splits the writes by lifetime: 1-hour writes cost 2x input, 5-minute ones 1.25x
    cc = u.get("cache_creation")
    split: dict[str, Any] = cc if isinstance(cc, dict) else {}
    write_1h = split.get("ephemeral_1h_input_tokens") or 0
    write_5m = split.get("ephemeral_5m_input_tokens") or 0
    if not write and type(write_1h) is int and type(write_5m) is int:
        write = write_1h + write_5m
    p = (u.get("input_tokens") or 0) + write + read
    c = u.get("output_tokens") or 0
    return LmUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, cached_tokens=read,
                   cost_msats=None, calls=1, cache_write_tokens=write, cache_write_1h_tokens=write_1h)  # fmt: skip


def decode(payload: Any, provider: str, model: str) -> Completion:
    if not isinstance(payload, dict) or not isinstance(payload.get("content"), list):
        if isinstance(payload, dict) and payload.get("type") == "error":
            raise errors.from_response(502, payload, provider=provider, model=model)
        raise convert.malformed(payload, "an Anthropic message", provider, model)
    text = "".join(b.get("text") or "" for b in payload["content"] if b.get("type") == "text")
    calls = tuple(convert.tool_call(b.get("id") or "", b.get("name", ""), b.get("input"))
                  for b in payload["content"] if b.get("type") == "tool_use")  # fmt: skip
    finish = _FINISH.get(payload.get("stop_reason") or "", "unknown")
    thinking = convert.reasoning(provider, [b for b in payload["content"] if b.get("type") in _THINKING])
    return Completion(text, usage(payload.get("usage")), calls, finish, payload.get("model") or model,
                      provider, payload.get("id"), raw=payload, reasoning=thinking)  # fmt: skip


class Client(HttpBackend):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.headers = {"anthropic-version": self.opts.get("api_version") or VERSION, **self.headers}
        self._ep = self.endpoint("/messages")

    async def complete(self, req: Request) -> Completion:
        self.check(req)
        payload = await http.post_json(self._ep, encode(req, False, self.service.name))
        return http.checked(decode(payload, self.service.name, self.model))

    async def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        self.check(req)
        name, model = self.service.name, self.model
        body = encode(req, True, name)
        message: dict[str, Any] = {}
        u: dict[str, Any] = {}
        blocks: dict[int, dict[str, Any]] = {}
        parts: list[str] = []
        stop_reason = None
        async for _event, data in http.sse_events(self._ep, body):
            ev = convert.chunk(data, name, model)
            kind = ev.get("type")
            if kind == "message_start":
                message = ev.get("message") or {}
                u.update(message.get("usage") or {})
            elif kind == "content_block_start":
                block = dict(ev.get("content_block") or {})
                block["json"] = ""
                blocks[ev.get("index", len(blocks))] = block
                text = http.delta(block.get("text"), name, model) if block.get("type") == "text" else ""
                if text:
                    parts.append(text)
                    yield text
            elif kind == "content_block_delta":
                delta = ev.get("delta") or {}
                text = http.delta(delta.get("text"), name, model) if delta.get("type") == "text_delta" else ""
                if text:
                    parts.append(text)
                    yield text
                elif delta.get("type") in ("thinking_delta", "signature_delta"):
                    key = delta["type"].removesuffix("_delta")
                    block = blocks.setdefault(ev.get("index", 0), {"type": "thinking", "json": ""})
                    block[key] = (block.get(key) or "") + (delta.get(key) or "")
                elif delta.get("type") == "input_json_delta":
                    blocks.setdefault(ev.get("index", 0), {"type": "tool_use", "json": ""})["json"] += (
                        delta.get("partial_json") or "")  # fmt: skip
            elif kind == "message_delta":
                stop_reason = (ev.get("delta") or {}).get("stop_reason") or stop_reason
                u.update({k: v for k, v in (ev.get("usage") or {}).items() if v is not None})
            elif kind == "message_stop":
                calls = tuple(convert.tool_call(b.get("id") or "", b.get("name", ""), b["json"] or b.get("input"))
                              for _, b in sorted(blocks.items()) if b.get("type") == "tool_use")  # fmt: skip
                thinking = convert.reasoning(name, [{k: v for k, v in b.items() if k != "json"}
                                                    for _, b in sorted(blocks.items()) if b.get("type") in _THINKING])
                yield http.checked(Completion("".join(parts), usage(u), calls, _FINISH.get(stop_reason or "", "unknown"),
                                 message.get("model") or model, name, message.get("id"), reasoning=thinking))  # fmt: skip
                return
            elif kind == "error":
                raise errors.from_response(502, ev, provider=name, model=model)
        raise convert.stream_cut(name, model)
