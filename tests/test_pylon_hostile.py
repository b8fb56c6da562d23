"""Payments over a hostile network (issue 12): a relay that drops the OK of the pay request, a
wallet that pays and never answers, a relay that never answers the wallet info query, a relay
that refuses the pay request. Paid at most once, the money booked is what the wallet paid, and
nothing stays reserved that was not sent. Calls the budget cannot fit fail at once, refusal
reasons are logged, and PylonLM imports without the pylon extra.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import pytest_asyncio

import dsrs
from dsrs.budget import Budget
from dsrs.errors import TimeoutError
from dsrs.pylon import NwcWallet, PaymentError, PaymentUnknownError, PylonLM
from dsrs.types import Completion
from nwc_service import FakeProvider, Net, honest, start_net, stop_net

PRICE = 1000


@pytest_asyncio.fixture(loop_scope="function")
async def net():
    n = await start_net()
    yield n
    await stop_net(n)


def client(net: Net, wallet: Any = None, *, timeout: float = 10.0, budget: int = 100_000) -> PylonLM:
    return (PylonLM.new_swarm(net.relay.url).with_wallet(wallet or net.wallet).with_budget_msats(budget)
            .with_bid_msats(5000).with_timeout(timeout))  # fmt: skip


async def call(net: Net, lm: PylonLM, script: Any) -> tuple[Any, FakeProvider]:
    fp = await FakeProvider(net, script).start()
    try:
        try:
            return await lm.acall("What is 2+2?"), fp
        except Exception as e:  # noqa: BLE001 - the test inspects it
            return e, fp
    finally:
        await fp.stop()


def settled(net: Net, invoice: str) -> bool:
    from dsrs.pylon import bolt11

    return net.ledger.invoices[bolt11.decode(invoice).payment_hash]["settled_at"] is not None


async def two_quotes(fp: FakeProvider, job: Any) -> None:
    """Quotes twice (two invoices) at once, answers once either is paid: a client that forgets a
    payment whose OK never came pays the second one too."""
    invs = [await fp.quote(job, PRICE), await fp.quote(job, PRICE)]
    for _ in range(5000):
        if any(settled(fp.net, i) for i in invs):
            await fp.result(job, "4")
            return
        await asyncio.sleep(0.005)


async def test_a_relay_that_drops_the_ok_of_the_pay_request_pays_once(net: Net) -> None:
    net.relay.drop_ok = {23194}  # the wallet still gets the request, pays and answers
    lm = client(net)
    outer = Budget(100_000)
    with dsrs.context(budget=outer):
        out, _ = await call(net, lm, two_quotes)
    assert isinstance(out, Completion), out
    b: Budget = lm.options["swarm_budget"]
    assert net.paid() == PRICE == out.usage.cost_msats  # once, and the answer says what it cost
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (net.paid(), 0, 0)
    assert (outer.spent_msats, outer.reserved_msats) == (net.paid(), 0)
    assert len([r for r in net.service.requests if r["method"] == "pay_invoice"]) == 1


async def test_a_wallet_that_pays_but_never_answers_is_resolved_by_lookup(net: Net) -> None:
    net.ledger.fee_msats = 3
    net.service.mute_payments = True
    lm = client(net, NwcWallet(net.service.uri(net.customer), timeout=0.5))
    out, _ = await call(net, lm, honest)
    assert isinstance(out, Completion) and out.text == "ok", out
    b: Budget = lm.options["swarm_budget"]
    assert net.paid() == PRICE and out.usage.cost_msats == PRICE + 3
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (PRICE + 3, 0, 0)
    assert [r["method"] for r in net.service.requests] == ["pay_invoice", "lookup_invoice"]


async def test_no_ok_and_no_answer_is_unknown_never_paid_twice_and_stays_booked(net: Net) -> None:
    net.relay.drop_ok = {23194}
    net.service.hold_payments = True  # the request reached the wallet; what it did is unknown
    lm = client(net, NwcWallet(net.service.uri(net.customer), timeout=0.5), timeout=3.0)
    outer = Budget(100_000)
    with dsrs.context(budget=outer):
        out, _ = await call(net, lm, two_quotes)
    assert isinstance(out, PaymentUnknownError) and out.spent_unknown, out
    assert out.payment_hash is not None and len(out.payment_hash) == 64  # the caller can look it up later
    b: Budget = lm.options["swarm_budget"]
    booked = lm.worst_case_msats(lm.request("x"))  # the bid + fee cap, booked before the job went out
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (0, booked, 1)  # kept, not released
    assert outer.spent_msats == lm.worst_case_msats(lm.request("x")) and outer.reserved_msats == 0
    assert len([r for r in net.service.requests if r["method"] == "pay_invoice"]) == 1  # the second quote: never
    out.reservation.settle(PRICE)  # reconciled later from the wallet
    assert (b.spent_msats, b.reserved_msats) == (PRICE, 0)


async def test_a_relay_that_never_answers_the_wallet_info_query_books_nothing_and_keeps_the_timeout(net: Net) -> None:
    net.relay.silent_req = {13194}
    lm = client(net, NwcWallet(net.service.uri(net.customer)), timeout=2.0)  # the wallet's own timeout: 30 s
    outer = Budget(100_000)
    t = time.monotonic()
    with dsrs.context(budget=outer):
        out, _ = await call(net, lm, honest)
    elapsed = time.monotonic() - t
    assert isinstance(out, PaymentError) and not isinstance(out, PaymentUnknownError), out
    assert out.code == "NOT_SENT" and out.spent_msats == 0 and "wallet info" in str(out)
    assert elapsed < 2.0 + 10  # bounded by the call's timeout, not the wallet's 30 s
    b: Budget = lm.options["swarm_budget"]
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (0, 0, 0)
    assert (outer.spent_msats, outer.reserved_msats, outer.open_reservations) == (0, 0, 0)
    assert net.relay.published(23194) == [] and net.paid() == 0


async def test_a_relay_that_refuses_the_pay_request_releases_it(net: Net) -> None:
    net.relay.refuse = {23194}
    lm = client(net, timeout=1.0)
    out, _ = await call(net, lm, honest)
    assert isinstance(out, TimeoutError) and "payment failed (NOT_SENT)" in str(out), out
    b: Budget = lm.options["swarm_budget"]
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (0, 0, 0) and net.paid() == 0


async def test_relay_publish_says_whether_the_event_may_have_left(net: Net) -> None:
    from dsrs.nostr import Keys, Relay, RelayError, sign

    k = Keys.generate()
    r = Relay(net.relay.url, k)
    try:
        net.relay.refuse = {1}
        with pytest.raises(RelayError) as refused:
            await r.publish(sign(k, 1, "a", []), timeout=5)
        assert refused.value.event_sent is False
        net.relay.refuse, net.relay.drop_ok = set(), {1}
        with pytest.raises(TimeoutError) as unacked:
            await r.publish(sign(k, 1, "b", []), timeout=0.2)
        assert unacked.value.event_sent is True
    finally:
        await r.close()


async def test_refusal_reasons_are_logged(net: Net, caplog: pytest.LogCaptureFixture) -> None:
    async def greedy(fp: FakeProvider, job: Any) -> None:
        await fp.quote(job, 9000)

    caplog.set_level(logging.INFO, logger="dsrs.pylon")
    out, fp = await call(net, client(net, timeout=0.6), greedy)
    assert isinstance(out, TimeoutError)
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("dsrs.pylon")]
    assert any("asks 9000 msats, over the bid of 5000" in m and fp.pubkey[:12] in m for m in msgs), msgs
    assert not any("lnbc" in m for m in msgs)


def test_import_without_the_pylon_extra() -> None:
    code = (
        "import sys\n"
        # the pylon extra and every other non-core package missing (the Quick-start install)
        "for m in ('coincurve', 'websockets', 'cryptography', 'rich', 'matplotlib', 'redis', 'dspy', 'pydantic',\n"
        "          'nostr_sdk', 'openai', 'ollama', 'hypothesis'): sys.modules[m] = None\n"
        "from dsrs import LaneMux, CodexSdkLM, PylonLM, Budget, ConfigurationError\n"
        "local = PylonLM.new_local()\n"
        "lm = PylonLM.new_swarm('ws://127.0.0.1:9').with_budget_msats(5000)\n"
        "mux = LaneMux().add_lane('premium', CodexSdkLM()).add_lane('cheap', lm)\n"
        "try:\n"
        "    lm('hi')\n"
        "except ConfigurationError as e:\n"
        "    print('refused:', e)\n"
        "b = lm.options['swarm_budget']\n"
        "print('booked:', b.spent_msats, b.reserved_msats)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYLON_", "DSRS_"))}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "refused:" in p.stdout and "pip install 'dsrs[pylon]'" in p.stdout, p.stdout
    assert "booked: 0 0" in p.stdout


async def test_concurrent_calls_the_budget_cannot_fit_fail_fast(net: Net) -> None:
    lm = client(net, budget=3 * 5000, timeout=60.0).with_fee_cap_msats(0)  # room for three bids at a time
    fp = await FakeProvider(net, honest).start()
    try:
        t = time.monotonic()
        outs = await asyncio.gather(*(lm.acall(f"job {i}") for i in range(12)), return_exceptions=True)
        elapsed = time.monotonic() - t
    finally:
        await fp.stop()
    ok = [o for o in outs if isinstance(o, Completion)]
    refused = [o for o in outs if isinstance(o, dsrs.BudgetExceededError)]
    assert len(ok) + len(refused) == 12 and 1 <= len(ok) <= 12 and refused, outs
    assert elapsed < 60  # no refused call waited out its 60 s timeout
    b: Budget = lm.options["swarm_budget"]
    assert net.paid() == b.spent_msats == len(ok) * PRICE and (b.reserved_msats, b.open_reservations) == (0, 0)
    assert len(net.relay.published(5050)) == len(ok)  # a refused call published nothing


# -- relays that limit subscriptions: refusals by NOTICE or CLOSED, read and acted on ----------------
async def test_a_relay_that_refuses_subscriptions_by_notice_pays_once_on_more_connections(net: Net) -> None:
    """One subscription per connection, the next REQ answered by a NOTICE (as nostr-relay does), and
    the pay request's OK dropped: the job's answers, the wallet's info and its answers each get a
    connection of their own, the job is paid once, the booking is what the wallet paid."""
    from dsrs.pylon import pools

    net.relay.max_subs, net.relay.notice_refusals = 1, True
    net.relay.drop_ok = {23194}
    lm = client(net)
    out, _ = await call(net, lm, two_quotes)
    assert isinstance(out, Completion) and out.text == "4", out
    b: Budget = lm.options["swarm_budget"]
    assert net.paid() == PRICE == out.usage.cost_msats == b.spent_msats and (b.reserved_msats, b.open_reservations) == (0, 0)
    assert len([r for r in net.service.requests if r["method"] == "pay_invoice"]) == 1
    conns = pools.pool((net.relay.url,)).conns[net.relay.url]
    assert len(conns) >= 2 and any(c.notices for c in conns) and max(net.relay.subscriptions()) == 1


async def test_a_relay_that_refuses_every_subscription_fails_the_call_at_once_with_nothing_sent(net: Net) -> None:
    from dsrs.nostr import SubscriptionRefused

    fp = await FakeProvider(net, honest).start()
    for notice in (True, False):
        net.relay.max_subs, net.relay.notice_refusals = 0, notice  # the provider and the wallet subscribed before
        lm = client(net, timeout=60.0)
        t = time.monotonic()
        try:
            out: Any = await lm.acall("What is 2+2?")
        except Exception as e:  # noqa: BLE001 - inspected below
            out = e
        assert time.monotonic() - t < 30  # the relay's answer, not the 60 s timeout
        assert isinstance(out, SubscriptionRefused) and "the job was not sent" in str(out), out
        assert out.code == ("notice" if notice else "error")
        b: Budget = lm.options["swarm_budget"]
        assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (0, 0, 0)
        assert net.relay.published(5050) == [] and net.paid() == 0
        from dsrs.pylon import pools

        await pools.aclose()
    await fp.stop()


async def test_a_relay_that_closes_the_jobs_subscription_after_payment(net: Net) -> None:
    """The relay CLOSEs the shared subscription the answers come on, after the job was paid: it is
    opened again and the result still arrives; if the relay refuses that too, the call fails at once
    with SwarmJobError `paid_no_result`, the payment booked as spent."""
    paid = asyncio.Event()

    async def closes_then_answers(fp: FakeProvider, job: Any) -> None:
        inv = await fp.quote(job, PRICE)
        if await fp.wait_paid(inv):
            await asyncio.sleep(0.05)
            assert await net.relay.close_subs({6050}, "error: shutting down") == 1
            paid.set()
            await asyncio.sleep(0.2)  # the client subscribes again (or is refused)
            await fp.result(job, "after the close")

    lm = client(net).with_fee_cap_msats(0)
    out, _ = await call(net, lm, closes_then_answers)
    assert isinstance(out, Completion) and out.text == "after the close", out
    b: Budget = lm.options["swarm_budget"]
    assert net.paid() == PRICE == b.spent_msats and b.reserved_msats == 0

    async def refuse_after_close(fp: FakeProvider, job: Any) -> None:
        inv = await fp.quote(job, PRICE)
        if await fp.wait_paid(inv):
            await asyncio.sleep(0.05)
            net.relay.max_subs = 0
            await net.relay.close_subs({6050}, "error: shutting down")

    lm = client(net, timeout=60.0).with_fee_cap_msats(0)
    t = time.monotonic()
    out, _ = await call(net, lm, refuse_after_close)
    from dsrs.pylon import SwarmJobError

    assert isinstance(out, SwarmJobError) and out.code == "paid_no_result" and out.spent_msats == PRICE, out
    assert time.monotonic() - t < 30
    b = lm.options["swarm_budget"]
    assert net.paid() == 2 * PRICE and b.spent_msats == PRICE and (b.reserved_msats, b.open_reservations) == (0, 0)


async def test_the_wallets_answers_subscription_closed_mid_payment_stays_booked_and_is_paid_once(net: Net) -> None:
    """The wallet pays but its answer cannot reach us: the relay CLOSEs the subscription for the
    wallet's answers as the pay request arrives and refuses a new one. The call ends well before its
    timeout with PaymentUnknownError, the booking kept (bid + fee cap), the job never paid again."""
    net.service.mute_payments = True  # pays; its answer would have been lost anyway

    def on_event(ev: dict[str, Any]) -> None:
        if ev["kind"] == 23194:
            net.relay.max_subs = 0
            asyncio.ensure_future(net.relay.close_subs({23195}, "error: shutting down"))

    net.relay.on_event.append(on_event)
    lm = client(net, NwcWallet(net.service.uri(net.customer), timeout=30), timeout=60.0)
    t = time.monotonic()
    out, _ = await call(net, lm, two_quotes)
    assert isinstance(out, PaymentUnknownError) and out.spent_unknown, out
    assert time.monotonic() - t < 30  # not the wallet's 30 s nor the call's 60 s
    b: Budget = lm.options["swarm_budget"]
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (0, lm.worst_case_msats(lm.request("x")), 1)
    assert net.paid() == PRICE and len([r for r in net.service.requests if r["method"] == "pay_invoice"]) == 1
    out.reservation.settle(PRICE)
    assert (b.spent_msats, b.reserved_msats) == (PRICE, 0)


async def test_a_job_over_the_relays_published_size_limit_is_refused_before_sending(net: Net) -> None:
    from dsrs.nostr import EventTooLargeError, nip11

    net.relay.limitation = {"max_message_length": 3000, "max_content_length": 1000}
    nip11._cache.pop(net.relay.url, None)
    lm = client(net, timeout=60.0)
    fp = await FakeProvider(net, honest).start()
    try:
        with pytest.raises(EventTooLargeError, match="relay .* takes messages of at most 3000") as big:
            await lm.acall("x" * 5000)
        assert big.value.event_sent is False and big.value.spent_msats == 0
        out = await lm.acall("What is 2+2?")  # a job within the limits goes
    finally:
        await fp.stop()
    assert out.text == "ok" and len(net.relay.published(5050)) == 1
    b: Budget = lm.options["swarm_budget"]
    assert net.paid() == PRICE == b.spent_msats and (b.reserved_msats, b.open_reservations) == (0, 0)
