"""The provider side end to end: PylonLM swarm client -> our relay -> `pylon serve` running the
embedded Gemma model -> result, paid over NWC, cost_msats equal to the price."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest_asyncio

from conftest import FEW_SHOT
from dsrs.errors import TimeoutError
from dsrs.nostr import Keys, Relay, sign
from dsrs.pylon import NwcWallet, PylonLM
from dsrs.pylon.serve import Provider, lm_for
from dsrs.types import CostSource
from nwc_service import Net, counted, start_net, stop_net

PRICE = 2000


@pytest_asyncio.fixture(loop_scope="function")
async def net():
    n = await start_net()
    yield n
    await stop_net(n)


def customer(net: Net, **kw: Any) -> PylonLM:
    return (PylonLM.new_swarm(net.relay.url).with_wallet(net.wallet).with_budget_msats(10_000)
            .with_bid_msats(kw.get("bid", 5000)).with_timeout(kw.get("timeout", 60)).with_max_tokens(4)
            .with_temperature(0))  # fmt: skip


async def test_paid_job_on_embedded_gemma(net: Net) -> None:
    acct = net.ledger.open(0)
    prov = Provider(lm_for("embedded", None), [net.relay.url], price_msats=PRICE,
                    wallet=NwcWallet(net.service.uri(acct), timeout=5))  # fmt: skip
    await prov.start()
    try:
        out = await customer(net).acall(FEW_SHOT)
    finally:
        await prov.stop()
    assert "Paris" in out.text
    assert (out.usage.cost_msats, out.usage.cost_source) == (PRICE, CostSource.INVOICE)
    assert net.paid() == PRICE and acct.balance_msats == PRICE
    (ann,) = net.relay.published(31990)
    assert ["k", "5050"] in ann["tags"] and ann["pubkey"] == prov.pubkey
    job = net.relay.published(5050)[0]
    statuses = [e["tags"][0][1] for e in net.relay.published(7000) if e["pubkey"] == prov.pubkey]
    assert statuses in (["payment-required", "processing"], ["payment-required"])  # processing: a model slower than 0.25 s
    (res,) = net.relay.published(6050)
    assert json.loads(dict((t[0], t[1]) for t in res["tags"])["request"])["id"] == job["id"]
    assert ["param", "max_tokens", "4"] in job["tags"]
    methods = [r["method"] for r in net.service.requests]
    assert methods.count("pay_invoice") == 1 and 1 <= methods.count("make_invoice") <= 1 + prov.invoice_stock
    assert "lookup_invoice" not in methods and prov.payments.notified  # seen by the wallet's notification


async def test_provider_refuses_low_bids_and_encrypted_jobs(net: Net) -> None:
    acct = net.ledger.open(0)
    prov = Provider(lm_for("embedded", None), [net.relay.url], price_msats=PRICE,
                    wallet=NwcWallet(net.service.uri(acct), timeout=5))  # fmt: skip
    await prov.start()
    try:
        try:
            await customer(net, bid=1000, timeout=1.0).acall(FEW_SHOT)
            raise AssertionError("a bid under the price must not be served")
        except TimeoutError as e:
            assert "bid under the price of 2000 msats" in str(e)
        k = Keys.generate()
        r = Relay(net.relay.url, k)
        sub = await r.subscribe([{"kinds": [7000], "#p": [k.pubkey]}])
        await r.publish(sign(k, 5050, "ciphertext", [["encrypted"], ["bid", "5000"]]))
        fb = await sub.next(10)
        assert fb.tag("status") == ["status", "error", "encrypted jobs are not supported"]
        await r.close()
    finally:
        await prov.stop()
    assert net.paid() == 0 and prov.served == 0


async def test_pylon_serve_command(net: Net) -> None:
    """`python -m dsrs.pylon.serve` (what `dsrs pylon serve` runs) in its own process."""
    acct = net.ledger.open(0)
    env = {**os.environ, "PYLON_NWC_URI": net.service.uri(acct)}
    env.pop("PYLON_NSEC", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dsrs.pylon.serve", "--backend", "embedded", "--price-msats", "1500",
        "--relay", net.relay.url, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()  # type: ignore[union-attr]
        assert line.startswith("serving as npub1") and "1500 msats per job" in line
        out = await customer(net).acall(FEW_SHOT)
        assert "Paris" in out.text and out.usage.cost_msats == 1500 and acct.balance_msats == 1500
    finally:
        proc.terminate()
        await proc.wait()


def test_serve_refuses_a_priced_provider_without_wallet() -> None:
    from dsrs.pylon import serve

    env = {k: v for k, v in os.environ.items() if k != "PYLON_NWC_URI"}
    r = subprocess.run([sys.executable, "-m", "dsrs.pylon.serve", "--relay", "ws://127.0.0.1:9"], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "needs a wallet" in r.stderr
    assert serve.parser().parse_args(["--backend", "openai/gpt-4o-mini"]).backend == "openai/gpt-4o-mini"
    a = serve.parser().parse_args([])
    assert (a.max_pending, a.payment_timeout, a.max_result_chars, a.poll_rate, a.invoice_stock) == (64, 120.0, 4096, 10.0, 4)
    a = serve.parser().parse_args(["--max-pending", "8", "--payment-timeout", "30", "--max-result-chars", "60000",
                                   "--poll-rate", "2", "--invoice-stock", "0"])  # fmt: skip
    assert (a.max_pending, a.payment_timeout, a.max_result_chars, a.poll_rate, a.invoice_stock) == (8, 30.0, 60000, 2.0, 0)
    from dsrs.errors import ConfigurationError

    try:
        serve.Provider(None, ["ws://127.0.0.1:9"], price_msats=0, wallet=None, max_pending=0)
        raise AssertionError("a pending cap of 0 must be refused")
    except ConfigurationError as e:
        assert "max_pending" in str(e) and e.hint


async def test_provider_selling_a_llamacpp_server(net: Net, llama_server: Any) -> None:
    acct = net.ledger.open(0)
    prov = Provider(lm_for("llama.cpp", None, llama_server.url + "/v1"), [net.relay.url], price_msats=1000,
                    wallet=NwcWallet(net.service.uri(acct), timeout=5))  # fmt: skip
    await prov.start()
    try:
        out = await customer(net).acall(FEW_SHOT)
    finally:
        await prov.stop()
    assert "Paris" in out.text and out.usage.cost_msats == 1000 and acct.balance_msats == 1000


async def test_unpaid_jobs_do_not_hold_the_job_slots(net: Net) -> None:
    """One job slot, one customer who never pays: a paying customer is still served."""
    from dsrs.pylon import PaymentRequiredError

    acct = net.ledger.open(0)
    prov = Provider(lm_for("embedded", None), [net.relay.url], price_msats=PRICE, max_jobs=1, payment_timeout=600,
                    wallet=NwcWallet(net.service.uri(acct), timeout=5))  # fmt: skip
    await prov.start()
    try:
        try:
            await customer(net).with_auto_pay(False).acall("never paid")
            raise AssertionError("auto_pay off must surface the quote")
        except PaymentRequiredError:
            pass  # the provider now waits for a payment that never comes
        out = await customer(net, timeout=20).acall(FEW_SHOT)
        await counted(prov, 1)
    finally:
        await prov.stop()
    assert "Paris" in out.text and out.usage.cost_msats == PRICE and prov.served == 1


async def test_notifications_refused_by_the_relay_mean_polling(net: Net) -> None:
    """The wallet offers notifications but the relay never confirms the subscription (as nostr-relay
    does with a NOTICE past 32 subscriptions): the provider polls instead, and the paid job is served."""
    net.relay.silent_req = {23196, 23197}
    acct = net.ledger.open(0)
    prov = Provider(lm_for("embedded", None), [net.relay.url], price_msats=PRICE,
                    wallet=NwcWallet(net.service.uri(acct), timeout=5))  # fmt: skip
    await prov.start()
    try:
        out = await customer(net).acall(FEW_SHOT)
    finally:
        await prov.stop()
    assert prov.payments is not None and not prov.payments.notified
    assert "Paris" in out.text and out.usage.cost_msats == PRICE == acct.balance_msats
    assert net.service.count("lookup_invoice", acct) == prov.payments.lookups >= 1


async def test_notification_subscription_closed_later_means_polling(net: Net) -> None:
    """The relay ends the notification subscription (CLOSED) while the provider runs: it polls from then on."""
    acct = net.ledger.open(0)
    prov = Provider(lm_for("embedded", None), [net.relay.url], price_msats=PRICE,
                    wallet=NwcWallet(net.service.uri(acct), timeout=5))  # fmt: skip
    await prov.start()
    try:
        assert prov.payments is not None and prov.payments.notified
        closed = 0
        for ws, st in list(net.relay.clients.items()):
            for sid, filters in list(st["subs"].items()):
                if any(23197 in f.get("kinds", ()) for f in filters):
                    del st["subs"][sid]
                    await ws.send(json.dumps(["CLOSED", sid, "error: shutting down idle subscriptions"]))
                    closed += 1
        assert closed == 1
        out = await customer(net).acall(FEW_SHOT)
    finally:
        await prov.stop()
    assert "Paris" in out.text and out.usage.cost_msats == PRICE == acct.balance_msats
    assert not prov.payments.notified and net.service.count("lookup_invoice", acct) == prov.payments.lookups >= 1
