"""The Codex CLI's typed items (`codex exec --json` `item.*` events) and `CodexTurn`, a call's raw record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class AgentMessage:
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class Reasoning:
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class CommandExecution:
    id: str
    command: str
    output: str
    exit_code: int | None
    status: str  # in_progress | completed | failed | declined


@dataclass(frozen=True, slots=True)
class FileUpdate:
    path: str
    kind: str  # add | delete | update


@dataclass(frozen=True, slots=True)
class FileChange:
    id: str
    changes: tuple[FileUpdate, ...]
    status: str  # in_progress | completed | failed


@dataclass(frozen=True, slots=True)
class McpToolCall:
    id: str
    server: str
    tool: str
    arguments: Any
    result: Any
    error: str | None
    status: str


@dataclass(frozen=True, slots=True)
class WebSearch:
    id: str
    query: str
    action: Any


@dataclass(frozen=True, slots=True)
class TodoItem:
    text: str
    completed: bool


@dataclass(frozen=True, slots=True)
class TodoList:
    id: str
    items: tuple[TodoItem, ...]


@dataclass(frozen=True, slots=True)
class ErrorItem:
    """A non-fatal error the CLI reported inside the turn."""

    id: str
    message: str


@dataclass(frozen=True, slots=True)
class OtherItem:
    """An item type this version of dsrs does not know; its JSON as the CLI sent it."""

    id: str
    type: str
    data: dict[str, Any]


Item = (AgentMessage | Reasoning | Plan | CommandExecution | FileChange | McpToolCall | WebSearch | TodoList
        | ErrorItem | OtherItem)  # fmt: skip


def parse_item(d: dict[str, Any]) -> Item:
    """The typed form of one `item` of an `item.*` event."""
    i, t = str(d.get("id", "")), d.get("type", "")
    if t == "agent_message":
        return AgentMessage(i, d.get("text", ""))
    if t == "reasoning":
        return Reasoning(i, d.get("text", ""))
    if t == "plan":
        return Plan(i, d.get("text", ""))
    if t == "command_execution":
        return CommandExecution(i, d.get("command", ""), d.get("aggregated_output", ""), d.get("exit_code"),
                                d.get("status", ""))  # fmt: skip
    if t == "file_change":
        changes = tuple(FileUpdate(c.get("path", ""), c.get("kind", "")) for c in d.get("changes") or ())
        return FileChange(i, changes, d.get("status", ""))
    if t == "mcp_tool_call":
        err = d.get("error")
        return McpToolCall(i, d.get("server", ""), d.get("tool", ""), d.get("arguments"), d.get("result"),
                           err.get("message") if isinstance(err, dict) else err, d.get("status", ""))  # fmt: skip
    if t == "web_search":
        return WebSearch(i, d.get("query", ""), d.get("action"))
    if t == "todo_list":
        return TodoList(i, tuple(TodoItem(x.get("text", ""), bool(x.get("completed"))) for x in d.get("items") or ()))
    if t == "error":
        return ErrorItem(i, d.get("message", ""))
    return OtherItem(i, t, d)


@dataclass(slots=True)
class CodexTurn:
    """`completion.raw` of a Codex call: the thread, the items, the running total, every event."""

    thread_id: str
    items: tuple[Item, ...]
    thread_usage: dict[str, int]  # the CLI's running total for the thread after this turn
    events: list[dict[str, Any]] = field(repr=False, default_factory=list)
