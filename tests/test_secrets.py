"""A canary API key never shows up in a repr, str, exception, log record or cache file."""

from __future__ import annotations

import logging

import pytest

import dsrs
from dsrs import LM
from dsrs.cache import Cache, SqliteStore
from scripted import Reply, chat_reply

CANARY = "sk-canary-7f3a9c1e5b2d48f6"


async def test_canary_never_leaks(scripted, tmp_path, caplog, fake_retry):
    caplog.set_level(logging.DEBUG)
    lm = LM("openai/gpt-4o", base_url=scripted.url + "/v1", api_key=CANARY, retry_policy=fake_retry)
    cache = Cache(SqliteStore(tmp_path / "cache.sqlite3"))
    seen = [repr(lm), str(lm), repr(lm.options), repr(lm.backend), repr(lm.backend.endpoint("/x"))]

    scripted.script(chat_reply("ok"))
    c = await lm.with_cache(cache).acall("hi")
    seen += [repr(c), str(c), repr(c.usage)]
    assert scripted.requests[0].headers["authorization"] == f"Bearer {CANARY}"  # it was sent, to the server only

    # a server that echoes the key back in its error body
    scripted.script(default=Reply(401, json={"error": {"message": f"Incorrect API key provided: {CANARY}",
                                                       "code": "invalid_api_key"}}))  # fmt: skip
    with pytest.raises(dsrs.AuthenticationError) as e:
        await lm.acall("hi")
    seen += [str(e.value), repr(e.value), repr(e.value.args)]

    for text in seen:
        assert CANARY not in text
    for rec in caplog.records:
        assert CANARY not in rec.getMessage()
    cache.store.flush()  # type: ignore[attr-defined]  # the cache writes on a background thread
    for f in tmp_path.iterdir():
        assert CANARY.encode() not in f.read_bytes()


def test_missing_key_names_the_env_var(monkeypatch):
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    with pytest.raises(dsrs.MissingApiKeyError) as e:
        LM("groq/llama-3.1-8b-instant").backend
    assert "GROQ_API_KEY" in str(e.value)


def test_key_from_env(monkeypatch, scripted):
    monkeypatch.setenv("GROQ_API_KEY", "gsk-env")
    scripted.script(chat_reply("ok"))
    LM("groq/llama-3.1-8b-instant", base_url=scripted.url + "/v1")("hi")
    assert scripted.requests[0].headers["authorization"] == "Bearer gsk-env"


async def test_a_key_echoed_in_band_never_leaves_in_an_error(scripted, fake_retry, monkeypatch):
    """In-band errors (a 200 carrying {"error"}, an SSE error event, a body that is not JSON) pass the
    same scrubbing as HTTP errors: one place, in the call path, whatever produced the error."""
    echoes = [
        (Reply(json={"error": {"message": f"bad key {CANARY}", "type": "server_error"}}), False),
        (Reply(body=f"<html>proxy error for key {CANARY}</html>".encode()), False),
        (Reply(json={"choices": [{"message": {"content": "x"}}], "usage": f"key {CANARY}"}), False),  # untyped crash
        (Reply(sse=[{"error": {"message": f"stream died, key {CANARY}"}}]), True),
    ]
    for key_from_env in (False, True):
        lm = LM("openai/gpt-4o", base_url=scripted.url + "/v1", retry_policy=fake_retry)
        if key_from_env:
            monkeypatch.setenv("OPENAI_API_KEY", CANARY)
        else:
            lm = lm.with_api_key(CANARY)
        for reply, stream in echoes:
            scripted.script(reply)
            with pytest.raises(dsrs.DsrsError) as e:
                if stream:
                    async for _ in lm.astream("hi"):
                        pass
                else:
                    await lm.acall("hi")
            texts = [str(e.value), repr(e.value), repr(e.value.args), e.value.message]
            cause = e.value.__cause__
            while cause is not None:
                texts += [str(cause), repr(cause.args)]
                cause = cause.__cause__
            for t in texts:
                assert CANARY not in t, (reply, t)


def test_options_hide_secret_headers():
    lm = LM("openai/gpt-4o", api_key=CANARY, headers={"X-Api-Key": CANARY, "Authorization": CANARY, "X-Trace": "t1"})
    assert CANARY not in repr(lm.options) and lm.options["headers"]["X-Trace"] == "t1"
    assert lm.options["headers"]["X-Api-Key"] == "**********"
