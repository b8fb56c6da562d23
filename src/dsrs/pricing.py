"""Prices: the bundled, dated table (USD per million tokens) and msats per USD.

An unknown model costs `None`, never a guess. A dated snapshot suffix (`-2024-08-06`,
`-20250219`, `-latest`) is the only thing stripped when looking a model up.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import Any

from .settings import current
from .types import CostSource, LmUsage

DEFAULT_MSATS_PER_USD = 1_000_000  # 1 USD = 1,000 sats, i.e. BTC at 100,000 USD; set DSRS_MSATS_PER_USD
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest)$")
_MILLION = Decimal(1_000_000)
_FREE = (Decimal(0), Decimal(0), Decimal(0), Decimal(0))


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    return json.loads(resources.files("dsrs.data").joinpath("prices.json").read_text())


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
        from .errors import ConfigurationError

        raise ConfigurationError(
            f"DSRS_MSATS_PER_USD must be a whole number of msats, got {env!r}", hint="e.g. DSRS_MSATS_PER_USD=1000000"
        ) from None


@lru_cache(maxsize=1024)  # the table is fixed: look each (provider, model) up once, not on every call
def price(provider: str, model: str) -> tuple[Decimal, Decimal, Decimal, Decimal] | None:
    """(input, output, cached input, cache write) USD per million tokens, or None when unknown."""
    t = table()
    if provider in t["free_providers"]:
        return _FREE
    vendor = t["aliases"].get(provider, provider)
    if vendor is None:
        return None
    models = t["models"]
    for name in (model, _SNAPSHOT.sub("", model)):
        row = models.get(f"{vendor}/{name}")
        if row:
            pin, pout, pcached, pwrite = (Decimal(str(x)) if x is not None else None for x in (*row, None)[:4])
            return pin, pout, pin if pcached is None else pcached, pin if pwrite is None else pwrite  # type: ignore[return-value]
    return None


def cost_msats(
    provider: str, model: str, prompt: int, completion: int, cached: int = 0, cache_write: int = 0
) -> int | None:
    """Whole msats (rounded up) for a call. `prompt` counts every input token, cached and written ones too."""
    p = price(provider, model)
    if p is None:
        return None
    pin, pout, pcached, pwrite = p
    usd = ((prompt - cached - cache_write) * pin + cached * pcached + cache_write * pwrite + completion * pout) / _MILLION
    return math.ceil(usd * msats_per_usd())


def apply(usage: LmUsage, provider: str, model: str) -> LmUsage:
    """Fill in cost from the price table unless the provider or an invoice already set it."""
    if usage.cost_msats is not None and usage.cost_source is not None:
        return usage
    p = price(provider, model)
    if p is None:
        if usage.cost_msats is None and usage.cost_source is None:
            return usage  # already says "unknown": skip the copy
        return replace(usage, cost_msats=None, cost_source=None)
    if p == _FREE:
        return replace(usage, cost_msats=0, cost_source=CostSource.FREE)
    if usage.estimated and usage.total_tokens == 0:  # the provider reported no usage: unknown, not free
        return replace(usage, cost_msats=None, cost_source=None)
    c = cost_msats(provider, model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                   usage.cache_write_tokens)  # fmt: skip
    return replace(usage, cost_msats=c, cost_source=CostSource.ESTIMATE if usage.estimated else CostSource.PRICE_TABLE)


def worst_case_msats(provider: str, model: str, prompt_tokens: int, max_tokens: int) -> int | None:
    """The most a call can cost: every prompt token uncached, every output token used."""
    return cost_msats(provider, model, prompt_tokens, max_tokens)
