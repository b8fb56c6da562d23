"""A relay client over `websockets`: publish (waits for OK), subscribe, NIP-42 auth, reconnect.

Every incoming event is checked (id and Schnorr signature) before anyone sees it; a forged one
is dropped and counted in `Relay.dropped`. A `RelayPool` speaks to several relays at once and
dedupes events by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
from typing import Any

from ..errors import APIConnectionError, DsrsError, TimeoutError
from .event import Event, sign, verify_json
from .keys import Keys

MAX_FRAME = 4 * 1024 * 1024  # bytes per websocket message
log = logging.getLogger("dsrs.nostr")
_ids = itertools.count(1)


class RelayError(APIConnectionError):
    """The relay could not be reached, dropped us, or refused an event."""


class Subscription:
    """Events matching one REQ (verified, deduped). Iterate, or `await next(timeout)`."""

    def __init__(self, owner: Any, sub_id: str, filters: list[dict[str, Any]]) -> None:
        self.owner = owner
        self.id = sub_id
        self.filters = filters
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.eose = asyncio.Event()
        self.closed_reason: str | None = None
        self._seen: set[str] = set()

    def _put(self, ev: Event) -> None:
        if ev.id not in self._seen:
            self._seen.add(ev.id)
            self.queue.put_nowait(ev)

    async def next(self, timeout: float | None = None) -> Event:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self.queue.get()

    async def close(self) -> None:
        await self.owner._unsubscribe(self)


class Relay:
    """One relay connection, opened on first use and reopened (subscriptions re-sent) if it drops."""

    def __init__(self, url: str, keys: Keys | None = None, *, open_timeout: float = 5.0,
                 max_frame: int = MAX_FRAME) -> None:  # fmt: skip
        if not url.startswith(("ws://", "wss://")):
            raise RelayError(f"not a relay URL: {url!r}", hint="relay URLs start with wss:// (or ws:// on loopback)")
        self.url = url
        self.keys = keys or Keys.generate()  # NIP-42 identity of this connection
        self.open_timeout = open_timeout
        self.max_frame = max_frame
        self.dropped = 0  # events that failed verification
        self.notices: list[str] = []
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._subs: dict[str, Subscription] = {}
        self._oks: dict[str, asyncio.Future[tuple[bool, str]]] = {}
        self._authed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._bg: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"Relay({self.url!r})"

    # -- connection ---------------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the connection (first use), or wait for the reader task to reopen a dropped one."""
        if self._connected.is_set():
            return
        if self._closing:
            raise RelayError("relay client is closed", provider="nostr")
        async with self._lock:
            if self._reader is None or self._reader.done():
                await self._open()
                self._reader = asyncio.create_task(self._run(), name=f"relay-reader {self.url}")
                return
        try:
            await asyncio.wait_for(self._connected.wait(), self.open_timeout)
        except asyncio.TimeoutError:
            raise RelayError(f"relay {self.url} is unreachable (reconnecting)", provider="nostr") from None

    async def _open(self) -> None:
        from websockets.asyncio.client import connect

        try:
            self._ws = await connect(self.url, open_timeout=self.open_timeout, max_size=self.max_frame,
                                     compression=None, ping_interval=20, close_timeout=1)  # fmt: skip
        except asyncio.TimeoutError:
            raise TimeoutError(f"relay {self.url} did not answer within {self.open_timeout}s", provider="nostr") from None
        except OSError as e:
            raise RelayError(f"cannot reach relay {self.url}: {e.strerror or e}", provider="nostr") from None
        except Exception as e:  # websockets' handshake errors
            raise RelayError(f"relay {self.url} refused the connection: {type(e).__name__}", provider="nostr") from None
        self._authed.clear()
        self._connected.set()
        for sub in self._subs.values():
            await self._send(["REQ", sub.id, *sub.filters])

    async def _run(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                async for raw in self._ws:
                    await self._handle(raw)
            except Exception:  # connection lost or a frame over the limit
                pass
            self._connected.clear()
            for fut in self._oks.values():
                if not fut.done():
                    fut.set_exception(RelayError(f"relay {self.url} closed the connection", provider="nostr"))
            self._oks.clear()
            while not self._closing:
                try:
                    await self._open()
                    delay = 0.05
                    break
                except (RelayError, TimeoutError):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _send(self, msg: list[Any]) -> None:
        try:
            await self._ws.send(json.dumps(msg, ensure_ascii=False))
        except Exception:
            raise RelayError(f"lost the connection to {self.url}", provider="nostr") from None

    async def _handle(self, raw: str | bytes) -> None:
        try:
            msg = json.loads(raw)
            kind = msg[0]
        except (ValueError, IndexError, KeyError, TypeError):
            return
        if kind == "EVENT" and len(msg) >= 3:
            sub = self._subs.get(msg[1])
            if sub is None:
                return
            ev = verify_json(msg[2])
            if ev is None:
                self.dropped += 1
                log.debug("relay %s: dropped an event with a bad id or signature", self.url)
                return
            sub._put(ev)
        elif kind == "OK" and len(msg) >= 3:
            fut = self._oks.get(msg[1]) if isinstance(msg[1], str) else None
            if fut is not None and not fut.done():
                fut.set_result((msg[2] is True, str(msg[3]) if len(msg) > 3 else ""))
        elif kind == "EOSE" and len(msg) >= 2:
            sub = self._subs.get(msg[1])
            if sub is not None:
                sub.eose.set()
        elif kind == "CLOSED" and len(msg) >= 2:
            sub = self._subs.get(msg[1])
            reason = str(msg[2]) if len(msg) > 2 else ""
            if sub is not None:
                if reason.startswith("auth-required"):  # resend once authenticated (not in the reader)
                    t = asyncio.create_task(self._resubscribe_after_auth(sub))
                    self._bg.add(t)
                    t.add_done_callback(self._bg.discard)
                else:
                    log.info("relay %s closed a subscription: %r", self.url, reason[:300])
                    sub.closed_reason = reason or "closed by relay"
                    sub.eose.set()
        elif kind == "NOTICE" and len(msg) >= 2:
            log.info("relay %s: NOTICE %r", self.url, str(msg[1])[:300])
            self.notices = (self.notices + [str(msg[1])[:300]])[-20:]
        elif kind == "AUTH" and len(msg) >= 2 and isinstance(msg[1], str):
            ev = sign(self.keys, 22242, "", [["relay", self.url], ["challenge", msg[1]]])
            fut: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
            self._oks[ev.id] = fut
            fut.add_done_callback(lambda f: self._auth_done(ev.id, f))
            await self._send(["AUTH", ev.to_json()])

    async def _resubscribe_after_auth(self, sub: Subscription) -> None:
        if await self._wait_auth(self.open_timeout) and sub.id in self._subs:
            with contextlib.suppress(RelayError):
                await self._send(["REQ", sub.id, *sub.filters])
        else:
            sub.closed_reason = "auth-required"
            sub.eose.set()

    def _auth_done(self, eid: str, f: asyncio.Future[tuple[bool, str]]) -> None:
        self._oks.pop(eid, None)
        if not f.cancelled() and f.exception() is None and f.result()[0]:
            self._authed.set()

    async def _wait_auth(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._authed.wait(), timeout)
        return self._authed.is_set()

    # -- API ----------------------------------------------------------------------------------
    async def publish(self, ev: Event, timeout: float = 5.0) -> str:
        """Send an event and wait for the relay's OK; raises RelayError when refused.

        Every error raised carries `event_sent`: False only when the event surely never reached
        the relay (no connection, or a refusal of every copy sent), True when it may have (a
        missing OK, a connection lost after sending). A payment request must be treated as sent then.
        """
        unsure = False  # a copy went out and the relay neither took nor refused it
        try:
            for attempt in (0, 1, 2):
                await self.connect()
                fut: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
                self._oks[ev.id] = fut
                try:
                    await self._send(["EVENT", ev.to_json()])
                    ok, msg = await asyncio.wait_for(fut, timeout)
                except asyncio.TimeoutError:
                    unsure = True
                    raise TimeoutError(f"relay {self.url} did not acknowledge an event within {timeout}s",
                                       provider="nostr") from None  # fmt: skip
                except RelayError:
                    unsure = True  # lost while sending or waiting: the relay may have it
                    if attempt == 2:
                        raise
                    continue  # the connection dropped: resend once it is back (the id makes it idempotent)
                finally:
                    self._oks.pop(ev.id, None)
                if ok or msg.startswith("duplicate"):
                    return msg
                if msg.startswith("auth-required") and attempt == 0 and await self._wait_auth(timeout):
                    continue
                raise RelayError(f"relay {self.url} refused event: {msg[:200]}", provider="nostr", code="rejected")
            raise AssertionError("unreachable")
        except DsrsError as e:
            e.event_sent = unsure  # type: ignore[attr-defined]
            raise

    async def subscribe(self, filters: list[dict[str, Any]], sub_id: str | None = None,
                        sub: Subscription | None = None) -> Subscription:  # fmt: skip
        await self.connect()
        if sub is None:
            sub = Subscription(self, sub_id or f"dsrs{next(_ids)}{secrets.token_hex(3)}", filters)
        self._subs[sub.id] = sub
        await self._send(["REQ", sub.id, *filters])
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.id, None) is not None and self._connected.is_set():
            with contextlib.suppress(RelayError):
                await self._send(["CLOSE", sub.id])

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        for t in list(self._bg):
            t.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        self._connected.clear()


class _PoolSub(Subscription):
    def __init__(self, pool: RelayPool, sub_id: str, filters: list[dict[str, Any]]) -> None:
        super().__init__(pool, sub_id, filters)
        self.parts: list[Subscription] = []


class RelayPool:
    """Several relays as one: publish to all (ok if any accepts), subscribe to all (deduped)."""

    def __init__(self, urls: list[str], keys: Keys | None = None, **kw: Any) -> None:
        if not urls:
            raise RelayError("no relay URL given", hint="pass a relay URL or set PYLON_RELAY_URL")
        keys = keys or Keys.generate()
        self.relays = [Relay(u, keys, **kw) for u in dict.fromkeys(urls)]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.relays]

    @property
    def dropped(self) -> int:
        return sum(r.dropped for r in self.relays)

    async def _each(self, fn: Any) -> list[Any]:
        res = await asyncio.gather(*(fn(r) for r in self.relays), return_exceptions=True)
        if all(isinstance(x, BaseException) for x in res):
            raise res[0]
        return [x for x in res if not isinstance(x, BaseException)]

    async def connect(self) -> None:
        await self._each(lambda r: r.connect())

    async def publish(self, ev: Event, timeout: float = 5.0) -> None:
        """Ok when any relay accepts; else the first error, whose `event_sent` says whether any relay may have it."""
        res = await asyncio.gather(*(r.publish(ev, timeout) for r in self.relays), return_exceptions=True)
        errs = [x for x in res if isinstance(x, BaseException)]
        if len(errs) < len(res):
            return
        for x in errs:
            if not isinstance(x, Exception):
                raise x  # cancelled
        err = errs[0]
        err.event_sent = any(getattr(x, "event_sent", True) for x in errs)  # type: ignore[attr-defined]
        raise err

    async def subscribe(self, filters: list[dict[str, Any]]) -> Subscription:
        sub = _PoolSub(self, f"dsrs{next(_ids)}{secrets.token_hex(3)}", filters)

        async def one(r: Relay) -> Subscription:
            part = Subscription(r, sub.id, filters)
            part._put = sub._put  # type: ignore[method-assign]  # every relay feeds the pool's queue
            part.eose = sub.eose
            await r.subscribe(filters, sub=part)
            sub.parts.append(part)
            return part

        await self._each(one)
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        for part in getattr(sub, "parts", ()):
            await part.close()

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.relays))
