"""Provider resolution, rows of data, and the shapes of requests for special services."""

from __future__ import annotations

import pytest

import dsrs
from dsrs import LM
from dsrs.registry import resolve
from scripted import chat_reply


@pytest.mark.parametrize(
    "spec, provider, model",
    [
        ("gpt-4o", "openai", "gpt-4o"),
        ("o3-mini", "openai", "o3-mini"),
        ("claude-sonnet-4-5", "anthropic", "claude-sonnet-4-5"),
        ("gemini-2.5-flash", "gemini", "gemini-2.5-flash"),
        ("codex-3-sonnet", "codex", "codex-3-sonnet"),
        ("groq/mixtral-8x7b", "groq", "mixtral-8x7b"),
        ("ollama/llama2", "ollama", "llama2"),
        ("openrouter/openai/gpt-4o", "openrouter", "openai/gpt-4o"),
        ("llamacpp/gemma", "llamacpp", "gemma"),
        ("embedded/gemma-3-270m", "embedded", "gemma-3-270m"),
    ],
)
def test_resolution(spec, provider, model):
    service, m = resolve(spec)
    assert (service.name, m) == (provider, model)


@pytest.mark.parametrize("spec", ["nosuch/model", "mystery-model", "", "openai/"])
def test_unknown_provider_lists_known_ones(spec):
    with pytest.raises(dsrs.UnknownProviderError) as e:
        LM(spec)
    assert "openai" in str(e.value) or "openai/" in str(e.value)


@pytest.mark.parametrize("name", ["openai", "groq", "cerebras", "together", "openrouter", "deepseek", "xai",
                                  "mistral", "llamacpp", "vllm", "lmstudio", "azure"])  # fmt: skip
def test_openai_compatible_services_are_rows(name):
    service, _ = resolve(f"{name}/m")
    assert service.protocol == "openai_chat"


def test_llamacpp_default_and_env(monkeypatch):
    assert LM("llamacpp/x").backend.base == "http://127.0.0.1:8080/v1"
    monkeypatch.setenv("LLAMACPP_BASE_URL", "http://127.0.0.1:9999/v1/")
    assert LM("llamacpp/x").backend.base == "http://127.0.0.1:9999/v1"


def test_azure_deployment_url_and_api_key_header(scripted, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", scripted.url)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-key")
    scripted.script(chat_reply("ok"))
    LM("azure/my-deployment", api_version="2024-10-21", max_tokens=5)("hi")
    (seen,) = scripted.requests
    assert seen.path == "/openai/deployments/my-deployment/chat/completions"
    assert seen.query == {"api-version": "2024-10-21"}
    assert seen.headers["api-key"] == "az-key" and "authorization" not in seen.headers
    assert seen.json["max_completion_tokens"] == 5


def test_mistral_seed_quirk(scripted):
    scripted.script(chat_reply("ok"))
    LM("mistral/mistral-small-latest", base_url=scripted.url, api_key="m", seed=3, max_tokens=2)("hi")
    body = scripted.requests[0].json
    assert body["random_seed"] == 3 and "seed" not in body and body["max_tokens"] == 2


def test_builders_are_immutable_and_keywords_match():
    a = LM("openai/gpt-4o", api_key="k")
    b = a.with_temperature(0.7).with_max_tokens(4096).with_seed(42)
    assert a.options == {"api_key": a.options["api_key"]}
    assert b.options["temperature"] == 0.7 and b.options["max_tokens"] == 4096 and b.options["seed"] == 42
    c = LM("openai/gpt-4o", api_key="k", temperature=0.7, max_tokens=4096, seed=42)
    assert c.request("x") == b.request("x")


def test_unknown_option_is_a_clear_error():
    with pytest.raises(dsrs.ConfigurationError) as e:
        LM("openai/gpt-4o", temprature=0.2)
    assert "temprature" in str(e.value) and "temperature" in str(e.value)


def test_timedelta_timeout():
    import datetime

    assert LM("openai/gpt-4o").with_timeout(datetime.timedelta(seconds=60)).options["timeout"] == 60.0


@pytest.mark.parametrize(
    "build",
    [
        lambda lm: lm.with_max_tokens(0),
        lambda lm: lm.with_max_tokens("100"),
        lambda lm: lm.with_temperature(-0.1),
        lambda lm: lm.with_temperature(float("nan")),
        lambda lm: lm.with_top_p(0),
        lambda lm: lm.with_seed(1.5),
        lambda lm: lm.with_num_ctx(-1),
        lambda lm: lm.with_timeout(0),
        lambda lm: lm.with_retries(-1),
        lambda lm: LM("openai/gpt-4o", max_tokens=True),
    ],
)
def test_bad_option_values_are_clear_errors(build):
    with pytest.raises(dsrs.ConfigurationError) as e:
        build(LM("openai/gpt-4o"))
    assert "must be" in str(e.value)
