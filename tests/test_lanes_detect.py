"""auto_detect() against real local things: the llama.cpp server, an Ollama-API server, the Codex CLI
binary, env keys set by the test. Nothing here reaches past 127.0.0.1."""

from __future__ import annotations

import glob
import os

import pytest

from conftest import FEW_SHOT, free_port
from dsrs import LM, LaneMux
from scripted import Reply

TAGS = {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 2019393189},
                   {"name": "qwen2.5:0.5b", "model": "qwen2.5:0.5b", "size": 397821319}]}  # fmt: skip


def codex_dir() -> str:
    binary = os.environ.get("DSRS_TEST_CODEX_BIN") or next(
        iter(sorted(glob.glob(os.path.expanduser("~/.cache/dsrs-test/codex-*/node_modules/.bin/codex")))), None
    )
    assert binary, "scripts/test installs the Codex CLI; run it once"
    return os.path.dirname(binary)


@pytest.fixture
def bare_env(monkeypatch, tmp_path):
    """No keys, no codex on PATH, nothing listening where the probes look."""
    monkeypatch.setenv("PATH", str(tmp_path))
    for var in ("PYLON_RELAY_URL", "PYLON_NWC_URI", "CODEX_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "codex-home").mkdir()
    monkeypatch.setenv("CODEX_HOME", str(tmp_path / "codex-home"))  # no config, no login
    monkeypatch.setenv("LLAMACPP_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")
    return monkeypatch


async def test_detects_keys_codex_ollama_llamacpp_and_embedded(bare_env, scripted, llama_server):
    scripted.script(Reply(json=TAGS))
    bare_env.setenv("PATH", codex_dir())
    bare_env.setenv("OLLAMA_HOST", scripted.url)
    bare_env.setenv("LLAMACPP_BASE_URL", llama_server.url + "/v1")
    bare_env.setenv("OPENAI_BASE_URL", llama_server.url + "/v1")  # where the CLI would send its requests
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GROQ_API_KEY", "DEEPSEEK_API_KEY"):
        bare_env.setenv(var, "sk-test-" + var.lower())
    mux = await LaneMux.auto_detect()
    assert mux.names == ("premium", "fast", "cheap", "local")
    premium, fast, cheap, local = (lane.lm for lane in mux.lanes)
    assert isinstance(premium, LaneMux) and premium.names == ("codex-cli", "openai", "anthropic")
    assert type(premium.lane("codex-cli").lm).__name__ == "CodexSdkLM"
    assert (premium.lane("openai").lm.provider, premium.lane("openai").lm.model) == ("openai", "gpt-4o")
    assert (fast.provider, fast.model) == ("groq", "llama-3.3-70b-versatile")
    assert (cheap.provider, cheap.model) == ("deepseek", "deepseek-chat")
    assert isinstance(local, LaneMux) and local.names == ("llamacpp", "ollama", "embedded")
    assert local.lane("ollama").lm.model == "llama3.2:latest"
    assert local.lane("embedded").lm.provider == "embedded"
    (seen,) = scripted.requests
    assert (seen.method, seen.path) == ("GET", "/api/tags")
    d = mux.detection
    found = {p.name: p for p in d.found}
    assert set(found) == {"codex-cli", "openai", "anthropic", "groq", "deepseek", "llamacpp", "ollama", "embedded"}
    assert found["openai"].detail == "OPENAI_API_KEY set" and found["openai"].lane == "premium"
    assert "llama3.2:latest, qwen2.5:0.5b" in found["ollama"].detail
    assert found["llamacpp"].detail.startswith(llama_server.url + ": ok")
    assert d.lanes["local"][0].startswith("LM(llamacpp/")
    assert "sk-test" not in str(d) and "sk-test" not in repr(d.to_json()) and "sk-test" not in repr(mux)
    missing = {p.name: p.detail for p in d.probes if not p.found}
    assert missing["pylon"] == "PYLON_RELAY_URL and PYLON_NWC_URI not both set"
    assert missing["cohere"] == "CO_API_KEY / COHERE_API_KEY not set"


async def test_nothing_reachable_leaves_only_what_is_installed(bare_env):
    mux = await LaneMux.auto_detect(timeout=0.5)
    assert mux.names == ("local",) and mux.lane("local").lm.provider == "embedded"
    status = {p.name: (p.found, p.detail) for p in mux.detection.probes}
    assert status["codex-cli"] == (False, "codex not on PATH")
    assert status["llamacpp"][0] is False and "APIConnectionError" in status["llamacpp"][1]
    assert status["ollama"][0] is False and status["openai"] == (False, "OPENAI_API_KEY not set")
    assert "no  openai" in str(mux.detection)


async def test_detected_lanes_fall_back_to_the_real_llamacpp(bare_env, scripted, llama_server):
    """OpenAI 'reachable' (a key, and a base URL that is a failing local server) then llama.cpp answers."""
    scripted.script(default=Reply(503, json={"error": {"message": "down", "type": "server_error"}}))
    bare_env.setenv("OPENAI_API_KEY", "sk-test")
    bare_env.setenv("OPENAI_BASE_URL", scripted.url)
    bare_env.setenv("LLAMACPP_BASE_URL", llama_server.url + "/v1")
    mux = await LaneMux.auto_detect()
    assert mux.names == ("premium", "local")
    premium = mux.lane("premium")
    mux = LaneMux().add_lane("premium", premium.lm.with_retries(0)).add_lane("local", mux.lane("local").lm)
    out = await mux.acall(FEW_SHOT, max_tokens=8, stop=["\n"], temperature=0)
    assert out.text == " Paris" and out.route.lane == "local"
    assert out.route.attempts[-1].route.lane == "llamacpp"  # the nested local lane's own decision
    assert scripted.requests[0].path == "/chat/completions"
    assert isinstance(premium.lm, LM)


async def test_codex_cli_is_a_lane_only_when_its_model_server_answers(bare_env, scripted, tmp_path):
    bare_env.setenv("PATH", codex_dir())

    async def codex():
        mux = await LaneMux.auto_detect(timeout=0.5)
        (probe,) = [p for p in mux.detection.probes if p.name == "codex-cli"]
        return mux, probe

    mux, probe = await codex()  # installed, but no key, no login, no configured server
    assert "premium" not in mux.names and not probe.found
    assert "no CODEX_API_KEY / OPENAI_API_KEY and no `codex login`" in probe.detail
    bare_env.setenv("CODEX_API_KEY", "sk-test-codex")  # a key, but offline: nothing answers
    bare_env.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    mux, probe = await codex()
    assert "premium" not in mux.names and "does not answer (APIConnectionError)" in probe.detail
    # a model provider of its own in config.toml, which answers (a 401 is an answer)
    scripted.script(default=Reply(401, json={"error": {"message": "no key", "type": "invalid_request_error"}}))
    (tmp_path / "codex-home" / "config.toml").write_text(
        'model_provider = "mine"\n[model_providers.mine]\nname = "mine"\nbase_url = "%s/v1"\n' % scripted.url
    )
    mux, probe = await codex()
    assert mux.names == ("premium", "local") and type(mux.lane("premium").lm).__name__ == "CodexSdkLM"
    assert probe.found and f"model provider 'mine', {scripted.url}/v1 answers" in probe.detail
    assert [(r.method, r.path) for r in scripted.requests] == [("GET", "/v1/models")]
    assert "sk-test" not in str(mux.detection)
