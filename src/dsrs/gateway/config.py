"""The gateway's TOML config (`dsrs serve --config dsrs.toml`), validated into dataclasses.

```toml
[gateway]
host = "127.0.0.1"
port = 8088
require_keys = true            # a request without a valid client key gets 401 and spends nothing; false (a
                               # private host: any caller, the [gateway] budget only) is refused with [keys]
                               # defined, since keyless requests would bypass the keys' budgets and limits
max_body_bytes = 4194304
budget = "global"              # a budget every call books on (optional)
# admin_key_env = "DSRS_ADMIN_KEY"  # the admin key's env var (this one by default; or admin_key_sha256 = "<hex>"):
                               # /metrics and the details of /health need it (Authorization: Bearer <admin key>)
public_metrics = false         # true: /metrics without a key (a private network's Prometheus)
header_timeout_s = 15          # a connection's request headers must arrive within this (also idle keep-alive)
body_timeout_s = 60            # a request body must arrive within this (408 otherwise)
max_connections_per_client = 256   # open connections per client address (0: no cap; behind a proxy, all
                                   # clients share its address)

[redis]                        # optional; also DSRS_REDIS_URL. Without it: memory + SQLite, in-process budgets
url = "redis://127.0.0.1:6379/0"
on_down = "fail_closed"        # budgets while Redis is unreachable or has lost its books: "fail_closed", or
                               # "local" (each process books on an outage allowance Redis held for it)
                               # run Redis with appendonly yes (appendfsync always): a Redis that restarts
                               # empty is refused until the books are restored (RedisBudget.restore)
cache_ttl_s = 604800
                               # with [redis], lane circuits are shared too: a lane that one process opens
                               # is open for all (dsrs.redis_state.circuit; [circuit] shared = false: not)

[circuit]                      # the circuit breaker of each lane of a multi-lane model (LaneMux)
failures = 5                   # consecutive failures (in one process) that open the lane
cooldown_s = 30                # how long it stays open before one probe call may try it
shared = true                  # through Redis when [redis] is set (else each process has its own)
refresh_s = 1.0                # shared: how old this process's view of the shared state may get

[cache]
enabled = true                 # the answer cache (Redis when configured, else the SQLite cache)

[lanes.local]                  # each lane is a model name clients can ask for
lm = "llamacpp/gemma"          # any LM string; or kind = "codex-sdk" / "pylon" with model = "..."
base_url = "http://127.0.0.1:8080/v1"
api_key_env = "LLAMA_KEY"      # keys come from the environment, never from this file
budget = "global"
options = { max_tokens = 256, temperature = 0.2 }   # defaults a request may override

hints = { cost_msats = 0 }     # LaneMux hints when the lane is in a multi-lane model

[lanes.swarm]
kind = "pylon"                 # PylonLM; options.mode = "swarm" (default), "local" or "hybrid"
options = { mode = "hybrid", backend = "llamacpp", bid_msats = 2000 }

[lanes.codex]
kind = "codex-sdk"             # CodexSdkLM: the Codex CLI as a lane
model = "gpt-5-codex"

[models."gpt-5.5"]             # a name served by one or more lanes (LaneMux with fallback when several)
lanes = ["local", "swarm"]
policy = "priority"            # LaneMux policy: priority, cheapest, fastest

[budgets.global]
limit_msats = 1_000_000
soft = false
allow_unpriced = false

[keys.alice]
key_env = "ALICE_KEY"          # or key_sha256 = "<hex sha256 of the key>"
budget_msats = 50_000          # alice's own budget (named "key:alice"); or budget = "<shared name>"
rpm = 120                      # requests per minute
models = ["local"]             # allowed models (default: all)
```
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError

LANE_KINDS = ("lm", "codex-sdk", "pylon")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class BudgetConfig:
    name: str
    limit_msats: int
    soft: bool = False
    allow_unpriced: bool = False


@dataclass(frozen=True)
class LaneConfig:
    name: str
    kind: str  # "lm" | "codex-sdk" | "pylon"
    model: str  # the LM string for kind "lm"; the model for the others
    base_url: str | None = None
    api_key_env: str | None = None
    budget: str | None = None
    cache: bool | None = None  # None: [cache] enabled
    options: dict[str, Any] = field(default_factory=dict)
    hints: dict[str, Any] = field(default_factory=dict)  # LaneMux hints (cost_msats, latency_s, ...)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    lanes: tuple[str, ...]
    policy: str = "priority"


@dataclass(frozen=True)
class KeyConfig:
    name: str
    sha256: str = field(repr=False)
    budget: str | None = None
    rpm: int | None = None
    models: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CircuitConfig:
    failures: int = 5
    cooldown_s: float = 30.0
    shared: bool = True
    refresh_s: float = 1.0


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8088
    require_keys: bool = True
    max_body_bytes: int = 4 * 1024 * 1024
    budget: str | None = None
    admin_sha256: str | None = field(default=None, repr=False)
    public_metrics: bool = False
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    max_connections_per_client: int = 256
    redis_url: str | None = field(default=None, repr=False)
    on_down: str = "fail_closed"
    cache_ttl_s: int | None = 7 * 24 * 3600
    cache: bool = True
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    lanes: dict[str, LaneConfig] = field(default_factory=dict)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    budgets: dict[str, BudgetConfig] = field(default_factory=dict)
    keys: dict[str, KeyConfig] = field(default_factory=dict)


def _err(where: str, what: str, hint: str | None = None) -> ConfigurationError:
    return ConfigurationError(f"gateway config {where}: {what}", hint=hint)


def _table(d: Any, where: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise _err(where, "must be a table")
    return d


def _only(d: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    for k in d:
        if k not in known:
            raise _err(where, f"unknown setting {k!r}", "known: " + ", ".join(known))


def _typed(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) and kind is int or not isinstance(v, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _err(where, f"{key} must be {name}, got {v!r:.40}")
    return v


def _name(n: str, where: str) -> str:
    if not _NAME.match(n):
        raise _err(where, f"bad name {n!r}", "use letters, digits and . _ : / -")
    return n


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse(doc: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    _only(doc, "top level", ("gateway", "redis", "cache", "circuit", "lanes", "models", "budgets", "keys"))
    g = _table(doc.get("gateway"), "[gateway]")
    _only(g, "[gateway]", ("host", "port", "require_keys", "max_body_bytes", "budget", "admin_key_env",
                           "admin_key_sha256", "public_metrics", "header_timeout_s", "body_timeout_s",
                           "max_connections_per_client"))  # fmt: skip
    r = _table(doc.get("redis"), "[redis]")
    _only(r, "[redis]", ("url", "url_env", "on_down", "cache_ttl_s"))
    c = _table(doc.get("cache"), "[cache]")
    _only(c, "[cache]", ("enabled",))
    circuit = _circuit(_table(doc.get("circuit"), "[circuit]"))

    budgets: dict[str, BudgetConfig] = {}
    for n, b in _table(doc.get("budgets"), "[budgets]").items():
        where = f"[budgets.{n}]"
        b = _table(b, where)
        _only(b, where, ("limit_msats", "soft", "allow_unpriced"))
        limit = _typed(b, "limit_msats", int, where)
        if limit is None or limit < 0:
            raise _err(where, "limit_msats must be a non-negative integer (msats)")
        budgets[_name(n, where)] = BudgetConfig(n, limit, bool(_typed(b, "soft", bool, where, False)),
                                                bool(_typed(b, "allow_unpriced", bool, where, False)))  # fmt: skip

    def budget_ref(v: Any, where: str) -> str | None:
        if v is None:
            return None
        if v not in budgets:
            raise _err(where, f"budget {v!r} is not defined", "define it under [budgets.<name>]")
        return str(v)

    lanes: dict[str, LaneConfig] = {}
    for n, ln in _table(doc.get("lanes"), "[lanes]").items():
        where = f"[lanes.{n}]"
        ln = _table(ln, where)
        _only(ln, where, ("lm", "kind", "model", "base_url", "api_key_env", "budget", "cache", "options", "hints"))
        kind = _typed(ln, "kind", str, where, "lm")
        if kind not in LANE_KINDS:
            raise _err(where, f"unknown kind {kind!r}", "use " + ", ".join(LANE_KINDS))
        model = _typed(ln, "lm" if kind == "lm" else "model", str, where)
        if kind == "lm" and not model:
            raise _err(where, "needs lm = \"provider/model\"")
        lanes[_name(n, where)] = LaneConfig(
            n, kind, model or "", _typed(ln, "base_url", str, where), _typed(ln, "api_key_env", str, where),
            budget_ref(ln.get("budget"), where), _typed(ln, "cache", bool, where),
            dict(_typed(ln, "options", dict, where, {})), dict(_typed(ln, "hints", dict, where, {})),
        )  # fmt: skip
    if not lanes:
        raise _err("[lanes]", "no lanes", "add at least one [lanes.<name>] with lm = \"provider/model\"")

    models: dict[str, ModelConfig] = {}
    for n, m in _table(doc.get("models"), "[models]").items():
        where = f"[models.{n}]"
        m = _table(m, where)
        _only(m, where, ("lanes", "policy"))
        names = _typed(m, "lanes", list, where)
        if not names or any(x not in lanes for x in names):
            raise _err(where, f"lanes must name defined lanes, got {names!r}", "defined: " + ", ".join(lanes))
        models[_name(n, where)] = ModelConfig(n, tuple(names), _typed(m, "policy", str, where, "priority"))

    keys: dict[str, KeyConfig] = {}
    for n, k in _table(doc.get("keys"), "[keys]").items():
        where = f"[keys.{n}]"
        k = _table(k, where)
        _only(k, where, ("key_env", "key_sha256", "budget", "budget_msats", "rpm", "models"))
        digest = _typed(k, "key_sha256", str, where)
        if k.get("key_env"):
            secret = env.get(k["key_env"])
            if not secret:
                raise _err(where, f"environment variable {k['key_env']} is empty or unset", "export the client key")
            digest = key_hash(secret)
        if not digest or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _err(where, "needs key_env or key_sha256 (64 lowercase hex digits)")
        bname = budget_ref(k.get("budget"), where)
        own = _typed(k, "budget_msats", int, where)
        if own is not None:
            if bname:
                raise _err(where, "set budget or budget_msats, not both")
            bname = f"key:{n}"
            budgets[bname] = BudgetConfig(bname, own)
        allowed = _typed(k, "models", list, where)
        rpm = _typed(k, "rpm", int, where)
        if rpm is not None and rpm < 1:
            raise _err(where, "rpm must be at least 1")
        keys[_name(n, where)] = KeyConfig(n, digest, bname, rpm, tuple(allowed) if allowed is not None else None)
    if len({k.sha256 for k in keys.values()}) != len(keys):
        raise _err("[keys]", "two client keys are the same")

    require = bool(_typed(g, "require_keys", bool, "[gateway]", True))
    if require and not keys:
        raise _err("[keys]", "require_keys is on but no client keys are configured",
                   "add [keys.<name>] with key_env = \"ENV_VAR\", or set require_keys = false for a private host")  # fmt: skip
    if not require and keys:
        raise _err("[gateway]", "require_keys = false with [keys] defined would let a request without a key bypass "
                   "the keys' budgets, rate limits and model lists",
                   "set require_keys = true (a request without a valid key gets 401), or remove [keys] for a private "
                   "host where every caller is trusted (the [gateway] budget still applies to all)")  # fmt: skip
    url = _typed(r, "url", str, "[redis]") or env.get(_typed(r, "url_env", str, "[redis]") or "DSRS_REDIS_URL") or None
    on_down = _typed(r, "on_down", str, "[redis]", "fail_closed")
    if on_down not in ("fail_closed", "local"):
        raise _err("[redis]", f"on_down must be \"fail_closed\" or \"local\", got {on_down!r}")
    port = _typed(g, "port", int, "[gateway]", 8088)
    admin = _typed(g, "admin_key_sha256", str, "[gateway]")
    admin_env = _typed(g, "admin_key_env", str, "[gateway]")
    if admin is not None and not re.fullmatch(r"[0-9a-f]{64}", admin):
        raise _err("[gateway]", "admin_key_sha256 must be 64 lowercase hex digits")
    if admin_env is not None and not env.get(admin_env):
        raise _err("[gateway]", f"environment variable {admin_env} (admin_key_env) is empty or unset", "export the admin key")
    secret = env.get(admin_env or "DSRS_ADMIN_KEY")
    if admin is None and secret:
        admin = key_hash(secret)
    if admin is not None and any(k.sha256 == admin for k in keys.values()):
        raise _err("[gateway]", "the admin key is also a client key", "give the admin its own key")
    timeouts: dict[str, float] = {}
    for name, default in (("header_timeout_s", 15.0), ("body_timeout_s", 60.0)):
        v = _typed(g, name, (int, float), "[gateway]", default)
        if isinstance(v, bool) or not 0 < v <= 3600:
            raise _err("[gateway]", f"{name} must be a number of seconds in (0, 3600]")
        timeouts[name] = float(v)
    per_client = _typed(g, "max_connections_per_client", int, "[gateway]", 256)
    if per_client < 0:
        raise _err("[gateway]", "max_connections_per_client must be >= 0 (0: no cap)")
    max_body = _typed(g, "max_body_bytes", int, "[gateway]", 4 * 1024 * 1024)
    return Config(
        host=_typed(g, "host", str, "[gateway]", "127.0.0.1"), port=port, require_keys=require,
        max_body_bytes=max_body, budget=budget_ref(g.get("budget"), "[gateway]"), admin_sha256=admin,
        public_metrics=bool(_typed(g, "public_metrics", bool, "[gateway]", False)), **timeouts,
        max_connections_per_client=per_client, redis_url=url, on_down=on_down,
        cache_ttl_s=_typed(r, "cache_ttl_s", int, "[redis]", 7 * 24 * 3600),
        cache=bool(_typed(c, "enabled", bool, "[cache]", True)), circuit=circuit, lanes=lanes, models=models, budgets=budgets,
        keys=keys,
    )  # fmt: skip


def _circuit(t: dict[str, Any]) -> CircuitConfig:
    where = "[circuit]"
    _only(t, where, ("failures", "cooldown_s", "shared", "refresh_s"))
    failures = _typed(t, "failures", int, where, 5)
    if failures < 1:
        raise _err(where, "failures must be at least 1")
    out = {}
    for name, default in (("cooldown_s", 30.0), ("refresh_s", 1.0)):
        v = _typed(t, name, (int, float), where, default)
        if isinstance(v, bool) or not 0 < v <= 86400:
            raise _err(where, f"{name} must be a number of seconds in (0, 86400]")
        out[name] = float(v)
    return CircuitConfig(failures, shared=bool(_typed(t, "shared", bool, where, True)), **out)


def load(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigurationError(f"gateway config {p} does not exist",
                                 hint=f"write a sample with `dsrs serve --init {p}`, edit it, then `dsrs serve --config {p}`") from None  # fmt: skip
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"gateway config {p} is not valid TOML: {e}") from None
    return parse(doc, env)
