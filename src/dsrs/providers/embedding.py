"""What every embeddings backend shares: the normalized request, which wire module speaks it, and
the checks a decoded answer passes (vectors of finite floats, one per input, token counts).

The wire modules, one per protocol: `openai_embeddings` (`POST /embeddings`, every OpenAI-compatible
service), `gemini_embeddings` (`models/{m}:batchEmbedContents`), `ollama_embeddings` (`POST
/api/embed`) and `embedded_embeddings` (llama.cpp in this process). Each has a `Client` with
`MAX_BATCH` (inputs per request) and `async embed(req) -> (vectors, usage, model)`; like the chat
modules they translate only: `dsrs.embed.Embedder` batches, retries, caches, prices and books.
"""

from __future__ import annotations

import base64
import importlib
import math
import sys
from array import array
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from .. import errors
from ..types import LmUsage
from .services import Service

# wire protocol of the chat service -> the module that speaks its embeddings API
MODULES = {"openai_chat": "openai_embeddings", "gemini": "gemini_embeddings", "ollama": "ollama_embeddings",
           "embedded": "embedded_embeddings"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Everything that changes the vectors (the cache key hashes exactly this)."""

    model: str
    texts: tuple[str, ...]
    dimensions: int | None = None
    encoding_format: str = "float"  # what is asked of the provider: "float" or "base64" (float32)
    task_type: str | None = None  # Gemini's taskType (RETRIEVAL_QUERY, RETRIEVAL_DOCUMENT, ...)
    extra: dict[str, Any] = field(default_factory=dict)  # provider parameters passed through

    def canonical(self) -> dict[str, Any]:
        return {"model": self.model, "texts": list(self.texts), "dimensions": self.dimensions,
                "encoding_format": self.encoding_format, "task_type": self.task_type, "extra": self.extra}  # fmt: skip

    def part(self, texts: tuple[str, ...]) -> EmbedRequest:
        """The same request for a batch of its texts."""
        return EmbedRequest(self.model, texts, self.dimensions, self.encoding_format, self.task_type, self.extra)


Result = tuple[list[list[float]], LmUsage, str]  # vectors in input order, usage (unpriced), model


class EmbedBackend(Protocol):
    MAX_BATCH: int

    async def embed(self, req: EmbedRequest) -> Result: ...


def module(service: Service) -> ModuleType:
    """The embeddings wire module of a service, or UnsupportedFeatureError (nothing sent)."""
    name = MODULES.get(service.protocol)
    if name is None:
        raise errors.UnsupportedFeatureError(
            f"dsrs has no embeddings API for provider {service.name!r}", provider=service.name,
            hint="embeddings: openai and the OpenAI-compatible services (llamacpp, vllm, mistral, together...), "
                 "gemini, ollama, embedded",
        )  # fmt: skip
    return importlib.import_module(f"dsrs.providers.{name}")


def refuse(provider: str, model: str, what: str, hint: str) -> None:
    raise errors.UnsupportedFeatureError(f"{provider} embeddings do not take {what}", provider=provider, model=model,
                                         hint=hint)  # fmt: skip


def bad(payload: Any, what: str, provider: str, model: str) -> errors.ResponseFormatError:
    return errors.ResponseFormatError(
        f"not {what}: {str(payload)[:120]}", provider=provider, model=model, status=200,
        hint="the answer did not have the shape of the protocol; it may have been billed",
    )  # fmt: skip


def vector(v: Any, provider: str, model: str) -> list[float]:
    """One embedding as a list of finite numbers: a JSON array of numbers (kept as it is: JSON has no
    NaN or infinity), or base64 of little-endian float32 (what `encoding_format: "base64"` returns)."""
    if type(v) is list:
        try:
            if v:
                sum(v, 0.0)  # C speed (float fast path): a non-number is a TypeError (true/false count as 1, 0)
                return v
        except (TypeError, OverflowError):
            pass
        raise bad(str(v)[:60], "a non-empty embedding of numbers", provider, model)
    if not isinstance(v, str):
        raise bad(v, "an embedding (a list of numbers or a base64 string)", provider, model)
    try:
        raw = base64.b64decode(v, validate=True)
    except ValueError:
        raise bad(v, "a base64 embedding", provider, model) from None
    if not raw or len(raw) % 4:
        raise bad(v, "base64 of float32 values (a non-empty multiple of 4 bytes)", provider, model)
    a = array("f")
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    if not math.isfinite(sum(a)) and not all(map(math.isfinite, a)):  # the sum of finite floats may overflow
        raise bad(v[:60], "an embedding of finite numbers", provider, model)
    return a.tolist()


def vectors(items: Any, req: EmbedRequest, provider: str, model: str) -> list[list[float]]:
    """The decoded vectors of a batch: one per input, all of one length (`dimensions` when asked)."""
    if type(items) is not list or len(items) != len(req.texts):
        n = len(items) if isinstance(items, list) else type(items).__name__
        raise bad(f"{n} embeddings for {len(req.texts)} inputs", "one embedding per input", provider, model)
    out = [vector(v, provider, model) for v in items]
    sizes = {len(v) for v in out}
    if len(sizes) != 1:
        raise bad(f"embeddings of lengths {sorted(sizes)}", "embeddings of one length", provider, model)
    if req.dimensions is not None and len(out[0]) != req.dimensions:
        raise errors.ResponseFormatError(
            f"asked for {req.dimensions} dimensions, got {len(out[0])}", provider=provider, model=model, status=200,
            hint="this server or model ignores `dimensions`: drop with_dimensions(...) or use a model that takes it",
        )  # fmt: skip
    return out


def count(v: Any) -> int | None:
    """A token count from an answer: a non-negative whole number (12.0 included), else None."""
    if type(v) is int and 0 <= v < 2**53:
        return v
    if type(v) is float and v.is_integer() and 0 <= v < 2**53:
        return int(v)
    return None


def usage(prompt: Any, total: Any, provider: str, model: str) -> LmUsage:
    """Usage of one request (embeddings have no completion tokens); reported nothing: unknown."""
    if prompt is None and total is None:
        return LmUsage(calls=1, cost_msats=None, estimated=True)
    p, t = count(prompt if prompt is not None else total), count(total if total is not None else prompt)
    if p is None or t is None:
        raise bad((prompt, total), "a token count", provider, model)
    return LmUsage(prompt_tokens=p, total_tokens=t, cost_msats=None, calls=1)
