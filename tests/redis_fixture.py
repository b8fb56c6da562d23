"""A real redis-server on 127.0.0.1 for the tests: DSRS_TEST_REDIS_SERVER, else `redis-server` on PATH.

Started with no persistence (`--save '' --appendonly no`) on a free port, as a subprocess killed by
its PID at teardown. `redis_server` is one per test session; tests that kill Redis start their own
with `RedisServer.start()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, workdir: str) -> None:
        self.proc = proc
        self.port = port
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def binary() -> str:
        exe = os.environ.get("DSRS_TEST_REDIS_SERVER") or shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not found: install Debian's redis-server or set DSRS_TEST_REDIS_SERVER")
        return exe

    @staticmethod
    def _spawn(port: int, workdir: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [RedisServer.binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir, "--protected-mode", "yes"],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @classmethod
    def start(cls) -> RedisServer:
        for _ in range(5):
            workdir = tempfile.mkdtemp(prefix="dsrs-redis-")
            port = _free_port()
            srv = cls(cls._spawn(port, workdir), port, workdir)
            if srv._wait_ready():
                return srv
            srv.kill()
        raise RuntimeError("redis-server did not start")

    def stop(self, *, save: bool = False) -> None:
        """Kill the server (SIGKILL, by PID), keeping its port for `restart`. `save=True` first writes
        its data to disk (SAVE), so that `restart` comes back with it, like a Redis with persistence."""
        if save and self.proc.poll() is None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                s.sendall(b"SAVE\r\n")
                if not s.recv(16).startswith(b"+OK"):
                    raise RuntimeError("redis-server did not save")
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        """A new server on the same port: empty, unless `stop(save=True)` saved the data."""
        self.stop()
        self.proc = self._spawn(self.port, self.workdir)
        if not self._wait_ready():
            raise RuntimeError("redis-server did not restart")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def kill(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer.start()
    yield srv
    srv.kill()
