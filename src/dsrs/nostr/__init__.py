"""Nostr, as much as dsrs needs: NIP-01 events, keys, a relay client, NIP-44 v2 / NIP-04 encryption.

Needs the `pylon` extra (`coincurve`, `websockets`, `cryptography`); nothing loads at `import dsrs`.
"""

from __future__ import annotations

from importlib.util import find_spec as _find

try:
    for _dep in ("websockets", "cryptography"):  # loaded later, on first use; checked now
        if _find(_dep) is None:
            raise ImportError(name=_dep)
    from .event import Event, sign, verify_json
    from .keys import Keys
    from .relay import EventTooLargeError, Relay, RelayError, RelayPool, Subscription, SubscriptionRefused
except ImportError as _e:  # the extra is missing: say how to get it (nothing was sent)
    from ..errors import ConfigurationError

    raise ConfigurationError(f"Nostr and the Pylon swarm need the pylon extra ({_e.name or _e} is missing)",
                             provider="pylon", hint="pip install 'dsrs[pylon]'") from None  # fmt: skip

__all__ = ["Event", "EventTooLargeError", "Keys", "Relay", "RelayError", "RelayPool", "Subscription",
           "SubscriptionRefused", "sign", "verify_json"]
