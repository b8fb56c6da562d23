"""The BOLT11 decoder on the BOLT11 specification's own examples, plus our encoder round trip."""

from __future__ import annotations

import json
from pathlib import Path

import coincurve
import pytest

from dsrs.pylon import bolt11

SPEC = json.loads((Path(__file__).parent / "vectors" / "bolt11.json").read_text())
PAYEE = coincurve.PrivateKey(bytes.fromhex("e126f68f7eafcc8b74f54d269fe206be715000f94dac067d1c04a8ca3b2db734"))


@pytest.mark.parametrize("v", SPEC["valid"], ids=lambda v: v["title"][:40])
def test_spec_examples_decode(v: dict) -> None:
    inv = bolt11.decode(v["invoice"])
    assert inv.payee == PAYEE.public_key.format().hex() == "03e7156ae33b0a208d0744199163177e909e80176e55d97a2f221ede0f934dd9ad"
    for k in ("network", "amount_msats", "timestamp", "payment_hash", "expiry", "description", "description_hash"):
        assert getattr(inv, k) == v[k], k
    assert inv.payment_secret in (None, "11" * 32)
    assert v["invoice"] not in repr(inv)


def test_spec_figures_stated_in_the_breakdowns() -> None:
    by_title = {v["title"]: bolt11.decode(v["invoice"]) for v in SPEC["valid"]}
    coffee = by_title["Please send $3 for a cup of coffee to the same peer, within one minute"]
    assert (coffee.amount_msats, coffee.expiry, coffee.description) == (250_000_000, 60, "1 cup coffee")
    pico = next(i for t, i in by_title.items() if "pico-BTC" in t)
    assert pico.amount_msats == 967_878_534 and pico.timestamp == 1572468703
    assert pico.payment_hash == "462264ede7e14047e9b249da94fefc47f41f7d02ee9b091815a5506bc8abf75f"
    donation = next(i for t, i in by_title.items() if t.startswith("Please make a donation"))
    assert donation.amount_msats is None and donation.payment_hash == "0001020304050607080900010203040506070809000102030405060708090102"
    testnet = next(i for t, i in by_title.items() if "testnet" in t)
    assert testnet.network == "tb"


@pytest.mark.parametrize("v", SPEC["invalid"], ids=lambda v: v["title"][:40])
def test_spec_invalid_examples_are_refused(v: dict) -> None:
    with pytest.raises(bolt11.InvoiceError):
        bolt11.decode(v["invoice"])


def test_encode_round_trip_and_expiry() -> None:
    key = coincurve.PrivateKey()
    text = bolt11.encode(key.secret, amount_msats=21_000, payment_hash=b"\x07" * 32, payment_secret=b"\x01" * 32,
                         description="job", expiry=600, timestamp=1_700_000_000)  # fmt: skip
    inv = bolt11.decode(text)
    assert (inv.amount_msats, inv.payment_hash, inv.expiry, inv.payee) == (21_000, "07" * 32, 600, key.public_key.format().hex())
    assert inv.expired(1_700_000_600) and not inv.expired(1_700_000_599)
    assert bolt11.decode(bolt11.encode(key.secret, amount_msats=1, payment_hash=b"\0" * 32,
                                       payment_secret=b"\0" * 32)).amount_msats == 1  # fmt: skip
    flipped = text[:-8] + ("q" if text[-8] != "q" else "p") + text[-7:]
    with pytest.raises(bolt11.InvoiceError, match="checksum"):
        bolt11.decode(flipped)
    with pytest.raises(bolt11.InvoiceError):
        bolt11.decode(12345)  # type: ignore[arg-type]


def test_overlong_invoices_and_amounts_are_refused_typed() -> None:
    from dsrs.errors import DsrsError
    from dsrs.nostr import bech32

    # longer than any QR code holds: refused before any bech32 work, whatever the content
    with pytest.raises(bolt11.InvoiceError, match="characters long"):
        bolt11.decode("lnbc1" + "q" * 1_000_000)
    # a well-formed bech32 string whose amount has 4,400 digits: Python's int() refuses more than
    # 4,300 digits with a bare ValueError; the decoder says what is wrong instead
    huge = bech32.encode("lnbc" + "9" * 4400 + "p", [0] * 200)
    assert len(huge) <= bolt11.MAX_INVOICE_CHARS
    with pytest.raises(bolt11.InvoiceError, match="digits") as e:
        bolt11.decode(huge)
    assert isinstance(e.value, DsrsError)
    with pytest.raises(bolt11.InvoiceError, match="digits"):
        bolt11.decode(bech32.encode("lnbc" + "1" * 21 + "p", [0] * 200))
    # the longest real amount (21M BTC in pico-BTC, 20 digits) still parses as an amount
    twenty = bech32.encode("lnbc" + "21000000000000000000" + "p", [0] * 200)
    with pytest.raises(bolt11.InvoiceError, match="too short|tagged|payment hash|signature"):
        bolt11.decode(twenty)  # gets past the amount; these words are no invoice
