"""NIP-44 v2 encrypted payloads (ECDH x, HKDF, padding, ChaCha20, HMAC-SHA256, base64)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .keys import Keys

VERSION = 2
MIN_PLAINTEXT, MAX_PLAINTEXT = 1, 65535


class DecryptError(ValueError):
    pass


def conversation_key(keys: Keys, pubkey_hex: str) -> bytes:
    """HKDF-extract(salt="nip44-v2", ikm=unhashed ECDH x). Symmetric in the two parties."""
    return hmac.new(b"nip44-v2", keys.shared_x(pubkey_hex), hashlib.sha256).digest()


def message_keys(conv_key: bytes, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    if len(conv_key) != 32 or len(nonce) != 32:
        raise ValueError("conversation key and nonce must be 32 bytes")
    k = HKDFExpand(hashes.SHA256(), 76, nonce).derive(conv_key)
    return k[:32], k[32:44], k[44:]


def padded_len(n: int) -> int:
    if n <= 32:
        return 32
    next_power = 1 << (n - 1).bit_length()
    chunk = 32 if next_power <= 256 else next_power // 8
    return chunk * ((n - 1) // chunk + 1)


def _chacha(key: bytes, nonce12: bytes, data: bytes) -> bytes:
    c = Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce12), mode=None).encryptor()
    return c.update(data) + c.finalize()


def encrypt(plaintext: str, conv_key: bytes, nonce: bytes | None = None) -> str:
    raw = plaintext.encode()
    if not MIN_PLAINTEXT <= len(raw) <= MAX_PLAINTEXT:
        raise ValueError(f"NIP-44 plaintext must be 1..65535 bytes, got {len(raw)}")
    nonce = nonce or secrets.token_bytes(32)
    ck, cn, hk = message_keys(conv_key, nonce)
    padded = len(raw).to_bytes(2, "big") + raw + b"\x00" * (padded_len(len(raw)) - len(raw))
    ct = _chacha(ck, cn, padded)
    mac = hmac.new(hk, nonce + ct, hashlib.sha256).digest()
    return base64.b64encode(bytes([VERSION]) + nonce + ct + mac).decode()


def decrypt(payload: str, conv_key: bytes) -> str:
    if not payload or payload[0] == "#":
        raise DecryptError("unknown NIP-44 encryption version")
    if not 132 <= len(payload) <= 87472:
        raise DecryptError(f"invalid NIP-44 payload length {len(payload)}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DecryptError("invalid base64 in NIP-44 payload") from None
    if not 99 <= len(data) <= 65603:
        raise DecryptError(f"invalid NIP-44 data length {len(data)}")
    if data[0] != VERSION:
        raise DecryptError(f"unknown NIP-44 encryption version {data[0]}")
    nonce, ct, mac = data[1:33], data[33:-32], data[-32:]
    ck, cn, hk = message_keys(conv_key, nonce)
    if not hmac.compare_digest(mac, hmac.new(hk, nonce + ct, hashlib.sha256).digest()):
        raise DecryptError("invalid MAC")
    padded = _chacha(ck, cn, ct)
    n = int.from_bytes(padded[:2], "big")
    if not MIN_PLAINTEXT <= n <= MAX_PLAINTEXT or len(padded) != 2 + padded_len(n):
        raise DecryptError("invalid padding")
    try:
        return padded[2 : 2 + n].decode()
    except UnicodeDecodeError:
        raise DecryptError("plaintext is not UTF-8") from None
