"""NIP-11 relay information: the `limitation` a relay publishes, fetched once per relay URL.

`GET http(s)://<relay>` with `Accept: application/nostr+json`, bounded by a timeout, cached per
process (a failure is cached for a minute, then tried again). A relay that publishes nothing,
or cannot be reached over HTTP, has no known limits: `Limits()`, every field None.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dsrs.nostr")
RETRY_S = 60.0  # a relay whose document could not be read is asked again after this long
_cache: dict[str, tuple[float, Limits]] = {}


@dataclass(frozen=True, slots=True)
class Limits:
    """NIP-11 `limitation` fields dsrs respects (None: not published)."""

    max_subscriptions: int | None = None  # per connection
    max_message_length: int | None = None  # bytes of one websocket message
    max_content_length: int | None = None  # characters of an event's content
    max_filters: int | None = None  # per REQ
    max_event_tags: int | None = None
    auth_required: bool = False  # NIP-42 auth before anything else

    @classmethod
    def parse(cls, doc: Any) -> Limits:
        lim = doc.get("limitation") if isinstance(doc, dict) else None
        if not isinstance(lim, dict):
            return cls()

        def pos(name: str) -> int | None:
            v = lim.get(name)
            return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

        return cls(pos("max_subscriptions"), pos("max_message_length"), pos("max_content_length"),
                   pos("max_filters"), pos("max_event_tags"), lim.get("auth_required") is True)  # fmt: skip


def http_url(relay_url: str) -> str:
    return "http" + relay_url[2:] if relay_url.startswith("ws") else relay_url


async def limits(relay_url: str, timeout: float = 3.0) -> Limits:
    """The relay's published limits (cached); `Limits()` when it publishes none or does not answer."""
    hit = _cache.get(relay_url)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    from .. import http

    aiohttp = http._lib()
    ok = False
    try:
        async with http.session().get(http_url(relay_url), headers={"Accept": "application/nostr+json"},
                                      timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False) as r:  # fmt: skip
            body = await r.content.read(256 * 1024) if r.status == 200 else b""
        got = Limits.parse(json.loads(body)) if body else Limits()
        ok = r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        log.debug("relay %s: no NIP-11 document (%s)", relay_url, type(e).__name__)
        got = Limits()
    if got != Limits():
        log.debug("relay %s publishes limits: %s", relay_url, got)
    _cache[relay_url] = (time.monotonic() + (1e9 if ok else RETRY_S), got)
    return got
