"""dsrs's Nostr client against a third-party relay (PyPI nostr-relay, stock config): the basics hold."""

from __future__ import annotations

from typing import Any

import pytest

from dsrs.nostr.event import sign
from dsrs.nostr.keys import Keys
from dsrs.nostr.relay import Relay, RelayError


async def test_publish_and_subscribe_through_the_stock_relay(stock_relay: Any) -> None:
    keys = Keys.generate()
    relay = Relay(stock_relay.url, keys)
    await relay.connect()
    try:
        sub = await relay.subscribe([{"kinds": [5050], "authors": [keys.pubkey]}])
        ev = sign(keys, 5050, "", [["i", "hello", "text"]])
        await relay.publish(ev)  # raises unless the relay answers OK true
        got = await sub.next(timeout=10)
        assert got.id == ev.id and got.verify()
    finally:
        await relay.close()


async def test_the_stock_relay_keeps_its_stock_content_limit(stock_relay: Any) -> None:
    keys = Keys.generate()
    relay = Relay(stock_relay.url, keys)
    try:
        with pytest.raises(RelayError):  # nostr-relay's is_not_too_large: 4,096 characters of content
            await relay.publish(sign(keys, 1, "x" * 4097))
    finally:
        await relay.close()
