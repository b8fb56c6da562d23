"""A lane's circuit breaker shared through Redis by every process (gateway replica) that runs the lane.

`RedisCircuit(state, "lane name")` is a `dsrs.lanes.CircuitBreaker` (pass it as
`LaneMux.add_lane(..., circuit=...)`) whose open/half-open/closed state lives in Redis, in one hash
per lane (`dsrs:circuit:<lane>`: `until`, `probes`, `lease`, `gen`):

- **Failures are counted by each process** (consecutive failures and the failure-rate window, as
  in `CircuitBreaker`). The first process whose count trips opens the lane *for every process*:
  it writes `until` = its clock + `cooldown_s` (a lane already open keeps its `until`).
- **Others learn it** the next time they look: each process keeps the shared state it read last
  and reads it again (one `HGET`) when it is more than `refresh_s` old (default 1 s). So a
  process may send to a lane up to `refresh_s` after another opened it, and a closed lane costs
  one Redis read per `refresh_s` per lane, not per call. A success on a closed lane writes
  nothing; Redis is written only on transitions (open, probe, close).
- **Half-open**: once `until` has passed, a process that wants the lane asks Redis for a probe
  slot (a Lua script, atomic across processes): `probes` (default 1) calls get through, in all
  processes together, and the others skip the lane. The probe's success closes the lane
  everywhere (the hash is deleted); its failure opens it again for `cooldown_s`; a probe that
  ends saying nothing about the lane (a cancel, a bad request) gives its slot back. A process
  that dies mid-probe holds the slot at most `probe_lease_s` (default 300 s).
- **Clocks**: `until` is a wall-clock time (`clock`, default `time.time`) so replicas on several
  machines agree up to their clock skew (keep them in NTP; a skew shifts the cooldown by as much).
  Tests inject one clock into every instance.
- **Redis down**: never refuses a call, nor makes it wait for Redis beyond one timeout. The first Redis error switches this circuit to
  its own in-process breaker (the counts it kept, plus the shared state it knew), logged once per
  outage at WARNING; a background thread pings Redis (at most every `retry_s`) and when it
  answers, the circuit shares again: an open it decided alone is published (keeping any `until`
  already in Redis), then it follows Redis. Meanwhile probes are per process (each replica may
  send its own probe) and opens are not seen by others. The call that meets the outage waits for
  Redis's socket timeout once (immediate on loopback; up to `RedisState(timeout=...)` on a
  black-holed host).

Cost (`python bench/bench_gateway.py --circuit`, 2-core VM, load average 7.5): the check and the
success of a call on a closed lane take 0.5 µs, as with the in-process `CircuitBreaker` (0.6 µs):
no Redis round trip. Reading Redis on every call instead would cost ~140 µs per call; here it is
one `HGET` per `refresh_s` per lane per process, at any request rate.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ..lanes.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from .state import RedisState

log = logging.getLogger("dsrs.redis")

# KEYS[1]: the lane's hash. ARGV: now, until, force ('1': reopen even if open, after a failed probe).
# Returns the `until` in force. A lane already open keeps its until (another process opened it first).
_OPEN = """
local u = tonumber(redis.call('HGET', KEYS[1], 'until') or '')
if ARGV[3] ~= '1' and u and u > tonumber(ARGV[1]) then return tostring(u) end
redis.call('HSET', KEYS[1], 'until', ARGV[2], 'probes', 0, 'lease', 0)
redis.call('HINCRBY', KEYS[1], 'gen', 1)
return ARGV[2]
"""
# ARGV: now, probes allowed, probe lease (s). Returns {verdict, until}: 'closed', 'open' (until not
# reached), 'probe' (a slot taken for this caller), 'busy' (every slot taken by a probe in flight).
_PROBE = """
local u = redis.call('HGET', KEYS[1], 'until')
if not u then return {'closed', ''} end
local now = tonumber(ARGV[1])
if now < tonumber(u) then return {'open', u} end
local n = tonumber(redis.call('HGET', KEYS[1], 'probes') or '0')
if n > 0 and now >= tonumber(redis.call('HGET', KEYS[1], 'lease') or '0') then n = 0 end
if n >= tonumber(ARGV[2]) then return {'busy', u} end
redis.call('HSET', KEYS[1], 'probes', n + 1, 'lease', now + tonumber(ARGV[3]))
return {'probe', u}
"""
# A success. ARGV: now. Closes the lane unless it is still open (a success that started before
# another process opened it says nothing about the lane now).
_CLOSE = """
local u = redis.call('HGET', KEYS[1], 'until')
if not u then return 'closed' end
if tonumber(ARGV[1]) < tonumber(u) then return u end
redis.call('DEL', KEYS[1])
return 'closed'
"""
# A probe that ended saying nothing about the lane gives its slot back.
_RELEASE = """
local n = tonumber(redis.call('HGET', KEYS[1], 'probes') or '0')
if n > 0 then redis.call('HSET', KEYS[1], 'probes', n - 1) end
return n
"""


class RedisCircuit(CircuitBreaker):
    """A `CircuitBreaker` whose state every process using the same Redis and lane `name` shares.

    Takes `CircuitBreaker`'s settings (failures, failure_rate, window, min_calls, cooldown_s,
    probes, clock) and: `refresh_s` (how old the shared state this process read may get),
    `probe_lease_s` (how long a probe slot stays taken by a process that never reports back),
    `retry_s` (how often to ping Redis while it is down).
    """

    def __init__(self, state: RedisState, name: str, *, refresh_s: float = 1.0, probe_lease_s: float = 300.0,
                 retry_s: float = 5.0, clock: Callable[[], float] = time.time, **kw: Any) -> None:  # fmt: skip
        super().__init__(clock=clock, **kw)
        self.redis = state
        self.name = name
        self.refresh_s = refresh_s
        self.probe_lease_s = probe_lease_s
        self.retry_s = retry_s
        self._key = (state.key("circuit", name),)
        self._fresh_until = -math.inf  # when the shared state read last gets too old (clock time)
        self._held = 0  # probe slots this process holds in Redis
        self._alone = False  # Redis unreachable: this process's own breaker decides
        self._pinging = False
        self._ping_at = 0.0  # time.monotonic() of the last reconnect attempt
        self._back = threading.Event()  # a ping answered: share again at the next look

    def __repr__(self) -> str:
        return f"RedisCircuit({self.name!r}, {self._state}{', local' if self._alone else ''})"  # no Redis call

    @property
    def shared(self) -> bool:
        """False while Redis is unreachable and this process's own breaker decides."""
        return not self._alone

    # -- Redis, and what to do when it does not answer --------------------------------------------
    def _run(self, name: str, source: str, *args: Any) -> Any:
        script = self.redis.script("circuit_" + name, source)
        return self.redis.call(lambda: script(keys=self._key, args=args))

    def _lost(self, e: BaseException) -> None:
        if not self._alone:
            self._alone = True
            self._ping_at = time.monotonic()
            log.warning("circuit of lane %r: Redis is unreachable (%s); this process's own breaker decides until it "
                        "answers", self.name, type(e).__name__)  # fmt: skip

    def _look(self) -> None:
        """Bring the shared view up to date when it is stale (or Redis just came back)."""
        if self._alone:
            if self._back.is_set():
                self._rejoin()
            elif not self._pinging and time.monotonic() - self._ping_at >= self.retry_s:
                self._pinging = True
                self._ping_at = time.monotonic()
                threading.Thread(target=self._ping, daemon=True, name="dsrs-circuit-ping").start()
            return
        now = self.clock()
        if now < self._fresh_until:
            return
        try:
            until = self.redis.call(lambda: self.redis.client.hget(self._key[0], "until"))
        except self.redis.errors as e:
            self._lost(e)
            return
        self._fresh_until = now + self.refresh_s
        self._adopt(until)

    def _ping(self) -> None:
        try:
            if self.redis.ping():
                self._back.set()
        finally:
            self._pinging = False

    def _rejoin(self) -> None:
        """Redis answers again: publish an open this process decided alone, then follow Redis."""
        self._back.clear()
        with self._lock:
            s = self._tick()
            until = self._opened_at + self.cooldown_s
        try:
            if s == OPEN:
                self._run("open", _OPEN, repr(self.clock()), repr(until), "0")
            raw = self.redis.call(lambda: self.redis.client.hget(self._key[0], "until"))
        except self.redis.errors as e:
            self._alone = False
            self._lost(e)
            return
        self._alone = False
        self._held = 0
        self._fresh_until = self.clock() + self.refresh_s
        self._adopt(raw)
        log.warning("circuit of lane %r: Redis answers again; the circuit is shared again (%s)", self.name, self.state)

    def _adopt(self, until: Any) -> None:
        """Take the shared state: no `until` is closed; else open until then (half-open after)."""
        with self._lock:
            if until is None or until == "closed":
                if self._state != CLOSED:
                    self._state = CLOSED
                    self._consecutive = 0
                    self._window.clear()
                return
            opened_at = float(until) - self.cooldown_s
            if self._state == CLOSED or opened_at != self._opened_at:
                self._state = OPEN
                self._opened_at = opened_at
                self._consecutive = 0
                self._window.clear()
                self._in_flight = 0

    # -- the CircuitBreaker interface ----------------------------------------------------------
    @property
    def closed(self) -> bool:
        if self._alone or self.clock() >= self._fresh_until:  # the hot path: a clock read and a compare
            self._look()
        return self._state == CLOSED

    @property
    def state(self) -> str:
        self._look()
        with self._lock:
            return self._tick()

    def allow(self) -> bool:
        if self.closed or self._alone:
            return super().allow()
        with self._lock:
            if self._tick() == OPEN:
                return False
        try:  # half-open here: ask Redis for one of the probe slots of all processes
            verdict, until = self._run("probe", _PROBE, repr(self.clock()), self.probes, repr(self.probe_lease_s))
        except self.redis.errors as e:
            self._lost(e)
            return super().allow()
        self._fresh_until = self.clock() + self.refresh_s
        self._adopt(until or None)
        if verdict == "closed":
            return True
        if verdict == "probe":
            with self._lock:
                self._held += 1
            return True
        return False

    def success(self) -> None:
        if self._state == CLOSED:  # the hot path: nothing to tell Redis (as CircuitBreaker.success)
            self._consecutive = 0
            self._window.append(True)
            return
        if self._alone:
            super().success()
            return
        try:
            out = self._run("close", _CLOSE, repr(self.clock()))
        except self.redis.errors as e:
            self._lost(e)
            super().success()
            return
        with self._lock:
            self._held = 0 if out == "closed" else max(0, self._held - 1)
        self._adopt(out)
        if out == "closed":
            with self._lock:
                self._window.append(True)

    def failure(self) -> None:
        if self._alone:
            super().failure()
            return
        with self._lock:
            s = self._tick()
            if s == OPEN:
                return
            force = s == HALF_OPEN  # a failure while half-open (the probe's): open again
            if not force:
                self._consecutive += 1
                self._window.append(False)
                bad = self._window.count(False)
                if not (self._consecutive >= self.failures or (
                        len(self._window) >= self.min_calls and bad / len(self._window) >= self.failure_rate)):  # fmt: skip
                    return
            self._open()
            self._held = 0
            until = self._opened_at + self.cooldown_s
        try:
            out = self._run("open", _OPEN, repr(self.clock()), repr(until), "1" if force else "0")
        except self.redis.errors as e:
            self._lost(e)  # open here; published when Redis answers again
            return
        self._fresh_until = self.clock() + self.refresh_s
        self._adopt(out)

    def neutral(self) -> None:
        if self._held and not self._alone:
            with self._lock:
                self._held -= 1
            try:
                self._run("release", _RELEASE)
            except self.redis.errors as e:
                self._lost(e)
        super().neutral()


__all__ = ["RedisCircuit"]
