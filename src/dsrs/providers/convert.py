"""What the native wire modules share: tool choice, output schema, tool-call arguments, refusals.

Normal forms (see `dsrs.types`): `Request.tool_choice` is OpenAI's ("auto" | "none" | "required"
| {"type": "function", "function": {"name": ...}}); `Request.response_format` is OpenAI chat's
({"type": "json_object"} | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}).
Each wire module maps these to its own spelling with the helpers here.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, NoReturn

from .. import errors
from ..types import Message, Tool, ToolCall


@dataclass(frozen=True, slots=True)
class Output:
    """A structured-output request: `schema` None means "any JSON object"."""

    schema: dict[str, Any] | None
    name: str = "output"
    strict: bool | None = None


def output(response_format: dict[str, Any] | None) -> Output | None:
    """The normal form of `Request.response_format`, or None for plain text."""
    rf = response_format
    if rf is not None and not isinstance(rf, dict):
        raise errors.ConfigurationError(f"unknown response_format {rf!r:.80}",
                                        hint="pass {'type': 'json_object'} or {'type': 'json_schema', ...}")
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


_MODES = {"auto": "auto", "none": "none", "required": "required", "any": "required"}


def tool_choice(choice: str | dict[str, Any] | None) -> tuple[str, str | None] | None:
    """("auto" | "none" | "required" | "tool", tool name or None), or None when unset.

    Accepts every common spelling: "auto" | "none" | "required" | "any" (Anthropic), OpenAI chat's
    {"type": "function", "function": {"name": ...}}, Responses' {"type": "function", "name": ...},
    Anthropic's {"type": "tool", "name": ...} / {"type": "auto" | "any" | "none"}, and {"name": ...}."""
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _MODES:
        return _MODES[choice], None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if isinstance(name, str) and name and choice.get("type", "function") in ("function", "tool"):
            return "tool", name
        if set(choice) == {"type"} and choice["type"] in _MODES:
            return _MODES[choice["type"]], None
    raise errors.ConfigurationError(
        f"unknown tool_choice {choice!r:.120}",
        hint="use 'auto', 'none', 'required' ('any'), {'type': 'function', 'function': {'name': ...}}, "
        "{'type': 'tool', 'name': ...} or {'name': ...}",
    )


def normal_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """`Request.tool_choice` in its one normal form (OpenAI chat's), whatever spelling was given."""
    c = tool_choice(choice)
    if c is None or c[0] != "tool":
        return None if c is None else c[0]
    return {"type": "function", "function": {"name": c[1]}}


_TOOL_HINT = ("pass dsrs.Tool(name, description, parameters), {'type': 'function', 'function': {'name', "
              "'description', 'parameters'}} (OpenAI), {'name', 'description', 'input_schema'} (Anthropic) "
              "or {'name', 'description', 'parameters'}")  # fmt: skip


def tool(t: Any) -> Tool:
    """A `Tool` from a Tool, an OpenAI chat / Responses / Anthropic tool dict, or {name, description, parameters}."""
    if isinstance(t, Tool):
        return t
    if not isinstance(t, dict):
        raise errors.ConfigurationError(f"a tool must be a dsrs.Tool or a dict, got {t!r:.80}", hint=_TOOL_HINT)
    d = t
    if d.get("type") == "function" and isinstance(d.get("function"), dict) and set(d) == {"type", "function"}:
        d = d["function"]  # OpenAI chat
    elif d.get("type") in ("function", "custom"):  # Responses, Anthropic custom tools
        d = {k: v for k, v in d.items() if k != "type"}
    schema_keys = [k for k in ("parameters", "input_schema", "parametersJsonSchema") if k in d]
    unknown = set(d) - {"name", "description", *schema_keys}
    name, desc = d.get("name"), d.get("description") or ""
    params = d[schema_keys[0]] if len(schema_keys) == 1 else {"type": "object", "properties": {}}
    if unknown or len(schema_keys) > 1 or not isinstance(name, str) or not name or not isinstance(desc, str) \
            or not isinstance(params, dict):  # fmt: skip
        what = f" (unknown keys: {', '.join(sorted(unknown))})" if unknown else ""
        raise errors.ConfigurationError(f"cannot read tool {t!r:.120}{what}", hint=_TOOL_HINT)
    return Tool(name, desc, params)


def response_format(rf: Any) -> dict[str, Any] | None:
    """`Request.response_format` from a dict (checked) or a pydantic model class (its JSON schema)."""
    if rf is None or isinstance(rf, dict):
        output(rf)  # a bad dict is a ConfigurationError now, before anything is sent
        return rf
    if isinstance(rf, type) and callable(schema := getattr(rf, "model_json_schema", None)):  # pydantic v2, never imported here
        return {"type": "json_schema", "json_schema": {"name": rf.__name__, "schema": schema()}}
    raise errors.ConfigurationError(
        f"unknown response_format {rf!r:.80}",
        hint="pass a pydantic model class, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}",
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


def synthetic_id(prefix: str) -> str:
    """A call id for a protocol that gives none (Gemini, Ollama): unique across turns and conversations."""
    return prefix + uuid.uuid4().hex[:24]


def tool_names(messages: tuple[Message, ...]) -> list[str | None]:
    """For each message: the name of the tool it answers (for protocols whose tool results carry a name).

    Found by id in the nearest earlier assistant turn that made that call, so a result never goes
    back under another turn's function, even when two turns reused one id. None elsewhere, and when
    no earlier call has that id (the message's own `name`, if any, is then used)."""
    seen: dict[str, str] = {}
    out: list[str | None] = []
    for m in messages:
        out.append(seen.get(m.tool_call_id or "", m.name) if m.role == "tool" else None)
        for t in m.tool_calls:
            seen[t.id] = t.name
    return out


def image_url(part: dict[str, Any]) -> str:
    """An image part (see `Message.parts`) as a URL: its own, or a base64 data: URL."""
    return part.get("url") or f"data:{part['media_type']};base64,{part['data']}"


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
