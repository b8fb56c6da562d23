"""The `dsrs` command end to end, in subprocesses: ask on the embedded model (offline), doctor, a resumable run, usage."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripted import Reply, chat_reply

USAGE_LINE = re.compile(r"^\[embedded/gemma-3-270m\] tokens: (\d+) prompt \+ (\d+) completion = (\d+); cost: 0 msats$")


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["DSRS_CACHE_DIR"] = str(tmp_path / "cache")
    e.pop("DSRS_LEDGER", None)
    return e


def dsrs(env, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "dsrs.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_ask_answers_offline_on_the_embedded_model_and_records_usage(env):
    exe = Path(sys.executable).parent / "dsrs"  # the installed entry point
    r = subprocess.run([str(exe), "ask", "What is the capital of France?"], env=env, capture_output=True, text=True,
                       timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Paris\n"  # the answer only: `dsrs ask ... > file` gets just it
    m = USAGE_LINE.match(r.stderr.strip().splitlines()[-1])
    assert m and int(m[1]) + int(m[2]) == int(m[3]) and int(m[2]) >= 1
    u = dsrs(env, "usage")
    assert u.returncode == 0
    assert re.search(rf"^embedded/gemma-3-270m\s+1\s+{m[1]}\s+{m[2]}\s+{m[3]}\s+0\s+0$", u.stdout, re.M), u.stdout


def test_ask_streams(env):
    r = dsrs(env, "ask", "What is the capital of Japan?", "--stream")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Tokyo\n"
    assert USAGE_LINE.match(r.stderr.strip().splitlines()[-1])


def test_ask_on_an_auto_detected_lane(env):
    env.pop("LLAMACPP_BASE_URL", None)
    r = dsrs(env, "ask", "What is the capital of France?", "--lane", "local")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Paris\n" and " lane local]" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (("ask", "hi", "--model", "nowhere/model"), "dsrs: unknown provider 'nowhere' in 'nowhere/model'"),
        (("ask", "hi", "--model", "openai/gpt-4o-mini"), "dsrs: [openai] no API key for openai -> set OPENAI_API_KEY"),
        (("ask", "hi", "--lane", "premium"), "dsrs: no lane named 'premium'"),
        (("ask", "  "), "dsrs: the question is empty"),
        (("run", "question answer", "-i", "x.jsonl", "-o", "y.jsonl"), "dsrs: a signature string needs exactly one '->'"),
        (("run", "q -> a", "-i", "/nonexistent.jsonl", "-o", "y.jsonl"), "dsrs: cannot read input /nonexistent.jsonl"),
        (("usage", "--days", "1", "--by", "model"), None),
    ],
)
def test_errors_are_one_line_without_traceback(env, tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "dsrs.cli", *args], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)  # fmt: skip
    if message is None:
        assert r.returncode == 0 and "no calls recorded yet" in r.stdout
        return
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback(env):
    r = dsrs(env, "--debug", "ask", "hi", "--model", "nowhere/model")
    assert r.returncode == 1 and "Traceback" in r.stderr and "UnknownProviderError" in r.stderr


def test_doctor_with_keys_unset_and_set(env, llama_server):
    # no `codex` on PATH either, so nothing at all is premium
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(d, "codex")))
    r = dsrs(env, "doctor", "--timeout", "60")  # a saturated machine answers a probe slowly
    assert r.returncode == 0, r.stderr
    assert re.search(r"^openai\s+missing \(OPENAI_API_KEY\)\s+https://api.openai.com/v1\s+not probed \(remote\)", r.stdout, re.M)
    assert re.search(r"^embedded\s+not needed\s+in process\s+yes \(offline\)", r.stdout, re.M)
    assert "LaneMux.auto_detect() would build:" in r.stdout and "premium:" not in r.stdout

    env.update(OPENAI_API_KEY="sk-doctor-secret-value", GROQ_API_KEY="gsk-another-secret",
               LLAMACPP_BASE_URL=llama_server.url + "/v1")  # fmt: skip
    r = dsrs(env, "doctor", "--timeout", "60")  # a saturated machine answers a probe slowly
    assert r.returncode == 0, r.stderr
    assert re.search(r"^openai\s+set \(OPENAI_API_KEY\)", r.stdout, re.M)
    assert re.search(r"^groq\s+set \(GROQ_API_KEY\)", r.stdout, re.M)
    assert re.search(rf"^llamacpp\s+not needed\s+{re.escape(llama_server.url)}/v1\s+yes\s+\d+ ms\s+\S+", r.stdout, re.M)
    assert re.search(r"^  premium: LM\(openai/'gpt-4o'", r.stdout, re.M) and "  fast: " in r.stdout
    assert "sk-doctor-secret" not in r.stdout + r.stderr and "gsk-another" not in r.stdout + r.stderr


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _answers(path):
    """The output rows without their `_key` (a sha256 each row has; tests/test_cli_run.py checks its use)."""
    rows = _read_jsonl(path)
    assert all(len(r.pop("_key")) == 64 for r in rows)
    return rows


def answer(n):
    return chat_reply(f"[[ answer ]]\nA{n}\n\n[[ end ]]", 10, 2)


def test_run_resumes_after_a_kill_without_redoing_answered_rows(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, [{"id": n, "question": f"Q{n}"} for n in range(1, 7)])
    env["LLAMACPP_BASE_URL"] = scripted.url + "/v1"
    cmd = [sys.executable, "-m", "dsrs.cli", "run", "question -> answer", "-i", str(inp), "-o", str(out),
           "--model", "llamacpp/some-chat-model", "--concurrency", "1"]  # fmt: skip
    scripted.script(answer(1), answer(2), answer(3), Reply(delay=120, json={}))  # the 4th call stalls
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(scripted.requests) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # killed mid-batch, with row 4 in flight
    proc.communicate(timeout=30)
    first = _read_jsonl(out)
    assert [(r["_line"], r["answer"]) for r in first] == [(1, "A1"), (2, "A2"), (3, "A3")]

    scripted.script(answer(4), answer(5), answer(6))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipping 3 rows already answered" in r.stderr and "3 answered, 3 skipped, 0 failed" in r.stderr
    asked = [m["content"] for q in scripted.requests for m in q.json["messages"] if m["role"] == "user"]
    assert [a.splitlines()[1] for a in asked] == ["Q4", "Q5", "Q6"]  # nothing answered was asked again
    rows = _read_jsonl(out)
    assert [(r["id"], r["question"], r["answer"], r["_line"]) for r in rows] == [
        (n, f"Q{n}", f"A{n}", n) for n in range(1, 7)
    ]


def test_run_failed_rows_are_kept_apart_and_retried(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, [{"question": "Q1"}, {"question": "Q2"}])
    env["LLAMACPP_BASE_URL"] = scripted.url + "/v1"
    cmd = [sys.executable, "-m", "dsrs.cli", "run", "question -> answer: int", "-i", str(inp), "-o", str(out),
           "-m", "llamacpp/chat", "-c", "1"]  # fmt: skip
    scripted.script(chat_reply("[[ answer ]]\n1\n\n[[ end ]]"), chat_reply("no idea"), chat_reply("still no idea"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "1 rows failed" in r.stderr and "Traceback" not in r.stderr
    rows = _answers(out)
    assert rows[0] == {"question": "Q1", "_line": 1, "answer": 1}
    assert rows[1]["_line"] == 2 and rows[1]["_error"].startswith("AdapterParseError:")

    scripted.script(chat_reply("[[ answer ]]\n2\n\n[[ end ]]"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _answers(out) == [{"question": "Q1", "_line": 1, "answer": 1}, {"question": "Q2", "_line": 2, "answer": 2}]
    assert len(scripted.requests) == 1


def test_run_on_the_embedded_model_with_demos_then_usage(env, tmp_path):
    inp, out, demos = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "demos.jsonl"
    _write_jsonl(inp, [{"question": "What is the capital of France?"}, {"question": "What is the capital of Japan?"}])
    _write_jsonl(demos, [{"question": "What is the capital of Germany?", "answer": "Berlin"}])
    r = dsrs(env, "run", "question -> answer", "-i", str(inp), "-o", str(out), "--demos", str(demos), "--max-tokens", "16",
             "--progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [row["answer"] for row in _read_jsonl(out)] == ["Paris", "Tokyo"]
    assert "2 answered, 0 skipped, 0 failed" in r.stderr
    u = dsrs(env, "usage", "--by", "lane")
    assert re.search(r"^-\s+2\s+", u.stdout, re.M), u.stdout
    plot = tmp_path / "usage.png"
    p = dsrs(env, "usage", "--by", "day", "--plot", str(plot))
    assert p.returncode == 0, p.stderr  # matplotlib comes with the dev extra ([plot])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_lists_the_commands(env):
    r = dsrs(env, "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("ask", "doctor", "run", "usage"))


def test_run_with_a_signature_class(env, tmp_path, scripted):
    (tmp_path / "sigs.py").write_text(
        "from dsrs import Signature, InputField, OutputField\n"
        "class Sentiment(Signature):\n"
        '    """Classify the sentiment."""\n'
        "    text: str = InputField()\n"
        "    label: bool = OutputField(desc='positive?')\n"
    )
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, [{"text": "great"}])
    env.update(LLAMACPP_BASE_URL=scripted.url + "/v1", PYTHONPATH=str(tmp_path))
    scripted.script(chat_reply("[[ label ]]\nyes\n\n[[ end ]]"))
    r = subprocess.run([sys.executable, "-m", "dsrs.cli", "run", "sigs:Sentiment", "-i", str(inp), "-o", str(out),
                        "-m", "llamacpp/chat"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _answers(out) == [{"text": "great", "_line": 1, "label": True}]
    assert scripted.requests[0].json["messages"][0]["content"].startswith("Classify the sentiment.")
    bad = dsrs(env, "run", "sigs:Nope", "-i", str(inp), "-o", str(out))
    assert bad.returncode == 1 and bad.stderr.startswith("dsrs: cannot load the signature 'sigs:Nope'")


def test_ask_a_chat_model_prices_the_call(env, scripted):
    env.update(OPENAI_API_KEY="sk-cli-secret", OPENAI_BASE_URL=scripted.url + "/v1")
    scripted.script(chat_reply("[[ answer ]]\nParis\n\n[[ end ]]", 1000, 10, model="gpt-4o-mini"))
    r = dsrs(env, "ask", "What is the capital of France?", "--model", "openai/gpt-4o-mini")
    assert r.returncode == 0, r.stderr
    answer, usage = r.stdout.strip(), r.stderr.strip().splitlines()[-1]
    # gpt-4o-mini lists at 0.15 / 0.60 USD per Mtok: 1000 * 0.15 + 10 * 0.60 = 156 micro-USD = 156 msats at 1M msats/USD
    assert answer == "Paris"
    assert usage == "[openai/gpt-4o-mini] tokens: 1000 prompt + 10 completion = 1010; cost: 156 msats ($0.000156)"
    (seen,) = scripted.requests
    assert seen.headers["authorization"] == "Bearer sk-cli-secret"
    # no output cap by default for a chat model (a reasoning model spends tokens thinking first)
    assert "max_completion_tokens" not in seen.json and "max_tokens" not in seen.json
    assert seen.json["messages"][-1]["content"].startswith("[[ question ]]\nWhat is the capital of France?")
    assert "sk-cli-secret" not in r.stdout + r.stderr


def test_serve_and_pylon_serve_are_subcommands(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "dsrs.cli", "serve", "--config", str(tmp_path / "none.toml")],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "dsrs.cli", "pylon", "serve", "--help"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "--price-msats" in r.stdout


def _chunk(content=None, usage=None):
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return {"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": choices,
            "usage": usage}  # fmt: skip


@pytest.mark.parametrize(
    "pieces",
    [
        ["[[ answer ]]\nParis\n\n[[ end ]]"],
        ["[", "[ ans", "wer ]", "]\n", "Pa", "ris", "\n", "\n[", "[ end", " ]]"],  # markers split across chunks
        ["[[ answer ]]\n", "Paris [", "not a marker", "]\n\n", "[[ end ]]"],  # a lone `[` in the answer
    ],
)
def test_ask_stream_prints_only_the_answer_text(env, scripted, pieces):
    env.update(OPENAI_API_KEY="sk-cli-secret", OPENAI_BASE_URL=scripted.url + "/v1")
    usage = {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010}
    scripted.script(Reply(sse=[*(_chunk(p) for p in pieces), _chunk(usage=usage), "[DONE]"]))
    r = dsrs(env, "ask", "What is the capital of France?", "--model", "openai/gpt-4o-mini", "--stream")
    assert r.returncode == 0, r.stderr
    expected = "Paris [not a marker]" if "not a marker" in "".join(pieces) else "Paris"
    assert r.stdout == expected + "\n"  # no `[[ answer ]]` / `[[ end ]]` markers
    assert r.stderr.strip().splitlines()[-1].startswith("[openai/gpt-4o-mini] tokens: 1000 prompt + 10 completion")
    assert scripted.requests[0].json["stream"] is True


def test_ask_max_tokens_is_sent_when_given(env, scripted):
    env.update(OPENAI_API_KEY="sk-cli-secret", OPENAI_BASE_URL=scripted.url + "/v1")
    scripted.script(chat_reply("[[ answer ]]\nParis\n\n[[ end ]]", model="gpt-4o-mini"))
    r = dsrs(env, "ask", "What is the capital of France?", "-m", "openai/gpt-4o-mini", "--max-tokens", "2000")
    assert r.returncode == 0, r.stderr
    assert scripted.requests[0].json["max_completion_tokens"] == 2000


def test_version_and_help_for_every_option(env):
    from dsrs import __version__
    from dsrs.cli import parser

    r = dsrs(env, "--version")
    assert r.returncode == 0 and r.stdout == f"dsrs {__version__}\n"

    def walk(p, path):
        for a in p._actions:
            if a.help is None or not str(a.help).strip():
                yield f"{path} {'/'.join(a.option_strings) or a.dest}"
            for name, sub in (getattr(a, "choices", None) or {}).items() if hasattr(a, "_name_parser_map") else ():
                yield from walk(sub, f"{path} {name}")

    assert list(walk(parser(), "dsrs")) == []
    h = subprocess.run([sys.executable, "-m", "dsrs.cli", "run", "--help"], env=env, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert h.returncode == 0 and "--drop-stale" in h.stdout and "_key" in h.stdout
