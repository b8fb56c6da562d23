"""A relay client over `websockets`: publish (waits for OK), subscribe, NIP-42 auth, reconnect.

Every incoming event is checked (id and Schnorr signature) before anyone sees it; a forged one
is dropped and counted in `Relay.dropped`. A `RelayPool` speaks to several relays at once and
dedupes events by id.

Refusals are read, never waited out. A REQ counts as taken at its EOSE (or first event); a
`CLOSED` (NIP-01, with its machine-readable prefix: `error:`, `auth-required:`,
`rate-limited:`...) or a `NOTICE` arriving while it waits for that answer (some relays, like
PyPI's nostr-relay, refuse the 33rd subscription so) refuses it with `SubscriptionRefused`. A
subscription the relay closes later fails its reader with the same error. The relay's NIP-11
`limitation` (see nip11.py) is read when a connection opens: never more subscriptions than
`max_subscriptions` on one connection, no event over `max_content_length` / `max_message_length`
sent (`EventTooLargeError`, before sending). A pool opens up to `max_connections` connections
per relay when one is full (published, or learned from a refusal while it held others).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import secrets
from collections import OrderedDict, deque
from typing import Any

from ..errors import APIConnectionError, DsrsError, TimeoutError
from .event import Event, sign, verify_json
from .keys import Keys
from .nip11 import Limits
from .nip11 import limits as fetch_limits

MAX_FRAME = 4 * 1024 * 1024  # bytes per websocket message
MAX_CONNECTIONS = 4  # per relay in a pool: more when a relay refuses more subscriptions on one
SEEN = 10_000  # event ids remembered per subscription, to drop duplicates
log = logging.getLogger("dsrs.nostr")
_ids = itertools.count(1)


class RelayError(APIConnectionError):
    """The relay could not be reached, dropped us, or refused an event."""


class SubscriptionRefused(RelayError):
    """The relay refused or closed a subscription. `code` is the prefix of its CLOSED reason
    (`error`, `auth-required`, `rate-limited`, `restricted`...), or `notice` when it answered the
    REQ with a NOTICE. `full` is True when the connection held other subscriptions then: likely
    its per-connection limit, which another connection avoids."""

    full = False


class EventTooLargeError(RelayError):
    """An event over the relay's published NIP-11 limits; it was not sent (`event_sent` False)."""


class Subscription:
    """Events matching one REQ (verified, deduped). Iterate, or `await next(timeout)`; both raise
    `SubscriptionRefused` once the relay has closed it."""

    def __init__(self, owner: Any, sub_id: str, filters: list[dict[str, Any]]) -> None:
        self.owner = owner
        self.id = sub_id
        self.filters = filters
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.eose = asyncio.Event()
        self.closed_reason: str | None = None
        self.error: RelayError | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._ack: asyncio.Future[None] | None = None  # the answer to the REQ being waited for
        self._ack_on_event = True  # a new REQ is taken at its first event too; a replacing one at EOSE only

    def _put(self, ev: Event) -> None:
        if ev.id not in self._seen:
            self._seen[ev.id] = None
            if len(self._seen) > SEEN:
                self._seen.popitem(last=False)
            self.queue.put_nowait(ev)

    def _fail(self, err: RelayError) -> None:
        if self.error is None:
            self.error, self.closed_reason = err, err.message
            self.eose.set()
            self.queue.put_nowait(None)  # wakes a reader: it raises

    def _got(self, item: Event | None) -> Event:
        if item is None:
            self.queue.put_nowait(None)  # for the next reader too
            assert self.error is not None
            raise self.error
        return item

    async def next(self, timeout: float | None = None) -> Event:
        return self._got(await asyncio.wait_for(self.queue.get(), timeout))

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return self._got(await self.queue.get())

    async def close(self) -> None:
        await self.owner._unsubscribe(self)


def _reason_code(reason: str) -> str:
    head, sep, _ = reason.partition(":")
    return head.strip() if sep and head.strip() and " " not in head.strip() else "error"


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
        self.limits = Limits()  # NIP-11, read when the connection first opens
        self.max_subs: int | None = None  # learned: subscriptions this connection took before refusing one
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._subs: dict[str, Subscription] = {}
        self._oks: dict[str, asyncio.Future[tuple[bool, str]]] = {}
        self._unacked: deque[str] = deque()  # ids sent (EVENT, AUTH) whose OK has not come, in order
        self._authed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._bg: set[asyncio.Task[None]] = set()
        self._limits_read = False

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
                if self._limits_read:
                    await self._dial()
                else:  # the NIP-11 limits are read beside the websocket handshake (bounded), before any use
                    info = asyncio.ensure_future(fetch_limits(self.url, min(self.open_timeout, 3.0)))
                    try:
                        await self._dial()
                    except BaseException:
                        info.cancel()
                        raise
                    self.limits, self._limits_read = await info, True
                await self._ready()
                self._reader = asyncio.create_task(self._run(), name=f"relay-reader {self.url}")
                if self.limits.auth_required:  # NIP-42 first, when the relay says so (bounded)
                    await self._wait_auth(self.open_timeout)
                return
        try:
            await asyncio.wait_for(self._connected.wait(), self.open_timeout)
        except asyncio.TimeoutError:
            raise RelayError(f"relay {self.url} is unreachable (reconnecting)", provider="nostr") from None

    async def _open(self) -> None:
        await self._dial()
        await self._ready()

    async def _dial(self) -> None:
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

    async def _ready(self) -> None:
        self._authed.clear()
        self._unacked.clear()
        self._connected.set()
        for sub in list(self._subs.values()):  # re-sent; a refusal now (CLOSED, NOTICE) fails the subscription
            if sub._ack is None:
                sub._ack, sub._ack_on_event = asyncio.get_running_loop().create_future(), True
                sub._ack.add_done_callback(functools.partial(self._resent, sub))
            await self._send(["REQ", sub.id, *sub.filters])

    def _resent(self, sub: Subscription, f: asyncio.Future[None]) -> None:
        if sub._ack is f:
            sub._ack = None
        err = None if f.cancelled() else f.exception()
        if isinstance(err, SubscriptionRefused):
            sub._fail(err)

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
            for sub in self._subs.values():  # a REQ waiting for its answer is sent again on the new connection
                if sub._ack is not None and not sub._ack.done():
                    sub._ack.set_exception(RelayError(f"relay {self.url} closed the connection", provider="nostr"))
            while not self._closing:
                try:
                    await self._open()
                    delay = 0.05
                    break
                except (RelayError, TimeoutError):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _send(self, msg: list[Any]) -> None:
        await self._send_text(json.dumps(msg, ensure_ascii=False))

    async def _send_text(self, text: str) -> None:
        try:
            await self._ws.send(text)
        except Exception:
            raise RelayError(f"lost the connection to {self.url}", provider="nostr") from None

    async def _handle(self, raw: str | bytes) -> None:
        try:
            msg = json.loads(raw)
            kind = msg[0]
        except (ValueError, IndexError, KeyError, TypeError):
            return
        if kind == "EVENT" and len(msg) >= 3:
            sub = self._subs.get(msg[1]) if isinstance(msg[1], str) else None
            if sub is None:
                return
            ev = verify_json(msg[2])
            if ev is None:
                self.dropped += 1
                log.debug("relay %s: dropped an event with a bad id or signature", self.url)
                return
            if sub._ack is not None and sub._ack_on_event and not sub._ack.done():
                sub._ack.set_result(None)  # an event for a new subscription: it was taken
            sub._put(ev)
        elif kind == "OK" and len(msg) >= 3:
            self._ok(msg[1] if isinstance(msg[1], str) else "", msg[2] is True, str(msg[3]) if len(msg) > 3 else "")
        elif kind == "EOSE" and len(msg) >= 2:
            sub = self._subs.get(msg[1]) if isinstance(msg[1], str) else None
            if sub is not None:
                sub.eose.set()
                if sub._ack is not None and not sub._ack.done():
                    sub._ack.set_result(None)
        elif kind == "CLOSED" and len(msg) >= 2:
            sub = self._subs.get(msg[1]) if isinstance(msg[1], str) else None
            reason = str(msg[2])[:300] if len(msg) > 2 else ""
            if sub is None:
                return
            if reason.startswith("auth-required"):  # resend once authenticated (not in the reader)
                t = asyncio.create_task(self._resubscribe_after_auth(sub, reason))
                self._bg.add(t)
                t.add_done_callback(self._bg.discard)
            else:
                self._refused(sub, reason or "closed by relay", _reason_code(reason))
        elif kind == "NOTICE" and len(msg) >= 2:
            text = str(msg[1])[:300]
            self.notices = (self.notices + [text])[-20:]
            waiting = [s for s in self._subs.values() if s._ack is not None and not s._ack.done()]
            log.info("relay %s: NOTICE %r%s", self.url, text, f" (refuses {len(waiting)} pending REQ)" if waiting else "")
            for sub in waiting:  # a NOTICE instead of an answer to a REQ: that REQ was refused
                self._refused(sub, f"NOTICE {text}", "notice")
        elif kind == "AUTH" and len(msg) >= 2 and isinstance(msg[1], str):
            ev = sign(self.keys, 22242, "", [["relay", self.url], ["challenge", msg[1]]])
            fut: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
            self._oks[ev.id] = fut
            fut.add_done_callback(lambda f: self._auth_done(ev.id, f))
            self._unacked.append(ev.id)
            await self._send(["AUTH", ev.to_json()])

    def _ok(self, eid: str, ok: bool, msg: str) -> None:
        if eid in self._unacked:
            self._unacked.remove(eid)
        elif not eid and self._unacked and not ok:
            # An OK naming no event we sent (nostr-relay answers a refused event with an empty id). The
            # relay answers in order; it is that event's only when one was waiting (no ambiguity).
            if len(self._unacked) == 1:
                eid = self._unacked.popleft()
            log.info("relay %s refused an event without naming it: %r%s", self.url, msg[:200],
                     "" if eid in self._oks else f" ({len(self._unacked)} events awaiting their OK: unattributed)")  # fmt: skip
        fut = self._oks.get(eid)
        if fut is not None and not fut.done():
            fut.set_result((ok, msg))

    def _refused(self, sub: Subscription, reason: str, code: str) -> None:
        self._subs.pop(sub.id, None)
        others = sum(1 for s in self._subs.values() if s._ack is None or s._ack.done())
        err = SubscriptionRefused(f"relay {self.url} refused a subscription: {reason[:200]}", provider="nostr", code=code)
        pending = sub._ack is not None and not sub._ack.done()
        if pending and others:  # refused while holding others: take that as this connection's limit
            err.full = True
            self.max_subs = others if self.max_subs is None else min(self.max_subs, others)
        log.info("relay %s %s subscription %s (%d others open on this connection): %r", self.url,
                 "refused" if pending else "closed", sub.id, others, reason[:200])  # fmt: skip
        if pending:
            assert sub._ack is not None
            sub._ack.set_exception(err)
            sub._ack.exception()  # retrieved here; the waiter re-raises it
        else:
            sub._fail(err)
        if self._connected.is_set() and code == "notice":  # the relay may hold it after all: drop it there
            t = asyncio.create_task(self._quiet_close(sub.id))
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)

    async def _quiet_close(self, sub_id: str) -> None:
        with contextlib.suppress(RelayError):
            await self._send(["CLOSE", sub_id])

    async def _resubscribe_after_auth(self, sub: Subscription, reason: str) -> None:
        if await self._wait_auth(self.open_timeout) and sub.id in self._subs:
            with contextlib.suppress(RelayError):
                await self._send(["REQ", sub.id, *sub.filters])
        elif sub.id in self._subs:
            self._refused(sub, reason, "auth-required")

    def _auth_done(self, eid: str, f: asyncio.Future[tuple[bool, str]]) -> None:
        self._oks.pop(eid, None)
        if not f.cancelled() and f.exception() is None and f.result()[0]:
            self._authed.set()

    async def _wait_auth(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._authed.wait(), timeout)
        return self._authed.is_set()

    # -- limits -------------------------------------------------------------------------------
    def full(self) -> bool:
        """True when this connection holds as many subscriptions as the relay allows on one."""
        cap = min(x for x in (self.limits.max_subscriptions, self.max_subs, 1 << 30) if x is not None)
        return len(self._subs) >= cap

    def _check_event(self, ev: Event, text: str) -> None:
        lim, why = self.limits, ""
        if lim.max_content_length is not None and len(ev.content) > lim.max_content_length:
            why = f"its content has {len(ev.content)} characters; relay {self.url} takes at most {lim.max_content_length}"
        elif lim.max_message_length is not None and len(text.encode()) > lim.max_message_length:
            why = f"it is {len(text.encode())} bytes; relay {self.url} takes messages of at most {lim.max_message_length}"
        elif lim.max_event_tags is not None and len(ev.tags) > lim.max_event_tags:
            why = f"it has {len(ev.tags)} tags; relay {self.url} takes at most {lim.max_event_tags}"
        if why:
            log.info("relay %s: not sending event %s: %s", self.url, ev.id[:12], why)
            raise EventTooLargeError(f"event not sent: {why} (NIP-11)", provider="nostr", code="too_large",
                                     hint="shorten it, or use a relay with higher limits")  # fmt: skip

    def _check_req(self, filters: list[dict[str, Any]], text: str) -> None:
        lim, why = self.limits, ""
        if lim.max_filters is not None and len(filters) > lim.max_filters:
            why = f"{len(filters)} filters; relay {self.url} takes at most {lim.max_filters} per subscription"
        elif lim.max_message_length is not None and len(text.encode()) > lim.max_message_length:
            why = f"{len(text.encode())} bytes; relay {self.url} takes messages of at most {lim.max_message_length}"
        if why:
            raise SubscriptionRefused(f"subscription not sent: {why} (NIP-11)", provider="nostr", code="too_large")

    # -- API ----------------------------------------------------------------------------------
    async def publish(self, ev: Event, timeout: float = 5.0) -> str:
        """Send an event and wait for the relay's OK; raises RelayError when refused.

        Every error raised carries `event_sent`: False only when the event surely never reached
        the relay (no connection, over its published limits, or a refusal of every copy sent),
        True when it may have (a missing OK, a connection lost after sending). A payment request
        must be treated as sent then.
        """
        unsure = False  # a copy went out and the relay neither took nor refused it
        try:
            for attempt in (0, 1, 2):
                await self.connect()
                text = json.dumps(["EVENT", ev.to_json()], ensure_ascii=False)
                self._check_event(ev, text)
                fut: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
                self._oks[ev.id] = fut
                try:
                    self._unacked.append(ev.id)
                    if len(self._unacked) > 1000:  # OKs that never came
                        self._unacked.popleft()
                    await self._send_text(text)
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
                log.info("relay %s refused event %s (kind %d): %r", self.url, ev.id[:12], ev.kind, msg[:200])
                raise RelayError(f"relay {self.url} refused event: {msg[:200]}", provider="nostr", code="rejected")
            raise AssertionError("unreachable")
        except DsrsError as e:
            e.event_sent = unsure  # type: ignore[attr-defined]
            raise

    async def subscribe(self, filters: list[dict[str, Any]], sub_id: str | None = None,
                        sub: Subscription | None = None, *, timeout: float | None = None) -> Subscription:  # fmt: skip
        """Send a REQ and wait (at most `timeout`, default open_timeout) until the relay takes it
        (EOSE or an event). SubscriptionRefused when it answers CLOSED or a NOTICE instead, or when
        this connection is full; TimeoutError when it does not answer."""
        await self.connect()
        if sub is None:
            sub = Subscription(self, sub_id or f"dsrs{next(_ids)}{secrets.token_hex(3)}", filters)
        if self.full():
            err = SubscriptionRefused(f"relay {self.url} allows {len(self._subs)} subscriptions on one connection",
                                      provider="nostr", code="too-many")  # fmt: skip
            err.full = True
            raise err
        sub.filters = filters
        await self._req(sub, timeout, new=True)
        return sub

    async def update(self, sub: Subscription, filters: list[dict[str, Any]], *, timeout: float | None = None) -> None:
        """Replace a subscription's filters (NIP-01: a REQ with the same id replaces it); waits for its EOSE."""
        await self.connect()
        sub.filters = filters
        sub.eose.clear()
        await self._req(sub, timeout, new=False)

    async def _req(self, sub: Subscription, timeout: float | None, *, new: bool) -> None:
        text = json.dumps(["REQ", sub.id, *sub.filters], ensure_ascii=False)
        self._check_req(sub.filters, text)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sub._ack, sub._ack_on_event = ack, new
        self._subs[sub.id] = sub
        wait = self.open_timeout if timeout is None else timeout
        try:
            await self._send_text(text)
            await asyncio.wait_for(asyncio.shield(ack), wait)
        except asyncio.TimeoutError:
            self._drop(sub)
            raise TimeoutError(f"relay {self.url} did not answer a subscription within {wait:g}s", provider="nostr") from None
        except BaseException:
            if not ack.done() or ack.cancelled() or not isinstance(ack.exception(), SubscriptionRefused):
                self._drop(sub)  # cancelled, or the connection went: not left half-open
            raise
        finally:
            if sub._ack is ack:
                sub._ack = None

    def _drop(self, sub: Subscription) -> None:
        if self._subs.pop(sub.id, None) is not None and self._connected.is_set():
            t = asyncio.ensure_future(self._quiet_close(sub.id))
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)

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
        for sub in list(self._subs.values()):
            err = SubscriptionRefused(f"relay client for {self.url} closed", provider="nostr", code="closed")
            if sub._ack is not None and not sub._ack.done():
                sub._ack.set_exception(err)
            sub._fail(err)
        self._subs.clear()
        for fut in self._oks.values():
            if not fut.done():
                fut.set_exception(RelayError(f"relay client for {self.url} closed", provider="nostr"))


class _Part(Subscription):
    """A pool subscription's share on one connection: feeds the pool's queue, reports its failure."""

    def __init__(self, pool_sub: _PoolSub, relay: Relay) -> None:
        super().__init__(relay, pool_sub.id, pool_sub.filters)
        self.pool_sub = pool_sub
        self.eose = pool_sub.eose

    def _put(self, ev: Event) -> None:
        self.pool_sub._put(ev)

    def _fail(self, err: RelayError) -> None:
        if self.error is None:
            self.error = err
            self.pool_sub._part_failed(self, err)


class _PoolSub(Subscription):
    def __init__(self, pool: RelayPool, sub_id: str, filters: list[dict[str, Any]]) -> None:
        super().__init__(pool, sub_id, filters)
        self.parts: list[_Part] = []

    def _part_failed(self, part: _Part, err: RelayError) -> None:
        if part in self.parts:
            self.parts.remove(part)
        if not self.parts:  # every relay closed it
            self._fail(err)


class RelayPool:
    """Several relays as one: publish to all (ok if any accepts), subscribe to all (deduped).

    Publishing uses each relay's first connection; a subscription goes on the first connection
    with room, and a relay that refuses one on a connection holding others gets another
    connection (at most `max_connections` per relay)."""

    def __init__(self, urls: list[str], keys: Keys | None = None, *, max_connections: int = MAX_CONNECTIONS,
                 **kw: Any) -> None:  # fmt: skip
        if not urls:
            raise RelayError("no relay URL given", hint="pass a relay URL or set PYLON_RELAY_URL")
        self.keys = keys or Keys.generate()
        self.max_connections = max_connections
        self._kw = kw
        self.conns: dict[str, list[Relay]] = {u: [Relay(u, self.keys, **kw)] for u in dict.fromkeys(urls)}

    @property
    def relays(self) -> list[Relay]:
        """Each relay's first connection (the one events are published on)."""
        return [c[0] for c in self.conns.values()]

    @property
    def urls(self) -> list[str]:
        return list(self.conns)

    @property
    def dropped(self) -> int:
        return sum(r.dropped for c in self.conns.values() for r in c)

    async def _each(self, fn: Any) -> list[Any]:
        res = await asyncio.gather(*(fn(u) for u in self.conns), return_exceptions=True)
        for x in res:
            if isinstance(x, BaseException) and not isinstance(x, Exception):
                raise x  # cancelled
        if all(isinstance(x, BaseException) for x in res):
            raise res[0]
        return [x for x in res if not isinstance(x, BaseException)]

    async def connect(self) -> None:
        await self._each(lambda u: self.conns[u][0].connect())

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

    async def subscribe(self, filters: list[dict[str, Any]], *, timeout: float | None = None) -> Subscription:
        """Subscribe on every relay; taken when at least one relay takes it (see Relay.subscribe)."""
        sub = _PoolSub(self, f"dsrs{next(_ids)}{secrets.token_hex(3)}", filters)
        await self._each(lambda u: self._place(u, sub, timeout))
        return sub

    async def _place(self, url: str, sub: _PoolSub, timeout: float | None) -> _Part:
        """Put `sub` on the first connection to `url` with room, opening another when one is full."""
        conns, last, i = self.conns[url], None, 0
        while i < self.max_connections:
            if i == len(conns):
                conns.append(Relay(url, self.keys, **self._kw))
                log.info("relay %s: opening connection %d (the others are full)", url, i + 1)
            r, i = conns[i], i + 1
            try:
                part = _Part(sub, r)
                await r.subscribe(sub.filters, sub=part, timeout=timeout)
            except SubscriptionRefused as e:
                if not e.full:
                    raise
                last = e
                continue
            sub.parts.append(part)
            return part
        raise SubscriptionRefused(f"relay {url} refused the subscription on all {self.max_connections} connections"
                                  f" ({last.message if last else 'full'})", provider="nostr", code="too-many",
                                  hint="close subscriptions you no longer need")  # fmt: skip

    async def update(self, sub: Subscription, filters: list[dict[str, Any]], *, timeout: float | None = None) -> None:
        """New filters for a pool subscription (a REQ with its id on each connection holding it).
        A relay that refuses the new REQ gets it on another connection; one that held no part yet
        (it refused before) is asked again."""
        assert isinstance(sub, _PoolSub)
        sub.filters = filters

        async def one(url: str) -> Any:
            part = next((p for p in sub.parts if p.owner.url == url), None)
            if part is not None:
                try:
                    return await part.owner.update(part, filters, timeout=timeout)
                except SubscriptionRefused:
                    if part in sub.parts:
                        sub.parts.remove(part)
            return await self._place(url, sub, timeout)

        await self._each(one)

    async def _unsubscribe(self, sub: Subscription) -> None:
        for part in list(getattr(sub, "parts", ())):
            await part.close()

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for c in self.conns.values() for r in c))
