"""What a LaneMux decided for one call, as data: candidates, skip reasons, scores, attempts, the answer's lane."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ProviderUnavailableError


@dataclass(slots=True)
class Candidate:
    lane: str
    score: float | None = None  # the policy's score (lower ranks first); None when skipped before scoring
    skipped: str | None = None  # why this lane was not tried (capability, circuit, budget, no key...)


@dataclass(slots=True)
class Attempt:
    lane: str
    outcome: str  # "ok", "retry" (same lane after backoff), "wait" (same lane after Retry-After), "fallback", "raise"
    error: str | None = None  # the error's type and text
    waited_s: float = 0.0  # sleep before the next attempt
    route: RouteDecision | None = None  # a nested LaneMux's own decision


@dataclass(slots=True)
class RouteDecision:
    policy: str
    requested_lane: str | None = None
    _candidates: list[Candidate] | None = None
    attempts: list[Attempt] = field(default_factory=list)
    lane: str | None = None  # the lane that answered
    cached: bool = False
    order: tuple[str, ...] = ()  # lanes in priority order, turned into `candidates` when first read

    @property
    def candidates(self) -> list[Candidate]:
        """Every lane considered, in the order tried, with its score or why it was skipped.

        (Built when first read: most decisions are never inspected, and each object a call
        allocates costs the garbage collector time under load.)"""
        if self._candidates is None:
            self._candidates = [Candidate(name, float(i)) for i, name in enumerate(self.order)]
        return self._candidates

    @candidates.setter
    def candidates(self, value: list[Candidate]) -> None:
        self._candidates = value

    @property
    def skipped(self) -> dict[str, str]:
        return {c.lane: c.skipped for c in self.candidates if c.skipped}

    @property
    def scores(self) -> dict[str, float]:
        return {c.lane: c.score for c in self.candidates if c.score is not None}

    @property
    def retries(self) -> int:
        return sum(1 for a in self.attempts if a.outcome in ("retry", "wait"))

    @property
    def fallbacks(self) -> int:
        return sum(1 for a in self.attempts if a.outcome == "fallback")

    def skip(self, lane: str, why: str) -> None:
        for c in self.candidates:
            if c.lane == lane:
                c.skipped = why
                return
        self.candidates.append(Candidate(lane, None, why))

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "requested_lane": self.requested_lane,
                "candidates": [asdict(c) for c in self.candidates], "attempts": [asdict(a) for a in self.attempts],
                "lane": self.lane, "cached": self.cached}  # fmt: skip

    def __str__(self) -> str:
        lines = [f"route ({self.policy}): answered by {self.lane or 'no lane'}" + (" from the cache" if self.cached else "")]
        for c in self.candidates:
            lines.append(f"  {c.lane}: " + (f"skipped: {c.skipped}" if c.skipped else f"score {c.score:g}"))
        for a in self.attempts:
            lines.append(f"  try {a.lane}: {a.outcome}" + (f" ({a.error})" if a.error else ""))
        return "\n".join(lines)


class NoLaneAvailableError(ProviderUnavailableError):
    """No lane of a LaneMux could take the request; `.route` says why each was skipped."""

    route: RouteDecision | None = None
