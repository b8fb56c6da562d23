"""NIP-01 events: canonical serialization, id, BIP-340 signature, and their verification."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import coincurve

from .keys import Keys


def event_id(pubkey: str, created_at: int, kind: int, tags: list[list[str]], content: str) -> str:
    data = json.dumps([0, pubkey, created_at, kind, tags, content], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: list[list[str]]
    content: str
    sig: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "pubkey": self.pubkey, "created_at": self.created_at, "kind": self.kind,
                "tags": self.tags, "content": self.content, "sig": self.sig}  # fmt: skip

    def tag(self, name: str) -> list[str] | None:
        """The first tag named `name` (the whole tag, name included), or None."""
        for t in self.tags:
            if t and t[0] == name:
                return t
        return None

    def tag_value(self, name: str) -> str | None:
        t = self.tag(name)
        return t[1] if t and len(t) > 1 else None

    def verify(self) -> bool:
        """True when the id is the hash of the content and the signature is the author's."""
        try:
            if event_id(self.pubkey, self.created_at, self.kind, self.tags, self.content) != self.id:
                return False
            key = coincurve.PublicKeyXOnly(bytes.fromhex(self.pubkey))
            return bool(key.verify(bytes.fromhex(self.sig), bytes.fromhex(self.id)))
        except (ValueError, TypeError):
            return False

    @staticmethod
    def from_json(d: Any) -> Event:
        """Shape-checked (not signature-checked) event; ValueError when malformed."""
        if not isinstance(d, dict):
            raise ValueError("an event must be a JSON object")
        try:
            ev = Event(d["id"], d["pubkey"], d["created_at"], d["kind"], d["tags"], d["content"], d["sig"])
        except KeyError as e:
            raise ValueError(f"event without {e.args[0]!r}") from None
        ok = (
            all(isinstance(x, str) for x in (ev.id, ev.pubkey, ev.content, ev.sig))
            and len(ev.id) == 64 and len(ev.pubkey) == 64 and len(ev.sig) == 128
            and type(ev.created_at) is int and type(ev.kind) is int
            and isinstance(ev.tags, list)
            and all(isinstance(t, list) and all(isinstance(x, str) for x in t) for t in ev.tags)
        )  # fmt: skip
        if not ok:
            raise ValueError("malformed event")
        return ev


def sign(keys: Keys, kind: int, content: str = "", tags: list[list[str]] | None = None,
         created_at: int | None = None) -> Event:  # fmt: skip
    tags = [list(t) for t in tags or []]
    ts = int(time.time()) if created_at is None else created_at
    eid = event_id(keys.pubkey, ts, kind, tags, content)
    return Event(eid, keys.pubkey, ts, kind, tags, content, keys.sign(bytes.fromhex(eid)).hex())


def verify_json(d: Any) -> Event | None:
    """The event if `d` is a well-formed, correctly signed event, else None."""
    try:
        ev = Event.from_json(d)
    except ValueError:
        return None
    return ev if ev.verify() else None
