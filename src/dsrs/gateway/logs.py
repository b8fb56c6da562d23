"""The gateway's logs: one access line per request at INFO, and records kept bounded.

The access line (logger `dsrs.gateway.access`) says method, endpoint, status, model, lane, client key
*name*, tokens, msats and latency; never a key, a prompt or an answer. `bound()` puts a filter on the
gateway's and aiohttp's server loggers: a record longer than `LIMIT` characters (message or
traceback) is cut, and a malformed request (aiohttp's `HttpProcessingError`, whose text quotes the
raw bytes the client sent, maybe a key) is one WARNING line naming the error class, not an ERROR.
"""

from __future__ import annotations

import logging
import time
from typing import Any

ACCESS = logging.getLogger("dsrs.gateway.access")
LIMIT = 2000  # characters of a message, and of a traceback
try:  # the request's entry the handlers fill in: model, lane, key, tokens, msats
    from aiohttp.web import RequestKey

    INFO_KEY: Any = RequestKey("dsrs_access", dict)
except ImportError:  # aiohttp < 3.12
    INFO_KEY = "dsrs.access"


def _cut(text: str) -> str:
    return text if len(text) <= LIMIT else f"{text[:LIMIT]}... [{len(text) - LIMIT} more characters cut]"


class Bounded(logging.Filter):
    """Cuts long records; a malformed request is a one-line warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if len(msg) > LIMIT:
            record.msg, record.args = _cut(msg), None
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            from aiohttp.http_exceptions import HttpProcessingError

            if isinstance(exc, HttpProcessingError):  # the client's fault: no traceback, not an ERROR
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                # its text quotes the bytes it could not parse, which may be a key's header: only the class
                record.exc_info, record.exc_text = None, f"{type(exc).__name__} (the request's bytes are not logged)"
            else:
                text = logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
                if len(text) > LIMIT:
                    record.exc_info, record.exc_text = None, _cut(text)
        return True


_FILTER = Bounded()


def bound() -> None:
    """Install the filter on the loggers the gateway's server writes to (once)."""
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "dsrs.gateway"):
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)


def access(request: Any, endpoint: str, status: int, started: float) -> None:
    """The access line of one request (only built when INFO is on)."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    i = {k: v for k, v in (request.get(INFO_KEY) or {}).items() if v is not None}
    ACCESS.info("%s %.100s %s model=%.100s lane=%s key=%s tokens=%s msats=%s latency_ms=%.1f", request.method,
                endpoint, status, i.get("model", "-"), i.get("lane", "-"), i.get("key", "-"), i.get("tokens", "-"),
                i.get("msats", "-"), (time.perf_counter() - started) * 1000)  # fmt: skip
