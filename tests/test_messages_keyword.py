"""`messages=`: the keyword LiteLLM and dspy users write (`lm(messages=[...])`) is the prompt argument's
other spelling, for every way of calling an LM or a LaneMux; both at once, or neither, is a clear error."""

from __future__ import annotations

from typing import Any

import pytest

from dsrs import LM, ConfigurationError, LaneMux, StreamEnd
from scripted import Reply, chat_reply

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say ok."}]


def _sse() -> Reply:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}  # fmt: skip
    end = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}  # fmt: skip
    return Reply(sse=[chunk, end, "[DONE]"])


async def test_messages_keyword_sends_the_same_request_as_the_prompt_argument(scripted: Any) -> None:
    scripted.script(_sse(), chat_reply("ok"), chat_reply("ok"), chat_reply("ok"), _sse())
    lm = LM("openai/gpt-4o-mini").with_base_url(scripted.url + "/v1").with_api_key("sk-test")
    items = [x async for x in lm.astream(messages=MESSAGES)]
    assert isinstance(items[-1], StreamEnd) and items[-1].completion.text == "ok"
    assert (await lm.acall(messages=MESSAGES)).text == "ok"
    assert (await lm.acall(MESSAGES)).text == "ok"
    mux = LaneMux().add_lane("a", lm)
    assert (await mux.acall(messages=MESSAGES)).route.lane == "a"
    assert [x async for x in mux.astream(messages=MESSAGES)][-1].completion.text == "ok"  # type: ignore[union-attr]
    sent = [r.json["messages"] for r in scripted.requests]
    assert sent == [MESSAGES] * 5


def test_messages_keyword_in_sync_calls(scripted: Any) -> None:
    scripted.script(default=chat_reply("ok"))
    lm = LM("openai/gpt-4o-mini").with_base_url(scripted.url + "/v1").with_api_key("sk-test")
    assert lm(messages=MESSAGES, max_tokens=3).text == "ok"
    assert scripted.requests[-1].json["messages"] == MESSAGES


def test_both_or_neither_is_a_clear_error(scripted: Any) -> None:
    scripted.script(default=chat_reply("ok"))
    lm = LM("openai/gpt-4o-mini").with_base_url(scripted.url + "/v1").with_api_key("sk-test")
    with pytest.raises(ConfigurationError, match="not both"):
        lm("hi", messages=MESSAGES)
    with pytest.raises(ConfigurationError, match="not both"):
        LaneMux().add_lane("a", lm).acall("hi", messages=MESSAGES)
    with pytest.raises(ConfigurationError, match="no prompt"):
        lm()
    with pytest.raises(ConfigurationError, match="no prompt"):
        LaneMux().add_lane("a", lm)()
    assert scripted.requests == []  # nothing was sent
