"""What a config becomes at startup: lane LMs, routes by model name, budgets, client keys, shared state."""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from typing import Any

from .. import ledger as ledger_mod
from ..budget import Budget
from ..cache import Cache
from ..errors import ConfigurationError
from .config import Config, KeyConfig, LaneConfig, key_hash

log = logging.getLogger("dsrs.gateway")

ANONYMOUS = KeyConfig("anonymous", "0" * 64)


@dataclass
class Route:
    """What answers one model name: an LM or a LaneMux, and the lane name when it is a single lane."""

    name: str
    target: Any
    lane: str | None


class Runtime:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.redis = None
        if cfg.redis_url:
            from ..redis_state import RedisState

            self.redis = RedisState(cfg.redis_url)
        self.budgets: dict[str, Budget] = {n: self._budget(b) for n, b in cfg.budgets.items()}
        self.cache = self._cache()
        self.lanes: dict[str, Any] = {n: self._lane(lc) for n, lc in cfg.lanes.items()}
        self._circuits: dict[str, Any] = {}  # lane name -> its circuit breaker (multi-lane models)
        self.routes: dict[str, Route] = {n: Route(n, self.lanes[n], n) for n in cfg.lanes}
        for n, m in cfg.models.items():
            if len(m.lanes) == 1:
                self.routes[n] = Route(n, self.lanes[m.lanes[0]], m.lanes[0])
            else:
                self.routes[n] = Route(n, self._mux(m.lanes, m.policy), None)
        self._keys = {k.sha256: k for k in cfg.keys.values()}
        from ..redis_state import RateLimiter

        self.limiter = RateLimiter(self.redis)
        self.ledger: Any = None  # DSRS_LEDGER=off records nothing
        if ledger_mod.enabled():
            if self.redis is not None:
                from ..redis_state import RedisLedger

                self.ledger = RedisLedger(self.redis)
            else:
                self.ledger = ledger_mod.default_ledger()

    # -- building ---------------------------------------------------------------------------
    def _budget(self, b: Any) -> Budget:
        if self.redis is not None:
            from ..redis_state import RedisBudget

            return RedisBudget(self.redis, b.name, b.limit_msats, soft=b.soft, allow_unpriced=b.allow_unpriced,
                               on_down=self.cfg.on_down)  # fmt: skip
        return Budget(b.limit_msats, soft=b.soft, allow_unpriced=b.allow_unpriced, name=b.name)

    def _cache(self) -> Cache | bool:
        if not self.cfg.cache:
            return False
        if self.redis is not None:
            from ..redis_state import RedisStore

            return Cache(store=RedisStore(self.redis, self.cfg.cache_ttl_s))
        return True  # the process's default cache (memory + SQLite)

    def _lane(self, lc: LaneConfig) -> Any:
        opts: dict[str, Any] = dict(lc.options)
        if lc.base_url:
            opts["base_url"] = lc.base_url
        if lc.api_key_env:
            key = os.environ.get(lc.api_key_env)
            if not key:
                raise ConfigurationError(f"gateway config [lanes.{lc.name}]: {lc.api_key_env} is empty or unset",
                                         hint="export the provider key before starting the gateway")  # fmt: skip
            opts["api_key"] = key
        use_cache = self.cfg.cache if lc.cache is None else lc.cache
        opts["cache"] = self.cache if use_cache and self.cache else False
        lm = self._construct(lc, opts)
        # with_budget, not an option: a Pylon swarm lane books its payments on it (see PylonLM.with_budget)
        return lm.with_budget(self.budgets[lc.budget]) if lc.budget else lm

    def _construct(self, lc: LaneConfig, opts: dict[str, Any]) -> Any:
        try:
            if lc.kind == "lm":
                from ..lm import LM

                return LM(lc.model, **opts)
            if lc.kind == "codex-sdk":
                from ..codex_sdk import CodexSdkLM

                return CodexSdkLM(lc.model, **opts)
            try:  # kind "pylon"
                from ..pylon import PylonLM
            except ImportError as e:
                raise ConfigurationError(f"Pylon lanes need the pylon extra ({e})", hint="pip install 'dsrs[pylon]'") from None
            mode = opts.pop("mode", "swarm")  # options.mode: "swarm", "local" or "hybrid"
            return PylonLM(mode, **({"model": lc.model} if lc.model else {}), **opts)
        except ConfigurationError as e:
            e.message = f"gateway config [lanes.{lc.name}]: {e.message}"
            e.args = (str(e),)
            raise

    def _mux(self, lanes: tuple[str, ...], policy: str) -> Any:
        try:
            from ..lanes import LaneMux
        except ImportError as e:
            raise ConfigurationError("models with several lanes need dsrs.lanes.LaneMux", hint=str(e)) from None
        mux = LaneMux(policy=policy)
        for n in lanes:
            lc = self.cfg.lanes[n]
            mux = mux.add_lane(n, self.lanes[n], circuit=self._circuit(n), **lc.hints)
        return mux

    def _circuit(self, lane: str) -> Any:
        """The lane's circuit breaker, one per lane (a lane in several models is one circuit): shared
        through Redis by every gateway process when [redis] is set, else this process's own."""
        cb = self._circuits.get(lane)
        if cb is None:
            c = self.cfg.circuit
            if self.redis is not None and c.shared:
                from ..redis_state.circuit import RedisCircuit

                cb = RedisCircuit(self.redis, lane, failures=c.failures, cooldown_s=c.cooldown_s, refresh_s=c.refresh_s)
            else:
                from ..lanes import CircuitBreaker

                cb = CircuitBreaker(failures=c.failures, cooldown_s=c.cooldown_s)
            self._circuits[lane] = cb
        return cb

    # -- per request ------------------------------------------------------------------------
    def client(self, authorization: str | None) -> KeyConfig | None:
        """The client key for an `Authorization: Bearer ...` header; None when missing or unknown."""
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        if not token:
            return None if self.cfg.require_keys else ANONYMOUS
        digest = key_hash(token)
        k = self._keys.get(digest)
        if k is not None and hmac.compare_digest(k.sha256, digest):
            return k
        if not self.cfg.require_keys and not self._keys:
            return ANONYMOUS  # a private gateway: any bearer value (SDKs insist on sending one)
        return None

    def admin(self, authorization: str | None) -> bool:
        """Is this `Authorization` header the admin key? (False when no admin key is configured.)"""
        want = self.cfg.admin_sha256
        if not want or not authorization or authorization[:7].lower() != "bearer ":
            return False
        return hmac.compare_digest(want, key_hash(authorization[7:].strip()))

    def budgets_for(self, key: KeyConfig) -> list[Budget]:
        names = [self.cfg.budget, key.budget]
        return [self.budgets[n] for n in names if n]

    def health(self) -> dict[str, Any]:
        redis_up = self.redis.ping() if self.redis is not None else None
        if self.redis is None:
            mode = "local"  # in-process budgets, no Redis configured
        elif redis_up:
            mode = "shared"
        else:
            mode = "fail_closed" if self.cfg.on_down == "fail_closed" else "local_fallback"
        lost = {name: why for name, b in self.budgets.items() if (why := getattr(b, "lost", None))}
        if lost and redis_up:
            mode = "books_lost"  # Redis came back without the books: those budgets refuse until restored
        d: dict[str, Any] = {
            "status": "degraded" if mode in ("fail_closed", "books_lost") else "ok",
            "redis": None if self.redis is None else {"up": redis_up, "error": None if redis_up else self.redis.last_error},
            "budget_mode": mode,
            "on_redis_down": self.cfg.on_down,
            "models": list(self.routes),
        }
        if lost:
            d["budgets_lost"] = lost
        return d
