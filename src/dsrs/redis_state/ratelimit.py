"""Requests per minute per name, shared through Redis (`RateLimiter`)."""

from __future__ import annotations

import threading
import time

from .state import RedisState

_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class RateLimiter:
    """At most `per_minute` requests per name in each clock minute, shared through Redis when given."""

    def __init__(self, state: RedisState | None = None) -> None:
        self.state = state
        self._local: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, name: str, per_minute: int, now: float | None = None) -> float | None:
        """Count one request; None when allowed, else seconds until the next window."""
        now = time.time() if now is None else now
        window = int(now // 60)
        retry = 60 - (now % 60)
        n = None
        if self.state is not None:
            script = self.state.script("hit", _HIT)
            try:
                n = int(self.state.call(lambda: script(keys=(self.state.key("rate", name, str(window)),), args=(120,))))  # type: ignore[union-attr]
            except self.state.errors:
                n = None
        if n is None:
            with self._lock:
                for k in [k for k in self._local if k[1] < window]:
                    del self._local[k]
                n = self._local[(name, window)] = self._local.get((name, window), 0) + 1
        return None if n <= per_minute else retry
