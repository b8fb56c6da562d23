"""What the native wire modules share: tool choice, output schema, tool-call arguments, refusals.

Normal forms (see `dsrs.types`): `Request.tool_choice` is OpenAI's ("auto" | "none" | "required"
| {"type": "function", "function": {"name": ...}}); `Request.response_format` is OpenAI chat's
({"type": "json_object"} | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}).
Each wire module maps these to its own spelling with the helpers here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NoReturn

from .. import errors
from ..types import Message, ToolCall


@dataclass(frozen=True, slots=True)
class Output:
    """A structured-output request: `schema` None means "any JSON object"."""

    schema: dict[str, Any] | None
    name: str = "output"
    strict: bool | None = None


def output(response_format: dict[str, Any] | None) -> Output | None:
    """The normal form of `Request.response_format`, or None for plain text."""
    rf = response_format
    if not rf or rf.get("type") == "text":
        return None
    if rf.get("type") == "json_object":
        return Output(None)
    if rf.get("type") == "json_schema":
        js = rf.get("json_schema") or {}
        schema = js.get("schema")
        if not isinstance(schema, dict):
            raise errors.ConfigurationError(
                "response_format json_schema has no 'schema' object",
                hint="pass {'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}",
            )
        return Output(schema, js.get("name") or "output", js.get("strict"))
    raise errors.ConfigurationError(
        f"unknown response_format type {rf.get('type')!r}", hint="use 'text', 'json_object' or 'json_schema'"
    )


def tool_choice(choice: str | dict[str, Any] | None) -> tuple[str, str | None] | None:
    """("auto" | "none" | "required" | "tool", tool name or None), or None when unset."""
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice in ("auto", "none", "required"):
            return choice, None
        if choice == "any":
            return "required", None
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if name:
            return "tool", name
        if choice.get("type") in ("auto", "none", "required"):
            return choice["type"], None
    raise errors.ConfigurationError(
        f"unknown tool_choice {choice!r}",
        hint="use 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
    )


def tool_call(call_id: str, name: str, arguments: Any) -> ToolCall:
    """A ToolCall from arguments given as an object or as JSON text (kept raw when it does not parse)."""
    if isinstance(arguments, dict):
        return ToolCall(call_id, name, arguments)
    if arguments is None or arguments == "":
        return ToolCall(call_id, name, {})
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError):
        return ToolCall(call_id, name, {}, raw_arguments=str(arguments))
    if not isinstance(parsed, dict):
        return ToolCall(call_id, name, {}, raw_arguments=str(arguments))
    return ToolCall(call_id, name, parsed)


def tool_names(messages: tuple[Message, ...]) -> dict[str, str]:
    """Tool name by call id, from the assistant turns (for protocols whose tool results carry a name)."""
    return {t.id: t.name for m in messages for t in m.tool_calls}


def reasoning(provider: str, blocks: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """`Completion.reasoning`: the provider's raw reasoning blocks, tagged with the provider."""
    return tuple({"provider": provider, "block": b} for b in blocks)


def own_reasoning(m: Message, provider: str) -> list[dict[str, Any]]:
    """The raw blocks of `m.reasoning` this provider produced (another provider's are never sent)."""
    return [r["block"] for r in m.reasoning if isinstance(r, dict) and r.get("provider") == provider and "block" in r]


def system_text(messages: tuple[Message, ...]) -> str | None:
    """All system messages joined, for protocols with one top-level system/instructions field."""
    parts = [m.content for m in messages if m.role == "system"]
    return "\n\n".join(parts) if parts else None


def refuse(provider: str, model: str, what: str, hint: str | None = None) -> NoReturn:
    raise errors.UnsupportedFeatureError(
        f"the {provider} protocol does not support {what}", provider=provider, model=model, hint=hint
    )


def chunk(data: str, provider: str, model: str) -> Any:
    """One JSON item of a stream, or a typed error when it is not JSON."""
    try:
        return json.loads(data)
    except ValueError:
        raise errors.ResponseFormatError(f"bad stream chunk: {data[:80]!r}", provider=provider, model=model) from None


def stream_cut(provider: str, model: str) -> errors.ResponseFormatError:
    return errors.ResponseFormatError("the stream ended before it finished", provider=provider, model=model)


def malformed(payload: Any, what: str, provider: str, model: str) -> errors.ResponseFormatError:
    return errors.ResponseFormatError(f"not {what}: {str(payload)[:120]}", provider=provider, model=model)
