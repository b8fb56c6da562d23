"""The retry rule, once, for every provider: the official openai/anthropic SDKs' schedule.

2 retries by default; wait `min(0.5 * 2**n, 8)` s times jitter in [0.75, 1]; a server's
`retry-after-ms`, then `retry-after` (seconds or HTTP date), wins when it is in (0, cap] s;
`x-should-retry: true|false` overrides the status rule; 408/409/429/5xx and transport errors
retry, quota errors never do. A retry-after that is not a finite number >= 0 counts as absent.

The cap follows each provider's own SDK (`SDK_RETRY_AFTER`, keyed by wire protocol):
openai-python 3.x (OpenAI chat, every OpenAI-compatible service, the Responses API) honours up
to 120 s and does not retry at all above it (even when `x-should-retry: true`);
anthropic-sdk-python honours up to 60 s and backs off as usual above it. The other protocols
(Gemini, Ollama, Cohere, local engines) keep the Anthropic-style rule.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from .errors import DsrsError, RateLimitError

T = TypeVar("T")

INITIAL_DELAY = 0.5
MAX_DELAY = 8.0
MAX_RETRY_AFTER = 60.0  # the default cap (anthropic-sdk-python)

# protocol -> (the longest retry-after honoured, whether a longer one still retries with backoff)
SDK_RETRY_AFTER: dict[str, tuple[float, bool]] = {
    "openai_chat": (120.0, False),  # openai-python 3.x: MAX_RETRY_AFTER_DELAY = 2 * 60, `_should_retry`
    "responses": (120.0, False),
    "anthropic": (60.0, True),  # anthropic-sdk-python: `0 < retry_after <= 60`, else backoff
}


def sdk_rule(provider: str | None) -> tuple[float, bool]:
    """(cap, retry above the cap?) for a provider (service name), as its official SDK does."""
    if provider:
        from .providers.services import SERVICES  # plain data, already loaded by any LM

        svc = SERVICES.get(provider)
        if svc is not None:
            return SDK_RETRY_AFTER.get(svc.protocol, (MAX_RETRY_AFTER, True))
    return MAX_RETRY_AFTER, True


def _seconds(v: float) -> float | None:
    return v if math.isfinite(v) and v >= 0 else None


def parse_retry_after(headers: Mapping[str, str] | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait as the server asked, or None."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return _seconds(float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return _seconds(float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, OverflowError):
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

    def delay(self, retries_done: int, retry_after: float | None, provider: str | None = None) -> float:
        cap = sdk_rule(provider)[0] if provider else MAX_RETRY_AFTER
        if retry_after is not None and math.isfinite(retry_after) and 0 < retry_after <= cap:
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
                retry_after = e.retry_after if isinstance(e, RateLimitError) else getattr(e, "retry_after", None)
                if not should_retry(e) or n >= self.max_retries:
                    e.attempts = n + 1  # type: ignore[attr-defined]
                    raise
                await self.sleep(self.delay(n, retry_after, e.provider))
                n += 1


def should_retry(e: DsrsError) -> bool:
    """May `e` be retried on the same lane: the SDK's retry-after cap, then `x-should-retry`, then the class."""
    ra = getattr(e, "retry_after", None)
    if ra is not None and math.isfinite(ra):
        cap, above = sdk_rule(e.provider)
        if ra > cap and not above:
            return False
    decision = getattr(e, "should_retry", None)
    return e.retryable if decision is None else decision
