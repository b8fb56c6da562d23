"""dspy programs on dsrs (`dsrs.interop.dspy`): dspy 3.4's own modules and optimizer, unmodified, with
their calls made by dsrs LMs and lanes against the scripted OpenAI-chat server and the real llama.cpp server."""

from __future__ import annotations

import json
import os
import tempfile
import time

import pytest

os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="dsrs-tests-dspy-"))  # never the user's cache

import dspy  # noqa: E402
from dspy.utils.exceptions import LMBillingError  # noqa: E402

import dsrs  # noqa: E402
import dsrs.interop.dspy as dd  # noqa: E402
from conftest import FEW_SHOT  # noqa: E402
from dsrs import LM, Budget, LaneMux  # noqa: E402
from dsrs.worst_case import lm_worst_case  # noqa: E402
from scripted import Reply, chat_reply  # noqa: E402


def answer(text: str, **kw: object) -> Reply:
    return chat_reply(f"[[ ## answer ## ]]\n{text}\n\n[[ ## completed ## ]]", **kw)  # type: ignore[arg-type]


def openai_lm(srv: object) -> LM:
    return LM("openai/gpt-4o-mini", base_url=srv.url + "/v1", api_key="sk-test").with_retries(0)  # type: ignore[attr-defined]


def causes(e: BaseException) -> list[BaseException]:
    out = []
    x: BaseException | None = e
    while x is not None and x not in out:
        out.append(x)
        x = x.__cause__ or x.__context__
    return out


SYSTEM = (
    "Your input fields are:\n1. `question` (str):\nYour output fields are:\n1. `answer` (str):\n"
    "All interactions will be structured in the following way, with the appropriate values filled in.\n\n"
    "[[ ## question ## ]]\n{question}\n\n[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]\n"
    "In adhering to this structure, your objective is: \n        Given the fields `question`, produce the fields `answer`."
)


def test_predict_sends_the_request_dspy_built_and_usage_reaches_the_tracker(scripted):
    scripted.script(answer("Paris", prompt_tokens=40, completion_tokens=6))
    dlm = dd.lm(openai_lm(scripted).with_temperature(0.0).with_max_tokens(64))
    dspy.configure(lm=dlm, adapter=None, track_usage=True)
    result = dspy.Predict("question -> answer")(question="What is the capital of France?")
    assert result.answer == "Paris"
    (seen,) = scripted.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.json == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "[[ ## question ## ]]\nWhat is the capital of France?\n\nRespond with the "
             "corresponding output fields, starting with the field `[[ ## answer ## ]]`, and then ending with the "
             "marker for `[[ ## completed ## ]]`."},
        ],
        "max_completion_tokens": 64,
        "temperature": 0.0,
    }  # fmt: skip
    # tokens (from Response.usage) and msats (added by the engine) in dspy's usage tracker:
    # 40 x $0.15/M + 6 x $0.60/M = $0.0000096 = 9.6 msats, rounded up per call
    usage = result.get_lm_usage()["dsrs/openai/gpt-4o-mini"]
    assert usage["prompt_tokens"] == 40 and usage["completion_tokens"] == 6 and usage["total_tokens"] == 46
    assert usage["cost_msats"] == 10
    entry = dlm.history[-1]
    assert entry["usage"]["total_tokens"] == 46
    assert entry["cost"] == pytest.approx(0.00001) and entry["cost_details"]["cost_msats"] == 10
    assert entry["cost_details"]["cost_source"] == "price_table"
    assert entry["response"].provider_data["dsrs"]["provider"] == "openai"


def test_options_from_dspy_reach_the_wire(scripted):
    scripted.script(answer("Paris"))
    dlm = dd.lm(openai_lm(scripted), temperature=0.7, max_tokens=32, stop=["\n\n\n"], seed=7)
    with dspy.context(lm=dlm, adapter=None):
        dspy.Predict("question -> answer")(question="q?")
    body = scripted.requests[0].json
    assert (body["temperature"], body["max_completion_tokens"], body["stop"], body["seed"]) == (0.7, 32, ["\n\n\n"], 7)


def test_chain_of_thought(scripted):
    scripted.script(chat_reply("[[ ## reasoning ## ]]\nFrance's capital is Paris.\n\n[[ ## answer ## ]]\nParis\n\n"
                               "[[ ## completed ## ]]", prompt_tokens=60, completion_tokens=12))  # fmt: skip
    dspy.configure(lm=dd.lm(openai_lm(scripted)), adapter=None, track_usage=True)
    result = dspy.ChainOfThought("question -> answer")(question="What is the capital of France?")
    assert (result.reasoning, result.answer) == ("France's capital is Paris.", "Paris")
    system = scripted.requests[0].json["messages"][0]["content"]
    assert "1. `reasoning` (str)" in system and "2. `answer` (str)" in system
    assert result.get_lm_usage()["dsrs/openai/gpt-4o-mini"]["total_tokens"] == 72


def test_react_tool_loop(scripted):
    calls = []

    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    scripted.script(
        chat_reply('[[ ## next_thought ## ]]\nI should look it up.\n\n[[ ## next_tool_name ## ]]\nget_weather\n\n'
                   '[[ ## next_tool_args ## ]]\n{"city": "Paris"}\n\n[[ ## completed ## ]]'),
        chat_reply("[[ ## next_thought ## ]]\nI know it now.\n\n[[ ## next_tool_name ## ]]\nfinish\n\n"
                   "[[ ## next_tool_args ## ]]\n{}\n\n[[ ## completed ## ]]"),
        chat_reply("[[ ## reasoning ## ]]\nThe tool said sunny.\n\n[[ ## answer ## ]]\nSunny\n\n[[ ## completed ## ]]"),
    )  # fmt: skip
    dspy.configure(lm=dd.lm(openai_lm(scripted)), adapter=None, track_usage=True)
    result = dspy.ReAct("question -> answer", tools=[get_weather], max_iters=4)(question="Weather in Paris?")
    assert result.answer == "Sunny" and calls == ["Paris"]
    assert len(scripted.requests) == 3
    # the tool's observation went back to the model in the next turn, and the extract step saw it too
    assert "sunny in Paris" in scripted.requests[1].json["messages"][-1]["content"]
    assert "sunny in Paris" in scripted.requests[2].json["messages"][-1]["content"]
    assert result.get_lm_usage()["dsrs/openai/gpt-4o-mini"]["total_tokens"] == 21


def test_native_tool_calls_round_trip(scripted):
    class Weather(dspy.Signature):
        """Answer with tools."""

        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        calls: dspy.ToolCalls = dspy.OutputField()

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    scripted.script(Reply(json={
        "id": "chatcmpl-2", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
                     "tool_calls": [{"id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
    }))  # fmt: skip
    with dspy.context(lm=dd.lm(openai_lm(scripted)), adapter=dspy.ChatAdapter(use_native_function_calling=True)):
        result = dspy.Predict(Weather)(question="Weather in Paris?", tools=[dspy.Tool(get_weather)])
    assert [(c.name, c.args) for c in result.calls.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert scripted.requests[0].json["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip


def test_quota_error_is_not_retried_by_dspy(scripted):
    scripted.script(default=Reply(429, json={"error": {"message": "You exceeded your current quota",
                                                       "type": "insufficient_quota", "code": "insufficient_quota"}}))  # fmt: skip
    with dspy.context(lm=dd.lm(openai_lm(scripted).with_retries(3), num_retries=3), adapter=None):
        with pytest.raises(LMBillingError) as info:
            dspy.Predict("question -> answer")(question="q?")
    assert len(scripted.requests) == 1  # neither dsrs nor dspy retried it
    assert any(isinstance(x, dsrs.QuotaExceededError) for x in causes(info.value))


def test_rate_limit_is_retried_by_dspy_when_asked(scripted):
    scripted.script(Reply(429, json={"error": {"message": "slow down", "type": "rate_limit_exceeded"}},
                          headers={"retry-after": "0"}), answer("Paris"))  # fmt: skip
    with dspy.context(lm=dd.lm(openai_lm(scripted), num_retries=1), adapter=None):
        assert dspy.Predict("question -> answer")(question="q?").answer == "Paris"
    assert len(scripted.requests) == 2


def test_hard_budget_refuses_before_sending(scripted):
    scripted.script(default=answer("Paris"))
    budget = Budget(1)
    with dspy.context(lm=dd.lm(openai_lm(scripted).with_budget(budget), num_retries=3), adapter=None):
        with pytest.raises(LMBillingError) as info:
            dspy.Predict("question -> answer")(question="q?")
    assert scripted.requests == [] and budget.spent_msats == 0 and budget.reserved_msats == 0
    assert any(isinstance(x, dsrs.BudgetExceededError) for x in causes(info.value))


def test_lanemux_route_reaches_dspy_history(scripted, llama_server):
    scripted.script(default=Reply(429, json={"error": {"message": "quota", "type": "insufficient_quota"}}))
    local = LM("llamacpp/gemma", base_url=llama_server.url + "/v1").with_temperature(0).with_stop("\n").with_max_tokens(8)
    mux = LaneMux().add_lane("cloud", openai_lm(scripted)).add_lane("local", local)
    dlm = dd.lm(mux, program="dspy-route-test")
    started = time.time()
    out = dlm(FEW_SHOT)
    assert "Paris" in out[0]
    entry = dlm.history[-1]
    assert entry["lane"] == "local" and entry["route"]["lane"] == "local"
    assert [(a["lane"], a["outcome"]) for a in entry["route"]["attempts"]] == [("cloud", "fallback"), ("local", "ok")]
    assert entry["cost"] == 0.0 and entry["cost_details"]["cost_source"] == "free"
    assert entry["usage"]["completion_tokens"] >= 1
    rows = [r for r in dsrs.ledger.default_ledger().rows(since=started) if r.program == "dspy-route-test"]
    assert [(r.lane, r.provider, r.cost_msats) for r in rows] == [("local", "llamacpp", 0)]


def test_bootstrap_fewshot_compiles_through_a_lanemux_with_a_hard_budget(scripted):
    trainset = [dspy.Example(question=f"What is the capital of {c}?", answer=a).with_inputs("question")
                for c, a in (("France", "Paris"), ("Brazil", "Brasilia"), ("Norway", "Oslo"))]  # fmt: skip
    replies = [answer(a, prompt_tokens=150, completion_tokens=10) for a in ("Paris", "Brasilia", "Oslo")]

    def compile_with(budget: Budget, program: str) -> tuple[dspy.Module, list[dsrs.ledger.Row]]:
        scripted.script(*replies)
        mux = LaneMux().add_lane("main", openai_lm(scripted).with_max_tokens(200)).with_budget(budget)
        started = time.time()
        with dspy.context(lm=dd.lm(mux, program=program), adapter=None):
            opt = dspy.teleprompt.BootstrapFewShot(metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
                                                   max_bootstrapped_demos=3, max_labeled_demos=0, max_errors=10)  # fmt: skip
            compiled = opt.compile(dspy.Predict("question -> answer"), trainset=trainset)
        rows = [r for r in dsrs.ledger.default_ledger().rows(since=started) if r.program == program]
        return compiled, rows

    wide = Budget(10**6)
    compiled, rows = compile_with(wide, "bootstrap-wide")
    assert len(compiled.demos) == 3 and len(scripted.requests) == 3
    assert [r.lane for r in rows] == ["main"] * 3
    per_call = rows[0].cost_msats  # 150 x 0.15 + 10 x 0.6 msats = 28.5 -> 29
    assert per_call == 29 and all(r.cost_msats == per_call for r in rows)
    assert wide.spent_msats == 3 * per_call and wide.reserved_msats == 0

    # the worst case dsrs reserves for each of these (equal-length) prompts, from what was sent
    first = scripted.requests[0].json["messages"]
    base = openai_lm(scripted).with_max_tokens(200)
    worst = lm_worst_case(base, base.request([dsrs.Message.coerce(m) for m in first]))
    assert worst is not None and worst > per_call
    # room for two calls' cost and a third's worst case, less one msat: the third is refused unsent
    tight = Budget(2 * per_call + worst - 1)
    compiled, rows = compile_with(tight, "bootstrap-tight")
    assert len(scripted.requests) == 2 and len(compiled.demos) == 2
    assert [r.lane for r in rows] == ["main"] * 2
    assert tight.spent_msats == 2 * per_call <= tight.limit_msats and tight.reserved_msats == 0


def test_import_dsrs_interop_does_not_import_dspy():
    import subprocess
    import sys

    code = "import sys, dsrs, dsrs.interop.dspy; print('dspy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip


async def test_async_predict_uses_the_async_engine(scripted):
    scripted.script(answer("Paris", prompt_tokens=40, completion_tokens=6))
    with dspy.context(lm=dd.lm(openai_lm(scripted)), adapter=None, track_usage=True):
        result = await dspy.Predict("question -> answer").acall(question="What is the capital of France?")
    assert result.answer == "Paris" and len(scripted.requests) == 1
    assert result.get_lm_usage()["dsrs/openai/gpt-4o-mini"] == {
        "prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46, "cost_msats": 10}  # fmt: skip


async def test_streamify_streams_through_dsrs(scripted):
    text = "[[ ## answer ## ]]\nParis is the capital\n\n[[ ## completed ## ]]"
    pieces = [text[i:i + 6] for i in range(0, len(text), 6)]
    scripted.script(Reply(sse=[_chunk({"role": "assistant", "content": ""})] + [_chunk({"content": p}) for p in pieces]
                      + [_chunk({}, "stop"), {"id": "chatcmpl-9", "object": "chat.completion.chunk", "choices": [],
                         "model": "gpt-4o-mini", "usage": {"prompt_tokens": 30, "completion_tokens": 12,
                                                           "total_tokens": 42}}, "[DONE]"]))  # fmt: skip
    program = dspy.streamify(dspy.Predict("question -> answer"),
                             stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")])  # fmt: skip
    chunks, final = [], None
    with dspy.context(lm=dd.lm(openai_lm(scripted)), adapter=None):
        async for item in program(question="What is the capital of France?"):
            if isinstance(item, dspy.streaming.StreamResponse):
                chunks.append(item.chunk)
            elif isinstance(item, dspy.Prediction):
                final = item
    assert final is not None and final.answer == "Paris is the capital"
    assert "".join(chunks).strip() == "Paris is the capital" and len(chunks) > 1
    body = scripted.requests[0].json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_json_adapter_response_format_reaches_the_wire(scripted):
    scripted.script(chat_reply('{"answer": "Paris"}'))
    with dspy.context(lm=dd.lm(openai_lm(scripted)), adapter=dspy.JSONAdapter()):
        assert dspy.Predict("question -> answer")(question="q?").answer == "Paris"
    rf = scripted.requests[0].json["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "DSPyProgramOutputs"
    assert rf["json_schema"]["schema"]["properties"] == {"answer": {"title": "Answer", "type": "string"}}


def test_images_go_as_content_parts(scripted):
    scripted.script(answer("a cat"))
    with dspy.context(lm=dd.lm(openai_lm(scripted)), adapter=None):
        out = dspy.Predict("image: dspy.Image -> answer")(image=dspy.Image("https://example.com/cat.png"))
    assert out.answer == "a cat"
    user = scripted.requests[0].json["messages"][-1]
    assert {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}} in user["content"]


def test_what_dsrs_cannot_send_is_refused_not_dropped(scripted):
    from dspy import lm15

    engine = dd.DsrsEngine(openai_lm(scripted))
    req = lm15.Request(model="m", messages=(lm15.Message.user("hi"),),
                       config=lm15.Config(reasoning=lm15.Reasoning(effort="high")))  # fmt: skip
    with pytest.raises(lm15.UnsupportedFeatureError) as info:
        engine.complete(req)
    assert info.value.feature == "config.reasoning" and scripted.requests == []


def test_a_pylon_local_lm_runs_a_dspy_call(llama_server):
    pylon = dsrs.PylonLM.new_local().with_backend("llama.cpp").with_model("gemma").with_options(
        base_url=llama_server.url + "/v1", temperature=0, stop=("\n",), max_tokens=8)  # fmt: skip
    dlm = dd.lm(pylon)
    assert "Paris" in dlm(FEW_SHOT)[0]
    assert dlm.history[-1]["cost_details"]["cost_msats"] == 0


async def test_bootstrap_fewshot_over_a_paid_swarm_lane_with_a_hard_budget(scripted):
    """BootstrapFewShot whose calls go through a LaneMux to a Pylon swarm lane: each call is a NIP-90
    job on our relay, paid over NWC to a `pylon serve` provider (whose own model is the scripted
    server, so that dspy gets answers in its format). The ledger shows each call on the swarm lane
    at the invoice price; the hard budget lets two paid calls through and refuses the third unsent."""
    import asyncio

    from dsrs import _sync
    from dsrs.pylon import NwcWallet, PylonLM, pools
    from dsrs.pylon.serve import Provider, lm_for
    from nwc_service import start_net, stop_net

    net = await start_net()
    acct = net.ledger.open(0)
    prov = Provider(lm_for("openai/gpt-4o-mini", None, scripted.url + "/v1"), [net.relay.url], price_msats=1000,
                    wallet=NwcWallet(net.service.uri(acct), timeout=5))  # fmt: skip
    os.environ["OPENAI_API_KEY"] = "sk-provider"
    try:
        await prov.start()
        swarm = (PylonLM.new_swarm(net.relay.url).with_wallet(net.wallet).with_budget_msats(100_000)
                 .with_bid_msats(5000).with_timeout(60).with_max_tokens(64))  # fmt: skip
        worst = swarm.worst_case_msats(swarm.request("x"))
        budget = Budget(2 * 1000 + worst - 1)
        mux = LaneMux().add_lane("swarm", swarm).with_budget(budget)
        trainset = [dspy.Example(question=f"What is the capital of {c}?", answer=a).with_inputs("question")
                    for c, a in (("France", "Paris"), ("Brazil", "Brasilia"), ("Norway", "Oslo"))]  # fmt: skip
        scripted.script(*(answer(a) for a in ("Paris", "Brasilia", "Oslo")))

        def run() -> tuple[dspy.Module, float]:
            started = time.time()
            try:
                with dspy.context(lm=dd.lm(mux, program="bootstrap-swarm"), adapter=None):
                    opt = dspy.teleprompt.BootstrapFewShot(
                        metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
                        max_bootstrapped_demos=3, max_labeled_demos=0, max_errors=10)  # fmt: skip
                    return opt.compile(dspy.Predict("question -> answer"), trainset=trainset), started
            finally:
                _sync.run(pools.aclose())  # this thread's relay connections

        compiled, started = await asyncio.to_thread(run)
    finally:
        os.environ.pop("OPENAI_API_KEY", None)
        await prov.stop()
        await stop_net(net)
    assert len(compiled.demos) == 2 and len(scripted.requests) == 2
    assert "What is the capital of France?" in scripted.requests[0].json["messages"][-1]["content"]
    rows = [r for r in dsrs.ledger.default_ledger().rows(since=started) if r.program == "bootstrap-swarm"]
    assert [(r.lane, r.provider, r.cost_msats, r.cost_source) for r in rows] == [("swarm", "pylon", 1000, "invoice")] * 2
    assert budget.spent_msats == 2000 <= budget.limit_msats and budget.reserved_msats == 0
    assert net.paid() == 2000 and acct.balance_msats == 2000


def test_evaluate_on_threads(scripted):
    scripted.script(default=answer("Paris", prompt_tokens=40, completion_tokens=6))
    devset = [dspy.Example(question=f"q{i}?", answer="Paris").with_inputs("question") for i in range(8)]
    started = time.time()
    with dspy.context(lm=dd.lm(openai_lm(scripted), program="dspy-evaluate"), adapter=None):
        result = dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
                               num_threads=4)(dspy.Predict("question -> answer"))  # fmt: skip
    assert result.score == 100.0 and len(scripted.requests) == 8
    rows = [r for r in dsrs.ledger.default_ledger().rows(since=started) if r.program == "dspy-evaluate"]
    assert len(rows) == 8 and sum(r.cost_msats for r in rows) == 80


def test_a_reasoning_model_name_keeps_the_options_given(scripted):
    scripted.script(answer("Paris"))
    o3 = LM("openai/o3", base_url=scripted.url + "/v1", api_key="sk-test").with_retries(0)
    with dspy.context(lm=dd.lm(o3, temperature=0.2, max_tokens=100), adapter=None):  # dspy's own rule would refuse
        dspy.Predict("question -> answer")(question="q?")
    body = scripted.requests[0].json
    assert body["max_completion_tokens"] == 100 and body["temperature"] == 0.2


def test_codex_sdk_lm_runs_a_dspy_predict(tmp_path):
    """The real Codex CLI, driven headless by CodexSdkLM, as the LM of a dspy program (its model
    calls go to the local Responses-API server)."""
    from responses_server import ResponsesServer, Turn, message

    from dsrs.codex_sdk import CodexSdkLM

    binary = os.environ.get("DSRS_TEST_CODEX_BIN") or os.path.expanduser(
        "~/.cache/dsrs-test/codex-0.169.0/node_modules/.bin/codex")  # fmt: skip
    assert os.access(binary, os.X_OK), f"Codex CLI missing at {binary}: run scripts/test (it installs it)"
    server = ResponsesServer()
    try:
        server.turns(Turn([message("[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]")], input_tokens=321,
                          output_tokens=7))  # fmt: skip
        for d in ("ws", "codex-home", "home"):
            (tmp_path / d).mkdir()
        codex = (CodexSdkLM().with_binary(binary).with_model("gpt-5.5").with_codex_home(str(tmp_path / "codex-home"))
                 .with_working_dir(tmp_path / "ws").with_sandbox("read-only")
                 .with_env({"FX_KEY": "fx-secret-key-123", "HOME": str(tmp_path / "home")})
                 .with_config({"model_provider": "fx", "model_providers.fx.name": "fx",
                               "model_providers.fx.base_url": server.base_url, "model_providers.fx.env_key": "FX_KEY",
                               "model_providers.fx.stream_max_retries": 0, "model_providers.fx.request_max_retries": 0})
                 .with_timeout(60))  # fmt: skip
        with dspy.context(lm=dd.lm(codex), adapter=None, track_usage=True):
            result = dspy.Predict("question -> answer")(question="What is the capital of France?")
        assert result.answer == "Paris"
        assert result.get_lm_usage()["dsrs/codex-sdk/gpt-5.5"]["total_tokens"] == 328
        (body,) = server.responses()
        assert "What is the capital of France?" in json.dumps(body)
    finally:
        server.close()
