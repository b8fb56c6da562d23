"""Run coroutines from sync code, also inside a running event loop (Jupyter).

Without a running loop: a persistent loop per thread, so pooled connections survive between
calls. Inside a running loop: one background thread owns a loop and runs the call there.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_local = threading.local()
_bg_loop: asyncio.AbstractEventLoop | None = None
_bg_lock = threading.Lock()


def _thread_loop() -> asyncio.AbstractEventLoop:
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
        if threading.current_thread() is threading.main_thread():
            atexit.register(_close, loop)
    return loop


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """At exit: close the pooled connections of the main thread's loop, then the loop."""
    if loop.is_closed() or loop.is_running():
        return
    from .http import aclose

    async def shutdown() -> None:
        await aclose()

    try:
        loop.run_until_complete(shutdown())
    finally:
        loop.close()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _bg_loop
    with _bg_lock:
        if _bg_loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="dsrs-sync", daemon=True).start()
            _bg_loop = loop
            atexit.register(loop.call_soon_threadsafe, loop.stop)
        return _bg_loop


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def run(coro: Coroutine[Any, Any, T]) -> T:
    if not _in_loop():
        return _thread_loop().run_until_complete(coro)
    return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result()


def iterate(agen: AsyncIterator[T]) -> Iterator[T]:
    """A sync iterator over an async one."""
    step = agen.__anext__
    try:
        while True:
            try:
                yield run(step())  # type: ignore[arg-type]
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            try:
                run(aclose())
            except RuntimeError:
                pass
