"""One exception hierarchy for everything the package raises.

quotawatch answers errors in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``; each HTTP status gets a
class of its own so that callers can catch what they can act on.
"""

from __future__ import annotations

import json
from typing import Mapping, Optional


class QuotawatchError(Exception):
    """The base of every error raised by this package."""


class APIConnectionError(QuotawatchError):
    """quotawatch could not be reached, or did not answer in time."""


class WebSocketError(QuotawatchError):
    """The WebSocket handshake failed or the server broke the protocol.

    ``close_code`` is the close code the server sent, when it closed the
    connection with one.
    """

    def __init__(self, message: str, *, close_code: Optional[int] = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class APIError(QuotawatchError):
    """An error answer of the quotawatch API."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: Optional[str] = None,
        error_type: Optional[str] = None,
        param: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.type = error_type
        self.param = param
        # Header names are kept in lower case, as HTTP/2 and httpx give them.
        self.headers = {name.lower(): value for name, value in (headers or {}).items()}

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        return f"HTTP {self.status_code}{code}: {self.message}"


class BadRequestError(APIError):
    """The request was malformed or a value out of bounds (``param`` names it)."""


class AuthenticationError(APIError):
    """The key is missing, unknown, revoked or expired (HTTP 401)."""


class PermissionDeniedError(APIError):
    """The key may not do this (HTTP 403), e.g. it lacks a scope."""


class NotFoundError(APIError):
    """The workspace or reservation does not exist (HTTP 404)."""


class ConflictError(APIError):
    """The change conflicts with the server's configuration (HTTP 409)."""


class ServerError(APIError):
    """quotawatch could not complete the request (HTTP 5xx)."""


class RefusedError(APIError):
    """quotawatch refused the call (HTTP 429): the workspace has no room.

    ``retry_after`` is the number of seconds after which a retry can succeed,
    when the server knows it. ``should_retry`` is false when no short wait can
    help (a used-up day quota, a billing block, a call larger than a limit).
    ``billing_block`` is true when OpenAI reported the account's billing quota
    exhausted: requests stay refused until billing is fixed.
    """

    @property
    def retry_after(self) -> Optional[float]:
        millis = _number(self.headers.get("retry-after-ms"))
        if millis is not None:
            return millis / 1000.0
        return _number(self.headers.get("retry-after"))

    @property
    def should_retry(self) -> bool:
        return self.headers.get("x-should-retry", "").lower() != "false"

    @property
    def billing_block(self) -> bool:
        return self.type == "insufficient_quota"


def _number(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


_BY_STATUS = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: BadRequestError,
    415: BadRequestError,
    422: BadRequestError,
    429: RefusedError,
}


def error_from_answer(status_code: int, headers: Mapping[str, str], body: bytes) -> APIError:
    """The exception for an error answer, read from its OpenAI-shaped body."""
    detail = {}
    try:
        parsed = json.loads(body.decode("utf-8")) if body else None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            detail = parsed["error"]
    except (UnicodeDecodeError, ValueError):
        pass
    message = detail.get("message") or f"quotawatch answered HTTP {status_code}"
    kind = _BY_STATUS.get(status_code, ServerError if status_code >= 500 else APIError)
    return kind(
        status_code,
        message,
        code=detail.get("code"),
        error_type=detail.get("type"),
        param=detail.get("param"),
        headers=headers,
    )
