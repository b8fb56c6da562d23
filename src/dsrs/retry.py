"""The retry rule, once, for every provider: the official openai/anthropic SDKs' schedule.

2 retries by default; wait `min(0.5 * 2**n, 8)` s times jitter in [0.75, 1]; a server's
`retry-after-ms`, then `retry-after` (seconds or HTTP date), wins when it is in (0, 60] s;
`x-should-retry: true|false` overrides the status rule; 408/409/429/5xx and transport errors
retry, quota errors never do.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from .errors import DsrsError, RateLimitError

T = TypeVar("T")

INITIAL_DELAY = 0.5
MAX_DELAY = 8.0
MAX_RETRY_AFTER = 60.0


def parse_retry_after(headers: Mapping[str, str] | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait as the server asked, or None."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return float(ra)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


def should_retry_header(headers: Mapping[str, str] | None) -> bool | None:
    v = (headers or {}).get("x-should-retry")
    if v == "true":
        return True
    if v == "false":
        return False
    return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rand: Callable[[], float] = random.random

    def delay(self, retries_done: int, retry_after: float | None) -> float:
        if retry_after is not None and 0 < retry_after <= MAX_RETRY_AFTER:
            return retry_after
        base = min(INITIAL_DELAY * 2.0**retries_done, MAX_DELAY)
        return base * (1 - 0.25 * self.rand())

    async def run(self, attempt: Callable[[], Awaitable[T]], failed: DsrsError | None = None) -> T:
        """Run `attempt` until it succeeds, fails for good, or retries run out.

        `failed`: the error of a first attempt the caller already made itself (a caller that
        awaits its first try directly keeps one coroutine frame out of the successful path)."""
        n = 0
        while True:
            try:
                if failed is not None:
                    e, failed = failed, None
                    raise e
                return await attempt()
            except DsrsError as e:
                decision = getattr(e, "should_retry", None)
                retry = e.retryable if decision is None else decision
                if not retry or n >= self.max_retries:
                    e.attempts = n + 1  # type: ignore[attr-defined]
                    raise
                retry_after = e.retry_after if isinstance(e, RateLimitError) else getattr(e, "retry_after", None)
                await self.sleep(self.delay(n, retry_after))
                n += 1
