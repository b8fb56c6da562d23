"""Prices and usage that match the bill: each provider's usage as its API reference documents it,
priced by hand in the test from the published prices (USD per million tokens; at the default
1,000,000 msats per USD, one micro-USD is one msat)."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest

from dsrs import LM, LmUsage, StreamEnd, errors, pricing
from scripted import Reply

KEY = "sk-test-pricing"


@pytest.fixture(autouse=True)
def _fresh_prices(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DSRS_PRICES", raising=False)
    monkeypatch.delenv("DSRS_MSATS_PER_USD", raising=False)
    pricing.clear()
    yield
    pricing.clear()


def lm(scripted: Any, spec: str, base: str = "/v1") -> LM:
    return LM(spec, base_url=scripted.url + base, api_key=KEY, retries=0)


def _sse_usage_chunk(usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "grok-4", "choices": [], "usage": usage}


# -- 1. xAI bills reasoning outside completion_tokens -------------------------------------------
# docs.x.ai: completion_tokens excludes reasoning; total_tokens = prompt + completion + reasoning.
XAI_USAGE = {"prompt_tokens": 32, "completion_tokens": 9, "total_tokens": 135,
             "prompt_tokens_details": {"text_tokens": 32, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 6},
             "completion_tokens_details": {"reasoning_tokens": 94, "audio_tokens": 0}}  # fmt: skip
# grok-4: 3.00 in, 0.75 cached in, 15.00 out. 26 * 3 + 6 * 0.75 + (9 + 94) * 15 = 78 + 4.5 + 1545 = 1627.5
XAI_MSATS = 1628


def _chat(usage: dict[str, Any], model: str) -> Reply:
    return Reply(json={"id": "c1", "object": "chat.completion", "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"},
                                    "finish_reason": "stop"}], "usage": usage})  # fmt: skip


async def test_xai_reasoning_tokens_are_billed_as_output(scripted: Any) -> None:
    scripted.script(_chat(XAI_USAGE, "grok-4"))
    u = (await lm(scripted, "xai/grok-4").acall("2+2?")).usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens) == (
        32, 103, 135, 6, 94)  # fmt: skip
    assert u.cost_msats == XAI_MSATS and u.cost_source.value == "price_table"


async def test_xai_stream_usage_bills_reasoning_too(scripted: Any) -> None:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "grok-4",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}]}  # fmt: skip
    scripted.script(Reply(sse=[chunk, _sse_usage_chunk(XAI_USAGE), "[DONE]"]))
    items = [x async for x in lm(scripted, "xai/grok-4").astream("2+2?")]
    end = items[-1]
    assert isinstance(end, StreamEnd)
    assert (end.usage.completion_tokens, end.usage.reasoning_tokens, end.usage.cost_msats) == (103, 94, XAI_MSATS)


async def test_openai_convention_counts_reasoning_once(scripted: Any) -> None:
    # OpenAI (and resellers in front of Grok) count reasoning inside completion_tokens: total = prompt + completion
    usage = {"prompt_tokens": 32, "completion_tokens": 103, "total_tokens": 135,
             "completion_tokens_details": {"reasoning_tokens": 94}}  # fmt: skip
    scripted.script(_chat(usage, "o4-mini"), _chat(usage, "grok-4"))
    u = (await lm(scripted, "openai/o4-mini").acall("2+2?")).usage
    assert (u.completion_tokens, u.reasoning_tokens, u.total_tokens) == (103, 94, 135)
    # o4-mini: 1.10 in, 4.40 out: 32 * 1.1 + 103 * 4.4 = 35.2 + 453.2 = 488.4
    assert u.cost_msats == 489
    u = (await lm(scripted, "xai/grok-4").acall("2+2?")).usage
    assert u.completion_tokens == 103 and u.cost_msats == 32 * 3 + 103 * 15


# -- 2. Cohere is priced from billed_units ------------------------------------------------------
# docs.cohere.com v2 chat: usage.billed_units are what is billed; usage.tokens adds the prompt template.
CO_USAGE = {"billed_units": {"input_tokens": 5, "output_tokens": 418},
            "tokens": {"input_tokens": 71, "output_tokens": 418}}  # fmt: skip
# command-a-03-2025: 2.50 in, 10.00 out. 5 * 2.5 + 418 * 10 = 12.5 + 4180 = 4192.5
CO_MSATS = 4193


async def test_cohere_is_priced_from_billed_units(scripted: Any) -> None:
    body = {"id": "co-1", "finish_reason": "COMPLETE", "usage": CO_USAGE,
            "message": {"role": "assistant", "content": [{"type": "text", "text": "Paris"}]}}  # fmt: skip
    end = {"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": CO_USAGE}}
    scripted.script(Reply(json=body), Reply(sse=[
        ("message-start", {"type": "message-start", "id": "co-2", "delta": {"message": {"role": "assistant"}}}),
        ("content-delta", {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": "Paris"}}}}),
        ("message-end", end)]))  # fmt: skip
    model = lm(scripted, "cohere/command-a-03-2025", "/v2")
    u = (await model.acall("Capital of France?")).usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost_msats) == (5, 418, 423, CO_MSATS)
    items = [x async for x in model.astream("Capital of France?")]
    assert items[-1].usage.prompt_tokens == 5 and items[-1].usage.cost_msats == CO_MSATS


# -- 3. Long-context tiers -----------------------------------------------------------------------
def test_gemini_2_5_pro_long_prompts_pay_the_higher_tier() -> None:
    # <= 200k prompt: 1.25 in, 10 out, 0.31 cached; > 200k: 2.50 in, 15 out, 0.625 cached (ai.google.dev pricing)
    assert pricing.cost_msats("gemini", "gemini-2.5-pro", 200_000, 1_000) == 200_000 * 1.25 + 1_000 * 10
    # 200,001 * 2.5 + 1,000 * 15 = 500,002.5 + 15,000
    assert pricing.cost_msats("gemini", "gemini-2.5-pro", 200_001, 1_000) == 515_003
    # 150,000 * 2.5 + 100,000 * 0.625 = 375,000 + 62,500
    assert pricing.cost_msats("gemini", "gemini-2.5-pro", 250_000, 0, cached=100_000) == 437_500
    # the worst case uses the tier its prompt is in: 300,000 * 2.5 + 8,192 * 15
    assert pricing.worst_case_msats("gemini", "gemini-2.5-pro", 300_000, 8_192) == 750_000 + 122_880
    assert pricing.worst_case_msats("gemini", "gemini-2.5-pro", 100_000, 8_192) == 125_000 + 81_920


def test_claude_sonnet_1m_context_pays_2x_input_and_1_5x_output_above_200k() -> None:
    # above 200k input tokens (cache reads and writes included): 6 in, 22.50 out, 0.60 read, 7.50 / 12 writes
    for model in ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "claude-sonnet-4", "claude-sonnet-4-20250514"):
        # 180,000 * 6 + 50,000 * 0.6 + 10,000 * 7.5 + 10,000 * 12 + 2,000 * 22.5
        assert pricing.cost_msats("anthropic", model, 250_000, 2_000, cached=50_000, cache_write=20_000,
                                  cache_write_1h=10_000) == 1_080_000 + 30_000 + 75_000 + 120_000 + 45_000  # fmt: skip
        # exactly 200k is the base tier: 200,000 * 3 + 2,000 * 15
        assert pricing.cost_msats("anthropic", model, 200_000, 2_000) == 600_000 + 30_000
    # the worst case prices the prompt at the dearest input rate (a 1-hour write) of the tier it is in
    assert pricing.worst_case_msats("anthropic", "claude-sonnet-4-5", 250_000, 4_096) == 250_000 * 12 + 92_160
    assert pricing.worst_case_msats("anthropic", "claude-sonnet-4-5", 100_000, 4_096) == 100_000 * 6 + 61_440
    assert pricing.cost_msats("anthropic", "claude-opus-4-1", 250_000, 0) == 250_000 * 15  # no long tier there


def test_grok_4_doubles_above_128k_prompt_tokens() -> None:
    # grok-4: 3 / 15 (0.75 cached) up to 128k prompt tokens, 6 / 30 (1.50 cached) above
    assert pricing.cost_msats("xai", "grok-4-0709", 128_000, 1_000) == 128_000 * 3 + 1_000 * 15
    # 128,000 * 6 + 1 * 1.5 + 1,000 * 30 = 798,001.5 micro-USD, rounded up to a whole msat
    assert pricing.cost_msats("xai", "grok-4", 128_001, 1_000, cached=1) == 798_002


async def test_a_long_gemini_call_is_billed_at_the_long_tier(scripted: Any) -> None:
    body = {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 250_000, "candidatesTokenCount": 100, "thoughtsTokenCount": 900,
                              "totalTokenCount": 251_000}}  # fmt: skip
    scripted.script(Reply(json=body))
    u = (await lm(scripted, "gemini/gemini-2.5-pro", "/v1beta").acall("summarise")).usage
    # 250,000 * 2.5 + (100 + 900) * 15
    assert (u.completion_tokens, u.cost_msats) == (1_000, 625_000 + 15_000)


# -- 4. Anthropic 1-hour cache writes ------------------------------------------------------------
AN_USAGE = {"input_tokens": 10, "cache_creation_input_tokens": 3_000, "cache_read_input_tokens": 1_000,
            "output_tokens": 50, "cache_creation": {"ephemeral_5m_input_tokens": 1_000,
                                                    "ephemeral_1h_input_tokens": 2_000}}  # fmt: skip
# claude-sonnet-4-5: 3 in, 0.30 read, 3.75 5-minute write, 6 1-hour write, 15 out
AN_MSATS = 10 * 3 + 1_000 * 0.3 + 1_000 * 3.75 + 2_000 * 6 + 50 * 15  # 16,830


def _an(usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": usage}  # fmt: skip


async def test_anthropic_one_hour_cache_writes_cost_twice_input(scripted: Any) -> None:
    start = {"type": "message_start", "message": {**_an({**AN_USAGE, "output_tokens": 1}), "content": []}}
    scripted.script(Reply(json=_an(AN_USAGE)), Reply(sse=[
        ("message_start", start),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 50}}),
        ("message_stop", {"type": "message_stop"})]))  # fmt: skip
    model = lm(scripted, "anthropic/claude-sonnet-4-5")
    u = (await model.acall("hi")).usage
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.cache_write_1h_tokens) == (4_010, 1_000, 3_000,
                                                                                                2_000)  # fmt: skip
    assert u.cost_msats == AN_MSATS == 16_830
    items = [x async for x in model.astream("hi")]
    assert items[-1].usage.cache_write_1h_tokens == 2_000 and items[-1].usage.cost_msats == 16_830


async def test_anthropic_split_without_the_total_still_counts_every_write(scripted: Any) -> None:
    usage = {"input_tokens": 10, "output_tokens": 50,
             "cache_creation": {"ephemeral_5m_input_tokens": 1_000, "ephemeral_1h_input_tokens": 2_000}}  # fmt: skip
    scripted.script(Reply(json=_an(usage)))
    u = (await lm(scripted, "anthropic/claude-sonnet-4-5").acall("hi")).usage
    assert (u.prompt_tokens, u.cache_write_tokens, u.cache_write_1h_tokens) == (3_010, 3_000, 2_000)
    assert u.cost_msats == 10 * 3 + 1_000 * 3.75 + 2_000 * 6 + 50 * 15


def test_usage_with_one_hour_writes_sums_and_round_trips() -> None:
    a = LmUsage(4_010, 50, 4_060, 1_000, cost_msats=16_830, calls=1, cache_write_tokens=3_000, cache_write_1h_tokens=2_000)
    b = LmUsage(100, 5, 105, cost_msats=7, calls=1, cache_write_tokens=10, cache_write_1h_tokens=4)
    s = a + b
    assert (s.cache_write_tokens, s.cache_write_1h_tokens, s.cost_msats) == (3_010, 2_004, 16_837)
    assert sum([a, b], LmUsage()) == s
    assert LmUsage.from_json(json.loads(json.dumps(s.to_json()))) == s
    old = {k: v for k, v in a.to_json().items() if k != "cache_write_1h_tokens"}  # written before the field existed
    assert LmUsage.from_json(old).cache_write_1h_tokens == 0
    assert LmUsage.from_json({**a.to_json(), "a_field_from_a_newer_dsrs": 1}) == a


# -- 5. Snapshots: only what the table names -----------------------------------------------------
def test_a_snapshot_is_priced_only_when_the_table_names_it() -> None:
    # gpt-4o-2024-05-13 is 5 / 15, not today's gpt-4o price (2.50 / 10)
    assert pricing.cost_msats("openai", "gpt-4o-2024-05-13", 1_000_000, 1_000_000) == 20_000_000
    assert pricing.cost_msats("openai", "gpt-4o", 1_000_000, 1_000_000) == 12_500_000
    assert pricing.price("openai", "gpt-4o-2024-08-06") == pricing.price("openai", "gpt-4o")  # listed as equal
    for provider, model in (("openai", "gpt-4o-2099-01-01"), ("openai", "gpt-4o-latest"), ("openai", "o3-20250416"),
                            ("anthropic", "claude-sonnet-4-5-20990101"), ("mistral", "mistral-large-2411")):  # fmt: skip
        assert pricing.price(provider, model) is None, model
        assert pricing.cost_msats(provider, model, 10, 10) is None
    # Cohere's bare names are aliases of the older, dearer snapshots (docs.cohere.com models)
    assert pricing.price("cohere", "command-r-plus") == pricing.price("cohere", "command-r-plus-04-2024")
    assert pricing.cost_msats("cohere", "command-r-plus", 1_000_000, 0) == 3_000_000
    assert pricing.cost_msats("cohere", "command-r-plus-08-2024", 1_000_000, 0) == 2_500_000


async def test_an_unlisted_snapshot_costs_unknown_not_the_alias_price(scripted: Any) -> None:
    scripted.script(_chat({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}, "gpt-4o-2099-01-01"))
    u = (await lm(scripted, "openai/gpt-4o-2099-01-01").acall("hi")).usage
    assert u.cost_msats is None and u.cost_source is None and u.cost_usd is None


def test_every_row_of_the_bundled_table_reads() -> None:
    t = pricing.table()
    for name, row in t["models"].items():
        provider, _, model = name.partition("/")
        p = pricing.price(provider, model)
        assert p is not None and p.input >= 0 and (p.output > 0 or "embedding" in model), name  # embeddings: no output
        if isinstance(row, str):
            assert not isinstance(t["models"][row], str) and p == pricing.price(*row.split("/", 1)), name


# -- 6. Run-time prices, USD -----------------------------------------------------------------------
def test_register_prices_a_model_and_invalidates_the_lookup() -> None:
    assert pricing.price("openrouter", "qwen/qwq-32b") is None  # looked up (and cached) first
    pricing.register("openrouter/qwen/qwq-32b", input=0.15, output=0.6)
    assert pricing.cost_msats("openrouter", "qwen/qwq-32b", 1_000, 1_000) == 150 + 600
    pricing.register("openai/gpt-4o", input=1, output=2, cached_input=0.5)  # overrides the bundled row
    assert pricing.cost_msats("openai", "gpt-4o", 1_000, 1_000, cached=500) == 500 + 250 + 2_000
    pricing.register("azure/my-deployment", input="2", output="8")  # any provider name, aliases too
    assert pricing.cost_msats("azure", "my-deployment", 1_000, 0) == 2_000
    pricing.register("anthropic/claude-next", input=3, output=15, cache_write=3.75, cache_write_1h=6,
                     long_context={"above": 200_000, "input": 6, "output": 22.5})  # fmt: skip
    assert pricing.cost_msats("anthropic", "claude-next", 200_001, 0) == 1_200_006
    pricing.clear()
    assert pricing.price("openrouter", "qwen/qwq-32b") is None
    assert pricing.cost_msats("openai", "gpt-4o", 1_000, 0) == 2_500


@pytest.mark.parametrize("kw", [{"input": -1, "output": 1}, {"input": float("nan"), "output": 1},
                                {"input": "lots", "output": 1}, {"input": 1, "output": True},
                                {"input": 1, "output": 1, "long_context": {"input": 2, "output": 2}}])  # fmt: skip
def test_register_refuses_bad_prices_typed(kw: dict[str, Any]) -> None:
    with pytest.raises(errors.ConfigurationError):
        pricing.register("openai/x", **kw)
    with pytest.raises(errors.ConfigurationError, match="provider/model"):
        pricing.register("no-provider", input=1, output=1)


async def test_dsrs_prices_file_is_read_on_the_first_lookup(scripted: Any, tmp_path: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    f = tmp_path / "prices.json"
    f.write_text(json.dumps({"models": {"openai/gpt-4o": [10, 20], "openai/gpt-4o-2099-01-01": "openai/gpt-4o",
                                        "openrouter/meta/llama": {"input": 0.1, "output": 0.2}}}))  # fmt: skip
    monkeypatch.setenv("DSRS_PRICES", str(f))
    pricing.clear()
    scripted.script(_chat({"prompt_tokens": 1_000, "completion_tokens": 100, "total_tokens": 1_100}, "gpt-4o"))
    u = (await lm(scripted, "openai/gpt-4o-2099-01-01").acall("hi")).usage
    assert u.cost_msats == 1_000 * 10 + 100 * 20
    assert pricing.cost_msats("openrouter", "meta/llama", 1_000, 1_000) == 300
    pricing.register("openai/gpt-4o", input=1, output=1)  # register() wins over the file
    assert pricing.cost_msats("openai", "gpt-4o", 1_000, 0) == 1_000
    f.write_text("{not json")
    pricing.clear()
    with pytest.raises(errors.ConfigurationError, match="DSRS_PRICES"):
        pricing.price("openai", "gpt-4o")


def test_load_takes_a_file_or_a_dict(tmp_path: Any) -> None:
    pricing.load({"openai/my-ft": [1, 2]})
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"groq/new-model": [0.5, 0.5]}))
    pricing.load(f)
    assert pricing.cost_msats("openai", "my-ft", 1_000, 1_000) == 3_000
    assert pricing.cost_msats("groq", "new-model", 1_000, 1_000) == 1_000
    with pytest.raises(errors.ConfigurationError):
        pricing.load({"openai/bad": "openai/missing"})


def test_usd_and_cost_usd(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pricing.usd(1_234) == Decimal("0.001234")
    assert LmUsage(cost_msats=16_830, calls=1).cost_usd == Decimal("0.01683")
    assert (pricing.format_usd(1_234), pricing.format_usd(12_500_000), pricing.format_usd(0)) == (
        "$0.001234", "$12.50", "$0.00")  # fmt: skip
    monkeypatch.setenv("DSRS_MSATS_PER_USD", "2000000000")  # BTC at 200k USD... in msats per USD: 1 msat is tiny
    assert pricing.usd(1_000_000) == Decimal("0.0005") and pricing.format_usd(1) == "<$0.000001"


def test_cli_ask_and_usage_show_usd_beside_msats(scripted: Any, tmp_path: Any) -> None:
    import os

    env = {**os.environ, "DSRS_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_API_KEY": KEY,
           "OPENAI_BASE_URL": scripted.url + "/v1"}  # fmt: skip
    env.pop("DSRS_LEDGER", None)
    scripted.script(_chat_text("[[ answer ]]\nParis\n\n[[ end ]]", 1_000, 10))
    run = [sys.executable, "-m", "dsrs.cli"]
    r = subprocess.run([*run, "ask", "Capital of France?", "--model", "openai/gpt-4o-mini"], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # gpt-4o-mini: 1,000 * 0.15 + 10 * 0.60 = 156 micro-USD
    assert r.stdout.strip() == "Paris"  # the answer on stdout, the usage line on stderr
    assert r.stderr.strip().splitlines()[-1].endswith("cost: 156 msats ($0.000156)")
    u = subprocess.run([*run, "usage", "--by", "model"], env=env, capture_output=True, text=True, timeout=120)
    assert u.returncode == 0 and "156 ($0.000156)" in u.stdout and "cost msats (USD)" in u.stdout, u.stdout


def _chat_text(text: str, prompt: int, completion: int) -> Reply:
    r = _chat({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
              "gpt-4o-mini")  # fmt: skip
    r.json["choices"][0]["message"]["content"] = text
    return r
