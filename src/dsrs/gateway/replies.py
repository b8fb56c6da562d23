"""The OpenAI wire, server side, outgoing: a `Completion` becomes OpenAI-shaped JSON, a stream of
deltas and a `StreamEnd` becomes Chat Completions chunks or Responses events (for SSE), each with
the gateway's `dsrs` extra (lane, provider, cost, cache); parsing requests and mapping errors to
the client is `requests`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..types import Completion, LmUsage, ToolCall
from .requests import WireError


# -- out: shared ----------------------------------------------------------------------------------
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def dsrs_extra(c: Completion, lane: str | None) -> dict[str, Any]:
    """What the gateway adds beside OpenAI's fields: cost, cache, lane."""
    u = c.usage
    return {"lane": lane, "provider": c.provider, "cost_msats": u.cost_msats,
            "cost_source": getattr(u.cost_source, "value", u.cost_source), "cache_hit": u.cache_hit}  # fmt: skip


def _args(t: ToolCall) -> str:
    return t.raw_arguments if t.raw_arguments is not None else json.dumps(t.arguments)


# -- Chat Completions out -------------------------------------------------------------------------
def chat_usage(u: LmUsage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}  # fmt: skip


def _chat_calls(c: Completion, indexed: bool) -> list[dict[str, Any]]:
    return [{**({"index": i} if indexed else {}), "id": t.id or new_id("call_"), "type": "function",
             "function": {"name": t.name, "arguments": _args(t)}} for i, t in enumerate(c.tool_calls)]  # fmt: skip


def chat_completion(c: Completion, model: str, rid: str, lane: str | None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
    if c.tool_calls:
        msg["tool_calls"] = _chat_calls(c, False)
        msg["content"] = c.text or None
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": msg, "finish_reason": _FINISH.get(c.finish_reason, "stop"),
                     "logprobs": None}],
        "usage": chat_usage(c.usage), "system_fingerprint": None, "dsrs": dsrs_extra(c, lane),
    }  # fmt: skip


class ChatStream:
    """The chunks of one streamed chat completion."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.rid, self.model, self.include_usage = new_id("chatcmpl-"), model, include_usage
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, text: str) -> list[dict[str, Any]]:
        return [self._chunk({"content": text})]

    def end(self, c: Completion, lane: str | None) -> list[dict[str, Any]]:
        out = []
        if c.tool_calls:
            out.append(self._chunk({"tool_calls": _chat_calls(c, True)}))
        last = self._chunk({}, _FINISH.get(c.finish_reason, "stop"))
        if not self.include_usage:
            last["dsrs"] = dsrs_extra(c, lane)
        out.append(last)
        if self.include_usage:
            out.append({"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": chat_usage(c.usage),
                        "dsrs": dsrs_extra(c, lane)})  # fmt: skip
        return out


# -- Responses out --------------------------------------------------------------------------------
def responses_usage(u: LmUsage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens}  # fmt: skip


def _message_item(mid: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": content}


def _call_items(c: Completion) -> list[dict[str, Any]]:
    return [{"type": "function_call", "id": new_id("fc_"), "call_id": t.id or new_id("call_"), "name": t.name,
             "arguments": _args(t), "status": "completed"} for t in c.tool_calls]  # fmt: skip


def response_object(rid: str, model: str, created: int, status: str, output: list[dict[str, Any]],
                    c: Completion | None, lane: str | None) -> dict[str, Any]:  # fmt: skip
    incomplete = None
    if c is not None and c.finish_reason in ("length", "content_filter"):
        status = "incomplete"
        incomplete = {"reason": "max_output_tokens" if c.finish_reason == "length" else "content_filter"}
    d: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "error": None, "incomplete_details": incomplete, "instructions": None,
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "metadata": {},
        "usage": responses_usage(c.usage) if c is not None else None,
    }  # fmt: skip
    if c is not None:
        d["dsrs"] = dsrs_extra(c, lane)
    return d


def response(c: Completion, model: str, lane: str | None) -> dict[str, Any]:
    output = []
    if c.text or not c.tool_calls:
        output.append(_message_item(new_id("msg_"), c.text))
    output += _call_items(c)
    return response_object(new_id("resp_"), model, int(time.time()), "completed", output, c, lane)


class ResponsesStream:
    """The events of one streamed response (each a dict with its `type` and `sequence_number`)."""

    def __init__(self, model: str) -> None:
        self.rid, self.model, self.created = new_id("resp_"), model, int(time.time())
        self.seq = 0
        self.mid: str | None = None  # the message item, opened on the first text
        self.text: list[str] = []

    def _ev(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def start(self) -> list[dict[str, Any]]:
        r = response_object(self.rid, self.model, self.created, "in_progress", [], None, None)
        return [self._ev("response.created", response=r), self._ev("response.in_progress", response=r)]

    def _open(self) -> list[dict[str, Any]]:
        self.mid = new_id("msg_")
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._ev("response.output_item.added", output_index=0, item=_message_item(self.mid, "", "in_progress")),
            self._ev("response.content_part.added", item_id=self.mid, output_index=0, content_index=0, part=part),
        ]

    def delta(self, text: str) -> list[dict[str, Any]]:
        out = self._open() if self.mid is None else []
        self.text.append(text)
        out.append(self._ev("response.output_text.delta", item_id=self.mid, output_index=0, content_index=0,
                            delta=text, logprobs=[]))  # fmt: skip
        return out

    def end(self, c: Completion, lane: str | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        items: list[dict[str, Any]] = []
        if self.mid is None and (c.text or not c.tool_calls):
            out += self._open()
            if c.text:
                out.append(self._ev("response.output_text.delta", item_id=self.mid, output_index=0,
                                    content_index=0, delta=c.text, logprobs=[]))  # fmt: skip
        if self.mid is not None:
            text = "".join(self.text) or c.text
            item = _message_item(self.mid, text)
            out += [
                self._ev("response.output_text.done", item_id=self.mid, output_index=0, content_index=0, text=text,
                         logprobs=[]),
                self._ev("response.content_part.done", item_id=self.mid, output_index=0, content_index=0,
                         part=item["content"][0]),
                self._ev("response.output_item.done", output_index=0, item=item),
            ]  # fmt: skip
            items.append(item)
        for item in _call_items(c):
            i = len(items)
            out += [self._ev("response.output_item.added", output_index=i, item={**item, "status": "in_progress"}),
                    self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                             arguments=item["arguments"]),
                    self._ev("response.output_item.done", output_index=i, item=item)]  # fmt: skip
            items.append(item)
        r = response_object(self.rid, self.model, self.created, "completed", items, c, lane)
        # Always `response.completed` (status inside may say "incomplete"): the Codex CLI and the SDK's
        # stream helper treat a stream without it as cut.
        out.append(self._ev("response.completed", response=r))
        return out

    def failed(self, err: WireError) -> dict[str, Any]:
        r = response_object(self.rid, self.model, self.created, "failed", [], None, None)
        r["error"] = {"code": err.code or err.type, "message": err.message}
        return self._ev("response.failed", response=r)
