"""`dsrs ask`: one question, answered by a model or a lane (the embedded model by default, offline)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .show import _msats, _out

DEFAULT_MODEL = "embedded/gemma-3-270m"
# Few-shot examples for base models (Gemma 3 270M follows examples, not instructions).
ASK_DEMOS = (
    {"question": "What is the capital of Germany?", "answer": "Berlin"},
    {"question": "What color is the sky on a clear day?", "answer": "Blue"},
)

BASE_MAX_TOKENS = 64  # the embedded base model runs on past its answer without a cap


class _AnswerStream:
    """The text of one output field as the raw stream arrives: what follows the chat adapter's
    `[[ answer ]]` marker up to the next marker, or (completion adapter) the continuation itself.
    Trailing whitespace and a lone trailing `[` are held back until more text shows they belong
    to the answer, so what is printed is always a prefix of the final field."""

    def __init__(self, field: str, marked: bool) -> None:
        import re

        self.marker = re.compile(rf"\[\[[ \t]*{re.escape(field)}[ \t]*\]\]") if marked else None
        self.raw = ""
        self.shown = ""

    def visible(self) -> str:
        text = self.raw
        if self.marker is not None:
            m = self.marker.search(text)
            if m is None:
                return ""
            text = text[m.end() :]
        text = text.lstrip()
        end = text.find("[[") if self.marker is not None else text.find("\n")
        if end >= 0:
            text = text[:end]
        elif self.marker is not None and text.endswith("["):
            text = text[:-1]
        return text.rstrip()

    def feed(self, delta: str) -> str:
        """The new text to print after `delta`."""
        self.raw += delta
        now = self.visible()
        if not now.startswith(self.shown):
            return ""  # cannot happen with the hold-back rules; never print something to take back
        new, self.shown = now[len(self.shown) :], now
        return new


async def ask(args: argparse.Namespace) -> int:
    from ..errors import ConfigurationError
    from ..lm import LM
    from ..predict import Predict, values
    from ..predict.adapters import CompletionAdapter, resolve

    question = args.question.strip()
    if not question:
        raise ConfigurationError("the question is empty", hint='dsrs ask "What is the capital of France?"')
    if args.lane:
        from ..lanes import LaneMux

        lm: Any = await LaneMux.auto_detect()
        probe = lm.with_lane(args.lane)
    else:
        lm = LM(args.model or DEFAULT_MODEL)
        probe = lm
    adapter = resolve(None, probe)
    base = isinstance(adapter, CompletionAdapter)
    max_tokens = args.max_tokens if args.max_tokens is not None else BASE_MAX_TOKENS if base else None
    if max_tokens is not None:
        lm = lm.with_max_tokens(max_tokens)
    if base:  # a base model samples nonsense at its default temperature; greedy answers the question
        lm = lm.with_temperature(0.0)
    qa = Predict("question -> answer", demos=ASK_DEMOS if base else (), adapter=adapter)
    if args.stream:
        result = None
        field = _AnswerStream("answer", marked=not base)
        async for item in qa.astream(question=question, lm=lm, lane=args.lane):
            if isinstance(item, str):
                text = field.feed(item)
                if text:
                    _out(text, end="")
            else:
                result = item
        assert result is not None
        final = result.answer if isinstance(result.answer, str) else values.format(result.answer)
        if final.startswith(field.shown):
            _out(final[len(field.shown) :])
        else:  # the answer came from the JSON adapter's retry, not the stream
            _out()
            _out(final)
    else:
        result = await qa.aforward(question=question, lm=lm, lane=args.lane)
        _out(result.answer)
    assert result is not None and result.completion is not None
    u, c = result.lm_usage, result.completion
    cost = "unknown (no price for this model)" if u.cost_msats is None else _msats(u.cost_msats)
    lane = f" lane {result.lane}" if result.lane else ""
    print(
        f"[{c.provider}/{c.model}{lane}] tokens: {u.prompt_tokens} prompt + {u.completion_tokens} completion"
        f" = {u.total_tokens}; cost: {cost}" + (" (cache hit)" if u.cache_hit else ""),
        file=sys.stderr,  # stdout holds the answer only: `dsrs ask ... > answer.txt`
        flush=True,
    )
    return 0
