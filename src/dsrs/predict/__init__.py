"""Programs on top of LMs: signatures, Predict, adapters, predictions."""

from __future__ import annotations

from .adapters import Adapter, AdapterParseError, ChatAdapter, CompletionAdapter, JSONAdapter
from .predict import Predict
from .prediction import Prediction
from .signature import Field, InputField, OutputField, Signature, SignatureError

__all__ = ["Adapter", "AdapterParseError", "ChatAdapter", "CompletionAdapter", "Field", "InputField", "JSONAdapter",
           "OutputField", "Predict", "Prediction", "Signature", "SignatureError"]  # fmt: skip
