"""Normal forms every LM speaks: messages, requests, completions and usage.

Providers translate to and from these; nothing above the providers sees a wire format.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from decimal import Decimal

Role = Literal["system", "user", "assistant", "tool"]


class CostSource(str, Enum):
    """Where a `cost_msats` figure came from, most trustworthy first."""

    INVOICE = "invoice"  # a Lightning invoice we actually paid
    PROVIDER = "provider"  # the provider reported the cost itself
    PRICE_TABLE = "price_table"  # tokens times the bundled price table
    ESTIMATE = "estimate"  # tokens were estimated, not reported
    FREE = "free"  # local inference
    CACHE = "cache"  # served from the cache: nothing new spent
    MIXED = "mixed"  # a sum of usages with different sources


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]  # parsed JSON arguments
    raw_arguments: str | None = None  # the provider's text, kept when it did not parse

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: name, description and JSON-schema parameters."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # for role="tool": which call this answers
    name: str | None = None
    # the provider's own reasoning blocks of an assistant turn, sent back unchanged (see Completion.reasoning)
    reasoning: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    # a user turn with images: its parts in order, each {"type": "text", "text"} or {"type": "image", "url"} /
    # {"type": "image", "data" (base64), "media_type"} (+ "detail"); `content` is then the text parts joined
    parts: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @staticmethod
    def system(text: str) -> Message:
        return Message("system", text)

    @staticmethod
    def user(text: str, images: tuple[str | dict[str, Any], ...] | list[Any] = ()) -> Message:
        """A user turn; `images`: URLs, data: URLs or image part dicts (OpenAI, Anthropic or normal form)."""
        if not images:
            return Message("user", text)
        head = ({"type": "text", "text": text},) if text else ()
        return Message("user", text, parts=head + tuple(Message.part(i) for i in images))

    @staticmethod
    def assistant(text: str = "", tool_calls: tuple[ToolCall, ...] = ()) -> Message:
        return Message("assistant", text, tuple(tool_calls))

    @staticmethod
    def tool(tool_call_id: str, content: str) -> Message:
        return Message("tool", content, tool_call_id=tool_call_id)

    @staticmethod
    def from_completion(c: Completion) -> Message:
        """The assistant turn to send back after `c`: its text, tool calls and reasoning blocks."""
        return Message("assistant", c.text, c.tool_calls, reasoning=c.reasoning)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = [t.to_json() for t in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        if self.reasoning:
            d["reasoning"] = list(self.reasoning)
        if self.parts:
            d["parts"] = list(self.parts)
        return d

    @staticmethod
    def part(p: Any) -> dict[str, Any]:
        """One content part in normal form, from OpenAI chat, Responses, Anthropic or normal spellings
        (a bare string is an image URL or data: URL). Anything else is a ConfigurationError, never dropped."""
        kind = p.get("type", "text" if "text" in p else None) if isinstance(p, dict) else None
        if isinstance(p, str):
            return _image(p)
        if kind in ("text", "input_text", "output_text") and isinstance(p.get("text"), str):
            return {"type": "text", "text": p["text"]}
        if kind == "image_url":  # OpenAI chat
            iu = p.get("image_url")
            return _image(iu.get("url"), iu.get("detail")) if isinstance(iu, dict) else _image(iu)
        if kind == "input_image" and "image_url" in p:  # Responses
            return _image(p["image_url"], p.get("detail"))
        if kind == "image":
            src = p.get("source")
            if isinstance(src, dict) and src.get("type") == "base64":  # Anthropic
                return _image_data(src.get("data"), src.get("media_type"))
            if isinstance(src, dict) and src.get("type") == "url":
                return _image(src.get("url"))
            if "url" in p:
                return _image(p["url"], p.get("detail"))
            if "data" in p:
                return _image_data(p["data"], p.get("media_type"), p.get("detail"))
        raise _part_error(f"unsupported content part {p!r:.100}")

    @staticmethod
    def coerce(m: Message | dict[str, Any]) -> Message:
        if isinstance(m, Message):
            return m
        if not isinstance(m, dict) or "role" not in m:
            raise TypeError(f"a message must be a dsrs.Message or a dict with 'role' and 'content', got {m!r:.80}")
        content = m.get("content") or ""
        parts: tuple[dict[str, Any], ...] = ()
        raw_parts = m.get("parts") or (content if isinstance(content, list) else ())
        if raw_parts:  # content parts (OpenAI, Responses, Anthropic spellings): text joined, images kept
            parts = tuple(Message.part(p) for p in raw_parts)
            if isinstance(content, list):
                content = "".join(p["text"] for p in parts if p["type"] == "text")
            if all(p["type"] == "text" for p in parts):
                parts = ()
            elif m["role"] != "user":
                raise _part_error(f"images can only be sent in user messages, not {m['role']!r}")
        calls = []
        for tc in m.get("tool_calls") or ():
            fn = tc.get("function", tc)
            args = fn.get("arguments", {})
            if isinstance(args, str):
                args = json.loads(args or "{}")
            calls.append(ToolCall(tc.get("id", ""), fn["name"], args))
        reasoning = tuple(m.get("reasoning") or ())
        return Message(m["role"], content, tuple(calls), m.get("tool_call_id"), m.get("name"), reasoning, parts)


def _part_error(what: str) -> Exception:
    from .errors import ConfigurationError

    return ConfigurationError(what, hint="content parts may be text and images: {'type': 'text', 'text': ...}, "
                              "{'type': 'image_url', 'image_url': {'url': 'https://... or data:image/png;base64,...'}} "
                              "or Anthropic {'type': 'image', 'source': {...}}")  # fmt: skip


def _image(url: Any, detail: Any = None) -> dict[str, Any]:
    if isinstance(url, str) and url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media_type, _, enc = head.partition(";")
        if sep and enc == "base64":
            return _image_data(data, media_type, detail)
        raise _part_error("an image data: URL must be data:<media type>;base64,<data>")
    if not isinstance(url, str) or "://" not in url:
        raise _part_error(f"an image needs a URL or base64 data, got {url!r:.60}")
    return {"type": "image", "url": url, **({"detail": detail} if detail else {})}


def _image_data(data: Any, media_type: Any, detail: Any = None) -> dict[str, Any]:
    if not isinstance(data, str) or not data or not isinstance(media_type, str) or not media_type.startswith("image/"):
        raise _part_error("base64 image data needs the data and an image/* media type")
    return {"type": "image", "data": data, "media_type": media_type, **({"detail": detail} if detail else {})}


@dataclass(frozen=True, slots=True)
class Request:
    """Everything that changes the answer. The cache key is a hash of exactly this."""

    model: str
    messages: tuple[Message, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None  # {"type": "json_schema", "json_schema": {...}} etc.
    extra: dict[str, Any] = field(default_factory=dict)  # provider parameters passed through

    def canonical(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _REQUEST_FIELDS}  # fields() is slow per call
        d["messages"] = [m.to_json() for m in self.messages]
        d["tools"] = [t.to_json() for t in self.tools]
        d["stop"] = list(self.stop)
        return d


_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(Request))

@dataclass(slots=True)
class LmUsage:
    """Tokens and cost of one or many calls. `a + b` and `sum(usages, LmUsage())` are exact.

    `prompt_tokens` counts every input token billed: `cached_tokens` (cache reads) and
    `cache_write_tokens` (cache writes, of which `cache_write_1h_tokens` were written for an hour)
    are parts of it. `completion_tokens` counts every output token billed: `reasoning_tokens` are
    part of it, also for providers that report them apart (xAI, Gemini thoughts).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0  # every billed output token, reasoning included
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # part of completion_tokens
    cost_msats: int | None = 0
    cost_source: CostSource | None = None
    cache_hit: bool = False
    estimated: bool = False  # token counts were estimated, not reported
    calls: int = 0
    cache_write_tokens: int = 0  # prompt tokens written to the provider's cache (Anthropic prices them higher)
    cache_write_1h_tokens: int = 0  # the part of cache_write_tokens written for 1 hour (Anthropic: 2x input)

    @property
    def cost_usd(self) -> Decimal | None:
        """`cost_msats` in USD at the current exchange rate (`dsrs.pricing.msats_per_usd`)."""
        if self.cost_msats is None:
            return None
        from .pricing import usd

        return usd(self.cost_msats)

    def __add__(self, other: LmUsage) -> LmUsage:
        if not isinstance(other, LmUsage):
            return NotImplemented
        if self.calls == 0:
            src = other.cost_source
        elif other.calls == 0:
            src = self.cost_source
        else:
            src = self.cost_source if self.cost_source == other.cost_source else CostSource.MIXED
        cost = None if self.cost_msats is None or other.cost_msats is None else self.cost_msats + other.cost_msats
        return LmUsage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            self.cached_tokens + other.cached_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            cost,
            src,
            self.cache_hit and other.cache_hit if self.calls and other.calls else (self.cache_hit or other.cache_hit),
            self.estimated or other.estimated,
            self.calls + other.calls,
            self.cache_write_tokens + other.cache_write_tokens,
            self.cache_write_1h_tokens + other.cache_write_1h_tokens,
        )

    __radd__ = __add__

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cost_source"] = self.cost_source.value if self.cost_source else None
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> LmUsage:
        if not _USAGE_FIELDS.issuperset(d):  # a newer writer's extra fields are dropped
            d = {k: v for k, v in d.items() if k in _USAGE_FIELDS}
        else:
            d = dict(d)
        if d.get("cost_source"):
            d["cost_source"] = CostSource(d["cost_source"])
        return LmUsage(**d)


_USAGE_FIELDS = frozenset(f.name for f in dataclasses.fields(LmUsage))


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error", "unknown"]


@dataclass(slots=True)
class Completion:
    """One answer: text, tool calls, why it stopped, what it cost."""

    text: str
    usage: LmUsage
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason = "stop"
    model: str = ""
    provider: str = ""
    id: str | None = None
    latency_s: float | None = None
    raw: Any = field(default=None, repr=False, compare=False)  # the provider's payload, never in reprs
    route: Any = field(default=None, repr=False, compare=False)  # filled by LaneMux
    items: tuple[Any, ...] = field(default=(), repr=False, compare=False)  # an agent's steps (CodexSdkLM)
    # the provider's reasoning blocks, opaque: {"provider": service name, "block": raw block}; never in reprs.
    # `Message.from_completion` carries them into the next turn; only the same provider sends them back.
    reasoning: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        return self.text

    def to_json(self) -> dict[str, Any]:
        d = {
            "text": self.text,
            "usage": self.usage.to_json(),
            "tool_calls": [t.to_json() for t in self.tool_calls],
            "finish_reason": self.finish_reason,
            "model": self.model,
            "provider": self.provider,
            "id": self.id,
        }
        if self.reasoning:
            d["reasoning"] = list(self.reasoning)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Completion:
        return Completion(
            text=d["text"],
            usage=LmUsage.from_json(d["usage"]),
            tool_calls=tuple(ToolCall(t["id"], t["name"], t["arguments"]) for t in d.get("tool_calls", ())),
            finish_reason=d.get("finish_reason", "stop"),
            model=d.get("model", ""),
            provider=d.get("provider", ""),
            id=d.get("id"),
            reasoning=tuple(d.get("reasoning") or ()),
        )


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a stream: the full completion, usage included."""

    completion: Completion

    def __str__(self) -> str:  # so `print(chunk, end="")` over a stream prints the text once
        return ""

    @property
    def usage(self) -> LmUsage:
        return self.completion.usage
