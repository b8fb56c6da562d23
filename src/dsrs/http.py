"""HTTP for every provider: one pooled aiohttp session per event loop, JSON posts, SSE and NDJSON streams.

aiohttp is chosen by measurement (bench/ and notes: httpx rescans its pool per request and
collapses under concurrency). It is imported on first use, so `import dsrs` stays fast.
Errors come out typed (`dsrs.errors.from_response`), with secrets scrubbed from their text.

Connections: each loop's pool opens at most `DSRS_MAX_CONNECTIONS` connections (default 1000, the
official OpenAI and Anthropic SDKs' cap; 0 means no cap); calls beyond it wait for a free
connection (that wait is not part of any timeout). Set it before the loop's first call.

Streams are read as raw bytes and split here, not by aiohttp's `readline` (which splits only on
LF and refuses a line longer than its read buffer, 512 KiB). SSE follows the WHATWG event-stream rules: lines end in CRLF,
LF or a bare CR; bytes that are not UTF-8 become U+FFFD, as a browser's decoder does (the JSON
inside then parses or fails as `ResponseFormatError`); a leading BOM is dropped; an event left
without its closing blank line at the end of the stream is still delivered. NDJSON lines end in
LF (or CRLF). A line or event over `MAX_EVENT_BYTES` (16 MiB) is a `ResponseFormatError`; a
transport failure after the answer began is an `APIConnectionError` (or `TimeoutError`).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from . import errors
from .retry import parse_retry_after, should_retry_header

if TYPE_CHECKING:
    from .types import Completion

_sessions: dict[asyncio.AbstractEventLoop, Any] = {}  # a session refers to its loop: no weak keys
_sessions_lock = threading.Lock()  # each thread may run its own loop; never held across an await
MAX_CONNECTIONS = 1000  # per loop, unless DSRS_MAX_CONNECTIONS says otherwise
MAX_EVENT_BYTES = 16 * 1024 * 1024  # one SSE event or NDJSON line
_timeouts: dict[tuple[float | None, float | None], Any] = {}
_aiohttp: Any = None


def _lib() -> Any:
    global _aiohttp
    if _aiohttp is None:
        import aiohttp

        _aiohttp = aiohttp
    return _aiohttp


# JSON on the wire: orjson encodes a request body ~15x and decodes an answer ~4x faster than the
# standard library (measured in bench/), a few µs of every call's CPU.
dumps = orjson.dumps  # -> UTF-8 bytes
loads = orjson.loads  # errors are ValueError subclasses


def max_connections() -> int:
    """The connection cap of a new pool: `DSRS_MAX_CONNECTIONS`, else `MAX_CONNECTIONS` (0: no cap)."""
    v = os.environ.get("DSRS_MAX_CONNECTIONS", "").strip()
    if not v:
        return MAX_CONNECTIONS
    try:
        n = int(v)
    except ValueError:
        n = -1
    if n < 0:
        raise errors.ConfigurationError(
            f"DSRS_MAX_CONNECTIONS={v!r} is not a count", hint="set a whole number (0 means no cap), or unset it"
        )
    return n


def session() -> Any:
    """The pooled `aiohttp.ClientSession` of the running event loop."""
    loop = asyncio.get_running_loop()
    s = _sessions.get(loop)
    if s is None or s.closed:
        limit = max_connections()
        with _sessions_lock:  # other threads add and drop their loops' sessions meanwhile
            ended = [lp for lp in _sessions if lp.is_closed()]  # loops that ended (asyncio.run...)
            stale = [_sessions.pop(lp) for lp in ended]
            s = _sessions.get(loop)
            if s is None or s.closed:
                aiohttp = _lib()
                conn = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300, enable_cleanup_closed=False)
                s = aiohttp.ClientSession(connector=conn, json_serialize=json.dumps,
                                          skip_auto_headers=("User-Agent",))  # fmt: skip
                _sessions[loop] = s
                _close_at_shutdown(s)
        for old in stale:
            _forget(old)
    return s


async def _closer(s: Any) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await s.close()


def _close_at_shutdown(s: Any) -> None:
    """Close `s` when its loop shuts down: an async generator started here is one the loop tracks, and
    `loop.shutdown_asyncgens()` (which `asyncio.run` calls) finalizes it, running the `finally` above."""
    gen = _closer(s)
    s._dsrs_closer = gen  # the loop keeps only a weak reference
    try:
        gen.asend(None).send(None)  # run to the first `yield`, synchronously
    except StopIteration:
        pass


def _forget(s: Any) -> None:
    """The loop was closed without shutting down: drop the session without awaiting (best effort)."""
    try:
        conn = s._connector
        if conn is not None:
            conn._close()
        s._connector = None
    except Exception:  # pragma: no cover - best effort at teardown
        pass


async def aclose() -> None:
    """Close this loop's pooled session (optional; sessions are also closed with their loop)."""
    loop = asyncio.get_running_loop()
    with _sessions_lock:
        s = _sessions.pop(loop, None)
    if s is not None:
        await s.close()


def _timeout(connect: float | None, read: float | None) -> Any:
    key = (connect, read)
    t = _timeouts.get(key)
    if t is None:
        t = _timeouts[key] = _lib().ClientTimeout(total=None, sock_connect=connect, sock_read=read)
    return t


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to send: the provider, model and secrets are for error text and redaction only."""

    url: str
    headers: Mapping[str, str]
    provider: str
    model: str
    connect_timeout: float | None = 10.0
    read_timeout: float | None = 600.0
    secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"Endpoint(url={self.url!r}, provider={self.provider!r}, model={self.model!r})"


def scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "[redacted]")
    return text


async def _raise_for(resp: Any, ep: Endpoint) -> None:
    raw = await resp.read()
    try:
        body: Any = loads(raw)
    except ValueError:
        body = raw.decode("utf-8", "replace")
    if ep.secrets:
        body = json.loads(scrub(json.dumps(body), ep.secrets))
    err = errors.from_response(
        resp.status,
        body,
        provider=ep.provider,
        model=ep.model,
        retry_after=parse_retry_after(resp.headers),
    )
    if getattr(err, "retry_after", None) is None:  # a delay from the body (Gemini RetryInfo) stays
        err.retry_after = parse_retry_after(resp.headers)  # type: ignore[attr-defined]
    err.should_retry = should_retry_header(resp.headers)  # type: ignore[attr-defined]
    err.billed = False  # type: ignore[attr-defined]  # an HTTP error answer is not billed (dsrs.budget)
    raise err


def _transport_error(e: BaseException, ep: Endpoint) -> errors.DsrsError:
    err = _transport_error_of(e, ep)
    if isinstance(e, _lib().ClientConnectorError):  # no connection: nothing was sent, nothing billed
        err.billed = False  # type: ignore[attr-defined]
    return err


def _transport_error_of(e: BaseException, ep: Endpoint) -> errors.DsrsError:
    if isinstance(e, asyncio.TimeoutError):
        return errors.TimeoutError(
            f"no answer within the timeout ({type(e).__name__})",
            provider=ep.provider,
            model=ep.model,
            hint="raise with_timeout(...) or check the server",
        )
    return errors.APIConnectionError(
        scrub(f"{type(e).__name__}: {e}", ep.secrets),
        provider=ep.provider,
        model=ep.model,
        hint=f"is the server at {ep.url.split('/v1')[0]} up?",
    )


async def post_json(ep: Endpoint, body: Mapping[str, Any]) -> Any:
    """POST a JSON body, return the decoded JSON answer; typed errors for everything else."""
    aiohttp = _lib()
    try:
        async with session().post(
            ep.url, data=dumps(body), headers=ep.headers, timeout=_timeout(ep.connect_timeout, ep.read_timeout)
        ) as resp:
            if resp.status >= 400:
                await _raise_for(resp, ep)
            raw = await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise _transport_error(e, ep) from None
    try:
        return loads(raw)
    except ValueError:
        raise errors.ResponseFormatError(
            f"the answer is not JSON: {raw[:120]!r}", provider=ep.provider, model=ep.model, status=200
        ) from None


async def get_json(ep: Endpoint) -> Any:
    aiohttp = _lib()
    try:
        async with session().get(
            ep.url, headers=ep.headers, timeout=_timeout(ep.connect_timeout, ep.read_timeout)
        ) as resp:
            if resp.status >= 400:
                await _raise_for(resp, ep)
            return loads(await resp.read())
    except errors.DsrsError:  # typed already (a ConfigurationError is also a ValueError)
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise _transport_error(e, ep) from None
    except ValueError:
        raise errors.ResponseFormatError("the answer is not JSON", provider=ep.provider, model=ep.model) from None


async def _chunks(ep: Endpoint, body: Mapping[str, Any]) -> AsyncIterator[bytes]:
    """POST and yield the response body as it arrives, in chunks of any size (empty ones skipped)."""
    aiohttp = _lib()
    try:
        async with session().post(
            ep.url, data=dumps(body), headers=ep.headers, timeout=_timeout(ep.connect_timeout, ep.read_timeout)
        ) as resp:
            if resp.status >= 400:
                await _raise_for(resp, ep)
            read = resp.content.readany
            while chunk := await read():
                yield chunk
    except errors.DsrsError:
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, EOFError) as e:
        raise _transport_error(e, ep) from None
    except ValueError as e:  # aiohttp's own parsers on a broken body (chunked framing, encodings)
        raise errors.APIConnectionError(
            scrub(f"the answer broke off: {type(e).__name__}: {e}", ep.secrets)[:300],
            provider=ep.provider, model=ep.model, hint="retry; if it persists, check the server",
        ) from None  # fmt: skip


def _too_long(ep: Endpoint, what: str) -> errors.ResponseFormatError:
    return errors.ResponseFormatError(
        f"{what} is over {MAX_EVENT_BYTES} bytes",
        provider=ep.provider,
        model=ep.model,
        status=200,
        hint="the server sent an over-long line; raise dsrs.http.MAX_EVENT_BYTES if it is legitimate",
    )


async def stream_lines(ep: Endpoint, body: Mapping[str, Any]) -> AsyncIterator[bytes]:
    """POST and yield the response body line by line, as NDJSON splits it: on LF, a CR before it
    dropped, the terminator not included (a last line without one is yielded too)."""
    parts: list[bytes] = []  # pieces of an unfinished line (joined once: no quadratic copies)
    size = 0
    async for chunk in _chunks(ep, body):
        if b"\n" not in chunk:
            parts.append(chunk)
            size += len(chunk)
            if size > MAX_EVENT_BYTES:
                raise _too_long(ep, "a line of the stream")
            continue
        lines = chunk.split(b"\n")
        if parts:
            parts.append(lines[0])
            lines[0] = b"".join(parts)
            parts = []
        last = lines.pop()
        size = len(last)
        if last:
            parts.append(last)
        for line in lines:
            if len(line) > MAX_EVENT_BYTES:
                raise _too_long(ep, "a line of the stream")
            yield line[:-1] if line[-1:] == b"\r" else line
    if parts:
        line = b"".join(parts)
        yield line[:-1] if line[-1:] == b"\r" else line


async def sse_events(ep: Endpoint, body: Mapping[str, Any]) -> AsyncIterator[tuple[str | None, str]]:
    """Server-sent events as (event name, data) pairs, per the WHATWG event-stream rules (see the top)."""
    event: str | None = None
    data: list[str] = []
    size = 0  # bytes of the event's lines so far
    parts: list[bytes] = []  # pieces of the unfinished last line (joined once: no quadratic copies)
    plen = 0
    skip_lf = False  # the last chunk ended in CR: an LF starting the next one belongs to it
    bom = True  # the first line may start with a byte-order mark
    async for chunk in _chunks(ep, body):
        if skip_lf:
            skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            skip_lf = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            parts.append(chunk)
            plen += len(chunk)
            if size + plen > MAX_EVENT_BYTES:
                raise _too_long(ep, "an event of the stream")
            continue
        lines = chunk.split(b"\n")
        if parts:
            parts.append(lines[0])
            lines[0] = b"".join(parts)
            parts = []
        last = lines.pop()
        plen = len(last)
        if last:
            parts.append(last)
        for raw in lines:
            if bom:
                bom = False
                if raw[:3] == b"\xef\xbb\xbf":
                    raw = raw[3:]
            if not raw:
                if data:
                    yield event, "\n".join(data)
                event, data, size = None, [], 0
                continue
            size += len(raw)
            if size > MAX_EVENT_BYTES:
                raise _too_long(ep, "an event of the stream")
            if raw[:5] == b"data:":  # the usual line, first
                data.append((raw[6:] if raw[5:6] == b" " else raw[5:]).decode("utf-8", "replace"))
            elif raw[:1] != b":":  # not a comment
                field, _, value = raw.decode("utf-8", "replace").partition(":")
                if field == "data":
                    data.append(value)
                elif field == "event":
                    event = value[1:] if value[:1] == " " else value
    if parts:  # a last line without its end
        raw = b"".join(parts)
        if bom and raw[:3] == b"\xef\xbb\xbf":
            raw = raw[3:]
        field, _, value = raw.decode("utf-8", "replace").partition(":")
        if field == "data":
            data.append(value[1:] if value[:1] == " " else value)
    if data:  # an event without its closing blank line
        yield event, "\n".join(data)


# -- what a decoder hands back -----------------------------------------------------------------
# A JSON answer can hold any type anywhere: `"content": 5`, `"usage": {"input_tokens": "lots"}`,
# `-3` tokens, `1e308`. Decoders pass what they built through these two checks, so a wrong type
# is a ResponseFormatError (billed, outcome unknown) and never a Completion that lies.
_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
           "cache_write_tokens", "cache_write_1h_tokens")  # fmt: skip


def _bad(what: str, v: Any, provider: str, model: str) -> errors.ResponseFormatError:
    return errors.ResponseFormatError(
        f"the answer's {what} is {str(v)[:60]!r} ({type(v).__name__}), not what the protocol promises",
        provider=provider, model=model, status=200, hint="a server that is not the provider's protocol?",
    )  # fmt: skip


def delta(v: Any, provider: str, model: str) -> str:
    """A streamed text delta: a str ("" for null), else a ResponseFormatError."""
    if type(v) is str:
        return v
    if v is None:
        return ""
    raise _bad("text delta", v, provider, model)


def checked(c: Completion) -> Completion:
    """The decoded `Completion` itself when its fields have their types (text str, tool calls with
    str id/name and dict arguments, token counts non-negative ints below 2**53, cached and written
    tokens within the prompt's; an integral float such as `12.0` becomes 12), else a
    ResponseFormatError naming the field."""
    p, m = c.provider, c.model
    if type(c.text) is not str:
        raise _bad("text", c.text, p, m)
    if not isinstance(m, str) or not (c.id is None or isinstance(c.id, str)):
        raise _bad("model or id", (m, c.id), p, m if isinstance(m, str) else "")
    for t in c.tool_calls:
        if not (isinstance(t.id, str) and isinstance(t.name, str) and isinstance(t.arguments, dict)):
            raise _bad("tool call", (t.id, t.name, t.arguments), p, m)
    u = c.usage
    for f in _COUNTS:
        v = getattr(u, f, 0)
        if type(v) is int and 0 <= v < 2**53:  # no count comes near 2**53; JSON numbers lose digits past it
            continue
        if type(v) is float and 0 <= v < 2**53 and v.is_integer():
            setattr(u, f, int(v))
            continue
        raise _bad(f"usage {f}", v, p, m)
    if u.cached_tokens + u.cache_write_tokens > u.prompt_tokens:  # priced as parts of the prompt
        raise errors.ResponseFormatError(
            f"the answer's usage has {u.cached_tokens} cached and {u.cache_write_tokens} cache-write tokens in a"
            f" prompt of {u.prompt_tokens}: they are parts of it", provider=p, model=m, status=200,
        )  # fmt: skip
    if not (u.cost_msats is None or (type(u.cost_msats) is int and u.cost_msats >= 0)):
        raise _bad("cost", u.cost_msats, p, m)
    return c
