"""The answer cache in Redis (`RedisStore`)."""

from __future__ import annotations

import json
from typing import Any

from .state import RedisState


class RedisStore:
    """A `cache.Store` in Redis: JSON text under `dsrs:cache:<key>`, optionally expiring."""

    def __init__(self, state: RedisState, ttl_s: int | None = None) -> None:
        self.state = state
        self.ttl_s = ttl_s

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            blob = self.state.call(lambda: self.state.client.get(self.state.key("cache", key)))
        except self.state.errors:
            return None
        if blob is None:
            return None
        try:
            v = json.loads(blob)
        except ValueError:
            return None
        return v if isinstance(v, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        blob = json.dumps(value, ensure_ascii=False)
        try:
            self.state.call(lambda: self.state.client.set(self.state.key("cache", key), blob, ex=self.ttl_s))
        except self.state.errors:
            pass
