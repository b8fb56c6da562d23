"""dsrs.http's transport: stream splitting (SSE per WHATWG, NDJSON), long lines, non-UTF-8 bytes,
typed mid-stream failures, the per-loop session registry across threads, and the connection cap.

Streams go through the real aiohttp client against tests/scripted.py (or a small aiohttp server
here that counts connections); the splitter's property test feeds `http._chunks` directly so it
can choose every chunk boundary.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import sys
import threading
import time
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsrs import LM, errors, http
from scripted import Reply, ScriptedServer

SSE = {"Content-Type": "text/event-stream"}


def _ep(server: ScriptedServer) -> http.Endpoint:
    return http.Endpoint(url=server.url + "/v1/stream", headers={}, provider="openai", model="m", secrets=("sk-secret",))


async def _events(ep: http.Endpoint) -> list[tuple[str | None, str]]:
    return [e async for e in http.sse_events(ep, {})]


async def _lines(ep: http.Endpoint) -> list[bytes]:
    return [line async for line in http.stream_lines(ep, {})]


# -- SSE through the real client ----------------------------------------------------------------
async def test_sse_lines_end_in_crlf_lf_or_bare_cr(scripted_server: ScriptedServer) -> None:
    body = b"data: a\r\rdata: b\r\ndata: c\r\n\r\nevent: e\ndata: d\n\n: a comment\rdata\r\r"
    scripted_server.script(Reply(body=body, headers=SSE))
    assert await _events(_ep(scripted_server)) == [(None, "a"), (None, "b\nc"), ("e", "d"), (None, "")]


async def test_sse_line_longer_than_aiohttps_readline_limit(scripted_server: ScriptedServer) -> None:
    big = "x" * 3_000_000  # aiohttp's readline raises LineTooLong (or ValueError) beyond its buffer (512 KiB)
    scripted_server.script(Reply(body=f"data: {big}\n\ndata: after\n\n".encode(), headers=SSE))
    assert await _events(_ep(scripted_server)) == [(None, big), (None, "after")]


async def test_sse_event_over_the_cap_is_a_response_format_error(
    scripted_server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "MAX_EVENT_BYTES", 100_000)
    scripted_server.script(Reply(body=b"data: " + b"y" * 150_000 + b"\n\n", headers=SSE))
    with pytest.raises(errors.ResponseFormatError, match="over 100000 bytes"):
        await _events(_ep(scripted_server))
    # many data lines of one event count together
    scripted_server.script(Reply(body=b"data: " + b"z" * 60_000 + b"\ndata: " + b"z" * 60_000 + b"\n\n", headers=SSE))
    with pytest.raises(errors.ResponseFormatError):
        await _events(_ep(scripted_server))


async def test_sse_bytes_that_are_not_utf8_become_replacement_characters(scripted_server: ScriptedServer) -> None:
    scripted_server.script(Reply(body=b'\xef\xbb\xbfdata: {"t": "\xff\xfe ok \xc3"}\n\n', headers=SSE))
    assert await _events(_ep(scripted_server)) == [(None, '{"t": "\ufffd\ufffd ok \ufffd"}')]


async def test_openai_stream_with_non_utf8_bytes_and_bare_cr_decodes(scripted_server: ScriptedServer) -> None:
    body = (b'data: {"choices": [{"index": 0, "delta": {"content": "caf\xe9"}}]}\r\r'
            b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\r\rdata: [DONE]\r\r')  # fmt: skip
    scripted_server.script(Reply(body=body, headers=SSE))
    lm = LM("openai/gpt-4o-mini", api_key="sk-test", base_url=scripted_server.url + "/v1", retries=0)
    items = [x async for x in lm.astream("hi")]
    assert items[0] == "caf\ufffd" and items[-1].completion.text == "caf\ufffd"


async def test_ndjson_long_lines_crlf_and_the_cap(
    scripted_server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = b'{"k": "' + b"y" * 300_000 + b'"}'
    scripted_server.script(Reply(body=b'{"a": 1}\r\n' + long + b"\n\n{\"c\": 3}", headers={}))
    assert await _lines(_ep(scripted_server)) == [b'{"a": 1}', long, b"", b'{"c": 3}']
    monkeypatch.setattr(http, "MAX_EVENT_BYTES", 100_000)
    scripted_server.script(Reply(body=long + b"\n", headers={}))
    with pytest.raises(errors.ResponseFormatError):
        await _lines(_ep(scripted_server))


async def test_ollama_stream_with_a_long_line_and_non_utf8_bytes(scripted_server: ScriptedServer) -> None:
    text = "w" * 3_000_000
    body = (b'{"model": "m", "message": {"role": "assistant", "content": "\xff' + text.encode() + b'"}, "done": false}\n'
            b'{"model": "m", "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop",'
            b' "prompt_eval_count": 3, "eval_count": 4}\n')  # fmt: skip
    scripted_server.script(Reply(body=body, headers={"Content-Type": "application/x-ndjson"}))
    lm = LM("ollama/llama3.2", base_url=scripted_server.url, retries=0)
    items = [x async for x in lm.astream("hi")]
    assert items[-1].completion.text == "\ufffd" + text and items[-1].usage.total_tokens == 7


async def test_a_connection_reset_mid_stream_is_a_typed_connection_error(scripted_server: ScriptedServer) -> None:
    ep = _ep(scripted_server)
    scripted_server.script(Reply(sse=[{"a": 1}, {"b": 2}], cut=True))
    with pytest.raises(errors.APIConnectionError) as e:
        await _events(ep)
    assert not isinstance(e.value, errors.TimeoutError) and "sk-secret" not in str(e.value)
    scripted_server.script(Reply(ndjson=[{"a": 1}, {"b": 2}], cut=True))
    with pytest.raises(errors.APIConnectionError):
        await _lines(ep)


async def test_a_stall_mid_stream_is_a_typed_timeout(scripted_server: ScriptedServer) -> None:
    ep = http.Endpoint(url=scripted_server.url + "/v1/stream", headers={}, provider="openai", model="m",
                       read_timeout=0.5)  # fmt: skip
    scripted_server.script(Reply(sse=[{"a": 1}, {"b": 2}], chunk_delay=60))  # stalls after the first event
    got: list[Any] = []
    with pytest.raises(errors.TimeoutError):
        async for ev in http.sse_events(ep, {}):
            got.append(ev)
    assert got in ([], [(None, '{"a": 1}')])  # (a loaded machine may time out before the first event)


# -- the splitter, every chunk boundary -------------------------------------------------------------
def _oracle(raw: bytes) -> list[tuple[str | None, str]]:
    """The WHATWG event-stream interpretation, written independently (whole-stream decode and regex
    split), plus dsrs's leniency at the end: an unterminated last event is still delivered."""
    text = raw.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    out: list[tuple[str | None, str]] = []
    event: str | None = None
    data: list[str] = []
    lines = re.split(r"\r\n|\r|\n", text)
    for i, line in enumerate(lines):
        if line == "":
            if i == len(lines) - 1:
                break  # the stream ended with a line end: no more lines
            if data:
                out.append((event, "\n".join(data)))
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event" and i < len(lines) - 1:
            event = value
    if data:
        out.append((event, "\n".join(data)))
    return out


_piece = st.one_of(
    st.sampled_from([b"data: ", b"data:", b"data", b"event: ", b"event:x", b": c", b"id: 1", b"retry: 5", b"{\"a\": 1}",
                     b"\r", b"\n", b"\r\n", b"\n\n", b"\r\r", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\xe2\x82", b"\xe9t\xe9",
                     b"[DONE]", b" ", b"0"]),  # fmt: skip
    st.binary(max_size=8),
)


class _FeedChunks:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __call__(self, ep: Any, body: Any) -> Any:
        for c in self.chunks:
            if c:
                yield c


def _run_sse(chunks: list[bytes]) -> list[tuple[str | None, str]]:
    async def go() -> list[tuple[str | None, str]]:
        return [e async for e in http.sse_events(None, {})]  # type: ignore[arg-type]

    orig = http._chunks
    http._chunks = _FeedChunks(chunks)  # type: ignore[assignment]
    try:
        return asyncio.run(go())
    finally:
        http._chunks = orig  # type: ignore[assignment]


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_piece, max_size=40), st.lists(st.integers(0, 400), max_size=12))
def test_sse_splitter_matches_the_spec_at_any_chunk_boundaries(pieces: list[bytes], cuts: list[int]) -> None:
    raw = b"".join(pieces)
    bounds = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    chunks = [raw[a:b] for a, b in zip(bounds, bounds[1:])]
    got = _run_sse(chunks)
    assert got == _oracle(raw)
    assert all((e is None or type(e) is str) and type(d) is str for e, d in got)


def test_sse_splitter_holds_a_cr_whose_lf_comes_in_the_next_chunk() -> None:
    assert _run_sse([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [(None, "a\nb")]


def _run_lines(chunks: list[bytes]) -> list[bytes]:
    async def go() -> list[bytes]:
        return [line async for line in http.stream_lines(None, {})]  # type: ignore[arg-type]

    orig = http._chunks
    http._chunks = _FeedChunks(chunks)  # type: ignore[assignment]
    try:
        return asyncio.run(go())
    finally:
        http._chunks = orig  # type: ignore[assignment]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from([b"{}", b"\n", b"\r\n", b"\r", b"x", b"\xff", b"\"a\""]), max_size=30),
       st.lists(st.integers(0, 100), max_size=8))  # fmt: skip
def test_ndjson_splitter_matches_split_on_lf_at_any_chunk_boundaries(pieces: list[bytes], cuts: list[int]) -> None:
    raw = b"".join(pieces)
    bounds = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    want = raw.split(b"\n")
    if want[-1] == b"":
        want.pop()
    want = [line.removesuffix(b"\r") for line in want]
    assert _run_lines([raw[a:b] for a, b in zip(bounds, bounds[1:])]) == want


# -- the session registry across threads ------------------------------------------------------------
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_threads_each_with_their_own_loops_share_the_registry_safely(scripted_server: ScriptedServer) -> None:
    """Threads create, replace and drop their loops' sessions at once (asyncio.run makes a new loop
    each time). With a tiny switch interval the old unlocked dict was iterated while another
    thread changed it ("dictionary changed size during iteration") or had a key popped twice
    (KeyError): a few of these 3,000 loops failed in every run."""
    scripted_server.script(default=Reply(json={
        "id": "c", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                              "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))  # fmt: skip
    lm = LM("openai/gpt-4o-mini", api_key="sk-test", base_url=scripted_server.url + "/v1", retries=0)
    failures: list[BaseException] = []
    texts: list[str] = []

    mine: list[asyncio.AbstractEventLoop] = []  # this test's loops (other tests' loops may be live in the registry)

    async def calls() -> None:
        mine.append(asyncio.get_running_loop())
        for c in await asyncio.gather(*(lm.acall("hi") for _ in range(3))):
            texts.append(c.text)

    async def touch() -> None:  # a loop that only takes its session (the registry's busiest path)
        mine.append(asyncio.get_running_loop())
        assert not http.session().closed

    def worker() -> None:
        try:
            for i in range(250):
                asyncio.run(calls() if i % 50 == 0 else touch())
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            failures.append(e)

    gc.collect()
    before = _open_fds()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(old)
    assert not failures, failures[:3]
    assert texts == ["ok"] * (12 * 5 * 3)
    live = [(loop, s) for loop, s in list(http._sessions.items()) if any(loop is m for m in mine)]
    assert all(loop.is_closed() and s.closed for loop, s in live)  # every loop ended, its session closed
    for _ in range(600):  # the scripted server (another thread) closes its ends when it sees the client's
        gc.collect()
        if _open_fds() <= before + 4:
            break
        time.sleep(0.05)
    assert _open_fds() <= before + 4  # no sockets or selectors left behind


# -- the connection cap -----------------------------------------------------------------------------
class _CountingServer:
    """An aiohttp server (own thread and loop) that answers a chat completion after `delay` seconds
    and records the most connections (open when a request came) and requests it had at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.max_open = self.busy = self.max_busy = 0
        self.transports: set[Any] = set()  # every connection that sent a request
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.transports.add(request.transport)
        self.max_open = max(self.max_open, sum(not t.is_closing() for t in self.transports))
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.busy -= 1
        return web.json_response({"id": "c", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})  # fmt: skip

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def counting_server() -> Any:
    s = _CountingServer(delay=0.05)
    yield s
    s.close()


async def test_connections_are_capped_and_calls_beyond_the_cap_wait(
    counting_server: _CountingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSRS_MAX_CONNECTIONS", "8")
    await http.aclose()  # this loop's next call builds its pool with the cap
    lm = LM("openai/gpt-4o-mini", api_key="sk-test", base_url=f"http://127.0.0.1:{counting_server.port}/v1",
            retries=0)  # fmt: skip
    try:
        results = await asyncio.gather(*(lm.acall("hi") for _ in range(200)))
    finally:
        await http.aclose()
    assert [c.text for c in results] == ["ok"] * 200
    assert 1 <= counting_server.max_open <= 8
    assert 1 <= counting_server.max_busy <= 8


def test_the_default_cap_is_the_official_sdks_and_a_bad_setting_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DSRS_MAX_CONNECTIONS", raising=False)
    assert http.max_connections() == 1000
    monkeypatch.setenv("DSRS_MAX_CONNECTIONS", "0")
    assert http.max_connections() == 0  # no cap, on request
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv("DSRS_MAX_CONNECTIONS", bad)
        with pytest.raises(errors.ConfigurationError, match="DSRS_MAX_CONNECTIONS"):
            http.max_connections()


async def test_the_pool_of_a_new_loop_has_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSRS_MAX_CONNECTIONS", "17")
    await http.aclose()
    try:
        assert http.session().connector.limit == 17
    finally:
        await http.aclose()


async def test_a_bad_connection_setting_is_reported_as_such_by_every_request(
    scripted_server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSRS_MAX_CONNECTIONS", "many")
    await http.aclose()
    ep = _ep(scripted_server)
    for call in (http.get_json(ep), http.post_json(ep, {}), _events(ep), _lines(ep)):
        with pytest.raises(errors.ConfigurationError, match="DSRS_MAX_CONNECTIONS"):
            await call
