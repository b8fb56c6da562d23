"""The provider side: sell a model to the swarm. `dsrs pylon serve ...` runs `main(argv)`.

Announces itself (NIP-89, kind 31990 with k=5050), takes kind-5050 text jobs, quotes each with
an invoice from its wallet (7000 payment-required), runs the job on its LM once the payment is
seen, and publishes the result (6050). Refuses encrypted jobs, jobs for another provider, and
jobs whose bid is under the price. Only running the LM takes one of the `max_jobs` slots.

Under load: at most `max_pending` jobs (default 64) wait for a payment at once; a job beyond that
hears 7000 `error` "busy: ..." before any invoice is made, so spam costs the wallet at most one
make_invoice per pending slot (and the few made ahead). A quote waits for its payment until its invoice expires (at least
`payment_timeout`, default 120 s), so no payment can arrive for a job no longer waited for; one
last lookup_invoice then catches a payment whose notification was lost. `invoice_stock` invoices
(default 4) are made ahead, all at once after a job that used the last one, so a quote goes out
without a wallet round trip; each lives payment_timeout + 60 s and is quoted only while at least
payment_timeout of it is left. Payments are seen from the wallet's NIP-47
`payment_received` notifications when its info event offers them (one subscription, no polling);
otherwise (or when the relay does not confirm that subscription, or closes it) one shared poll
looks invoices up with backoff, at most `poll_rate` lookups per second in all, however many jobs wait.

Result size: relays refuse events over their limit (stock nostr-relay: 4,096 characters of
content, not published over NIP-11). The limit used is `max_result_chars` (default 4,096), lowered
to a relay's NIP-11 `limitation.max_content_length` when it publishes one. A job whose
`max_tokens` could exceed it (at 4 characters per token) is refused before it is quoted; a job
without `max_tokens` runs with max_tokens = limit / 4. A longer answer anyway is cut to the limit
and tagged `["finish_reason", "length"]`. If the relays still refuse the paid result, shorter
cuts are tried, then a 7000 `error` tells the customer the result could not be published and
what was paid (the payment hash), so they are not left waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict, deque
from typing import Any

from ..errors import ConfigurationError, DsrsError
from ..nostr import Event, Keys, RelayError, sign
from . import bolt11, pools
from .errors import PaymentError
from .swarm import FEEDBACK, JOB, RESULT
from .wallet import NwcWallet, Wallet

ANNOUNCE = 31990
CHARS_PER_TOKEN = 4  # how many characters a token of max_tokens may take in a result (an estimate)
MAX_RESULT_CHARS = 4096  # stock nostr-relay's content limit, the smallest common one
POLL_FIRST_S, POLL_MAX_S = 0.05, 5.0  # first lookup of an invoice, longest pause between lookups of it
LOOKUP_TIMEOUT_S = 5.0
PROCESSING_AFTER_S = 0.25  # a job still running then gets a 7000 "processing"
STOCK_HORIZON_S = 60.0  # an invoice made ahead lives this much longer than payment_timeout
log = logging.getLogger("dsrs.pylon.serve")
_LOCAL = {"embedded": "embedded/gemma-3-270m", "llama.cpp": "llamacpp/default", "llamacpp": "llamacpp/default",
          "ollama": "ollama/llama3.2"}  # fmt: skip


def _settled(rec: Any, payment_hash: str) -> bool:
    """The wallet's record shows the invoice paid (a preimage, when given, must match the hash)."""
    if not isinstance(rec, dict) or not (rec.get("settled_at") or rec.get("state") == "settled"):
        return False
    pre = rec.get("preimage")
    if not pre:
        return True
    try:
        return hashlib.sha256(bytes.fromhex(str(pre))).hexdigest() == payment_hash
    except ValueError:
        return False


class Payments:
    """Sees the payments of a provider's invoices, for all its jobs at once: the wallet's
    `payment_received` notifications when it offers them, else one shared poll (lookup_invoice per
    invoice with backoff; every lookup, polled or final, waits its turn: at most `rate` per second)."""

    def __init__(self, wallet: Wallet, *, notifications: bool = True, rate: float = 10.0) -> None:
        self.wallet = wallet
        self.want_notifications = notifications
        self.rate = rate
        self.notified = False  # notifications in use
        self.lookups = 0
        self._waiting: dict[str, asyncio.Future[bool]] = {}
        self._step: dict[str, float] = {}
        self._due: list[tuple[float, int, str]] = []  # (when, n, payment hash), a heap
        self._n = itertools.count()
        self._wake: asyncio.Event | None = None
        self._next_slot = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._wake = asyncio.Event()
        if self.want_notifications and isinstance(self.wallet, NwcWallet):
            try:
                if "payment_received" in await self.wallet.notification_types(timeout=10.0):
                    sub = await self.wallet.open_notifications(timeout=10.0)
                    self.notified = True
                    self._tasks.append(asyncio.create_task(self._listen(sub)))
            except PaymentError as e:
                log.info("wallet notifications unavailable (%s): polling instead", e.code)
        log.info("payments seen by %s", "wallet notifications" if self.notified else f"polling (<= {self.rate:g}/s)")
        self._tasks.append(asyncio.create_task(self._poll()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def watch(self, payment_hash: str) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[payment_hash] = fut
        if not self.notified:
            self._schedule(payment_hash, POLL_FIRST_S)
        return fut

    def forget(self, payment_hash: str) -> None:
        self._waiting.pop(payment_hash, None)
        self._step.pop(payment_hash, None)  # its heap entries are skipped when they come up

    async def check(self, payment_hash: str) -> bool:
        """One lookup now (in its turn)."""
        await self._turn()
        return await self._lookup(payment_hash)

    def _paid(self, payment_hash: str) -> None:
        fut = self._waiting.pop(payment_hash, None)
        if fut is not None and not fut.done():
            fut.set_result(True)

    def _schedule(self, payment_hash: str, after: float) -> None:
        self._step[payment_hash] = after
        heapq.heappush(self._due, (time.monotonic() + after, next(self._n), payment_hash))
        assert self._wake is not None
        self._wake.set()

    async def _turn(self) -> None:
        now = time.monotonic()
        wait = self._next_slot - now
        self._next_slot = max(now, self._next_slot) + 1.0 / self.rate
        if wait > 0:
            await asyncio.sleep(wait)

    async def _lookup(self, payment_hash: str) -> bool:
        self.lookups += 1
        try:
            if isinstance(self.wallet, NwcWallet):
                rec = await self.wallet.lookup_invoice(payment_hash, timeout=LOOKUP_TIMEOUT_S)
            else:
                rec = await asyncio.wait_for(self.wallet.lookup_invoice(payment_hash), LOOKUP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - no answer now; the wait goes on
            log.debug("lookup_invoice gave no answer (%s)", getattr(e, "code", None) or type(e).__name__)
            return False
        return _settled(rec, payment_hash)

    async def _poll(self) -> None:
        assert self._wake is not None
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
                continue
            when, _, ph = self._due[0]
            if when > time.monotonic():
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), when - time.monotonic())
                continue
            heapq.heappop(self._due)
            if ph not in self._waiting:
                continue
            await self._turn()
            if ph not in self._waiting:
                continue
            if await self._lookup(ph):
                self._paid(ph)
            elif ph in self._waiting:
                self._schedule(ph, min(self._step.get(ph, POLL_FIRST_S) * 2, POLL_MAX_S))

    async def _listen(self, sub: Any) -> None:
        assert isinstance(self.wallet, NwcWallet)
        parts = getattr(sub, "parts", None) or [sub]
        try:
            while True:
                try:
                    ev = await sub.next(1.0)
                except (asyncio.TimeoutError, RelayError) as e:
                    # the relay ended it (CLOSED: the reader raises, or every part says so): poll from now on
                    if isinstance(e, RelayError) or all(p.closed_reason for p in parts):
                        log.info("the relay closed the wallet notification subscription: polling instead")
                        self.notified = False
                        for ph in list(self._waiting):
                            self._schedule(ph, POLL_FIRST_S)
                        return
                    continue
                note = self.wallet.read_notification(ev)
                if not note or note.get("notification_type") != "payment_received":
                    continue
                body = note["notification"]
                ph = str(body.get("payment_hash", ""))
                if ph in self._waiting and _settled({**body, "settled_at": body.get("settled_at") or 1}, ph):
                    self._paid(ph)
        finally:
            with contextlib.suppress(Exception):
                await sub.close()


async def content_limit(url: str, timeout: float = 3.0) -> int | None:
    """A relay's NIP-11 `limitation.max_content_length`, or None when it publishes none."""
    from .. import http

    u = "http" + url[2:] if url.startswith("ws") else url
    try:
        async with http.session().get(u, headers={"Accept": "application/nostr+json"},
                                      timeout=http._timeout(timeout, timeout)) as r:  # fmt: skip
            doc = json.loads(await r.read()) if r.status == 200 else {}
    except Exception:  # noqa: BLE001 - no document, no limit learned
        return None
    lim = doc.get("limitation") if isinstance(doc, dict) else None
    v = lim.get("max_content_length") if isinstance(lim, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


class Provider:
    """A running provider. `await start()`, then jobs are served until `await stop()`."""

    def __init__(self, lm: Any, relays: list[str] | tuple[str, ...], *, price_msats: int, wallet: Wallet | None,
                 keys: Keys | None = None, name: str = "dsrs pylon", payment_timeout: float = 120.0,
                 max_jobs: int = 4, max_pending: int = 64, max_result_chars: int = MAX_RESULT_CHARS,
                 notifications: bool = True, poll_rate: float = 10.0, invoice_stock: int = 4) -> None:  # fmt: skip
        if price_msats > 0 and wallet is None:
            raise DsrsError("a priced provider needs a wallet to issue invoices", provider="pylon",
                            hint="pass --nwc nostr+walletconnect://... (or PYLON_NWC_URI), or --price-msats 0")  # fmt: skip
        if max_pending < 1 or max_jobs < 1 or max_result_chars < 1 or poll_rate <= 0 or payment_timeout <= 0 or invoice_stock < 0:
            raise ConfigurationError("max_pending, max_jobs, max_result_chars, poll_rate and payment_timeout must be "
                                     "positive, invoice_stock zero or more", provider="pylon",
                                     hint="e.g. --max-pending 64 --payment-timeout 120 --invoice-stock 4")  # fmt: skip
        self.lm = lm
        self.relays = tuple(relays)
        self.price_msats = price_msats
        self.wallet = wallet
        self.keys = keys or Keys.generate()
        self.name = name
        self.payment_timeout = payment_timeout
        self.max_pending = max_pending
        self.max_result_chars = max_result_chars
        self.result_chars = max_result_chars  # lowered by the relays' NIP-11 limits at start()
        self.payments = Payments(wallet, notifications=notifications, rate=poll_rate) if wallet is not None else None
        self.served = 0
        self.pending = 0  # jobs quoted (or being quoted) and not yet paid or given up
        self.pending_peak = 0
        self.busy = 0  # jobs turned away because `max_pending` were waiting
        self._sem = asyncio.Semaphore(max_jobs)
        self._invoicing = asyncio.Semaphore(4)  # make_invoice requests in flight (each is a wallet subscription)
        self.invoice_stock = invoice_stock if price_msats > 0 and wallet is not None else 0
        self._stock: deque[tuple[str, int]] = deque()  # invoices made ahead: (invoice, expires at)
        self._making = 0
        self._stocked = asyncio.Event()  # set when an invoice made ahead arrives (or failed to)
        self.invoice_failures = 0  # invoices asked for ahead that the wallet did not deliver
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def pubkey(self) -> str:
        return self.keys.pubkey

    async def start(self) -> None:
        limits = [x for x in await asyncio.gather(*(content_limit(u) for u in self.relays)) if x]
        self.result_chars = min([self.max_result_chars, *limits])
        if self.payments is not None and self.price_msats > 0:
            await self.payments.start()
            await self._refill()
        pool = pools.pool(self.relays, self.keys)
        about = {"name": self.name, "about": f"text generation, {self.price_msats} msats per job"}
        tags = [["d", f"dsrs-{self.pubkey[:16]}"], ["k", str(JOB)]]
        await pool.publish(sign(self.keys, ANNOUNCE, json.dumps(about), tags))
        sub = await pool.subscribe([{"kinds": [JOB], "since": int(time.time()) - 5}])
        self._loop_task = asyncio.create_task(self._take(sub))

    async def stop(self) -> None:
        for t in [self._loop_task, *self._tasks]:
            if t is not None:
                t.cancel()
        await asyncio.gather(*[t for t in [self._loop_task, *self._tasks] if t], return_exceptions=True)
        if self.payments is not None:
            await self.payments.stop()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _take(self, sub: Any) -> None:
        async for ev in sub:
            if ev.id in self._seen:
                continue
            self._seen[ev.id] = None
            while len(self._seen) > 100_000:
                self._seen.popitem(last=False)
            self._spawn(self._serve(ev))

    async def _feedback(self, job: Event, status: str, extra: str = "", amount: list[str] | None = None) -> None:
        tags = [["status", status] + ([extra] if extra else []), ["e", job.id], ["p", job.pubkey]]
        if amount:
            tags.append(["amount", *amount])
        await pools.pool(self.relays, self.keys).publish(sign(self.keys, FEEDBACK, "", tags))

    def _params(self, job: Event) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for t in job.tags:
            if len(t) >= 3 and t[0] == "param" and t[1] in ("max_tokens", "temperature", "top_p", "seed"):
                with contextlib.suppress(ValueError):
                    params[t[1]] = int(t[2]) if t[1] in ("max_tokens", "seed") else float(t[2])
        return params

    async def _serve(self, job: Event) -> None:
        try:
            await self._serve_job(job)
        finally:  # once the stock is used up, after a job (off its path), all at once: a refill every few jobs
            if self.invoice_stock and not self._stock and not self._making:
                self._spawn(self._refill())

    async def _serve_job(self, job: Event) -> None:
        target = job.tag_value("p")
        if target and target != self.pubkey:
            return
        if job.tag("encrypted"):
            return await self._feedback(job, "error", "encrypted jobs are not supported")
        inp = job.tag("i")
        if not inp or len(inp) < 2 or (len(inp) > 2 and inp[2] != "text"):
            return await self._feedback(job, "error", "one text input ('i' tag) is required")
        try:
            bid = int(job.tag_value("bid") or "0")
        except ValueError:
            bid = 0
        if bid < self.price_msats:
            return await self._feedback(job, "error", f"bid under the price of {self.price_msats} msats")
        params = self._params(job)
        most = self.result_chars // CHARS_PER_TOKEN
        if params.get("max_tokens", 0) > most:
            return await self._feedback(job, "error", f"max_tokens {params['max_tokens']} could exceed the "
                                        f"{self.result_chars}-character result limit of this provider's relays; "
                                        f"ask for at most {most}")  # fmt: skip
        params.setdefault("max_tokens", most)
        paid_hash = ""
        try:
            if self.price_msats > 0:
                if self.pending >= self.max_pending:  # before any invoice: spam costs the wallet nothing more
                    self.busy += 1
                    return await self._feedback(job, "error", f"busy: {self.pending} jobs await payment; try again later")
                self.pending += 1
                self.pending_peak = max(self.pending_peak, self.pending)
                try:
                    paid_hash = await self._get_paid(job)
                finally:
                    self.pending -= 1
                if not paid_hash:
                    return
            async with self._sem:
                call = asyncio.ensure_future(self.lm.acall(inp[1], **params))
                done, _ = await asyncio.wait({call}, timeout=PROCESSING_AFTER_S)
                if not done:  # a slow model: tell the customer the job is running
                    self._spawn(self._feedback(job, "processing"))
                c = await call
        except Exception as e:  # the customer hears why; the provider keeps serving
            msg = e.message if isinstance(e, DsrsError) else type(e).__name__
            if paid_hash:
                msg = f"{msg} (after your payment of {self.price_msats} msats, payment hash {paid_hash})"
            with contextlib.suppress(Exception):
                await self._feedback(job, "error", msg[:400])
            return
        await self._deliver(job, inp[1], str(c.text), str(getattr(c, "finish_reason", "") or "stop"), paid_hash)

    async def _deliver(self, job: Event, prompt: str, text: str, finish: str, paid_hash: str) -> None:
        """Publish the result; cut to the relays' limit (tagged), shorter if they still refuse; if no
        cut is taken, a 7000 error tells the paying customer so."""
        limit, why = self.result_chars, ""
        for _ in range(3):
            content, fin = (text, finish) if len(text) <= limit else (text[:limit], "length")
            tags = [["request", json.dumps(job.to_json())], ["e", job.id], ["p", job.pubkey], ["i", prompt, "text"],
                    ["finish_reason", fin]]  # fmt: skip
            if self.price_msats:
                tags.append(["amount", str(self.price_msats)])
            try:
                await pools.pool(self.relays, self.keys).publish(sign(self.keys, RESULT, content, tags))
            except DsrsError as e:
                why = e.message
                log.info("job %s: the relays refused a %d-character result (%s)", job.id[:12], len(content), why[:200])
                if len(content) <= 64:
                    break
                limit = len(content) // 2
                continue
            if fin == "length" and finish != "length":
                log.info("job %s: result cut from %d to %d characters", job.id[:12], len(text), len(content))
            self.served += 1
            return
        msg = f"the relays refused the result ({why[:200]})"
        if paid_hash:
            msg += f"; you paid {self.price_msats} msats (payment hash {paid_hash})"
        with contextlib.suppress(Exception):
            await self._feedback(job, "error", msg)

    async def _make_invoice(self, expiry: int) -> str:
        assert self.wallet is not None
        async with self._invoicing:
            return await self.wallet.make_invoice(self.price_msats, "dsrs pylon job", expiry)

    async def _refill(self) -> None:
        """Make the stock of invoices ahead (a quote then needs no wallet round trip), all at once. Each
        lives payment_timeout + STOCK_HORIZON_S; one with less than payment_timeout left is never quoted."""
        n = self.invoice_stock - len(self._stock) - self._making
        if n > 0:
            self._making += n
            await asyncio.gather(*(self._make_one() for _ in range(n)))

    async def _make_one(self) -> None:
        try:
            inv = await self._make_invoice(math.ceil(self.payment_timeout + STOCK_HORIZON_S))
            self._stock.append((inv, bolt11.decode(inv).expires_at))
        except Exception as e:  # noqa: BLE001 - a quote makes its own
            self.invoice_failures += 1
            log.info("could not make an invoice ahead (%s)", getattr(e, "code", None) or type(e).__name__)
        finally:
            self._making -= 1
            self._stocked.set()

    async def _invoice(self) -> tuple[str, float]:
        """An invoice for the price and when it expires (unix time): one made ahead (or being made), else a new one."""
        while True:
            while self._stock:
                inv, expires_at = self._stock.popleft()
                if expires_at - time.time() >= self.payment_timeout:
                    return inv, expires_at
            if not self._making:
                break
            self._stocked.clear()
            await self._stocked.wait()
        inv = await self._make_invoice(max(1, math.ceil(self.payment_timeout)))
        return inv, bolt11.decode(inv).expires_at

    async def _get_paid(self, job: Event) -> str:
        """Quote the job and wait for its payment until the invoice expires: the payment hash when paid, else ''."""
        assert self.payments is not None
        invoice, expires_at = await self._invoice()
        ph = bolt11.decode(invoice).payment_hash
        paid = self.payments.watch(ph)
        try:
            try:
                await self._feedback(job, "payment-required", "", [str(self.price_msats), invoice])
            except DsrsError as e:  # it may have reached the customer: the wait goes on
                log.info("job %s: the quote was not confirmed by the relays (%s)", job.id[:12], e.message[:200])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(paid), max(0.0, expires_at - time.time()))
            if (paid.done() and paid.result()) or await self.payments.check(ph):  # the last look: a lost notice
                return ph
        finally:
            self.payments.forget(ph)
            if not paid.done():
                paid.cancel()
        await self._feedback(job, "error", "payment not received in time")
        return ""


def lm_for(backend: str, model: str | None, base_url: str | None = None) -> Any:
    """`embedded`, `llama.cpp`, `ollama` (with `model`), or any LM string such as `openai/gpt-4o-mini`."""
    from ..lm import LM

    opts = {"base_url": base_url} if base_url else {}
    if backend in _LOCAL:
        prov, default = _LOCAL[backend].split("/", 1)
        return LM(f"{prov}/{model or default}", **opts)
    return LM(backend, **opts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsrs pylon serve", description="Sell a model's answers to the Pylon swarm (NIP-90).")
    p.add_argument("--backend", default="embedded", help="embedded | llama.cpp | ollama | any LM string (provider/model)")
    p.add_argument("--model", help="model name for a local backend")
    p.add_argument("--base-url", help="the backend's base URL (e.g. http://127.0.0.1:8080/v1 for llama.cpp)")
    p.add_argument("--price-msats", type=int, default=1000, help="price per job in millisatoshis (default 1000)")
    p.add_argument("--relay", action="append", help="relay URL (repeatable; default PYLON_RELAY_URL or the Pylon relay)")
    p.add_argument("--nwc", help="wallet: nostr+walletconnect:// URI (default PYLON_NWC_URI)")
    p.add_argument("--name", default="dsrs pylon", help="name in the NIP-89 announcement")
    p.add_argument("--max-jobs", type=int, default=4, help="jobs run at once (default 4)")
    p.add_argument("--max-pending", type=int, default=64,
                   help="jobs waiting for a payment at once; more hear 'busy' before any invoice (default 64)")
    p.add_argument("--payment-timeout", type=float, default=120.0,
                   help="seconds a quote waits for its payment; the invoice expires then (default 120)")
    p.add_argument("--max-result-chars", type=int, default=MAX_RESULT_CHARS,
                   help="longest result the relays take (default 4096; a relay's NIP-11 limit lowers it)")
    p.add_argument("--invoice-stock", type=int, default=4,
                   help="invoices made ahead so that a quote needs no wallet round trip (default 4; 0: none)")
    p.add_argument("--poll-rate", type=float, default=10.0,
                   help="lookup_invoice calls per second in all, when the wallet sends no notifications (default 10)")
    return p


async def serve(args: argparse.Namespace, ready: Any = None) -> None:
    from .lm import relays_from

    relays = relays_from(args.relay)
    uri = args.nwc or os.environ.get("PYLON_NWC_URI")
    wallet = NwcWallet(uri) if uri else None
    prov = Provider(lm_for(args.backend, args.model, args.base_url), relays, price_msats=args.price_msats, wallet=wallet,
                    keys=Keys.from_env(), name=args.name, max_jobs=args.max_jobs, max_pending=args.max_pending,
                    payment_timeout=args.payment_timeout, max_result_chars=args.max_result_chars,
                    poll_rate=args.poll_rate, invoice_stock=args.invoice_stock)  # fmt: skip
    await prov.start()
    print(f"serving as {prov.keys.npub} on {', '.join(relays)} at {args.price_msats} msats per job", flush=True)
    if ready is not None:
        ready(prov)
    try:
        await asyncio.Event().wait()
    finally:
        await prov.stop()
        await pools.aclose()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
    except DsrsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
