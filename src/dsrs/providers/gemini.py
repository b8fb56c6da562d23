"""Gemini `generateContent` / `streamGenerateContent?alt=sse`, key in `x-goog-api-key`.

Roles are `user` and `model`; system messages go to `systemInstruction`; tools are
`functionDeclarations` (JSON Schema via `parametersJsonSchema`), calls come back as
`functionCall` parts and results go back as `functionResponse` parts (matched by name, and by id
when Gemini gave one). Structured output is `responseMimeType` + `responseJsonSchema`.
A prompt or answer blocked for safety raises `SafetyBlockedError`. Thought parts are not text;
`thoughtsTokenCount` counts as completion (and reasoning) tokens.

Thought signatures (Gemini 2.5/3): a `thoughtSignature` on a part must go back in that same part
next turn (Gemini 3 refuses a function-calling turn without it). They ride in
`Completion.reasoning` as {"thoughtSignature": ..., "call": <our call id>} for a `functionCall`
part, or {"thoughtSignature": ...} for a text part, and are put back where they came from.
Call ids Gemini did not give are made up (unique, never sent back).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from .. import errors, http
from ..types import Completion, FinishReason, LmUsage, Message, Request, ToolCall
from . import convert
from .base import HttpBackend

_SYNTH = "gemini-call-"  # prefix of call ids we made up (Gemini gave none): never sent back
_FINISH: dict[str, FinishReason] = {"STOP": "stop", "MAX_TOKENS": "length"}
_BLOCKED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "LANGUAGE"}


def _result(content: str) -> dict[str, Any]:
    try:
        v = json.loads(content)
    except ValueError:
        return {"result": content}
    return v if isinstance(v, dict) else {"result": v}


def _parts(m: Message, name: str | None, provider: str) -> list[dict[str, Any]]:
    if m.role == "tool":
        if not name:
            raise errors.ConfigurationError(
                f"Gemini needs the tool name of the result for call {m.tool_call_id!r}",
                hint="send the assistant message holding that tool call before its result, or set Message.name",
            )
        fr: dict[str, Any] = {"name": name, "response": _result(m.content)}
        if m.tool_call_id and not m.tool_call_id.startswith(_SYNTH):
            fr["id"] = m.tool_call_id
        return [{"functionResponse": fr}]
    if m.parts:  # a user turn with images: inline base64, or a file by URI
        return [{"text": p["text"]} if p["type"] == "text" else
                {"inlineData": {"mimeType": p["media_type"], "data": p["data"]}} if "data" in p else
                {"fileData": {"fileUri": p["url"], **({"mimeType": p["media_type"]} if "media_type" in p else {})}}
                for p in m.parts]  # fmt: skip
    sigs = convert.own_reasoning(m, provider) if m.role == "assistant" else []
    by_call = {b.get("call"): b["thoughtSignature"] for b in sigs if b.get("thoughtSignature")}
    text_sig = by_call.pop(None, None)
    parts: list[dict[str, Any]] = [{"text": m.content}] if m.content or not m.tool_calls or text_sig else []
    if text_sig:
        parts[0]["thoughtSignature"] = text_sig
    for t in m.tool_calls:
        fc: dict[str, Any] = {"name": t.name, "args": t.arguments}
        if t.id and not t.id.startswith(_SYNTH):
            fc["id"] = t.id
        part: dict[str, Any] = {"functionCall": fc}
        if t.id in by_call:
            part["thoughtSignature"] = by_call[t.id]
        parts.append(part)
    return parts


def _contents(req: Request, provider: str) -> list[dict[str, Any]]:
    names = convert.tool_names(req.messages)
    out: list[dict[str, Any]] = []
    prev = None
    for m, name in zip(req.messages, names):
        if m.role == "system":
            continue
        parts = _parts(m, name, provider)
        if m.role == "tool" and prev == "tool":  # results of parallel calls share one turn
            out[-1]["parts"] += parts
        else:
            out.append({"role": "model" if m.role == "assistant" else "user", "parts": parts})
        prev = m.role
    return out


def encode(req: Request, provider: str = "gemini") -> dict[str, Any]:
    body: dict[str, Any] = {"contents": _contents(req, provider)}
    system = convert.system_text(req.messages)
    if system is not None:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    cfg: dict[str, Any] = {}
    for key, v in (("maxOutputTokens", req.max_tokens), ("temperature", req.temperature), ("topP", req.top_p),
                   ("seed", req.seed), ("stopSequences", list(req.stop) or None)):  # fmt: skip
        if v is not None:
            cfg[key] = v
    out = convert.output(req.response_format)
    if out is not None:
        cfg["responseMimeType"] = "application/json"
        if out.schema is not None:
            cfg["responseJsonSchema"] = out.schema
    if cfg:
        body["generationConfig"] = cfg
    if req.tools:
        body["tools"] = [{"functionDeclarations": [
            {"name": t.name, "description": t.description, "parametersJsonSchema": t.parameters} for t in req.tools]}]
    choice = convert.tool_choice(req.tool_choice)
    if choice is not None:
        mode, name = choice
        fcc: dict[str, Any] = {"mode": {"auto": "AUTO", "none": "NONE"}.get(mode, "ANY")}
        if name:
            fcc["allowedFunctionNames"] = [name]
        body["toolConfig"] = {"functionCallingConfig": fcc}
    body.update(req.extra)
    return body


def usage(u: dict[str, Any] | None) -> LmUsage:
    if not u:
        return LmUsage(calls=1, cost_msats=None, estimated=True)
    p = u.get("promptTokenCount") or 0
    thoughts = u.get("thoughtsTokenCount") or 0
    c = (u.get("candidatesTokenCount") or 0) + thoughts
    return LmUsage(prompt_tokens=p, completion_tokens=c, total_tokens=u.get("totalTokenCount") or p + c,
                   cached_tokens=u.get("cachedContentTokenCount") or 0, reasoning_tokens=thoughts,
                   cost_msats=None, calls=1)  # fmt: skip


def _blocked(reason: str, provider: str, model: str, where: str) -> errors.SafetyBlockedError:
    return errors.SafetyBlockedError(f"Gemini blocked the {where} ({reason})", provider=provider, model=model,
                                     code=reason, hint="rephrase the prompt or adjust safetySettings via extra")  # fmt: skip


class _Acc:
    """Accumulates one or many GenerateContentResponse chunks."""

    def __init__(self, provider: str, model: str) -> None:
        self.provider, self.model = provider, model
        self.text: list[str] = []
        self.calls: list[ToolCall] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model_version: str | None = None
        self.id: str | None = None
        self.signatures: list[dict[str, Any]] = []  # thoughtSignature blocks, see the module doc

    def add(self, chunk: Any) -> str:
        """Take one chunk; return its new text."""
        if not isinstance(chunk, dict):
            raise convert.malformed(chunk, "a Gemini response", self.provider, self.model)
        if "error" in chunk:
            raise errors.from_response(502, chunk, provider=self.provider, model=self.model)
        block = (chunk.get("promptFeedback") or {}).get("blockReason")
        if block:
            raise _blocked(block, self.provider, self.model, "prompt")
        self.usage = chunk.get("usageMetadata") or self.usage
        self.model_version = chunk.get("modelVersion") or self.model_version
        self.id = chunk.get("responseId") or self.id
        cands = chunk.get("candidates") or []
        if not cands:
            return ""
        cand = cands[0]
        new = []
        for part in (cand.get("content") or {}).get("parts") or ():
            sig = part.get("thoughtSignature")
            if "functionCall" in part:
                fc = part["functionCall"]
                cid = fc.get("id") or convert.synthetic_id(_SYNTH)
                self.calls.append(convert.tool_call(cid, fc.get("name", ""), fc.get("args") or {}))
                if sig:
                    self.signatures.append({"thoughtSignature": sig, "call": cid})
                continue
            if sig:  # on a text (or empty) part: one per answer, the last one wins
                self.signatures = [b for b in self.signatures if "call" in b] + [{"thoughtSignature": sig}]
            if "text" in part and not part.get("thought"):
                new.append(http.delta(part["text"], self.provider, self.model))
        self.text += new
        if cand.get("finishReason"):
            self.finish = cand["finishReason"]
        return "".join(new)

    def completion(self, raw: Any = None) -> Completion:
        if self.finish in _BLOCKED and not self.text and not self.calls:
            raise _blocked(self.finish, self.provider, self.model, "answer")
        finish: FinishReason
        if self.finish in _BLOCKED:
            finish = "content_filter"
        elif self.calls:
            finish = "tool_calls"
        else:
            finish = _FINISH.get(self.finish or "", "unknown")
        return Completion("".join(self.text), usage(self.usage), tuple(self.calls), finish,
                          self.model_version or self.model, self.provider, self.id, raw=raw,
                          reasoning=convert.reasoning(self.provider, self.signatures))  # fmt: skip


class Client(HttpBackend):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        path = self.model if self.model.startswith("models/") else f"models/{self.model}"
        self._ep = self.endpoint(f"/{path}:generateContent")
        self._sse = self.endpoint(f"/{path}:streamGenerateContent?alt=sse")

    async def complete(self, req: Request) -> Completion:
        self.check(req)
        payload = await http.post_json(self._ep, encode(req, self.service.name))
        acc = _Acc(self.service.name, self.model)
        acc.add(payload)
        if acc.finish is None and not acc.text and not acc.calls:
            raise convert.malformed(payload, "a Gemini response", self.service.name, self.model)
        return http.checked(acc.completion(payload))

    async def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        self.check(req)
        acc = _Acc(self.service.name, self.model)
        async for _event, data in http.sse_events(self._sse, encode(req, self.service.name)):
            text = acc.add(convert.chunk(data, self.service.name, self.model))
            if text:
                yield text
        if acc.finish is None:
            raise convert.stream_cut(self.service.name, self.model)
        yield http.checked(acc.completion())
