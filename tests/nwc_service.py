"""A NIP-47 wallet service on the test relay, backed by an in-memory ledger of msats.

Each wallet connection is an account with a balance and its own node key. `make_invoice`
issues real BOLT11 invoices (signed with that node key; preimage kept in the ledger);
`pay_invoice` settles invoices of this ledger only (no Lightning network here) and returns the
preimage; `lookup_invoice` (the account's invoices and its outgoing payments, with the preimage
once settled) and `get_balance` as in NIP-47. `nip04_only=True` publishes an info
event without an `encryption` tag, so clients must fall back to NIP-04.

Notifications (NIP-47): when an invoice of an account is paid, the service tells that account's
client `payment_received` (kind 23196 encrypted with NIP-04, and kind 23197 with NIP-44 unless
`nip04_only`), and advertises them in its info event (`notifications` tag). `notifications=False`
turns them off (no tag, nothing sent): providers must then poll. `count(method)` counts requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from dsrs.nostr import Keys, Relay, nip04, nip44, sign
from dsrs.pylon import bolt11


@dataclass
class Account:
    keys: Keys  # the client's key (its secret goes in the URI)
    node: Keys  # signs this account's invoices
    balance_msats: int = 0


@dataclass
class Ledger:
    accounts: dict[str, Account] = field(default_factory=dict)  # by client pubkey
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)  # by payment hash
    payments: list[dict[str, Any]] = field(default_factory=list)  # every settled payment
    fee_msats: int = 0  # routing fee charged to the payer on each payment (reported as fees_paid)

    def open(self, balance_msats: int = 0) -> Account:
        a = Account(Keys.generate(), Keys.generate(), balance_msats)
        self.accounts[a.keys.pubkey] = a
        return a

    def make_invoice(self, acct: Account, amount_msats: int | None, *, description: str = "", expiry: int = 600,
                     timestamp: int | None = None, network: str = "bc") -> str:  # fmt: skip
        pre = secrets.token_bytes(32)
        ph = hashlib.sha256(pre).digest()
        text = bolt11.encode(acct.node.secret, network=network, amount_msats=amount_msats, payment_hash=ph,
                             payment_secret=secrets.token_bytes(32), description=description, expiry=expiry,
                             timestamp=timestamp)  # fmt: skip
        self.invoices[ph.hex()] = {"invoice": text, "preimage": pre.hex(), "amount": amount_msats, "payee": acct,
                                   "settled_at": None, "created_at": int(time.time()), "expires_at": bolt11.decode(text).expires_at}  # fmt: skip
        return text

    def pay(self, payer: Account, text: str) -> dict[str, Any]:
        inv = bolt11.decode(text)
        rec = self.invoices.get(inv.payment_hash)
        if rec is None:
            return {"code": "PAYMENT_FAILED", "message": "no route to the payee"}
        if rec["settled_at"] is not None:
            return {"code": "PAYMENT_FAILED", "message": "invoice already paid"}
        if inv.expired():
            return {"code": "PAYMENT_FAILED", "message": "invoice expired"}
        if inv.amount_msats is None:
            return {"code": "OTHER", "message": "amountless invoices are not supported"}
        if payer.balance_msats < inv.amount_msats + self.fee_msats:
            return {"code": "INSUFFICIENT_BALANCE", "message": "not enough funds"}
        payer.balance_msats -= inv.amount_msats + self.fee_msats
        rec["payee"].balance_msats += inv.amount_msats
        rec["settled_at"] = int(time.time())
        self.payments.append({"payer": payer.keys.pubkey, "payment_hash": inv.payment_hash, "amount": inv.amount_msats,
                              "fees_paid": self.fee_msats, "invoice": text, "settled_at": rec["settled_at"]})  # fmt: skip
        return {"preimage": rec["preimage"], "fees_paid": self.fee_msats}

    def paid_total(self, payer: Account) -> int:
        return sum(p["amount"] for p in self.payments if p["payer"] == payer.keys.pubkey)


class WalletService:
    """Answers NIP-47 requests addressed to `self.keys.pubkey` on one relay."""

    def __init__(self, relay_url: str, ledger: Ledger, *, nip04_only: bool = False, notifications: bool = True) -> None:
        self.relay_url = relay_url
        self.ledger = ledger
        self.keys = Keys.generate()
        self.nip04_only = nip04_only
        self.notifications = notifications
        self.requests: list[dict[str, Any]] = []  # decrypted requests, for assertions
        self.notified: list[dict[str, Any]] = []  # notifications sent (kind, client pubkey, payment hash)
        self.hold_payments = False  # never answer pay_invoice (outcome unknown for the client)
        self.mute_payments = False  # pay, but never send the answer (the client must look it up)
        self._relay = Relay(relay_url, self.keys)
        self._task: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[None]] = set()

    def uri(self, acct: Account) -> str:
        return f"nostr+walletconnect://{self.keys.pubkey}?relay={self.relay_url}&secret={acct.keys.secret.hex()}"

    def count(self, method: str, acct: Account | None = None) -> int:
        """Requests for `method` (from `acct`'s connection only, when given)."""
        return sum(1 for r in self.requests if r.get("method") == method and (acct is None or r["client"] == acct.keys.pubkey))

    async def start(self) -> None:
        tags = [] if self.nip04_only else [["encryption", "nip44_v2 nip04"]]
        caps = "pay_invoice make_invoice lookup_invoice get_balance"
        if self.notifications:
            tags.append(["notifications", "payment_received"])
            caps += " notifications"
        await self._relay.publish(sign(self.keys, 13194, caps, tags))
        sub = await self._relay.subscribe([{"kinds": [23194], "#p": [self.keys.pubkey]}])
        self._task = asyncio.create_task(self._serve(sub))

    async def stop(self) -> None:
        for t in [self._task, *self._bg]:
            if t:
                t.cancel()
        await self._relay.close()

    async def _serve(self, sub: Any) -> None:
        async for ev in sub:
            asyncio.create_task(self._answer(ev))

    async def _answer(self, ev: Any) -> None:
        acct = self.ledger.accounts.get(ev.pubkey)
        enc = ev.tag_value("encryption") or "nip04"
        if acct is None:
            return
        if enc == "nip44_v2":
            ck = nip44.conversation_key(self.keys, ev.pubkey)
            req = json.loads(nip44.decrypt(ev.content, ck))
        else:
            req = json.loads(nip04.decrypt(ev.content, self.keys, ev.pubkey))
        self.requests.append({**req, "encryption": enc, "client": ev.pubkey})
        method, params = req["method"], req.get("params", {})
        error = result = None
        if method == "pay_invoice":
            if self.hold_payments:
                return
            r = self.ledger.pay(acct, params["invoice"])
            if "code" not in r:  # the payee's notification goes out first; the payer's answer does not wait for its OK
                t = asyncio.create_task(self._notify_received(params["invoice"]))
                self._bg.add(t)
                t.add_done_callback(self._bg.discard)
                await asyncio.sleep(0)  # lets it send its frame before the answer's
            if self.mute_payments:
                return
            error, result = (r, None) if "code" in r else (None, r)
        elif method == "make_invoice":
            text = self.ledger.make_invoice(acct, int(params["amount"]), description=params.get("description", ""),
                                            expiry=int(params.get("expiry") or 600))  # fmt: skip
            inv = bolt11.decode(text)
            result = {"type": "incoming", "invoice": text, "payment_hash": inv.payment_hash, "amount": inv.amount_msats,
                      "created_at": inv.timestamp, "expires_at": inv.expires_at}  # fmt: skip
        elif method == "lookup_invoice":
            rec = self.ledger.invoices.get(params.get("payment_hash", ""))
            out = [p for p in self.ledger.payments if p["payer"] == acct.keys.pubkey and p["payment_hash"] == params.get("payment_hash")]
            if out and rec is not None:  # an outgoing payment of this account
                result = {"type": "outgoing", "invoice": out[0]["invoice"], "payment_hash": out[0]["payment_hash"],
                          "amount": out[0]["amount"], "fees_paid": out[0]["fees_paid"], "settled_at": out[0]["settled_at"],
                          "preimage": rec["preimage"]}  # fmt: skip
            elif rec is None or rec["payee"] is not acct:
                error = {"code": "NOT_FOUND", "message": "no such invoice"}
            else:
                result = {"type": "incoming", "invoice": rec["invoice"], "payment_hash": params["payment_hash"],
                          "amount": rec["amount"], "settled_at": rec["settled_at"],
                          "preimage": rec["preimage"] if rec["settled_at"] else None}  # fmt: skip
        elif method == "get_balance":
            result = {"balance": acct.balance_msats}
        else:
            error = {"code": "NOT_IMPLEMENTED", "message": method}
        body = json.dumps({"result_type": method, "error": error, "result": result})
        if enc == "nip44_v2":
            content = nip44.encrypt(body, nip44.conversation_key(self.keys, ev.pubkey))
        else:
            content = nip04.encrypt(body, self.keys, ev.pubkey)
        tags = [["p", ev.pubkey], ["e", ev.id]] + ([["encryption", enc]] if enc == "nip44_v2" else [])
        await self._relay.publish(sign(self.keys, 23195, content, tags))


    async def _notify_received(self, invoice: str) -> None:
        """`payment_received` to the payee's client: 23196 (NIP-04) and, unless nip04_only, 23197 (NIP-44)."""
        if not self.notifications:
            return
        ph = bolt11.decode(invoice).payment_hash
        rec = self.ledger.invoices[ph]
        payee: Account = rec["payee"]
        body = json.dumps({"notification_type": "payment_received", "notification": {
            "type": "incoming", "invoice": rec["invoice"], "preimage": rec["preimage"], "payment_hash": ph,
            "amount": rec["amount"], "fees_paid": 0, "created_at": rec["created_at"], "expires_at": rec["expires_at"],
            "settled_at": rec["settled_at"]}})  # fmt: skip
        to = payee.keys.pubkey
        async def send(kind: int, content: str, extra: list[list[str]]) -> None:
            self.notified.append({"kind": kind, "to": to, "payment_hash": ph})
            await self._relay.publish(sign(self.keys, kind, content, [["p", to], *extra]))

        if not self.nip04_only:
            await send(23197, nip44.encrypt(body, nip44.conversation_key(self.keys, to)), [["encryption", "nip44_v2"]])
        await send(23196, nip04.encrypt(body, self.keys, to), [])  # the legacy kind, after


# -- a whole test network: relay + wallet service + accounts, and a scriptable provider ------------
class Net:
    def __init__(self, relay: Any, ledger: Ledger, service: WalletService) -> None:
        self.relay, self.ledger, self.service = relay, ledger, service
        self.customer = ledger.open(1_000_000)
        from dsrs.pylon import NwcWallet

        self.wallet = NwcWallet(service.uri(self.customer), timeout=5)

    def paid(self) -> int:
        return self.ledger.paid_total(self.customer)


async def start_net(*, stock: Any = None, notifications: bool = True, **relay_kw: Any) -> Net:
    """Our test relay (or `stock`, a running StockRelay: the third-party relay) with a wallet service on it."""
    from relay import TestRelay

    if stock is not None:
        relay = _Running(stock)
    else:
        relay = TestRelay(**relay_kw)
        await relay.start()
    ledger = Ledger()
    svc = WalletService(relay.url, ledger, notifications=notifications)
    await svc.start()
    return Net(relay, ledger, svc)


class _Running:
    """A relay started elsewhere (the stock_relay fixture stops it)."""

    def __init__(self, relay: Any) -> None:
        self.url = relay.url

    async def stop(self) -> None:
        pass


async def stop_net(net: Net, *others: Any) -> None:
    from dsrs.pylon import pools

    for o in others:
        await o.stop()
    await pools.aclose()
    await net.service.stop()
    await net.relay.stop()


class FakeProvider:
    """A provider whose behaviour per job is a test's coroutine `script(self, job)`."""

    def __init__(self, net: Net, script: Any, keys: Keys | None = None) -> None:
        self.net = net
        self.keys = keys or Keys.generate()
        self.account = net.ledger.open(0)
        self.script = script
        self.jobs: list[Any] = []
        self._relay = Relay(net.relay.url, self.keys)
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pubkey(self) -> str:
        return self.keys.pubkey

    async def start(self) -> FakeProvider:
        sub = await self._relay.subscribe([{"kinds": [5050]}])
        self._task = asyncio.create_task(self._loop(sub))
        return self

    async def stop(self) -> None:
        for t in [self._task, *self._tasks]:
            if t:
                t.cancel()
        await self._relay.close()

    async def _loop(self, sub: Any) -> None:
        async for job in sub:
            self.jobs.append(job)
            t = asyncio.create_task(self.script(self, job))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def invoice(self, amount: int | None, **kw: Any) -> str:
        return self.net.ledger.make_invoice(self.account, amount, **kw)

    def feedback_event(self, job: Any, status: str, *, amount: Any = None, invoice: str | None = None,
                       e: str | None = None, p: str | None = None, extra: str = "", created_at: int | None = None) -> Any:  # fmt: skip
        tags = [["status", status] + ([extra] if extra else []), ["e", e or job.id], ["p", p or job.pubkey]]
        if amount is not None:
            tags.append(["amount", str(amount)] + ([invoice] if invoice else []))
        return sign(self.keys, 7000, "", tags, created_at=created_at)

    async def send(self, ev: Any) -> None:
        await self._relay.publish(ev)

    async def quote(self, job: Any, amount: int, invoice: str | None = None, **kw: Any) -> str:
        inv = invoice if invoice is not None else self.invoice(amount)
        await self.send(self.feedback_event(job, "payment-required", amount=amount, invoice=inv, **kw))
        return inv

    async def wait_paid(self, invoice: str, timeout: float = 5.0) -> bool:
        ph = bolt11.decode(invoice).payment_hash
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.net.ledger.invoices[ph]["settled_at"]:
                return True
            await asyncio.sleep(0.002)
        return False

    async def result(self, job: Any, text: str, *, e: str | None = None, p: str | None = None) -> Any:
        tags = [["request", json.dumps(job.to_json())], ["e", e or job.id], ["p", p or job.pubkey]]
        ev = sign(self.keys, 6050, text, tags)
        await self.send(ev)
        return ev


async def honest(fp: FakeProvider, job: Any, price: int = 1000, text: str = "ok") -> None:
    """Quote, wait for the payment, answer."""
    inv = await fp.quote(job, price)
    if await fp.wait_paid(inv):
        await fp.result(job, text)


async def counted(prov: Any, n: int, limit: float = 30.0) -> None:
    """Wait until the provider has counted `n` jobs served: it counts one at the relay's OK for the
    result, which can come after the customer already has the result (a bounded wait, not a timing)."""
    deadline = time.monotonic() + limit
    while prov.served < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
