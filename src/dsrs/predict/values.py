"""Typed values: read a model's text back into a field's type, write values into prompts, describe types as JSON schema.

Supported: str, int, float, bool, list[T], dict, Literal[...], Optional[T], pydantic models.
`parse` raises ValueError with a short reason; adapters turn that into `AdapterParseError`.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any, Literal, Union

_FENCE_OPEN = re.compile(r"```[a-zA-Z]*\s*")
_NUMBER = re.compile(r"[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?([eE][-+]?\d+)?")
_TRUE = {"true", "yes", "y", "1"}
_FALSE = {"false", "no", "n", "0"}


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_validate") and hasattr(tp, "model_json_schema")


def _optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, (args[0] if len(args) == 1 else Union[tuple(args)])  # noqa: UP007
    return False, tp


def _clean(text: str) -> str:
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"`":
        t = t[1:-1].strip()
    return t


def _number(text: str, tp: type) -> int | float:
    """A number at the start of the text ("42", "1,000", "3.5 kg"); int refuses fractions."""
    t = _clean(text)
    m = _NUMBER.match(t)
    rest = t[m.end() :] if m else ""
    if not m or (rest and (rest[0].isalnum() or rest[0] == "_")):
        raise ValueError(f"expected {'an integer' if tp is int else 'a number'}, got {text.strip()[:60]!r}")
    digits = m.group(0).replace(",", "")
    if tp is int:
        if re.fullmatch(r"[-+]?\d+", digits):
            return int(digits)
        v = float(digits)
        if not v.is_integer():
            raise ValueError(f"expected an integer, got {m.group(0)!r}")
        return int(v)
    return float(digits)


def _unfence(t: str) -> str:
    """`t` (stripped, starting with ```) without its opening fence, language tag and closing fence.

    Linear in len(t). A regex for the closing fence (optional whitespace, fence, end) retried
    every whitespace run from every position in it: 80 KB of spaces took ~25 s."""
    t = t[_FENCE_OPEN.match(t).end() :]  # type: ignore[union-attr]  # always matches: t starts with ```
    if t.endswith("```"):
        t = t[:-3].rstrip()
    return t


def _json(text: str, opener: str) -> Any:
    """The first JSON array/object in the text (code fences and text around it are ignored)."""
    t = text.strip()
    if t.startswith("```"):
        t = _unfence(t)
    a = t.find(opener)
    if a < 0:
        raise ValueError(f"expected JSON {'array' if opener == '[' else 'object'}, got {text.strip()[:60]!r}")
    return json.JSONDecoder().raw_decode(t, a)[0]


def parse(value: Any, tp: Any) -> Any:
    """`value` (usually the model's text for a field) as an instance of `tp`."""
    if tp is Any:
        return value
    opt, inner = _optional(tp)
    if opt:
        if value is None or (isinstance(value, str) and _clean(value).lower() in ("", "none", "null", "n/a")):
            return None
        return parse(value, inner)
    tp = inner
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errs = []
        for arg in typing.get_args(tp):
            try:
                return parse(value, arg)
            except ValueError as e:
                errs.append(str(e))
        raise ValueError("; ".join(errs))
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if type(value) is type(c) and value == c:
                return c
        t = _clean(str(value)).rstrip(".").strip()
        for c in choices:
            if str(c) == t:
                return c
        for c in choices:
            if str(c).lower() == t.lower():
                return c
        raise ValueError(f"expected one of {list(choices)}, got {str(value).strip()[:60]!r}")
    if tp is str:
        return value.strip() if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if tp is bool:
        if isinstance(value, bool):
            return value
        t = _clean(str(value)).rstrip(".").strip().lower()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {str(value).strip()[:60]!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"expected {tp.__name__}, got a boolean")
        if isinstance(value, (int, float)):
            if tp is int and not float(value).is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return tp(value)
        return _number(str(value), tp)
    if tp is list or origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        items = value if isinstance(value, list) else _list_items(str(value))
        return [parse(x, item) if not (isinstance(x, str) and item is Any) else x for x in items]
    if tp is dict or origin is dict:
        d = value if isinstance(value, dict) else _json(str(value), "{")
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        args = typing.get_args(tp)
        return {k: parse(v, args[1]) for k, v in d.items()} if args else d
    if _is_model(tp):
        try:
            if isinstance(value, dict):
                return tp.model_validate(value)
            return tp.model_validate(_json(str(value), "{"))
        except Exception as e:  # pydantic.ValidationError or a JSON error
            raise ValueError(f"not a valid {tp.__name__}: {str(e).splitlines()[0][:120]}") from None
    raise ValueError(f"cannot parse values of type {tp!r}")


def _list_items(text: str) -> list[Any]:
    t = text.strip()
    if t.startswith("[") or t.startswith("```"):
        v = _json(t, "[")
        if not isinstance(v, list):
            raise ValueError("expected a JSON array")
        return v
    lines = [ln.strip() for ln in t.splitlines() if ln.strip()]
    if len(lines) > 1:
        return [re.sub(r"^([-*•]|\d+[.)])\s+", "", ln) for ln in lines]
    return [x.strip() for x in t.split(",") if x.strip()] if t else []


def format(value: Any) -> str:  # noqa: A001 - the module's verb
    """A value as prompt text: strings as they are, everything else as JSON."""
    if isinstance(value, str):
        return value
    if hasattr(value, "model_dump_json"):
        return str(value.model_dump_json())
    return json.dumps(jsonable(value), ensure_ascii=False)


def jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def schema(tp: Any) -> dict[str, Any]:
    """A JSON schema for a field type."""
    opt, inner = _optional(tp)
    if opt:
        return {"anyOf": [schema(inner), {"type": "null"}]}
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is list or origin is list:
        args = typing.get_args(tp)
        return {"type": "array", "items": schema(args[0])} if args and args[0] is not Any else {"type": "array"}
    if tp is dict or origin is dict:
        return {"type": "object"}
    if _is_model(tp):
        return dict(tp.model_json_schema())
    return {}


def hint(tp: Any) -> str:
    """A short note for prompts on how to write a value of this type ('' for plain text)."""
    opt, inner = _optional(tp)
    if typing.get_origin(inner) is Literal:
        return "one of: " + ", ".join(str(c) for c in typing.get_args(inner))
    if inner is str:
        return ""
    if inner is int:
        return "an integer"
    if inner is float:
        return "a number"
    if inner is bool:
        return "true or false"
    return "JSON matching the schema " + json.dumps(schema(inner), separators=(",", ":"))
