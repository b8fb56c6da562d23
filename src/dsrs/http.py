"""HTTP for every provider: one pooled aiohttp session per event loop, JSON posts, SSE and NDJSON streams.

aiohttp is chosen by measurement (bench/ and notes: httpx rescans its pool per request and
collapses under concurrency). It is imported on first use, so `import dsrs` stays fast.
Errors come out typed (`dsrs.errors.from_response`), with secrets scrubbed from their text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from . import errors
from .retry import parse_retry_after, should_retry_header

_sessions: dict[asyncio.AbstractEventLoop, Any] = {}  # a session refers to its loop: no weak keys
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


def session() -> Any:
    """The pooled `aiohttp.ClientSession` of the running event loop."""
    loop = asyncio.get_running_loop()
    s = _sessions.get(loop)
    if s is None or s.closed:
        for old in [lp for lp in _sessions if lp.is_closed()]:  # loops that ended (asyncio.run...)
            _forget(_sessions.pop(old))
        aiohttp = _lib()
        conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=False)
        s = aiohttp.ClientSession(connector=conn, json_serialize=json.dumps, skip_auto_headers=("User-Agent",))
        _sessions[loop] = s
        _close_at_shutdown(s)
    return s


async def _closer(s: Any) -> AsyncIterator[None]:
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
    s = _sessions.pop(asyncio.get_running_loop(), None)
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
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise _transport_error(e, ep) from None
    except ValueError:
        raise errors.ResponseFormatError("the answer is not JSON", provider=ep.provider, model=ep.model) from None


async def stream_lines(ep: Endpoint, body: Mapping[str, Any]) -> AsyncIterator[bytes]:
    """POST and yield the response body line by line (for SSE and NDJSON)."""
    aiohttp = _lib()
    try:
        async with session().post(
            ep.url, data=dumps(body), headers=ep.headers, timeout=_timeout(ep.connect_timeout, ep.read_timeout)
        ) as resp:
            if resp.status >= 400:
                await _raise_for(resp, ep)
            content = resp.content
            while True:
                line = await content.readline()
                if not line:
                    return
                yield line
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise _transport_error(e, ep) from None


async def sse_events(ep: Endpoint, body: Mapping[str, Any]) -> AsyncIterator[tuple[str | None, str]]:
    """Server-sent events as (event name, data) pairs, per the WHATWG event-stream rules."""
    event: str | None = None
    data: list[str] = []
    async for raw in stream_lines(ep, body):
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
    if data:
        yield event, "\n".join(data)
