"""The OpenAI-compatible path against the real llama.cpp server with Gemma 3 270M."""

from __future__ import annotations

import pytest

import dsrs
from conftest import FEW_SHOT
from dsrs import LM, LmUsage, StreamEnd


def _lms(llama_server):
    return [
        LM("openai/gemma").with_base_url(llama_server.url + "/v1").with_api_key("sk-local"),
        LM("llamacpp/gemma", base_url=llama_server.url + "/v1"),
    ]


async def test_completion_matches_server(llama_server):
    raw = llama_server.post(
        "/v1/chat/completions",
        {"model": "gemma", "messages": [{"role": "user", "content": FEW_SHOT}], "max_tokens": 8, "stop": ["\n"],
         "temperature": 0, "seed": 1},
    )  # fmt: skip
    for lm in _lms(llama_server):
        lm = lm.with_max_tokens(8).with_stop("\n").with_temperature(0).with_seed(1)
        c = await lm.acall(FEW_SHOT)
        assert c.text.strip() == "Paris"
        assert c.finish_reason == "stop"
        assert c.usage.prompt_tokens == raw["usage"]["prompt_tokens"]
        assert c.usage.completion_tokens == raw["usage"]["completion_tokens"]
        assert c.usage.total_tokens == raw["usage"]["total_tokens"]
        assert c.usage.calls == 1


async def test_local_services_are_free_openai_unknown_model_is_unpriced(llama_server):
    openai_lm, llamacpp_lm = _lms(llama_server)
    c = await llamacpp_lm.acall(FEW_SHOT, max_tokens=4, stop=["\n"])
    assert c.usage.cost_msats == 0 and c.usage.cost_source is dsrs.CostSource.FREE
    c = await openai_lm.acall(FEW_SHOT, max_tokens=4, stop=["\n"])
    assert c.usage.cost_msats is None  # "gemma" has no OpenAI price: never a guess


async def test_stream_yields_deltas_then_usage(llama_server):
    lm = _lms(llama_server)[1].with_max_tokens(8).with_stop("\n").with_temperature(0)
    full = await lm.acall(FEW_SHOT)
    deltas, end = [], None
    async for item in lm.astream(FEW_SHOT):
        if isinstance(item, StreamEnd):
            end = item
        else:
            assert end is None, "nothing may follow the final usage"
            deltas.append(item)
    assert end is not None
    assert "".join(deltas) == end.completion.text == full.text
    assert end.usage.prompt_tokens == full.usage.prompt_tokens
    assert end.usage.completion_tokens == full.usage.completion_tokens


def test_sync_call_and_stream(llama_server):
    lm = _lms(llama_server)[1].with_max_tokens(8).with_stop("\n").with_temperature(0)
    assert lm(FEW_SHOT).text.strip() == "Paris"
    items = list(lm.stream(FEW_SHOT))
    assert isinstance(items[-1], StreamEnd)
    assert "".join(i for i in items if isinstance(i, str)).strip() == "Paris"


async def test_sync_call_inside_running_loop(llama_server):
    """Jupyter: a sync call while an event loop runs in this thread."""
    lm = _lms(llama_server)[1].with_max_tokens(8).with_stop("\n").with_temperature(0)
    assert lm(FEW_SHOT).text.strip() == "Paris"


async def test_cache_hit_is_free_and_marked(llama_server, tmp_path):
    from dsrs.cache import Cache, SqliteStore

    cache = Cache(SqliteStore(tmp_path / "c.sqlite3"))
    lm = _lms(llama_server)[0].with_max_tokens(8).with_stop("\n").with_temperature(0).with_cache(cache)
    first = await lm.acall(FEW_SHOT)
    assert not first.usage.cache_hit
    second = await lm.acall(FEW_SHOT)
    assert second.usage.cache_hit and second.usage.cost_msats == 0
    assert second.text == first.text
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    # a new process would find it on disk: drop the memory layer
    cache.memory.clear()
    third = await lm.acall(FEW_SHOT)
    assert third.usage.cache_hit and third.text == first.text
    # a different parameter is a different answer
    other = await lm.acall(FEW_SHOT, max_tokens=3)
    assert not other.usage.cache_hit


async def test_usage_sums_over_calls(llama_server):
    lm = _lms(llama_server)[1].with_max_tokens(4).with_stop("\n")
    results = [await lm.acall(FEW_SHOT) for _ in range(3)]
    total = sum((r.usage for r in results), LmUsage())
    assert total.calls == 3
    assert total.prompt_tokens == sum(r.usage.prompt_tokens for r in results)
    assert total.total_tokens == sum(r.usage.total_tokens for r in results)
    assert total.cost_msats == 0


async def test_context_overflow_is_typed(llama_server):
    lm = _lms(llama_server)[1].with_max_tokens(4)
    with pytest.raises(dsrs.ContextWindowExceededError) as e:
        await lm.acall("word " * 6000)
    assert e.value.provider == "llamacpp" and e.value.status == 400


async def test_unreachable_server_is_a_connection_error(fake_retry, sleeps):
    from conftest import free_port

    lm = LM("llamacpp/gemma", base_url=f"http://127.0.0.1:{free_port()}/v1", retry_policy=fake_retry)
    with pytest.raises(dsrs.APIConnectionError) as e:
        await lm.acall("hi")
    assert "llamacpp" in str(e.value)
    assert len(sleeps) == 2  # transport errors are retried twice
