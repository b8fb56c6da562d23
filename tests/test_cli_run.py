"""`dsrs run` in subprocesses against the scripted server: input never destroyed, resume by content
key, fail fast before the first call, Ctrl-C leaves only finished rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from scripted import Reply, chat_reply


@pytest.fixture
def env(tmp_path, scripted):
    e = dict(os.environ)
    e["DSRS_CACHE_DIR"] = str(tmp_path / "cache")
    e["LLAMACPP_BASE_URL"] = scripted.url + "/v1"
    e.pop("DSRS_LEDGER", None)
    e.pop("OPENAI_API_KEY", None)
    return e


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answer(text):
    return chat_reply(f"[[ answer ]]\n{text}\n\n[[ end ]]", 10, 2)


def run(env, *args, sig="question -> answer"):
    return subprocess.run([sys.executable, "-m", "dsrs.cli", "run", sig, *args], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def asked(scripted):
    """The question of each request the scripted server got."""
    out = []
    for q in scripted.requests:
        user = [m["content"] for m in q.json["messages"] if m["role"] == "user"][-1]
        out.append(user.splitlines()[1])
    return out


# -- (1) the input is never destroyed ---------------------------------------------------------
@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_run_refuses_to_write_over_its_input(env, tmp_path, scripted, how):
    inp = tmp_path / "in.jsonl"
    write(inp, [{"question": "Q1"}, {"question": "Q2"}])
    before = inp.read_bytes()
    out = inp
    if how == "symlink":
        out = tmp_path / "link.jsonl"
        out.symlink_to(inp)
    elif how == "hard link":
        out = tmp_path / "hard.jsonl"
        os.link(inp, out)
    scripted.script(default=answer("X"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("dsrs: the output") and "is the input" in r.stderr, r.stderr
    assert inp.read_bytes() == before and scripted.requests == []


def test_run_output_rewrites_are_atomic_and_keep_the_file_mode(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [{"question": "Q1"}])
    out.write_text("")
    os.chmod(out, 0o640)
    scripted.script(answer("A1"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat")
    assert r.returncode == 0, r.stderr
    assert [row["answer"] for row in read(out)] == ["A1"]
    assert os.stat(out).st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "in.jsonl", "out.jsonl"]  # no temporary left


# -- (2) resume by content key ----------------------------------------------------------------
def test_run_resumes_by_content_so_an_inserted_row_is_answered_and_none_duplicated(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [{"question": "Q1"}, {"question": "Q2"}, {"question": "Q3"}])
    scripted.script(answer("A1"), answer("A2"), answer("A3"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat", "-c", "1")
    assert r.returncode == 0, r.stderr
    first = read(out)
    assert all(len(row["_key"]) == 64 for row in first)

    # a row inserted at the top, one duplicated: the new ones are asked, nothing is asked twice
    write(inp, [{"question": "Q0"}, {"question": "Q1"}, {"question": "Q2"}, {"question": "Q3"}, {"question": "Q2"}])
    scripted.script(answer("A0"), answer("A2 again"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat", "-c", "1")
    assert r.returncode == 0, r.stderr
    assert "2 answered, 3 skipped, 0 failed" in r.stderr
    assert asked(scripted) == ["Q0", "Q2"]
    rows = read(out)
    assert [(row["_line"], row["question"], row["answer"]) for row in rows] == [
        (1, "Q0", "A0"), (2, "Q1", "A1"), (3, "Q2", "A2"), (4, "Q3", "A3"), (5, "Q2", "A2 again")
    ]  # fmt: skip
    assert rows[2]["_key"] == rows[4]["_key"] == first[1]["_key"]

    # run again: nothing to do
    scripted.script()
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat")
    assert r.returncode == 0 and "0 answered, 5 skipped" in r.stderr and scripted.requests == []
    assert read(out) == rows


def test_run_with_a_changed_signature_refuses_instead_of_answering_nothing(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [{"question": "Q1"}, {"question": "Q2"}])
    scripted.script(answer("A1"), answer("A2"))
    assert run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat").returncode == 0
    kept = out.read_bytes()

    scripted.script(default=answer("X"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat", sig="question -> answer: int")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "holds 2 answered rows that match no input row under this signature" in r.stderr, r.stderr
    assert "--drop-stale" in r.stderr and "new --output" in r.stderr
    assert out.read_bytes() == kept and scripted.requests == []

    # the user chooses: drop the stale answers and answer everything under the new signature
    scripted.script(chat_reply("[[ answer ]]\n1\n\n[[ end ]]"), chat_reply("[[ answer ]]\n2\n\n[[ end ]]"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat", "-c", "1", "--drop-stale",
            sig="question -> answer: int")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "dropping 2 stale rows" in r.stderr and "2 answered, 0 skipped" in r.stderr
    assert [(row["question"], row["answer"]) for row in read(out)] == [("Q1", 1), ("Q2", 2)]


def test_run_with_an_edited_input_row_refuses_and_drop_stale_answers_only_that_row(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [{"question": "Q1"}, {"question": "Q2"}])
    scripted.script(answer("A1"), answer("A2"))
    assert run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat", "-c", "1").returncode == 0
    write(inp, [{"question": "Q1"}, {"question": "Q2 (edited)"}])
    scripted.script(answer("A2 edited"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat")
    assert r.returncode == 1 and "holds 1 answered rows that match no input row" in r.stderr
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat", "--drop-stale")
    assert r.returncode == 0, r.stderr
    assert asked(scripted) == ["Q2 (edited)"]
    assert [(row["question"], row["answer"]) for row in read(out)] == [("Q1", "A1"), ("Q2 (edited)", "A2 edited")]


def test_run_refuses_an_output_that_is_not_a_run_output(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "notes.txt"
    write(inp, [{"question": "Q1"}])
    out.write_text("my notes\nnot JSON at all\n")
    scripted.script(default=answer("X"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat")
    assert r.returncode == 1 and "is not an output of dsrs run" in r.stderr, r.stderr
    assert out.read_text() == "my notes\nnot JSON at all\n" and scripted.requests == []


# -- (3) fail fast before the first call ------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (("-m", "openai/gpt-4o-mini"), "dsrs: [openai] no API key for openai -> set OPENAI_API_KEY"),
        (("-m", "nowhere/model"), "dsrs: unknown provider 'nowhere'"),
        (("--lane", "premium"), "dsrs: no lane named 'premium'"),
        (("-m", "embedded/missing.gguf"), "dsrs: [embedded/missing.gguf] no embedded model named 'missing.gguf'"),
    ],
)
def test_run_fails_fast_on_a_missing_key_or_unknown_lane(env, tmp_path, scripted, args, message):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [{"question": "Q1"}, {"question": "Q2"}])
    scripted.script(default=answer("X"))
    r = run(env, "-i", str(inp), "-o", str(out), *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(message), r.stderr
    assert not out.exists() and [q for q in scripted.requests if q.method == "POST"] == []  # (auto_detect probes GET)


def test_run_fails_fast_on_a_row_without_an_input_field(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [{"question": "Q1"}, {"q": "Q2"}, {"q": "Q3"}])
    scripted.script(default=answer("X"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"dsrs: input {inp} line 2 has no field 'question' (2 rows lack input fields;"), r.stderr
    assert "the row has: q" in r.stderr
    assert not out.exists() and scripted.requests == []


# -- Ctrl-C -----------------------------------------------------------------------------------
def test_ctrl_c_leaves_only_finished_rows_and_a_rerun_completes(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [{"question": f"Q{n}"} for n in range(1, 7)])
    scripted.script(answer("A1"), default=Reply(delay=120, json={}))  # then every call stalls
    cmd = [sys.executable, "-m", "dsrs.cli", "run", "question -> answer", "-i", str(inp), "-o", str(out),
           "-m", "llamacpp/chat", "-c", "3"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(scripted.requests) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # one row answered, three more in flight
    assert len(scripted.requests) == 4
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "cannot schedule" not in err
    assert "interrupted: 1 answered, 0 failed; rerun the same command to continue" in err, err
    (row,) = read(out)
    assert row["answer"] == "A1" and "_error" not in row
    done = row["question"]

    scripted.script(default=answer("later"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(asked(scripted)) == sorted(f"Q{n}" for n in range(1, 7) if f"Q{n}" != done)
    rows = read(out)
    assert [row["question"] for row in rows] == [f"Q{n}" for n in range(1, 7)]
    assert [row["answer"] for row in rows if row["question"] != done] == ["later"] * 5


def test_ctrl_c_on_the_embedded_model_writes_no_failed_rows(env, tmp_path):
    """Old code: rows answered in the interpreter's shutdown got `RuntimeError: cannot schedule
    new futures after shutdown`; now an interrupted row is simply not written (rerun answers it)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [{"question": f"What is the capital of country number {n}?"} for n in range(1, 13)])
    cmd = [sys.executable, "-m", "dsrs.cli", "run", "question -> answer", "-i", str(inp), "-o", str(out), "-c", "4",
           "--max-tokens", "32"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode in (0, 130), err  # 0: the batch finished before the signal landed
    assert "Traceback" not in err and "cannot schedule" not in err
    rows = read(out)
    assert rows and not [row for row in rows if "cannot schedule" in row.get("_error", "")], rows


def test_run_output_of_an_older_dsrs_without_keys_is_named_as_such(env, tmp_path, scripted):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [{"question": "Q1"}, {"question": "Q2"}])
    write(out, [{"question": "Q1", "_line": 1, "answer": "A1"}])  # the line-number format of before
    scripted.script(default=answer("X"))
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat")
    assert r.returncode == 1 and "holds 1 answered rows" in r.stderr and "1 written by an older dsrs without _key" in r.stderr
    assert scripted.requests == []
    r = run(env, "-i", str(inp), "-o", str(out), "-m", "llamacpp/chat", "--drop-stale")
    assert r.returncode == 0, r.stderr
    assert [(row["question"], row["answer"]) for row in read(out)] == [("Q1", "X"), ("Q2", "X")]
