"""The embedded default: llama.cpp in this process with Gemma 3 270M, offline."""

from __future__ import annotations

import asyncio

import pytest

import dsrs
from conftest import FEW_SHOT
from dsrs import LM, StreamEnd
from dsrs.providers import embedded


@pytest.fixture(scope="module")
def lm():
    return LM("embedded/gemma-3-270m", max_tokens=8, stop=["\n"], temperature=0)


async def test_answers_a_few_shot_question_with_engine_usage(lm):
    c = await lm.acall(FEW_SHOT)
    assert c.text.strip() == "Paris"
    raw = embedded.server("gemma-3-270m").handle_completions(
        {"prompt": FEW_SHOT, "max_tokens": 8, "stop": ["\n"], "temperature": 0}
    )
    assert c.usage.prompt_tokens == raw["usage"]["prompt_tokens"]
    assert c.usage.completion_tokens == raw["usage"]["completion_tokens"]
    assert c.usage.cost_msats == 0 and c.usage.cost_source is dsrs.CostSource.FREE
    assert c.provider == "embedded" and c.finish_reason == "stop"


async def test_stream(lm):
    items = [i async for i in lm.astream(FEW_SHOT.replace("France", "Japan"))]
    end = items[-1]
    assert isinstance(end, StreamEnd)
    assert "".join(items[:-1]) == end.completion.text
    assert end.completion.text.strip() == "Tokyo"
    assert end.usage.completion_tokens >= 1 and end.usage.prompt_tokens > 10


async def test_concurrent_calls_do_not_block_the_loop(lm):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    t = asyncio.create_task(ticker())
    results = await asyncio.gather(*(lm.acall(FEW_SHOT) for _ in range(3)))
    t.cancel()
    assert all(r.text.strip() == "Paris" for r in results)
    assert ticks > 0  # the loop kept running while the engine worked


def test_conversation_is_rendered_as_a_transcript():
    msgs = (dsrs.Message.system("Answer briefly."), dsrs.Message.user("Hi"))
    assert embedded.render(msgs) == "System: Answer briefly.\n\nUser: Hi\n\nAssistant:"


async def test_tools_are_refused_before_running(lm):
    with pytest.raises(dsrs.UnsupportedFeatureError):
        await lm.acall("x", tools=[dsrs.Tool("f")])


def test_unknown_model_is_a_clear_error():
    with pytest.raises(dsrs.NotFoundError) as e:
        LM("embedded/llama-70b")("hi")
    assert "gemma-3-270m" in str(e.value)
