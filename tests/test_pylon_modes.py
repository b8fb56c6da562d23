"""PylonLM local (real llama.cpp server, embedded engine), hybrid fallback, and configuration."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_asyncio

from conftest import FEW_SHOT, free_port
from dsrs.errors import ConfigurationError, TimeoutError
from dsrs.pylon import PylonLM
from dsrs.pylon import swarm
from dsrs.pylon.swarm import DEFAULT_RELAY
from dsrs.types import CostSource, StreamEnd
from nwc_service import FakeProvider, Net, honest, start_net, stop_net
from scripted import Reply


@pytest_asyncio.fixture(loop_scope="function")
async def net():
    n = await start_net()
    yield n
    await stop_net(n)


def hybrid(net: Net, local_url: str, timeout: float = 30.0) -> PylonLM:
    return (PylonLM.new_hybrid(net.relay.url).with_backend("llama.cpp").with_base_url(local_url)
            .with_local_timeout(timeout).with_swarm_fallback(True).with_wallet(net.wallet)
            .with_budget_msats(10_000).with_bid_msats(2000).with_timeout(10).with_max_tokens(4)
            .with_temperature(0))  # fmt: skip


async def test_local_llamacpp_against_the_real_server(llama_server: Any) -> None:
    lm = PylonLM.new_local().with_backend("llama.cpp").with_base_url(llama_server.url + "/v1")
    out = await lm.with_max_tokens(4).with_temperature(0).acall(FEW_SHOT)
    assert "Paris" in out.text
    assert (out.usage.cost_msats, out.usage.cost_source) == (0, CostSource.FREE)
    assert out.provider == "llamacpp" and out.usage.completion_tokens > 0 and not out.usage.estimated


async def test_local_embedded_default_complete_and_stream() -> None:
    lm = PylonLM.new_local().with_max_tokens(4).with_temperature(0)
    assert lm.model == "gemma-3-270m"
    out = await lm.acall(FEW_SHOT)
    assert "Paris" in out.text and out.usage.cost_msats == 0
    items = [x async for x in lm.astream(FEW_SHOT)]
    assert isinstance(items[-1], StreamEnd) and "".join(x for x in items[:-1]) == items[-1].completion.text


async def test_hybrid_local_answers_without_swarm_traffic(net: Net, llama_server: Any) -> None:
    out = await hybrid(net, llama_server.url + "/v1").acall(FEW_SHOT)
    assert "Paris" in out.text and out.usage.cost_msats == 0
    assert net.relay.published(5050) == [] and net.paid() == 0


async def test_hybrid_local_down_falls_back_to_the_swarm(net: Net) -> None:
    fp = await FakeProvider(net, honest).start()
    try:
        out = await hybrid(net, f"http://127.0.0.1:{free_port()}/v1").acall("What is 2+2?")
    finally:
        await fp.stop()
    assert out.text == "ok" and out.provider == "pylon"
    assert (out.usage.cost_msats, out.usage.cost_source) == (1000, CostSource.INVOICE)
    assert len(net.relay.published(5050)) == 1 and net.paid() == 1000


async def test_hybrid_local_stall_falls_back_to_the_swarm(net: Net, scripted: Any) -> None:
    scripted.script(Reply(json={"choices": []}, delay=3.0))
    fp = await FakeProvider(net, honest).start()
    try:
        lm = hybrid(net, scripted.url + "/v1", timeout=0.3)
        out = await lm.acall("What is 2+2?")
        items = [x async for x in lm.astream("and 3+3?")]
    finally:
        await fp.stop()
    assert out.text == "ok" and out.usage.cost_msats == 1000
    assert items[0] == "ok" and items[-1].usage.cost_msats == 1000
    assert len(scripted.requests) >= 1 and net.paid() == 2000


async def test_hybrid_without_swarm_fallback_times_out(net: Net, scripted: Any) -> None:
    scripted.script(Reply(json={"choices": []}, delay=3.0))
    lm = hybrid(net, scripted.url + "/v1", timeout=0.3).with_swarm_fallback(False)
    with pytest.raises(TimeoutError, match="local model did not answer within 0.3s"):
        await lm.acall("x")
    assert net.relay.published(5050) == []


async def test_hybrid_fallback_is_configurable(net: Net) -> None:
    from dsrs.errors import APIConnectionError, BadRequestError

    lm = hybrid(net, f"http://127.0.0.1:{free_port()}/v1").with_fallback_on(BadRequestError)
    with pytest.raises(APIConnectionError):  # only BadRequestError would fall back now
        await lm.acall("x")
    assert net.relay.published(5050) == []


def test_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYLON_RELAY_URL", raising=False)
    assert PylonLM.new_swarm().options["relays"] == (DEFAULT_RELAY,) == ("wss://nexus.openagents.com",)
    monkeypatch.setenv("PYLON_RELAY_URL", "wss://a.example, wss://b.example")
    assert PylonLM.new_swarm().options["relays"] == ("wss://a.example", "wss://b.example")
    assert PylonLM.new_swarm(["wss://c.example"]).options["relays"] == ("wss://c.example",)
    with pytest.raises(ConfigurationError):
        PylonLM.new_swarm("https://not-a-relay")
    with pytest.raises(ConfigurationError):
        PylonLM.new_local().with_backend("vllm-typo")
    with pytest.raises(ConfigurationError):
        PylonLM.new_swarm("wss://x").with_bid_msats(0)
    lm = PylonLM.new_local().with_backend("ollama").with_model("llama2")
    assert (lm.model, lm._local_lm().provider) == ("llama2", "ollama")
    assert PylonLM.new_local().with_backend("llama.cpp")._local_lm().provider == "llamacpp"
    w = "nostr+walletconnect://" + "ab" * 32 + "?relay=ws://127.0.0.1:1&secret=" + "11" * 32
    s = PylonLM.new_swarm("wss://x").with_wallet(w).with_budget_msats(10_000).with_timeout(30)
    assert "11" * 32 not in repr(s) and "11" * 32 not in repr(s.options["wallet"])
    cfg = s.swarm_config()  # the default bid fits the budget with its fee cap
    assert 8_000 < cfg.bid_msats and cfg.bid_msats + swarm.fee_cap(cfg, cfg.bid_msats) <= 10_000 and cfg.timeout == 30.0
    assert PylonLM.new_swarm("wss://x").swarm_config().bid_msats == 10_000  # no budget


def test_hybrid_worst_case_is_free_without_swarm_fallback() -> None:
    h = PylonLM.new_hybrid("wss://x").with_bid_msats(2000).with_fee_cap_msats(0)
    req = h.request("hi")
    assert h.worst_case_msats(req) == 2000  # may fall back to a paid swarm job
    assert h.with_swarm_fallback(False).worst_case_msats(req) == 0  # never pays


def test_sync_call_inside_and_outside_a_loop_on_local() -> None:
    out = PylonLM.new_local().with_max_tokens(4).with_temperature(0)(FEW_SHOT)
    assert "Paris" in out.text
