"""Errors of the Pylon swarm and of Lightning payments (all under dsrs.errors.DsrsError)."""

from __future__ import annotations

from typing import Any

from ..errors import APIError, DsrsError


class PaymentError(DsrsError):
    """A payment failed; nothing was paid (the wallet said so). `code` is the NIP-47 error code."""

    fallback = True


class PaymentUnknownError(PaymentError):
    """A payment's outcome is unknown (no answer in time, and the wallet's `lookup_invoice` did not
    show it paid within the call's timeout). Its budget reservation stays open:
    `reservation.settle(paid_msats)` or `reservation.release()` once the wallet says which
    (`await wallet.lookup_invoice(e.payment_hash)`). The job is never paid again."""

    fallback = False
    reservation: Any = None
    payment_hash: str | None = None
    spent_unknown = True  # budgets around the call keep their worst case (see dsrs.budget)


class PaymentRequiredError(DsrsError):
    """auto_pay is off and a provider asks to be paid: `quote` says who, how much, for which job."""

    fallback = True

    def __init__(self, message: str, *, quote: Any, **kw: Any) -> None:
        self.quote = quote
        super().__init__(message, **kw)


class SwarmJobError(APIError):
    """The provider we chose (and maybe paid) failed the job, or never delivered after payment.
    `spent_msats` is what was paid for the job (budgets around the call settle to it)."""

    retryable = False
