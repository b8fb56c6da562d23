"""Nostr layer: NIP-44 official vectors, NIP-04, NIP-01 events, keys, and the relay client on our relay."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dsrs.errors import ConfigurationError
from dsrs.nostr import Event, Keys, Relay, RelayError, RelayPool, nip04, nip44, sign
from dsrs.nostr.event import verify_json
from dsrs.nostr.keys import pubkey_hex
from relay import TestRelay

V = json.loads((Path(__file__).parent / "vectors" / "nip44.vectors.json").read_text())["v2"]


# -- NIP-44 v2: the official vectors ------------------------------------------------------------
def test_nip44_vector_file_is_the_official_one() -> None:
    data = (Path(__file__).parent / "vectors" / "nip44.vectors.json").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "269ed0f69e4c192512cc779e78c555090cebc7c785b609e338a62afc3ce25040"


@pytest.mark.parametrize("c", V["valid"]["get_conversation_key"])
def test_nip44_conversation_key(c: dict) -> None:
    assert nip44.conversation_key(Keys(c["sec1"]), c["pub2"]).hex() == c["conversation_key"]


def test_nip44_message_keys() -> None:
    ck = bytes.fromhex(V["valid"]["get_message_keys"]["conversation_key"])
    for c in V["valid"]["get_message_keys"]["keys"]:
        k, n, h = nip44.message_keys(ck, bytes.fromhex(c["nonce"]))
        assert (k.hex(), n.hex(), h.hex()) == (c["chacha_key"], c["chacha_nonce"], c["hmac_key"])


def test_nip44_padded_len() -> None:
    for n, want in V["valid"]["calc_padded_len"]:
        assert nip44.padded_len(n) == want


@pytest.mark.parametrize("c", V["valid"]["encrypt_decrypt"])
def test_nip44_encrypt_decrypt(c: dict) -> None:
    ck = nip44.conversation_key(Keys(c["sec1"]), Keys(c["sec2"]).pubkey)
    assert ck.hex() == c["conversation_key"]
    assert nip44.conversation_key(Keys(c["sec2"]), Keys(c["sec1"]).pubkey) == ck
    assert nip44.encrypt(c["plaintext"], ck, bytes.fromhex(c["nonce"])) == c["payload"]
    assert nip44.decrypt(c["payload"], ck) == c["plaintext"]


@pytest.mark.parametrize("c", V["valid"]["encrypt_decrypt_long_msg"])
def test_nip44_long_messages(c: dict) -> None:
    ck = bytes.fromhex(c["conversation_key"])
    text = c["pattern"] * c["repeat"]
    assert hashlib.sha256(text.encode()).hexdigest() == c["plaintext_sha256"]
    payload = nip44.encrypt(text, ck, bytes.fromhex(c["nonce"]))
    assert hashlib.sha256(payload.encode()).hexdigest() == c["payload_sha256"]
    assert nip44.decrypt(payload, ck) == text


@pytest.mark.parametrize("c", V["invalid"]["decrypt"], ids=lambda c: c["note"])
def test_nip44_invalid_payloads_are_refused(c: dict) -> None:
    with pytest.raises(nip44.DecryptError):
        nip44.decrypt(c["payload"], bytes.fromhex(c["conversation_key"]))


@pytest.mark.parametrize("c", V["invalid"]["get_conversation_key"], ids=lambda c: c["note"])
def test_nip44_invalid_keys_are_refused(c: dict) -> None:
    with pytest.raises(ValueError):
        nip44.conversation_key(Keys(c["sec1"]), c["pub2"])


@pytest.mark.parametrize("n", V["invalid"]["encrypt_msg_lengths"])
def test_nip44_invalid_lengths(n: int) -> None:
    with pytest.raises(ValueError):
        nip44.encrypt("x" * n, b"\x01" * 32)


# -- NIP-04 -------------------------------------------------------------------------------------
def test_nip04_round_trip_and_tamper() -> None:
    a, b = Keys.generate(), Keys.generate()
    payload = nip04.encrypt('{"method":"pay_invoice"}', a, b.pubkey)
    assert "?iv=" in payload
    assert nip04.decrypt(payload, b, a.pubkey) == '{"method":"pay_invoice"}'
    with pytest.raises(nip44.DecryptError):
        nip04.decrypt(payload, Keys.generate(), a.pubkey)


# -- keys ---------------------------------------------------------------------------------------
def test_nip19_and_nip06_vectors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # NIP-19 examples
    assert pubkey_hex("npub10elfcs4fr0l0r8af98jlmgdh9c8tcxjvz9qkw038js35mp4dma8qzvjptg") == (
        "7e7e9c42a91bfef19fa929e5fda1b72e0ebc1a4c1141673e2794234d86addf4e")
    k = Keys("nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5")
    assert k.secret.hex() == "67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa"
    assert Keys(k.nsec).pubkey == k.pubkey and pubkey_hex(k.npub) == k.pubkey
    # NIP-06 example
    m = "leader monkey parrot ring guide accident before fence cannon height naive bean"
    k6 = Keys.from_mnemonic(m)
    assert k6.secret.hex() == "7f7ff03d123792d6ac594bfa67bf6d0c0ab55b6b1fdb6249303fe861f1ccba9a"
    assert k6.pubkey == "17162c921dc4d2518f9a101db33695df1afb56ab82f5ff3e5da6eec3ca5cd917"
    # where an identity comes from
    for v in ("PYLON_NSEC", "PYLON_KEY_FILE", "PYLON_MNEMONIC"):
        monkeypatch.delenv(v, raising=False)
    assert Keys.from_env() is None
    with pytest.raises(ConfigurationError):
        Keys.from_env(required=True)
    monkeypatch.setenv("PYLON_MNEMONIC", m)
    assert Keys.from_env().pubkey == k6.pubkey  # type: ignore[union-attr]
    f = tmp_path / "key"
    f.write_text(k.nsec + "\n")
    monkeypatch.setenv("PYLON_KEY_FILE", str(f))
    assert Keys.from_env().pubkey == k.pubkey  # type: ignore[union-attr]
    monkeypatch.setenv("PYLON_NSEC", k6.secret.hex())
    assert Keys.from_env().pubkey == k6.pubkey  # type: ignore[union-attr]
    assert k.secret.hex() not in repr(k) and k.nsec not in repr(k)
    with pytest.raises(ConfigurationError):
        Keys("nsec1notakey")
    with pytest.raises(ConfigurationError):
        Keys("00" * 32)


# -- events -------------------------------------------------------------------------------------
def test_event_id_signature_and_tampering() -> None:
    k = Keys.generate()
    ev = sign(k, 1, "héllo \"world\"\n", [["t", "x"]], created_at=1700000000)
    assert ev.verify()
    ser = json.dumps([0, k.pubkey, 1700000000, 1, [["t", "x"]], "héllo \"world\"\n"], separators=(",", ":"),
                     ensure_ascii=False)  # fmt: skip
    assert ev.id == hashlib.sha256(ser.encode()).hexdigest()
    d = ev.to_json()
    assert verify_json(d) == ev
    assert verify_json({**d, "content": "other"}) is None  # id no longer matches
    other = sign(Keys.generate(), 1, d["content"], d["tags"], created_at=d["created_at"])
    assert verify_json({**d, "sig": other.sig}) is None  # someone else's signature
    assert verify_json({**d, "kind": "1"}) is None
    assert verify_json({k2: v for k2, v in d.items() if k2 != "sig"}) is None


def test_cross_check_with_nostr_sdk() -> None:
    """An independent implementation (rust-nostr) verifies our events and NIP-44; we verify and decrypt its."""
    import nostr_sdk as n

    ours = Keys.generate()
    ev = sign(ours, 5050, "prompt ✓", [["i", "What is 2+2?", "text"], ["bid", "5000"]])
    theirs_view = n.Event.from_json(json.dumps(ev.to_json()))
    assert theirs_view.verify() and theirs_view.id().to_hex() == ev.id
    tk = n.Keys.generate()
    their_ev = n.EventBuilder(n.Kind(7000), "ça va").tags([n.Tag.parse(["e", ev.id])]).finalize(tk)
    assert verify_json(json.loads(their_ev.as_json())) is not None
    tamper = json.loads(their_ev.as_json())
    tamper["content"] = "x"
    assert verify_json(tamper) is None
    # NIP-44 both ways, NIP-04 both ways
    tpub = tk.public_key().to_hex()
    ck = nip44.conversation_key(ours, tpub)
    mine = nip44.encrypt('{"method":"pay_invoice"}', ck)
    assert n.nip44_decrypt(tk.secret_key(), n.PublicKey.parse(ours.pubkey), mine) == '{"method":"pay_invoice"}'
    theirs = n.nip44_encrypt(tk.secret_key(), n.PublicKey.parse(ours.pubkey), "préimage", n.Nip44Version.V2)
    assert nip44.decrypt(theirs, ck) == "préimage"
    assert n.nip04_decrypt(tk.secret_key(), n.PublicKey.parse(ours.pubkey), nip04.encrypt("a", ours, tpub)) == "a"
    assert nip04.decrypt(n.nip04_encrypt(tk.secret_key(), n.PublicKey.parse(ours.pubkey), "b"), ours, tpub) == "b"


# -- the relay client ---------------------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="function")
async def relay():
    r = TestRelay()
    await r.start()
    yield r
    await r.stop()


async def test_publish_subscribe_and_forged_events_dropped(relay: TestRelay) -> None:
    k = Keys.generate()
    client = Relay(relay.url)
    try:
        sub = await client.subscribe([{"kinds": [1], "authors": [k.pubkey]}])
        ev = sign(k, 1, "hello")
        await client.publish(ev)
        assert (await sub.next(5)) == ev
        forged = {**sign(k, 1, "forged").to_json(), "content": "changed"}
        await relay.inject(forged)
        await relay.inject(ev.to_json())  # a replay: deduped
        good = sign(k, 1, "after")
        await client.publish(good)
        assert (await sub.next(5)) == good
        assert client.dropped == 1
        with pytest.raises(RelayError, match="refused"):
            await client.publish(Event(**{**sign(k, 1, "x").to_json(), "content": "y"}))
        await sub.close()
        await client.publish(sign(k, 1, "after close"))  # the relay handles messages in order
        assert [m[0] for m in relay.received[-2:]] == ["CLOSE", "EVENT"]
        assert sub.queue.empty()
    finally:
        await client.close()


async def test_nip42_auth_then_publish_and_subscribe() -> None:
    r = TestRelay(require_auth=True)
    await r.start()
    k = Keys.generate()
    client = Relay(r.url, k)
    try:
        ev = sign(k, 1, "needs auth")
        await client.publish(ev)
        sub = await client.subscribe([{"ids": [ev.id]}])
        assert (await sub.next(5)).id == ev.id
        auth = [m for m in r.received if m[0] == "AUTH"]
        assert auth and auth[0][1]["kind"] == 22242 and auth[0][1]["pubkey"] == k.pubkey
        assert ["relay", r.url] in auth[0][1]["tags"]
    finally:
        await client.close()
        await r.stop()


async def test_reconnect_resubscribes(relay: TestRelay) -> None:
    k = Keys.generate()
    pool = RelayPool([relay.url])
    try:
        sub = await pool.subscribe([{"kinds": [1]}])
        await relay.drop_clients()
        ev = sign(k, 1, "after the drop")
        await pool.publish(ev)  # waits for the reconnect
        assert (await sub.next(5)).id == ev.id
        assert sum(1 for m in relay.received if m[0] == "REQ") >= 2
    finally:
        await pool.close()


async def test_pool_of_two_relays_dedupes_and_survives_a_dead_one(relay: TestRelay) -> None:
    second = TestRelay()
    await second.start()
    pool = RelayPool([relay.url, second.url])
    try:
        sub = await pool.subscribe([{"kinds": [1]}])
        ev = sign(Keys.generate(), 1, "both")
        await pool.publish(ev)
        assert (await sub.next(5)).id == ev.id
        await asyncio.sleep(0)
        assert sub.queue.empty()  # the copy from the other relay was deduped
        assert len(relay.published(1)) == 1 and len(second.published(1)) == 1
    finally:
        await pool.close()
        await second.stop()
    with pytest.raises(RelayError):
        await RelayPool(["ws://127.0.0.1:9"]).publish(sign(Keys.generate(), 1, "nobody there"))


# -- refusals and limits (NIP-01 CLOSED / NOTICE, NIP-11 limitation) ------------------------------
@pytest.mark.parametrize("notice", [False, True], ids=["closed", "notice"])
async def test_a_refused_subscription_is_a_typed_error_and_the_pool_opens_another_connection(notice: bool) -> None:
    from dsrs.nostr import SubscriptionRefused

    r = TestRelay()
    r.max_subs, r.notice_refusals = 2, notice
    await r.start()
    k = Keys.generate()
    one = Relay(r.url)
    pool = RelayPool([r.url])
    try:
        await one.subscribe([{"kinds": [1]}])
        await one.subscribe([{"kinds": [2]}])
        with pytest.raises(SubscriptionRefused) as refused:  # never waited out: the relay's answer is the refusal
            await one.subscribe([{"kinds": [3]}], timeout=30)
        assert refused.value.code == ("notice" if notice else "error") and refused.value.full
        assert one.full() and one.max_subs == 2
        subs = [await pool.subscribe([{"kinds": [1], "authors": [k.pubkey]}], timeout=30) for _ in range(5)]
        assert len(pool.conns[r.url]) == 3 and sorted(r.subscriptions()) == [1, 2, 2, 2]  # 2 + 2 + 1 (+ `one`)
        ev = sign(k, 1, "to every subscription")
        await pool.publish(ev)
        for s in subs:
            assert (await s.next(5)).id == ev.id
        # refused on a connection that holds nothing: the relay means it, no other connection is tried
        r.max_subs = 0
        lone = RelayPool([r.url])
        with pytest.raises(SubscriptionRefused) as flat:
            await lone.subscribe([{"kinds": [1]}], timeout=30)
        assert not flat.value.full and len(lone.conns[r.url]) == 1
        await lone.close()
    finally:
        await one.close()
        await pool.close()
        await r.stop()


async def test_a_subscription_the_relay_closes_later_raises_in_its_reader(relay: TestRelay) -> None:
    from dsrs.nostr import SubscriptionRefused

    client = Relay(relay.url)
    try:
        sub = await client.subscribe([{"kinds": [1]}])
        reader = asyncio.ensure_future(sub.next(30))
        await asyncio.sleep(0.05)
        assert await relay.close_subs({1}, "rate-limited: slow down") == 1
        with pytest.raises(SubscriptionRefused) as closed:
            await reader
        assert closed.value.code == "rate-limited"
        with pytest.raises(SubscriptionRefused):  # and again: the error stays
            await sub.next(1)
    finally:
        await client.close()


async def test_nip11_limits_are_read_once_and_respected_before_sending() -> None:
    from dsrs.nostr import EventTooLargeError, nip11

    r = TestRelay()
    r.limitation = {"max_subscriptions": 2, "max_content_length": 10, "max_message_length": 2000, "max_filters": 2}
    await r.start()
    nip11._cache.pop(r.url, None)
    pool = RelayPool([r.url])
    k = Keys.generate()
    try:
        subs = [await pool.subscribe([{"kinds": [1]}]) for _ in range(5)]
        assert len(pool.conns[r.url]) == 3 and sorted(r.subscriptions()) == [1, 2, 2]  # no REQ over the limit sent
        assert r.info_gets == 1  # once per relay URL, whatever the connections
        n = len(r.received)
        with pytest.raises(EventTooLargeError, match="content has 11 characters") as big:
            await pool.publish(sign(k, 1, "x" * 11))
        assert big.value.event_sent is False
        with pytest.raises(EventTooLargeError, match="bytes"):
            await pool.publish(sign(k, 1, "ok", [["t", "y" * 2000]]))
        with pytest.raises(RelayError, match="3 filters"):
            await pool.subscribe([{"kinds": [1]}, {"kinds": [2]}, {"kinds": [3]}])
        assert len(r.received) == n  # nothing was sent
        await pool.publish(sign(k, 1, "x" * 10))
        assert [(await s.next(5)).content for s in subs] == ["x" * 10] * 5
    finally:
        await pool.close()
        await r.stop()


async def test_an_ok_without_the_event_id_is_read_as_that_events_refusal(relay: TestRelay) -> None:
    """PyPI nostr-relay answers a refused event with ["OK", "", false, reason]: with one event awaiting
    its OK, the refusal is that event's (and it was not taken)."""
    relay.max_content = 5
    relay_send = relay._message

    async def blank_ids(ws: Any, st: Any, msg: list[Any]) -> None:
        if msg and msg[0] == "EVENT" and len(str(msg[1].get("content", ""))) > 5:
            await ws.send(json.dumps(["OK", "", False, "invalid: too long"]))
            return
        await relay_send(ws, st, msg)

    relay._message = blank_ids  # type: ignore[method-assign]
    client = Relay(relay.url)
    try:
        with pytest.raises(RelayError, match="too long") as refused:
            await client.publish(sign(Keys.generate(), 1, "much too long"), timeout=30)
        assert refused.value.event_sent is False
    finally:
        await client.close()


async def test_a_subscription_refused_when_resent_after_a_reconnect_fails_its_reader(relay: TestRelay) -> None:
    from dsrs.nostr import SubscriptionRefused

    client = Relay(relay.url)
    try:
        sub = await client.subscribe([{"kinds": [1]}])
        relay.max_subs, relay.notice_refusals = 0, True
        await relay.drop_clients()  # the client reconnects and sends the REQ again: a NOTICE answers it
        with pytest.raises(SubscriptionRefused) as refused:
            await sub.next(30)
        assert refused.value.code == "notice"
    finally:
        await client.close()


async def test_a_relay_whose_nip11_document_never_comes_is_used_without_limits() -> None:
    from dsrs.nostr import nip11

    r = TestRelay()
    r.info_delay, r.limitation = 3600.0, {"max_content_length": 1}
    await r.start()
    nip11._cache.pop(r.url, None)
    client = Relay(r.url, open_timeout=1.0)  # the document is waited for min(open_timeout, 3 s)
    try:
        await client.publish(sign(Keys.generate(), 1, "longer than one character"), timeout=30)
        assert r.info_gets == 1 and client.limits == nip11.Limits()
    finally:
        await client.close()
        await r.stop()
