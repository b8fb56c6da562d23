"""What a program returns: the output fields as attributes, plus `lm_usage` for every call it made.

A failed item of a batch is a Prediction too: `ok` is False, `error` holds the exception, and
reading an output field raises it. Its `lm_usage` still counts what was spent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ..types import Completion, LmUsage


class Prediction:
    __slots__ = ("_fields", "lm_usage", "completion", "inputs", "error", "lane")

    def __init__(self, fields: Mapping[str, Any] | None = None, *, lm_usage: LmUsage | None = None,
                 completion: Completion | None = None, inputs: Mapping[str, Any] | None = None,
                 error: BaseException | None = None, lane: str | None = None, **kw: Any) -> None:  # fmt: skip
        self._fields = {**(fields or {}), **kw}
        self.lm_usage = lm_usage if lm_usage is not None else LmUsage()
        self.completion = completion  # the last LM answer (text, provider, model, route)
        self.inputs = dict(inputs or {})
        self.error = error
        self.lane = lane

    @classmethod
    def failed(cls, error: BaseException, inputs: Mapping[str, Any] | None = None) -> Prediction:
        return cls(lm_usage=getattr(error, "lm_usage", None), inputs=inputs, error=error)

    @property
    def ok(self) -> bool:
        return self.error is None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            return fields[name]
        err = object.__getattribute__(self, "error")
        if err is not None:
            raise err
        raise AttributeError(f"this prediction has no field {name!r}; it has {sorted(fields)}")

    def __getitem__(self, name: str) -> Any:
        if name not in self._fields and self.error is not None:
            raise self.error
        return self._fields[name]

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def keys(self) -> list[str]:
        return list(self._fields)

    def items(self) -> list[tuple[str, Any]]:
        return list(self._fields.items())

    def get(self, name: str, default: Any = None) -> Any:
        return self._fields.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._fields)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Prediction):
            return self._fields == other._fields and self.error is other.error
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Prediction(error={self.error!r}, lm_usage={self.lm_usage!r})"
        fields = ", ".join(f"{k}={v!r}" for k, v in self._fields.items())
        return f"Prediction({fields}, lm_usage={self.lm_usage!r})"
