"""The one error the RIS/FHIR senders raise, so the dispatcher can decide between retry and dead-letter."""

from __future__ import annotations


class RisSendError(Exception):
    """A result could not be delivered to a RIS or FHIR endpoint.

    `retryable` is True where the same message may succeed later unchanged (the peer is down, busy or slow)
    and False where it will not (the peer refused its content, a certificate does not verify, the SR is
    unusable): the dispatcher then dead-letters it at once instead of retrying.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
