"""The real Codex CLI pointed at the gateway (`-c model_providers.gw.base_url=http://127.0.0.1:PORT/v1`).

The gateway serves codex's model name from a Chat Completions lane on the scripted server, so the
test sees both ends: what codex got (its JSONL events) and what reached the upstream.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

import pytest

from gateway_fixture import CLIENT_KEY, InProcessGateway
from scripted import Reply

CODEX_BIN = os.environ.get("DSRS_TEST_CODEX_BIN") or os.path.expanduser(
    "~/.cache/dsrs-test/codex-0.169.0/node_modules/.bin/codex"
)


def _chunks(rid: str, *deltas: dict[str, Any], finish: str = "stop") -> list[Any]:
    out: list[Any] = [{"id": rid, "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": d}]} for d in deltas]
    out.append({"id": rid, "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    out.append({"id": rid, "model": "gpt-4o-mini", "choices": [],
                "usage": {"prompt_tokens": 4000, "completion_tokens": 7, "total_tokens": 4007}})  # fmt: skip
    return [*out, "[DONE]"]


def _codex(gw: InProcessGateway, prompt: str, workdir: str) -> list[dict[str, Any]]:
    home = tempfile.mkdtemp(prefix="dsrs-codex-home-")
    cmd = [CODEX_BIN, "exec", "--json", "--skip-git-repo-check", "--ignore-user-config", "-C", workdir,
           "-m", "gpt-5.5", "-s", "read-only",
           "-c", "model_provider=gw", "-c", "model_providers.gw.name=gw",
           "-c", f"model_providers.gw.base_url={gw.url}/v1", "-c", "model_providers.gw.env_key=GW_KEY",
           "-c", "model_providers.gw.stream_max_retries=0", "-c", "model_providers.gw.request_max_retries=0",
           prompt]  # fmt: skip
    env = {**os.environ, "CODEX_HOME": home, "GW_KEY": CLIENT_KEY}
    p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    events = [json.loads(line) for line in p.stdout.decode().splitlines() if line.startswith("{")]
    assert p.returncode == 0, (p.stdout.decode()[-2000:], p.stderr.decode()[-2000:])
    return events


@pytest.fixture
def gw(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream-secret-42")
    g = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"remote": {"lm": "openai/gpt-4o-mini", "base_url": scripted.url + "/v1",
                             "api_key_env": "UPSTREAM_KEY", "options": {"retries": 0, "max_tokens": 200}}},
        "models": {"gpt-5.5": {"lanes": ["remote"]}},
        "budgets": {"codex": {"limit_msats": 100_000}},
        "keys": {"codex": {"key_env": "CLIENT_KEY", "budget": "codex"}},
    })  # fmt: skip
    yield g
    g.close()


def test_codex_cli_runs_a_turn_with_a_shell_command_through_the_gateway(gw: Any, scripted: Any) -> None:
    assert os.path.exists(CODEX_BIN), "the Codex CLI is installed by scripts/test (npm @openai/codex@0.169.0)"
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "exec_command", "arguments": json.dumps({"cmd": "cat hello.txt"})}}  # fmt: skip
    scripted.script(
        Reply(sse=_chunks("c1", {"role": "assistant", "content": ""}, {"tool_calls": [call]}, finish="tool_calls")),
        Reply(sse=_chunks("c2", {"content": "The file says: "}, {"content": "hi from the file"})),
    )
    ws = tempfile.mkdtemp(prefix="dsrs-codex-ws-")
    with open(os.path.join(ws, "hello.txt"), "w") as f:
        f.write("hi from the file\n")
    events = _codex(gw, "read hello.txt", ws)
    items = [e["item"] for e in events if e["type"] == "item.completed"]
    cmds = [i for i in items if i["type"] == "command_execution"]
    assert cmds and "cat hello.txt" in cmds[0]["command"] and "hi from the file" in cmds[0]["aggregated_output"]
    assert [i["text"] for i in items if i["type"] == "agent_message"] == ["The file says: hi from the file"]
    done = [e for e in events if e["type"] == "turn.completed"][0]
    assert done["usage"]["input_tokens"] == 8000 and done["usage"]["output_tokens"] == 14

    first, second = (r.json for r in scripted.requests)
    assert [r.path for r in scripted.requests] == ["/v1/chat/completions"] * 2
    assert first["stream"] is True and first["model"] == "gpt-4o-mini" and first["max_completion_tokens"] == 200
    assert first["messages"][0]["role"] == "system"  # codex's developer messages
    assert first["messages"][-1] == {"role": "user", "content": "read hello.txt"}
    assert "exec_command" in [t["function"]["name"] for t in first["tools"]]
    assert "apply_patch" not in [t["function"]["name"] for t in first["tools"]]  # a custom (grammar) tool
    # the second request carries the call and codex's output for it
    assistant = [m for m in second["messages"] if m["role"] == "assistant" and m.get("tool_calls")]
    assert assistant[-1]["tool_calls"][0]["function"]["name"] == "exec_command"
    tool = [m for m in second["messages"] if m["role"] == "tool"][-1]
    assert tool["tool_call_id"] == "call_1" and "hi from the file" in tool["content"]
    b = gw.runtime.budgets["codex"]
    assert b.spent_msats > 0 and b.open_reservations == 0 and b.calls == 2
