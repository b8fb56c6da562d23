"""A local HTTP server scripted per test: it answers with the replies a test queues, in order,
and records every request it gets (method, path, query, headers, JSON body).

Runs in its own thread with its own event loop, on 127.0.0.1, so sync and async tests can use it.
Replies can be JSON, raw bytes (malformed), SSE/NDJSON streams (optionally cut mid-way), stalls,
or a dropped connection.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    body: bytes | None = None  # raw body (for malformed answers)
    headers: dict[str, str] = field(default_factory=dict)
    sse: list[Any] | None = None  # each item: a dict (sent as `data: {json}`), a str (sent as is), or (event, dict)
    ndjson: list[Any] | None = None
    cut: bool = False  # drop the connection after the stream items instead of finishing
    delay: float = 0.0  # seconds before answering (a stall when large)
    drop: bool = False  # close the connection without any answer
    chunk_delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    raw: bytes


class ScriptedServer:
    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.default: Reply | None = None
        self.requests: list[Seen] = []
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="scripted-server")
        self._thread.start()
        self._started.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *replies: Reply, default: Reply | None = None) -> ScriptedServer:
        self.replies.clear()
        self.replies.extend(replies)
        self.default = default
        self.requests.clear()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._started.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(
            Seen(request.method, request.path, dict(request.query), {k.lower(): v for k, v in request.headers.items()},
                 body, raw)  # fmt: skip
        )
        reply = self.replies.popleft() if self.replies else self.default
        return await self.answer(request, reply)

    async def answer(self, request: web.Request, reply: Reply | None) -> web.StreamResponse:
        """Send `reply` (None: a 599 saying nothing was scripted)."""
        if reply is None:
            return web.json_response({"error": {"message": "no reply scripted", "type": "test_error"}}, status=599)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if reply.sse is not None or reply.ndjson is not None:
            ctype = "text/event-stream" if reply.sse is not None else "application/x-ndjson"
            resp = web.StreamResponse(status=reply.status, headers={"Content-Type": ctype, **reply.headers})
            await resp.prepare(request)
            for item in reply.sse if reply.sse is not None else reply.ndjson:  # type: ignore[union-attr]
                if reply.sse is not None:
                    if isinstance(item, tuple):
                        data = f"event: {item[0]}\ndata: {json.dumps(item[1])}\n\n"
                    elif isinstance(item, str):
                        data = item if item.endswith("\n\n") else f"data: {item}\n\n"
                    else:
                        data = f"data: {json.dumps(item)}\n\n"
                else:
                    data = json.dumps(item) + "\n"
                await resp.write(data.encode())
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
            if reply.cut:
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write_eof()
            return resp
        if reply.body is not None:
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        return web.json_response(reply.json if reply.json is not None else {}, status=reply.status,
                                 headers=reply.headers)  # fmt: skip

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def chat_reply(text: str = "hi", prompt_tokens: int = 5, completion_tokens: int = 2, **extra: Any) -> Reply:
    """A standard OpenAI chat completion body."""
    return Reply(json={
        "id": "chatcmpl-1", "object": "chat.completion", "model": extra.pop("model", "test-model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        **extra,
    })  # fmt: skip
