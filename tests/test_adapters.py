"""Adapters: the exact prompts they send (scripted OpenAI-wire server), typed parsing, the JSON retry,
and each adapter answering for real on the embedded Gemma and the llama.cpp server."""

from __future__ import annotations

import json
from typing import Literal

import pydantic
import pytest

import dsrs
from dsrs import LM
from dsrs.predict import (Adapter, AdapterParseError, ChatAdapter, CompletionAdapter, InputField, JSONAdapter,
                          OutputField, Predict, Signature)  # fmt: skip
from dsrs.predict.adapters import is_base_model, resolve
from scripted import chat_reply

CAPITALS = [
    {"question": "What is the capital of Germany?", "answer": "Berlin"},
    {"question": "What is the capital of Japan?", "answer": "Tokyo"},
]


def openai_lm(scripted, fake_retry, **kw):
    return LM("openai/gpt-4o-mini", base_url=scripted.url + "/v1", api_key="sk-test", retry_policy=fake_retry, **kw)


CHAT_SYSTEM = (
    "Given `question`, produce `answer`.\n\n"
    "Inputs:\n- question (str)\nOutputs:\n- answer (int): an integer\n\n"
    "Reply with each output under its marker line, in this order, then [[ end ]]:\n\n"
    "[[ answer ]]\n<answer>\n\n[[ end ]]"
)


async def test_chat_adapter_sends_exactly_these_messages_and_parses_typed(scripted, fake_retry):
    scripted.script(chat_reply("[[ answer ]]\n42\n\n[[ end ]]", 50, 9))
    qa = Predict("question -> answer: int", demos=[{"question": "What is 2 plus 2?", "answer": 4}], adapter=ChatAdapter())
    r = await qa.aforward({"question": "What is 6 times 7?"}, lm=openai_lm(scripted, fake_retry))
    assert r.answer == 42 and isinstance(r.answer, int)
    (seen,) = scripted.requests
    assert seen.path == "/v1/chat/completions"
    ask = "\n\nReply with [[ answer ]], then [[ end ]]."
    assert seen.json["messages"] == [
        {"role": "system", "content": CHAT_SYSTEM},
        {"role": "user", "content": "[[ question ]]\nWhat is 2 plus 2?" + ask},
        {"role": "assistant", "content": "[[ answer ]]\n4\n\n[[ end ]]"},
        {"role": "user", "content": "[[ question ]]\nWhat is 6 times 7?" + ask},
    ]
    assert "response_format" not in seen.json and "stop" not in seen.json
    assert (r.lm_usage.prompt_tokens, r.lm_usage.completion_tokens, r.lm_usage.calls) == (50, 9, 1)
    assert r.lm_usage.cost_msats is not None and r.lm_usage.cost_msats > 0  # gpt-4o-mini has a list price


async def test_json_adapter_sends_schema_when_supported(scripted, fake_retry):
    scripted.script(chat_reply('{"answer": 42}'))
    r = await Predict("question -> answer: int", adapter=JSONAdapter()).aforward(
        question="What is 6 times 7?", lm=openai_lm(scripted, fake_retry)
    )
    assert r.answer == 42
    (seen,) = scripted.requests
    assert seen.json["messages"] == [
        {"role": "system", "content": "Given `question`, produce `answer`.\n\nInputs:\n- question (str)\nOutputs:\n"
         "- answer (int): an integer\n\nReply with one JSON object with exactly the keys \"answer\", and nothing else."},
        {"role": "user", "content": "[[ question ]]\nWhat is 6 times 7?"},
    ]  # fmt: skip
    assert seen.json["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Signature", "schema": {
            "type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
            "additionalProperties": False}},
    }  # fmt: skip


async def test_chat_parse_failure_retries_once_with_json(scripted, fake_retry):
    scripted.script(chat_reply("The answer is forty-two.", 30, 6), chat_reply('{"answer": 42}', 40, 5))
    r = await Predict("question -> answer: int").aforward(question="6*7?", lm=openai_lm(scripted, fake_retry))
    assert r.answer == 42
    first, second = scripted.requests
    assert first.json["messages"][0]["content"].startswith("Given `question`") and "[[ answer ]]" in first.json["messages"][0]["content"]
    assert "JSON object" in second.json["messages"][0]["content"] and "response_format" in second.json
    assert (r.lm_usage.prompt_tokens, r.lm_usage.completion_tokens, r.lm_usage.calls) == (70, 11, 2)


async def test_parse_failure_after_json_retry_is_typed_and_carries_raw_text(scripted, fake_retry):
    scripted.script(chat_reply("no markers here", 10, 3), chat_reply("still not json", 12, 4))
    with pytest.raises(AdapterParseError) as e:
        await Predict("question -> answer: int").aforward(question="?", lm=openai_lm(scripted, fake_retry))
    err = e.value
    assert err.raw == "no markers here"
    assert err.attempts == [("chat", "no markers here"), ("json", "still not json")]
    assert "no [[ answer ]] section" in str(err) and "JSON adapter" in str(err)
    assert (err.lm_usage.total_tokens, err.lm_usage.calls) == (29, 2)
    assert err.provider == "openai" and isinstance(err, dsrs.DsrsError)


async def test_json_adapter_failure_is_not_retried(scripted, fake_retry):
    scripted.script(chat_reply('{"answer": "many"}'))
    with pytest.raises(AdapterParseError) as e:
        await Predict("question -> answer: int", adapter=JSONAdapter()).aforward(question="?", lm=openai_lm(scripted, fake_retry))
    assert len(scripted.requests) == 1 and e.value.field == "answer" and "expected an integer" in str(e.value)


class Person(pydantic.BaseModel):
    name: str
    age: int


class Typed(Signature):
    """Read the facts."""

    text: str = InputField()
    count: int = OutputField()
    ratio: float = OutputField()
    ok: bool = OutputField()
    tags: list[str] = OutputField()
    mood: Literal["happy", "sad"] = OutputField()
    person: Person = OutputField(desc="who")


TYPED_CHAT = """[[ count ]]
3

[[ ratio ]]
0.75

[[ ok ]]
yes

[[ tags ]]
["a", "b"]

[[ mood ]]
Happy

[[ person ]]
{"name": "Ada", "age": 36}

[[ end ]]"""


@pytest.mark.parametrize(
    "adapter, text",
    [
        (ChatAdapter(), TYPED_CHAT),
        (JSONAdapter(), json.dumps({"count": 3, "ratio": 0.75, "ok": True, "tags": ["a", "b"], "mood": "happy",
                                    "person": {"name": "Ada", "age": 36}})),  # fmt: skip
    ],
)
async def test_typed_outputs(scripted, fake_retry, adapter, text):
    scripted.script(chat_reply(text))
    r = await Predict(Typed, adapter=adapter).aforward(text="...", lm=openai_lm(scripted, fake_retry))
    assert r.to_dict() == {"count": 3, "ratio": 0.75, "ok": True, "tags": ["a", "b"], "mood": "happy",
                           "person": Person(name="Ada", age=36)}  # fmt: skip
    system = scripted.requests[0].json["messages"][0]["content"]
    assert system.startswith("Read the facts.")
    assert "- mood (Literal['happy', 'sad']): one of: happy, sad" in system
    assert "- person (Person): who; JSON matching the schema" in system
    if isinstance(adapter, JSONAdapter):
        schema = scripted.requests[0].json["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["mood"] == {"enum": ["happy", "sad"]}
        assert schema["properties"]["person"]["required"] == ["name", "age"]


def test_completion_adapter_prompt_stop_and_parse():
    a = CompletionAdapter()
    sig = Signature("question -> answer")
    assert a.format(sig, {"question": "What is the capital of France?"}, CAPITALS) == (
        "Question: What is the capital of Germany?\nAnswer: Berlin\n\n"
        "Question: What is the capital of Japan?\nAnswer: Tokyo\n\n"
        "Question: What is the capital of France?\nAnswer:"
    )
    assert a.options(sig, None) == {"stop": ("\n",)}
    assert a.parse(sig, " Paris") == {"answer": "Paris"}
    two = Signature("city_name -> country, population: int", instructions="Facts about cities.")
    assert a.format(two, {"city_name": "Lyon"}) == "Facts about cities.\n\nCity Name: Lyon\nCountry:"
    assert a.options(two, None) == {"stop": ("\n\n", "\nCity Name:")}
    assert a.parse(two, " France\nPopulation: 522,000") == {"country": "France", "population": 522000}
    with pytest.raises(AdapterParseError, match="no value for 'Population'"):
        a.parse(two, " France")


def test_adapter_choice():
    assert is_base_model(LM("embedded/gemma-3-270m"))
    assert is_base_model(LM("llamacpp/gemma-3-270m-pt")) and is_base_model(LM("ollama/llama3-8b-base"))
    assert not is_base_model(LM("llamacpp/gemma-3-270m-it")) and not is_base_model(LM("gpt-4o"))
    assert isinstance(resolve(None, LM("embedded/gemma-3-270m")), CompletionAdapter)
    assert isinstance(resolve(None, LM("gpt-4o")), ChatAdapter)
    assert isinstance(resolve(JSONAdapter, LM("gpt-4o")), JSONAdapter)  # a class, as in the spec
    with pytest.raises(dsrs.ConfigurationError, match="is not an adapter"):
        resolve(object(), LM("gpt-4o"))


class Shouty:
    """A user adapter: the protocol is just format and parse."""

    def format(self, signature, inputs, demos=()):
        return "SAY IT LOUD: " + inputs["question"]

    def parse(self, signature, text):
        return {"answer": text.upper()}


async def test_configure_with_adapter_uses_a_user_adapter(scripted, fake_retry):
    assert isinstance(Shouty(), Adapter)
    scripted.script(chat_reply("paris"))
    before = dsrs.settings.current()
    dsrs.configure_with_adapter(openai_lm(scripted, fake_retry), Shouty)  # the class, like the spec's unit struct
    try:
        r = await Predict("question -> answer").aforward(question="capital of France?")
    finally:
        dsrs.configure(before.lm, adapter=before.adapter)
    assert r.answer == "PARIS"
    assert scripted.requests[0].json["messages"] == [{"role": "user", "content": "SAY IT LOUD: capital of France?"}]


# -- the real model: every adapter answers the capital-city question -----------------------
@pytest.mark.parametrize("adapter", [ChatAdapter(), JSONAdapter(), CompletionAdapter()], ids=lambda a: a.name)
async def test_each_adapter_on_the_embedded_model(adapter):
    lm = LM("embedded/gemma-3-270m", temperature=0.0, max_tokens=40)
    qa = Predict("question -> answer", demos=CAPITALS, adapter=adapter)
    r = await qa.aforward(question="What is the capital of France?", lm=lm)
    assert r.answer == "Paris"
    assert r.lm_usage.calls == 1 and r.lm_usage.cost_msats == 0 and r.lm_usage.prompt_tokens > 20


@pytest.mark.parametrize("adapter", [ChatAdapter(), JSONAdapter(), CompletionAdapter()], ids=lambda a: a.name)
async def test_each_adapter_on_the_llama_cpp_server(llama_server, adapter):
    lm = LM("llamacpp/gemma").with_base_url(llama_server.url + "/v1").with_temperature(0.0).with_max_tokens(40)
    qa = Predict("question -> answer", demos=CAPITALS, adapter=adapter)
    r = await qa.aforward(question="What is the capital of France?", lm=lm)
    assert r.answer == "Paris"
    assert r.lm_usage.calls == 1 and r.lm_usage.prompt_tokens > 20 and r.completion.provider == "llamacpp"


def test_an_unpinned_mux_of_base_models_uses_the_completion_adapter():
    from dsrs import LM, LaneMux
    from dsrs.predict.adapters import is_base_model

    base = LaneMux().add_lane("a", LM("embedded/gemma-3-270m")).add_lane("b", LM("llamacpp/llama-3-8b-base"))
    mixed = base.add_lane("chat", LM("openai/gpt-4o-mini", api_key="k"))
    assert is_base_model(base) and not is_base_model(mixed)
    assert is_base_model(mixed.with_lane("a")) and not is_base_model(mixed.with_lane("chat"))
