"""Gateway counters in the Prometheus text format (version 0.0.4): requests, calls, errors, fallbacks, tokens, msats."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

# name -> (type, help)
_DEFS = {
    "dsrs_gateway_requests_total": ("counter", "HTTP requests by endpoint and status code"),
    "dsrs_lane_calls_total": ("counter", "LM calls answered, by lane"),
    "dsrs_lane_errors_total": ("counter", "Failed calls, by lane (or model when no lane answered) and error type"),
    "dsrs_lane_fallbacks_total": ("counter", "Times a request moved on from a lane to another"),
    "dsrs_lane_tokens_total": ("counter", "Tokens, by lane and kind (prompt, completion)"),
    "dsrs_lane_msats_total": ("counter", "Millisatoshis booked, by lane: answers at their cost, unsettled calls at what the budgets kept"),
    "dsrs_lane_unsettled_total": ("counter", "Calls without an answer that may have been billed, by lane and reason (abandoned, error)"),
    "dsrs_lane_cache_hits_total": ("counter", "Calls answered from the cache, by lane"),
    "dsrs_gateway_redis_up": ("gauge", "1 when Redis answered the last operation, 0 when not, absent without Redis"),
}


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._v: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)

    def inc(self, name: str, amount: float = 1, **labels: Any) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            series = self._v[name]
            series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: Any) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            self._v[name][key] = value

    def get(self, name: str, **labels: Any) -> float:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            return self._v.get(name, {}).get(key, 0)

    def completion(self, lane: str, c: Any) -> None:
        """Count one answered call."""
        u = c.usage
        self.inc("dsrs_lane_calls_total", lane=lane)
        self.inc("dsrs_lane_tokens_total", u.prompt_tokens, lane=lane, kind="prompt")
        self.inc("dsrs_lane_tokens_total", u.completion_tokens, lane=lane, kind="completion")
        if u.cost_msats:
            self.inc("dsrs_lane_msats_total", u.cost_msats, lane=lane)
        if u.cache_hit:
            self.inc("dsrs_lane_cache_hits_total", lane=lane)
        route = getattr(c, "route", None)
        for a in getattr(route, "attempts", None) or ():
            if a.outcome == "fallback":
                self.inc("dsrs_lane_fallbacks_total", lane=a.lane)
                self.inc("dsrs_lane_errors_total", lane=a.lane, type=(a.error or "error").split(":")[0])

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_) in _DEFS.items():
                series = self._v.get(name)
                if not series:
                    continue
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                for key, v in sorted(series.items()):
                    labels = ",".join(f'{k}="{_escape(x)}"' for k, x in key)
                    num = int(v) if float(v).is_integer() else v
                    lines.append(f"{name}{{{labels}}} {num}" if labels else f"{name} {num}")
        return "\n".join(lines) + "\n"
