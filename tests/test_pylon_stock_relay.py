"""The swarm client through a third-party relay: PyPI nostr-relay 1.14, unmodified, stock limits
(32 subscriptions per connection, the 33rd refused with a NOTICE; 4,096 characters of content per
event, refused with an OK that names no event; no NIP-11 `limitation`).

The wallet service (tests/nwc_service.py) and the providers run on that relay too. An observer
of our own records the traffic raw, and `nostr-sdk` (rust-nostr, an independent implementation)
verifies every event and decrypts the NIP-47 requests and answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dsrs.budget import Budget
from dsrs.errors import BudgetExceededError
from dsrs.nostr import Keys, Relay, RelayError, RelayPool, SubscriptionRefused, sign
from dsrs.pylon import PylonLM, SwarmJobError, pools
from dsrs.types import Completion, CostSource
from nwc_service import FakeProvider, Ledger, Net, WalletService, honest
from stock_relay import StockRelay

PRICE = 1000


async def start_stock_net(workdir: Path, **overrides: Any) -> Net:
    relay = await asyncio.to_thread(StockRelay.start, workdir, **overrides)
    ledger = Ledger()
    svc = WalletService(relay.url, ledger)
    await svc.start()
    return Net(relay, ledger, svc)


async def stop_stock_net(net: Net, *others: Any) -> None:
    for o in others:
        await o.stop()
    await pools.aclose()
    await net.service.stop()
    await asyncio.to_thread(net.relay.stop)


@pytest_asyncio.fixture(loop_scope="function")
async def stock_net(tmp_path: Path):
    n = await start_stock_net(tmp_path / "stock-relay")
    yield n
    await stop_stock_net(n)


def client(net: Net, budget: int = 100_000, **kw: Any) -> PylonLM:
    return (PylonLM.new_swarm(net.relay.url).with_wallet(net.wallet).with_budget_msats(budget)
            .with_bid_msats(kw.pop("bid", 5000)).with_timeout(kw.pop("timeout", 30.0)))  # fmt: skip


class Observer:
    """A raw websocket subscription (no dsrs code) recording every event of `kinds` on the relay."""

    def __init__(self, url: str, kinds: list[int]) -> None:
        self.url, self.kinds = url, kinds
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Observer:
        from websockets.asyncio.client import connect

        self._ws = await connect(self.url, max_size=None)
        await self._ws.send(json.dumps(["REQ", "observer", {"kinds": self.kinds, "since": int(time.time()) - 5}]))
        while json.loads(await self._ws.recv())[0] != "EOSE":
            pass
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for raw in self._ws:
            msg = json.loads(raw)
            if msg[0] == "EVENT":
                self.events.append(msg[2])

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._ws.close()

    def of(self, kind: int) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


def cross_check(net: Net, obs: Observer) -> list[dict[str, Any]]:
    """nostr-sdk verifies every event seen and decrypts the NIP-47 traffic; the pay_invoice requests."""
    import nostr_sdk as n

    assert obs.events and all(n.Event.from_json(json.dumps(e)).verify() for e in obs.events)
    svc_sk = n.SecretKey.parse(net.service.keys.secret.hex())
    me_sk = n.SecretKey.parse(net.customer.keys.secret.hex())
    pays: list[dict[str, Any]] = []
    for e in obs.of(23194):
        assert ["encryption", "nip44_v2"] in e["tags"] and "lnbc" not in e["content"]
        body = json.loads(n.nip44_decrypt(svc_sk, n.PublicKey.parse(e["pubkey"]), e["content"]))
        if body["method"] == "pay_invoice":
            pays.append(body["params"])
    for e in obs.of(23195):
        body = json.loads(n.nip44_decrypt(me_sk, n.PublicKey.parse(e["pubkey"]), e["content"]))
        if body["result_type"] == "pay_invoice" and body.get("result"):
            from dsrs.pylon import bolt11

            pre = bytes.fromhex(body["result"]["preimage"])
            assert any(hashlib.sha256(pre).hexdigest() == bolt11.decode(p["invoice"]).payment_hash for p in pays)
    return pays


# -- the honest path --------------------------------------------------------------------------------
async def test_paid_round_trip_through_the_stock_relay_cross_checked_by_nostr_sdk(stock_net: Net) -> None:
    net = stock_net
    obs = await Observer(net.relay.url, [5050, 7000, 6050, 23194, 23195]).start()
    fp = await FakeProvider(net, honest).start()
    lm = client(net)
    try:
        out = await lm.acall("What is 2+2?")
        await asyncio.sleep(0.2)  # the observer's copies of the last events
    finally:
        await fp.stop()
        await obs.stop()
    assert out.text == "ok" and (out.usage.cost_msats, out.usage.cost_source) == (PRICE, CostSource.INVOICE)
    b: Budget = lm.options["swarm_budget"]
    assert net.paid() == PRICE == b.spent_msats and (b.reserved_msats, b.open_reservations) == (0, 0)
    pays = cross_check(net, obs)
    assert len(pays) == 1 and len(obs.of(5050)) == 1 and len(obs.of(6050)) == 1


async def test_50_concurrent_paid_jobs_on_one_stock_relay(stock_net: Net) -> None:
    """Issue 12: 50 concurrent calls answered 0 and locked 8,040 msats (one subscription per job: the
    33rd was refused by a NOTICE nobody read). Now the jobs share one subscription, the wallet one."""
    net = stock_net
    obs = await Observer(net.relay.url, [5050, 23194, 23195]).start()
    fp = await FakeProvider(net, honest).start()
    lm = client(net, budget=40 * PRICE, bid=PRICE, timeout=90.0).with_fee_cap_msats(0)  # room for 40 of the 50
    try:
        outs = await asyncio.gather(*(lm.acall(f"job {i}") for i in range(50)), return_exceptions=True)
        await asyncio.sleep(0.2)
    finally:
        await fp.stop()
        await obs.stop()
    ok = [o for o in outs if isinstance(o, Completion)]
    refused = [o for o in outs if isinstance(o, BudgetExceededError)]
    assert len(ok) + len(refused) == 50, [o for o in outs if not isinstance(o, (Completion, BudgetExceededError))][:3]
    assert 1 <= len(ok) <= 40 and len(refused) >= 10 and all(o.usage.cost_msats == PRICE for o in ok)
    b: Budget = lm.options["swarm_budget"]
    assert net.paid() == b.spent_msats == len(ok) * PRICE and (b.reserved_msats, b.open_reservations) == (0, 0)
    pool = pools.pool((net.relay.url,))
    assert len(pool.conns[net.relay.url]) == 1 and not pool.relays[0].notices  # a few subscriptions: no refusal
    assert len(obs.of(5050)) == len(ok)  # a refused call published nothing
    assert len(cross_check(net, obs)) == len(ok)  # one pay request per answered job, each verified


# -- the relay's limits -----------------------------------------------------------------------------
async def test_the_stock_relays_33rd_subscription_is_refused_at_once_and_a_pool_opens_a_second_connection(
    stock_net: Net,
) -> None:
    url = stock_net.relay.url
    k = Keys.generate()
    one, pool = Relay(url), RelayPool([url])
    try:
        for i in range(32):
            await one.subscribe([{"kinds": [1], "authors": [k.pubkey], "#t": [str(i)]}])
        t = time.monotonic()
        with pytest.raises(SubscriptionRefused) as refused:  # a NOTICE, not a CLOSED: read as the refusal
            await one.subscribe([{"kinds": [1]}], timeout=60)
        assert refused.value.code == "notice" and refused.value.full and one.max_subs == 32
        assert time.monotonic() - t < 60  # not the timeout: the relay's answer
        subs = [await pool.subscribe([{"kinds": [1], "authors": [k.pubkey]}]) for _ in range(40)]
        assert len(pool.conns[url]) == 2
        ev = sign(k, 1, "to all 40")
        await pool.publish(ev)
        for s in subs:
            assert (await s.next(10)).id == ev.id
    finally:
        await one.close()
        await pool.close()


async def test_an_event_over_the_stock_relays_size_limit_is_refused_at_once(stock_net: Net) -> None:
    """At once: the relay's answer (nostr-relay then throttles that connection, 2 s per message)."""
    r = Relay(stock_net.relay.url)
    try:
        with pytest.raises(RelayError) as refused:  # its OK names no event: one was waiting, so it is that one's
            await r.publish(sign(Keys.generate(), 1, "x" * 4097), timeout=60)
        assert refused.value.code == "rejected" and refused.value.event_sent is False
        await r.publish(sign(Keys.generate(), 1, "x" * 4096))
    finally:
        await r.close()


async def test_a_result_over_the_stock_relays_size_limit(stock_net: Net) -> None:
    """The provider is paid, its 5,000-character result is refused by the relay: the customer gets a
    typed SwarmJobError (`paid_no_result` at its timeout, or `provider_error` at once when the
    provider says why), the money paid stays booked as spent (it went out), nothing stays reserved."""
    net = stock_net
    refusals: list[str] = []

    def too_long(report: bool) -> Any:
        async def script(fp: FakeProvider, job: Any) -> None:
            inv = await fp.quote(job, PRICE)
            if await fp.wait_paid(inv):
                try:
                    await fp.result(job, "y" * 5000)
                except RelayError as e:
                    refusals.append(e.message)
                    if report:  # what pylon serve should do (its side of issue 12)
                        await fp.send(fp.feedback_event(job, "error", extra="result over the relay's size limit"))

        return script

    for report, timeout, why, code in ((False, 3.0, "no result within", "paid_no_result"),
                                       (True, 60.0, "size limit", "provider_error")):  # fmt: skip
        fp = await FakeProvider(net, too_long(report)).start()
        lm = client(net, timeout=timeout).with_fee_cap_msats(0)
        paid_before = net.paid()
        try:
            with pytest.raises(SwarmJobError, match=why) as failed:
                await lm.acall("Write 5,000 characters.")
        finally:
            await fp.stop()
        e = failed.value
        b: Budget = lm.options["swarm_budget"]
        assert e.code == code and e.spent_msats == PRICE, e
        assert net.paid() - paid_before == PRICE == b.spent_msats and (b.reserved_msats, b.open_reservations) == (0, 0)
    assert len(refusals) == 2 and all("280 characters" in m for m in refusals)


async def test_a_stock_relay_allowing_one_subscription_per_connection(tmp_path: Path) -> None:
    """nostr-relay with `subscription_limit: 1` (the stock 32, lowered so one paid job meets it): the
    jobs' subscription, the wallet info query and the wallet's answers need three; each REQ refused
    by a NOTICE moves to another connection, and the job is paid once."""
    net = await start_stock_net(tmp_path / "stock-relay", subscription_limit=1)
    fp = await FakeProvider(net, honest).start()
    lm = client(net)
    try:
        out = await lm.acall("What is 2+2?")
        conns = pools.pool((net.relay.url,)).conns[net.relay.url]
    finally:
        await stop_stock_net(net, fp)
    assert out.text == "ok" and out.usage.cost_msats == PRICE
    b: Budget = lm.options["swarm_budget"]
    assert net.paid() == PRICE == b.spent_msats and (b.reserved_msats, b.open_reservations) == (0, 0)
    assert len(conns) >= 2 and any("too many subscriptions" in n for c in conns for n in c.notices)
