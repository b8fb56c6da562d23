"""A third-party Nostr relay, unmodified: PyPI `nostr-relay` (pinned in scripts/test), on 127.0.0.1.

It is the network dsrs meets outside its own tests: stock limits (32 subscriptions per
connection, refused with a NOTICE, not a CLOSED; 4,096 characters of content per event; events
older or newer than it likes are refused), its own OK/EOSE timing, no NIP-11 `limitation`.

scripts/test installs it into its own virtual environment (it pins its own aiohttp, websockets,
SQLAlchemy...) and exports DSRS_TEST_NOSTR_RELAY, the path of its `nostr-relay` command. Start it
with `StockRelay.start(tmp_path)`; `overrides` change its config.yaml (say why in the test).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

VERSION = "1.14"
# nostr-relay's own config.yaml lists these; a `storage` section replaces that list, so it is repeated here.
STOCK_VALIDATORS = ["nostr_relay.validators.is_not_too_large", "nostr_relay.validators.is_signed",
                    "nostr_relay.validators.is_recent", "nostr_relay.validators.is_not_hellthread"]  # fmt: skip


def command() -> str:
    exe = os.environ.get("DSRS_TEST_NOSTR_RELAY", "")
    if not exe or not os.access(exe, os.X_OK):
        raise RuntimeError(
            "DSRS_TEST_NOSTR_RELAY is not set to the nostr-relay command: run the suite with scripts/test, "
            f"which installs nostr-relay=={VERSION} into ~/.cache/dsrs-test/"
        )
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StockRelay:
    __test__ = False

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"ws://127.0.0.1:{port}"

    @classmethod
    def start(cls, workdir: Path, **overrides: Any) -> StockRelay:
        port = _free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "DEBUG": False,
            "relay_name": "stock nostr-relay",
            "storage": {"sqlalchemy.url": f"sqlite+aiosqlite:///{workdir / 'relay.sqlite3'}", "validators": STOCK_VALIDATORS},
            "gunicorn": {"bind": f"127.0.0.1:{port}", "workers": 1, "loglevel": "warning", "reload": False},
            "verification": {"nip05_verification": "disabled"},
            "authentication": {"enabled": False},
            "logging": {
                "version": 1,
                "handlers": {"file": {"class": "logging.FileHandler", "filename": str(workdir / "relay.log")}},
                "root": {"level": "WARNING", "handlers": ["file"]},
            },
            **overrides,
        }
        conf = workdir / "config.yaml"
        conf.write_text(json.dumps(config))  # JSON is YAML: no yaml module needed here
        log = workdir / "stdout.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [command(), "-c", str(conf), "serve", "--use-uvicorn"],
                cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        relay = cls(proc, port, log)
        relay._wait_ready(60.0)
        return relay

    def _wait_ready(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/", headers={"Accept": "application/nostr+json"})
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nostr-relay exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nostr-relay did not answer within {limit:.0f} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
