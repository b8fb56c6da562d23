"""Shared fixtures: the real llama.cpp server with Gemma, a scripted server, a private cache dir."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from scripted import ScriptedServer

# Never touch the user's cache or real provider keys from the tests.
_TMP = tempfile.mkdtemp(prefix="dsrs-tests-")
os.environ["DSRS_CACHE_DIR"] = os.path.join(_TMP, "cache")
for _var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY", "GROQ_API_KEY",
             "CEREBRAS_API_KEY", "OPENROUTER_API_KEY", "TOGETHER_API_KEY", "DEEPSEEK_API_KEY", "XAI_API_KEY",
             "MISTRAL_API_KEY", "CO_API_KEY", "COHERE_API_KEY", "LLAMACPP_BASE_URL", "OLLAMA_HOST",
             "OPENAI_BASE_URL", "PYLON_RELAY_URL"):  # fmt: skip
    os.environ.pop(_var, None)

# Few-shot prompt the base model answers reliably (see ../shared/notes/local-models.md).
FEW_SHOT = "Question: What is the capital of Germany?\nAnswer: Berlin\n\nQuestion: What is the capital of France?\nAnswer:"
# The GGUF has no chat template; this one passes message text through unchanged, so the chat,
# Responses and Anthropic routes of llama.cpp behave as plain completions for the base model.
RAW_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaServer:
    url: str  # base URL without /v1
    model_path: str
    n_predict: int

    def post(self, path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())


@pytest.fixture(scope="session")
def llama_server() -> Iterator[LlamaServer]:
    """A real llama.cpp server (xllamacpp) with Gemma 3 270M on 127.0.0.1."""
    import xllamacpp

    from dsrs.providers import embedded

    path = embedded.model_path("gemma-3-270m")
    port = free_port()
    p = embedded.params(path, n_ctx=4096, port=port, threads=2)
    p.n_predict = 64  # server-side output cap (clients that send no max_tokens, e.g. the Codex CLI)
    p.use_jinja = True
    p.chat_template = RAW_TEMPLATE
    p.n_parallel = 2
    srv = xllamacpp.Server(p)
    url = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        assert json.loads(r.read())["status"] == "ok"
    yield LlamaServer(url, path, 64)
    del srv


@pytest.fixture(scope="session")
def scripted_server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.close()


@pytest.fixture
def scripted(scripted_server: ScriptedServer) -> ScriptedServer:
    """The scripted server, emptied for this test."""
    return scripted_server.script()


@pytest.fixture
def sleeps() -> list[float]:
    """Collects the waits a RetryPolicy asks for; nothing really sleeps."""
    return []


@pytest.fixture
def fake_retry(sleeps: list[float]) -> Any:
    from dsrs.retry import RetryPolicy

    async def sleep(s: float) -> None:
        sleeps.append(s)

    return RetryPolicy(2, sleep, lambda: 0.0)


@pytest.fixture
def stock_relay(tmp_path: Any) -> Iterator[Any]:
    """PyPI's nostr-relay, unmodified and with its stock limits, on 127.0.0.1 (see stock_relay.py)."""
    from stock_relay import StockRelay

    relay = StockRelay.start(tmp_path / "stock-relay")
    yield relay
    relay.stop()
