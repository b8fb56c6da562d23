"""A local OpenAI Responses-API server, scripted per test, for driving the real Codex CLI.

The Codex CLI speaks only the Responses API (`POST {base_url}/responses`, `stream: true`, SSE).
Each request pops the next scripted `Turn` and is answered with the documented streaming events:
`response.created`, then `response.output_item.added` / `response.output_item.done` per output
item, then `response.completed` (with usage) or `response.failed`. A turn can also stall (never
answer) or wait until several requests are in flight (proof that calls ran at once).

Built on the shared `ScriptedServer` (thread, loop, request log); only the handler differs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from scripted import ScriptedServer, Seen

_ids = itertools.count(1)


def message(text: str) -> dict[str, Any]:
    """An assistant message output item (codex: an `agent_message`)."""
    return {"type": "message", "id": f"msg_{next(_ids)}", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip


def exec_command(cmd: str) -> dict[str, Any]:
    """A call of codex's shell tool (codex: a `command_execution`)."""
    return {"type": "function_call", "id": f"fc_{next(_ids)}", "call_id": f"call_{next(_ids)}",
            "name": "exec_command", "arguments": json.dumps({"cmd": cmd}), "status": "completed"}  # fmt: skip


def apply_patch(patch: str) -> dict[str, Any]:
    """A call of codex's freeform `apply_patch` tool (codex: a `file_change`)."""
    return {"type": "custom_tool_call", "id": f"ctc_{next(_ids)}", "call_id": f"call_{next(_ids)}",
            "name": "apply_patch", "input": patch, "status": "completed"}  # fmt: skip


def reasoning(summary: str) -> dict[str, Any]:
    """A reasoning item with a summary (codex: a `reasoning` item)."""
    return {"type": "reasoning", "id": f"rs_{next(_ids)}", "summary": [{"type": "summary_text", "text": summary}]}


@dataclass
class Turn:
    """One answer to one `POST /responses`."""

    items: list[dict[str, Any]] = field(default_factory=list)
    input_tokens: int = 10
    output_tokens: int = 2
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    fail: str | None = None  # message of a `response.failed`
    fail_code: str = "server_error"
    stall: bool = False  # never answer (until the client goes away)
    wait_for: int = 0  # hold the answer until this many requests have arrived

    def events(self, rid: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"type": "response.created", "response": {"id": rid, "status": "in_progress"}}]
        if self.fail is not None:
            error = {"code": self.fail_code, "message": self.fail}
            return out + [{"type": "response.failed", "response": {"id": rid, "status": "failed", "error": error}}]
        for i, item in enumerate(self.items):
            out.append({"type": "response.output_item.added", "output_index": i, "item": item})
            out.append({"type": "response.output_item.done", "output_index": i, "item": item})
        usage = {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.input_tokens + self.output_tokens,
        }
        done = {"id": rid, "status": "completed", "output": self.items, "usage": usage}
        return out + [{"type": "response.completed", "response": done}]


def text(reply: str, **kw: Any) -> Turn:
    return Turn([message(reply)], **kw)


class ResponsesServer(ScriptedServer):
    """`turns(...)` scripts the answers of the next requests; `requests` logs what came in."""

    def __init__(self) -> None:
        self.turn_queue: deque[Turn] = deque()
        super().__init__()

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def turns(self, *turns: Turn) -> ResponsesServer:
        self.turn_queue.clear()
        self.turn_queue.extend(turns)
        self.requests.clear()
        return self

    def responses(self) -> list[Any]:
        """The JSON bodies of the `POST /v1/responses` received so far."""
        return [r.json for r in self.requests if r.path == "/v1/responses"]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Seen(request.method, request.path, dict(request.query), headers, body, raw))
        if request.method != "POST" or request.path != "/v1/responses":
            return web.json_response({"error": {"message": "not found", "type": "invalid_request_error"}}, status=404)
        if not self.turn_queue:
            return web.json_response({"error": {"message": "no turn scripted", "type": "test_error"}}, status=500)
        turn = self.turn_queue.popleft()
        while len(self.responses()) < turn.wait_for:
            await asyncio.sleep(0.01)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if turn.stall:
            await asyncio.Event().wait()  # cancelled when the client disconnects
        for ev in turn.events(f"resp_{next(_ids)}"):
            await resp.write(f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode())
        await resp.write_eof()
        return resp
