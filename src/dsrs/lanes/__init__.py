"""Lanes: LaneMux (named lanes with selection, fallback and route decisions), circuit breakers, auto-detection."""

from __future__ import annotations

from .circuit import CircuitBreaker
from .lane import Lane
from .mux import LaneMux
from .route import Attempt, Candidate, NoLaneAvailableError, RouteDecision


async def auto_detect(**kw):  # type: ignore[no-untyped-def]
    """`await dsrs.lanes.auto_detect()`: same as `await LaneMux.auto_detect()`."""
    from .detect import auto_detect as run

    return await run(**kw)


__all__ = ["Attempt", "Candidate", "CircuitBreaker", "Lane", "LaneMux", "NoLaneAvailableError", "RouteDecision",
           "auto_detect"]  # fmt: skip
