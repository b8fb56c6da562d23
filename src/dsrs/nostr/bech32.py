"""Bech32 (BIP-173): the text form of nsec/npub keys and of BOLT11 invoices."""

from __future__ import annotations

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_REV = {c: i for i, c in enumerate(CHARSET)}
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


class Bech32Error(ValueError):
    pass


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= _GEN[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def decode(text: str, max_len: int | None = 90) -> tuple[str, list[int]]:
    """(hrp, 5-bit words without the checksum). Raises Bech32Error on any defect."""
    if text.lower() != text and text.upper() != text:
        raise Bech32Error("mixed case")
    s = text.lower()
    if max_len is not None and len(s) > max_len:
        raise Bech32Error("too long")
    pos = s.rfind("1")
    if pos < 1 or pos + 7 > len(s):
        raise Bech32Error("no separator '1' or checksum too short")
    hrp = s[:pos]
    if any(ord(c) < 33 or ord(c) > 126 for c in hrp):
        raise Bech32Error("bad character in prefix")
    try:
        data = [_REV[c] for c in s[pos + 1 :]]
    except KeyError:
        raise Bech32Error("bad character in data") from None
    if _polymod(_hrp_expand(hrp) + data) != 1:
        raise Bech32Error("bad checksum")
    return hrp, data[:-6]


def encode(hrp: str, words: list[int]) -> str:
    poly = _polymod(_hrp_expand(hrp) + words + [0] * 6) ^ 1
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[w] for w in words + checksum)


def convertbits(data: bytes | list[int], frm: int, to: int, pad: bool = True) -> list[int]:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << to) - 1
    for v in data:
        if v < 0 or v >> frm:
            raise Bech32Error("value out of range")
        acc = (acc << frm) | v
        bits += frm
        while bits >= to:
            bits -= to
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (to - bits)) & maxv)
    elif bits >= frm or ((acc << (to - bits)) & maxv):
        raise Bech32Error("invalid padding")
    return out


def to_bytes(words: list[int]) -> bytes:
    return bytes(convertbits(words, 5, 8, pad=False))


def encode_bytes(hrp: str, data: bytes) -> str:
    return encode(hrp, convertbits(data, 8, 5))


def decode_bytes(text: str, hrp: str) -> bytes:
    got, words = decode(text)
    if got != hrp:
        raise Bech32Error(f"expected a {hrp}1... string, got {got}1...")
    return to_bytes(words)
