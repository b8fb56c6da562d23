"""Budgets in msats: reserve the worst case before a call, settle to the actual cost, release on failure.

(Placeholder for the LaneMux/budgets work: `guard` is the one hook `BaseLM` calls.)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .types import Request


class _NoHold:
    def settle(self, usage: Any) -> None:
        pass


_NO_HOLD = _NoHold()


@contextlib.asynccontextmanager
async def guard(lm: Any, req: Request) -> AsyncIterator[Any]:
    """Reserve against every budget that applies to `lm` for `req`; yields an object with `settle(usage)`."""
    yield _NO_HOLD
