"""Predict end to end: the embedded Gemma and the real llama.cpp server answer; usage sums as the spec
shows; batch keeps partial results; lanes; clear errors for bad input."""

from __future__ import annotations

import asyncio

import pytest

import dsrs
from dsrs import LM, LmUsage, Predict
from dsrs.ledger import Ledger
from dsrs.predict import AdapterParseError, CompletionAdapter, Prediction, SignatureError
from scripted import Reply, chat_reply

CAPITALS = [
    {"question": "What is the capital of Germany?", "answer": "Berlin"},
    {"question": "What color is the sky on a clear day?", "answer": "Blue"},
]


@pytest.fixture
def ledger_dir(tmp_path):
    """A private cache dir for this test, so the ledger holds only its calls."""
    with dsrs.context(cache_dir=str(tmp_path)):
        yield tmp_path


def embedded():
    return LM("embedded/gemma-3-270m", temperature=0.0, max_tokens=32)


def openai_lm(scripted, fake_retry):
    return LM("openai/gpt-4o-mini", base_url=scripted.url + "/v1", api_key="sk-test", retry_policy=fake_retry)


def test_embedded_predict_answers_paris(ledger_dir):
    with dsrs.context(embedded()):
        qa = Predict("question -> answer", demos=CAPITALS)
        result = qa(question="What is the capital of France?")  # sync, as in the spec
    assert result.answer == "Paris" and result["answer"] == "Paris"
    assert result.lm_usage.total_tokens == result.lm_usage.prompt_tokens + result.lm_usage.completion_tokens > 20
    assert result.lm_usage.cost_msats == 0 and result.lm_usage.cost_source == dsrs.CostSource.FREE
    assert result.completion.provider == "embedded" and result.completion.text == " Paris"
    (row,) = Ledger(ledger_dir / "ledger.sqlite3").rows()
    assert (row.provider, row.model, row.total_tokens, row.cost_msats, row.cost_source) == (
        "embedded", "gemma-3-270m", result.lm_usage.total_tokens, 0, "free")
    assert row.program == "question -> answer" and row.latency_s > 0 and row.cache_hit is False


async def test_embedded_stream_then_prediction(ledger_dir):
    qa = Predict("question -> answer", demos=CAPITALS, lm=embedded())
    items = [x async for x in qa.astream(question="What is the capital of France?")]
    *deltas, last = items
    assert "".join(deltas).strip() == "Paris" and isinstance(last, Prediction) and last.answer == "Paris"
    assert len(Ledger(ledger_dir / "ledger.sqlite3").rows()) == 1


async def test_sync_call_inside_a_running_loop(ledger_dir):
    qa = Predict("question -> answer", demos=CAPITALS, lm=embedded())
    assert qa(question="What is the capital of France?").answer == "Paris"  # Jupyter-style


def test_llama_server_predict_with_the_chat_adapter(llama_server, ledger_dir):
    lm = LM("llamacpp/gemma").with_base_url(llama_server.url + "/v1").with_temperature(0.0).with_max_tokens(40)
    qa = Predict("question -> answer", demos=CAPITALS)  # a chat model by name: the chat adapter
    r = qa.forward({"question": "What is the capital of France?"}, lm=lm)  # per-call LM override
    assert r.answer == "Paris" and r.completion.provider == "llamacpp"
    assert "[[ answer ]]" in r.completion.text


def test_spec_cost_aggregation_loop_equals_the_ledger(scripted, fake_retry, ledger_dir):
    scripted.script(*(chat_reply(f"[[ answer ]]\n{n}\n\n[[ end ]]", 100 + n, 10 + n, model="gpt-4o-mini") for n in range(4)))
    predictor = Predict("question -> answer: int", lm=openai_lm(scripted, fake_retry))
    inputs_batch = [{"question": f"q{n}"} for n in range(4)]

    total_usage = LmUsage()
    results = []
    for input in inputs_batch:  # noqa: A001 - the spec's loop, as written
        result = predictor.forward(input)
        total_usage = total_usage + result.lm_usage
        results.append(result)

    assert [r.answer for r in results] == [0, 1, 2, 3]
    assert sum((r.lm_usage for r in results), LmUsage()) == total_usage
    assert total_usage.total_tokens == sum(110 + 2 * n for n in range(4)) and total_usage.calls == 4
    rows = Ledger(ledger_dir / "ledger.sqlite3").rows()
    assert len(rows) == 4
    assert sum(r.total_tokens for r in rows) == total_usage.total_tokens
    assert sum(r.cost_msats for r in rows) == total_usage.cost_msats > 0  # gpt-4o-mini list price
    assert {r.cost_source for r in rows} == {"price_table"}
    (s,) = dsrs.usage(by="model")
    assert (s.key, s.calls, s.total_tokens, s.cost_msats) == ("openai/gpt-4o-mini", 4, total_usage.total_tokens,
                                                            total_usage.cost_msats)  # fmt: skip


def test_batch_keeps_partial_results_and_the_error(llama_server, ledger_dir):
    lm = LM("llamacpp/gemma-3-270m-pt").with_base_url(llama_server.url + "/v1").with_temperature(0.0)
    qa = Predict("question -> answer", demos=CAPITALS, lm=lm.with_max_tokens(16))
    items = [
        {"question": "What is the capital of France?"},
        {"question": "word " * 5000},  # longer than the server's context window
        {"question": "What is the capital of France?"},
        {"questoin": "typo"},
    ]
    results = qa.batch(items, concurrency=2, progress=True)
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[0].answer == results[2].answer == "Paris"
    assert isinstance(results[1].error, dsrs.ContextWindowExceededError)
    assert isinstance(results[3].error, SignatureError) and "missing input 'question'" in str(results[3].error)
    with pytest.raises(dsrs.ContextWindowExceededError):
        results[1].answer  # noqa: B018 - reading a failed field raises its error
    total = sum((r.lm_usage for r in results), LmUsage())
    assert total.calls == 2 and total == results[0].lm_usage + results[2].lm_usage
    assert len(Ledger(ledger_dir / "ledger.sqlite3").rows()) == 2


async def test_abatch_reports_each_result_as_it_lands(scripted, fake_retry, ledger_dir):
    scripted.script(default=chat_reply("[[ answer ]]\nok\n\n[[ end ]]"))
    seen = []
    qa = Predict("question -> answer", lm=openai_lm(scripted, fake_retry))
    results = await qa.abatch([{"question": str(i)} for i in range(5)], concurrency=3,
                              on_result=lambda i, r: seen.append((i, r.answer)))  # fmt: skip
    assert sorted(seen) == [(i, "ok") for i in range(5)] and [r.answer for r in results] == ["ok"] * 5
    assert len(scripted.requests) == 5


def test_forward_with_lane_needs_a_lane_mux(ledger_dir):
    qa = Predict("question -> answer", lm=embedded())
    with pytest.raises(dsrs.ConfigurationError, match="has no lanes"):
        qa.forward_with_lane({"question": "?"}, "premium")


def test_forward_with_lane_on_a_lane_mux(scripted, fake_retry, ledger_dir):
    from dsrs.lanes import LaneMux

    scripted.script(chat_reply("[[ answer ]]\nParis\n\n[[ end ]]", 20, 2))
    mux = LaneMux().add_lane("premium", openai_lm(scripted, fake_retry)).add_lane("local", embedded())
    qa = Predict("question -> answer", demos=CAPITALS)
    with dsrs.context(mux):
        local = qa.forward_with_lane({"question": "What is the capital of France?"}, "local")
        auto = qa.forward({"question": "What is the capital of France?"})
    assert local.answer == "Paris" and local.lane == "local" and local.completion.provider == "embedded"
    assert local.completion.text == " Paris"  # the pinned lane is a base model: the completion adapter
    assert auto.answer == "Paris" and auto.lane == "premium" and len(scripted.requests) == 1
    rows = Ledger(ledger_dir / "ledger.sqlite3").rows()
    assert [(r.lane, r.provider) for r in rows] == [("local", "embedded"), ("premium", "openai")]
    assert [s.key for s in dsrs.usage(by="lane")] == ["local", "premium"]


def test_bad_inputs_are_clear_typed_errors(ledger_dir):
    with pytest.raises(SignatureError, match="missing input 'question'"):
        Predict("question -> answer", lm=embedded())(questoin="?")
    with pytest.raises(SignatureError, match="a demo lacks \\['answer'\\]"):
        Predict("question -> answer", demos=[{"question": "q"}])
    with pytest.raises(SignatureError, match="reserved"):
        Predict("lm, question -> answer")
    with pytest.raises(SignatureError, match="inputs must be a mapping"):
        Predict("question -> answer", lm=embedded())(["not", "a", "mapping"])
    with dsrs.context(None):
        with pytest.raises(dsrs.ConfigurationError, match="no LM configured"):
            Predict("question -> answer")(question="?")
    with pytest.raises(dsrs.ConfigurationError, match="concurrency"):
        Predict("question -> answer", lm=embedded()).batch([], concurrency=0)


async def test_parse_failure_on_the_embedded_model_carries_usage(ledger_dir):
    # One token is never an integer answer to this question, nor a whole JSON object: a typed error with the raw text.
    qa = Predict("question -> answer: int", demos=[{"question": "How many legs has a cat?", "answer": 4}],
                 adapter=CompletionAdapter(), lm=LM("embedded/gemma-3-270m", temperature=0.0, max_tokens=1))  # fmt: skip
    with pytest.raises(AdapterParseError) as e:
        await qa.aforward(question="What is the capital of France?")
    assert e.value.raw == e.value.attempts[0][1] and e.value.lm_usage.calls == 2
    assert len(Ledger(ledger_dir / "ledger.sqlite3").rows()) == 2


async def test_concurrent_forwards_share_nothing(scripted, fake_retry, ledger_dir):
    scripted.script(default=chat_reply("[[ answer ]]\n1\n\n[[ end ]]", 3, 1))
    qa = Predict("question -> answer: int", lm=openai_lm(scripted, fake_retry))
    rs = await asyncio.gather(*(qa.aforward(question=str(i)) for i in range(8)))
    assert all(r.answer == 1 and r.lm_usage.calls == 1 for r in rs)
    assert len(Ledger(ledger_dir / "ledger.sqlite3").rows()) == 8


def test_lm_errors_propagate_typed(scripted, fake_retry, ledger_dir):
    scripted.script(Reply(429, {"error": {"message": "no credit", "type": "insufficient_quota",
                                          "code": "insufficient_quota"}}))  # fmt: skip
    with pytest.raises(dsrs.QuotaExceededError):
        Predict("question -> answer", lm=openai_lm(scripted, fake_retry))(question="?")


# Whitespace runs that never end in a closing fence: the old fence regex retried each run from every
# position in it (80 KB took ~25 s, 400 KB would take ~10 min); parsing is linear now.
_HOSTILE = "```json\n[1, 2" + " " * 400_000 + ", 3]" + " \n" * 200_000 + "trailing"


@pytest.mark.timeout(60)  # generous on a saturated machine: the linear parse takes milliseconds
def test_code_fence_parsing_is_linear_on_hostile_input():
    from dsrs.predict import ChatAdapter, JSONAdapter, Signature

    sig = Signature.coerce("question -> answer: list[int]")
    assert ChatAdapter().parse(sig, "[[ answer ]]\n" + _HOSTILE) == {"answer": [1, 2, 3]}
    fenced = "```json\n{\"answer\": [1, 2, 3]}" + " \t\n" * 300_000 + "```"
    assert JSONAdapter().parse(sig, fenced) == {"answer": [1, 2, 3]}
    with pytest.raises(AdapterParseError):  # fenced, but no JSON object in it
        JSONAdapter().parse(sig, "```\n" + " " * 400_000 + "x")
