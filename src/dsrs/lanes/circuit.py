"""A circuit breaker per lane: stop sending to a lane that keeps failing, probe it again after a cooldown.

closed --(N consecutive failures, or failure rate over a window)--> open --(cooldown)--> half-open;
half-open lets `probes` calls through: a success closes the circuit, a failure opens it again.
The clock is injectable (tests); state is guarded by a lock (sync callers may share a mux across threads).
This breaker is one process's; `dsrs.redis_state.circuit.RedisCircuit` is the same breaker shared by
several processes through Redis (what the gateway uses when it has `[redis]`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failures: int = 5,
        failure_rate: float = 0.5,
        window: int = 20,
        min_calls: int = 10,
        cooldown_s: float = 30.0,
        probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.failure_rate = failure_rate
        self.min_calls = min_calls
        self.cooldown_s = cooldown_s
        self.probes = probes
        self.clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._opened_at = 0.0
        self._consecutive = 0
        self._window: deque[bool] = deque(maxlen=window)
        self._in_flight = 0  # half-open probes running
        self.opened = 0  # how many times it opened

    def _tick(self) -> str:
        if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown_s:
            self._state = HALF_OPEN
            self._in_flight = 0
        return self._state

    @property
    def closed(self) -> bool:
        """Lock-free fast path for the common case."""
        return self._state == CLOSED

    @property
    def state(self) -> str:
        with self._lock:
            return self._tick()

    def retry_in(self) -> float:
        with self._lock:
            return max(0.0, self._opened_at + self.cooldown_s - self.clock()) if self._tick() == OPEN else 0.0

    def allow(self) -> bool:
        """May a call go to this lane now? In half-open, takes one of the probe slots."""
        if self._state == CLOSED:
            return True
        with self._lock:
            s = self._tick()
            if s == CLOSED:
                return True
            if s == HALF_OPEN and self._in_flight < self.probes:
                self._in_flight += 1
                return True
            return False

    def success(self) -> None:
        if self._state == CLOSED:  # the hot path, lock-free (deque.append is atomic)
            self._consecutive = 0
            self._window.append(True)
            return
        with self._lock:
            if self._tick() == HALF_OPEN:
                self._state = CLOSED
                self._window.clear()
            self._consecutive = 0
            self._window.append(True)

    def failure(self) -> None:
        with self._lock:
            s = self._tick()
            if s == HALF_OPEN:
                self._open()
                return
            if s == OPEN:
                return
            self._consecutive += 1
            self._window.append(False)
            bad = self._window.count(False)
            if self._consecutive >= self.failures or (
                len(self._window) >= self.min_calls and bad / len(self._window) >= self.failure_rate
            ):
                self._open()

    def neutral(self) -> None:
        """The call ended without saying anything about the lane's health (bad request, budget refusal, cancel)."""
        with self._lock:
            if self._tick() == HALF_OPEN and self._in_flight:
                self._in_flight -= 1

    def _open(self) -> None:
        self._state = OPEN
        self._opened_at = self.clock()
        self._consecutive = 0
        self._window.clear()
        self._in_flight = 0
        self.opened += 1

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.state})"
