"""One Redis connection pool and whether Redis answered last time (`RedisState`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..errors import ConfigurationError

log = logging.getLogger("dsrs.redis")

PREFIX = "dsrs:"


class RedisState:
    """One Redis connection pool and whether Redis is reachable (`up`, `last_error`)."""

    def __init__(self, url: str, *, timeout: float = 1.0, prefix: str = PREFIX) -> None:
        try:
            import redis
        except ImportError as e:  # pragma: no cover - the extra is missing
            raise ConfigurationError(
                "Redis support needs the redis package", hint="pip install 'dsrs[gateway]'"
            ) from e
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.up = True
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._scripts: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RedisState({_safe_url(self.url)!r}, {'up' if self.up else 'down'})"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def script(self, name: str, source: str) -> Any:
        with self._lock:
            s = self._scripts.get(name)
            if s is None:
                s = self._scripts[name] = self.client.register_script(source)
            return s

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run one Redis operation, tracking `up`; Redis errors propagate."""
        try:
            out = fn()
        except self.errors as e:
            self._down(e)
            raise
        if not self.up:
            log.warning("Redis at %s is reachable again", _safe_url(self.url))
        self.up, self.last_error = True, None
        return out

    def _down(self, e: BaseException) -> None:
        if self.up:
            log.warning("Redis at %s is unreachable: %s", _safe_url(self.url), type(e).__name__)
        self.up, self.last_error = False, f"{type(e).__name__}: {e}"[:200]

    def ping(self) -> bool:
        try:
            self.call(self.client.ping)
        except self.errors:
            return False
        return True

    def close(self) -> None:
        self.client.close()


def _safe_url(url: str) -> str:
    """The URL without a password (redis://:secret@host -> redis://***@host)."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url

