"""OpenAI Responses API (`POST /responses`): codex models and `openai-responses/...`.

System messages become `instructions`; the conversation becomes `input` items (messages,
`function_call`, `function_call_output`). The protocol has no `stop` and no `seed`: asking for
them is an error before sending (a server that accepts them anyway takes them via `extra`).

Reasoning round trip (stateless): when an answer holds a `reasoning` item, every output item of
that answer is kept in `Completion.reasoning` and goes back unchanged, ids included (a reasoning
item must be followed by the very items it produced: `function_call` `fc_...`, `message` `msg_...`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from .. import errors, http
from ..types import Completion, FinishReason, LmUsage, Request, ToolCall
from . import convert
from .base import HttpBackend

_INCOMPLETE: dict[str, FinishReason] = {"max_output_tokens": "length", "content_filter": "content_filter"}


def _input(req: Request, provider: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for m in req.messages:
        if m.role == "system":
            continue
        if m.role == "tool":
            items.append({"type": "function_call_output", "call_id": m.tool_call_id, "output": m.content})
            continue
        # the answer's own output items (reasoning and what follows it) go back unchanged, ids included
        own = convert.own_reasoning(m, provider) if m.role == "assistant" else []
        items += own
        sent_calls = {i.get("call_id") for i in own if i.get("type") == "function_call"}
        if m.parts:  # a user turn with images
            items.append({"role": m.role, "content": [
                {"type": "input_text", "text": p["text"]} if p["type"] == "text" else
                {"type": "input_image", "image_url": convert.image_url(p), "detail": p.get("detail") or "auto"}
                for p in m.parts]})  # fmt: skip
        elif (m.content or not m.tool_calls) and not any(i.get("type") == "message" for i in own):
            items.append({"role": m.role, "content": m.content})
        for t in m.tool_calls:
            if t.id not in sent_calls:
                items.append({"type": "function_call", "call_id": t.id, "name": t.name,
                              "arguments": json.dumps(t.arguments)})  # fmt: skip
    return items


def encode(req: Request, stream: bool, provider: str) -> dict[str, Any]:
    if req.stop:
        convert.refuse(provider, req.model, "stop sequences",
                       "lower max_tokens, or pass extra={'stop': [...]} to a server that accepts it")  # fmt: skip
    if req.seed is not None:
        convert.refuse(provider, req.model, "seed", "drop with_seed(...) for this provider")
    body: dict[str, Any] = {"model": req.model, "input": _input(req, provider)}
    instructions = convert.system_text(req.messages)
    if instructions is not None:
        body["instructions"] = instructions
    if req.max_tokens is not None:
        body["max_output_tokens"] = req.max_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.tools:
        # `strict` defaults to true here (unlike Chat Completions), which rejects most plain JSON Schemas
        body["tools"] = [{"type": "function", "name": t.name, "description": t.description,
                          "parameters": t.parameters, "strict": False} for t in req.tools]  # fmt: skip
    choice = convert.tool_choice(req.tool_choice)
    if choice is not None:
        mode, name = choice
        body["tool_choice"] = {"type": "function", "name": name} if mode == "tool" else mode
    out = convert.output(req.response_format)
    if out is not None:
        fmt: dict[str, Any] = {"type": "json_object"}
        if out.schema is not None:
            fmt = {"type": "json_schema", "name": out.name, "schema": out.schema}
            if out.strict is not None:
                fmt["strict"] = out.strict
        body["text"] = {"format": fmt}
    if stream:
        body["stream"] = True
    body.update(req.extra)
    return body


def usage(u: dict[str, Any] | None) -> LmUsage:
    if not u:
        return LmUsage(calls=1, cost_msats=None, estimated=True)
    p = u.get("input_tokens") or 0
    c = u.get("output_tokens") or 0
    return LmUsage(
        prompt_tokens=p,
        completion_tokens=c,
        total_tokens=u.get("total_tokens") or p + c,
        cached_tokens=(u.get("input_tokens_details") or {}).get("cached_tokens") or 0,
        reasoning_tokens=(u.get("output_tokens_details") or {}).get("reasoning_tokens") or 0,
        cost_msats=None,
        calls=1,
    )


def _failed(resp: dict[str, Any], provider: str, model: str) -> errors.APIError:
    err = resp.get("error") or {"code": "server_error", "message": "the response failed"}
    return errors.from_response(502, {"error": err}, provider=provider, model=model)


def _calls(output: list[dict[str, Any]]) -> tuple[ToolCall, ...]:
    return tuple(convert.tool_call(i.get("call_id") or i.get("id") or "", i.get("name", ""), i.get("arguments"))
                 for i in output if i.get("type") == "function_call")  # fmt: skip


def _reasoning(output: list[dict[str, Any]], provider: str) -> tuple[dict[str, Any], ...]:
    """All output items when one is a reasoning item (they go back together, see the module doc)."""
    if not any(isinstance(i, dict) and i.get("type") == "reasoning" for i in output):
        return ()
    return convert.reasoning(provider, [i for i in output if isinstance(i, dict)])


def _finish(resp: dict[str, Any], calls: tuple[ToolCall, ...], refused: bool) -> FinishReason:
    if resp.get("status") == "incomplete":
        return _INCOMPLETE.get((resp.get("incomplete_details") or {}).get("reason") or "", "unknown")
    if refused:
        return "content_filter"
    return "tool_calls" if calls else "stop"


def decode(resp: Any, provider: str, model: str) -> Completion:
    if not isinstance(resp, dict) or not isinstance(resp.get("output"), list):
        if isinstance(resp, dict) and resp.get("error"):
            raise _failed(resp, provider, model)
        raise convert.malformed(resp, "a Responses API response", provider, model)
    if resp.get("status") == "failed":
        raise _failed(resp, provider, model)
    text, refused = [], False
    for item in resp["output"]:
        if item.get("type") == "message":
            for part in item.get("content") or ():
                if part.get("type") == "output_text":
                    text.append(part.get("text") or "")
                elif part.get("type") == "refusal":
                    refused = True
    calls = _calls(resp["output"])
    return Completion("".join(text), usage(resp.get("usage")), calls, _finish(resp, calls, refused),
                      resp.get("model") or model, provider, resp.get("id"), raw=resp,
                      reasoning=_reasoning(resp["output"], provider))  # fmt: skip


class Client(HttpBackend):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._ep = self.endpoint("/responses")

    async def complete(self, req: Request) -> Completion:
        self.check(req)
        payload = await http.post_json(self._ep, encode(req, False, self.service.name))
        return http.checked(decode(payload, self.service.name, self.model))

    async def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        self.check(req)
        name, model = self.service.name, self.model
        body = encode(req, True, name)
        parts: list[str] = []
        items: list[dict[str, Any]] = []
        async for _event, data in http.sse_events(self._ep, body):
            if data == "[DONE]":
                break
            ev = convert.chunk(data, name, model)
            kind = ev.get("type")
            if kind == "response.output_text.delta":
                delta = http.delta(ev.get("delta"), name, model)
                if delta:
                    parts.append(delta)
                    yield delta
            elif kind == "response.output_item.done":
                items.append(ev.get("item") or {})
            elif kind in ("response.completed", "response.incomplete"):
                resp = ev.get("response") or {}
                calls = _calls(items) or _calls(resp.get("output") or [])
                refused = any(p.get("type") == "refusal" for i in items for p in i.get("content") or ())
                thinking = _reasoning(items, name) or _reasoning(resp.get("output") or [], name)
                yield http.checked(Completion("".join(parts), usage(resp.get("usage")), calls,
                                 _finish(resp, calls, refused), resp.get("model") or model, name,
                                 resp.get("id"), raw=resp, reasoning=thinking))  # fmt: skip
                return
            elif kind == "response.failed":
                raise _failed(ev.get("response") or {}, name, model)
            elif kind == "error":
                raise errors.from_response(502, {"error": ev}, provider=name, model=model)
        raise convert.stream_cut(name, model)
