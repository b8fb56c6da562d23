"""What every backend offers the LM layer, and the shared part of the HTTP ones.

A backend translates a normalized `Request` into its protocol and back. It does not retry,
cache, price or route: `dsrs.lm.BaseLM` does that once for all of them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

from .. import errors
from ..http import Endpoint
from ..types import Completion, Request
from .services import Service


class Backend(Protocol):
    async def complete(self, req: Request) -> Completion: ...

    def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        """Text deltas, then exactly one final `Completion` (usage included)."""
        ...


class Secret:
    """A string that never shows itself in a repr, str or traceback."""

    __slots__ = ("_v",)

    def __init__(self, value: str) -> None:
        self._v = value

    def get(self) -> str:
        return self._v

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._v == self._v

    def __hash__(self) -> int:
        return hash(self._v)


def api_key(service: Service, explicit: Secret | None) -> str | None:
    if explicit is not None:
        return explicit.get()
    for env in service.key_envs:
        v = os.environ.get(env)
        if v:
            return v
    if service.key_required:
        raise errors.MissingApiKeyError(
            f"no API key for {service.name}",
            provider=service.name,
            hint=f"set {' or '.join(service.key_envs)}, or pass with_api_key(...)",
        )
    return None


def base_url(service: Service, explicit: str | None) -> str:
    url = explicit or (os.environ.get(service.base_url_env) if service.base_url_env else None) or service.base_url
    if not url:
        raise errors.ConfigurationError(
            f"no base URL for {service.name}",
            provider=service.name,
            hint=f"set {service.base_url_env} or pass with_base_url(...)",
        )
    if service.name == "ollama" and "://" not in url:  # OLLAMA_HOST may be host:port
        url = "http://" + url
    return url.rstrip("/")


class HttpBackend:
    """Shared setup for HTTP protocols: the endpoint, auth header, timeouts, capability checks."""

    def __init__(self, service: Service, model: str, opts: dict[str, Any]) -> None:
        self.service = service
        self.model = model
        self.opts = opts
        self.base = base_url(service, opts.get("base_url"))
        key = api_key(service, opts.get("api_key"))
        self._key = key
        headers = {"Content-Type": "application/json"}
        if key:
            headers[service.auth_header] = service.auth_prefix + key
        headers.update(opts.get("headers") or {})
        self.headers = headers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.service.name}/{self.model})"

    def endpoint(self, path: str, headers: dict[str, str] | None = None) -> Endpoint:
        timeout = self.opts.get("timeout")
        return Endpoint(
            url=path if "://" in path else self.base + path,
            headers=headers or self.headers,
            provider=self.service.name,
            model=self.model,
            connect_timeout=min(timeout, 10.0) if timeout else 10.0,
            read_timeout=timeout or 600.0,
            secrets=(self._key,) if self._key else (),
        )

    def check(self, req: Request) -> None:
        """Refuse what this service cannot do, before anything is sent."""
        s = self.service
        if req.tools and not s.tools:
            raise errors.UnsupportedFeatureError(
                "this provider does not support tools", provider=s.name, model=self.model
            )
        rf = req.response_format
        if rf and rf.get("type") == "json_schema" and not s.json_schema:
            raise errors.UnsupportedFeatureError(
                "this provider does not support JSON-schema output",
                provider=s.name,
                model=self.model,
                hint="use response_format={'type': 'json_object'} or another provider",
            )
