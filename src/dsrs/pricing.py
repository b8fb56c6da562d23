"""Prices: the bundled, dated table (USD per million tokens), run-time overrides, and msats per USD.

A model is priced only when a row names it exactly: an unknown model, or a dated snapshot the table
does not list, costs `None`, never a guess (snapshots can cost more than today's alias:
`gpt-4o-2024-05-13` is $5/$15 while `gpt-4o` is $2.50/$10). A row is

- a list `[input, output, cached input, cache write, 1h cache write]` (trailing entries may be
  missing or null: cached input and cache write default to the input price, the 1-hour cache
  write to the cache write price),
- an object with those names (`input`, `output`, `cached_input`, `cache_write`, `cache_write_1h`)
  and optionally `long_context: {"above": tokens, ...prices}`: the tier billed for every token of a
  call whose prompt (cached and written tokens included) is above `above` tokens,
- or a string naming another row of the same table: "billed exactly like it" (a snapshot that
  equals its alias).

Run-time prices (`register`, `load`, or a JSON file named by `DSRS_PRICES`, read on the first
lookup) take precedence over the bundled table, and may name any provider (`openrouter/...`).
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, replace
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import Any, cast

from .settings import current
from .types import CostSource, LmUsage

DEFAULT_MSATS_PER_USD = 1_000_000  # 1 USD = 1,000 sats, i.e. BTC at 100,000 USD; set DSRS_MSATS_PER_USD
_MILLION = Decimal(1_000_000)
_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_1h")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. `long` is the tier billed when the prompt is above `long_above` tokens."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal  # Anthropic's 5-minute cache write
    cache_write_1h: Decimal  # Anthropic's 1-hour cache write
    long_above: int | None = None
    long: Price | None = None

    def tier(self, prompt_tokens: int) -> Price:
        """The prices a call with this many prompt tokens pays."""
        if self.long is not None and self.long_above is not None and prompt_tokens > self.long_above:
            return self.long
        return self


FREE = Price(Decimal(0), Decimal(0), Decimal(0), Decimal(0), Decimal(0))

_lock = threading.Lock()
_registered: dict[str, Price] = {}  # register()/load(): "provider/model" -> Price
_env_rows: dict[str, Price] | None = None  # DSRS_PRICES, read on the first lookup


def _error(msg: str, hint: str) -> Exception:
    from .errors import ConfigurationError

    return ConfigurationError(msg, hint=hint)


def _usd(v: Any, what: str) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (int, float, str, Decimal)):
        raise _error(f"price {what} must be a number of USD per million tokens, got {v!r:.40}", "e.g. input=2.5")
    try:
        d = Decimal(str(v))
    except ArithmeticError:
        d = Decimal("NaN")
    if not d.is_finite() or d < 0:
        raise _error(f"price {what} must be a finite, non-negative USD amount, got {v!r:.40}", "e.g. input=2.5")
    return d


def _price(row: Any, name: str, depth: int = 0) -> Price:
    """A row of the table (list or object) as a Price; see the module docstring."""
    if isinstance(row, (list, tuple)):
        if not 2 <= len(row) <= 5:
            raise _error(f"price row {name!r} must list 2 to 5 prices, got {len(row)}",
                         "[input, output, cached input, cache write, 1h cache write]")  # fmt: skip
        row = dict(zip(_FIELDS, row))
    if not isinstance(row, dict):
        raise _error(f"price row {name!r} must be a list or an object, got {type(row).__name__}",
                     'e.g. {"input": 2.5, "output": 10}')  # fmt: skip
    unknown = set(row) - set(_FIELDS) - ({"long_context"} if depth == 0 else {"above"})
    if unknown:
        raise _error(f"price row {name!r} has unknown keys {sorted(unknown)}", f"known: {', '.join(_FIELDS)}, long_context")
    if row.get("input") is None or row.get("output") is None:
        raise _error(f"price row {name!r} needs an input and an output price", 'e.g. {"input": 2.5, "output": 10}')
    pin, pout = _usd(row["input"], f"{name} input"), _usd(row["output"], f"{name} output")
    cached = pin if row.get("cached_input") is None else _usd(row["cached_input"], f"{name} cached_input")
    write = pin if row.get("cache_write") is None else _usd(row["cache_write"], f"{name} cache_write")
    write_1h = write if row.get("cache_write_1h") is None else _usd(row["cache_write_1h"], f"{name} cache_write_1h")
    lc = row.get("long_context")
    if lc is None:
        return Price(pin, pout, cached, write, write_1h)
    above = lc.get("above") if isinstance(lc, dict) else None
    if isinstance(above, bool) or not isinstance(above, int) or above < 0:
        raise _error(f"price row {name!r}: long_context needs a whole number of prompt tokens in 'above'",
                     '"long_context": {"above": 200000, "input": 6, "output": 22.5}')  # fmt: skip
    return Price(pin, pout, cached, write, write_1h, above, _price(lc, f"{name} long_context", 1))


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    return cast("dict[str, Any]", json.loads(resources.files("dsrs.data").joinpath("prices.json").read_text()))


def _rows(data: Any, source: str) -> dict[str, Price]:
    models = data.get("models", data) if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise _error(f"{source} must be a JSON object of \"provider/model\": price rows",
                     'e.g. {"openai/my-model": [2.5, 10]}')  # fmt: skip
    out = {}
    for name, row in models.items():
        if not isinstance(name, str) or "/" not in name:
            raise _error(f"{source}: a price needs a \"provider/model\" name, got {name!r:.60}", 'e.g. "openai/gpt-4o"')
        target = models.get(row) if isinstance(row, str) else row  # a string names another row of the same file
        if target is None or isinstance(target, str):
            raise _error(f"{source}: {name!r} refers to {row!r}, which is not a price row there", "name a row with prices")
        out[name] = _price(target, name)
    return out


def _read_rows(path: str | os.PathLike[str], what: str, hint: str) -> dict[str, Price]:
    """The priced rows of a JSON file shaped like prices.json's `models`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise _error(f"{what} could not be read as JSON ({type(e).__name__})", hint) from None
    return _rows(data, what)


def _env() -> dict[str, Price]:
    global _env_rows
    if _env_rows is None:
        path = os.environ.get("DSRS_PRICES")
        rows: dict[str, Price] = {}
        if path:
            rows = _read_rows(path, f"DSRS_PRICES={path!r}",
                              "point DSRS_PRICES at a JSON file like prices.json's models, or unset it")  # fmt: skip
        with _lock:
            if _env_rows is None:
                _env_rows = rows
    return _env_rows


def register(name: str, *, input: float | str, output: float | str, cached_input: float | str | None = None,
             cache_write: float | str | None = None, cache_write_1h: float | str | None = None,
             long_context: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Price `provider/model` (USD per million tokens) from now on, over the bundled table.

    `long_context={"above": 200000, "input": ..., "output": ...}` adds a tier for long prompts.
    """
    if not isinstance(name, str) or "/" not in name:
        raise _error(f"register() needs a \"provider/model\" name, got {name!r:.60}", 'e.g. "openrouter/qwen/qwq-32b"')
    row = {"input": input, "output": output, "cached_input": cached_input, "cache_write": cache_write,
           "cache_write_1h": cache_write_1h, "long_context": long_context}  # fmt: skip
    p = _price(row, name)
    with _lock:
        _registered[name] = p
    price.cache_clear()


def load(source: str | os.PathLike[str] | dict[str, Any]) -> None:
    """Register every row of a JSON file (or dict) shaped like prices.json's `models`."""
    if isinstance(source, dict):
        rows = _rows(source, "prices")
    else:
        rows = _read_rows(source, f"prices file {str(source)!r}", "pass a JSON file like prices.json's models")
    with _lock:
        _registered.update(rows)
    price.cache_clear()


def clear() -> None:
    """Forget run-time prices; the next lookup reads DSRS_PRICES again."""
    global _env_rows
    with _lock:
        _registered.clear()
        _env_rows = None
    price.cache_clear()


def msats_per_usd() -> int:
    v = current().msats_per_usd
    if v is not None:
        return v
    env = os.environ.get("DSRS_MSATS_PER_USD")
    if not env:
        return DEFAULT_MSATS_PER_USD
    try:
        return int(env)
    except ValueError:
        raise _error(
            f"DSRS_MSATS_PER_USD must be a whole number of msats, got {env!r}", hint="e.g. DSRS_MSATS_PER_USD=1000000"
        ) from None


def usd(msats: int) -> Decimal:
    """`msats` in USD at the current exchange rate (`msats_per_usd`)."""
    return Decimal(msats) / Decimal(msats_per_usd())


def format_usd(msats: int) -> str:
    """`msats` in USD for people, to the millionth of a dollar: "$0.001234", "$12.50"."""
    v = usd(msats)
    q = v.quantize(Decimal("0.000001"))
    if q == 0 and v > 0:
        return "<$0.000001"
    whole, frac = f"{q:,.6f}".split(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"


@lru_cache(maxsize=1024)  # cleared by register/load/clear
def price(provider: str, model: str) -> Price | None:
    """The prices of `provider/model`, or None when nothing names it."""
    for rows in (_registered, _env()):
        p = rows.get(f"{provider}/{model}")
        if p is not None:
            return p
    t = table()
    if provider in t["free_providers"]:
        return FREE
    vendor = t["aliases"].get(provider, provider)
    if vendor is None:
        return None
    for rows in (_registered, _env()):
        p = rows.get(f"{vendor}/{model}")
        if p is not None:
            return p
    name = f"{vendor}/{model}"
    row = t["models"].get(name)
    if isinstance(row, str):  # "billed exactly like" another row
        name, row = row, t["models"].get(row)
    return None if row is None else _price(row, name)


def cost_msats(provider: str, model: str, prompt: int, completion: int, cached: int = 0, cache_write: int = 0,
               cache_write_1h: int = 0) -> int | None:  # fmt: skip
    """Whole msats (rounded up) for a call, at the tier its prompt size falls in.

    `prompt` counts every input token, cached and written ones too; `cache_write` every written
    token, the `cache_write_1h` ones (written for an hour) included; `completion` every output
    token, reasoning included.
    """
    p = price(provider, model)
    if p is None:
        return None
    t = p.tier(prompt)
    write_1h = min(cache_write_1h, cache_write)
    usd_ = (
        (prompt - cached - cache_write) * t.input
        + cached * t.cached_input
        + (cache_write - write_1h) * t.cache_write
        + write_1h * t.cache_write_1h
        + completion * t.output
    ) / _MILLION
    return math.ceil(usd_ * msats_per_usd())


def apply(usage: LmUsage, provider: str, model: str) -> LmUsage:
    """Fill in cost from the price table unless the provider or an invoice already set it."""
    if usage.cost_msats is not None and usage.cost_source is not None:
        return usage
    p = price(provider, model)
    if p is None:
        if usage.cost_msats is None and usage.cost_source is None:
            return usage  # already says "unknown": skip the copy
        return replace(usage, cost_msats=None, cost_source=None)
    if p is FREE:
        return replace(usage, cost_msats=0, cost_source=CostSource.FREE)
    if usage.estimated and usage.total_tokens == 0:  # the provider reported no usage: unknown, not free
        return replace(usage, cost_msats=None, cost_source=None)
    c = cost_msats(provider, model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                   usage.cache_write_tokens, usage.cache_write_1h_tokens)  # fmt: skip
    return replace(usage, cost_msats=c, cost_source=CostSource.ESTIMATE if usage.estimated else CostSource.PRICE_TABLE)


def worst_case_msats(provider: str, model: str, prompt_tokens: int, max_tokens: int) -> int | None:
    """The most a call can cost: every output token used, every prompt token at the dearest input
    rate (a cache write can cost more than plain input), at the tier the worst-case prompt is in."""
    p = price(provider, model)
    if p is None:
        return None
    t = p.tier(prompt_tokens)
    pin = max(t.input, t.cached_input, t.cache_write, t.cache_write_1h)
    return math.ceil((prompt_tokens * pin + max_tokens * t.output) / _MILLION * msats_per_usd())
