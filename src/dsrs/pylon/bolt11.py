"""BOLT11 invoices: decode and check (checksum, amount, tags, signature, payee key recovery).

Validated on the BOLT11 specification's own examples (tests/vectors/bolt11.json). An invoice is
a bearer secret of sorts (it identifies a payment): never log it; `Invoice` keeps it out of reprs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from decimal import Decimal

import coincurve

from ..errors import DsrsError
from ..nostr import bech32

NETWORKS = ("bcrt", "bc", "tbs", "tb", "sb")  # longest first: "lnbcrt" is not "lnbc" + "rt"
_MULT = {"m": Decimal("1e8"), "u": Decimal("1e5"), "n": Decimal("1e2"), "p": Decimal("0.1")}  # msats per unit
_BTC_MSATS = 10**11
# Longest invoice decoded: the most characters a QR code holds. Nothing longer can be scanned or
# paid in practice, and bech32 work grows with the length of what a relay sends us.
MAX_INVOICE_CHARS = 7089
_MAX_AMOUNT_DIGITS = 20  # 21M BTC in pico-BTC is 2.1e19: 20 digits; more is never a real amount
_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
_KNOWN_EVEN_FEATURES = {8, 14, 16, 24, 48}  # var_onion, payment_secret, basic_mpp, route blinding, metadata


class InvoiceError(DsrsError, ValueError):
    """Not a valid BOLT11 invoice (or not one we may pay)."""

    fallback = False


@dataclass(frozen=True, slots=True)
class Invoice:
    network: str
    amount_msats: int | None
    timestamp: int
    payment_hash: str
    payee: str  # 33-byte compressed node key, hex
    expiry: int = 3600
    description: str | None = None
    description_hash: str | None = None
    payment_secret: str | None = field(default=None, repr=False)
    min_final_cltv_expiry: int = 18
    features: int = 0
    text: str = field(default="", repr=False)

    @property
    def expires_at(self) -> int:
        return self.timestamp + self.expiry

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


def _amount(s: str) -> int | None:
    if not s:
        return None
    mult = s[-1] if s[-1] in _MULT else ""
    digits = s[:-1] if mult else s
    if len(digits) > _MAX_AMOUNT_DIGITS:
        raise InvoiceError(f"invoice amount has {len(digits)} digits (at most {_MAX_AMOUNT_DIGITS})")
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == "0"):
        raise InvoiceError(f"invalid invoice amount {s!r}")
    if not mult:
        return int(digits) * _BTC_MSATS
    v = int(digits) * _MULT[mult]
    if v != v.to_integral_value():
        raise InvoiceError("invoice amount has sub-millisatoshi precision")
    return int(v)


def _int(words: list[int]) -> int:
    n = 0
    for w in words:
        n = n << 5 | w
    return n


def decode(text: str) -> Invoice:
    """Parse and verify a BOLT11 invoice; raises InvoiceError saying what is wrong."""
    if not isinstance(text, str):
        raise InvoiceError("an invoice must be a string")
    s = text.strip()
    if s.lower().startswith("lightning:"):
        s = s[10:]
    if len(s) > MAX_INVOICE_CHARS:
        raise InvoiceError(f"invoice is {len(s)} characters long (at most {MAX_INVOICE_CHARS})")
    try:
        hrp, words = bech32.decode(s, max_len=None)
    except bech32.Bech32Error as e:
        raise InvoiceError(f"invoice is not valid bech32 ({e})") from None
    if not hrp.startswith("ln"):
        raise InvoiceError("invoice prefix is not 'ln'")
    net = next((n for n in NETWORKS if hrp[2:].startswith(n)), None)
    if net is None:
        raise InvoiceError(f"unknown invoice network in {hrp!r}")
    amount = _amount(hrp[2 + len(net) :])
    if len(words) < 7 + 104:
        raise InvoiceError("invoice too short")
    data, sig_words = words[:-104], words[-104:]
    ts = _int(data[:7])
    tags: dict[str, object] = {}
    i = 7
    while i < len(data):
        if i + 3 > len(data):
            raise InvoiceError("truncated tagged field")
        t, n = data[i], data[i + 1] * 32 + data[i + 2]
        body = data[i + 3 : i + 3 + n]
        if len(body) != n:
            raise InvoiceError("truncated tagged field")
        i += 3 + n
        name = bech32.CHARSET[t]
        if name in tags:
            continue  # first one wins
        if name in ("p", "s", "h"):
            if n == 52:
                tags[name] = _bytes(body, 32).hex()
        elif name == "n":
            if n == 53:
                tags[name] = _bytes(body, 33).hex()
        elif name == "d":
            try:
                tags[name] = _bytes(body, n * 5 // 8).decode()
            except UnicodeDecodeError:
                raise InvoiceError("invoice description is not UTF-8") from None
        elif name in ("x", "c"):
            tags[name] = _int(body)
        elif name == "9":
            tags[name] = _int(body)
    if "p" not in tags:
        raise InvoiceError("invoice has no payment hash")
    if "s" not in tags:
        raise InvoiceError("invoice has no payment secret")
    features = int(tags.get("9", 0))  # type: ignore[call-overload]
    for bit in range(0, features.bit_length(), 2):
        if features >> bit & 1 and bit not in _KNOWN_EVEN_FEATURES:
            raise InvoiceError(f"invoice requires unknown feature {bit}")
    sig = _bytes(sig_words, 65)
    signed = hrp.encode() + bytes(bech32.convertbits(data, 5, 8, True))
    msg = hashlib.sha256(signed).digest()
    if sig[64] > 3:
        raise InvoiceError("invalid invoice signature recovery flag")
    high_s = int.from_bytes(sig[32:64], "big") > _HALF_N
    if high_s:  # the spec's example: recover with s normalised to low-S, same recovery flag
        s_low = (2 * _HALF_N + 1 - int.from_bytes(sig[32:64], "big")).to_bytes(32, "big")
        sig = sig[:32] + s_low + sig[64:]
    try:
        recovered = coincurve.PublicKey.from_signature_and_message(sig, msg, hasher=None).format().hex()
    except Exception:
        raise InvoiceError("invoice signature is not recoverable") from None
    payee = str(tags.get("n") or recovered)
    if "n" in tags:
        if high_s:
            raise InvoiceError("invoice signature is not canonical (high S)")
        if recovered != payee:
            raise InvoiceError("invoice signature does not match its payee key")
    return Invoice(net, amount, ts, str(tags["p"]), payee, int(tags.get("x", 3600)),  # type: ignore[call-overload]
                   tags.get("d"), tags.get("h"), tags.get("s"), int(tags.get("c", 18)), features,  # type: ignore[arg-type,call-overload]
                   s)  # fmt: skip


def _bytes(words: list[int], n: int) -> bytes:
    return bytes(bech32.convertbits(words, 5, 8, True))[:n]


def encode(keys_secret: bytes, *, network: str = "bc", amount_msats: int | None, payment_hash: bytes,
           payment_secret: bytes, description: str = "", expiry: int | None = None,
           timestamp: int | None = None) -> str:  # fmt: skip
    """Write and sign an invoice (a node key's secret). Used by test wallets and our own tools."""
    hrp = "ln" + network + (_amount_str(amount_msats) if amount_msats is not None else "")
    ts = int(time.time()) if timestamp is None else timestamp
    data = [(ts >> 5 * (6 - k)) & 31 for k in range(7)]

    def tag(name: str, words: list[int]) -> None:
        data.extend([bech32.CHARSET.index(name), len(words) // 32, len(words) % 32, *words])

    tag("p", bech32.convertbits(payment_hash, 8, 5))
    tag("s", bech32.convertbits(payment_secret, 8, 5))
    tag("d", bech32.convertbits(description.encode(), 8, 5))
    if expiry is not None:
        tag("x", _int_words(expiry))
    tag("9", _int_words(1 << 14 | 1 << 8))  # payment_secret and var_onion_optin required
    msg = hashlib.sha256(hrp.encode() + bytes(bech32.convertbits(data, 5, 8, True))).digest()
    sig = coincurve.PrivateKey(keys_secret).sign_recoverable(msg, hasher=None)
    return bech32.encode(hrp, data + bech32.convertbits(sig, 8, 5))


def _int_words(v: int) -> list[int]:
    out = []
    while True:
        out.append(v & 31)
        v >>= 5
        if not v:
            return out[::-1]


def _amount_str(msats: int) -> str:
    if msats <= 0:
        raise InvoiceError("invoice amount must be positive")
    for mult, per in (("m", 10**8), ("u", 10**5), ("n", 10**2)):
        if msats % per == 0:
            return f"{msats // per}{mult}"
    return f"{msats * 10}p"
