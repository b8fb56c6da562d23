"""How the command prints: answers to stdout, costs as people read them, plain tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _out(*a: Any, **kw: Any) -> None:
    print(*a, **kw, flush=True)


def _msats(msats: int, unit: str = " msats") -> str:
    """A cost as people read it: msats, and USD beside them when not free."""
    if not msats:
        return f"{msats}{unit}"
    from ..pricing import format_usd

    return f"{msats}{unit} ({format_usd(msats)})"


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(lines)
