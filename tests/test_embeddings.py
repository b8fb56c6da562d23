"""Embeddings: `dsrs.Embedder` against local servers speaking each provider's documented wire format
(the exact requests asserted, and compared with what the official `openai` and `ollama` clients send),
against llama.cpp itself (in process, and its HTTP server started with embeddings on), and
`POST /v1/embeddings` on the gateway with the official openai SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

import dsrs
from conftest import free_port
from dsrs import Budget, BudgetExceededError, ConfigurationError, Embedder, UnsupportedFeatureError
from dsrs.cache import Cache, MemoryLRU, SqliteStore
from dsrs.errors import RateLimitError, ResponseFormatError
from gateway_fixture import CLIENT_KEY, OTHER_KEY, InProcessGateway
from scripted import Reply

KEY = "sk-embed-secret-0123456789"
SENTENCES = ["The cat sat on the mat.", "A cat was sitting on the rug.", "Quarterly revenue grew 5 percent."]


def openai_reply(vectors: list[list[float]], prompt_tokens: int = 7, order: list[int] | None = None,
                 model: str = "text-embedding-3-small") -> Reply:  # fmt: skip
    """An OpenAI /v1/embeddings answer as the API reference shows it (data possibly out of order)."""
    idx = order if order is not None else list(range(len(vectors)))
    return Reply(json={"object": "list", "model": model,
                       "data": [{"object": "embedding", "index": i, "embedding": vectors[i]} for i in idx],
                       "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})  # fmt: skip


def f32(v: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()


def oa(scripted: Any, model: str = "openai/text-embedding-3-small", **opts: Any) -> Embedder:
    return Embedder(model, base_url=scripted.url + "/v1", api_key=KEY, retries=0, ledger=False, **opts)


# -- OpenAI and the compatible services ---------------------------------------------------------
def test_openai_request_answer_and_cost(scripted: Any) -> None:
    scripted.script(openai_reply([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], prompt_tokens=1000, order=[1, 0]))
    r = oa(scripted).with_dimensions(3).embed(["hello", "world"])
    (seen,) = scripted.requests
    assert (seen.method, seen.path) == ("POST", "/v1/embeddings")
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.json == {"model": "text-embedding-3-small", "input": ["hello", "world"], "encoding_format": "float",
                         "dimensions": 3}  # fmt: skip
    assert r.vectors == [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]  # back in input order by `index`
    assert (r.provider, r.model, len(r)) == ("openai", "text-embedding-3-small", 2)
    u = r.usage
    assert (u.prompt_tokens, u.total_tokens, u.completion_tokens, u.calls) == (1000, 1000, 0, 1)
    assert u.cost_msats == 20 and u.cost_source == dsrs.CostSource.PRICE_TABLE  # 1000 x $0.02/M x 1e6 msats/$
    assert not u.cache_hit


def test_we_send_what_the_official_openai_sdk_sends(scripted: Any) -> None:
    scripted.script(openai_reply([[1.0, 2.0]]), openai_reply([[1.0, 2.0]]))
    openai.OpenAI(base_url=scripted.url + "/v1", api_key=KEY, max_retries=0).embeddings.create(
        model="text-embedding-3-large", input=["a text"], dimensions=2, encoding_format="float")
    oa(scripted, "openai/text-embedding-3-large").with_dimensions(2).embed("a text")
    sdk, ours = scripted.requests
    assert (ours.path, ours.json) == (sdk.path, sdk.json)
    assert ours.headers["authorization"] == sdk.headers["authorization"]


def test_base64_answers_are_decoded_as_float32(scripted: Any) -> None:
    v = [0.1, -2.5, 3.25]
    scripted.script(Reply(json={"object": "list", "model": "m", "data": [{"object": "embedding", "index": 0,
                                                                       "embedding": f32(v)}],
                                "usage": {"prompt_tokens": 2, "total_tokens": 2}}))  # fmt: skip
    r = oa(scripted).with_encoding_format("base64").embed("x")
    assert scripted.requests[0].json["encoding_format"] == "base64"
    assert r.vectors == [list(struct.unpack("<3f", struct.pack("<3f", *v)))]


def test_batches_follow_the_provider_limit_and_usage_adds_up(scripted: Any) -> None:
    texts = [f"t{i}" for i in range(2049)]
    scripted.script(openai_reply([[float(i)] for i in range(2048)], 2048), openai_reply([[2048.0]], 1))
    r = oa(scripted).embed(texts)
    assert [len(s.json["input"]) for s in scripted.requests] == [2048, 1]  # OpenAI: 2,048 inputs per request
    assert scripted.requests[1].json["input"] == ["t2048"]
    assert [v[0] for v in r.vectors] == [float(i) for i in range(2049)]
    assert (r.usage.prompt_tokens, r.usage.calls) == (2049, 2)
    assert r.usage.cost_msats == 41 + 1  # 2048 x $0.02/M = 40.96, and 0.02: each request rounds up to a whole msat

    scripted.script(*(openai_reply([[1.0]] * n) for n in (2, 2, 1)))
    assert len(oa(scripted).with_batch_size(2).embed(["a", "b", "c", "d", "e"])) == 5
    assert [s.json["input"] for s in scripted.requests] == [["a", "b"], ["c", "d"], ["e"]]

    big = "x" * 200_000  # 300k tokens per request, bounded by bytes: two of these cannot share one
    scripted.script(openai_reply([[1.0]]), openai_reply([[2.0]]))
    assert oa(scripted).embed([big, big]).vectors == [[1.0], [2.0]]
    assert [len(s.json["input"]) for s in scripted.requests] == [1, 1]


def test_azure_deployment_path(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    scripted.script(openai_reply([[1.0]]))
    Embedder("azure/my-embed", base_url=scripted.url, ledger=False).embed("x")
    (seen,) = scripted.requests
    assert (seen.path, seen.query) == ("/openai/deployments/my-embed/embeddings", {"api-version": "2024-10-21"})
    assert seen.headers["api-key"] == KEY


# -- Gemini and Ollama --------------------------------------------------------------------------
def test_gemini_batch_embed_contents(scripted: Any) -> None:
    scripted.script(Reply(json={"embeddings": [{"values": [0.5, 0.25]}, {"values": [0.125, 1.0]}],
                                "usageMetadata": {"promptTokenCount": 1000}}))  # fmt: skip
    e = Embedder("gemini/gemini-embedding-001", base_url=scripted.url, api_key=KEY, ledger=False)
    r = e.with_dimensions(2).with_task_type("RETRIEVAL_DOCUMENT").embed(["one", "two"])
    (seen,) = scripted.requests
    assert seen.path == "/models/gemini-embedding-001:batchEmbedContents"
    assert seen.headers["x-goog-api-key"] == KEY and "authorization" not in seen.headers
    one = {"model": "models/gemini-embedding-001", "taskType": "RETRIEVAL_DOCUMENT", "outputDimensionality": 2}
    assert seen.json == {"requests": [{**one, "content": {"parts": [{"text": "one"}]}},
                                      {**one, "content": {"parts": [{"text": "two"}]}}]}  # fmt: skip
    assert r.vectors == [[0.5, 0.25], [0.125, 1.0]]
    assert (r.usage.prompt_tokens, r.usage.cost_msats) == (1000, 150)  # $0.15/M


def test_gemini_batches_of_100_and_unknown_usage_keeps_the_worst_case(scripted: Any) -> None:
    scripted.script(Reply(json={"embeddings": [{"values": [1.0]}] * 100}), Reply(json={"embeddings": [{"values": [1.0]}]}))
    b = Budget(1_000_000)
    r = Embedder("gemini/gemini-embedding-001", base_url=scripted.url, api_key=KEY, ledger=False,
                 budget=b).embed(["abcd"] * 101)  # fmt: skip
    assert [len(s.json["requests"]) for s in scripted.requests] == [100, 1]
    assert r.usage.cost_msats is None and r.usage.estimated  # no usageMetadata: the cost is unknown...
    worst = math.ceil((100 * (4 + 8)) * 0.15) + math.ceil((4 + 8) * 0.15)  # ...so the budget keeps each worst case
    assert (b.spent_msats, b.reserved_msats) == (worst, 0)


def test_ollama_api_embed_as_the_official_client_sends_it(scripted: Any) -> None:
    import ollama

    answer = {"model": "all-minilm", "embeddings": [[0.1, 0.2], [0.3, 0.4]], "total_duration": 1,
              "load_duration": 1, "prompt_eval_count": 9}  # fmt: skip
    scripted.script(Reply(json=answer), Reply(json=answer))
    ollama.Client(host=scripted.url).embed(model="all-minilm", input=["a", "b"], dimensions=2)
    r = Embedder("ollama/all-minilm", base_url=scripted.url, ledger=False).with_dimensions(2).embed(["a", "b"])
    official, ours = scripted.requests
    assert (ours.path, ours.json) == (official.path, official.json) == ("/api/embed", {
        "model": "all-minilm", "input": ["a", "b"], "dimensions": 2})  # fmt: skip
    assert r.vectors == [[0.1, 0.2], [0.3, 0.4]]
    assert (r.usage.prompt_tokens, r.usage.cost_msats, r.usage.cost_source) == (9, 0, dsrs.CostSource.FREE)


# -- cache, budgets, retries, errors ------------------------------------------------------------
def test_a_cache_hit_costs_nothing_and_the_key_holds_no_secret(scripted: Any, tmp_path: Any) -> None:
    path = tmp_path / "c.sqlite3"
    cache = Cache(store=SqliteStore(path))
    scripted.script(openai_reply([[0.5, 0.5]], 10), openai_reply([[0.5]], 10))
    e = oa(scripted).with_cache(cache)
    first = e.embed(["same text"])
    again = e.embed(["same text"])
    assert len(scripted.requests) == 1
    assert again.vectors == first.vectors
    assert (again.usage.cost_msats, again.usage.cost_source, again.usage.cache_hit) == (0, dsrs.CostSource.CACHE, True)
    assert first.usage.cost_msats == 1 and not first.usage.cache_hit
    fresh = Cache(store=SqliteStore(path), memory=MemoryLRU())  # from disk, in a new process's memory
    assert oa(scripted).with_cache(fresh).embed(["same text"]).vectors == first.vectors
    assert len(scripted.requests) == 1
    e.with_dimensions(1).embed(["same text"])  # a different request is a miss
    assert len(scripted.requests) == 2
    cache.store.flush()  # type: ignore[attr-defined]
    assert KEY.encode() not in path.read_bytes()

    big = [[0.123456789] * 100_000]  # over 1 MiB of JSON: on disk only, not in the memory LRU
    scripted.script(openai_reply(big, 5))
    assert e.embed("big").vectors == big and e.embed("big").usage.cache_hit
    assert cache.memory.get(e.cache_key(e.request("big"))) is None and len(scripted.requests) == 1


def test_budgets_refuse_settle_and_keep_what_may_have_been_billed(scripted: Any) -> None:
    text = "x" * 100  # worst case 108 tokens x $0.13/M = 14.04 -> 15 msats
    with pytest.raises(BudgetExceededError):
        oa(scripted, "openai/text-embedding-3-large").with_budget(Budget(14)).embed(text)
    assert scripted.requests == []  # refused before anything was sent

    b = Budget(15)
    scripted.script(openai_reply([[1.0]], 30))
    r = oa(scripted, "openai/text-embedding-3-large").with_budget(b).embed(text)
    assert (b.spent_msats, b.reserved_msats, r.usage.cost_msats) == (4, 0, 4)  # settled to 30 x $0.13/M

    with pytest.raises(BudgetExceededError) as exc:  # no price known: a hard budget cannot bound it
        oa(scripted, "openai/my-own-embedder").with_budget(Budget(10**9)).embed("x")
    assert exc.value.code == "unpriced"

    b = Budget(1000)
    scripted.script(Reply(status=500, json={"error": {"message": "boom", "type": "server_error"}}))
    with pytest.raises(dsrs.ProviderUnavailableError):
        oa(scripted).with_budget(b).embed(text)
    assert (b.spent_msats, b.reserved_msats) == (0, 0)  # an HTTP error answer is not billed: released

    scripted.script(Reply(json={"data": "nonsense"}))
    with pytest.raises(ResponseFormatError):
        oa(scripted).with_budget(b).embed(text)
    assert (b.spent_msats, b.reserved_msats) == (3, 0)  # a 200 we could not read may be billed: worst case kept


def test_a_failed_batch_keeps_the_paid_ones_on_the_books(scripted: Any) -> None:
    from dsrs import ledger

    b = Budget(1000)
    scripted.script(openai_reply([[1.0]], 500, model="text-embedding-3-large"), Reply(status=400, json={"error": {"message": "too long",
                                                                              "type": "invalid_request_error"}}))  # fmt: skip
    e = Embedder("openai/text-embedding-3-large", base_url=scripted.url + "/v1", api_key=KEY, retries=0, budget=b)
    with pytest.raises(dsrs.BadRequestError) as exc:
        e.with_batch_size(1).embed(["paid", "refused"])
    assert len(scripted.requests) == 2
    assert (exc.value.usage.prompt_tokens, exc.value.usage.cost_msats) == (500, 65)  # type: ignore[attr-defined]
    assert (b.spent_msats, b.reserved_msats) == (65, 0)  # the first request is paid; the 400 released its own
    row = [r for r in ledger.default_ledger().rows() if r.model == "text-embedding-3-large"][-1]
    assert (row.program, row.prompt_tokens, row.cost_msats) == ("embed", 500, 65)


def test_retries_follow_retry_after(scripted: Any, fake_retry: Any, sleeps: list[float]) -> None:
    scripted.script(Reply(status=429, headers={"retry-after": "3"}, json={"error": {"type": "rate_limit"}}),
                    openai_reply([[1.0]]))  # fmt: skip
    r = Embedder("openai/text-embedding-3-small", base_url=scripted.url + "/v1", api_key=KEY, ledger=False,
                 retry_policy=fake_retry).embed("x")  # fmt: skip
    assert len(scripted.requests) == 2 and sleeps == [3.0] and r.vectors == [[1.0]]
    scripted.script(Reply(status=429, json={"error": {"type": "rate_limit"}}))
    with pytest.raises(RateLimitError):
        oa(scripted).embed("x")


@pytest.mark.parametrize("bad", [[], [1, "a"], ["ok", ""], None, b"bytes", [None], {"a": 1}, iter([])])
def test_bad_input_is_a_configuration_error_and_sends_nothing(scripted: Any, bad: Any) -> None:
    with pytest.raises(ConfigurationError) as exc:
        oa(scripted).embed(bad)
    assert exc.value.hint and scripted.requests == []


def test_bad_options_and_providers_without_embeddings(scripted: Any) -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'dimensions'"):
        Embedder("openai/text-embedding-3-small", dimension=3)
    with pytest.raises(ConfigurationError, match="dimensions must be"):
        Embedder("openai/text-embedding-3-small").with_dimensions(0)
    with pytest.raises(ConfigurationError, match="encoding_format"):
        Embedder("openai/text-embedding-3-small").with_encoding_format("int8")
    with pytest.raises(UnsupportedFeatureError, match="no embeddings API"):
        Embedder("anthropic/claude-haiku-4-5", api_key=KEY).embed("x")
    with pytest.raises(UnsupportedFeatureError):
        oa(scripted).with_task_type("RETRIEVAL_QUERY").embed("x")  # a Gemini option: refused, not dropped
    with pytest.raises(dsrs.MissingApiKeyError, match="OPENAI_API_KEY"):
        Embedder("openai/text-embedding-3-small", ledger=False).embed("x")
    assert scripted.requests == []
    assert "sk-" not in repr(oa(scripted)) and "sk-" not in str(oa(scripted).options)


@pytest.mark.parametrize("answer", [
    {"data": [{"index": 0, "embedding": [1.0]}], "usage": {"prompt_tokens": 1}},  # one vector for two inputs
    {"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": ["x"]}]},  # not numbers
    {"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]},  # lengths differ
    {"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]},  # an index twice
    {"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0]}], "usage": {"prompt_tokens": -1}},
    {"data": [{"index": 0, "embedding": "!!"}, {"index": 1, "embedding": [1.0]}]},  # not base64
])  # fmt: skip
def test_malformed_answers_are_response_format_errors(scripted: Any, answer: Any) -> None:
    scripted.script(Reply(json=answer))
    with pytest.raises(ResponseFormatError):
        oa(scripted).embed(["a", "b"])


def test_ignored_dimensions_and_errors_without_secrets(scripted: Any) -> None:
    scripted.script(openai_reply([[1.0, 2.0, 3.0]]))
    with pytest.raises(ResponseFormatError, match="asked for 2 dimensions, got 3"):
        oa(scripted).with_dimensions(2).embed("x")
    scripted.script(Reply(status=401, json={"error": {"message": f"bad key {KEY}", "type": "invalid_request_error"}}))
    with pytest.raises(dsrs.AuthenticationError) as exc:
        oa(scripted).embed("x")
    assert KEY not in str(exc.value) and KEY not in repr(exc.value)


def test_sync_embed_inside_a_running_loop_and_the_ledger(scripted: Any) -> None:
    from dsrs import ledger

    scripted.script(openai_reply([[1.0]], 3), openai_reply([[2.0]], 3))

    async def main() -> tuple[Any, Any]:
        e = Embedder("openai/text-embedding-3-small", base_url=scripted.url + "/v1", api_key=KEY)
        return e.embed("sync inside a loop"), await e.aembed("async")

    s, a = asyncio.run(main())
    assert (s.vectors, a.vectors) == ([[1.0]], [[2.0]])
    rows = [r for r in ledger.default_ledger().rows() if r.program == "embed" and r.model == "text-embedding-3-small"]
    assert [(r.provider, r.prompt_tokens, r.cost_msats) for r in rows[-2:]] == [("openai", 3, 1)] * 2


# -- llama.cpp: the embedded engine, and its HTTP server ----------------------------------------
def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_the_embedded_engine_embeds() -> None:
    r = Embedder("embedded/gemma-3-270m", ledger=False).embed(SENTENCES)
    assert len(r) == 3 and {len(v) for v in r} == {640}  # Gemma 3 270M's hidden size, mean-pooled
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in r)  # llama.cpp normalizes (L2)
    assert _cos(r[0], r[1]) > _cos(r[0], r[2])  # the two cat sentences are closer than cat and revenue
    assert r.usage.prompt_tokens > 3 and (r.usage.cost_msats, r.usage.cost_source) == (0, dsrs.CostSource.FREE)
    with pytest.raises(UnsupportedFeatureError):
        Embedder("embedded/gemma-3-270m").with_dimensions(64).embed("x")
    with pytest.raises(dsrs.DsrsError, match="split longer texts") as exc:  # over the engine's 2,048-token batch
        Embedder("embedded/gemma-3-270m", ledger=False).embed("word " * 2100)
    assert exc.value.attempts == 1  # type: ignore[attr-defined]  # deterministic: not retried


@pytest.fixture(scope="module")
def llama_embed_server() -> Iterator[str]:
    """llama.cpp's own server (xllamacpp) with Gemma 3 270M, started with embeddings on (mean pooling)."""
    import xllamacpp

    from dsrs.providers import embedded

    port = free_port()
    p = embedded.params(embedded.model_path("gemma-3-270m"), n_ctx=2048, port=port, threads=1)
    p.embedding = True
    p.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    p.n_batch = p.n_ubatch = 2048
    srv = xllamacpp.Server(p)
    url = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(url + "/health", timeout=60) as r:
        assert json.loads(r.read())["status"] == "ok"
    yield url
    del srv


def _direct(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url + "/v1/embeddings", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_the_llamacpp_server_through_the_openai_wire(llama_embed_server: str) -> None:
    direct = _direct(llama_embed_server, {"input": SENTENCES[:2], "model": "gemma"})
    e = Embedder("llamacpp/gemma", base_url=llama_embed_server + "/v1", ledger=False)
    r = e.embed(SENTENCES[:2])
    assert r.vectors == [d["embedding"] for d in direct["data"]]
    assert r.usage.prompt_tokens == direct["usage"]["prompt_tokens"] and r.usage.cost_msats == 0
    b = e.with_encoding_format("base64").embed(SENTENCES[:2])  # llama.cpp answers float32 in base64
    assert max(abs(x - y) for u, v in zip(b.vectors, r.vectors) for x, y in zip(u, v)) < 1e-6


# -- the gateway ----------------------------------------------------------------------------------
@pytest.fixture
def gateway(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessGateway]:
    monkeypatch.setenv("UPSTREAM_KEY", KEY)
    gw = InProcessGateway({
        "cache": {"enabled": False},
        "lanes": {"emb": {"lm": "openai/text-embedding-3-small", "base_url": scripted.url + "/v1",
                          "api_key_env": "UPSTREAM_KEY", "options": {"retries": 0}},
                  "other": {"lm": "openai/text-embedding-3-large", "base_url": scripted.url + "/v1",
                            "api_key_env": "UPSTREAM_KEY", "options": {"retries": 0}}},
        "models": {"both": {"lanes": ["emb", "other"]}},
        "budgets": {"tiny": {"limit_msats": 1}},
        "keys": {"alice": {"key_env": "CLIENT_KEY"}, "bob": {"key_env": "OTHER_KEY", "budget": "tiny"}},
    })  # fmt: skip
    yield gw
    gw.close()


def test_the_openai_sdk_embeds_through_the_gateway(gateway: InProcessGateway, scripted: Any) -> None:
    v = [[0.25, -0.5, 0.125], [1.0, 2.0, 4.0]]
    scripted.script(openai_reply(v, 1000), openai_reply(v[:1], 1000))
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    r = client.embeddings.create(model="emb", input=["one", "two"])  # the SDK asks for base64 by default
    assert [d.embedding for d in r.data] == v and [d.index for d in r.data] == [0, 1]
    assert (r.object, r.model, r.usage.prompt_tokens, r.usage.total_tokens) == ("list", "emb", 1000, 1000)
    assert scripted.requests[0].json == {"model": "text-embedding-3-small", "input": ["one", "two"],
                                         "encoding_format": "float"}  # fmt: skip
    assert scripted.requests[0].headers["authorization"] == f"Bearer {KEY}"  # the lane's key, not the client's
    f = client.embeddings.create(model="emb", input="one", encoding_format="float", dimensions=3)
    assert scripted.requests[1].json["dimensions"] == 3 and f.data[0].embedding == v[0]
    rows = [row for row in gateway.runtime.ledger.rows() if row.lane == "emb"]
    assert [(row.program, row.prompt_tokens, row.cost_msats) for row in rows[-2:]] == [("key:alice", 1000, 20)] * 2
    metrics = urllib.request.urlopen(urllib.request.Request(
        gateway.url + "/metrics", headers={"Authorization": "Bearer sk-admin-test-5555555555"})).read().decode()
    assert 'dsrs_gateway_requests_total{endpoint="/v1/embeddings",status="200"} 2' in metrics
    assert 'dsrs_lane_msats_total{lane="emb"} 40' in metrics


def test_gateway_refusals(gateway: InProcessGateway, scripted: Any) -> None:
    alice = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-wrong", max_retries=0).embeddings.create(
            model="emb", input="x")
    with pytest.raises(openai.RateLimitError) as rl:  # bob's budget (1 msat) cannot cover the worst case
        openai.OpenAI(base_url=gateway.url + "/v1", api_key=OTHER_KEY, max_retries=0).embeddings.create(
            model="emb", input="x" * 100)
    assert rl.value.code == "budget_exceeded"
    with pytest.raises(openai.BadRequestError) as e1:
        alice.embeddings.create(model="both", input="x")
    assert e1.value.code == "model_not_embeddable"
    with pytest.raises(openai.BadRequestError) as e2:
        alice.embeddings.create(model="emb", input=[[1, 2, 3]])
    assert e2.value.code == "unsupported_input"
    for bad in ([], [""], 5):
        with pytest.raises(openai.BadRequestError):
            alice.embeddings.create(model="emb", input=bad)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        alice.embeddings.create(model="nope", input="x")
    assert scripted.requests == []  # nothing reached the upstream


def test_gateway_upstream_failures_are_booked_as_the_budgets_booked_them(gateway: InProcessGateway,
                                                                        scripted: Any) -> None:  # fmt: skip
    alice = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    scripted.script(Reply(status=500, json={"error": {"message": "down", "type": "server_error"}}),
                    Reply(json={"data": "not embeddings"}))  # fmt: skip
    with pytest.raises(openai.InternalServerError) as e1:  # an HTTP error answer: nothing billed, nothing booked
        alice.embeddings.create(model="emb", input="x" * 100)
    assert e1.value.status_code == 502
    with pytest.raises(openai.InternalServerError):  # a 200 we could not read: its worst case stays booked
        alice.embeddings.create(model="emb", input="x" * 100)
    rows = [row for row in gateway.runtime.ledger.rows() if row.lane == "emb" and row.program == "key:alice"]
    assert [(row.cost_msats, row.cost_source) for row in rows[-1:]] == [(3, "estimate")]  # 108 tokens x $0.02/M
    metrics = urllib.request.urlopen(urllib.request.Request(
        gateway.url + "/metrics", headers={"Authorization": "Bearer sk-admin-test-5555555555"})).read().decode()
    assert 'dsrs_lane_unsettled_total{lane="emb",reason="error"} 1' in metrics


def test_gateway_over_the_llamacpp_embedding_server(llama_embed_server: str) -> None:
    gw = InProcessGateway({"gateway": {"require_keys": False}, "cache": {"enabled": True},
                           "lanes": {"local": {"lm": "llamacpp/gemma", "base_url": llama_embed_server + "/v1"}}})  # fmt: skip
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        r = client.embeddings.create(model="local", input=SENTENCES[:1])
        direct = _direct(llama_embed_server, {"input": SENTENCES[:1]})
        got, want = r.data[0].embedding, direct["data"][0]["embedding"]
        assert len(got) == 640 and max(abs(x - y) for x, y in zip(got, want)) < 1e-6  # float32 on the wire
        again = client.embeddings.create(model="local", input=SENTENCES[:1])  # the gateway's cache answers
        assert again.data[0].embedding == got
        rows = [row for row in gw.runtime.ledger.rows() if row.lane == "local" and row.model == "gemma"]
        assert [(row.cache_hit, row.cost_msats) for row in rows[-2:]] == [(False, 0), (True, 0)]
    finally:
        gw.close()


def test_what_a_type_checker_sees(tmp_path: Any) -> None:
    """`mypy --strict` sees the real types (the lazy `dsrs.Embedder` included), as for LM (tests/test_typing.py)."""
    import subprocess
    import sys
    from pathlib import Path

    probes = {
        'dsrs.Embedder("openai/text-embedding-3-small").with_dimensions(8).with_cache(True)': "dsrs.embed.Embedder",
        'Embedder("openai/text-embedding-3-small").embed(["a", "b"])': "dsrs.embed.Embeddings",
        'Embedder("openai/text-embedding-3-small").embed("a").vectors': "list[list[float]]",
        'Embedder("openai/text-embedding-3-small").embed("a").usage.cost_msats': "int | None",
    }
    src = "import dsrs\nfrom dsrs import Embedder\n" + "".join(f"reveal_type({x})\n" for x in probes)
    (tmp_path / "probe.py").write_text(src)
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(tmp_path / "probe.py")],
                       cwd=root, capture_output=True, text=True, timeout=300)  # fmt: skip
    revealed = [line.split('Revealed type is "', 1)[1].rstrip('"') for line in r.stdout.splitlines()
                if "Revealed type is" in line]  # fmt: skip
    assert revealed == list(probes.values()), r.stdout
