"""Resolve "provider/model" (or a bare model name) to a service row and its wire protocol."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UnknownProviderError
from .providers.services import PREFIXES, SERVICES, Service


def resolve(spec: str) -> tuple[Service, str]:
    """("openai/gpt-4o") -> (the openai row, "gpt-4o"); bare names resolve by prefix."""
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownProviderError(
            f"a model must be a non-empty string like 'openai/gpt-4o-mini', got {spec!r}",
            hint="known providers: " + ", ".join(sorted(SERVICES)),
        )
    provider, sep, model = spec.partition("/")
    if sep and provider in SERVICES:
        if not model:
            raise UnknownProviderError(f"no model after '{provider}/'", hint=f"write '{provider}/<model>'")
        return SERVICES[provider], model
    for prefix, name in PREFIXES:
        if spec.startswith(prefix):
            return SERVICES[name], spec
    if sep:
        msg = f"unknown provider {provider!r} in {spec!r}"
    else:
        msg = f"cannot tell the provider of the bare model name {spec!r}"
    raise UnknownProviderError(msg, hint="write 'provider/model'; known providers: " + ", ".join(sorted(SERVICES)))


def protocol(service: Service) -> ModuleType:
    """The wire module of a service, imported on first use."""
    try:
        return importlib.import_module(f"dsrs.providers.{service.protocol}")
    except ModuleNotFoundError as e:
        if e.name == f"dsrs.providers.{service.protocol}":
            raise UnknownProviderError(
                f"the {service.protocol!r} wire protocol for provider {service.name!r} is not built yet",
                provider=service.name,
            ) from None
        raise
