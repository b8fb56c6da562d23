"""NIP-04 (deprecated, still spoken by many wallets): AES-256-CBC keyed by the unhashed ECDH x."""

from __future__ import annotations

import base64
import binascii
import secrets

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .keys import Keys
from .nip44 import DecryptError


def encrypt(plaintext: str, keys: Keys, pubkey_hex: str) -> str:
    iv = secrets.token_bytes(16)
    p = padding.PKCS7(128).padder()
    data = p.update(plaintext.encode()) + p.finalize()
    enc = Cipher(algorithms.AES(keys.shared_x(pubkey_hex)), modes.CBC(iv)).encryptor()
    ct = enc.update(data) + enc.finalize()
    return base64.b64encode(ct).decode() + "?iv=" + base64.b64encode(iv).decode()


def decrypt(payload: str, keys: Keys, pubkey_hex: str) -> str:
    try:
        ct_b64, iv_b64 = payload.split("?iv=")
        ct, iv = base64.b64decode(ct_b64, validate=True), base64.b64decode(iv_b64, validate=True)
        dec = Cipher(algorithms.AES(keys.shared_x(pubkey_hex)), modes.CBC(iv)).decryptor()
        data = dec.update(ct) + dec.finalize()
        u = padding.PKCS7(128).unpadder()
        return (u.update(data) + u.finalize()).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise DecryptError("not a valid NIP-04 payload") from None
