"""A fast fake OpenAI-compatible server for benchmarks (loopback only).

Raw asyncio protocol + httptools (when installed) on uvloop (when installed), HTTP/1.1
keep-alive, one core (`--cpu`). Every POST answers like `/v1/chat/completions`:

- a JSON chat completion (fixed text and usage), or
- an SSE stream when the body has `"stream": true`: N `chat.completion.chunk` events, a usage
  chunk and `data: [DONE]`, sent with chunked transfer encoding.

Knobs ride in the path before `/v1`, so every client sends the same request and no client
needs special headers: `http://127.0.0.1:PORT/delay=20,chunks=500/v1` answers after 20 ms
and streams 500 chunks. Defaults: delay 0, chunks 100.

    python bench/server.py --port 0 --cpu 0     # prints "PORT <n>" when ready
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys

try:
    import httptools
except ImportError:  # pragma: no cover - the bench extra installs it
    httptools = None

_KNOB = re.compile(rb"(delay|chunks)=(\d+)")

BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1764000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris is the capital of France."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    },
    separators=(",", ":"),
).encode()
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: dict) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


_BASE = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764000000, "model": "bench"}
SSE_TOKEN = _event({**_BASE, "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]})
SSE_TAIL = (
    _event({**_BASE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    + _event({**_BASE, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}})
    + _chunk(b"data: [DONE]\n\n")
    + b"0\r\n\r\n"
)
_sse_cache: dict[int, bytes] = {}


def sse_body(n: int) -> bytes:
    b = _sse_cache.get(n)
    if b is None:
        b = _sse_cache[n] = SSE_HEAD + SSE_TOKEN * n + SSE_TAIL
    return b


def knobs(url: bytes) -> tuple[float, int]:
    delay, chunks = 0.0, 100
    head = url.split(b"/v1", 1)[0]
    for k, v in _KNOB.findall(head):
        if k == b"delay":
            delay = int(v) / 1000.0
        else:
            chunks = min(int(v), 100_000)
    return delay, chunks


class HttpProtocol(asyncio.Protocol):
    """One connection; requests are answered in order (HTTP/1.1 pipelining-safe)."""

    __slots__ = ("transport", "parser", "url", "body", "loop", "pending", "closed")

    def __init__(self) -> None:
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.loop = asyncio.get_event_loop()
        self.pending = 0  # delayed answers still to send on this connection (keeps order)
        self.closed = False

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def connection_lost(self, exc):  # type: ignore[no-untyped-def]
        self.closed = True

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        delay, chunks = knobs(self.url)
        body = b"".join(self.body)
        stream = b'"stream":true' in body or b'"stream": true' in body
        answer = sse_body(chunks) if stream else JSON_RESPONSE
        if delay > 0 or self.pending:
            self.pending += 1
            self.loop.call_later(delay, self._send_later, answer)
        else:
            self.transport.write(answer)

    def _send_later(self, answer: bytes) -> None:
        self.pending -= 1
        if not self.closed:
            self.transport.write(answer)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpProtocol, "127.0.0.1", port, backlog=4096, reuse_address=True)
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cpu", type=int, default=None, help="pin to this core")
    args = ap.parse_args()
    if httptools is None:
        sys.exit("bench/server.py needs httptools: pip install -e '.[bench]'")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
