"""LmUsage arithmetic, pricing, settings scopes, import hygiene."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import dsrs
from dsrs import CostSource, LmUsage, pricing


def test_usage_adds_exactly():
    a = LmUsage(10, 5, 15, 2, 1, 7, CostSource.PRICE_TABLE, calls=1)
    b = LmUsage(1, 2, 3, 0, 0, 11, CostSource.PRICE_TABLE, calls=1)
    s = a + b
    assert (s.prompt_tokens, s.completion_tokens, s.total_tokens, s.cached_tokens, s.reasoning_tokens) == (11, 7, 18, 2, 1)
    assert s.cost_msats == 18 and s.calls == 2 and s.cost_source is CostSource.PRICE_TABLE
    assert LmUsage() + LmUsage() == LmUsage()
    assert sum([a, b, a], LmUsage()) == a + b + a
    total = LmUsage()
    for u in (a, b):
        total = total + u
    assert total == s


def test_unknown_cost_is_contagious_and_sources_mix():
    a = LmUsage(1, 1, 2, cost_msats=None, calls=1)
    b = LmUsage(1, 1, 2, cost_msats=5, cost_source=CostSource.INVOICE, calls=1)
    assert (a + b).cost_msats is None
    c = LmUsage(cost_msats=3, cost_source=CostSource.PRICE_TABLE, calls=1)
    assert (b + c).cost_source is CostSource.MIXED
    assert (LmUsage() + b).cost_source is CostSource.INVOICE


def test_price_table_is_dated_and_never_guesses():
    assert pricing.table()["as_of"]
    assert pricing.price("openai", "gpt-4o-2024-08-06") == pricing.price("openai", "gpt-4o")
    assert pricing.price("openai", "gpt-4o-mystery") is None
    assert pricing.cost_msats("openai", "no-such-model", 10, 10) is None
    assert pricing.price("codex", "gpt-5-codex") == pricing.price("openai", "gpt-5-codex")
    assert pricing.cost_msats("llamacpp", "anything", 10**6, 10**6) == 0


def test_cached_tokens_are_cheaper_and_rate_is_configurable(monkeypatch):
    full = pricing.cost_msats("openai", "gpt-4o", 1_000_000, 0)
    cached = pricing.cost_msats("openai", "gpt-4o", 1_000_000, 0, cached=1_000_000)
    assert full == 2_500_000 and cached == 1_250_000
    monkeypatch.setenv("DSRS_MSATS_PER_USD", "2000000")
    assert pricing.cost_msats("openai", "gpt-4o", 1_000_000, 0) == 5_000_000
    with dsrs.context(msats_per_usd=10):
        assert pricing.cost_msats("openai", "gpt-4o", 1_000_000, 0) == 25


def test_configure_and_scoped_context():
    a, b = object(), object()
    dsrs.configure(a)
    try:
        assert dsrs.settings.current().lm is a
        with dsrs.context(b):
            assert dsrs.settings.current().lm is b
            seen = []
            t = threading.Thread(target=lambda: seen.append(dsrs.settings.current().lm))
            t.start()
            t.join()
            assert seen == [a]  # a scoped override does not leak into other threads

            async def task():
                return dsrs.settings.current().lm

            assert asyncio.run(task()) is b  # tasks inherit the scope they were made in
        assert dsrs.settings.current().lm is a
        dsrs.configure_with_adapter(b, "adapter")
        assert dsrs.settings.current().adapter == "adapter"
    finally:
        dsrs.configure(None, adapter=None)


def test_import_is_light_and_side_effect_free(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("DSRS_CACHE_DIR", None)
    code = (
        "import sys, dsrs; "
        "heavy = [m for m in ('aiohttp', 'xllamacpp', 'sqlite3', 'dsrs.providers.openai_chat') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_lm_repr_is_informative():
    r = repr(dsrs.LM("openai/gpt-4o", temperature=0.1))
    assert "openai" in r and "gpt-4o" in r and "temperature=0.1" in r


def test_anthropic_cache_writes_cost_more_than_input():
    # claude-sonnet-4-5: 3 USD/M input, 3.75 USD/M cache writes, 0.30 USD/M cache reads (prompts up to 200k)
    assert pricing.cost_msats("anthropic", "claude-sonnet-4-5", 100_000, 0, cache_write=100_000) == 375_000
    assert pricing.cost_msats("anthropic", "claude-sonnet-4-5", 200_000, 0, cached=100_000) == 330_000
    u = LmUsage(10, 0, 10, cache_write_tokens=4, calls=1) + LmUsage(10, 0, 10, cache_write_tokens=1, calls=1)
    assert u.cache_write_tokens == 5


def test_bad_settings_are_typed_errors(monkeypatch):
    import pytest

    with pytest.raises(dsrs.ConfigurationError):
        dsrs.configure(msats_per_usdd=1)
    monkeypatch.setenv("DSRS_MSATS_PER_USD", "1e6")
    with pytest.raises(dsrs.ConfigurationError):
        pricing.msats_per_usd()


def test_sync_calls_from_many_threads_and_nested_sync_calls_do_not_leak_or_hang():
    code = """
import asyncio, gc, os, sys, threading
sys.path.insert(0, %r)
from scripted import ScriptedServer, chat_reply
import dsrs
s = ScriptedServer(); s.script(default=chat_reply("ok"))
lm = dsrs.LM("openai/gpt-4o", base_url=s.url + "/v1", api_key="k")
lm("warm")
for _ in range(10):
    asyncio.run(lm.acall("x"))
fds = len(os.listdir("/proc/self/fd"))
ts = [threading.Thread(target=lambda: lm("x")) for _ in range(20)]
[t.start() for t in ts]; [t.join() for t in ts]
for _ in range(20):
    asyncio.run(lm.acall("x"))
gc.collect()
grown = len(os.listdir("/proc/self/fd")) - fds
seen = []
def hook(c):
    if not seen:
        seen.append(lm("nested").text)  # a sync call from code on the background loop
async def main():
    with dsrs.context(on_usage=(hook,)):
        return lm("outer").text
print(grown, asyncio.run(asyncio.wait_for(main(), 20)), seen)
""" % os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-W", "error::ResourceWarning", "-c", code], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    grown, outer, nested = out.stdout.split(" ", 2)
    assert int(grown) <= 1 and outer == "ok" and nested.strip() == "['ok']"


def test_on_usage_takes_one_function_or_several(scripted):
    from scripted import chat_reply

    seen = []
    lm = dsrs.LM("openai/gpt-4o", base_url=scripted.url + "/v1", api_key="k")
    scripted.script(chat_reply("a"), chat_reply("b"))
    with dsrs.context(on_usage=seen.append):
        lm("x")
    with dsrs.context(on_usage=[seen.append, seen.append]):
        lm("y")
    assert [c.text for c in seen] == ["a", "b", "b"]
    import pytest

    with pytest.raises(dsrs.ConfigurationError):
        dsrs.configure(on_usage=[1])


def test_the_spellings_users_bring_are_aliases_or_get_a_did_you_mean():
    import pytest

    from dsrs import LM

    lm = LM("openai/gpt-4o", api_base="http://127.0.0.1:1/v1", num_retries=3, max_completion_tokens=9, stop=["a", "b"])
    assert lm.options == {"base_url": "http://127.0.0.1:1/v1", "retries": 3, "max_tokens": 9, "stop": ("a", "b")}
    assert lm.request("hi", max_output_tokens=5, stop_sequences=["x"]).max_tokens == 5
    with pytest.raises(dsrs.ConfigurationError, match="did you mean 'temperature'"):
        LM("openai/gpt-4o", temprature=0.1)
    with pytest.raises(dsrs.ConfigurationError) as e:
        LM("openai/gpt-4o", reasoning_effort="low")
    assert "did you mean" not in str(e.value) and "extra={'reasoning_effort': 'low'}" in str(e.value)


async def test_history_keeps_the_last_calls_bounded(scripted, capsys):
    from dsrs import LM, history
    from scripted import chat_reply

    scripted.script(chat_reply("four", prompt_tokens=7, completion_tokens=1), chat_reply("five"))
    lm = LM("openai/gpt-4o-mini", base_url=scripted.url, api_key="k")
    other = lm.with_temperature(0)
    await lm.acall("two plus two?")
    await other.acall("two plus three?")
    assert [e.completion.text for e in lm.history] == ["four"] and other.history[-1].completion.text == "five"
    shown = dsrs.inspect_history(2)
    out = capsys.readouterr().out
    assert [e.messages[0].content for e in shown] == ["two plus two?", "two plus three?"]
    assert "user: two plus two?" in out and "-> four" in out and "tokens 7 + 1 = 8" in out
    history.resize(1)
    try:
        scripted.script(chat_reply("a"), chat_reply("b"))
        await lm.acall("x")
        await lm.acall("y")
        assert [e.completion.text for e in history.entries()] == ["b"]
    finally:
        history.resize(history.SIZE)
