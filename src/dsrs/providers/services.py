"""Every provider as a row of data: which wire protocol it speaks, where, with which key.

Adding an OpenAI-compatible service is adding a row here; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    protocol: str  # module under dsrs.providers (openai_chat, responses, anthropic, gemini, ollama, cohere, embedded)
    base_url: str | None = None  # default base URL
    base_url_env: str | None = None  # env var that overrides it
    key_envs: tuple[str, ...] = ()  # env vars read for the key, first found wins
    key_required: bool = True
    auth_header: str = "Authorization"
    auth_prefix: str = "Bearer "
    local: bool = False  # runs on this machine: free, no key
    tools: bool = True
    json_schema: bool = True
    streaming: bool = True
    stream_usage: bool = True  # honours stream_options.include_usage
    images: bool = True  # takes image content parts (`Message.parts`); False: refused before sending
    quirks: frozenset[str] = field(default_factory=frozenset)
    # quirks: "max_completion_tokens" (send max_completion_tokens instead of max_tokens),
    # "no_seed" (drop seed), "azure" (deployment URL + api-version)


def _row(name: str, base: str, env: str, **kw: object) -> Service:
    return Service(name, "openai_chat", base, f"{name.upper()}_BASE_URL", (env,), **kw)  # type: ignore[arg-type]


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        _row("openai", "https://api.openai.com/v1", "OPENAI_API_KEY", quirks=frozenset({"max_completion_tokens"})),
        _row("groq", "https://api.groq.com/openai/v1", "GROQ_API_KEY"),
        _row("cerebras", "https://api.cerebras.ai/v1", "CEREBRAS_API_KEY"),
        _row("together", "https://api.together.xyz/v1", "TOGETHER_API_KEY"),
        _row("openrouter", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
        _row("deepseek", "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY", json_schema=False, images=False),
        _row("xai", "https://api.x.ai/v1", "XAI_API_KEY"),
        # Mistral rejects `stream_options` (422) and sends usage in its last chunk anyway
        _row("mistral", "https://api.mistral.ai/v1", "MISTRAL_API_KEY", stream_usage=False,
             quirks=frozenset({"random_seed"})),  # fmt: skip
        Service(
            "llamacpp",
            "openai_chat",
            "http://127.0.0.1:8080/v1",
            "LLAMACPP_BASE_URL",
            ("LLAMACPP_API_KEY",),
            key_required=False,
            local=True,
        ),
        Service(
            "vllm", "openai_chat", "http://127.0.0.1:8000/v1", "VLLM_BASE_URL", ("VLLM_API_KEY",), False, local=True
        ),
        Service(
            "lmstudio",
            "openai_chat",
            "http://127.0.0.1:1234/v1",
            "LMSTUDIO_BASE_URL",
            ("LMSTUDIO_API_KEY",),
            False,
            local=True,
        ),
        Service(
            "azure",
            "openai_chat",
            None,
            "AZURE_OPENAI_ENDPOINT",
            ("AZURE_OPENAI_API_KEY",),
            auth_header="api-key",
            auth_prefix="",
            quirks=frozenset({"azure", "max_completion_tokens"}),
        ),
        Service("embedded", "embedded", key_required=False, local=True, tools=False, json_schema=False, images=False),
        # Native protocols, one module each under dsrs.providers:
        Service("codex", "responses", "https://api.openai.com/v1", "OPENAI_BASE_URL", ("OPENAI_API_KEY",)),
        Service("openai-responses", "responses", "https://api.openai.com/v1", "OPENAI_BASE_URL", ("OPENAI_API_KEY",)),
        Service(
            "anthropic",
            "anthropic",
            "https://api.anthropic.com/v1",
            "ANTHROPIC_BASE_URL",
            ("ANTHROPIC_API_KEY",),
            auth_header="x-api-key",
            auth_prefix="",
        ),
        Service(
            "gemini",
            "gemini",
            "https://generativelanguage.googleapis.com/v1beta",
            "GEMINI_BASE_URL",
            ("GOOGLE_API_KEY", "GEMINI_API_KEY"),
            auth_header="x-goog-api-key",
            auth_prefix="",
        ),
        Service("ollama", "ollama", "http://127.0.0.1:11434", "OLLAMA_HOST", (), key_required=False, local=True),
        Service("cohere", "cohere", "https://api.cohere.com/v2", "COHERE_BASE_URL", ("CO_API_KEY", "COHERE_API_KEY"),
                images=False),  # dsrs.providers.cohere sends text only
    )
}

# A bare model name (no "provider/") resolves by its prefix, longest first.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("codex", "codex"),
    ("gpt-", "openai"),
    ("chatgpt-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("text-embedding-", "openai"),
    ("claude-", "anthropic"),
    ("gemini-", "gemini"),
    ("command", "cohere"),
    ("grok-", "xai"),
    ("deepseek-", "deepseek"),
    ("mistral-", "mistral"),
    ("codestral", "mistral"),
)
