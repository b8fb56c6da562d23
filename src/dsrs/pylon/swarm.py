"""The swarm client: one NIP-90 job (kind 5050) per request, paid over the wallet, checked throughout.

Flow: book the bid + fee cap on the LM's budget (a call that cannot fit fails at once with
BudgetExceededError, nothing published), sign the job, add its id to the loop's one shared
subscription for feedback (7000) and results (6050) (pools.Feed: the relays take the new REQ
before the job is published; a refusal fails the call at once, nothing sent), publish, then read
the events routed to it until the first valid result. Each event must be
correctly signed (the relay client drops others), reference our job in its first `e` tag and our
key in its `p` tag, and be fresh. A `payment-required` quote is paid only when its amount is
within the bid, its invoice is valid, unexpired, on our network and for exactly that amount, and
nothing was paid for this job or this payment hash before; after paying we listen to that
provider only. The job is cancelled (kind 5) after the result. Prompts are public on the relays.

Money: the booking settles to what was paid, or is released when nothing was. Once a pay request
may have reached the wallet (sent, even without the relay's OK) the job is "paid, outcome
unknown": it never pays again, the wallet's late answer or `lookup_invoice` settles it, and
otherwise PaymentUnknownError keeps the booking open (`.reservation`) for the caller. Every wait
ends by the call's timeout. Refusal reasons are logged on `dsrs.pylon` at INFO.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..budget import Budget, Reservation
from ..errors import APIConnectionError, BudgetExceededError, DsrsError, TimeoutError, UnsupportedFeatureError
from ..providers.embedded import render
from ..types import Completion, CostSource, LmUsage, Request
from .errors import PaymentError, PaymentRequiredError, PaymentUnknownError, SwarmJobError

if TYPE_CHECKING:  # the nostr modules need the pylon extra: loaded on first use
    from ..nostr import Event, Keys
    from .wallet import Wallet

JOB, RESULT, FEEDBACK, DELETION = 5050, 6050, 7000, 5
DEFAULT_RELAY = "wss://nexus.openagents.com"
STALE_S = 60  # events this much older than the job are ignored
log = logging.getLogger("dsrs.pylon")
_paid_hashes: OrderedDict[str, None] = OrderedDict()  # payment hashes paid by this process


@dataclass(frozen=True)
class Quote:
    """What a provider asks for a job (shown when auto_pay is off). `invoice` is a payable secret."""

    job_id: str
    provider: str
    amount_msats: int
    invoice: str = field(repr=False)


@dataclass
class SwarmConfig:
    relays: tuple[str, ...]
    bid_msats: int = 10_000
    timeout: float = 60.0
    wallet: Wallet | None = None
    budget: Budget | None = None
    auto_pay: bool = True
    fee_cap_msats: int | None = None  # None: 1% of the amount + 1000 msats
    provider: str | None = None  # ask one provider (p tag) and accept only it
    keys: Keys | None = None  # None: a fresh key per job
    network: str = "bc"
    max_events: int = 1000
    max_content: int = 1_000_000


@dataclass
class _Job:
    ev: Event
    keys: Keys
    cfg: SwarmConfig
    refusals: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    paid_to: str | None = None
    paid_msats: int = 0
    fees_over_cap: bool = False
    status: str | None = None
    deadline: float = math.inf  # time.monotonic() by which the call ends
    res: Reservation | None = None  # bid + fee cap on cfg.budget, booked before the job is published
    unknown: bool = False  # a payment's outcome is unknown: `res` stays open for the caller

    def refuse(self, who: str, why: str) -> None:
        self.refusals.append(f"{who[:12]}: {why}")
        log.info("job %s: not from %s...: %s", self.ev.id[:12], who[:12], why)

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def fee_cap(cfg: SwarmConfig, amount: int) -> int:
    return cfg.fee_cap_msats if cfg.fee_cap_msats is not None else math.ceil(amount / 100) + 1000


def job_event(keys: Keys, req: Request, cfg: SwarmConfig) -> Event:
    if req.tools or req.response_format:
        raise UnsupportedFeatureError("swarm jobs carry text only (no tools or structured output)", provider="pylon")
    tags: list[list[str]] = [["i", render(req.messages), "text"]]
    if req.model:
        tags.append(["param", "model", req.model])
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        v = getattr(req, name)
        if v is not None:
            tags.append(["param", name, str(v)])
    tags += [["output", "text/plain"], ["bid", str(cfg.bid_msats)], ["relays", *cfg.relays]]
    if cfg.provider:
        tags.append(["p", cfg.provider])
    from ..nostr import sign

    return sign(keys, JOB, "", tags)


async def run(cfg: SwarmConfig, req: Request) -> Completion:
    """Run one job on the swarm and return its result (usage: what was paid, tokens estimated).
    Every wait (relay, wallet, providers) ends by `cfg.timeout` after the call started."""
    from ..nostr import Keys, RelayError  # the pylon extra (a ConfigurationError naming it when missing)
    from . import pools

    started = time.monotonic()
    keys = cfg.keys or Keys.generate()
    job = _Job(job_event(keys, req, cfg), keys, cfg, deadline=started + cfg.timeout)
    job.res = _book(cfg)  # a call the budget cannot cover fails here, before anything is published
    pool = pools.pool(cfg.relays)
    feed = pools.feed(cfg.relays, {"kinds": [FEEDBACK, RESULT]})  # one subscription for all in-flight jobs
    try:
        try:  # the relays take the REQ naming this job before it is published: nothing is missed
            q = await feed.add(job.ev.id, job.left())
        except asyncio.TimeoutError:
            raise TimeoutError(f"the relays did not answer within {cfg.timeout}s; the job was not sent", provider="pylon",
                               hint="check the relay URLs, or raise the timeout") from None  # fmt: skip
        except RelayError as e:
            log.info("job %s not sent: %s", job.ev.id[:12], e.message)
            raise type(e)(f"the relays refused the subscription for the job's answers; the job was not sent ({e.message})",
                          provider="pylon", code=e.code, hint="try other relays") from None  # fmt: skip
        await pool.publish(job.ev, timeout=min(job.left(), 10.0))
        events = 0
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), job.left())
            except asyncio.TimeoutError:
                raise _timeout(job) from None
            if isinstance(ev, BaseException):
                raise _lost(job, ev)
            if ev.id in job.seen:
                continue  # sent again (a replacing REQ asks for recent stored events)
            events += 1
            if events > cfg.max_events:
                raise SwarmJobError(f"job drew more than {cfg.max_events} events; giving up", provider="pylon")
            done = await _handle(job, ev)
            if done is not None:
                break
    except DsrsError as e:  # budgets around the call settle to what this job paid (see dsrs.budget)
        if not getattr(e, "spent_unknown", False) and getattr(e, "spent_msats", None) is None:
            e.spent_msats = job.paid_msats  # type: ignore[attr-defined]
        raise
    finally:
        if job.res is not None and not job.unknown:
            job.res.release()  # nothing paid (a payment settled it already)
        feed.remove(job.ev.id)
    _spawn(_cancel(pool, job))  # best effort, off the caller's time
    return done


def _book(cfg: SwarmConfig) -> Reservation | None:
    """Reserve the most this job can cost (bid + fee cap) on the LM's own budget, or refuse it."""
    if cfg.budget is None:
        return None
    try:
        return cfg.budget.reserve(cfg.bid_msats + fee_cap(cfg, cfg.bid_msats))
    except BudgetExceededError as e:
        log.info("job refused before publishing: %s", e.message)
        e.provider = "pylon"
        e.hint = "raise the budget, or lower the bid (with_bid_msats) or the fee cap (with_fee_cap_msats)"
        e.args = (str(e),)
        raise


_background: set[asyncio.Task[None]] = set()


def _spawn(coro: Any) -> None:
    t = asyncio.ensure_future(coro)
    _background.add(t)
    t.add_done_callback(_background.discard)


async def _cancel(pool: Any, job: _Job) -> None:
    from ..nostr import sign

    try:
        ev = sign(job.keys, DELETION, "job done", [["e", job.ev.id], ["k", str(JOB)]])
        await asyncio.wait_for(pool.publish(ev, timeout=2.0), 2.0)
    except Exception:  # best effort: the result is already ours
        pass


def _lost(job: _Job, e: BaseException) -> Exception:
    """The relays closed the subscription the job's answers come on, and it could not be reopened."""
    why = getattr(e, "message", None) or type(e).__name__
    if job.paid_to:  # paid and cut off: do not retry (that would pay again)
        return SwarmJobError(f"paid, then lost the relays' subscription before the result ({why})", provider="pylon",
                             code="paid_no_result", hint=f"paid {job.paid_msats} msats to {job.paid_to[:12]}...")  # fmt: skip
    return SwarmJobError(f"the relays closed the subscription for the job's answers ({why}); nothing was paid",
                         provider="pylon", code="subscription_lost", hint="try other relays")  # fmt: skip


def _timeout(job: _Job) -> Exception:
    why = "; ".join(job.refusals) if job.refusals else "no provider answered"
    msg = f"no result within {job.cfg.timeout}s ({why})"
    if job.paid_to:  # paid and not delivered: do not retry (that would pay again)
        return SwarmJobError(msg, provider="pylon", code="paid_no_result",
                             hint=f"paid {job.paid_msats} msats to {job.paid_to[:12]}...; the provider may have failed,"
                                  " or its result was refused by the relays (e.g. over their event size limit)")  # fmt: skip
    return TimeoutError(msg, provider="pylon", hint="raise the bid or the timeout, or try other relays")


async def _handle(job: _Job, ev: Event) -> Completion | None:
    cfg = job.cfg
    if ev.id in job.seen:
        return None
    job.seen.add(ev.id)
    who = ev.pubkey
    if ev.kind not in (FEEDBACK, RESULT):
        return None
    e = ev.tag_value("e")
    p = ev.tag_value("p")
    if e != job.ev.id or p != job.keys.pubkey:
        job.refuse(who, "event not addressed to this job")
        return None
    if ev.created_at < job.ev.created_at - STALE_S:
        job.refuse(who, "stale event")
        return None
    if len(ev.content) > cfg.max_content:
        job.refuse(who, "content too large")
        return None
    if cfg.provider and who != cfg.provider:
        log.debug("job %s: ignored %s... (not the chosen provider)", job.ev.id[:12], who[:12])
        return None
    if job.paid_to and who != job.paid_to:
        log.debug("job %s: ignored %s... (paid another provider)", job.ev.id[:12], who[:12])
        return None  # after paying, only that provider counts
    if ev.kind == FEEDBACK:
        status = ev.tag("status")
        state = status[1] if status and len(status) > 1 else ""
        if state == "payment-required":
            await _quote(job, ev)
        elif state == "error":
            msg = (status[2] if status and len(status) > 2 else "") or ev.content or "error"
            if job.paid_to or cfg.provider:
                raise SwarmJobError(f"provider failed the job: {msg[:300]}", provider="pylon", code="provider_error")
            job.refuse(who, f"error: {msg[:120]}")
        elif state:
            job.status = state
        return None
    # a result
    req_tag = ev.tag_value("request")
    if req_tag is not None:
        try:
            if json.loads(req_tag).get("id") != job.ev.id:
                job.refuse(who, "result for another request")
                return None
        except (ValueError, AttributeError):
            job.refuse(who, "unreadable request tag")
            return None
    prompt = job.ev.tags[0][1]
    pt, ct = math.ceil(len(prompt) / 4), math.ceil(len(ev.content) / 4)
    usage = LmUsage(pt, ct, pt + ct, cost_msats=job.paid_msats,
                    cost_source=CostSource.INVOICE if job.paid_to else CostSource.FREE, estimated=True, calls=1)  # fmt: skip
    model = next((t[2] for t in job.ev.tags if t[:2] == ["param", "model"] and len(t) > 2), "")
    raw: dict[str, Any] = {"result": ev.id, "provider": who, "job": job.ev.id}
    if job.fees_over_cap:
        raw["fees_over_cap"] = True
    return Completion(ev.content, usage, model=model, provider="pylon", id=job.ev.id, raw=raw)


async def _quote(job: _Job, ev: Event) -> None:
    from . import bolt11
    from .wallet import NwcWallet, Payment

    cfg, who = job.cfg, ev.pubkey
    if job.paid_to:
        return  # one payment per job
    amt = ev.tag("amount")
    try:
        amount = int(amt[1]) if amt and len(amt) > 1 else None
    except ValueError:
        amount = None
    if amount is None or amount <= 0:
        return job.refuse(who, "payment-required without a valid amount")
    if amount > cfg.bid_msats:
        return job.refuse(who, f"asks {amount} msats, over the bid of {cfg.bid_msats}")
    text = amt[2] if amt and len(amt) > 2 else ""
    if not text:
        return job.refuse(who, "payment-required without an invoice")
    try:
        inv = bolt11.decode(text)
    except bolt11.InvoiceError as e:
        return job.refuse(who, f"bad invoice ({e.message})")
    if inv.amount_msats is None:
        return job.refuse(who, "amountless invoice")
    if inv.amount_msats != amount:
        return job.refuse(who, f"invoice amount {inv.amount_msats} differs from the quoted {amount}")
    if inv.network != cfg.network:
        return job.refuse(who, f"invoice for network {inv.network!r}, not {cfg.network!r}")
    if inv.expired():
        return job.refuse(who, "invoice expired")
    if inv.payment_hash in _paid_hashes:
        return job.refuse(who, "invoice already paid")
    quote = Quote(job.ev.id, who, amount, text)
    if not cfg.auto_pay or cfg.wallet is None:
        raise PaymentRequiredError(
            f"provider {who[:12]}... asks {amount} msats for job {job.ev.id[:12]}...", quote=quote, provider="pylon",
            hint="pay quote.invoice yourself, or set with_wallet(...) and auto_pay" if cfg.wallet is None or not cfg.auto_pay else None,
        )  # fmt: skip
    wallet: Any = cfg.wallet
    nwc = isinstance(wallet, NwcWallet)  # takes a timeout; other wallets are bounded from outside
    if job.left() <= 0:
        return job.refuse(who, "quoted too late to pay within the timeout")
    if nwc:  # the wallet's info query, before anything is booked (PaymentError "NOT_SENT": nothing paid)
        await wallet.encryption(timeout=min(wallet.timeout, job.left()))
    res = job.res  # booked for the bid + fee cap, which covers this quote + its fee cap
    _paid_hashes[inv.payment_hash] = None
    while len(_paid_hashes) > 100_000:
        _paid_hashes.popitem(last=False)
    log.info("job %s: paying %d msats to %s...", job.ev.id[:12], amount, who[:12])
    try:  # bounded by the call's timeout; once the request may have left, the outcome is unknown
        if nwc:
            pay = await wallet.pay_invoice(text, timeout=min(wallet.timeout, max(job.left(), 0.001)))
        else:
            pay = await asyncio.wait_for(wallet.pay_invoice(text), max(job.left(), 0.001))
    except (PaymentUnknownError, APIConnectionError, builtins.TimeoutError) as e:
        if isinstance(e, APIConnectionError) and getattr(e, "event_sent", True) is False:
            return _unpaid(job, who, inv.payment_hash, e)  # surely never reached the wallet
        job.paid_to, job.unknown = who, True  # may have been paid: never pay anyone else (or this invoice again)
        found = await _resolve(wallet, inv.payment_hash, job, fee_cap(cfg, amount))
        if found is None:
            unknown = e if isinstance(e, PaymentUnknownError) else PaymentUnknownError(
                "the wallet did not say whether it paid; the payment may have gone out", provider="pylon",
                code=getattr(e, "code", None) or "TIMEOUT", hint="check the wallet; the budget keeps this amount reserved")  # fmt: skip
            unknown.reservation = res  # left open (still reserved) until the caller settles or releases it
            unknown.payment_hash = inv.payment_hash  # for the caller's own lookup_invoice
            log.warning("job %s: the outcome of a %d msats payment is unknown; it stays booked", job.ev.id[:12], amount)
            raise unknown from (None if unknown is e else e)
        log.info("job %s: the wallet's records show the payment went out", job.ev.id[:12])
        job.unknown = False
        pay = found
    except (PaymentError, bolt11.InvoiceError) as e:  # the wallet said no: nothing was paid
        return _unpaid(job, who, inv.payment_hash, e)
    except Exception as e:  # a broken wallet: nothing assumed paid (type name only: the text may hold secrets)
        _paid_hashes.pop(inv.payment_hash, None)
        raise PaymentError(f"the wallet failed to pay ({type(e).__name__}); nothing was paid", provider="pylon",
                           code="wallet_error", hint="check the wallet given to with_wallet(...)") from None  # fmt: skip
    except BaseException:  # cancelled mid-payment: outcome unknown, the reservation stays open
        job.paid_to, job.unknown = who, True
        raise
    fees = pay.fees_paid_msats if isinstance(pay, Payment) else int(getattr(pay, "fees_paid_msats", 0) or 0)
    job.paid_to, job.paid_msats = who, amount + fees
    if fees > fee_cap(cfg, amount):  # paid already: the truth is recorded, and flagged
        job.fees_over_cap = True
        log.warning("job %s: the wallet paid %d msats in fees, over the fee cap of %d msats", job.ev.id[:12], fees,
                    fee_cap(cfg, amount))  # fmt: skip
    if res:
        res.settle(job.paid_msats)


def _unpaid(job: _Job, who: str, payment_hash: str, e: BaseException) -> None:
    """The wallet did not pay (it said so, or the request never left): another quote may be paid."""
    _paid_hashes.pop(payment_hash, None)
    job.refuse(who, f"payment failed ({getattr(e, 'code', None) or type(e).__name__})")


async def _resolve(wallet: Any, payment_hash: str, job: _Job, fees_if_unsaid: int) -> Any:
    """What became of a payment whose answer never came: NIP-47 `lookup_invoice` within the call's
    time. A Payment when the wallet shows the preimage (proof it paid), else None (still unknown).
    Fees the wallet does not report count as the fee cap (what may have been paid)."""
    from .wallet import NwcWallet, Payment

    lookup = getattr(wallet, "lookup_invoice", None)
    if lookup is None or job.left() <= 0:
        return None
    try:
        if isinstance(wallet, NwcWallet):
            r = await wallet.lookup_invoice(payment_hash, timeout=job.left())
        else:
            r = await asyncio.wait_for(lookup(payment_hash), job.left())
    except Exception as e:  # noqa: BLE001 - no answer is no proof either way
        log.info("job %s: lookup_invoice gave no answer (%s)", job.ev.id[:12], getattr(e, "code", None) or type(e).__name__)
        return None
    pre = str(r.get("preimage") or "") if isinstance(r, dict) else ""
    try:
        if hashlib.sha256(bytes.fromhex(pre)).hexdigest() != payment_hash:
            return None
    except ValueError:
        return None
    fees = r.get("fees_paid")
    fees = fees if isinstance(fees, int) and not isinstance(fees, bool) and fees >= 0 else fees_if_unsaid
    return Payment(pre, fees)


async def stream(cfg: SwarmConfig, req: Request) -> AsyncIterator[str | Completion]:
    c = await run(cfg, req)
    if c.text:
        yield c.text
    yield c
