"""Paying: the `Wallet` protocol and `NwcWallet`, NIP-47 Nostr Wallet Connect over a relay.

`NwcWallet("nostr+walletconnect://<wallet pubkey>?relay=wss://...&secret=<hex>")` encrypts with
NIP-44 v2 when the wallet's info event (kind 13194) offers it, else NIP-04. Requests are kind
23194, answers kind 23195 tagged with the request id, read on one subscription per wallet (and
event loop) shared by every request, taken by the relay before the first request is sent. A payment
counts only when sha256(preimage) equals the invoice's payment hash. The URI's secret, invoices
and preimages never appear in reprs, logs or error text.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlparse

from ..errors import APIConnectionError, ConfigurationError
from ..nostr import Keys, nip04, nip44, sign
from ..nostr.keys import pubkey_hex
from . import bolt11, pools
from .errors import PaymentError, PaymentUnknownError

INFO, REQUEST, RESPONSE = 13194, 23194, 23195
log = logging.getLogger("dsrs.pylon.wallet")


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
        self._info_query: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[str]] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"NwcWallet(wallet={self.wallet_pubkey[:12]}..., relays={list(self.relays)})"

    @property
    def client_pubkey(self) -> str:
        return self._keys.pubkey

    async def encryption(self, timeout: float | None = None) -> str:
        """'nip44_v2' when the wallet's info event offers it, else 'nip04' (NIP-47's rule). The info
        query waits at most `timeout` (default self.timeout); no answer is a PaymentError with code
        NOT_SENT (no request has been sent yet)."""
        if self._encryption is None:
            timeout = self.timeout if timeout is None else timeout
            loop = asyncio.get_running_loop()
            query = self._info_query.get(loop)
            if query is None or query.done():  # one query at a time: concurrent calls share it
                query = self._info_query[loop] = asyncio.ensure_future(self._info())
                query.add_done_callback(lambda f: None if f.cancelled() else f.exception())
            try:
                mode = await asyncio.wait_for(asyncio.shield(query), max(0.0, timeout))
            except (asyncio.TimeoutError, builtins.TimeoutError, APIConnectionError):
                log.info("the wallet's relay did not answer the info query (kind 13194) within %gs", timeout)
                raise PaymentError(f"the wallet's relay did not answer the wallet info query within {timeout:g}s; nothing was sent",
                                   provider="nwc", code="NOT_SENT", hint="check the relay in the wallet URI (relay=...)") from None  # fmt: skip
            self._encryption = mode
        return self._encryption

    async def _info(self) -> str:
        p = pools.pool(self.relays)
        sub = await p.subscribe([{"kinds": [INFO], "authors": [self.wallet_pubkey], "limit": 1}])
        mode = "nip04"
        try:
            await asyncio.wait_for(sub.eose.wait(), self.timeout)  # stored events come before EOSE on the same connection
            while not sub.queue.empty():
                ev = sub.queue.get_nowait()
                if ev is None:  # the relay closed it
                    raise sub.error or APIConnectionError("the info subscription was closed", provider="nwc")
                tag = ev.tag("encryption") or []
                if ev.kind == INFO and ev.pubkey == self.wallet_pubkey and "nip44_v2" in " ".join(tag[1:2]).split():
                    mode = "nip44_v2"
        finally:
            await sub.close()
        return mode

    def _encrypt(self, text: str, mode: str) -> str:
        if mode == "nip44_v2":
            return nip44.encrypt(text, nip44.conversation_key(self._keys, self.wallet_pubkey))
        return nip04.encrypt(text, self._keys, self.wallet_pubkey)

    def _decrypt(self, text: str, mode: str) -> str:
        if mode == "nip44_v2" and "?iv=" not in text:
            return nip44.decrypt(text, nip44.conversation_key(self._keys, self.wallet_pubkey))
        return nip04.decrypt(text, self._keys, self.wallet_pubkey)

    async def request(self, method: str, params: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """One NIP-47 call within `timeout` seconds in all (default self.timeout); returns `result`.

        Raises PaymentError when the wallet refused, or with code NOT_SENT when the request surely
        never reached the relay; PaymentUnknownError when it may have and no answer came in time.
        A missing OK from the relay is not the end: the wallet's answer may still come."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        mode = await self.encryption(timeout)
        left = max(0.0, deadline - time.monotonic())
        tags = [["p", self.wallet_pubkey], ["expiration", str(int(time.time() + left) + 1)]]
        if mode == "nip44_v2":
            tags.append(["encryption", "nip44_v2"])
        ev = sign(self._keys, REQUEST, self._encrypt(json.dumps({"method": method, "params": params}), mode), tags)
        p = pools.pool(self.relays)
        feed = self._responses()
        try:
            queue = await feed.add(ev.id, left)
        except (asyncio.TimeoutError, builtins.TimeoutError, APIConnectionError) as e:
            log.info("the wallet's relay did not take the subscription for its answers (%s); %s not sent", type(e).__name__, method)
            raise PaymentError(f"could not reach the wallet's relay; the {method} request was not sent", provider="nwc",
                               code="NOT_SENT", hint="check the relay in the wallet URI (relay=...)") from None  # fmt: skip
        pub: asyncio.Future[None] | None = asyncio.ensure_future(p.publish(ev, timeout=left))
        got: asyncio.Future[Any] | None = None
        try:
            while True:
                left = deadline - time.monotonic()
                if got is None:
                    got = asyncio.ensure_future(queue.get())
                done: set[Any] = set()
                if left > 0:
                    done, _ = await asyncio.wait({got} | ({pub} if pub else set()), timeout=left,
                                                 return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if pub is not None and pub in done:
                    err = pub.exception()
                    pub = None
                    if err is not None and getattr(err, "event_sent", True) is False:
                        raise PaymentError(f"the wallet's relay did not take the {method} request; nothing was sent",
                                           provider="nwc", code="NOT_SENT", hint="check the relay in the wallet URI") from None  # fmt: skip
                    if err is not None:  # it may have reached the wallet: its answer decides
                        log.info("no OK from the wallet's relay for %s (%s); waiting for the wallet's answer", method,
                                 getattr(err, "code", None) or type(err).__name__)  # fmt: skip
                if got not in done:
                    if not done:
                        raise PaymentUnknownError(f"the wallet did not answer {method} within {timeout:g}s",
                                                  provider="nwc", code="TIMEOUT",
                                                  hint="check the wallet; the budget keeps this amount reserved")  # fmt: skip
                    continue
                resp, got = got.result(), None
                if isinstance(resp, BaseException):  # the subscription for the answers is lost: the request may be out
                    log.info("lost the subscription for the wallet's answers (%s) while waiting for %s", type(resp).__name__, method)
                    raise PaymentUnknownError(f"lost the wallet relay's subscription before the wallet answered {method}",
                                              provider="nwc", code="TIMEOUT", hint="check the wallet; the budget keeps this amount reserved")  # fmt: skip
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
            for t in (pub, got):
                if t is not None and not t.done():
                    t.cancel()
            if pub is not None and pub.done() and not pub.cancelled():
                pub.exception()  # retrieved: the answer came first
            feed.remove(ev.id)

    def _responses(self) -> pools.Feed:
        """This loop's one subscription to this wallet's answers to us (kind 23195, `#p` our key),
        shared by every request; an answer goes to the request its `e` tag names."""
        return pools.feed(self.relays, {"kinds": [RESPONSE], "authors": [self.wallet_pubkey], "#p": [self.client_pubkey]},
                          dynamic=False)  # fmt: skip

    async def pay_invoice(self, invoice: str, *, timeout: float | None = None) -> Payment:
        inv = bolt11.decode(invoice)
        try:
            r = await self.request("pay_invoice", {"invoice": invoice}, timeout=timeout)
        except PaymentError as e:
            if e.code in ("PAYMENT_FAILED", "INSUFFICIENT_BALANCE", "QUOTA_EXCEEDED", "RESTRICTED", "UNAUTHORIZED",
                          "NOT_IMPLEMENTED", "RATE_LIMITED", "UNSUPPORTED_ENCRYPTION", "NOT_FOUND", "NOT_SENT") or isinstance(e, PaymentUnknownError):  # fmt: skip
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

    async def lookup_invoice(self, payment_hash: str, *, timeout: float | None = None) -> dict[str, Any]:
        """The wallet's record of an invoice or an outgoing payment (NIP-47: `preimage` once settled)."""
        return await self.request("lookup_invoice", {"payment_hash": payment_hash}, timeout=timeout)

    async def balance(self) -> int:
        return int((await self.request("get_balance", {})).get("balance", 0))

    # -- notifications (NIP-47: kind 23196 NIP-04, 23197 NIP-44) ---------------------------------
    async def notification_types(self, timeout: float | None = None) -> frozenset[str]:
        """The notification types the wallet's info event (13194) lists in its `notifications` tag,
        e.g. {'payment_received'}; empty when it lists none or the relay does not answer in time."""
        cached: frozenset[str] | None = getattr(self, "_notification_types", None)
        if cached is not None:
            return cached
        import contextlib

        timeout = self.timeout if timeout is None else timeout
        found: set[str] = set()
        try:
            sub = await asyncio.wait_for(pools.pool(self.relays).subscribe(
                [{"kinds": [INFO], "authors": [self.wallet_pubkey], "limit": 1}]), max(0.0, timeout))  # fmt: skip
        except (asyncio.TimeoutError, builtins.TimeoutError, APIConnectionError):
            log.info("no wallet info event within %gs: no notifications assumed", timeout)
            return frozenset()
        try:
            with contextlib.suppress(asyncio.TimeoutError, builtins.TimeoutError):
                await asyncio.wait_for(sub.eose.wait(), max(0.0, timeout))
            while not sub.queue.empty():
                ev = sub.queue.get_nowait()
                tag = ev.tag("notifications") or []
                if ev.kind == INFO and ev.pubkey == self.wallet_pubkey and len(tag) > 1:
                    found.update(tag[1].split())
        finally:
            await sub.close()
        self._notification_types = frozenset(found)
        return self._notification_types

    async def open_notifications(self, timeout: float | None = None) -> Any:
        """Subscribe to this connection's notifications (23197 when it speaks NIP-44, else 23196) and
        return the subscription once the relay has confirmed it (EOSE) within `timeout`; PaymentError
        NOT_SENT when it did not (a relay that refused the subscription, e.g. with a NOTICE). Read its
        events with `read_notification`; close it when done."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        kind = NOTIFY_NIP44 if await self.encryption(timeout) == "nip44_v2" else NOTIFY_NIP04
        filt = {"kinds": [kind], "authors": [self.wallet_pubkey], "#p": [self.client_pubkey], "since": int(time.time()) - 5}
        sub = None
        try:
            sub = await asyncio.wait_for(pools.pool(self.relays).subscribe([filt]), max(0.0, deadline - time.monotonic()))
            await asyncio.wait_for(sub.eose.wait(), max(0.0, deadline - time.monotonic()))
            if sub.closed_reason:
                raise APIConnectionError(sub.closed_reason)
        except (asyncio.TimeoutError, builtins.TimeoutError, APIConnectionError):
            if sub is not None:
                await sub.close()
            raise PaymentError("the wallet's relay did not confirm the notification subscription", provider="nwc",
                               code="NOT_SENT", hint="the wallet's payments are looked up instead") from None  # fmt: skip
        return sub

    def read_notification(self, ev: Any) -> dict[str, Any] | None:
        """A notification event from the wallet, decrypted: {'notification_type': ..., 'notification': {...}};
        None when it is not from this wallet to this connection, or unreadable."""
        if ev.pubkey != self.wallet_pubkey or ev.kind not in (NOTIFY_NIP04, NOTIFY_NIP44):
            return None
        if ev.tag_value("p") != self.client_pubkey:
            return None
        try:
            if ev.kind == NOTIFY_NIP44:
                text = nip44.decrypt(ev.content, nip44.conversation_key(self._keys, self.wallet_pubkey))
            else:
                text = nip04.decrypt(ev.content, self._keys, self.wallet_pubkey)
            body = json.loads(text)
        except Exception:  # noqa: BLE001 - garbage from the relay is not a notification
            return None
        if not isinstance(body, dict) or not isinstance(body.get("notification"), dict):
            return None
        return body


NOTIFY_NIP04, NOTIFY_NIP44 = 23196, 23197  # NIP-47 notification kinds (NIP-04, NIP-44 encrypted)
