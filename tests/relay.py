"""A small NIP-01 relay of our own for tests, on 127.0.0.1, with a hostile mode.

Honest mode checks ids and signatures, answers OK/EOSE/CLOSED, stores regular events, keeps
ephemeral ones (20000-29999) out of storage, applies kind-5 deletions and, with
`require_auth`, asks for NIP-42 auth first. `received` records every client message so tests
can assert what was (or was not) sent. Hostile helpers forward what real relays would drop:
`inject` sends any event to every subscription, ignoring filters and signatures. Hostile knobs
(sets of event kinds): `drop_ok` takes and forwards such events but never sends their OK,
`refuse` answers OK false and forwards nothing, `silent_req` never answers a REQ asking for
them (no stored events, no EOSE).

Limits, as stock relays have them: `max_subs` subscriptions per connection, the next REQ refused
with `CLOSED "error: too many subscriptions"`, or with a bare NOTICE when `notice_refusals` (as
PyPI's nostr-relay does); `max_content` characters of content per event (OK false).
`limitation` is published as the NIP-11 document's `limitation` (GET with `Accept:
application/nostr+json` on the relay's URL); `info_gets` counts those requests, `info_delay`
holds their answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from dsrs.nostr.event import verify_json


def matches(f: dict[str, Any], ev: dict[str, Any]) -> bool:
    if "ids" in f and ev["id"] not in f["ids"]:
        return False
    if "authors" in f and ev["pubkey"] not in f["authors"]:
        return False
    if "kinds" in f and ev["kind"] not in f["kinds"]:
        return False
    if "since" in f and ev["created_at"] < f["since"]:
        return False
    if "until" in f and ev["created_at"] > f["until"]:
        return False
    for k, want in f.items():
        if k.startswith("#") and len(k) == 2:
            have = {t[1] for t in ev["tags"] if len(t) > 1 and t[0] == k[1]}
            if not have & set(want):
                return False
    return True


class TestRelay:
    __test__ = False

    def __init__(self, *, require_auth: bool = False, verify: bool = True) -> None:
        self.require_auth = require_auth
        self.verify = verify
        self.events: list[dict[str, Any]] = []
        self.received: list[list[Any]] = []
        self.clients: dict[ServerConnection, dict[str, Any]] = {}
        self.url = ""
        self._server: Any = None
        self.on_event: list[Any] = []  # callbacks(ev) for every accepted event
        self.drop_ok: set[int] = set()
        self.refuse: set[int] = set()
        self.silent_req: set[int] = set()
        self.max_subs: int | None = None
        self.notice_refusals = False
        self.max_content: int | None = None
        self.limitation: dict[str, Any] | None = None
        self.info_gets = 0
        self.info_delay = 0.0

    async def start(self) -> str:
        self._server = await serve(self._handler, "127.0.0.1", 0, max_size=8 * 1024 * 1024, compression=None,
                                   process_request=self._http)  # fmt: skip
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def published(self, kind: int | None = None) -> list[dict[str, Any]]:
        return [m[1] for m in self.received if m and m[0] == "EVENT" and (kind is None or m[1].get("kind") == kind)]

    async def _http(self, conn: ServerConnection, req: Request) -> Response | None:
        """NIP-11: a GET asking for application/nostr+json gets the relay information document
        (after `info_delay` seconds: a relay whose HTTP side hangs)."""
        if "application/nostr+json" not in req.headers.get("Accept", ""):
            return None
        self.info_gets += 1
        await asyncio.sleep(self.info_delay)
        doc: dict[str, Any] = {"name": "dsrs test relay", "supported_nips": [1, 11, 42]}
        if self.limitation is not None:
            doc["limitation"] = self.limitation
        body = json.dumps(doc).encode()
        headers = Headers([("Content-Type", "application/nostr+json"), ("Content-Length", str(len(body)))])
        return Response(200, "OK", headers, body)

    def subscriptions(self) -> list[int]:
        """Open subscriptions per connected client."""
        return [len(st["subs"]) for st in self.clients.values()]

    # -- hostile helpers ----------------------------------------------------------------------
    async def inject(self, ev: dict[str, Any]) -> None:
        """Send `ev` to every open subscription, whatever its filters and signature."""
        for ws, st in list(self.clients.items()):
            for sub in list(st["subs"]):
                with contextlib.suppress(Exception):
                    await ws.send(json.dumps(["EVENT", sub, ev]))

    async def close_subs(self, kinds: set[int], reason: str = "error: shutting down") -> int:
        """CLOSED (NIP-01) every open subscription whose filters ask for any of `kinds`; how many."""
        n = 0
        for ws, st in list(self.clients.items()):
            for sub, filters in list(st["subs"].items()):
                if any(set(f.get("kinds", ())) & kinds for f in filters if isinstance(f, dict)):
                    st["subs"].pop(sub, None)
                    n += 1
                    with contextlib.suppress(Exception):
                        await ws.send(json.dumps(["CLOSED", sub, reason]))
        return n

    async def drop_clients(self) -> None:
        """Close every client connection (clients must reconnect and resubscribe)."""
        for ws in list(self.clients):
            with contextlib.suppress(Exception):
                await ws.close()

    # -- protocol -----------------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        st: dict[str, Any] = {"subs": {}, "authed": None, "challenge": secrets.token_hex(8)}
        self.clients[ws] = st
        try:
            if self.require_auth:
                await ws.send(json.dumps(["AUTH", st["challenge"]]))
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    await ws.send(json.dumps(["NOTICE", "invalid: not JSON"]))
                    continue
                self.received.append(msg)
                await self._message(ws, st, msg)
        except Exception:
            pass
        finally:
            self.clients.pop(ws, None)

    async def _message(self, ws: ServerConnection, st: dict[str, Any], msg: list[Any]) -> None:
        kind = msg[0] if msg else None
        if kind == "AUTH":
            ev = verify_json(msg[1])
            tags = {t[0]: t[1] for t in (ev.tags if ev else []) if len(t) > 1}
            ok = ev is not None and ev.kind == 22242 and tags.get("challenge") == st["challenge"]
            if ok:
                st["authed"] = ev.pubkey  # type: ignore[union-attr]
            await ws.send(json.dumps(["OK", msg[1].get("id", ""), ok, "" if ok else "invalid: bad auth"]))
        elif kind == "EVENT":
            ev = msg[1]
            eid = ev.get("id", "") if isinstance(ev, dict) else ""
            if self.require_auth and not st["authed"]:
                await ws.send(json.dumps(["OK", eid, False, "auth-required: authenticate first"]))
                return
            if self.verify and verify_json(ev) is None:
                await ws.send(json.dumps(["OK", eid, False, "invalid: bad id or signature"]))
                return
            if self.max_content is not None and len(str(ev.get("content", ""))) > self.max_content:
                await ws.send(json.dumps(["OK", eid, False, f"invalid: content over {self.max_content} characters"]))
                return
            if ev.get("kind") in self.refuse:
                await ws.send(json.dumps(["OK", eid, False, "blocked: not on this relay"]))
                return
            if any(e["id"] == eid for e in self.events):
                await ws.send(json.dumps(["OK", eid, True, "duplicate: already have it"]))
                return
            if ev.get("kind") not in self.drop_ok:
                await ws.send(json.dumps(["OK", eid, True, ""]))
            if ev["kind"] == 5:
                gone = {t[1] for t in ev["tags"] if len(t) > 1 and t[0] == "e"}
                self.events = [e for e in self.events if not (e["id"] in gone and e["pubkey"] == ev["pubkey"])]
            if not 20000 <= ev["kind"] < 30000:
                self.events.append(ev)
            for cb in self.on_event:
                cb(ev)
            await self._broadcast(ev)
        elif kind == "REQ":
            sub, filters = msg[1], msg[2:]
            if self.require_auth and not st["authed"]:
                await ws.send(json.dumps(["CLOSED", sub, "auth-required: authenticate first"]))
                return
            if any(set(f.get("kinds", ())) & self.silent_req for f in filters if isinstance(f, dict)):
                return
            if self.max_subs is not None and sub not in st["subs"] and len(st["subs"]) >= self.max_subs:
                refusal = ["NOTICE", "rejected: too many subscriptions"] if self.notice_refusals else \
                    ["CLOSED", sub, "error: too many subscriptions"]  # fmt: skip
                await ws.send(json.dumps(refusal))
                return
            st["subs"][sub] = filters
            for ev in self.events:
                if any(matches(f, ev) for f in filters):
                    await ws.send(json.dumps(["EVENT", sub, ev]))
            await ws.send(json.dumps(["EOSE", sub]))
        elif kind == "CLOSE":
            st["subs"].pop(msg[1], None)

    async def _broadcast(self, ev: dict[str, Any]) -> None:
        for ws, st in list(self.clients.items()):
            for sub, filters in list(st["subs"].items()):
                if any(matches(f, ev) for f in filters):
                    with contextlib.suppress(Exception):
                        await ws.send(json.dumps(["EVENT", sub, ev]))
