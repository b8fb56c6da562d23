"""Every error dsrs raises, under one base, classified by status and error code (never message text).

One narrow, documented exception (`_ANTHROPIC_400`): Anthropic sends an empty credit balance and
an overflowing context as plain 400 `invalid_request_error`s, with no structured code of their
own. For provider "anthropic" only, and only on a 400 whose type is `invalid_request_error`, the
start of the message is matched against Anthropic's fixed error strings ("Your credit balance is
too low" -> `QuotaExceededError`; "prompt is too long", "input length and `max_tokens` exceed
context limit" -> `ContextWindowExceededError`). Any other text, status, type or provider keeps
the status/code rule, so a changed wording degrades to `BadRequestError`, never to a wrong class.
"""

from __future__ import annotations

import builtins
from typing import Any


class DsrsError(Exception):
    """Base of every dsrs error. Carries provider, model and HTTP status when known."""

    retryable = False  # may the same call be retried on the same lane
    fallback = True  # may a LaneMux move this request to another lane

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status: int | None = None,
        code: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.provider = provider
        self.model = model
        self.status = status
        self.code = code
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = "/".join(x for x in (self.provider, self.model) if x)
        parts = [f"[{where}]" if where else "", self.message]
        if self.status is not None:
            parts.append(f"(HTTP {self.status}{', ' + self.code if self.code else ''})")
        elif self.code:
            parts.append(f"({self.code})")
        if self.hint:
            parts.append(f"-> {self.hint}")
        return " ".join(p for p in parts if p)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__str__()!r})"


class ConfigurationError(DsrsError, ValueError):
    """Bad arguments or settings; nothing was sent."""

    fallback = False


class UnknownProviderError(ConfigurationError):
    pass


class MissingApiKeyError(ConfigurationError):
    fallback = True  # another lane may have its key


class UnsupportedFeatureError(ConfigurationError):
    """The provider cannot do what the request asks (tools, JSON schema...); nothing was sent."""

    fallback = True


class APIError(DsrsError):
    """The provider answered with an error."""


class BadRequestError(APIError):
    fallback = False


class ContextWindowExceededError(BadRequestError):
    """The prompt plus max_tokens does not fit the model's context window."""


class AuthenticationError(APIError):
    pass


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    retryable = True


class UnprocessableEntityError(BadRequestError):
    pass


class RateLimitError(APIError):
    """Too many requests: retry after `retry_after` seconds (None when the provider did not say)."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)


class QuotaExceededError(APIError):
    """Out of credit or quota: retrying will not help; switch lanes (a LaneMux does)."""


class ProviderUnavailableError(APIError):
    """5xx (or overloaded) after retries."""

    retryable = True


class ResponseFormatError(APIError):
    """The provider's answer was not what its protocol promises (malformed JSON, cut stream).

    Not retried, as in the official SDKs: the provider has answered (and billed) already.
    """


class SafetyBlockedError(APIError):
    """The provider refused to answer for safety reasons."""

    fallback = False


class APIConnectionError(DsrsError):
    """Could not reach the provider, or the connection broke."""

    retryable = True


class TimeoutError(APIConnectionError, builtins.TimeoutError):  # noqa: A001 - deliberate
    """The call took longer than its timeout."""


class BudgetExceededError(DsrsError):
    """A budget cannot cover this call's worst case; nothing was sent."""

    def __init__(self, message: str, *, limit_msats: int | None = None, needed_msats: int | None = None, **kw: Any):
        self.limit_msats = limit_msats
        self.needed_msats = needed_msats
        super().__init__(message, **kw)


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: QuotaExceededError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: ProviderUnavailableError,
    409: ConflictError,
    413: ContextWindowExceededError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}

# Structured error codes/types that override the status class. Matched exactly against the
# `code` or `type` field of the provider's error body.
_BY_CODE: dict[str, type[APIError]] = {
    "insufficient_quota": QuotaExceededError,  # OpenAI 429
    "billing_error": QuotaExceededError,  # Anthropic
    "credit_balance_too_low": QuotaExceededError,
    "context_length_exceeded": ContextWindowExceededError,  # OpenAI
    "exceed_context_size_error": ContextWindowExceededError,  # llama.cpp
    "string_above_max_length": ContextWindowExceededError,
    "rate_limit_error": RateLimitError,  # Anthropic
    "rate_limit_exceeded": RateLimitError,
    "overloaded_error": ProviderUnavailableError,  # Anthropic 529
    "authentication_error": AuthenticationError,
    "invalid_api_key": AuthenticationError,
    "permission_error": PermissionDeniedError,
    "not_found_error": NotFoundError,
    "model_not_found": NotFoundError,
    "RESOURCE_EXHAUSTED": RateLimitError,  # Gemini
    "API_KEY_INVALID": AuthenticationError,  # Gemini ErrorInfo reason (with a 400 INVALID_ARGUMENT)
    # Google RPC statuses: the class also when the error comes inside a 200 stream
    "INVALID_ARGUMENT": BadRequestError,
    "FAILED_PRECONDITION": BadRequestError,  # e.g. Gemini free tier not available in the region
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "NOT_FOUND": NotFoundError,
    "invalid_prompt": BadRequestError,  # OpenAI Responses `response.failed`
}


# Anthropic's fixed messages for 400 invalid_request_error that mean something narrower (see the module doc)
_ANTHROPIC_400: tuple[tuple[str, type[APIError]], ...] = (
    ("Your credit balance is too low", QuotaExceededError),
    ("prompt is too long", ContextWindowExceededError),
    ("input length and `max_tokens` exceed context limit", ContextWindowExceededError),
)


def _anthropic_400(provider: str, status: int, etype: str | None, msg: str) -> type[APIError] | None:
    if provider != "anthropic" or status != 400 or etype != "invalid_request_error":
        return None
    return next((cls for prefix, cls in _ANTHROPIC_400 if msg.startswith(prefix)), None)


def error_fields(body: Any) -> tuple[str | None, str | None, str]:
    """(code, type, message) from the usual error bodies: {"error": {...}}, {"error": "..."}, {"message": ...}."""
    if not isinstance(body, dict):
        return None, None, str(body)[:300] if body else ""
    err = body.get("error", body)
    if isinstance(err, str):
        return None, None, err[:300]
    if not isinstance(err, dict):
        return None, None, ""
    code = err.get("code")
    if isinstance(code, int) and isinstance(err.get("status"), str):  # Google: {"code": 429, "status": "..."}
        code = err["status"]
    etype = err.get("type") or err.get("status")
    msg = err.get("message") or body.get("message") or ""
    return (str(code) if code is not None else None), (str(etype) if etype else None), str(msg)[:300]


def _google_details(body: Any) -> tuple[str | None, float | None, bool]:
    """From Google RPC error `details`: the ErrorInfo reason, the RetryInfo delay, a per-day QuotaFailure."""
    err = body.get("error") if isinstance(body, dict) else None
    details = err.get("details") if isinstance(err, dict) else None
    reason, delay, per_day = None, None, False
    for d in details if isinstance(details, list) else ():
        if not isinstance(d, dict):
            continue
        kind = str(d.get("@type", ""))
        if kind.endswith("google.rpc.ErrorInfo"):
            reason = d.get("reason")
        elif kind.endswith("google.rpc.RetryInfo") and isinstance(d.get("retryDelay"), str):
            try:
                delay = float(d["retryDelay"].rstrip("s"))
            except ValueError:
                pass
        elif kind.endswith("google.rpc.QuotaFailure"):
            per_day = any("PerDay" in str(v.get("quotaId", "")) for v in d.get("violations") or () if isinstance(v, dict))
    return reason, delay, per_day


def from_response(
    status: int,
    body: Any,
    *,
    provider: str,
    model: str,
    retry_after: float | None = None,
) -> APIError:
    """The typed error for an HTTP error response."""
    code, etype, msg = error_fields(body)
    reason, delay, per_day = _google_details(body)
    if retry_after is None:
        retry_after = delay
    cls = _BY_CODE.get(reason or "") or _BY_CODE.get(code or "") or _BY_CODE.get(etype or "")
    cls = _anthropic_400(provider, status, etype, msg) or cls
    if cls is RateLimitError and per_day:
        cls = QuotaExceededError  # a daily quota will not come back after a short wait
    if cls is None:
        cls = _BY_STATUS.get(status) or (ProviderUnavailableError if status >= 500 else APIError)
    hint = _HINTS.get(cls)
    kw: dict[str, Any] = dict(provider=provider, model=model, status=status, code=code or etype, hint=hint)
    if cls is RateLimitError:
        return RateLimitError(msg or "rate limited", retry_after=retry_after, **kw)
    return cls(msg or f"HTTP {status}", **kw)


_HINTS: dict[type, str] = {
    AuthenticationError: "check the API key (with_api_key or the provider's env var)",
    QuotaExceededError: "add credit or switch to another lane",
    ContextWindowExceededError: "shorten the prompt or lower max_tokens",
    NotFoundError: "check the model name and base URL",
    RateLimitError: "slow down, or add another lane",
}
