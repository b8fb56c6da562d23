"""Nostr, as much as dsrs needs: NIP-01 events, keys, a relay client, NIP-44 v2 / NIP-04 encryption.

Needs the `pylon` extra (`coincurve`, `websockets`, `cryptography`); nothing loads at `import dsrs`.
"""

from __future__ import annotations

from .event import Event, sign, verify_json
from .keys import Keys
from .relay import Relay, RelayError, RelayPool, Subscription

__all__ = ["Event", "Keys", "Relay", "RelayError", "RelayPool", "Subscription", "sign", "verify_json"]
