"""OpenAI Chat Completions (`POST /chat/completions`), spoken by OpenAI and every compatible service."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

from .. import errors, http
from ..types import Completion, FinishReason, LmUsage, Message, Request, ToolCall
from . import convert
from .base import HttpBackend

_FINISH: dict[str, FinishReason] = {
    "stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls",
    "content_filter": "content_filter",
}  # fmt: skip


def _content_part(p: dict[str, Any]) -> dict[str, Any]:
    if p["type"] == "text":
        return {"type": "text", "text": p["text"]}
    url = {"url": convert.image_url(p), **({"detail": p["detail"]} if p.get("detail") else {})}
    return {"type": "image_url", "image_url": url}


def encode_message(m: Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role, "content": [_content_part(p) for p in m.parts] if m.parts else m.content}
    if m.tool_calls:
        d["tool_calls"] = [
            {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": json.dumps(t.arguments)}}
            for t in m.tool_calls
        ]
        if not m.content:
            d["content"] = None
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        d["name"] = m.name
    return d


def encode(req: Request, quirks: frozenset[str], stream: bool, stream_usage: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": req.model, "messages": [encode_message(m) for m in req.messages]}
    if req.max_tokens is not None:
        body["max_completion_tokens" if "max_completion_tokens" in quirks else "max_tokens"] = req.max_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.seed is not None:
        body["random_seed" if "random_seed" in quirks else "seed"] = req.seed
    if req.stop:
        body["stop"] = list(req.stop)
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in req.tools
        ]
    if req.tool_choice is not None:
        body["tool_choice"] = convert.normal_tool_choice(req.tool_choice)
    if req.response_format is not None:
        body["response_format"] = req.response_format
    if stream:
        body["stream"] = True
        if stream_usage:
            body["stream_options"] = {"include_usage": True}
    if req.extra:
        body.update(req.extra)
    return body


def _tool_call(tc: dict[str, Any]) -> ToolCall:
    fn = tc.get("function") or {}
    return convert.tool_call(tc.get("id") or "", fn.get("name", ""), fn.get("arguments"))


def usage(u: dict[str, Any] | None) -> LmUsage:
    """OpenAI counts reasoning inside `completion_tokens`; xAI (and servers in front of Grok) count
    it apart, with `total_tokens` = prompt + completion + reasoning. Both bill it as output, so
    `completion_tokens` here always includes it: the total tells which convention the server used."""
    if not u:
        return LmUsage(calls=1, cost_msats=None, estimated=True)
    p = u.get("prompt_tokens") or 0
    c = u.get("completion_tokens") or 0
    pd = u.get("prompt_tokens_details") or {}
    cd = u.get("completion_tokens_details") or {}
    r = (cd.get("reasoning_tokens") if isinstance(cd, dict) else None) or 0
    total = u.get("total_tokens")
    if r and type(r) is type(p) is type(c) is int and total == p + c + r:  # reasoning reported apart
        c += r
    return LmUsage(
        prompt_tokens=p,
        completion_tokens=c,
        total_tokens=total or p + c,
        cached_tokens=(pd.get("cached_tokens") if isinstance(pd, dict) else None) or 0,
        reasoning_tokens=r,
        cost_msats=None,
        calls=1,
    )


def decode(payload: Any, provider: str, model: str) -> Completion:
    try:
        choice = payload["choices"][0]
        msg = choice.get("message") or {}
        text = msg.get("content") or ""
        if isinstance(text, list):
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        tcs = msg.get("tool_calls")
        calls = tuple(_tool_call(tc) for tc in tcs) if tcs else ()  # no generator for the usual no-tools answer
        finish = _FINISH.get(choice.get("finish_reason") or "", "unknown")
    except (KeyError, IndexError, TypeError, AttributeError):
        if isinstance(payload, dict) and "error" in payload:  # some servers send errors with 200
            raise errors.from_response(502, payload, provider=provider, model=model) from None
        raise errors.ResponseFormatError(
            f"not a chat completion: {str(payload)[:120]}", provider=provider, model=model
        ) from None
    return Completion(text, usage(payload.get("usage")), calls, finish, payload.get("model") or model, provider,
                      payload.get("id"), raw=payload)  # fmt: skip


class Client(HttpBackend):
    def _path(self) -> str:
        if "azure" in self.service.quirks:
            version = self.opts.get("api_version") or os.environ.get("OPENAI_API_VERSION") or "2024-10-21"
            return f"/openai/deployments/{self.model}/chat/completions?api-version={version}"
        return "/chat/completions"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._ep = self.endpoint(self._path())

    async def complete(self, req: Request) -> Completion:
        self.check(req)
        payload = await http.post_json(self._ep, encode(req, self.service.quirks, False))
        return http.checked(decode(payload, self.service.name, self.model))

    async def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        self.check(req)
        body = encode(req, self.service.quirks, True, self.service.stream_usage)
        parts: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish: FinishReason = "unknown"
        u: dict[str, Any] | None = None
        rid = None
        model = self.model
        done = False
        async for _event, data in http.sse_events(self._ep, body):
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = http.loads(data)
            except ValueError:
                raise errors.ResponseFormatError(
                    f"bad stream chunk: {data[:80]!r}", provider=self.service.name, model=self.model
                ) from None
            if "error" in chunk:
                raise errors.from_response(502, chunk, provider=self.service.name, model=self.model)
            rid = chunk.get("id") or rid
            model = chunk.get("model") or model
            if chunk.get("usage"):
                u = chunk["usage"]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                text = http.delta(delta.get("content"), self.service.name, self.model)
                if text:
                    parts.append(text)
                    yield text
                for tc in delta.get("tool_calls") or ():
                    slot = calls.setdefault(tc.get("index", 0), {"id": "", "function": {"name": "", "arguments": ""}})
                    if tc.get("id"):
                        slot["id"] = tc["id"]
                    fn = tc.get("function") or {}
                    slot["function"]["name"] += fn.get("name") or ""
                    slot["function"]["arguments"] += fn.get("arguments") or ""
                if choice.get("finish_reason"):
                    finish = _FINISH.get(choice["finish_reason"], "unknown")
        if not done and finish == "unknown":
            raise errors.ResponseFormatError(
                "the stream ended before it finished", provider=self.service.name, model=self.model
            )
        tool_calls = tuple(_tool_call(calls[i]) for i in sorted(calls))
        yield http.checked(Completion("".join(parts), usage(u), tool_calls, finish, model, self.service.name, rid))
