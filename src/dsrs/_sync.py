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


class _ThreadLoop:
    """A thread's own loop; closed (with its pooled connections) when the thread ends, or at exit."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        if threading.current_thread() is threading.main_thread():
            atexit.register(self.close)

    def close(self) -> None:
        loop = self.loop
        if loop.is_closed() or loop.is_running():
            return
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())  # closes the loop's HTTP session (dsrs.http)
        finally:
            loop.close()

    __del__ = close  # threading.local drops it when its thread ends


def _thread_loop() -> asyncio.AbstractEventLoop:
    holder = getattr(_local, "holder", None)
    if holder is None or holder.loop.is_closed():
        holder = _local.holder = _ThreadLoop()
    return holder.loop


def _background_loop() -> asyncio.AbstractEventLoop:
    global _bg_loop
    with _bg_lock:
        if _bg_loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="dsrs-sync", daemon=True).start()
            _bg_loop = loop
            atexit.register(_stop_background, loop)
        return _bg_loop


def _stop_background(loop: asyncio.AbstractEventLoop) -> None:
    try:
        asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout=5)
    finally:
        loop.call_soon_threadsafe(loop.stop)


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end. If the wait is interrupted (Ctrl-C), the call is cancelled, not left
    pending: it unwinds at once (a budget books what it may have cost, a stream is closed)."""
    if not _in_loop():
        loop = _thread_loop()
        task = loop.create_task(coro)
        try:
            return loop.run_until_complete(task)
        except BaseException:
            if not task.done():
                task.cancel()
                try:
                    loop.run_until_complete(task)
                except BaseException:  # its cancellation, or whatever it ended with: the interruption wins
                    pass
            raise
    loop = _background_loop()
    if asyncio.get_running_loop() is loop:
        # a sync call made from code already running on the background loop (e.g. a usage hook):
        # waiting on that loop from itself would deadlock, so this one call gets its own thread
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(_capture(coro)), name="dsrs-sync-nested")
        t.start()
        t.join()
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result()
    except BaseException:
        fut.cancel()  # interrupted while waiting: the call on the background loop is cancelled too
        raise


def _capture(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    try:
        return True, _thread_loop().run_until_complete(coro)
    except BaseException as e:  # handed to the caller's thread
        return False, e


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
