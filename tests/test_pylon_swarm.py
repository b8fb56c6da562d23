"""The swarm client against our relay, a NIP-47 wallet service and scripted (often hostile) providers.

Every hostile case asserts that nothing was paid. The job round trip with payment is measured.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import statistics
import time
from typing import Any

import pytest
import pytest_asyncio

from dsrs.errors import BudgetExceededError, ConfigurationError, TimeoutError
from dsrs.nostr import Keys, sign
from dsrs.budget import Budget
from dsrs.pylon import PaymentError, PaymentRequiredError, PaymentUnknownError, PylonLM, SwarmJobError
from dsrs.types import CostSource
from nwc_service import FakeProvider, Net, WalletService, honest, start_net, stop_net

PRICE = 1000


@pytest_asyncio.fixture(loop_scope="function")
async def net():
    n = await start_net()
    yield n
    await stop_net(n)


@pytest_asyncio.fixture(loop_scope="function", params=["own", "stock"])
async def net2(request: Any, tmp_path: Any):
    """The network on the project's relay, then on PyPI's nostr-relay (stock limits): tests that
    need no hostile relay knob run on both."""
    if request.param == "own":
        n = await start_net()
        yield n
        await stop_net(n)
    else:
        from test_pylon_stock_relay import start_stock_net, stop_stock_net

        n = await start_stock_net(tmp_path / "stock-relay")
        yield n
        await stop_stock_net(n)


def client(net: Net, budget: int = 100_000, **kw: Any) -> PylonLM:
    lm = (PylonLM.new_swarm(net.relay.url).with_wallet(net.wallet).with_budget_msats(budget)
          .with_bid_msats(kw.pop("bid", 5000)).with_timeout(kw.pop("timeout", 5.0)))  # fmt: skip
    return lm.with_options(**kw) if kw else lm


async def run_with(net: Net, script: Any, lm: PylonLM | None = None, n_providers: int = 1) -> tuple[Any, list[FakeProvider]]:
    provs = [await FakeProvider(net, script).start() for _ in range(n_providers)]
    try:
        lm = lm or client(net)
        try:
            out: Any = await lm.acall("What is 2+2?")
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out = e
        return out, provs
    finally:
        for p in provs:
            await p.stop()


# -- the happy path -------------------------------------------------------------------------------
async def test_paid_job_round_trip(net: Net) -> None:
    lm = client(net)
    out, (fp,) = await run_with(net, honest, lm)
    assert out.text == "ok"
    u = out.usage
    assert (u.cost_msats, u.cost_source, u.estimated) == (PRICE, CostSource.INVOICE, True)
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert net.paid() == PRICE and fp.account.balance_msats == PRICE
    budget = lm.options["swarm_budget"]
    assert (budget.spent_msats, budget.reserved_msats) == (PRICE, 0)
    job = net.relay.published(5050)[0]
    tags = job["tags"]
    assert tags[0] == ["i", "What is 2+2?", "text"]
    assert ["bid", "5000"] in tags and ["output", "text/plain"] in tags and ["relays", net.relay.url] in tags
    # subscribed before publishing, cancelled after the result
    kinds = [(m[0], m[1]["kind"] if m[0] == "EVENT" else None) for m in net.relay.received]
    req_at = next(i for i, m in enumerate(net.relay.received) if m[0] == "REQ" and m[2].get("#e") == [job["id"]])
    assert req_at < kinds.index(("EVENT", 5050))
    for _ in range(500):  # the deletion is sent after the call returns
        if net.relay.published(5):
            break
        await asyncio.sleep(0.01)
    deletion = net.relay.published(5)[0]
    assert ["e", job["id"]] in deletion["tags"] and deletion["pubkey"] == job["pubkey"]
    # NIP-47 went out encrypted with NIP-44 v2 (the service offers it)
    assert [r["encryption"] for r in net.service.requests if r["method"] == "pay_invoice"] == ["nip44_v2"]
    nwc = net.relay.published(23194)[0]
    assert ["encryption", "nip44_v2"] in nwc["tags"] and "lnbc" not in nwc["content"]


async def test_fresh_key_per_job_and_fixed_identity(net: Net) -> None:
    lm = client(net)
    await run_with(net, honest, lm)
    await run_with(net, honest, lm)
    a, b = net.relay.published(5050)
    assert a["pubkey"] != b["pubkey"]
    me = Keys.generate()
    await run_with(net, honest, lm.with_keys(me.nsec))
    assert net.relay.published(5050)[2]["pubkey"] == me.pubkey


async def test_nip04_wallet_fallback() -> None:
    n = await start_net()
    old = n.service
    await old.stop()
    n.service = WalletService(n.relay.url, n.ledger, nip04_only=True)
    await n.service.start()
    from dsrs.pylon import NwcWallet

    n.wallet = NwcWallet(n.service.uri(n.customer), timeout=5)
    try:
        out, _ = await run_with(n, honest)
        assert out.usage.cost_msats == PRICE
        assert [r["encryption"] for r in n.service.requests] == ["nip04"]
        assert "?iv=" in n.relay.published(23194)[0]["content"]
    finally:
        await stop_net(n)


async def test_auto_pay_off_surfaces_the_quote(net2: Net) -> None:
    net = net2
    out, (fp,) = await run_with(net, honest, client(net).with_auto_pay(False))
    assert isinstance(out, PaymentRequiredError)
    q = out.quote
    assert (q.amount_msats, q.provider) == (PRICE, fp.pubkey) and q.invoice.startswith("lnbc")
    assert q.invoice not in repr(q) and q.invoice not in str(out)
    assert net.paid() == 0


# -- hostile providers and relays: nothing is paid ---------------------------------------------
async def _refused(net: Net, script: Any, reason: str, lm: PylonLM | None = None, n: int = 1) -> list[FakeProvider]:
    out, provs = await run_with(net, script, lm or client(net, timeout=0.6), n)
    assert isinstance(out, TimeoutError), out
    assert reason in str(out)
    assert net.paid() == 0
    return provs


async def test_forged_signature_is_dropped(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        ev = fp.feedback_event(job, "payment-required", amount=PRICE, invoice=fp.invoice(PRICE)).to_json()
        ev["tags"][0] = ["status", "payment-required", "tampered"]
        await net.relay.inject(ev)
        res = sign(fp.keys, 6050, "forged answer", [["e", job.id], ["p", job.pubkey]]).to_json()
        res["content"] = "changed after signing"
        await net.relay.inject(res)

    await _refused(net, script, "no provider answered")


async def test_wrong_job_id_and_wrong_customer(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        await net.relay.inject(fp.feedback_event(job, "payment-required", amount=PRICE, invoice=fp.invoice(PRICE),
                                                 e="ab" * 32).to_json())  # fmt: skip
        await fp.send(fp.feedback_event(job, "payment-required", amount=PRICE, invoice=fp.invoice(PRICE),
                                        p=Keys.generate().pubkey))  # fmt: skip
        await fp.result(job, "for someone else", p=Keys.generate().pubkey)

    await _refused(net, script, "not addressed to this job")


async def test_amount_over_bid(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        await fp.quote(job, 5001)

    await _refused(net, script, "over the bid of 5000")


async def test_over_budget(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        await fp.quote(job, 4000)

    lm = client(net, budget=4500, timeout=30)  # the bid 5000 + fee cap (1050) > 4500: refused before publishing
    out, _ = await run_with(net, script, lm)
    assert isinstance(out, BudgetExceededError) and "worst case 6050 msats, 4500 msats left" in str(out), out
    assert "with_bid_msats" in str(out) and net.relay.published(5050) == [] and net.paid() == 0
    assert lm.options["swarm_budget"].reserved_msats == 0


async def test_invoice_amount_differs_from_tag(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        await fp.quote(job, 1000, fp.invoice(2000))

    await _refused(net, script, "invoice amount 2000 differs from the quoted 1000")


async def test_expired_amountless_wrong_network_and_garbage_invoices(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        await fp.quote(job, PRICE, fp.invoice(PRICE, timestamp=int(time.time()) - 700, expiry=600))
        await fp.quote(job, PRICE, fp.invoice(None))
        await fp.quote(job, PRICE, fp.invoice(PRICE, network="tb"))
        await fp.quote(job, PRICE, "lnbc1garbage")
        await fp.send(fp.feedback_event(job, "payment-required", amount=PRICE))  # no invoice

    provs = await _refused(net, script, "invoice expired")
    assert provs[0].jobs


async def test_expired_amountless_wrong_network_reasons(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        await fp.quote(job, PRICE, fp.invoice(None))
        await fp.quote(job, PRICE, fp.invoice(PRICE, network="tb"))
        await fp.quote(job, PRICE, "lnbc1garbage")
        await fp.send(fp.feedback_event(job, "payment-required", amount=PRICE))

    out, _ = await run_with(net, script, client(net, timeout=0.6))
    for why in ("amountless invoice", "invoice for network 'tb'", "bad invoice", "without an invoice"):
        assert why in str(out)
    assert net.paid() == 0


async def test_stale_and_replayed_events(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        inv = fp.invoice(PRICE)
        stale = fp.feedback_event(job, "payment-required", amount=PRICE, invoice=inv, created_at=job.created_at - 3600)
        await net.relay.inject(stale.to_json())  # past the subscription's `since` (a relay that ignores it)

    await _refused(net, script, "stale event")


async def test_duplicate_results_pay_once(net2: Net) -> None:
    net = net2
    async def script(fp: FakeProvider, job: Any) -> None:
        inv = await fp.quote(job, PRICE)
        await fp.wait_paid(inv)
        await fp.result(job, "first")
        await fp.result(job, "second")
        await fp.quote(job, PRICE)  # a second bill after delivery

    out, _ = await run_with(net, script)
    assert out.text == "first" and out.usage.cost_msats == PRICE
    await asyncio.sleep(0.05)
    assert net.paid() == PRICE


async def test_replayed_quote_is_paid_once(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        ev = fp.feedback_event(job, "payment-required", amount=PRICE, invoice=fp.invoice(PRICE))
        await fp.send(ev)
        await net.relay.inject(ev.to_json())
        await net.relay.inject(ev.to_json())
        inv = ev.tags[-1][2]
        await fp.wait_paid(inv)
        await asyncio.sleep(0.05)
        await fp.result(job, "done")

    out, _ = await run_with(net, script)
    assert out.text == "done" and net.paid() == PRICE


async def test_second_provider_after_paying_the_first(net: Net) -> None:
    order: list[FakeProvider] = []

    async def script(fp: FakeProvider, job: Any) -> None:
        order.append(fp)
        if order[0] is fp:
            inv = await fp.quote(job, PRICE)
            await fp.wait_paid(inv)
            await asyncio.sleep(0.05)
            await fp.result(job, "from the first")
        else:
            await asyncio.sleep(0.02)
            await fp.quote(job, 900)  # cheaper, but too late
            await fp.result(job, "from the second, unpaid")

    out, provs = await run_with(net, script, n_providers=2)
    assert out.text == "from the first"
    assert net.paid() == PRICE and order[0].account.balance_msats == PRICE and order[1].account.balance_msats == 0


async def test_error_from_the_chosen_provider_fails_fast(net2: Net) -> None:
    net = net2
    async def script(fp: FakeProvider, job: Any) -> None:
        inv = await fp.quote(job, PRICE)
        await fp.wait_paid(inv)
        await fp.send(fp.feedback_event(job, "error", extra="model crashed"))

    out, _ = await run_with(net, script, client(net, timeout=30))
    assert isinstance(out, SwarmJobError) and "model crashed" in str(out)
    assert net.paid() == PRICE  # paid once, then failed fast (not after 30 s)


async def test_errors_from_others_are_named_in_the_timeout(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        await fp.send(fp.feedback_event(job, "error", extra="busy"))

    await _refused(net, script, "error: busy")


async def test_unknown_payment_outcome_keeps_the_reservation(net2: Net) -> None:
    net = net2
    net.service.hold_payments = True
    from dsrs.pylon import NwcWallet

    lm = client(net).with_wallet(NwcWallet(net.service.uri(net.customer), timeout=0.3))
    out, _ = await run_with(net, honest, lm)
    assert isinstance(out, PaymentUnknownError)
    b: Budget = lm.options["swarm_budget"]
    assert b.open_reservations == 1 and b.reserved_msats == 5000 + 1050 and b.spent_msats == 0  # the bid + fee cap
    out.reservation.release()  # reconciled later: it did not go out
    assert b.reserved_msats == 0 and b.open_reservations == 0


async def test_budget_holds_under_200_concurrent_calls(net: Net) -> None:
    async def script(fp: FakeProvider, job: Any) -> None:
        await honest(fp, job, PRICE, "ok")

    fp = await FakeProvider(net, script).start()
    try:
        lm = client(net, budget=20_500, timeout=4.0).with_fee_cap_msats(0)
        outs = await asyncio.gather(*(lm.acall(f"job {i}") for i in range(200)), return_exceptions=True)
    finally:
        await fp.stop()
    ok = [o for o in outs if not isinstance(o, BaseException)]
    failed = [o for o in outs if isinstance(o, BaseException)]
    b: Budget = lm.options["swarm_budget"]
    # The money holds whatever the machine's load: what was paid is what the budget booked, within the
    # limit, each answer cost one price, nothing stays reserved. (How many of the 20 affordable jobs
    # finish inside the 4 s timeout depends on the load, so it is not asserted: a paid job that timed
    # out is booked all the same.)
    assert 1 <= len(ok) <= 20 and all(o.usage.cost_msats == PRICE for o in ok)
    assert net.paid() == b.spent_msats <= b.limit_msats and net.paid() >= len(ok) * PRICE
    assert b.reserved_msats == 0 and b.open_reservations == 0
    assert all(isinstance(e, (TimeoutError, BudgetExceededError)) for e in failed)
    assert all("msats left" in str(e) for e in failed if isinstance(e, BudgetExceededError))


async def test_round_trip_latency_with_payment(net2: Net, capsys: pytest.CaptureFixture[str]) -> None:
    """Measured, not asserted: job round trip on the loopback relay, with NWC payment, beyond the model."""
    net = net2
    fp = await FakeProvider(net, honest).start()
    lm = client(net, budget=10_000_000)
    try:
        await lm.acall("warm up")
        times = []
        for i in range(30):
            t = time.perf_counter()
            out = await lm.acall(f"q{i}")
            times.append((time.perf_counter() - t) * 1000)
            assert out.usage.cost_msats == PRICE
    finally:
        await fp.stop()
    with capsys.disabled():
        where = "our relay" if hasattr(net.relay, "received") else "nostr-relay 1.14"
        print(f"\nswarm round trip with payment (loopback, {where}): p50 {statistics.median(times):.1f} ms, "
              f"max {max(times):.1f} ms over {len(times)} jobs")


async def test_swarm_over_a_relay_that_requires_nip42_auth() -> None:
    n = await start_net(require_auth=True)
    try:
        out, _ = await run_with(n, honest)
        assert out.text == "ok" and out.usage.cost_msats == PRICE
        assert any(m[0] == "AUTH" for m in n.relay.received)
    finally:
        await stop_net(n)


async def test_bounds_on_content_size_and_event_count(net: Net) -> None:
    import dataclasses

    from dsrs.pylon import swarm

    async def big(fp: FakeProvider, job: Any) -> None:
        await fp.result(job, "x" * 200)

    async def chatty(fp: FakeProvider, job: Any) -> None:
        for _ in range(5):
            await fp.send(fp.feedback_event(job, "processing", extra=f"step {_}"))

    cfg = client(net, timeout=0.6).swarm_config()
    req = client(net).request("q")
    for script, cfg2, err, why in (
        (big, dataclasses.replace(cfg, max_content=100), TimeoutError, "content too large"),
        (chatty, dataclasses.replace(cfg, max_events=3), SwarmJobError, "more than 3 events"),
    ):
        fp = await FakeProvider(net, script).start()
        try:
            with pytest.raises(err, match=why):
                await swarm.run(cfg2, req)
        finally:
            await fp.stop()
    assert net.paid() == 0


async def test_a_lane_budget_reserves_the_bid_and_settles_to_the_paid_amount(net: Net) -> None:
    outer = Budget(6_000)
    lm = client(net, bid=2000).with_fee_cap_msats(0)
    assert lm.worst_case_msats(lm.request("x")) == 2000
    assert PylonLM.new_local().worst_case_msats(lm.request("x")) == 0
    import dsrs

    with dsrs.context(budget=outer):
        out, _ = await run_with(net, honest, lm)
    assert out.usage.cost_msats == PRICE
    assert (outer.spent_msats, outer.reserved_msats) == (PRICE, 0)


# -- outer budgets (lanes, dsrs.configure/context, the gateway) know what the swarm paid -----------
async def test_outer_budgets_keep_what_a_failed_job_paid(net: Net) -> None:
    import dsrs

    async def fails_after_payment(fp: FakeProvider, job: Any) -> None:
        inv = await fp.quote(job, PRICE)
        await fp.wait_paid(inv)
        await fp.send(fp.feedback_event(job, "error", extra="model crashed"))

    async def never_delivers(fp: FakeProvider, job: Any) -> None:
        await fp.wait_paid(await fp.quote(job, PRICE))

    async def silent(fp: FakeProvider, job: Any) -> None:
        return None

    lm = client(net, timeout=1.0).with_fee_cap_msats(0)
    for script, err, code, spent in ((fails_after_payment, SwarmJobError, "provider_error", PRICE),
                                     (never_delivers, SwarmJobError, "paid_no_result", PRICE),
                                     (silent, TimeoutError, None, 0)):  # fmt: skip
        outer = Budget(100_000)
        with dsrs.context(budget=outer):
            out, _ = await run_with(net, script, lm)
        assert isinstance(out, err) and out.code == code, out
        assert out.spent_msats == spent
        assert (outer.spent_msats, outer.reserved_msats, outer.open_reservations) == (spent, 0, 0), script
    # the payment's outcome is unknown: the outer budget keeps the worst case (bid + fee cap)
    net.service.hold_payments = True
    from dsrs.pylon import NwcWallet

    outer = Budget(100_000)
    unknown = lm.with_wallet(NwcWallet(net.service.uri(net.customer), timeout=0.3))
    with dsrs.context(budget=outer):
        out, _ = await run_with(net, honest, unknown)
    assert isinstance(out, PaymentUnknownError) and out.spent_unknown
    assert (outer.spent_msats, outer.reserved_msats) == (unknown.worst_case_msats(unknown.request("x")), 0)
    out.reservation.release()


# -- wallets and keys given as options ------------------------------------------------------------
async def test_wallet_and_keys_as_options_are_coerced_and_hidden(net: Net) -> None:
    uri = net.service.uri(net.customer)
    secret = net.customer.keys.secret.hex()
    me, me2 = Keys.generate(), Keys.generate()  # two identities: the same job twice would have one id
    lms = [(me, PylonLM("swarm", relays=net.relay.url, wallet=uri, keys=me.nsec, bid_msats=5000, timeout=5.0)),
           (me2, PylonLM.new_swarm(net.relay.url).with_bid_msats(5000).with_timeout(5.0).with_options(wallet=uri, keys=me2.secret.hex()))]  # fmt: skip
    for me, lm in lms:
        shown = repr(lm) + repr(lm.options)
        assert secret not in shown and me.nsec not in shown and me.secret.hex() not in shown
        out, _ = await run_with(net, honest, lm)
        assert out.text == "ok" and out.usage.cost_msats == PRICE
        assert net.relay.published(5050)[-1]["pubkey"] == me.pubkey
    with pytest.raises(ConfigurationError, match="a wallet must be"):
        PylonLM.new_swarm(net.relay.url).with_options(wallet=42)
    with pytest.raises(ConfigurationError, match="Nostr secret key"):
        PylonLM.new_swarm(net.relay.url).with_options(keys="nsec1nope")


class _BrokenWallet:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def pay_invoice(self, invoice: str) -> Any:
        raise self.exc


async def test_a_wallet_that_raises_releases_the_reservation_unless_the_outcome_is_unknown(net: Net) -> None:
    lm = client(net, timeout=5.0).with_wallet(_BrokenWallet(RuntimeError("boom")))
    out, _ = await run_with(net, honest, lm)
    assert isinstance(out, PaymentError) and out.code == "wallet_error" and "RuntimeError" in str(out)
    b: Budget = lm.options["swarm_budget"]
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (0, 0, 0)
    lm = client(net, timeout=5.0).with_wallet(_BrokenWallet(builtins.TimeoutError()))
    out, _ = await run_with(net, honest, lm)
    assert isinstance(out, PaymentUnknownError)
    b = lm.options["swarm_budget"]
    assert (b.reserved_msats, b.open_reservations) == (5000 + 1050, 1) and out.reservation is not None
    out.reservation.release()
    assert net.paid() == 0


# -- wallet fees ----------------------------------------------------------------------------------
async def test_wallet_fees_are_paid_for_and_fees_over_the_cap_are_flagged(net2: Net, caplog: pytest.LogCaptureFixture) -> None:
    net = net2
    net.ledger.fee_msats = 7
    lm = client(net)
    out, _ = await run_with(net, honest, lm)
    assert out.usage.cost_msats == PRICE + 7 and "fees_over_cap" not in out.raw
    assert lm.options["swarm_budget"].spent_msats == PRICE + 7
    assert net.customer.balance_msats == 1_000_000 - PRICE - 7
    caplog.set_level(logging.WARNING, logger="dsrs.pylon")
    lm = client(net).with_fee_cap_msats(5)
    out, _ = await run_with(net, honest, lm)
    assert out.usage.cost_msats == PRICE + 7 and out.raw["fees_over_cap"] is True
    assert lm.options["swarm_budget"].spent_msats == PRICE + 7  # the truth, over the reservation
    assert any("over the fee cap of 5 msats" in r.getMessage() for r in caplog.records)


async def test_a_bare_encryption_tag_in_the_wallet_info_means_nip04(net: Net) -> None:
    from dsrs.nostr import Relay
    from dsrs.pylon import NwcWallet

    wallet_keys = Keys.generate()
    r = Relay(net.relay.url, wallet_keys)
    await r.publish(sign(wallet_keys, 13194, "pay_invoice", [["encryption"]]))
    await r.close()
    w = NwcWallet(f"nostr+walletconnect://{wallet_keys.pubkey}?relay={net.relay.url}&secret={Keys.generate().secret.hex()}",
                  timeout=5)  # fmt: skip
    assert await w.encryption() == "nip04"
