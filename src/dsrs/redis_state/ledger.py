"""The usage ledger on a Redis stream (`RedisLedger`, `ledger_from_env`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .state import RedisState, _safe_url

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

    from ..ledger import Row, Summary

log = logging.getLogger("dsrs.redis")


class RedisLedger:
    """`ledger.Ledger` on the Redis stream `dsrs:usage` (capped near `maxlen` entries).

    `record` never waits for Redis: entries queue in memory and a writer thread sends them in
    pipelined batches. While Redis is down they wait (up to `backlog` entries, then the oldest
    are dropped with a warning) and go out when it is back; `flush()` (also at `close()` and at
    exit) sends what is queued.
    """

    def __init__(self, state: RedisState, maxlen: int = 1_000_000, backlog: int = 100_000) -> None:
        self.state = state
        self.maxlen = maxlen
        self.stream = state.key("usage")
        self._queue: deque[dict[FieldT, EncodableT]] = deque(maxlen=backlog)
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._sending = threading.Lock()  # one sender at a time: the writer thread or a flush
        self._closed = False

    @property
    def path(self) -> str:
        """Where the entries live (for messages; no password)."""
        return f"{_safe_url(self.state.url)} stream {self.stream}"

    def record(self, completion: Any, *, lane: str | None = None, program: str | None = None,
               latency_s: float | None = None) -> None:  # fmt: skip
        """One call, from its `Completion`. Never raises, never blocks on Redis."""
        u = completion.usage
        lat = completion.latency_s if completion.latency_s is not None else latency_s
        entry: dict[FieldT, EncodableT] = {
            "time": repr(time.time()), "lane": lane or "", "provider": completion.provider or "",
            "model": completion.model or "", "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "cost_msats": "" if u.cost_msats is None else u.cost_msats,
            "cost_source": getattr(u.cost_source, "value", u.cost_source) or "", "cache_hit": int(u.cache_hit),
            "estimated": int(u.estimated), "latency_s": "" if lat is None else repr(lat), "program": program or "",
        }  # fmt: skip
        with self._wake:
            if len(self._queue) == self._queue.maxlen:
                log.warning("usage ledger backlog full (Redis down?): dropping the oldest entry")
            self._queue.append(entry)
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, daemon=True, name="dsrs-redis-ledger")
                self._writer.start()
                import atexit

                atexit.register(self.close)
            self._wake.notify()

    def _send(self) -> bool:
        """Send what is queued; False when Redis refused (the entries stay queued)."""
        with self._sending:
            return self._send_locked()

    def _send_locked(self) -> bool:
        while True:
            with self._wake:
                batch = [self._queue[i] for i in range(min(500, len(self._queue)))]
            if not batch:
                return True
            pipe = self.state.client.pipeline(transaction=False)
            for e in batch:
                pipe.xadd(self.stream, e, maxlen=self.maxlen, approximate=True)
            try:
                self.state.call(pipe.execute)
            except self.state.errors as e:
                log.warning("could not write the usage ledger to Redis (%s); %d entries wait", type(e).__name__,
                            len(self._queue))  # fmt: skip
                return False
            with self._wake:
                for _ in batch:
                    self._queue.popleft()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue:
                    return
            if not self._send():
                with self._wake:
                    self._wake.wait(1.0)  # Redis down: try again in a second

    def flush(self, timeout: float = 5.0) -> bool:
        """Send everything queued now; True when the queue is empty."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            if not self._send():
                return False
        return not self._queue

    def close(self) -> None:
        if self._closed:
            return
        if not self.flush():
            log.warning("usage ledger: %d entries could not reach Redis before closing", len(self._queue))
        with self._wake:
            self._closed = True
            self._wake.notify()

    def rows(self, since: float | None = None) -> list[Row]:
        from ..ledger import Row

        self.flush()
        start = "-" if not since else str(int(since * 1000))
        raw = self.state.call(lambda: self.state.client.xrange(self.stream, min=start))
        out: list[Row] = []
        for _id, f in raw:
            out.append(Row(
                float(f["time"]), f["lane"] or None, f["provider"], f["model"], int(f["prompt_tokens"]),
                int(f["completion_tokens"]), int(f["total_tokens"]),
                int(f["cost_msats"]) if f["cost_msats"] != "" else None, f["cost_source"] or None,
                f["cache_hit"] == "1", f["estimated"] == "1", float(f["latency_s"]) if f["latency_s"] else None,
                f["program"] or None,
            ))  # fmt: skip
        return out

    def summary(self, by: str = "model", since: float | None = None) -> list[Summary]:
        """Calls, tokens and cost grouped like `Ledger.summary` (model, provider, lane, day, program)."""
        import datetime

        from ..ledger import Summary

        keyf: dict[str, Callable[[Row], str]] = {
            "model": lambda r: f"{r.provider}/{r.model}",
            "provider": lambda r: r.provider,
            "lane": lambda r: r.lane or "-",
            "day": lambda r: datetime.datetime.fromtimestamp(r.time, datetime.UTC).date().isoformat(),
            "program": lambda r: r.program or "-",
        }
        f = keyf.get(by)
        if f is None:
            raise ConfigurationError(f"cannot group usage by {by!r}", hint="by: " + ", ".join(keyf))
        groups: dict[str, list[Row]] = {}
        for r in self.rows(since):
            groups.setdefault(f(r), []).append(r)
        out: list[Summary] = []
        for k, rs in groups.items():
            out.append(Summary(
                k, len(rs), sum(r.prompt_tokens for r in rs), sum(r.completion_tokens for r in rs),
                sum(r.total_tokens for r in rs), sum(r.cost_msats or 0 for r in rs),
                sum(r.cost_msats is None for r in rs), sum(r.cache_hit for r in rs),
                min(r.time for r in rs), max(r.time for r in rs),
            ))  # fmt: skip
        return sorted(out, key=lambda s: s.key if by == "day" else s.first)


def ledger_from_env() -> RedisLedger | None:
    """The shared usage ledger when DSRS_REDIS_URL is set (what `dsrs usage` reads), else None."""
    import os

    url = os.environ.get("DSRS_REDIS_URL")
    return RedisLedger(RedisState(url)) if url else None
