"""Cache keys and the on-disk store."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from dsrs import LM, Message, Tool
from dsrs.cache import Cache, SqliteStore, cache_key
from scripted import chat_reply

BASE = LM("openai/gpt-4o-mini", api_key="sk-one", base_url="http://127.0.0.1:1/v1")


def key(lm, prompt="hello", **kw):
    return cache_key(lm.provider, lm.request(prompt, **kw))


@pytest.mark.parametrize(
    "variant",
    [
        lambda lm: lm.with_max_tokens(10),
        lambda lm: lm.with_temperature(0.5),
        lambda lm: lm.with_top_p(0.9),
        lambda lm: lm.with_seed(42),
        lambda lm: lm.with_stop("\n"),
        lambda lm: lm.with_num_ctx(8192),
        lambda lm: lm.with_options(tools=[Tool("f", "d", {"type": "object", "properties": {}})]),
        lambda lm: lm.with_options(tool_choice="required"),
        lambda lm: lm.with_options(response_format={"type": "json_object"}),
        lambda lm: lm.with_options(extra={"logit_bias": {"1": 2}}),
    ],
)
def test_every_answer_changing_parameter_changes_the_key(variant):
    assert key(variant(BASE)) != key(BASE)


def test_model_provider_and_messages_change_the_key():
    assert key(LM("openai/gpt-4o", api_key="k")) != key(BASE)
    assert key(LM("groq/gpt-4o-mini", api_key="k")) != key(BASE)
    assert key(BASE, "hello!") != key(BASE)
    assert key(BASE, [Message.system("s"), Message.user("hello")]) != key(BASE)


def test_credentials_base_url_timeouts_and_retries_do_not_change_the_key():
    same = BASE.with_api_key("sk-two").with_base_url("http://example.invalid/v1").with_timeout(3).with_retries(0)
    assert key(same) == key(BASE)


def test_float_and_int_temperature_are_different_only_if_values_differ():
    assert key(BASE.with_temperature(0)) == key(BASE.with_temperature(0.0))


def test_store_is_json_mode_0600_and_survives_reopen(tmp_path):
    path = tmp_path / "sub" / "c.sqlite3"
    store = SqliteStore(path)
    store.put("k", {"text": "hi", "usage": {}})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store.close()
    assert SqliteStore(path).get("k") == {"text": "hi", "usage": {}}
    import sqlite3

    (value,) = sqlite3.connect(path).execute("SELECT value FROM answers").fetchone()
    assert json.loads(value)["text"] == "hi"


def test_corrupt_database_is_rebuilt_with_a_warning(tmp_path, caplog):
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"this is not a sqlite database" * 100)
    store = SqliteStore(path)
    with caplog.at_level(logging.WARNING, logger="dsrs.cache"):
        assert store.get("k") is None
        store.put("k", {"a": 1})
    assert store.get("k") == {"a": 1}
    assert any("unreadable" in r.message for r in caplog.records)
    assert list(tmp_path.glob("c.corrupt-*"))


async def test_hit_returns_stored_answer_free(scripted, tmp_path):
    scripted.script(chat_reply("cached answer", 100, 20))
    cache = Cache(SqliteStore(tmp_path / "c.sqlite3"))
    lm = LM("openai/gpt-4o", base_url=scripted.url + "/v1", api_key="sk-x").with_cache(cache)
    first = await lm.acall("q")
    assert first.usage.cost_msats == 450  # 100*2.5 + 20*10 = 450 µUSD = 450 msats at 1e6 msats/USD
    hit = await lm.acall("q")
    assert len(scripted.requests) == 1
    assert hit.text == "cached answer" and hit.usage.cache_hit and hit.usage.cost_msats == 0
    assert hit.usage.prompt_tokens == 100
    assert hit.usage.cost_source.value == "cache"


async def test_cache_off_by_default(scripted):
    scripted.script(chat_reply("a"), chat_reply("b"))
    lm = LM("openai/gpt-4o", base_url=scripted.url + "/v1", api_key="sk-x")
    assert (await lm.acall("q")).text == "a"
    assert (await lm.acall("q")).text == "b"


def test_api_version_and_beta_headers_change_the_key_but_auth_headers_do_not():
    lm = LM("azure/dep", api_key="k")

    def key_of(x):
        return cache_key(x.provider, x.request("hi"), x._cache_scope())

    assert key_of(lm.with_options(api_version="2024-10-21")) != key_of(lm.with_options(api_version="2025-01-01"))
    assert key_of(lm.with_options(headers={"anthropic-beta": "a"})) != key_of(lm)
    assert key_of(lm.with_options(headers={"Authorization": "Bearer x", "X-Api-Key": "y"})) == key_of(lm)


async def test_a_cached_answer_cannot_be_changed_by_its_caller(scripted, tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}
    reply = chat_reply("")
    reply.json["choices"][0]["message"]["tool_calls"] = [call]
    scripted.script(reply)
    lm = LM("openai/gpt-4o", base_url=scripted.url + "/v1", api_key="k").with_cache(Cache(SqliteStore(tmp_path / "c")))
    first = await lm.acall("q")
    first.tool_calls[0].arguments["city"] = "MUTATED"
    hit = await lm.acall("q")
    hit.tool_calls[0].arguments["city"] = "MUTATED again"
    again = await lm.acall("q")
    assert again.tool_calls[0].arguments == {"city": "Paris"} and len(scripted.requests) == 1
