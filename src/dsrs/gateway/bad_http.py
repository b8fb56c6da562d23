"""A request aiohttp's parser refuses gets a short fixed 400, and its log line quotes none of its bytes.

aiohttp answers a malformed request with the parser's message, which quotes the line it could not
parse; that line may be a client's `Authorization` or `x-api-key` header with one stray byte, so the
answer (and the log) would carry the key. `fixed_errors` wraps the server's protocol factory so each
connection's handler answers such a request with `BODY` instead (the status and the closing of the
connection stay aiohttp's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

BODY = "400 Bad Request: the request is not valid HTTP"


class _FixedErrors(RequestHandler):
    __slots__ = ()  # the same layout as RequestHandler: a handler's class can be swapped for this one

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> Any:  # fmt: skip
        if isinstance(exc, HttpProcessingError):
            message = BODY
        return super().handle_error(request, status, exc, message)


def fixed_errors(make: Callable[[], Any]) -> Callable[[], Any]:
    """A protocol factory like `make` (aiohttp's `web.Server`) whose handlers answer malformed requests with `BODY`."""

    def protocol() -> Any:
        handler = make()
        if type(handler) is RequestHandler:  # aiohttp builds no subclass: its constructor's arguments stay its own
            handler.__class__ = _FixedErrors
        return handler

    return protocol
