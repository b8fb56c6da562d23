"""dsrs: one LM layer for DSPy-style programs.

`import dsrs` does no network and no disk writes; everything heavier loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    ConfigurationError,
    ContextWindowExceededError,
    DsrsError,
    MissingApiKeyError,
    NotFoundError,
    PermissionDeniedError,
    ProviderUnavailableError,
    QuotaExceededError,
    RateLimitError,
    ResponseFormatError,
    TimeoutError,
    UnknownProviderError,
    UnsupportedFeatureError,
)
from .settings import configure, configure_with_adapter, context
from .types import Completion, CostSource, LmUsage, Message, Request, StreamEnd, Tool, ToolCall

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs (nothing is imported at run time)
    from . import settings
    from .budget import Budget
    from .cache import Cache
    from .codex_sdk import CodexSdkLM
    from .embed import Embedder, Embeddings
    from .lanes import LaneMux
    from .history import inspect_history
    from .ledger import usage
    from .lm import LM, BaseLM
    from .predict import (Adapter, AdapterParseError, ChatAdapter, CompletionAdapter, InputField, JSONAdapter,
                          OutputField, Predict, Prediction, Signature)  # fmt: skip
    from .pylon import PylonLM
    from .retry import RetryPolicy

# name -> module; resolved on first attribute access (PEP 562) so imports stay light.
_LAZY = {
    "LM": "dsrs.lm",
    "BaseLM": "dsrs.lm",
    "CodexSdkLM": "dsrs.codex_sdk",
    "Embedder": "dsrs.embed", "Embeddings": "dsrs.embed",
    "Cache": "dsrs.cache",
    "RetryPolicy": "dsrs.retry",
    "settings": "dsrs.settings",
    "Predict": "dsrs.predict", "Signature": "dsrs.predict", "Prediction": "dsrs.predict",
    "InputField": "dsrs.predict", "OutputField": "dsrs.predict", "Adapter": "dsrs.predict",
    "ChatAdapter": "dsrs.predict", "JSONAdapter": "dsrs.predict", "CompletionAdapter": "dsrs.predict",
    "AdapterParseError": "dsrs.predict", "usage": "dsrs.ledger", "inspect_history": "dsrs.history",
    "Budget": "dsrs.budget",
    "LaneMux": "dsrs.lanes",
    "PylonLM": "dsrs.pylon",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dsrs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name) if name != "settings" else importlib.import_module(mod)
    globals()[name] = value
    return value


__all__ = [
    "APIConnectionError", "AuthenticationError", "BadRequestError", "BaseLM", "BudgetExceededError", "Cache",
    "Completion", "ConfigurationError", "ContextWindowExceededError", "CostSource", "DsrsError", "LM", "LmUsage",
    "Message", "MissingApiKeyError", "NotFoundError", "PermissionDeniedError", "ProviderUnavailableError",
    "QuotaExceededError", "RateLimitError", "Request", "ResponseFormatError", "RetryPolicy", "StreamEnd",
    "TimeoutError", "Tool", "ToolCall", "UnknownProviderError", "UnsupportedFeatureError", "configure",
    "configure_with_adapter", "context", "Predict", "Signature", "Prediction", "InputField", "OutputField", "Adapter",
    "ChatAdapter", "JSONAdapter", "CompletionAdapter", "AdapterParseError", "usage", "Budget", "LaneMux",
    "CodexSdkLM", "PylonLM", "inspect_history", "Embedder", "Embeddings", "__version__",
]  # fmt: skip
