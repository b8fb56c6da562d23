"""CodexSdkLM: the Codex CLI, run headless (`codex exec --json`), as an LM.

One call = one `codex exec` process (N calls at once = N processes). The prompt goes in on
stdin, which is then closed (the CLI waits for EOF otherwise); JSONL events come out on stdout.
The reply is the turn's last agent message; everything the agent did (commands run, file
changes, reasoning, web searches, MCP tool calls, to-do lists, non-fatal errors) is on
`completion.items` as typed items, the thread id on `completion.id`, and `lm.session(id)`
continues that thread (`codex exec ... resume <id>`).

The model server is the CLI's own configuration (login or `CODEX_API_KEY`), or
`with_base_url(url)` (+ `with_api_key`) for any Responses-API server, or full control through
`with_config({...})` (each entry a `-c key=value` override) and `with_codex_home(dir)`.

Usage: the CLI reports the thread's running total; a turn's usage is that total minus the total
before the turn (read from the thread's rollout file in CODEX_HOME). Cost comes from the price
table for the model (`with_model`). A turn's cost has no bound known in advance (an agent makes
as many requests as it needs), so hard budgets refuse Codex calls unless they allow unpriced
calls; a failed or timed-out turn books what its rollout file says it used (`spent_msats`). Sampling options (temperature, max_tokens...) do not exist
in the CLI and are ignored. Retries are off by default (an agent turn has side effects) and so
is caching, as for every LM.

A timeout (default 300 s: room for an agent turn that runs commands, while a CLI whose model
server is down or unreachable, which it keeps retrying, gives its lane up within minutes, not ten)
stops the whole process group, SIGTERM then SIGKILL, and raises `dsrs.TimeoutError`; the group
is also cleared when a call is cancelled and after every exit, so no process the agent started
outlives the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import json
import os
import shutil
import signal
import tempfile
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from . import errors
from .codex_items import AgentMessage, CodexTurn, Item, parse_item
from .lm import BaseLM, Input
from .types import Completion, LmUsage, Request, StreamEnd

PROVIDER = "codex-sdk"
DEFAULT_TIMEOUT = 300.0  # seconds; why: the module docstring
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
SANDBOXES = ("read-only", "workspace-write", "danger-full-access")
INSTALL_HINT = "install the Codex CLI with `npm install -g @openai/codex`, or pass with_binary(path)"
_TEST_COPY = "~/.cache/dsrs-test/codex-*/node_modules/.bin/codex"  # where scripts/test installs it
KEY_ENV = "DSRS_CODEX_API_KEY"  # carries with_api_key to the CLI when with_base_url is set
_LINE_LIMIT = 64 * 1024 * 1024  # one JSONL event can carry a command's whole output


# -- errors ---------------------------------------------------------------------------------
class CodexError(errors.APIError):
    """The Codex CLI failed (bad flags, unknown thread, crash). Not retried: a turn has side effects."""


class CodexTurnFailedError(CodexError):
    """The CLI reported `turn.failed`; `message` is the CLI's own."""


class CodexNotFoundError(errors.ConfigurationError):
    """The Codex CLI is not installed (or not where `with_binary` says). Another lane may do."""

    fallback = True


# -- the LM ---------------------------------------------------------------------------------
class CodexSdkLM(BaseLM):
    """`CodexSdkLM().with_model("gpt-5-codex").with_timeout(60).with_working_dir("/repo")`.

    Without `with_timeout`, a call is stopped after 300 s (`DEFAULT_TIMEOUT`; why: the module docstring)."""

    provider = PROVIDER

    def __init__(self, model: str = "", **opts: Any) -> None:
        self.model = model
        opts.setdefault("retries", 0)
        super().__init__(**opts)

    def _extra_options(self) -> tuple[str, ...]:
        return ("working_dir", "sandbox", "codex_home", "env", "config", "binary", "thread_id", "item_stream")

    # builders
    def with_model(self, model: str) -> CodexSdkLM:
        new: CodexSdkLM = self._with()
        new.model = model
        return new

    def with_working_dir(self, path: str | os.PathLike[str]) -> CodexSdkLM:
        return self._with(working_dir=os.fspath(path))

    def with_sandbox(self, mode: str) -> CodexSdkLM:
        if mode not in SANDBOXES:
            raise errors.ConfigurationError(f"unknown sandbox mode {mode!r}", provider=PROVIDER,
                                            hint="use one of " + ", ".join(SANDBOXES))  # fmt: skip
        return self._with(sandbox=mode)

    def with_codex_home(self, path: str | os.PathLike[str]) -> CodexSdkLM:
        return self._with(codex_home=os.fspath(path))

    def with_env(self, env: dict[str, str]) -> CodexSdkLM:
        """Extra environment variables for the CLI (merged over this process's environment)."""
        return self._with(env={**(self._opts.get("env") or {}), **env})

    def with_config(self, config: dict[str, Any]) -> CodexSdkLM:
        """CLI config overrides, each passed as `-c key=value` (value written as TOML)."""
        return self._with(config={**(self._opts.get("config") or {}), **config})

    def with_binary(self, path: str | os.PathLike[str]) -> CodexSdkLM:
        return self._with(binary=os.fspath(path))

    def session(self, thread: str | Completion) -> CodexSdkLM:
        """This LM bound to an existing thread: every call resumes it (`codex exec ... resume <id>`)."""
        tid = thread.id if isinstance(thread, Completion) else thread
        if not isinstance(tid, str) or not tid:
            raise errors.ConfigurationError("session() needs a thread id", provider=PROVIDER,
                                            hint="pass completion.id of an earlier Codex call")  # fmt: skip
        return self._with(thread_id=tid)

    def available(self) -> bool:
        """Whether the CLI can be found (nothing is run)."""
        try:
            find_binary(self._opts.get("binary"))
        except CodexNotFoundError:
            return False
        return True

    @property
    def thread_id(self) -> str | None:
        return self._opts.get("thread_id")

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._opts.items() if k not in ("api_key", "env", "retry_policy")}
        if "env" in self._opts:
            shown["env"] = {k: "**********" for k in self._opts["env"]}
        return f"CodexSdkLM(model={self.model!r}" + "".join(f", {k}={v!r}" for k, v in shown.items()) + ")"

    def request(self, prompt: Input, **overrides: Any) -> Request:
        """Adds what changes a Codex answer besides the messages (thread, directory, sandbox, config)."""
        req = super().request(prompt, **overrides)
        o = self._opts
        where = {k: o[k] for k in ("thread_id", "working_dir", "sandbox", "config") if o.get(k)}
        return dataclasses.replace(req, extra={**req.extra, "codex": where}) if where else req

    def _cache(self) -> Any:
        """A turn in a session depends on the thread's history, which moves on: never cached."""
        return None if self._opts.get("thread_id") else super()._cache()

    def _make_backend(self) -> CodexExec:
        return CodexExec(self.model, self._opts)

    def worst_case_msats(self, req: Request) -> int | None:
        """None: a turn makes as many model requests as the agent needs, with prompts that grow with
        every command it runs, so no cost bound is known before it starts. A hard budget refuses a
        Codex call unless it allows unpriced calls (`Budget(..., allow_unpriced=True)`); the turn's
        actual cost is booked afterwards (a failed turn's too, from its rollout file)."""
        return None

    async def aitems(self, prompt: Input, **overrides: Any) -> AsyncIterator[Item | StreamEnd]:
        """The agent's items as the CLI reports them (a snapshot per `item.started/updated/completed`;
        one id can repeat with a newer status), then a `StreamEnd` with the completion."""
        async for x in self._with(item_stream=True).astream(prompt, **overrides):
            if not isinstance(x, str):
                yield x


# -- the backend ----------------------------------------------------------------------------
def find_binary(explicit: str | None) -> str:
    """The codex executable: `explicit`, else `codex` on PATH, else the copy scripts/test installs."""
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise CodexNotFoundError(f"the Codex CLI is not at {explicit!r}", provider=PROVIDER, hint=INSTALL_HINT)
    found = shutil.which("codex") or next(iter(sorted(glob.glob(os.path.expanduser(_TEST_COPY)), reverse=True)), None)
    if not found:
        raise CodexNotFoundError("the Codex CLI (`codex`) was not found", provider=PROVIDER, hint=INSTALL_HINT)
    return found


def toml_value(v: Any) -> str:
    """A Python value as a TOML value for `-c key=value`."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise errors.ConfigurationError(f"cannot pass {type(v).__name__} {v!r:.60} as a Codex config value",
                                    provider=PROVIDER, hint="use str, int, float, bool, list or dict")  # fmt: skip


_USAGE_KEYS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_output_tokens")


def thread_total(codex_home: str, thread_id: str) -> dict[str, int]:
    """The thread's running usage total so far, from its rollout file (zero when none is found)."""
    total: dict[str, int] = {}
    for path in glob.glob(os.path.join(glob.escape(codex_home), "sessions", "*", "*", "*",
                                       f"rollout-*-{glob.escape(thread_id)}.jsonl")):  # fmt: skip
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"token_count"' not in line:
                    continue
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    t = json.loads(line)["payload"]["info"]["total_token_usage"]
                    total = {k: int(t.get(k) or 0) for k in _USAGE_KEYS}
    return total


def turn_usage(total: dict[str, int], before: dict[str, int]) -> LmUsage:
    d = {k: max(0, int(total.get(k) or 0) - before.get(k, 0)) for k in _USAGE_KEYS}
    return LmUsage(
        prompt_tokens=d["input_tokens"],
        completion_tokens=d["output_tokens"],
        total_tokens=d["input_tokens"] + d["output_tokens"],
        cached_tokens=d["cached_input_tokens"],
        reasoning_tokens=d["reasoning_output_tokens"],
        cost_msats=None,
        calls=1,
    )


def render_prompt(req: Request) -> tuple[str, str]:
    """(developer instructions, prompt): system messages become instructions; a lone user message
    is the prompt as is, a longer conversation a plain transcript."""
    system = "\n\n".join(m.content for m in req.messages if m.role == "system")
    rest = [m for m in req.messages if m.role != "system"]
    if len(rest) == 1 and rest[0].role == "user":
        return system, rest[0].content
    if not rest:
        raise errors.ConfigurationError("no user message to send to Codex", provider=PROVIDER)
    return system, "\n\n".join(f"{m.role.upper()}: {m.content}" for m in rest)


TAG_ENV = "DSRS_CODEX_CALL"  # set to a fresh token per call; every process the call starts inherits it


def tagged(token: str) -> list[int]:
    """Running processes whose environment carries this call's token (Linux /proc; elsewhere none)."""
    needle = f"{TAG_ENV}={token}".encode()
    found = []
    with contextlib.suppress(OSError):
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/environ", "rb") as f:
                        if needle in f.read().split(b"\0") and _running(int(d)):
                            found.append(int(d))
                except OSError:
                    continue
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


async def _stop(proc: asyncio.subprocess.Process, token: str) -> None:
    """Stop the CLI and everything it started: SIGTERM its process group, SIGKILL after a grace
    period; then the same for every process still carrying the call's token (the commands the
    agent ran live in sessions of their own, and the CLI leaves its shell snapshot running)."""

    def kill(pid: int, sig: int, group: bool = False) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            (os.killpg if group else os.kill)(pid, sig)

    try:
        if proc.returncode is None:
            kill(proc.pid, signal.SIGTERM, group=True)
            try:
                await asyncio.wait_for(proc.wait(), KILL_GRACE)
            except asyncio.TimeoutError:
                kill(proc.pid, signal.SIGKILL, group=True)
                await proc.wait()
    finally:
        kill(proc.pid, signal.SIGKILL, group=True)
        if proc.returncode is None:
            kill(proc.pid, signal.SIGKILL)
        left = tagged(token)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # TERM first: a shell's EXIT trap may release a lock
            for pid in left:
                kill(pid, sig)
            for _ in range(int(KILL_GRACE / 0.02)):  # return only once they are really gone
                left = tagged(token)
                if not left:
                    return
                await asyncio.sleep(0.02)


class CodexExec:
    """Runs one `codex exec --json` per call and turns its events into a Completion."""

    def __init__(self, model: str, opts: dict[str, Any]) -> None:
        self.model = model
        self.opts = opts
        self.binary = find_binary(opts.get("binary"))
        self.timeout = float(opts.get("timeout") or DEFAULT_TIMEOUT)

    def __repr__(self) -> str:
        return f"CodexExec({self.binary!r}, model={self.model!r})"

    def env(self) -> dict[str, str]:
        env = {**os.environ, **(self.opts.get("env") or {})}
        if self.opts.get("codex_home"):
            env["CODEX_HOME"] = self.opts["codex_home"]
        if self.opts.get("api_key") is not None:  # in the environment, never on the command line
            env[KEY_ENV if self.opts.get("base_url") else "CODEX_API_KEY"] = self.opts["api_key"].get()
        return env

    def secrets(self) -> list[str]:
        vals = list((self.opts.get("env") or {}).values())
        if self.opts.get("api_key") is not None:
            vals.append(self.opts["api_key"].get())
        return [v for v in vals if isinstance(v, str) and len(v) >= 4]

    def argv(self, req: Request, instructions: str, schema_path: str | None) -> list[str]:
        o = self.opts
        args = [self.binary, "exec", "--json", "--skip-git-repo-check"]
        if o.get("working_dir"):
            args += ["-C", o["working_dir"]]
        if self.model:
            args += ["-m", self.model]
        if o.get("sandbox"):
            args += ["-s", o["sandbox"]]
        config: dict[str, Any] = {}
        if o.get("base_url"):  # a Responses-API server of the caller's: a model provider of our own
            config = {"model_provider": "dsrs", "model_providers.dsrs.name": "dsrs",
                      "model_providers.dsrs.base_url": o["base_url"]}  # fmt: skip
            if o.get("api_key") is not None:
                config["model_providers.dsrs.env_key"] = KEY_ENV
        config.update(o.get("config") or {})
        if instructions:
            config["developer_instructions"] = instructions
        for k, v in config.items():
            args += ["-c", f"{k}={toml_value(v)}"]
        if schema_path:
            args += ["--output-schema", schema_path]
        if o.get("thread_id"):
            args += ["resume", o["thread_id"]]
        return args + ["-"]  # the prompt comes on stdin

    def check(self, req: Request) -> dict[str, Any] | None:
        """Refuse what the CLI cannot do; return the JSON schema to enforce, if any."""
        if req.tools:
            raise errors.UnsupportedFeatureError(
                "the Codex CLI uses its own tools; function tools cannot be passed", provider=PROVIDER,
                model=self.model, hint="give Codex MCP servers with with_config({'mcp_servers.<name>.command': ...})",
            )  # fmt: skip
        rf = req.response_format
        if not rf or rf.get("type") == "text":
            return None
        if rf.get("type") == "json_schema":
            spec = rf.get("json_schema") or {}
            schema: dict[str, Any] = spec.get("schema", spec)
            return schema
        raise errors.UnsupportedFeatureError(
            f"the Codex CLI cannot do response_format {rf.get('type')!r}", provider=PROVIDER, model=self.model,
            hint="use {'type': 'json_schema', 'json_schema': {'schema': {...}}}",
        )  # fmt: skip

    def _spent(self, e: errors.DsrsError, home: str, thread_id: str, before: dict[str, int]) -> errors.DsrsError:
        """A failed turn may have made billed model requests: what its rollout file says they used,
        priced, goes on the error as `spent_msats` (budgets settle to it; `spent_unknown` when the
        price is unknown). `e.usage` holds the tokens."""
        from . import pricing

        usage = turn_usage(thread_total(home, thread_id), before) if thread_id else LmUsage(calls=1, cost_msats=None)
        if thread_id:
            usage = pricing.apply(usage, PROVIDER, self.model)
        e.usage = usage  # type: ignore[attr-defined]
        if usage.cost_msats is None:
            e.spent_unknown = True  # type: ignore[attr-defined]
        else:
            e.spent_msats = usage.cost_msats  # type: ignore[attr-defined]
        return e

    def _scrub(self, text: str) -> str:
        for s in self.secrets():
            text = text.replace(s, "**********")
        return text

    async def run(self, req: Request) -> AsyncIterator[Item | Completion]:
        """Item snapshots as the CLI reports them, then the Completion."""
        schema = self.check(req)
        instructions, prompt = render_prompt(req)
        env = self.env()
        token = uuid.uuid4().hex
        env[TAG_ENV] = token
        home = env.get("CODEX_HOME") or os.path.expanduser("~/.codex")
        tid = self.opts.get("thread_id")
        before = thread_total(home, tid) if tid else {}
        schema_path = None
        if schema is not None:
            fd, schema_path = tempfile.mkstemp(prefix="dsrs-codex-schema-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(schema, f)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(req, instructions, schema_path), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
                start_new_session=True, limit=_LINE_LIMIT,
            )  # fmt: skip
        except OSError as e:
            if schema_path:
                os.unlink(schema_path)
            raise CodexNotFoundError(f"cannot start the Codex CLI: {e.strerror}", provider=PROVIDER,
                                     model=self.model, hint=INSTALL_HINT) from None  # fmt: skip
        stderr: deque[str] = deque(maxlen=40)

        async def drain_stderr() -> None:
            assert proc.stderr is not None
            async for line in proc.stderr:
                stderr.append(line.decode(errors="replace").rstrip())

        stderr_task = asyncio.ensure_future(drain_stderr())
        events: list[dict[str, Any]] = []
        done: list[Item] = []  # completed items, in completion order
        thread_id, total, failure, last_error = tid or "", None, None, None
        try:
            assert proc.stdin is not None and proc.stdout is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(prompt.encode())
                await asyncio.wait_for(proc.stdin.drain(), max(0.0, deadline - loop.time()))
            proc.stdin.close()
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), max(0.0, deadline - loop.time()))
                if not line:
                    break
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue  # not an event (the CLI's JSON mode prints only events; be lenient)
                if not isinstance(ev, dict):
                    continue
                events.append(ev)
                kind = ev.get("type")
                if kind == "thread.started":
                    thread_id = ev.get("thread_id") or thread_id
                elif kind in ("item.started", "item.updated", "item.completed") and isinstance(ev.get("item"), dict):
                    item = parse_item(ev["item"])
                    if kind == "item.completed":
                        done.append(item)
                    yield item
                elif kind == "turn.completed":
                    total = ev.get("usage") or {}
                    break  # the turn is over (a left-over child may hold stdout open: do not wait for EOF)
                elif kind == "turn.failed":
                    failure = (ev.get("error") or {}).get("message") or "turn failed"
                    break
                elif kind == "error":
                    last_error = ev.get("message")
            rc = await asyncio.wait_for(proc.wait(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            rc = None
        finally:
            await _stop(proc, token)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stderr_task, KILL_GRACE)
            stderr_task.cancel()
            if schema_path:
                with contextlib.suppress(OSError):
                    os.unlink(schema_path)
        if rc is None:
            raise self._spent(errors.TimeoutError(
                f"the Codex CLI did not finish within {self.timeout:g} s; its processes were stopped",
                provider=PROVIDER, model=self.model, hint="raise with_timeout(...) or check the model server",
            ), home, thread_id, before)  # fmt: skip
        if failure is not None:
            raise self._spent(CodexTurnFailedError(self._scrub(failure), provider=PROVIDER, model=self.model,
                                                   code="turn.failed"), home, thread_id, before)  # fmt: skip
        if rc != 0 or total is None:
            why = next((s for s in reversed(stderr) if s.startswith("Error")), None) or last_error or (
                stderr[-1] if stderr else "no turn.completed event")  # fmt: skip
            raise self._spent(CodexError(self._scrub(f"the Codex CLI failed: {why}"), provider=PROVIDER,
                                         model=self.model, code=f"exit {rc}"), home, thread_id, before)  # fmt: skip
        items = tuple(done)
        replies = [i for i in items if isinstance(i, AgentMessage)]
        yield Completion(
            text=replies[-1].text if replies else "",
            usage=turn_usage(total, before),
            finish_reason="stop",
            model=self.model,
            provider=PROVIDER,
            id=thread_id,
            raw=CodexTurn(thread_id, items, {k: int(total.get(k) or 0) for k in _USAGE_KEYS}, events),
            items=items,
        )

    async def complete(self, req: Request) -> Completion:
        final = None
        async for x in self.run(req):
            if isinstance(x, Completion):
                final = x
        assert final is not None
        return final

    async def stream(self, req: Request) -> AsyncIterator[Any]:
        """Agent messages as text deltas (or, for `aitems`, every item), then the Completion."""
        items = bool(self.opts.get("item_stream"))
        async for x in self.run(req):
            if items or isinstance(x, Completion):
                yield x
            elif isinstance(x, AgentMessage):
                yield x.text
