"""Ollama native API: `POST /api/chat` (NDJSON stream), `GET /api/tags`.

Sampling goes in `options` (`num_ctx` from `with_num_ctx`, `num_predict`, `temperature`,
`top_p`, `seed`, `stop`); structured output is `format` (a JSON schema, or "json"). Tool calls
carry arguments as objects; tool results go back as `role: tool` with the tool's name.
Usage is `prompt_eval_count` / `eval_count`. Ollama has no `tool_choice` beyond "auto".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .. import errors, http
from ..types import Completion, FinishReason, LmUsage, Message, Request, ToolCall
from . import convert
from .base import HttpBackend
from .services import SERVICES

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


def _message(m: Message, name: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role}
    if m.content or not m.tool_calls:  # as the official client: no empty content beside tool calls
        d["content"] = m.content
    if m.parts:  # Ollama takes images as base64 beside the text, never by URL (refused in `encode`)
        d["images"] = [p["data"] for p in m.parts if p["type"] == "image"]
    if m.tool_calls:
        d["tool_calls"] = [{"function": {"name": t.name, "arguments": t.arguments}} for t in m.tool_calls]
    if m.role == "tool" and name:
        d["tool_name"] = name
    return d


def encode(req: Request, stream: bool, provider: str) -> dict[str, Any]:
    if any("url" in p for m in req.messages for p in m.parts):
        convert.refuse(provider, req.model, "images by URL", "pass the image as base64 data (a data: URL)")
    names = convert.tool_names(req.messages)
    body: dict[str, Any] = {"model": req.model, "messages": [_message(m, n) for m, n in zip(req.messages, names)],
                            "stream": stream}  # fmt: skip
    options: dict[str, Any] = {}
    for key, v in (("num_ctx", req.num_ctx), ("num_predict", req.max_tokens), ("temperature", req.temperature),
                   ("top_p", req.top_p), ("seed", req.seed), ("stop", list(req.stop) or None)):  # fmt: skip
        if v is not None:
            options[key] = v
    if options:
        body["options"] = options
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.parameters}} for t in req.tools]  # fmt: skip
    choice = convert.tool_choice(req.tool_choice)
    if choice is not None and choice[0] != "auto":
        convert.refuse(provider, req.model, f"tool_choice {req.tool_choice!r}", "use tool_choice='auto' or none")
    out = convert.output(req.response_format)
    if out is not None:
        body["format"] = out.schema if out.schema is not None else "json"
    body.update(req.extra)
    return body


def usage(final: dict[str, Any]) -> LmUsage:
    if "eval_count" not in final and "prompt_eval_count" not in final:
        return LmUsage(calls=1, cost_msats=None, estimated=True)
    p = final.get("prompt_eval_count") or 0
    c = final.get("eval_count") or 0
    return LmUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, cost_msats=None, calls=1)


def _calls(msg: dict[str, Any]) -> list[ToolCall]:
    out = []
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") or {}
        cid = tc.get("id") or convert.synthetic_id("ollama-call-")  # older servers give none
        out.append(convert.tool_call(cid, fn.get("name", ""), fn.get("arguments")))
    return out


def _finish(final: dict[str, Any], calls: list[ToolCall]) -> FinishReason:
    if calls:
        return "tool_calls"
    return _FINISH.get(final.get("done_reason") or "stop", "unknown")


class Client(HttpBackend):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._ep = self.endpoint("/api/chat")

    def _error(self, payload: dict[str, Any]) -> errors.APIError:
        return errors.from_response(502, payload, provider=self.service.name, model=self.model)

    async def complete(self, req: Request) -> Completion:
        self.check(req)
        p = await http.post_json(self._ep, encode(req, False, self.service.name))
        if not isinstance(p, dict) or not isinstance(p.get("message"), dict):
            if isinstance(p, dict) and "error" in p:
                raise self._error(p)
            raise convert.malformed(p, "an Ollama chat response", self.service.name, self.model)
        calls = _calls(p["message"])
        return http.checked(Completion(p["message"].get("content") or "", usage(p), tuple(calls), _finish(p, calls),
                          p.get("model") or self.model, self.service.name, raw=p))  # fmt: skip

    async def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        self.check(req)
        name = self.service.name
        parts: list[str] = []
        calls: list[ToolCall] = []
        async for line in http.stream_lines(self._ep, encode(req, True, name)):
            if not line.strip():
                continue
            chunk = convert.chunk(line.decode("utf-8", "replace"), name, self.model)
            if "error" in chunk:
                raise self._error(chunk)
            msg = chunk.get("message") or {}
            text = http.delta(msg.get("content"), name, self.model)
            if text:
                parts.append(text)
                yield text
            calls += _calls(msg)
            if chunk.get("done"):
                yield http.checked(Completion("".join(parts), usage(chunk), tuple(calls), _finish(chunk, calls),
                                 chunk.get("model") or self.model, name))  # fmt: skip
                return
        raise convert.stream_cut(name, self.model)

    async def list_models(self) -> list[str]:
        """Names of the models this Ollama server has pulled (`GET /api/tags`)."""
        payload = await http.get_json(self.endpoint("/api/tags"))
        try:
            return [m.get("model") or m["name"] for m in payload["models"]]
        except (KeyError, TypeError, AttributeError):
            raise convert.malformed(payload, "an /api/tags answer", self.service.name, self.model) from None


async def list_models(base_url: str | None = None, timeout: float | None = None) -> list[str]:
    """The models of the Ollama server at `base_url` (else OLLAMA_HOST, else 127.0.0.1:11434)."""
    return await Client(SERVICES["ollama"], "", {"base_url": base_url, "timeout": timeout}).list_models()
