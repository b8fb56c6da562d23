"""The adapter protocol: turn a signature, demos and inputs into a prompt, and the model's text back into typed fields.

Any object with `format` and `parse` is an adapter (`dsrs.configure_with_adapter(lm, MyAdapter())`,
or the class itself). `options(signature, lm)` is optional: request options such as stop
sequences or a response format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ...errors import DsrsError
from ...types import LmUsage, Message
from .. import values
from ..signature import Field, Signature

Prompt = str | list[Message]


class AdapterParseError(DsrsError):
    """The model's answer could not be read back into the signature's fields.

    `raw` is the model's text (of the first attempt), `field` the field that failed (when one did),
    `attempts` each adapter tried with its raw text, `lm_usage` what the attempts cost.
    """

    fallback = False

    def __init__(self, message: str, *, raw: str = "", field: str | None = None, adapter: str | None = None,
                 lm_usage: LmUsage | None = None, attempts: list[tuple[str, str]] | None = None,
                 **kw: Any) -> None:  # fmt: skip
        self.raw = raw
        self.field = field
        self.adapter = adapter
        self.lm_usage = lm_usage if lm_usage is not None else LmUsage()
        self.attempts = attempts if attempts is not None else [(adapter or "", raw)]
        kw.setdefault("hint", "use a stronger model, add demos, or loosen the output types")
        super().__init__(message, **kw)


@runtime_checkable
class Adapter(Protocol):
    def format(self, signature: Signature, inputs: Mapping[str, Any], demos: Sequence[Mapping[str, Any]] = ()) -> Prompt:
        """The prompt: a string (one user message) or a list of messages."""
        ...

    def parse(self, signature: Signature, text: str) -> dict[str, Any]:
        """The output fields, typed. Raise `AdapterParseError` (or ValueError) when the text does not fit."""
        ...


def options(adapter: Any, signature: Signature, lm: Any) -> dict[str, Any]:
    """Request options an adapter asks for (it may not define `options` at all)."""
    fn = getattr(adapter, "options", None)
    return dict(fn(signature, lm)) if fn is not None else {}


def typed(adapter: str, f: Field, value: Any, raw: str) -> Any:
    """One field's value as its type, or the typed parse error."""
    try:
        return values.parse(value, f.type)
    except ValueError as e:
        raise AdapterParseError(f"field {f.name!r}: {e}", raw=raw, field=f.name, adapter=adapter) from None


def describe_fields(signature: Signature) -> str:
    """The fields as a short list for instructions: name (type): description; how to write it."""

    def line(f: Field) -> str:
        extra = "; ".join(x for x in (f.desc, values.hint(f.type) if not f.input else "") if x)
        return f"- {f.name} ({f.type_name})" + (f": {extra}" if extra else "")

    ins = "\n".join(line(f) for f in signature.inputs)
    outs = "\n".join(line(f) for f in signature.outputs)
    return f"Inputs:\n{ins}\nOutputs:\n{outs}"


def marker(name: str) -> str:
    return f"[[ {name} ]]"


def marked(fields: Sequence[Field], row: Mapping[str, Any]) -> str:
    """Fields as `[[ name ]]` blocks."""
    return "\n\n".join(f"{marker(f.name)}\n{values.format(row[f.name])}" for f in fields)
