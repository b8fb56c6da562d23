"""Pylon: paid inference over Nostr (NIP-90 swarm), local models, and hybrid; plus the provider side.

Job prompts are public on the relays (NIP-90 jobs are not encrypted here): do not send secrets
to the swarm. The swarm and wallets need the `pylon` extra; `PylonLM` itself (and local mode)
imports without it, and a swarm call without it is a ConfigurationError naming the extra.
"""

from __future__ import annotations

from typing import Any

from .errors import PaymentError, PaymentRequiredError, PaymentUnknownError, SwarmJobError
from .lm import PylonLM

_LAZY = {"Quote": ".swarm", "NwcWallet": ".wallet", "Payment": ".wallet", "Wallet": ".wallet"}


def __getattr__(name: str) -> Any:  # PEP 562: these need the pylon extra
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dsrs.pylon' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


__all__ = ["NwcWallet", "Payment", "PaymentError", "PaymentRequiredError", "PaymentUnknownError",
           "PylonLM", "Quote", "SwarmJobError", "Wallet"]  # fmt: skip
