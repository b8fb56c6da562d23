"""Signatures from strings and classes; typed values read back from model text (with hypothesis round trips)."""

from __future__ import annotations

import json
from typing import Literal, Optional

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsrs.predict import InputField, OutputField, Signature, SignatureError
from dsrs.predict import values


def test_string_signature_fields_and_types():
    sig = Signature("context, question -> answer: float")
    assert [(f.name, f.type, f.input) for f in sig.fields] == [
        ("context", str, True), ("question", str, True), ("answer", float, False)
    ]  # fmt: skip
    assert str(sig) == "context, question -> answer: float"
    assert sig.instructions is None
    assert sig.default_instructions() == "Given `context`, `question`, produce `answer`."


def test_string_signature_generic_types():
    sig = Signature("items: list[int], mood: Literal['up', 'down'] -> best: Optional[int], tags: dict[str, int], ok: bool")
    t = {f.name: f.type for f in sig.fields}
    assert t == {"items": list[int], "mood": Literal["up", "down"], "best": Optional[int], "tags": dict[str, int], "ok": bool}
    assert Signature(str(sig)) == sig  # the string form reads back


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("question answer", "exactly one '->'"),
        ("a -> b -> c", "exactly one '->'"),
        (" -> answer", "no input fields"),
        ("question -> ", "no output fields"),
        ("question -> question", "appears twice"),
        ("1x -> answer", "not a valid field name"),
        ("q -> a: __import__('os')", "cannot read the type"),
        ("q -> a: Foo", "unknown type 'Foo'"),
        ("class -> answer", "not a valid field name"),
    ],
)
def test_bad_string_signatures_are_typed_errors(spec, fragment):
    with pytest.raises(SignatureError) as e:
        Signature(spec)
    assert fragment in str(e.value)


class Person(pydantic.BaseModel):
    name: str
    age: int


class Extract(Signature):
    """Extract the person mentioned in the text."""

    text: str = InputField(desc="a sentence about someone")
    person: Person = OutputField()
    confident: bool = OutputField(desc="sure?")


def test_class_signature_with_docstring_descriptions_and_pydantic():
    sig = Extract()
    assert sig.instructions == "Extract the person mentioned in the text."
    assert [(f.name, f.type, f.desc, f.input) for f in sig.fields] == [
        ("text", str, "a sentence about someone", True), ("person", Person, "", False), ("confident", bool, "sure?", False)
    ]  # fmt: skip
    assert Signature.coerce(Extract) == sig and sig.name == "Extract"
    assert sig.with_instructions("x").instructions == "x" and sig.instructions.startswith("Extract")


def test_class_field_without_marker_is_an_error():
    with pytest.raises(SignatureError, match="needs a value"):

        class Bad(Signature):
            question: str


def test_coerce_rejects_other_things():
    with pytest.raises(SignatureError, match="a signature must be"):
        Signature.coerce(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, tp, expected",
    [
        (" Paris ", str, "Paris"),
        ("42", int, 42),
        ("42.", int, 42),
        ("1,000 people", int, 1000),
        ("-3.5", float, -3.5),
        ("2e3", float, 2000.0),
        ("2.0", int, 2),
        ("Yes", bool, True),
        ("false.", bool, False),
        ("[1, 2, 3]", list[int], [1, 2, 3]),
        ("a, b, c", list[str], ["a", "b", "c"]),
        ("- x\n- y", list[str], ["x", "y"]),
        ("```json\n[1.5]\n```", list[float], [1.5]),
        ("Positive.", Literal["positive", "negative"], "positive"),
        ("none", Optional[int], None),
        ("7", Optional[int], 7),
        ('{"a": 1}', dict[str, int], {"a": 1}),
        ('Here: {"name": "Ada", "age": 36}', Person, Person(name="Ada", age=36)),
        (36, int, 36),
        (True, bool, True),
        ({"name": "Ada", "age": 36}, Person, Person(name="Ada", age=36)),
    ],
)
def test_parse_values(text, tp, expected):
    assert values.parse(text, tp) == expected


@pytest.mark.parametrize(
    "text, tp, fragment",
    [
        ("Paris", int, "expected an integer"),
        ("4.5", int, "expected an integer"),
        ("12abc", int, "expected an integer"),
        ("maybe", bool, "expected true or false"),
        ("neutral", Literal["positive", "negative"], "expected one of"),
        ('{"name": "Ada"}', Person, "not a valid Person"),
        ("no json here", dict, "expected JSON object"),
        (True, int, "got a boolean"),
    ],
)
def test_parse_failures_say_why(text, tp, fragment):
    with pytest.raises(ValueError) as e:
        values.parse(text, tp)
    assert fragment in str(e.value)


def test_schema_of_types():
    assert values.schema(int) == {"type": "integer"}
    assert values.schema(list[float]) == {"type": "array", "items": {"type": "number"}}
    assert values.schema(Literal["a", "b"]) == {"enum": ["a", "b"]}
    assert values.schema(Optional[bool]) == {"anyOf": [{"type": "boolean"}, {"type": "null"}]}
    assert values.schema(Person)["required"] == ["name", "age"]


# -- round trips: what an adapter writes for a value reads back as the same value ----------
@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_int_round_trip(n):
    assert values.parse(values.format(n), int) == n


@given(st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_float_round_trip(x):
    assert values.parse(values.format(x), float) == x


@given(st.booleans())
def test_bool_round_trip(b):
    assert values.parse(values.format(b), bool) is b


@given(st.lists(st.integers(min_value=-1000, max_value=1000)))
def test_list_round_trip(xs):
    assert values.parse(values.format(xs), list[int]) == xs


@given(st.text(min_size=1).filter(lambda s: s.strip() == s and s.strip()))
def test_str_round_trip(s):
    assert values.parse(values.format(s), str) == s


@given(st.builds(Person, name=st.text(max_size=20), age=st.integers(0, 150)))
def test_pydantic_round_trip(p):
    assert values.parse(values.format(p), Person) == p


@given(st.dictionaries(st.text(max_size=8), st.integers()))
def test_dict_round_trip(d):
    assert values.parse(json.dumps(d), dict[str, int]) == d


@given(st.lists(st.integers(), min_size=1), st.booleans())
def test_string_signature_round_trip(names_seed, with_type):
    names = [f"f{abs(n)}_{i}" for i, n in enumerate(names_seed)]
    inputs, outputs = names[: max(1, len(names) // 2)], names[max(1, len(names) // 2) :] or ["out"]
    spec = ", ".join(inputs) + " -> " + ", ".join(f"{o}: int" if with_type else o for o in outputs)
    sig = Signature(spec)
    assert Signature(str(sig)) == sig
    assert [f.name for f in sig.inputs] == inputs and [f.name for f in sig.outputs] == outputs


# -- adapters read back exactly what they write (the demo formats) --------------------------
_line = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=30).filter(
    lambda s: s.strip() == s and "[[" not in s and "]]" not in s
)


@given(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.lists(st.integers(), max_size=5), _line)
def test_adapters_read_back_what_they_write(n, x, b, xs, s):
    from dsrs.predict import ChatAdapter, CompletionAdapter, JSONAdapter
    from dsrs.predict.adapters.base import marked
    from dsrs.predict.adapters.completion import block

    sig = Signature("q -> n: int, x: float, b: bool, xs: list[int], s: str")
    row = {"n": n, "x": x, "b": b, "xs": xs, "s": s}
    assert ChatAdapter().parse(sig, marked(sig.outputs, row) + "\n\n[[ end ]]") == row
    assert JSONAdapter().parse(sig, json.dumps(row)) == row
    written = block(sig.outputs, row)
    assert CompletionAdapter().parse(sig, written[len("N:") :]) == row


def test_class_signatures_inherit_fields():
    class Base(Signature):
        """Answer."""

        question: str = InputField()
        answer: str = OutputField()

    class WithContext(Base):
        context: str = InputField(desc="background")

    sig = WithContext()
    assert [(f.name, f.input) for f in sig.fields] == [("question", True), ("answer", False), ("context", True)]
    assert [f.name for f in sig.inputs] == ["question", "context"] and sig.instructions == "Answer."
    with pytest.raises(SignatureError, match="needs a type"):

        class Untyped(Signature):
            question = InputField()
