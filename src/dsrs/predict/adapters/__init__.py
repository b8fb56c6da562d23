"""Adapters: how a signature becomes a prompt and the answer becomes typed fields."""

from __future__ import annotations

import re
from typing import Any, cast

from .base import Adapter, AdapterParseError, Prompt, options
from .chat import ChatAdapter
from .completion import CompletionAdapter
from .json import JSONAdapter

_BASE_NAME = re.compile(r"(^|[-_/.])(base|pt)([-_/.]|$)", re.IGNORECASE)


def is_base_model(lm: Any) -> bool:
    """Base (pretrained, not chat-tuned) models: the embedded engine, an LM flagged `base_model`,
    or a model name marked base/pt (`gemma-3-270m-pt`, `llama-3-8b-base`). A LaneMux pinned to
    a lane is judged by that lane; an unpinned one is base when every lane is."""
    if callable(getattr(lm, "lane", None)):
        pinned = (getattr(lm, "options", None) or {}).get("lane")
        if isinstance(pinned, str):
            return is_base_model(lm.lane(pinned).lm)
        lanes = getattr(lm, "lanes", ())
        if lanes:
            return all(is_base_model(lane.lm) for lane in lanes)
    if getattr(lm, "provider", "") == "embedded" or getattr(lm, "base_model", False):
        return True
    return bool(_BASE_NAME.search(str(getattr(lm, "model", "") or "")))


def resolve(adapter: Any, lm: Any) -> Adapter:
    """The adapter to use: the one given (a class is instantiated), else by the kind of model."""
    if adapter is None:
        return CompletionAdapter() if is_base_model(lm) else ChatAdapter()
    if isinstance(adapter, type):
        adapter = adapter()
    if not (callable(getattr(adapter, "format", None)) and callable(getattr(adapter, "parse", None))):
        from ...errors import ConfigurationError

        raise ConfigurationError(
            f"{adapter!r:.80} is not an adapter",
            hint="an adapter has format(signature, inputs, demos) and parse(signature, text)",
        )
    return cast(Adapter, adapter)  # format and parse are callable: checked above


__all__ = ["Adapter", "AdapterParseError", "ChatAdapter", "CompletionAdapter", "JSONAdapter", "Prompt", "is_base_model",
           "options", "resolve"]  # fmt: skip
