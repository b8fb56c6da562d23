"""Relay connections shared per event loop (like http.py's session): one RelayPool per relay set,
and on it `Feed`s: one subscription shared by every in-flight job (or wallet request) of the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any

from ..nostr import Event, Keys, RelayError, RelayPool, Subscription

log = logging.getLogger("dsrs.nostr")
SINCE_SLACK_S = 60  # a replacing REQ asks for stored events this far back (what arrived while it was swapped)

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], Any]]
_pools = weakref.WeakKeyDictionary()


def pool(urls: list[str] | tuple[str, ...], keys: Keys | None = None) -> RelayPool:
    """This loop's connections to `urls` (NIP-42 auth as `keys`, else an anonymous key)."""
    per = _pools.setdefault(asyncio.get_running_loop(), {})
    key = (tuple(urls), keys.pubkey if keys else "")
    p = per.get(key)
    if p is None:
        p = per[key] = RelayPool(list(urls), keys)
    return p


def feed(urls: list[str] | tuple[str, ...], base: dict[str, Any], *, by: str = "e", dynamic: bool = True) -> Feed:
    """This loop's shared subscription `base` on `urls`; events go to the waiter named by their first `by` tag.
    `dynamic`: the filter lists the waiters (`#<by>`), re-sent as they come; else `base` alone."""
    per = _pools.setdefault(asyncio.get_running_loop(), {})
    key = ("feed", tuple(urls), repr(sorted(base.items())), by, dynamic)
    f = per.get(key)
    if f is None:
        f = per[key] = Feed(pool(urls), base, by=by, dynamic=dynamic)
    return f


class Feed:
    """One subscription for many waiters, instead of one each (relays cap subscriptions per connection).

    `await add(value)` registers a waiter and returns its queue once the relay has taken a REQ that
    covers it (so publish after it: nothing is missed). Dynamic feeds re-send the REQ under the same
    id with the waiters' values (NIP-01: it replaces the previous one), coalescing concurrent adds
    into one REQ, with a `since` that covers events arriving while it is swapped. Events are routed
    by their first `by` tag; a subscription the relays close is opened again once, and if that
    fails too every waiter's queue receives the error."""

    def __init__(self, pool: RelayPool, base: dict[str, Any], *, by: str = "e", dynamic: bool = True) -> None:
        self.pool, self.base, self.by, self.dynamic = pool, base, by, dynamic
        self.waiters: dict[str, asyncio.Queue[Event | BaseException]] = {}
        self.sub: Subscription | None = None
        self.reqs = 0  # REQs sent (for tests and logs)
        self._lock = asyncio.Lock()
        self._wanted = 0  # bumped by every add
        self._covered = 0  # the last add the relays have taken a REQ for
        self._reader: asyncio.Task[None] | None = None

    def _filters(self) -> list[dict[str, Any]]:
        if not self.dynamic:
            return [self.base]
        return [{**self.base, f"#{self.by}": list(self.waiters), "since": int(time.time()) - SINCE_SLACK_S}]

    async def add(self, value: str, timeout: float) -> asyncio.Queue[Event | BaseException]:
        """A queue of the events for `value` (an exception in it: the subscription is lost)."""
        q: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.waiters[value] = q
        self._wanted += 1
        want = self._wanted
        try:
            await asyncio.wait_for(self._sync(want, timeout), timeout)
        except BaseException:
            self.waiters.pop(value, None)
            raise
        return q

    def remove(self, value: str) -> None:
        """Forget `value` (the next REQ leaves it out; its late events are dropped)."""
        self.waiters.pop(value, None)

    async def _sync(self, want: int, timeout: float) -> None:
        async with self._lock:
            if self.sub is not None and self.sub.error is None and (self._covered >= want or not self.dynamic):
                return  # a REQ sent while this one waited covers it
            upto = self._wanted
            filters = self._filters()
            self.reqs += 1
            if self.sub is None or self.sub.error is not None:
                self.sub = await self.pool.subscribe(filters, timeout=timeout)
                self._start_reader(self.sub)
            else:
                await self.pool.update(self.sub, filters, timeout=timeout)
            self._covered = upto

    def _start_reader(self, sub: Subscription) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._reader = asyncio.create_task(self._read(sub), name="dsrs-feed")

    async def _read(self, sub: Subscription) -> None:
        try:
            async for ev in sub:
                q = self.waiters.get(ev.tag_value(self.by) or "")
                if q is not None:
                    q.put_nowait(ev)
                else:
                    log.debug("feed: event %s for no waiter dropped", ev.id[:12])
        except RelayError as e:
            log.info("feed: the relays closed the shared subscription (%s); opening it again", e.message)
            if self.sub is sub:
                self.sub = None
            if not self.waiters:
                return
            try:  # once; the waiters hear of a second loss
                async with self._lock:
                    self.reqs += 1
                    self.sub = await self.pool.subscribe(self._filters())
                    self._covered = self._wanted
                self._reader = None
                self._start_reader(self.sub)
            except Exception as e2:  # noqa: BLE001 - handed to every waiter
                self.sub = None
                for q in list(self.waiters.values()):
                    q.put_nowait(e2)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.close()


async def aclose() -> None:
    """Close this loop's relay connections (optional; tests and servers call it on the way out)."""
    per = _pools.pop(asyncio.get_running_loop(), {})
    feeds = [f for f in per.values() if isinstance(f, Feed)]
    await asyncio.gather(*(f.close() for f in feeds), return_exceptions=True)
    await asyncio.gather(*(p.close() for p in per.values() if isinstance(p, RelayPool)), return_exceptions=True)
