"""Relay connections shared per event loop (like http.py's session): one RelayPool per relay set."""

from __future__ import annotations

import asyncio
import weakref

from ..nostr import Keys, RelayPool

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[tuple[str, ...], str], RelayPool]]
_pools = weakref.WeakKeyDictionary()


def pool(urls: list[str] | tuple[str, ...], keys: Keys | None = None) -> RelayPool:
    """This loop's connections to `urls` (NIP-42 auth as `keys`, else an anonymous key)."""
    per = _pools.setdefault(asyncio.get_running_loop(), {})
    key = (tuple(urls), keys.pubkey if keys else "")
    p = per.get(key)
    if p is None:
        p = per[key] = RelayPool(list(urls), keys)
    return p


async def aclose() -> None:
    """Close this loop's relay connections (optional; tests and servers call it on the way out)."""
    per = _pools.pop(asyncio.get_running_loop(), {})
    await asyncio.gather(*(p.close() for p in per.values()), return_exceptions=True)
