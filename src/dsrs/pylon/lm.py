"""PylonLM: the Pylon modes as one LM. Swarm (NIP-90 jobs, paid), local (Ollama, llama.cpp, the
embedded engine) and hybrid (local first under a timeout, then the swarm).

Cache, retries, pricing and usage hooks stay in `BaseLM`; this module only picks the backend.
Swarm jobs default to no automatic retry (a retry is a new, separately paid job).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from .. import errors
from ..lm import LM, BaseLM
from ..providers.base import Backend
from ..types import Completion, CostSource, Request
from . import swarm
from ..budget import Budget

_LOCAL = {"ollama": "ollama", "llama.cpp": "llamacpp", "llamacpp": "llamacpp", "embedded": "embedded"}
_DEFAULT_MODEL = {"ollama": "llama3.2", "llamacpp": "default", "embedded": "gemma-3-270m"}
# Local failures that hand the request to the swarm in hybrid mode (override with with_fallback_on).
FALLBACK_ON: tuple[type[BaseException], ...] = (errors.APIConnectionError, errors.ProviderUnavailableError,
                                                errors.NotFoundError, asyncio.TimeoutError)  # fmt: skip


def relays_from(relay_url: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The relay argument, else PYLON_RELAY_URL (comma or space separated), else the default relay."""
    raw = relay_url if relay_url is not None else os.environ.get("PYLON_RELAY_URL") or swarm.DEFAULT_RELAY
    urls = raw.replace(",", " ").split() if isinstance(raw, str) else [str(u) for u in raw]
    for u in urls:
        if not u.startswith(("wss://", "ws://")):
            raise errors.ConfigurationError(f"not a relay URL: {u!r}", provider="pylon", hint="use wss://host[:port]")
    if not urls:
        raise errors.ConfigurationError("no relay URL", provider="pylon", hint="pass new_swarm('wss://...')")
    return tuple(dict.fromkeys(urls))


class PylonLM(BaseLM):
    """`PylonLM.new_swarm(...)`, `PylonLM.new_local()`, `PylonLM.new_hybrid()`; then `with_*` builders."""

    provider = "pylon"

    def __init__(self, mode: str = "swarm", **opts: Any) -> None:
        if mode not in ("swarm", "local", "hybrid"):
            raise errors.ConfigurationError(f"unknown Pylon mode {mode!r}", hint="swarm, local or hybrid")
        self.mode = mode
        if mode != "local":
            opts.setdefault("retries", 0)
        super().__init__(**opts)

    @classmethod
    def new_swarm(cls, relay_url: str | list[str] | None = None) -> PylonLM:
        return cls("swarm", relays=relays_from(relay_url))

    @classmethod
    def new_local(cls) -> PylonLM:
        return cls("local")

    @classmethod
    def new_hybrid(cls, relay_url: str | list[str] | None = None) -> PylonLM:
        return cls("hybrid", relays=relays_from(relay_url))

    def _extra_options(self) -> tuple[str, ...]:
        return ("relays", "bid_msats", "budget", "wallet", "auto_pay", "fee_cap_msats", "provider_pubkey", "keys",
                "fresh_keys", "swarm_budget", "backend", "model", "swarm_model", "local_timeout", "swarm_fallback", "fallback_on")  # fmt: skip

    @property
    def model(self) -> str:  # type: ignore[override]
        if self.mode == "swarm":
            return str(self._opts.get("model") or "")
        kind = self._local_kind()
        return str(self._opts.get("model") or _DEFAULT_MODEL[kind])

    def __repr__(self) -> str:
        return super().__repr__().replace("PylonLM(pylon/", f"PylonLM({self.mode}/", 1)

    def _set(self, opts: dict[str, Any]) -> None:
        """Every way in (constructor, `with_options`, a gateway lane) gets the same checks as the
        builders: a wallet URI becomes an `NwcWallet` and a secret key a `Keys`, so secrets never sit
        in the options as strings (or show in reprs)."""
        opts = dict(opts)
        w = opts.get("wallet")
        if isinstance(w, str):
            from .wallet import NwcWallet

            opts["wallet"] = NwcWallet(w)
        elif w is not None and not callable(getattr(w, "pay_invoice", None)):
            raise errors.ConfigurationError(f"a wallet must be a Wallet (e.g. NwcWallet) or a NWC URI, not {type(w).__name__}",
                                            provider="pylon", hint="with_wallet('nostr+walletconnect://...')")  # fmt: skip
        if opts.get("keys") is not None:
            from ..nostr import Keys

            if not isinstance(opts["keys"], Keys):
                opts["keys"] = Keys(opts["keys"])
        if opts.get("relays") is not None:
            opts["relays"] = relays_from(opts["relays"])
        if opts.get("provider_pubkey") is not None:
            from ..nostr.keys import pubkey_hex

            opts["provider_pubkey"] = pubkey_hex(opts["provider_pubkey"])
        super()._set(opts)

    # -- builders -----------------------------------------------------------------------------
    def with_budget_msats(self, n: int) -> PylonLM:
        """A spending limit for swarm payments, shared by this LM and its copies."""
        return self.with_budget(Budget(n))

    def with_budget(self, budget: Budget) -> PylonLM:
        """Each swarm job reserves its bid + fee cap on `budget` before it is published (a call that
        cannot fit fails at once with BudgetExceededError), settles to what was paid, releases when
        nothing was (local calls are free and go through BaseLM's guard). Without with_bid_msats,
        the bid (at most 10,000 msats) is lowered until it fits the budget with its fee cap."""
        if self.mode == "local":
            return self._with(budget=budget)
        return self._with(swarm_budget=budget)

    def with_bid_msats(self, n: int) -> PylonLM:
        if not isinstance(n, int) or n <= 0:
            raise errors.ConfigurationError(f"a bid must be a positive int of msats, got {n!r}", provider="pylon")
        return self._with(bid_msats=n)

    def with_wallet(self, wallet: Any) -> PylonLM:
        """A `Wallet` (e.g. `NwcWallet(uri)`), or a nostr+walletconnect:// URI."""
        return self._with(wallet=wallet)

    def with_auto_pay(self, on: bool = True) -> PylonLM:
        return self._with(auto_pay=on)

    def with_fee_cap_msats(self, n: int) -> PylonLM:
        return self._with(fee_cap_msats=n)

    def with_provider(self, pubkey: str) -> PylonLM:
        """Send jobs to one provider (npub or hex) and accept answers from it only."""
        return self._with(provider_pubkey=pubkey)

    def with_keys(self, keys: Any) -> PylonLM:
        """The customer identity (a `Keys`, nsec or hex); default PYLON_NSEC/KEY_FILE/MNEMONIC, else fresh per job."""
        return self._with(keys=keys)

    def with_fresh_keys(self, on: bool = True) -> PylonLM:
        return self._with(fresh_keys=on)

    def with_relays(self, *urls: str) -> PylonLM:
        return self._with(relays=list(urls))

    def with_backend(self, backend: str) -> PylonLM:
        if backend not in _LOCAL:
            raise errors.ConfigurationError(f"unknown local backend {backend!r}", provider="pylon",
                                            hint="ollama, llama.cpp or embedded")  # fmt: skip
        return self._with(backend=backend)

    def with_model(self, model: str) -> PylonLM:
        return self._with(model=model)

    def with_swarm_model(self, model: str) -> PylonLM:
        return self._with(swarm_model=model)

    def with_local_timeout(self, seconds: float | Any) -> PylonLM:
        if hasattr(seconds, "total_seconds"):
            seconds = seconds.total_seconds()
        return self._with(local_timeout=float(seconds))

    def with_swarm_fallback(self, on: bool = True) -> PylonLM:
        return self._with(swarm_fallback=on)

    def with_fallback_on(self, *error_types: type[BaseException]) -> PylonLM:
        return self._with(fallback_on=tuple(error_types))

    def worst_case_msats(self, req: Request) -> int:
        """For budgets applied around calls (lanes, dsrs.configure(budget=...)): local is free, a swarm
        job costs at most its bid plus the fee cap (hybrid without swarm fallback never pays)."""
        if self.mode == "local" or (self.mode == "hybrid" and not self._opts.get("swarm_fallback", True)):
            return 0
        cfg = self.swarm_config()
        return cfg.bid_msats + swarm.fee_cap(cfg, cfg.bid_msats)

    # -- backends -----------------------------------------------------------------------------
    def _local_kind(self) -> str:
        return _LOCAL[self._opts.get("backend") or "embedded"]

    def _local_lm(self) -> LM:
        kind = self._local_kind()
        passthrough = {k: v for k, v in self._opts.items() if k in ("base_url", "api_key", "headers", "num_ctx", "timeout")}
        if self.mode == "hybrid":
            passthrough.pop("timeout", None)
        return LM(f"{kind}/{self.model}", **passthrough)

    def swarm_config(self) -> swarm.SwarmConfig:
        from ..nostr import Keys

        o = self._opts
        wallet = o.get("wallet")
        if wallet is None and os.environ.get("PYLON_NWC_URI"):
            from .wallet import NwcWallet

            wallet = NwcWallet()
        keys = None if o.get("fresh_keys") else (o.get("keys") or Keys.from_env())
        budget = o.get("swarm_budget")
        bid = o.get("bid_msats") or _default_bid(budget.limit_msats if budget else None, o.get("fee_cap_msats"))
        return swarm.SwarmConfig(
            relays=o.get("relays") or relays_from(None), bid_msats=bid, timeout=o.get("timeout") or 60.0,
            wallet=wallet, budget=budget, auto_pay=o.get("auto_pay", True), fee_cap_msats=o.get("fee_cap_msats"),
            provider=o.get("provider_pubkey"), keys=keys,
        )  # fmt: skip

    def _make_backend(self) -> Backend:
        if self.mode == "local":
            return _Local(self._local_lm().backend)
        model = self._opts.get("model") if self.mode == "swarm" else self._opts.get("swarm_model")
        sw = _Swarm(self.swarm_config(), model or "")
        if self.mode == "swarm":
            return sw
        return _Hybrid(_Local(self._local_lm().backend), sw if self._opts.get("swarm_fallback", True) else None,
                       self._opts.get("local_timeout") or 5.0, self._opts.get("fallback_on") or FALLBACK_ON)  # fmt: skip


def _default_bid(limit: int | None, cap: int | None) -> int:
    """10,000 msats, lowered until it fits `limit` together with its fee cap (at least 1)."""
    bid = 10_000 if limit is None else min(10_000, limit)
    if limit is not None:
        cfg = swarm.SwarmConfig((), fee_cap_msats=cap)
        while bid > 1 and bid + swarm.fee_cap(cfg, bid) > limit:
            bid = max(1, min(bid - 1, limit - swarm.fee_cap(cfg, bid)))
    return bid


def _free(c: Completion) -> Completion:
    if c.usage.cost_source is None or c.usage.cost_msats is None:
        c.usage = dataclasses.replace(c.usage, cost_msats=0, cost_source=CostSource.FREE)
    return c


class _Local:
    """A local backend whose completions cost nothing."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    async def complete(self, req: Request) -> Completion:
        return _free(await self.inner.complete(req))

    async def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        async for item in self.inner.stream(req):
            yield _free(item) if isinstance(item, Completion) else item


class _Swarm:
    def __init__(self, cfg: swarm.SwarmConfig, model: str) -> None:
        self.cfg = cfg
        self.model = model

    async def complete(self, req: Request) -> Completion:
        return await swarm.run(self.cfg, dataclasses.replace(req, model=self.model))

    def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        return swarm.stream(self.cfg, dataclasses.replace(req, model=self.model))


class _Hybrid:
    """Local first under `timeout`; on a timeout or a listed failure, the swarm (when enabled)."""

    def __init__(self, local: _Local, sw: _Swarm | None, timeout: float, fallback_on: tuple[type[BaseException], ...]):
        self.local, self.swarm, self.timeout, self.fallback_on = local, sw, timeout, fallback_on

    def _fallback(self, e: BaseException) -> _Swarm:
        if self.swarm is None or not isinstance(e, self.fallback_on):
            if isinstance(e, asyncio.TimeoutError) and not isinstance(e, errors.TimeoutError):
                raise errors.TimeoutError(f"local model did not answer within {self.timeout}s", provider="pylon",
                                          hint="raise with_local_timeout(...) or enable with_swarm_fallback(True)") from None  # fmt: skip
            raise e
        return self.swarm

    async def complete(self, req: Request) -> Completion:
        try:
            return await asyncio.wait_for(self.local.complete(req), self.timeout)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            sw = self._fallback(e)
        return await sw.complete(req)

    async def stream(self, req: Request) -> AsyncIterator[str | Completion]:
        agen = cast("AsyncGenerator[str | Completion, None]", self.local.stream(req))  # an async generator
        try:
            first = await asyncio.wait_for(agen.__anext__(), self.timeout)
        except BaseException as e:
            await agen.aclose()
            if isinstance(e, asyncio.CancelledError):
                raise
            sw = self._fallback(e)
            async for item in sw.stream(req):
                yield item
            return
        try:
            yield first
            async for item in agen:
                yield item
        finally:
            await agen.aclose()
