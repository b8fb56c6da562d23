"""Paying: the `Wallet` protocol and `NwcWallet`, NIP-47 Nostr Wallet Connect over a relay.

`NwcWallet("nostr+walletconnect://<wallet pubkey>?relay=wss://...&secret=<hex>")` encrypts with
NIP-44 v2 when the wallet's info event (kind 13194) offers it, else NIP-04. Requests are kind
23194, answers kind 23195 tagged with the request id; we subscribe before sending. A payment
counts only when sha256(preimage) equals the invoice's payment hash. The URI's secret, invoices
and preimages never appear in reprs, logs or error text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlparse

from ..errors import ConfigurationError
from ..nostr import Keys, nip04, nip44, sign
from ..nostr.keys import pubkey_hex
from . import bolt11, pools
from .errors import PaymentError, PaymentUnknownError

INFO, REQUEST, RESPONSE = 13194, 23194, 23195


@dataclass(frozen=True, slots=True)
class Payment:
    preimage: str = field(repr=False)
    fees_paid_msats: int = 0


@runtime_checkable
class Wallet(Protocol):
    async def pay_invoice(self, invoice: str) -> Payment: ...

    async def make_invoice(self, amount_msats: int, description: str = "", expiry: int | None = None) -> str: ...

    async def lookup_invoice(self, payment_hash: str) -> dict[str, Any]: ...

    async def balance(self) -> int: ...


class NwcWallet:
    """A NIP-47 wallet connection. `timeout` bounds each request (seconds)."""

    def __init__(self, uri: str | None = None, *, timeout: float = 30.0) -> None:
        uri = uri or os.environ.get("PYLON_NWC_URI")
        if not uri:
            raise ConfigurationError("no wallet connection URI", hint="pass nostr+walletconnect://... or set PYLON_NWC_URI")
        u = urlparse(uri.strip())
        if u.scheme not in ("nostr+walletconnect", "nostrwalletconnect"):
            raise ConfigurationError("not a Nostr Wallet Connect URI", hint="it starts with nostr+walletconnect://")
        q = parse_qs(u.query)
        if not q.get("relay") or not q.get("secret"):
            raise ConfigurationError("the wallet URI needs relay= and secret=")
        self.wallet_pubkey = pubkey_hex(u.netloc or u.path.lstrip("/"))
        self.relays = tuple(q["relay"])
        self._keys = Keys(q["secret"][0])
        self.timeout = timeout
        self._encryption: str | None = None

    def __repr__(self) -> str:
        return f"NwcWallet(wallet={self.wallet_pubkey[:12]}..., relays={list(self.relays)})"

    @property
    def client_pubkey(self) -> str:
        return self._keys.pubkey

    async def encryption(self) -> str:
        """'nip44_v2' when the wallet's info event offers it, else 'nip04' (NIP-47's rule)."""
        if self._encryption is None:
            p = pools.pool(self.relays)
            sub = await p.subscribe([{"kinds": [INFO], "authors": [self.wallet_pubkey], "limit": 1}])
            mode = "nip04"
            try:
                try:  # stored events come before EOSE on the same connection
                    await asyncio.wait_for(sub.eose.wait(), self.timeout)
                except asyncio.TimeoutError:
                    raise PaymentError("the wallet's relay did not answer", provider="nwc", code="TIMEOUT") from None
                while not sub.queue.empty():
                    ev = sub.queue.get_nowait()
                    tag = ev.tag("encryption") or []
                    if ev.kind == INFO and ev.pubkey == self.wallet_pubkey and "nip44_v2" in " ".join(tag[1:2]).split():
                        mode = "nip44_v2"
            finally:
                await sub.close()
            self._encryption = mode
        return self._encryption

    def _encrypt(self, text: str, mode: str) -> str:
        if mode == "nip44_v2":
            return nip44.encrypt(text, nip44.conversation_key(self._keys, self.wallet_pubkey))
        return nip04.encrypt(text, self._keys, self.wallet_pubkey)

    def _decrypt(self, text: str, mode: str) -> str:
        if mode == "nip44_v2" and "?iv=" not in text:
            return nip44.decrypt(text, nip44.conversation_key(self._keys, self.wallet_pubkey))
        return nip04.decrypt(text, self._keys, self.wallet_pubkey)

    async def request(self, method: str, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """One NIP-47 call; returns `result`, raises PaymentError (wallet error) or PaymentUnknownError (no answer)."""
        mode = await self.encryption()
        timeout = self.timeout if timeout is None else timeout
        tags = [["p", self.wallet_pubkey], ["expiration", str(int(time.time() + timeout) + 1)]]
        if mode == "nip44_v2":
            tags.append(["encryption", "nip44_v2"])
        ev = sign(self._keys, REQUEST, self._encrypt(json.dumps({"method": method, "params": params}), mode), tags)
        p = pools.pool(self.relays)
        sub = await p.subscribe([{"kinds": [RESPONSE], "authors": [self.wallet_pubkey], "#e": [ev.id]}])
        try:
            await p.publish(ev, timeout=min(timeout, 10.0))
            deadline = time.monotonic() + timeout
            while True:
                try:
                    resp = await sub.next(max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise PaymentUnknownError(f"the wallet did not answer {method} within {timeout}s",
                                              provider="nwc", code="TIMEOUT",
                                              hint="check the wallet; the budget keeps this amount reserved") from None  # fmt: skip
                if resp.pubkey != self.wallet_pubkey or resp.tag_value("e") != ev.id:
                    continue
                try:
                    body = json.loads(self._decrypt(resp.content, mode))
                except ValueError:
                    continue  # not for us, or garbage
                if not isinstance(body, dict) or body.get("result_type", method) != method:
                    continue
                err = body.get("error")
                if err:
                    code = str(err.get("code", "OTHER")) if isinstance(err, dict) else "OTHER"
                    msg = str(err.get("message", "")) if isinstance(err, dict) else str(err)
                    raise PaymentError(f"wallet refused {method}: {msg[:200]}", provider="nwc", code=code)
                result = body.get("result")
                if not isinstance(result, dict):
                    raise PaymentError(f"wallet answered {method} without a result", provider="nwc", code="OTHER")
                return result
        finally:
            await sub.close()

    async def pay_invoice(self, invoice: str) -> Payment:
        inv = bolt11.decode(invoice)
        try:
            r = await self.request("pay_invoice", {"invoice": invoice})
        except PaymentError as e:
            if e.code in ("PAYMENT_FAILED", "INSUFFICIENT_BALANCE", "QUOTA_EXCEEDED", "RESTRICTED", "UNAUTHORIZED",
                          "NOT_IMPLEMENTED", "RATE_LIMITED", "UNSUPPORTED_ENCRYPTION", "NOT_FOUND") or isinstance(e, PaymentUnknownError):  # fmt: skip
                raise
            raise PaymentUnknownError(f"the wallet reported {e.code}; the payment may or may not have gone out",
                                      provider="nwc", code=e.code) from None  # fmt: skip
        pre = str(r.get("preimage", ""))
        try:
            ok = hashlib.sha256(bytes.fromhex(pre)).hexdigest() == inv.payment_hash
        except ValueError:
            ok = False
        if not ok:
            raise PaymentUnknownError("the wallet's preimage does not match the invoice's payment hash",
                                      provider="nwc", code="BAD_PREIMAGE")  # fmt: skip
        return Payment(pre, int(r.get("fees_paid") or 0))

    async def make_invoice(self, amount_msats: int, description: str = "", expiry: int | None = None) -> str:
        params: dict[str, Any] = {"amount": amount_msats, "description": description}
        if expiry is not None:
            params["expiry"] = expiry
        r = await self.request("make_invoice", params)
        inv = str(r.get("invoice", ""))
        bolt11.decode(inv)
        return inv

    async def lookup_invoice(self, payment_hash: str) -> dict[str, Any]:
        return await self.request("lookup_invoice", {"payment_hash": payment_hash})

    async def balance(self) -> int:
        return int((await self.request("get_balance", {})).get("balance", 0))
