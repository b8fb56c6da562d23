"""Pylon: paid inference over Nostr (NIP-90 swarm), local models, and hybrid; plus the provider side.

Job prompts are public on the relays (NIP-90 jobs are not encrypted here): do not send secrets
to the swarm. Needs the `pylon` extra.
"""

from __future__ import annotations

from .errors import PaymentError, PaymentRequiredError, PaymentUnknownError, SwarmJobError
from .lm import PylonLM
from .swarm import Quote
from .wallet import NwcWallet, Payment, Wallet

__all__ = ["NwcWallet", "Payment", "PaymentError", "PaymentRequiredError", "PaymentUnknownError",
           "PylonLM", "Quote", "SwarmJobError", "Wallet"]  # fmt: skip
