"""The most a request can cost: the worst case a budget reserves before a call (see dsrs.budget).

Prompt tokens are bounded at one per UTF-8 byte (a token is at least one byte in every byte-level
BPE and SentencePiece vocabulary) plus `MESSAGE_OVERHEAD` per message and `IMAGE_TOKENS` per image
part. Output: the largest cap the request sends (`max_tokens`, or one in `extra`, nested dicts
included) times the completions it asks for (`n`...); without one, the cap the protocol sends by
default (`lm.default_max_tokens`), else the model's documented maximum output.
"""

from __future__ import annotations

import math
from typing import Any

from . import pricing
from .types import Request

MESSAGE_OVERHEAD = 8  # tokens per message for role markers and separators, generously
GENERIC_MAX_TOKENS = 131_072  # output cap assumed when neither the request nor the table says
# Output caps assumed when nothing in the request caps the output, by model-name prefix (first
# match wins): each model's documented maximum output. A protocol that always sends a cap (the
# Anthropic Messages API requires one) declares it as its module's DEFAULT_MAX_TOKENS instead.
DEFAULT_MAX_TOKENS: tuple[tuple[str, int], ...] = (
    ("gpt-5", 128_000),
    ("codex", 128_000),
    ("o1", 100_000),
    ("o3", 100_000),
    ("o4", 100_000),
    ("gpt-4.1", 32_768),
    ("gpt-4o", 16_384),
    ("gpt-4-turbo", 4_096),
    ("gpt-3.5", 4_096),
    ("claude-opus-4-5", 64_000),
    ("claude-opus-4", 32_000),
    ("claude-3-7-sonnet", 128_000),  # with the output-128k beta header
    ("claude-3-5", 8_192),
    ("claude", 64_000),
    ("gemini", 65_536),
    ("deepseek-chat", 8_192),
    ("deepseek-reasoner", 64_000),
)
# `extra` parameters that cap the output (the largest found wins) or multiply it (n choices).
_OUTPUT_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "maxOutputTokens", "num_predict")
_MULTIPLIERS = ("n", "best_of", "candidateCount", "candidate_count", "num_generations")


def default_max_tokens(model: str) -> int:
    name = model.rsplit("/", 1)[-1]
    for prefix, n in DEFAULT_MAX_TOKENS:
        if name.startswith(prefix):
            return n
    return GENERIC_MAX_TOKENS


def _extra_values(extra: Any, names: tuple[str, ...], depth: int = 0) -> list[int]:
    """Whole-number values of `names` anywhere in `extra` (nested dicts such as generationConfig or
    options included), so nothing passed through `extra` escapes the worst case."""
    found: list[int] = []
    if isinstance(extra, dict) and depth < 4:
        for k, v in extra.items():
            if k in names and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                found.append(math.ceil(v))
            elif isinstance(v, dict):
                found += _extra_values(v, names, depth + 1)
    return found


def output_multiplier(req: Request) -> int:
    """How many completions the request asks for (`n` and its spellings in `extra`), at least 1."""
    return max([1, *_extra_values(req.extra, _MULTIPLIERS)]) if req.extra else 1


def max_output_tokens(model: str, req: Request, sent_default: int | None = None) -> int:
    """The most output tokens `req` can produce per completion: the largest cap the request sends
    (`max_tokens`, or one in `extra`), else the cap the protocol sends by default, else the model's."""
    caps = _extra_values(req.extra, _OUTPUT_CAPS) if req.extra else []
    if req.max_tokens is not None:
        caps.append(req.max_tokens)
    if caps:
        return max(caps)
    return sent_default if sent_default is not None else default_max_tokens(model)


def estimate_prompt_tokens(req: Request) -> int:
    """An upper bound of the prompt's tokens: one per UTF-8 byte (a token is at least one byte in
    every byte-level BPE and SentencePiece vocabulary) plus `MESSAGE_OVERHEAD` per message."""
    n = 0
    for m in req.messages:
        size = len(m.content.encode("utf-8"))
        for t in m.tool_calls:
            size += len(t.name) + len(repr(t.arguments).encode("utf-8"))
        for part in getattr(m, "parts", None) or ():
            size += _part_tokens(part)
        for block in m.reasoning:
            size += len(repr(block).encode("utf-8"))
        n += size + MESSAGE_OVERHEAD
    for tool in req.tools:
        n += len(repr(tool.to_json()).encode("utf-8")) + MESSAGE_OVERHEAD
    if req.response_format:
        n += len(repr(req.response_format).encode("utf-8"))
    return n


IMAGE_TOKENS = 8_192  # an upper bound for one image part (OpenAI high detail: at most 1,105; Anthropic ~1,600; Gemini 2.x tiles of 258 up to 3072 x 3072: 4,128)


def _part_tokens(part: Any) -> int:
    if isinstance(part, dict) and part.get("type") not in (None, "text"):
        return IMAGE_TOKENS
    return len(repr(part).encode("utf-8"))


def worst_case(provider: str, model: str, req: Request, sent_default: int | None = None) -> int | None:
    """The most this request can cost on `provider/model`, in msats; None when the price is unknown."""
    max_out = max_output_tokens(model, req, sent_default) * output_multiplier(req)
    return pricing.worst_case_msats(provider, model, estimate_prompt_tokens(req), max_out)


def lm_worst_case(lm: Any, req: Request) -> int | None:
    """The most `req` can cost on `lm`: the LM's own `worst_case_msats(req)` when it has one (an LM
    that knows its price better than the table, e.g. a swarm bid), else the price table."""
    own = getattr(lm, "worst_case_msats", None)
    if own is not None:
        bound: int | None = own(req)
        return bound
    return worst_case(lm.provider, lm.model, req, getattr(lm, "default_max_tokens", None))
