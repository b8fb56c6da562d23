"""A user's program, type-checked with `mypy --strict` in the test suite (tests/test_typing.py):
the public API of dsrs tells a type checker what every call returns."""

from __future__ import annotations

import asyncio

import dsrs
from dsrs import LM, Budget, Completion, LaneMux, LmUsage, Predict, Prediction, StreamEnd


def build() -> LM:
    lm = LM("openai/gpt-4o-mini").with_max_tokens(256).with_temperature(0.2).with_seed(42).with_cache(True)
    return lm.with_budget(Budget(10_000)).with_timeout(30).with_retries(1)


def call(lm: LM) -> tuple[str, int, int | None]:
    c: Completion = lm("Say hi")
    usage: LmUsage = c.usage
    return c.text, usage.total_tokens, usage.cost_msats


async def stream(lm: LM) -> str:
    parts: list[str] = []
    async for item in lm.astream("Count to 3"):
        if isinstance(item, StreamEnd):
            assert item.usage.total_tokens >= 0
        else:
            parts.append(item)
    c = await lm.acall([dsrs.Message.system("Be brief."), dsrs.Message.user("hi")])
    return "".join(parts) + c.text


def lanes(lm: LM) -> LaneMux:
    mux = LaneMux().add_lane("fast", lm).add_lane("local", LM("embedded/gemma-3-270m"))
    c: Completion = mux("hi")
    print(c.route)
    return mux


def program(lm: LM) -> LmUsage:
    dsrs.configure(lm)
    qa = Predict("question -> answer")
    result: Prediction = qa(question="What is the capital of France?")
    total = sum((r.lm_usage for r in [result]), LmUsage())
    print(result.answer)
    return total


def codex_and_pylon() -> None:
    codex = dsrs.CodexSdkLM().with_model("gpt-5-codex").with_timeout(60).with_working_dir("/tmp")
    swarm = dsrs.PylonLM.new_swarm("wss://relay.example").with_budget_msats(10_000).with_timeout(30)
    LaneMux().add_lane("premium", codex).add_lane("cheap", swarm)


async def embeddings() -> list[list[float]]:
    e = dsrs.Embedder("openai/text-embedding-3-small").with_dimensions(256).with_cache(True).with_budget(Budget(1_000))
    r: dsrs.Embeddings = await e.aembed(["first text", "second text"])
    cost: int | None = r.usage.cost_msats
    print(cost, e.embed("one more").vectors[0][:3])
    return r.vectors


if __name__ == "__main__":
    asyncio.run(stream(build()))
