"""OpenTelemetry spans (dsrs.tracing), exported by the real OTel SDK over OTLP/HTTP to a real receiver:
MLflow's tracking server (`mlflow server`, which ingests OTLP at /v1/traces), started here on
127.0.0.1 from its own venv (scripts/test installs it). Each test reads its trace back from MLflow's
REST API and checks names, attributes, events, status and parent-child links; MLflow does not keep
a span's kind, so kinds are read from an in-memory exporter on the same provider.

Covered: an LM call and a stream against the real llama.cpp server, an abandoned stream, retries
as events, a LaneMux fallback (first lane down), a gateway request continuing the caller's trace,
prompt capture as an opt-in, and tracing off: no provider means no OpenTelemetry import and no span.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import FEW_SHOT, free_port
from dsrs import LM, LaneMux, StreamEnd, tracing
from scripted import Reply, chat_reply

MLFLOW_BIN = os.environ.get("DSRS_TEST_MLFLOW_BIN") or os.path.expanduser("~/.cache/dsrs-test/mlflow-3.17.2/bin/mlflow")
ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "0"  # MLflow's default experiment; OTLP exports name it in the x-mlflow-experiment-id header


# -- the receiver ---------------------------------------------------------------------------------
@dataclass
class Span:
    name: str
    span_id: str
    parent: str | None
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: str
    message: str


def _hex(b64: str | None) -> str | None:
    return base64.b64decode(b64).hex() if b64 else None


def _value(v: dict[str, Any]) -> Any:
    """An OTLP AnyValue (as MLflow's REST API returns it) as a Python value."""
    (kind, x), = v.items()
    if kind == "array_value":
        return [_value(i) for i in x.get("values", [])]
    if kind == "kvlist_value":
        return {kv["key"]: _value(kv["value"]) for kv in x.get("values", [])}
    if kind == "int_value":
        return int(x)
    return x


def _attrs(kvs: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: _value(kv["value"]) for kv in kvs or () if not kv["key"].startswith("mlflow.")}


@dataclass
class Receiver:
    url: str
    log: Path

    def spans(self, trace_id: int, want: int, timeout: float = 90) -> dict[str, Span]:
        """The trace's spans as MLflow stored them (by name; waits until `want` have arrived)."""
        url = f"{self.url}/api/3.0/mlflow/traces/get?trace_id=tr-{trace_id:032x}"
        deadline = time.monotonic() + timeout
        got: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=30) as r:
                    got = json.loads(r.read())["trace"].get("spans", [])
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
            if len(got) >= want:
                break
            time.sleep(0.3)
        out: dict[str, Span] = {}
        for s in sorted(got, key=lambda s: int(s["start_time_unix_nano"])):
            span = Span(s["name"], _hex(s["span_id"]) or "", _hex(s.get("parent_span_id")), _attrs(s.get("attributes")),
                        [(e["name"], _attrs(e.get("attributes"))) for e in s.get("events", [])],
                        s.get("status", {}).get("code", "STATUS_CODE_UNSET"), s.get("status", {}).get("message", ""))  # fmt: skip
            key, n = span.name, 2
            while key in out:  # several spans of one name: "chat gemma", "chat gemma #2"... in start order
                key, n = f"{span.name} #{n}", n + 1
            out[key] = span
        assert len(out) == want, f"{len(out)} spans arrived, wanted {want}: {sorted(out)}"
        return out


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    assert os.access(MLFLOW_BIN, os.X_OK), f"MLflow missing at {MLFLOW_BIN}: run scripts/test (it installs it)"
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = d / "server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # nothing leaves 127.0.0.1
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [MLFLOW_BIN, "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--default-artifact-root",
             str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=d,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # its first start creates the database: slow on a busy machine
        while True:
            assert proc.poll() is None, f"mlflow server exited: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlflow server did not start: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield Receiver(url, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its job runner, started in their own session
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# -- a tracer provider exporting to it ------------------------------------------------------------
@dataclass
class Traces:
    provider: Any
    memory: Any  # InMemorySpanExporter: the kinds MLflow does not keep
    receiver: Receiver
    roots: list[Any] = field(default_factory=list)

    def root(self, name: str) -> Any:
        """A span of the test's own around dsrs calls (dsrs's spans must be its children)."""
        return self.provider.get_tracer("tests").start_as_current_span(name)

    def arrived(self, root: Any, want: int) -> dict[str, Span]:
        assert self.provider.force_flush(30_000)
        return self.receiver.spans(root.get_span_context().trace_id, want)

    def kind(self, span: Span) -> str:
        for s in self.memory.get_finished_spans():
            if f"{s.context.span_id:016x}" == span.span_id:
                return str(s.kind.name)
        raise AssertionError(f"span {span.name} not in memory")


@pytest.fixture(scope="module")
def traces(receiver: Receiver) -> Iterator[Traces]:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "dsrs-tests"}))
    exporter = OTLPSpanExporter(endpoint=receiver.url + "/v1/traces", headers={"x-mlflow-experiment-id": EXPERIMENT})
    provider.add_span_processor(BatchSpanProcessor(exporter))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert tracing.configure(tracer_provider=provider)  # this process sets no global provider: other tests stay untraced
    try:
        yield Traces(provider, memory, receiver)
    finally:
        assert not tracing.configure()  # back to looking for a global provider: there is none
        provider.shutdown()


def _llama(llama_server: Any) -> LM:
    return LM("llamacpp/gemma", base_url=llama_server.url + "/v1").with_temperature(0).with_max_tokens(8).with_stop("\n")


def _no_text(spans: dict[str, Span], *texts: str) -> None:
    """No prompt or answer in any attribute, event or status (content capture is off by default)."""
    blob = json.dumps([[s.attributes, s.events, s.message] for s in spans.values()])
    for t in texts:
        assert t.strip() and t.strip() not in blob


# -- LM calls ---------------------------------------------------------------------------------------
async def test_an_lm_call_is_a_chat_span_with_the_genai_attributes(traces: Traces, llama_server: Any) -> None:
    lm = _llama(llama_server)
    cached = lm.with_cache(True).with_seed(7)
    with traces.root("test lm call") as root:
        c = await lm.acall(FEW_SHOT)
        await cached.acall(FEW_SHOT)
        hit = await cached.acall(FEW_SHOT)
    assert c.text.strip().startswith("Paris") and hit.usage.cache_hit
    spans = traces.arrived(root, 4)
    chat, top = spans["chat gemma"], spans["test lm call"]
    assert chat.parent == top.span_id and traces.kind(chat) == "CLIENT"
    a = chat.attributes
    port = int(llama_server.url.rsplit(":", 1)[1])
    assert {k: a[k] for k in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                              "gen_ai.request.max_tokens", "gen_ai.request.temperature", "gen_ai.request.stop_sequences",
                              "server.address", "server.port", "dsrs.cost_msats", "dsrs.cost_source")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "llamacpp", "gen_ai.request.model": "gemma",
        "gen_ai.request.max_tokens": 8, "gen_ai.request.temperature": 0.0, "gen_ai.request.stop_sequences": ["\n"],
        "server.address": "127.0.0.1", "server.port": port, "dsrs.cost_msats": 0, "dsrs.cost_source": "free",
    }  # fmt: skip
    assert a["gen_ai.usage.input_tokens"] == c.usage.prompt_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == c.usage.completion_tokens > 0
    assert a["gen_ai.response.finish_reasons"] == [c.finish_reason]
    assert a["gen_ai.response.id"] == c.id and a["gen_ai.response.model"] == c.model
    assert chat.status == "STATUS_CODE_UNSET" and "error.type" not in a and "dsrs.cache_hit" not in a
    miss, from_cache = spans["chat gemma #2"].attributes, spans["chat gemma #3"].attributes
    assert miss["gen_ai.request.seed"] == from_cache["gen_ai.request.seed"] == 7 and "dsrs.cache_hit" not in miss
    assert from_cache["dsrs.cache_hit"] is True and from_cache["dsrs.cost_source"] == "cache"
    assert from_cache["dsrs.cost_msats"] == 0
    _no_text(spans, FEW_SHOT, c.text)


async def test_prompts_and_answers_are_recorded_only_when_asked(traces: Traces, llama_server: Any) -> None:
    tracing.configure(tracer_provider=traces.provider, capture_content=True)
    try:
        with traces.root("test capture") as root:
            c = await _llama(llama_server).acall(messages=[{"role": "user", "content": FEW_SHOT}])
    finally:
        tracing.configure(tracer_provider=traces.provider)
    a = traces.arrived(root, 2)["chat gemma"].attributes
    a = {k: json.loads(v) if isinstance(v, str) else v for k, v in a.items() if k.startswith("gen_ai.") and "messages" in k}
    assert a["gen_ai.input.messages"] == [{"role": "user", "parts": [{"type": "text", "content": FEW_SHOT}]}]
    assert a["gen_ai.output.messages"] == [
        {"role": "assistant", "parts": [{"type": "text", "content": c.text}], "finish_reason": c.finish_reason}]


async def test_a_stream_span_ends_with_the_stream_and_an_abandoned_one_says_so(traces: Traces, llama_server: Any) -> None:
    lm = _llama(llama_server)
    with traces.root("test stream") as root:
        deltas, end = [], None
        async for item in lm.astream(FEW_SHOT):
            if isinstance(item, StreamEnd):
                end = item.completion
            else:
                deltas.append(item)
        agen = lm.with_max_tokens(32).astream("Once upon a time")
        first = await agen.__anext__()
        assert isinstance(first, str)
        await agen.aclose()  # the consumer leaves after one delta
    assert end is not None and "".join(deltas) == end.text
    spans = traces.arrived(root, 3)
    done, left = spans["chat gemma"], spans["chat gemma #2"]
    assert done.parent == left.parent == spans["test stream"].span_id
    assert done.attributes["gen_ai.usage.output_tokens"] == end.usage.completion_tokens > 0
    assert done.attributes["gen_ai.response.finish_reasons"] == [end.finish_reason]
    assert "dsrs.abandoned" not in done.attributes
    assert left.attributes["dsrs.abandoned"] is True and left.attributes["gen_ai.request.max_tokens"] == 32
    assert "gen_ai.usage.output_tokens" not in left.attributes and left.status == "STATUS_CODE_UNSET"
    assert traces.kind(done) == traces.kind(left) == "CLIENT"


async def test_retries_are_events_on_the_call_span_and_a_failure_sets_error_type(traces: Traces, scripted: Any,
                                                                                 fake_retry: Any) -> None:  # fmt: skip
    scripted.script(Reply(503, {"error": {"message": "overloaded", "type": "server_error"}}), chat_reply("hi"),
                   Reply(401, {"error": {"message": "bad key sk-test-secret-1234", "type": "invalid_request_error",
                                         "code": "invalid_api_key"}}))  # fmt: skip
    lm = LM("openai/gpt-4o-mini").with_base_url(scripted.url + "/v1").with_api_key("sk-test-secret-1234")
    lm = lm.with_options(retry_policy=fake_retry)
    with traces.root("test retries") as root:
        assert (await lm.acall("hi")).text == "hi"
        with pytest.raises(Exception) as err:
            await lm.acall("again")
    assert type(err.value).__name__ == "AuthenticationError"
    spans = traces.arrived(root, 3)
    ok, failed = spans["chat gpt-4o-mini"], spans["chat gpt-4o-mini #2"]
    assert [(name, e["error.type"], e["http.response.status_code"], e["dsrs.retry.attempt"])
            for name, e in ok.events] == [("dsrs.retry", "ProviderUnavailableError", 503, 1)]  # fmt: skip
    assert ok.status == "STATUS_CODE_UNSET" and ok.attributes["gen_ai.provider.name"] == "openai"
    assert failed.status == "STATUS_CODE_ERROR" and failed.message == "AuthenticationError"
    assert failed.attributes["error.type"] == "AuthenticationError"
    assert failed.attributes["dsrs.error.code"] == "invalid_api_key" and failed.attributes["http.response.status_code"] == 401
    assert "sk-test-secret-1234" not in json.dumps([[s.attributes, s.events, s.message] for s in spans.values()])


# -- LaneMux ----------------------------------------------------------------------------------------
async def test_a_lanemux_fallback_is_a_route_span_with_one_child_per_lane_attempt(traces: Traces, llama_server: Any,
                                                                                   fake_retry: Any) -> None:  # fmt: skip
    down = LM("llamacpp/gemma", base_url=f"http://127.0.0.1:{free_port()}/v1").with_retries(1)  # nothing listens there
    mux = LaneMux().add_lane("down", down).add_lane("llama", _llama(llama_server)).with_options(retry_policy=fake_retry)
    with traces.root("test fallback") as root:
        c = await mux.acall(FEW_SHOT)
    assert c.route.lane == "llama" and c.text.strip().startswith("Paris")
    spans = traces.arrived(root, 5)
    route = spans["dsrs.route"]
    assert route.parent == spans["test fallback"].span_id and traces.kind(route) == "INTERNAL"
    assert {k: route.attributes[k] for k in ("dsrs.route.policy", "dsrs.route.lanes", "dsrs.lane", "dsrs.route.retries",
                                             "dsrs.route.fallbacks")} == {
        "dsrs.route.policy": "priority", "dsrs.route.lanes": ["down", "llama"], "dsrs.lane": "llama",
        "dsrs.route.retries": 1, "dsrs.route.fallbacks": 1}  # fmt: skip
    assert [(n, e["dsrs.lane"], e["error.type"]) for n, e in route.events] == [
        ("dsrs.retry", "down", "APIConnectionError"), ("dsrs.fallback", "down", "APIConnectionError")]
    tries = [spans["chat gemma"], spans["chat gemma #2"], spans["chat gemma #3"]]
    assert [(s.parent, s.attributes["dsrs.lane"], s.status, s.attributes.get("error.type")) for s in tries] == [
        (route.span_id, "down", "STATUS_CODE_ERROR", "APIConnectionError"),
        (route.span_id, "down", "STATUS_CODE_ERROR", "APIConnectionError"),
        (route.span_id, "llama", "STATUS_CODE_UNSET", None)]  # fmt: skip
    answered = tries[2].attributes
    assert answered["gen_ai.usage.output_tokens"] == c.usage.completion_tokens > 0
    assert answered["gen_ai.request.max_tokens"] == 8 and answered["dsrs.cost_msats"] == 0
    assert "gen_ai.usage.input_tokens" not in route.attributes  # tokens live on the lane spans only: sums count once
    assert all(traces.kind(s) == "CLIENT" for s in tries)


async def test_a_lanemux_stream_ends_its_route_and_lane_spans_with_the_stream(traces: Traces, llama_server: Any) -> None:
    mux = LaneMux().add_lane("llama", _llama(llama_server))
    with traces.root("test mux stream") as root:
        items = [x async for x in mux.astream(FEW_SHOT)]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.completion.route.lane == "llama"
    spans = traces.arrived(root, 3)
    route, lane = spans["dsrs.route"], spans["chat gemma"]
    assert lane.parent == route.span_id and route.attributes["dsrs.lane"] == "llama"
    assert lane.attributes["dsrs.lane"] == "llama"
    assert lane.attributes["gen_ai.usage.output_tokens"] == end.completion.usage.completion_tokens > 0


# -- the gateway -----------------------------------------------------------------------------------
def test_a_gateway_request_is_a_server_span_continuing_the_callers_trace(traces: Traces, llama_server: Any) -> None:
    from opentelemetry import propagate

    from gateway_fixture import CLIENT_KEY, InProcessGateway

    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"local": {"lm": "llamacpp/gemma", "base_url": llama_server.url + "/v1",
                            "options": {"temperature": 0.0, "max_tokens": 8}}},
        "models": {"gpt-5.5": {"lanes": ["local"]}},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}},
    })  # fmt: skip
    try:
        with traces.root("test gateway") as root:
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}
            propagate.inject(headers)  # traceparent: the gateway continues this trace
            body = json.dumps({"model": "gpt-5.5", "messages": [{"role": "user", "content": FEW_SHOT}]}).encode()
            req = urllib.request.Request(gw.url + "/v1/chat/completions", data=body, headers=headers)
            with urllib.request.urlopen(req, timeout=120) as r:
                answer = json.loads(r.read())
    finally:
        gw.close()
    assert answer["choices"][0]["message"]["content"].strip().startswith("Paris")
    spans = traces.arrived(root, 3)
    server, chat = spans["POST /v1/chat/completions"], spans["chat gemma"]
    assert server.parent == spans["test gateway"].span_id and chat.parent == server.span_id
    assert traces.kind(server) == "SERVER"
    assert {k: server.attributes.get(k) for k in ("http.request.method", "http.route", "http.response.status_code",
                                                   "gen_ai.request.model", "dsrs.lane", "dsrs.gateway.key")} == {
        "http.request.method": "POST", "http.route": "/v1/chat/completions", "http.response.status_code": 200,
        "gen_ai.request.model": "gpt-5.5", "dsrs.lane": "local", "dsrs.gateway.key": "alice"}  # fmt: skip
    assert CLIENT_KEY not in json.dumps([s.attributes for s in spans.values()])


# -- off --------------------------------------------------------------------------------------------
def test_without_a_tracer_provider_nothing_is_traced_or_imported(receiver: Receiver, llama_server: Any) -> None:
    """In a fresh process: calls before any provider import no OpenTelemetry; with a global provider
    set, `configure(enabled=False)` keeps dsrs silent while the app's own spans still arrive; and
    `configure()` then finds the global provider."""
    script = textwrap.dedent(f"""
        import json, sys
        import dsrs
        from dsrs import tracing
        lm = dsrs.LM("llamacpp/gemma", base_url={llama_server.url + "/v1"!r}).with_temperature(0).with_max_tokens(4)
        lm({FEW_SHOT!r})
        [x for x in lm.stream({FEW_SHOT!r})]
        before = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert tracing.ON is False

        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        tp = TracerProvider()
        tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint={receiver.url + "/v1/traces"!r},
                                                                  headers={{"x-mlflow-experiment-id": "0"}})))
        trace.set_tracer_provider(tp)
        tracer = trace.get_tracer("app")
        tracing.configure(enabled=False)
        with tracer.start_as_current_span("app off") as off:
            lm({FEW_SHOT!r})
        found = tracing.configure()
        with tracer.start_as_current_span("app on") as on:
            lm({FEW_SHOT!r})
        tp.force_flush()
        print(json.dumps({{"before": before, "found": found, "off": off.get_span_context().trace_id,
                          "on": on.get_span_context().trace_id}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("OTEL_PYTHON_TRACER_PROVIDER", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["before"] == [] and out["found"] is True
    assert list(receiver.spans(out["off"], 1)) == ["app off"]  # the app's span arrived; dsrs made none
    on = receiver.spans(out["on"], 2)
    assert on["chat gemma"].parent == on["app on"].span_id

