"""Signatures: what a program takes and what it returns, as typed, described fields.

From a string: `Signature("context, question -> answer: float")`.
From a class (the docstring is the instructions):

    class QA(Signature):
        \"\"\"Answer with one word.\"\"\"
        question: str = InputField(desc="a factual question")
        answer: str = OutputField()
"""

from __future__ import annotations

import ast
import inspect
import keyword
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from ..errors import ConfigurationError


class SignatureError(ConfigurationError):
    """A signature, its inputs or its demos are malformed; nothing was sent."""


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: Any = str
    desc: str = ""
    input: bool = True

    @property
    def label(self) -> str:
        """`question` -> `Question`, `context_text` -> `Context Text` (the `Field: value` prefix)."""
        return " ".join(w.capitalize() for w in self.name.split("_") if w) or self.name

    @property
    def type_name(self) -> str:
        return type_name(self.type)


@dataclass(frozen=True, slots=True)
class _Marker:
    input: bool
    desc: str


def InputField(desc: str = "") -> Any:  # noqa: N802 - reads like a type in class bodies
    return _Marker(True, desc)


def OutputField(desc: str = "") -> Any:  # noqa: N802
    return _Marker(False, desc)


class Signature:
    """Input and output fields plus instructions. Immutable; compare by value."""

    _class_fields: tuple[Field, ...] = ()
    _class_instructions: str | None = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        hints = typing.get_type_hints(cls)
        own = inspect.get_annotations(cls)
        for name in own:
            if not isinstance(cls.__dict__.get(name), _Marker):
                raise SignatureError(
                    f"field {name!r} of {cls.__name__} needs a value: InputField() or OutputField()",
                    hint=f"write `{name}: {type_name(hints[name])} = InputField()`",
                )
        fields = {f.name: f for f in cls._class_fields}  # inherited first, overridable
        for name, marker in cls.__dict__.items():
            if isinstance(marker, _Marker):
                if name not in own:
                    raise SignatureError(f"field {name!r} of {cls.__name__} needs a type", hint=f"write `{name}: str = ...`")
                fields[name] = Field(name, hints[name], marker.desc, marker.input)
        cls._class_fields = tuple(fields.values())
        cls._class_instructions = (cls.__doc__ or "").strip() or cls._class_instructions

    def __init__(self, spec: str | None = None, instructions: str | None = None, name: str | None = None) -> None:
        if spec is None:
            fields = type(self)._class_fields
            if not fields:
                raise SignatureError("an empty signature", hint='write Signature("question -> answer") or subclass it')
        else:
            fields = parse_spec(spec)
        _check(fields, spec or type(self).__name__)
        self.fields = fields
        self.instructions = instructions if instructions is not None else type(self)._class_instructions
        self.name = name or (type(self).__name__ if spec is None else "Signature")

    @property
    def inputs(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.input)

    @property
    def outputs(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.input)

    def with_instructions(self, text: str) -> Signature:
        new = object.__new__(type(self))
        new.fields, new.instructions, new.name = self.fields, text, self.name
        return new

    def default_instructions(self) -> str:
        ins = ", ".join(f"`{f.name}`" for f in self.inputs)
        outs = ", ".join(f"`{f.name}`" for f in self.outputs)
        return f"Given {ins}, produce {outs}."

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signature) and (self.fields, self.instructions) == (other.fields, other.instructions)

    def __hash__(self) -> int:
        return hash((self.fields, self.instructions))

    def __str__(self) -> str:
        def side(fs: tuple[Field, ...]) -> str:
            return ", ".join(f.name if f.type is str else f"{f.name}: {f.type_name}" for f in fs)

        return f"{side(self.inputs)} -> {side(self.outputs)}"

    def __repr__(self) -> str:
        return f"{self.name}({str(self)!r})"

    @staticmethod
    def coerce(x: Signature | type[Signature] | str) -> Signature:
        if isinstance(x, Signature):
            return x
        if isinstance(x, str):
            return Signature(x)
        if isinstance(x, type) and issubclass(x, Signature):
            return x()
        raise SignatureError(
            f"a signature must be a string like 'question -> answer' or a Signature, got {x!r:.80}"
        )


def _check(fields: tuple[Field, ...], where: str) -> None:
    names = [f.name for f in fields]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SignatureError(f"field {sorted(dup)[0]!r} appears twice in {where!r}")
    if not any(f.input for f in fields):
        raise SignatureError(f"no input fields in {where!r}", hint="write 'inputs -> outputs'")
    if all(f.input for f in fields):
        raise SignatureError(f"no output fields in {where!r}", hint="write 'inputs -> outputs'")


# -- the string form ------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[Field, ...]:
    if not isinstance(spec, str) or spec.count("->") != 1:
        raise SignatureError(
            f"a signature string needs exactly one '->', got {spec!r:.80}", hint="e.g. 'context, question -> answer'"
        )
    left, right = spec.split("->")
    return tuple(_side(left, True, spec)) + tuple(_side(right, False, spec))


def _side(text: str, is_input: bool, spec: str) -> list[Field]:
    out = []
    for part in _split_top(text):
        name, _, tp = part.partition(":")
        name = name.strip()
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise SignatureError(f"{name!r} is not a valid field name in {spec!r}", hint="use identifiers: `question`")
        out.append(Field(name, parse_type(tp.strip(), spec) if tp.strip() else str, "", is_input))
    if not out:
        raise SignatureError(f"no {'input' if is_input else 'output'} fields in {spec!r}")
    return out


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, depth, cur, quote = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


_TYPE_NAMES: dict[str, Any] = {
    "str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict,
    "List": list, "Dict": dict, "Literal": Literal, "Optional": Optional, "Any": Any,
}  # fmt: skip


def parse_type(text: str, spec: str = "") -> Any:
    """`list[int]`, `Literal['a', 'b']`, `Optional[float]`... evaluated from a whitelist, never `eval`."""
    try:
        node = ast.parse(text, mode="eval").body
        return _eval_type(node)
    except (SyntaxError, ValueError, TypeError) as e:
        raise SignatureError(
            f"cannot read the type {text!r} in {spec!r} ({e})",
            hint="types: str, int, float, bool, list[T], dict[str, T], Literal[...], Optional[T]",
        ) from None


def _eval_type(node: ast.expr) -> Any:
    if isinstance(node, ast.Name):
        if node.id not in _TYPE_NAMES:
            raise ValueError(f"unknown type {node.id!r}")
        return _TYPE_NAMES[node.id]
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float, bool))):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_eval_type(e) for e in node.elts)
    if isinstance(node, ast.Subscript):
        base = _eval_type(node.value)
        arg = _eval_type(node.slice)
        if base is Literal:
            return Literal[arg if isinstance(arg, tuple) else (arg,)]
        return base[arg]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return Union[_eval_type(node.left), _eval_type(node.right)]  # noqa: UP007
    raise ValueError("unsupported syntax")


def type_name(tp: Any) -> str:
    """The type as the string form writes it (`list[int]`, `Optional[str]`, `Literal['a', 'b']`)."""
    if tp is None or tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 < len(args):
            return f"Optional[{type_name(rest[0])}]"
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))
