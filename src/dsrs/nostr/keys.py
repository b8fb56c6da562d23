"""Keys: secp256k1 secret + x-only public key (hex), nsec/npub, env/key file/NIP-06 mnemonic.

The secret never shows in a repr. `Keys.from_env()` reads `PYLON_NSEC` (nsec or hex), else
`PYLON_KEY_FILE`, else `PYLON_MNEMONIC` (NIP-06 path m/44'/1237'/<account>'/0/0).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import unicodedata
from pathlib import Path

import coincurve

from ..errors import ConfigurationError
from . import bech32

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class Keys:
    """A Nostr identity. `pubkey` is the 32-byte x-only key in hex, as events carry it."""

    __slots__ = ("_sk", "pubkey")

    def __init__(self, secret: bytes | str) -> None:
        if isinstance(secret, str):
            secret = _parse_secret(secret)
        if len(secret) != 32 or not 0 < int.from_bytes(secret, "big") < N:
            raise ConfigurationError("a Nostr secret key must be 32 bytes in 1..n-1", hint="pass an nsec1... or 64 hex chars")
        self._sk = coincurve.PrivateKey(secret)
        self.pubkey = self._sk.public_key_xonly.format().hex()

    @staticmethod
    def generate() -> Keys:
        while True:
            b = secrets.token_bytes(32)
            if 0 < int.from_bytes(b, "big") < N:
                return Keys(b)

    @staticmethod
    def from_mnemonic(words: str, passphrase: str = "", account: int = 0) -> Keys:
        """NIP-06: BIP-39 seed, BIP-32 path m/44'/1237'/<account>'/0/0."""
        norm = unicodedata.normalize("NFKD", " ".join(words.split()))
        salt = unicodedata.normalize("NFKD", "mnemonic" + passphrase)
        seed = hashlib.pbkdf2_hmac("sha512", norm.encode(), salt.encode(), 2048)
        i = hmac.new(b"Bitcoin seed", seed, hashlib.sha512).digest()
        k, chain = int.from_bytes(i[:32], "big"), i[32:]
        h = 0x80000000
        for index in (44 + h, 1237 + h, account + h, 0, 0):
            if index >= h:
                data = b"\x00" + k.to_bytes(32, "big")
            else:
                data = coincurve.PrivateKey(k.to_bytes(32, "big")).public_key.format()
            i = hmac.new(chain, data + index.to_bytes(4, "big"), hashlib.sha512).digest()
            k, chain = (int.from_bytes(i[:32], "big") + k) % N, i[32:]
        return Keys(k.to_bytes(32, "big"))

    @staticmethod
    def from_env(required: bool = False) -> Keys | None:
        """The configured identity (PYLON_NSEC, PYLON_KEY_FILE, PYLON_MNEMONIC), else None."""
        if v := os.environ.get("PYLON_NSEC"):
            return Keys(v.strip())
        if p := os.environ.get("PYLON_KEY_FILE"):
            return Keys.from_file(p)
        if m := os.environ.get("PYLON_MNEMONIC"):
            return Keys.from_mnemonic(m, os.environ.get("PYLON_MNEMONIC_PASSPHRASE", ""))
        if required:
            raise ConfigurationError("no Nostr identity", hint="set PYLON_NSEC, PYLON_KEY_FILE or PYLON_MNEMONIC")
        return None

    @staticmethod
    def from_file(path: str | os.PathLike[str]) -> Keys:
        try:
            text = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigurationError(f"cannot read the key file {path}: {e.strerror}") from None
        return Keys(text)

    @property
    def secret(self) -> bytes:
        return self._sk.secret

    @property
    def nsec(self) -> str:
        return bech32.encode_bytes("nsec", self._sk.secret)

    @property
    def npub(self) -> str:
        return npub(self.pubkey)

    def sign(self, msg32: bytes) -> bytes:
        return self._sk.sign_schnorr(msg32, secrets.token_bytes(32))

    def shared_x(self, pubkey_hex: str) -> bytes:
        """The unhashed x coordinate of ECDH with an x-only public key (NIP-04 and NIP-44)."""
        try:
            point = coincurve.PublicKey(b"\x02" + bytes.fromhex(pubkey_hex))
        except ValueError:
            raise ValueError(f"not a valid x-only public key: {pubkey_hex[:16]}...") from None
        return point.multiply(self._sk.secret).format()[1:33]

    def __repr__(self) -> str:
        return f"Keys(pubkey={self.pubkey!r})"


def npub(pubkey_hex: str) -> str:
    return bech32.encode_bytes("npub", bytes.fromhex(pubkey_hex))


def pubkey_hex(text: str) -> str:
    """An npub1... or 64-hex public key, as 64 hex chars."""
    t = text.strip()
    if t.startswith("npub1"):
        return bech32.decode_bytes(t, "npub").hex()
    if len(t) == 64 and all(c in "0123456789abcdefABCDEF" for c in t):
        return t.lower()
    raise ConfigurationError(f"not a Nostr public key: {t[:12]}...", hint="pass npub1... or 64 hex chars")


def _parse_secret(text: str) -> bytes:
    t = text.strip()
    try:
        if t.startswith("nsec1"):
            return bech32.decode_bytes(t, "nsec")
        return bytes.fromhex(t)
    except ValueError:
        raise ConfigurationError("not a Nostr secret key", hint="pass nsec1... or 64 hex chars") from None
