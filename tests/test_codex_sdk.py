"""CodexSdkLM against the real Codex CLI, pointed at a scripted Responses-API server (and once at
the real llama.cpp server). Every test runs the actual `codex exec` binary."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from responses_server import ResponsesServer, Turn, apply_patch, exec_command, message, reasoning, text

import dsrs
from dsrs.codex_items import AgentMessage, CodexTurn, CommandExecution, ErrorItem, FileChange, FileUpdate, Reasoning
from dsrs.codex_sdk import CodexError, CodexNotFoundError, CodexSdkLM, CodexTurnFailedError
from dsrs.types import StreamEnd

CODEX_BIN = os.environ.get("DSRS_TEST_CODEX_BIN") or os.path.expanduser(
    "~/.cache/dsrs-test/codex-0.169.0/node_modules/.bin/codex"
)
MODEL = "gpt-5.5"  # a slug of the CLI's bundled catalog (full tool set)


@pytest.fixture(scope="module")
def server() -> Iterator[ResponsesServer]:
    assert os.access(CODEX_BIN, os.X_OK), f"Codex CLI missing at {CODEX_BIN}: run scripts/test (it installs it)"
    s = ResponsesServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def codex_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("codex-home"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty HOME for the CLI: its login shells then skip the user's ~/.bashrc (here: `pyenv
    rehash`, which leaves a stale lock behind when a test stops the CLI mid-command)."""
    return str(tmp_path_factory.mktemp("home"))


def provider_config(base_url: str) -> dict[str, Any]:
    return {
        "model_provider": "fx",
        "model_providers.fx.name": "fx",
        "model_providers.fx.base_url": base_url,
        "model_providers.fx.env_key": "FX_KEY",
        "model_providers.fx.stream_max_retries": 0,
        "model_providers.fx.request_max_retries": 0,
    }


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    return d


@pytest.fixture
def lm(server: ResponsesServer, codex_home: str, home: str, ws: Path) -> CodexSdkLM:
    server.turns()
    return (
        CodexSdkLM()
        .with_binary(CODEX_BIN)
        .with_model(MODEL)
        .with_codex_home(codex_home)
        .with_working_dir(ws)
        .with_sandbox("workspace-write")
        .with_env({"FX_KEY": "fx-secret-key-123", "HOME": home})
        .with_config(provider_config(server.base_url))
        .with_timeout(60)
    )


def user_texts(body: dict[str, Any]) -> list[str]:
    return [c["text"] for m in body["input"] if m.get("type") == "message" and m.get("role") == "user"
            for c in m["content"] if c.get("type") == "input_text"]  # fmt: skip


def processes_mentioning(marker: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


async def test_text_reply_with_instructions_and_usage(lm: CodexSdkLM, server: ResponsesServer) -> None:
    server.turns(Turn([reasoning("thinking it over"), message("Paris.")], input_tokens=321, output_tokens=7,
                      cached_tokens=20, reasoning_tokens=3))  # fmt: skip
    c = await lm.acall([dsrs.Message.system("Answer in one word."), dsrs.Message.user("Capital of France?")])
    assert c.text == "Paris."
    assert c.provider == "codex-sdk" and c.model == MODEL
    assert isinstance(c.raw, CodexTurn) and c.id == c.raw.thread_id and len(c.id) == 36
    assert c.items == (Reasoning("item_0", "thinking it over"), AgentMessage("item_1", "Paris."))
    u = c.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens) == (
        321, 7, 328, 20, 3)  # fmt: skip
    assert u.calls == 1 and u.cost_msats is None  # gpt-5.5 is not in the price table: unknown, never a guess
    (body,) = server.responses()
    assert body["model"] == MODEL and body["stream"] is True
    assert user_texts(body)[-1] == "Capital of France?"
    dev = json.dumps([m for m in body["input"] if m.get("role") == "developer"])
    assert "Answer in one word." in dev
    assert server.requests[0].headers["authorization"] == "Bearer fx-secret-key-123"
    assert "fx-secret-key-123" not in repr(lm)


async def test_command_runs_in_working_dir(lm: CodexSdkLM, server: ResponsesServer, ws: Path) -> None:
    server.turns(Turn([exec_command("echo made-by-codex > made.txt && pwd")], input_tokens=100, output_tokens=5),
                 text("Created made.txt.", input_tokens=120, output_tokens=6))  # fmt: skip
    c = await lm.acall("create made.txt")
    assert (ws / "made.txt").read_text() == "made-by-codex\n"
    cmd = next(i for i in c.items if isinstance(i, CommandExecution))
    assert "echo made-by-codex > made.txt" in cmd.command
    assert cmd.exit_code == 0 and cmd.status == "completed" and str(ws) in cmd.output
    assert c.text == "Created made.txt."
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (220, 11)  # both model requests of the turn
    second = server.responses()[1]
    out = next(x for x in second["input"] if x.get("type") == "function_call_output")
    assert str(ws) in out["output"]  # the command's output went back to the model


async def test_file_change_via_apply_patch(lm: CodexSdkLM, server: ResponsesServer, ws: Path) -> None:
    (ws / "notes.txt").write_text("old line\n")
    patch = ("*** Begin Patch\n*** Add File: hello.py\n+print('hi')\n*** Update File: notes.txt\n@@\n-old line\n"
             "+new line\n*** End Patch\n")  # fmt: skip
    server.turns(Turn([apply_patch(patch)]), text("Patched."))
    c = await lm.acall("add hello.py and fix notes")
    assert (ws / "hello.py").read_text() == "print('hi')\n"
    assert (ws / "notes.txt").read_text() == "new line\n"
    (fc,) = [i for i in c.items if isinstance(i, FileChange)]
    assert fc.status == "completed"
    assert sorted(fc.changes, key=lambda x: x.path) == [FileUpdate(str(ws / "hello.py"), "add"),
                                                        FileUpdate(str(ws / "notes.txt"), "update")]  # fmt: skip


async def test_resume_sees_first_turn_and_usage_is_per_turn(lm: CodexSdkLM, server: ResponsesServer) -> None:
    server.turns(text("The secret word is heron.", input_tokens=100, output_tokens=10))
    first = await lm.acall("Remember a secret word.")
    server.turns(text("You told me: heron.", input_tokens=150, output_tokens=20, cached_tokens=90))
    second = await lm.session(first).acall("What was the word?")
    assert second.id == first.id and second.text == "You told me: heron."
    (body,) = server.responses()
    assert user_texts(body)[-2:] == ["Remember a secret word.", "What was the word?"]
    said = [c["text"] for m in body["input"] if m.get("role") == "assistant" for c in m["content"]]
    assert said == ["The secret word is heron."]
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (100, 10)
    assert (second.usage.prompt_tokens, second.usage.completion_tokens, second.usage.cached_tokens) == (150, 20, 90)
    assert second.raw.thread_usage["input_tokens"] == 250  # the CLI's running total
    # a fresh LM object (as in another process) resuming the same thread: per-turn again
    server.turns(text("Still heron.", input_tokens=7, output_tokens=1))
    third = await lm.with_timeout(30).session(first.id).acall("Again?")
    assert (third.usage.prompt_tokens, third.usage.completion_tokens) == (7, 1)
    assert third.raw.thread_usage["input_tokens"] == 257


async def test_base_url_and_api_key(server: ResponsesServer, codex_home: str, home: str, ws: Path) -> None:
    server.turns(text("via with_base_url"))
    lm = (CodexSdkLM().with_binary(CODEX_BIN).with_model(MODEL).with_codex_home(codex_home).with_working_dir(ws)
          .with_env({"HOME": home}).with_base_url(server.base_url).with_api_key("sk-codex-test-9876"))  # fmt: skip
    c = await lm.acall("hi")
    assert c.text == "via with_base_url"
    assert [(r.method, r.path, r.headers["authorization"]) for r in server.requests] == [
        ("POST", "/v1/responses", "Bearer sk-codex-test-9876")]  # fmt: skip
    argv = lm.backend.argv(lm.request("hi"), "", None)
    assert "model_providers.dsrs.base_url=" + json.dumps(server.base_url) in argv
    assert not any("sk-codex-test-9876" in a for a in argv) and "sk-codex-test-9876" not in repr(lm)


async def test_price_table_cost_for_the_codex_model(lm: CodexSdkLM, server: ResponsesServer) -> None:
    server.turns(text("ok", input_tokens=1000, cached_tokens=200, output_tokens=100))
    c = await lm.with_model("gpt-5-codex").acall("hi")
    # gpt-5-codex: 1.25 in, 10 out, 0.125 cached USD/Mtok; 1 USD = 1,000,000 msats by default
    assert c.usage.cost_msats == 800 * 1.25 + 200 * 0.125 + 100 * 10  # 2025
    assert c.usage.cost_source == dsrs.CostSource.PRICE_TABLE
    assert any(isinstance(i, ErrorItem) for i in c.items)  # the CLI warns about a slug outside its catalog
    assert server.responses()[0]["model"] == "gpt-5-codex"


async def test_turn_failed_is_typed_and_not_retried(lm: CodexSdkLM, server: ResponsesServer) -> None:
    server.turns(Turn(fail="the model exploded"), text("never sent"))
    with pytest.raises(CodexTurnFailedError) as e:
        await lm.acall("hi")
    assert "the model exploded" in e.value.message and e.value.code == "turn.failed"
    assert isinstance(e.value, dsrs.DsrsError) and not e.value.retryable
    assert len(server.responses()) == 1


async def test_timeout_kills_the_process_group(lm: CodexSdkLM, server: ResponsesServer, ws: Path) -> None:
    marker = f"sleep {31000 + uuid.uuid4().int % 1000}"
    server.turns(Turn([exec_command(f"touch started && {marker}")]), Turn(stall=True))
    with pytest.raises(dsrs.TimeoutError) as e:
        await lm.with_timeout(8).acall("run a long command")  # ample for the CLI to start the command
    assert "8 s" in e.value.message
    assert (ws / "started").exists()  # the agent's command did run
    assert processes_mentioning(str(ws)) == []  # codex itself is gone
    assert processes_mentioning(marker) == []  # and so is what it started


async def test_cancelled_call_leaves_no_process(lm: CodexSdkLM, server: ResponsesServer, ws: Path) -> None:
    marker = f"sleep {32000 + uuid.uuid4().int % 1000}"
    server.turns(Turn([exec_command(f"touch started && {marker}")]), Turn(stall=True))
    task = asyncio.ensure_future(lm.acall("run a long command"))
    while not (ws / "started").exists():  # wait for the agent's command to be running
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert processes_mentioning(str(ws)) == [] and processes_mentioning(marker) == []


async def test_background_jobs_of_the_agent_do_not_outlive_the_call(lm: CodexSdkLM, server: ResponsesServer,
                                                                     ws: Path) -> None:  # fmt: skip
    marker = f"sleep {33000 + uuid.uuid4().int % 1000}"
    server.turns(Turn([exec_command(f"setsid {marker} > /dev/null 2>&1 < /dev/null & echo $! > bg.pid")]),
                 text("Started it."))  # fmt: skip
    c = await lm.with_sandbox("danger-full-access").acall("start a background job")  # no sandbox to reap it
    assert c.text == "Started it." and (ws / "bg.pid").read_text().strip().isdigit()
    assert processes_mentioning(marker) == []


async def test_unknown_thread_is_a_typed_cli_error(lm: CodexSdkLM) -> None:
    with pytest.raises(CodexError) as e:
        await lm.session("01a2121a-0000-7000-8000-000000000000").acall("hi")
    assert "no rollout found" in e.value.message and e.value.code == "exit 1" and not e.value.retryable


async def test_two_calls_run_two_processes_at_once(lm: CodexSdkLM, server: ResponsesServer) -> None:
    # each answer is held until both requests are in flight: only concurrent processes can finish
    server.turns(Turn([message("one")], wait_for=2), Turn([message("two")], wait_for=2))
    a, b = await asyncio.gather(lm.acall("first"), lm.acall("second"))
    assert {a.text, b.text} == {"one", "two"}
    assert a.id != b.id
    assert sorted(user_texts(r)[-1] for r in server.responses()) == ["first", "second"]


async def test_astream_and_aitems(lm: CodexSdkLM, server: ResponsesServer) -> None:
    server.turns(Turn([message("Running it."), exec_command("echo streamed")]), text("Done."))
    chunks = [x async for x in lm.astream("go")]
    assert chunks[:-1] == ["Running it.", "Done."]
    assert isinstance(chunks[-1], StreamEnd) and chunks[-1].completion.text == "Done."
    server.turns(Turn([exec_command("echo streamed")]), text("Done."))
    seen = [x async for x in lm.aitems("go")]
    kinds = [(type(x).__name__, getattr(x, "status", None)) for x in seen]
    assert kinds == [("CommandExecution", "in_progress"), ("CommandExecution", "completed"),
                     ("AgentMessage", None), ("StreamEnd", None)]  # fmt: skip
    assert seen[1].output.strip().endswith("streamed")


async def test_output_schema_is_sent(lm: CodexSdkLM, server: ResponsesServer) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}  # fmt: skip
    server.turns(text('{"city": "Paris"}'))
    c = await lm.acall("capital of France as JSON",
                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert json.loads(c.text) == {"city": "Paris"}
    fmt = server.responses()[0]["text"]["format"]
    assert fmt["type"] == "json_schema" and fmt["schema"] == schema


def test_sync_call_and_bad_input(lm: CodexSdkLM, server: ResponsesServer) -> None:
    server.turns(text("sync ok"))
    assert lm("hi").text == "sync ok"
    with pytest.raises(dsrs.UnsupportedFeatureError):
        lm("hi", tools=[dsrs.Tool("f")])
    with pytest.raises(dsrs.ConfigurationError, match="sandbox"):
        lm.with_sandbox("yolo")


def test_missing_cli_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = CodexSdkLM().with_binary(tmp_path / "nope" / "codex")
    assert not missing.available() and CodexSdkLM().with_binary(CODEX_BIN).available()
    with pytest.raises(dsrs.ConfigurationError, match="npm install -g @openai/codex") as e:
        missing("hi")
    assert isinstance(e.value, CodexNotFoundError) and e.value.fallback  # a LaneMux may try another lane
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CodexNotFoundError, match="npm install -g @openai/codex"):
        CodexSdkLM()("hi")


@pytest.mark.timeout(240)
async def test_end_to_end_against_llama_cpp(llama_server: Any, codex_home: str, home: str, ws: Path,
                                            tmp_path: Path) -> None:  # fmt: skip
    """One real turn: the real CLI, the real llama.cpp server (/v1/responses), Gemma 270M.

    The CLI's stock prompt (~6,000 tokens) does not fit the fixture's 2,048-token slots, so this
    turn uses the CLI's own switches for small local models: short instructions, no permission,
    environment or skills preamble. (The raw chat template does not render the tool list.)
    """
    from conftest import FEW_SHOT

    instructions = tmp_path / "instructions.md"
    instructions.write_text("Continue the text.")
    small = {"model_instructions_file": str(instructions), "include_permissions_instructions": False,
             "include_environment_context": False, "skills.include_instructions": False,
             "features.goals": False, "features.tool_search": False}  # fmt: skip
    lm = (CodexSdkLM().with_binary(CODEX_BIN).with_model(MODEL).with_codex_home(codex_home).with_working_dir(ws)
          .with_env({"FX_KEY": "none", "HOME": home}).with_timeout(200)
          .with_config({**provider_config(llama_server.url + "/v1"), **small}))  # fmt: skip
    c = await lm.acall(FEW_SHOT)
    assert c.text.strip()  # whatever Gemma made of it; its length is capped server-side
    assert c.usage.prompt_tokens > 30 and 0 < c.usage.completion_tokens <= llama_server.n_predict
    assert c.items and isinstance(c.items[-1], AgentMessage) and c.items[-1].text == c.text
    print(f"codex+llama.cpp turn: {c.text!r}, usage {c.usage.prompt_tokens}+{c.usage.completion_tokens} tokens")


async def test_budgets_refuse_an_unbounded_turn_and_book_what_a_failed_turn_used(
    lm: CodexSdkLM, server: ResponsesServer, ws: Path
) -> None:
    # A turn makes as many model requests as the agent needs: no bound is known before it starts, so
    # a hard budget refuses it (before the CLI runs) instead of reserving from a max_tokens never sent.
    server.turns(text("never sent"))
    with pytest.raises(dsrs.BudgetExceededError) as refused:
        await lm.with_model("gpt-5-codex").with_budget(dsrs.Budget(10**9)).acall("hi")
    assert refused.value.code == "unpriced" and server.responses() == []
    # Allowed unpriced: a turn whose first request was answered (and billed) and whose second failed
    # books the first request's tokens, read from the thread's rollout file.
    b = dsrs.Budget(10**9, allow_unpriced=True)
    server.turns(Turn([exec_command("true")], input_tokens=1000, output_tokens=100), Turn(fail="the model exploded"))
    with pytest.raises(CodexTurnFailedError) as e:
        await lm.with_model("gpt-5-codex").with_budget(b).acall("run true")
    assert len(server.responses()) == 2
    billed = 1000 * 1.25 + 100 * 10  # gpt-5-codex, USD/Mtok, 1 USD = 1,000,000 msats
    assert e.value.spent_msats == billed and e.value.usage.prompt_tokens == 1000
    assert (b.spent_msats, b.reserved_msats, b.open_reservations) == (billed, 0, 0)
