"""How a LaneMux ranks the lanes that can take a request. A score is a number; lower ranks first.

- `priority`: the order lanes were added (the default).
- `cheapest`: the lane's `cost_msats` hint, else its LM's `bid_msats` (a swarm bid), else this
  request's worst-case cost on the lane (`worst_case.lm_worst_case`: the LM's own pricing or the
  price table); unknown prices rank last.
- `fastest`: the lane's observed latency (exponentially weighted); a lane not yet observed uses
  its `latency_s` hint, else 0 (it is tried, so it gets measured).
- any callable `score(lane, request) -> float` (the `Lane` exposes name, lm, hints, latency, circuit).
Ties keep the order lanes were added.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .. import worst_case
from ..errors import ConfigurationError
from ..types import Request
from .lane import Lane

Score = Callable[[Lane, Request], float]


def priority(lane: Lane, req: Request, index: int = 0) -> float:
    return float(index)


def cheapest(lane: Lane, req: Request) -> float:
    hint = lane.hints.get("cost_msats")
    if hint is None:
        hint = lane.lm_options.get("bid_msats")  # a swarm bid
    if hint is not None:
        return float(hint)
    if lane.nested or not getattr(lane.lm, "provider", ""):
        return math.inf
    wc = worst_case.lm_worst_case(lane.lm, req)
    return math.inf if wc is None else float(wc)


def fastest(lane: Lane, req: Request) -> float:
    if lane.latency.value is not None:
        return lane.latency.value
    return float(lane.hints.get("latency_s", 0.0))


POLICIES: dict[str, Any] = {"priority": priority, "cheapest": cheapest, "fastest": fastest}


def resolve(policy: str | Score) -> tuple[str, Any]:
    if callable(policy):
        return getattr(policy, "__name__", "custom"), policy
    if policy in POLICIES:
        return policy, POLICIES[policy]
    raise ConfigurationError(
        f"unknown lane policy {policy!r}", hint="use 'priority', 'cheapest', 'fastest' or a function (lane, request) -> score"
    )


def rank(lanes: list[tuple[int, Lane, Request]], policy: str | Score) -> list[tuple[float, int, Lane]]:
    """(score, index, lane), best first."""
    name, fn = resolve(policy)
    scored = []
    for i, lane, req in lanes:
        s = float(i) if fn is priority else float(fn(lane, req))
        scored.append((s, i, lane))
    scored.sort(key=lambda t: (t[0], t[1]))
    return scored
