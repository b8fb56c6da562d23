"""Global configuration and scoped overrides (contextvars: safe across tasks and threads)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class Settings:
    lm: Any = None  # the default LM for programs (any object with acall)
    adapter: Any = None  # how programs format prompts (lands with Predict)
    msats_per_usd: int | None = None  # None: DSRS_MSATS_PER_USD, else pricing.DEFAULT_MSATS_PER_USD
    cache_dir: str | None = None  # None: DSRS_CACHE_DIR, else the user cache dir
    on_usage: tuple[Callable[[Any], None], ...] = field(default=())  # called with every completion
    budget: Any = None  # a dsrs.Budget every call reserves against (see dsrs.budget)


_global = Settings()
_scoped: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("dsrs_settings", default=None)


def current() -> Settings:
    s = _scoped.get()
    return _global if s is None else s


def configure(lm: Any = _UNSET, **kw: Any) -> None:
    """Set process-wide defaults: `configure(LM(...))`, `configure(msats_per_usd=...)`."""
    global _global
    if lm is not _UNSET:
        kw["lm"] = lm
    _global = dataclasses.replace(_global, **_checked(kw))


def _checked(kw: dict[str, Any]) -> dict[str, Any]:
    known = [f.name for f in dataclasses.fields(Settings)]
    bad = [k for k in kw if k not in known]
    if bad:
        from .errors import ConfigurationError

        raise ConfigurationError(f"unknown setting {', '.join(map(repr, bad))}", hint="known: " + ", ".join(known))
    hooks = kw.get("on_usage")
    if callable(hooks):
        kw["on_usage"] = (hooks,)  # one function, or a sequence of them
    elif hooks is not None:
        hooks = kw["on_usage"] = tuple(hooks)
        if not all(callable(h) for h in hooks):
            from .errors import ConfigurationError

            raise ConfigurationError("on_usage takes a function or a sequence of functions", hint="on_usage=print")
    return kw


def configure_with_adapter(lm: Any, adapter: Any) -> None:
    configure(lm, adapter=adapter)


@contextlib.contextmanager
def context(lm: Any = _UNSET, **kw: Any) -> Iterator[Settings]:
    """Override settings inside a `with` block, for this task or thread only."""
    if lm is not _UNSET:
        kw["lm"] = lm
    token = _scoped.set(dataclasses.replace(current(), **_checked(kw)))
    try:
        yield current()
    finally:
        _scoped.reset(token)
