"""Run the gateway for tests: in a thread of this process, or as a separate `python -m dsrs.gateway` process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

CLIENT_KEY = "sk-client-test-0123456789"
OTHER_KEY = "sk-client-other-9876543210"
ADMIN_KEY = "sk-admin-test-5555555555"  # DSRS_ADMIN_KEY of the test gateways: /metrics and /health details


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml(doc: dict[str, Any]) -> str:
    """A tiny TOML writer for the test configs (tables of scalars, lists and inline tables)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    out = []
    for section, body in doc.items():
        if all(isinstance(x, dict) for x in body.values()) and body and section in ("lanes", "models", "budgets", "keys"):
            for name, tbl in body.items():
                out.append(f"[{section}.{json.dumps(name)}]")
                out += [f"{k} = {val(v)}" for k, v in tbl.items()]
        else:
            out.append(f"[{section}]")
            out += [f"{k} = {val(v)}" for k, v in body.items()]
    return "\n".join(out) + "\n"


def get(url: str, key: str | None = None, timeout: float = 10) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


class InProcessGateway:
    """The gateway app on its own event loop in a thread (like tests/scripted.py)."""

    def __init__(self, doc: dict[str, Any], env: dict[str, str] | None = None) -> None:
        from dsrs.gateway.config import parse

        self.cfg = parse(doc, env={"CLIENT_KEY": CLIENT_KEY, "OTHER_KEY": OTHER_KEY, "DSRS_ADMIN_KEY": ADMIN_KEY,
                                         **(env or {})})  # fmt: skip
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="gateway")
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        from dsrs.gateway.app import start

        asyncio.set_event_loop(self.loop)
        try:
            self.runner = self.loop.run_until_complete(start(self.cfg, "127.0.0.1", self.port))
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def runtime(self) -> Any:
        from dsrs.gateway.app import RUNTIME

        return self.runner.app[RUNTIME]

    def close(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        fut.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)


class GatewayProcess:
    """`python -m dsrs.gateway --config <file> --port <free>` as a subprocess, killed by its PID."""

    def __init__(self, doc: dict[str, Any], env: dict[str, str] | None = None) -> None:
        fd, self.config_path = tempfile.mkstemp(prefix="dsrs-gw-", suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(toml(doc))
        self.port = free_port()
        full_env = {**os.environ, "CLIENT_KEY": CLIENT_KEY, "OTHER_KEY": OTHER_KEY, "DSRS_ADMIN_KEY": ADMIN_KEY, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsrs.gateway", "--config", self.config_path, "--port", str(self.port)],
            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                get(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("gateway did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> str:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        err = self.proc.stderr.read().decode() if self.proc.stderr and not self.proc.stderr.closed else ""
        if self.proc.stderr:
            self.proc.stderr.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        if os.path.exists(self.config_path):
            os.unlink(self.config_path)
        return err
