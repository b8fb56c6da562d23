"""The usage ledger: rows, summaries by model/lane/day/provider, unknown costs, cache hits, no secrets, never failing a call."""

from __future__ import annotations

import logging
import os
import re
import stat

import pytest

import dsrs
from dsrs import LM, Predict
from dsrs.ledger import Ledger, default_ledger
from dsrs.types import Completion, CostSource, LmUsage
from redis_fixture import redis_server  # noqa: F401 - the fixture
from scripted import chat_reply

DAY = 86400.0
T0 = 1_780_000_000.0  # 2026-05-28 UTC


def comp(provider, model, p, c, cost, src=CostSource.PRICE_TABLE, hit=False):
    return Completion("x", LmUsage(p, c, p + c, cost_msats=cost, cost_source=src, cache_hit=hit, calls=1),
                      model=model, provider=provider, latency_s=0.5)  # fmt: skip


def test_rows_and_summaries(tmp_path):
    led = Ledger(tmp_path / "l.sqlite3")
    led.record(comp("openai", "gpt-4o-mini", 100, 10, 30), lane="premium", at=T0)
    led.record(comp("openai", "gpt-4o-mini", 50, 5, 15), lane="premium", at=T0 + DAY)
    led.record(comp("embedded", "gemma-3-270m", 20, 2, 0, CostSource.FREE), lane="local", at=T0 + DAY)
    led.record(comp("groq", "mystery", 7, 1, None), at=T0 + 2 * DAY)  # unknown price
    rows = led.rows()
    assert [(r.provider, r.lane, r.total_tokens, r.cost_msats, r.cost_source) for r in rows] == [
        ("openai", "premium", 110, 30, "price_table"), ("openai", "premium", 55, 15, "price_table"),
        ("embedded", "local", 22, 0, "free"), ("groq", None, 8, None, "price_table"),
    ]  # fmt: skip
    by_model = {s.key: (s.calls, s.total_tokens, s.cost_msats, s.unknown_cost_calls) for s in led.summary("model")}
    assert by_model == {"openai/gpt-4o-mini": (2, 165, 45, 0), "embedded/gemma-3-270m": (1, 22, 0, 0),
                        "groq/mystery": (1, 8, 0, 1)}  # fmt: skip
    assert [(s.key, s.calls) for s in led.summary("lane")] == [("premium", 2), ("local", 1), ("-", 1)]
    assert [(s.key, s.calls, s.cost_msats) for s in led.summary("day")] == [
        ("2026-05-28", 1, 30), ("2026-05-29", 2, 15), ("2026-05-30", 1, 0)]
    assert [s.key for s in led.summary("provider")] == ["openai", "embedded", "groq"]
    assert [r.provider for r in led.rows(since=T0 + 1.5 * DAY)] == ["groq"]
    with pytest.raises(dsrs.ConfigurationError, match="cannot group usage by 'colour'"):
        led.summary("colour")
    assert stat.S_IMODE(os.stat(tmp_path / "l.sqlite3").st_mode) == 0o600


def test_empty_ledger_reads_as_empty_and_creates_nothing(tmp_path):
    led = Ledger(tmp_path / "none" / "l.sqlite3")
    assert led.rows() == [] and led.summary() == []
    assert not (tmp_path / "none").exists()


def test_predict_records_cache_hits_and_never_secrets(scripted, fake_retry, tmp_path):
    scripted.script(chat_reply("[[ answer ]]\nsecretless\n\n[[ end ]]", 40, 4, model="gpt-4o-mini"))
    lm = LM("openai/gpt-4o-mini", base_url=scripted.url + "/v1", api_key="sk-very-secret-key-123",
            retry_policy=fake_retry).with_cache(dsrs.Cache())  # fmt: skip
    qa = Predict("question -> answer", lm=lm)
    with dsrs.context(cache_dir=str(tmp_path)):
        first = qa(question="my private prompt text")
        second = qa(question="my private prompt text")
        rows = default_ledger().rows()
    assert len(scripted.requests) == 1 and second.lm_usage.cache_hit and second.lm_usage.cost_msats == 0
    assert [(r.cache_hit, r.cost_msats > 0 if not r.cache_hit else r.cost_msats) for r in rows] == [(False, True), (True, 0)]
    assert first.lm_usage.cost_msats == rows[0].cost_msats
    for name in os.listdir(tmp_path):
        if name.startswith("ledger"):
            blob = (tmp_path / name).read_bytes()
            assert b"sk-very-secret" not in blob and b"private prompt" not in blob and b"127.0.0.1" not in blob


def test_ledger_off_records_nothing(scripted, fake_retry, tmp_path, monkeypatch):
    monkeypatch.setenv("DSRS_LEDGER", "off")
    scripted.script(chat_reply("[[ answer ]]\nx\n\n[[ end ]]"))
    lm = LM("openai/gpt-4o-mini", base_url=scripted.url + "/v1", api_key="sk-test", retry_policy=fake_retry)
    with dsrs.context(cache_dir=str(tmp_path)):
        Predict("question -> answer", lm=lm)(question="q")
        assert dsrs.usage() == []


def test_an_unwritable_ledger_never_fails_a_call(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    led = Ledger(blocker / "ledger.sqlite3")
    with caplog.at_level(logging.WARNING, logger="dsrs.ledger"):
        led.record(comp("openai", "gpt-4o", 1, 1, 1))
    assert "could not write the usage ledger" in caplog.text


def test_with_dsrs_redis_url_predict_and_dsrs_usage_share_the_redis_ledger(redis_server, scripted, tmp_path):
    import subprocess
    import sys
    import uuid

    field = "q_" + uuid.uuid4().hex[:8]  # a program name no other test writes to the shared Redis
    env = dict(os.environ, DSRS_REDIS_URL=redis_server.url, DSRS_CACHE_DIR=str(tmp_path),
               LLAMACPP_BASE_URL=scripted.url + "/v1")  # fmt: skip
    (tmp_path / "in.jsonl").write_text(f'{{"{field}": "a"}}\n{{"{field}": "b"}}\n')
    scripted.script(default=chat_reply("[[ answer ]]\nx\n\n[[ end ]]", 7, 3))
    run = [sys.executable, "-m", "dsrs.cli", "run", f"{field} -> answer", "-i", str(tmp_path / "in.jsonl"),
           "-o", str(tmp_path / "out.jsonl"), "-m", "llamacpp/chat"]  # fmt: skip
    r = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    u = subprocess.run([sys.executable, "-m", "dsrs.cli", "usage", "--by", "program"], env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert u.returncode == 0, u.stderr
    assert re.search(rf"^{field} -> answer\s+2\s+14\s+6\s+20\s+0\s+0$", u.stdout, re.M), u.stdout
    assert not (tmp_path / "ledger.sqlite3").exists()  # nothing went to the local file
