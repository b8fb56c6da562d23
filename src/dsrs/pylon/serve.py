"""The provider side: sell a model to the swarm. `dsrs pylon serve ...` runs `main(argv)`.

Announces itself (NIP-89, kind 31990 with k=5050), takes kind-5050 text jobs, quotes each with
an invoice from its wallet (7000 payment-required), waits until the wallet reports the invoice
settled (NIP-47 lookup_invoice), runs the job on its LM, and publishes the result (6050).
Refuses encrypted jobs, jobs for another provider, and jobs whose bid is under the price.
Only running the LM takes one of the `max_jobs` slots; waiting for a payment (polled with
backoff) takes none, so unpaid jobs cannot block paying customers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from ..errors import DsrsError
from ..nostr import Event, Keys, sign
from . import bolt11, pools
from .swarm import FEEDBACK, JOB, RESULT
from .wallet import NwcWallet, Wallet

ANNOUNCE = 31990
POLL_MAX_S = 2.0  # longest pause between lookup_invoice calls while waiting for a payment
_LOCAL = {"embedded": "embedded/gemma-3-270m", "llama.cpp": "llamacpp/default", "llamacpp": "llamacpp/default",
          "ollama": "ollama/llama3.2"}  # fmt: skip


class Provider:
    """A running provider. `await start()`, then jobs are served until `await stop()`."""

    def __init__(self, lm: Any, relays: list[str] | tuple[str, ...], *, price_msats: int, wallet: Wallet | None,
                 keys: Keys | None = None, name: str = "dsrs pylon", invoice_expiry: int = 600,
                 payment_timeout: float = 120.0, max_jobs: int = 4) -> None:  # fmt: skip
        if price_msats > 0 and wallet is None:
            raise DsrsError("a priced provider needs a wallet to issue invoices", provider="pylon",
                            hint="pass --nwc nostr+walletconnect://... (or PYLON_NWC_URI), or --price-msats 0")  # fmt: skip
        self.lm = lm
        self.relays = tuple(relays)
        self.price_msats = price_msats
        self.wallet = wallet
        self.keys = keys or Keys.generate()
        self.name = name
        self.invoice_expiry = invoice_expiry
        self.payment_timeout = payment_timeout
        self.served = 0
        self._sem = asyncio.Semaphore(max_jobs)
        self._seen: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def pubkey(self) -> str:
        return self.keys.pubkey

    async def start(self) -> None:
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

    async def _take(self, sub: Any) -> None:
        async for ev in sub:
            if ev.id in self._seen:
                continue
            self._seen.add(ev.id)
            t = asyncio.create_task(self._serve(ev))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _feedback(self, job: Event, status: str, extra: str = "", amount: list[str] | None = None) -> None:
        tags = [["status", status] + ([extra] if extra else []), ["e", job.id], ["p", job.pubkey]]
        if amount:
            tags.append(["amount", *amount])
        await pools.pool(self.relays, self.keys).publish(sign(self.keys, FEEDBACK, "", tags))

    async def _serve(self, job: Event) -> None:
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
        try:
            # waiting for a payment holds no job slot: unpaid jobs cannot block paying customers
            if self.price_msats > 0 and not await self._get_paid(job):
                return
            async with self._sem:
                await self._feedback(job, "processing")
                text = await self._run(job, inp[1])
        except Exception as e:  # the customer hears why; the provider keeps serving
            msg = e.message if isinstance(e, DsrsError) else type(e).__name__
            with contextlib.suppress(Exception):
                await self._feedback(job, "error", msg[:300])
            return
        tags = [["request", json.dumps(job.to_json())], ["e", job.id], ["p", job.pubkey], ["i", inp[1], "text"]]
        if self.price_msats:
            tags.append(["amount", str(self.price_msats)])
        await pools.pool(self.relays, self.keys).publish(sign(self.keys, RESULT, text, tags))
        self.served += 1

    async def _get_paid(self, job: Event) -> bool:
        assert self.wallet is not None
        invoice = await self.wallet.make_invoice(self.price_msats, f"dsrs job {job.id[:16]}", self.invoice_expiry)
        ph = bolt11.decode(invoice).payment_hash
        await self._feedback(job, "payment-required", "", [str(self.price_msats), invoice])
        deadline = time.monotonic() + self.payment_timeout
        wait = 0.02  # backoff to POLL_MAX_S: ~70 lookups over the default 120 s, quick when paid at once
        while time.monotonic() < deadline:
            r = await self.wallet.lookup_invoice(ph)
            if r.get("settled_at") or r.get("state") == "settled":
                return True
            await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(wait * 1.5, POLL_MAX_S)
        await self._feedback(job, "error", "payment not received in time")
        return False

    async def _run(self, job: Event, prompt: str) -> str:
        params: dict[str, Any] = {}
        for t in job.tags:
            if len(t) >= 3 and t[0] == "param" and t[1] in ("max_tokens", "temperature", "top_p", "seed"):
                with contextlib.suppress(ValueError):
                    params[t[1]] = int(t[2]) if t[1] in ("max_tokens", "seed") else float(t[2])
        c = await self.lm.acall(prompt, **params)
        return str(c.text)


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
    p.add_argument("--max-jobs", type=int, default=4, help="jobs run at once")
    return p


async def serve(args: argparse.Namespace, ready: Any = None) -> None:
    from .lm import relays_from

    relays = relays_from(args.relay)
    uri = args.nwc or os.environ.get("PYLON_NWC_URI")
    wallet = NwcWallet(uri) if uri else None
    prov = Provider(lm_for(args.backend, args.model, args.base_url), relays, price_msats=args.price_msats, wallet=wallet,
                    keys=Keys.from_env(), name=args.name, max_jobs=args.max_jobs)  # fmt: skip
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
