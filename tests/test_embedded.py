"""The embedded default: llama.cpp in this process with Gemma 3 270M, offline."""

from __future__ import annotations

import asyncio

import pytest

import dsrs
from conftest import FEW_SHOT
from dsrs import LM, StreamEnd
from dsrs.providers import embedded


@pytest.fixture(scope="module")
def lm():
    return LM("embedded/gemma-3-270m", max_tokens=8, stop=["\n"], temperature=0)


async def test_answers_a_few_shot_question_with_engine_usage(lm):
    c = await lm.acall(FEW_SHOT)
    assert c.text.strip() == "Paris"
    raw = embedded.server("gemma-3-270m").handle_completions(
        {"prompt": FEW_SHOT, "max_tokens": 8, "stop": ["\n"], "temperature": 0}
    )
    assert c.usage.prompt_tokens == raw["usage"]["prompt_tokens"]
    assert c.usage.completion_tokens == raw["usage"]["completion_tokens"]
    assert c.usage.cost_msats == 0 and c.usage.cost_source is dsrs.CostSource.FREE
    assert c.provider == "embedded" and c.finish_reason == "stop"


async def test_stream(lm):
    items = [i async for i in lm.astream(FEW_SHOT.replace("France", "Japan"))]
    end = items[-1]
    assert isinstance(end, StreamEnd)
    assert "".join(items[:-1]) == end.completion.text
    assert end.completion.text.strip() == "Tokyo"
    assert end.usage.completion_tokens >= 1 and end.usage.prompt_tokens > 10


async def test_concurrent_calls_do_not_block_the_loop(lm):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    t = asyncio.create_task(ticker())
    results = await asyncio.gather(*(lm.acall(FEW_SHOT) for _ in range(3)))
    t.cancel()
    assert all(r.text.strip() == "Paris" for r in results)
    assert ticks > 0  # the loop kept running while the engine worked


def test_conversation_is_rendered_as_a_transcript():
    msgs = (dsrs.Message.system("Answer briefly."), dsrs.Message.user("Hi"))
    assert embedded.render(msgs) == "System: Answer briefly.\n\nUser: Hi\n\nAssistant:"


async def test_tools_are_refused_before_running(lm):
    with pytest.raises(dsrs.UnsupportedFeatureError):
        await lm.acall("x", tools=[dsrs.Tool("f")])


def test_unknown_model_is_a_clear_error():
    with pytest.raises(dsrs.NotFoundError) as e:
        LM("embedded/llama-70b")("hi")
    assert "gemma-3-270m" in str(e.value)


# -- cancellation (issue 14): generation stops at the next token ------------------------------------
LONG_QUESTION = "What are all the numbers from 1 to 500, written out with commas?"  # runs to max_tokens

CHILD = '''
import sys
from dsrs import cli
from dsrs.providers import embedded

real = embedded.server


class Watched:
    """The real engine; says on stderr when generation is under way (the parent then sends SIGINT)."""

    def __init__(self, engine):
        self.engine = engine

    def handle_completions(self, body, cb=None):
        if cb is None:
            print("GENERATING", file=sys.stderr, flush=True)
            return self.engine.handle_completions(body)
        seen = []

        def watch(chunk):
            if not seen:
                seen.append(1)
                print("GENERATING", file=sys.stderr, flush=True)
            return cb(chunk)

        return self.engine.handle_completions(body, watch)


embedded.server = lambda *a, **k: Watched(real(*a, **k))
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("stream", [False, True], ids=["ask", "ask --stream"])
def test_ctrl_c_stops_dsrs_ask_on_the_embedded_model_at_once(tmp_path, stream):
    import signal
    import subprocess
    import sys
    import time

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    args = [sys.executable, str(child), "ask", "--max-tokens", "1900", *(["--stream"] if stream else []), LONG_QUESTION]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr.readline().strip() == "GENERATING"  # 1900 tokens to go: minutes on a busy machine
        p.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = p.communicate(timeout=30)  # a generous bound: it takes well under a second when idle
        waited = time.monotonic() - sent
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130 and "dsrs: interrupted" in err, err[-2000:]
    assert "Traceback" not in err and "completion =" not in err + out  # no answer printed after the interrupt
    assert waited < 30


async def test_a_cancelled_generation_stops_and_does_not_hold_the_engine(monkeypatch):
    real = embedded.server
    counts: list[int] = []  # tokens delivered per generation
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    class Watched:
        def __init__(self, engine):
            self.engine = engine

        def handle_completions(self, body, cb):
            counts.append(0)
            i = len(counts) - 1

            def watch(chunk):
                counts[i] += 1
                loop.call_soon_threadsafe(started.set)
                return cb(chunk)

            return self.engine.handle_completions(body, watch)

    monkeypatch.setattr(embedded, "server", lambda *a, **k: Watched(real(*a, **k)))
    lm = LM("embedded/gemma-3-270m", max_tokens=1900, temperature=0)
    call = asyncio.ensure_future(lm.acall(LONG_QUESTION))
    await started.wait()
    at_cancel = counts[0]
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call  # returns once the engine has stopped
    stopped_at = counts[0]
    assert stopped_at - at_cancel <= 100 and stopped_at < 1900  # stopped at (about) the next token, not the end
    c = await lm.acall(FEW_SHOT, max_tokens=8, stop=["\n"])  # the engine is free for the next call
    assert c.text.strip() == "Paris" and counts[0] == stopped_at  # the abandoned one never went on
