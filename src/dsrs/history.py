"""The last calls, in memory, for looking at what was sent: `dsrs.inspect_history(n)`, `lm.history`.

A bounded ring (`SIZE` calls, every LM together; `dsrs.history.resize(0)` turns it off) holding each
successful call's messages, answer, usage and route. Recording is one tuple appended to a deque per
call; the readable entries are built only when read. It lives in this process's memory only: it is
never written anywhere, and it holds prompts, so do not print it where prompts must not go.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .types import Completion, Message

SIZE = 200
_recent: deque[tuple[float, Any, tuple[Message, ...], Completion]] = deque(maxlen=SIZE)


@dataclass(frozen=True, slots=True)
class Entry:
    """One call: when, on which LM, what was sent, what came back (with its usage and, through a
    LaneMux, its route)."""

    time: float
    lm: Any
    messages: tuple[Message, ...]
    completion: Completion

    @property
    def usage(self) -> Any:
        return self.completion.usage

    @property
    def route(self) -> Any:
        return self.completion.route


def record(lm: Any, messages: tuple[Message, ...], c: Completion) -> None:
    _recent.append((time.time(), lm, messages, c))


def entries(n: int | None = None, lm: Any = None) -> list[Entry]:
    """The last `n` calls (all that are kept when None), oldest first; only `lm`'s when given."""
    got = [Entry(*x) for x in list(_recent) if lm is None or x[1] is lm]
    return got if n is None else got[-n:] if n > 0 else []


def resize(size: int) -> None:
    """Keep the last `size` calls (0: record nothing)."""
    global _recent
    _recent = deque(_recent, maxlen=max(0, int(size)))


def inspect_history(n: int = 1) -> list[Entry]:
    """Print the last `n` calls (messages, answer, usage, route) and return them."""
    got = entries(n)
    for e in got:
        c = e.completion
        print(f"[{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.time))}] {c.provider}/{c.model}")
        for m in e.messages:
            print(f"  {m.role}: {m.content}")
        print(f"  -> {c.text}" + (f"  (tool calls: {', '.join(t.name for t in c.tool_calls)})" if c.tool_calls else ""))
        u = c.usage
        print(f"  tokens {u.prompt_tokens} + {u.completion_tokens} = {u.total_tokens}; cost {u.cost_msats} msats"
              + (" (cache hit)" if u.cache_hit else "") + (f"; lane {c.route.lane}" if c.route is not None else ""))
    return got
