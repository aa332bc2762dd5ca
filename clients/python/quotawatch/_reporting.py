"""What a usage report says about a finished call, in the shape
``POST /api/quota/usage`` takes, from OpenAI's objects or from an
exception. Nothing here does IO."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Dict, Mapping, Optional

from ._models import Check

#: The status reported for a call that ended without an answer from OpenAI
#: for a reason of the caller's own (its code raised, or it was cancelled):
#: 499, "client closed request", as reverse proxies such as nginx log it. It
#: counts as a failed call, and unlike a success it never lifts a billing
#: block.
ABANDONED_STATUS = 499
#: The statuses the proxy gives calls OpenAI never answered: they count as
#: server errors.
TIMEOUT_STATUS = 504
UNREACHABLE_STATUS = 502

_TIMEOUT_NAMES = ("TimeoutError", "TimeoutException", "APITimeoutError", "ReadTimeout", "ConnectTimeout")
_CONNECTION_NAMES = ("ConnectionError", "APIConnectionError", "TransportError", "NetworkError")


def plain(value: Any) -> Any:
    """A JSON-ready copy of an OpenAI object (a pydantic model, a dict, or
    an object with attributes)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return plain(dump())
    return {key: plain(item) for key, item in vars(value).items() if not key.startswith("_")}


def usage_body(
    *,
    reservation_id: Optional[str] = None,
    model: Optional[str] = None,
    usage: Any = None,
    status_code: Optional[int] = None,
    error: Any = None,
    headers: Optional[Mapping[str, str]] = None,
    latency_ms: Optional[int] = None,
) -> Dict[str, Any]:
    """The body of ``POST /api/quota/usage``; fields left as None are left
    out, so that the server applies its defaults."""
    body: Dict[str, Any] = {
        "reservation_id": reservation_id,
        "model": model,
        "usage": plain(usage),
        "status_code": status_code,
        "error": plain(error),
        "headers": {str(k).lower(): str(v) for k, v in headers.items()} if headers is not None else None,
        "latency_ms": latency_ms,
    }
    return {key: value for key, value in body.items() if value is not None}


def _named(error: BaseException, names: tuple) -> bool:
    return any(kind.__name__ in names for kind in type(error).__mro__)


def _error_fields(error: BaseException) -> Dict[str, Any]:
    """OpenAI's error object carried by an exception: the ``openai``
    package keeps it in ``body`` (the inner object, or the whole envelope)."""
    body = getattr(error, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            return {key: inner.get(key) for key in ("message", "type", "code", "param") if inner.get(key) is not None}
    fields = {key: getattr(error, key, None) for key in ("type", "code", "param")}
    fields["message"] = str(error)
    return {key: value for key, value in fields.items() if isinstance(value, str)}


def outcome_of_exception(error: BaseException) -> Dict[str, Any]:
    """What a call that raised ``error`` reports, mirroring how the proxy
    settles calls: an error answer of OpenAI's with its status, error and
    headers and no tokens (OpenAI bills none for it); a call OpenAI never
    answered as a server error keeping its estimate; any other exception as
    abandoned, keeping its estimate."""
    response = getattr(error, "response", None)
    status = getattr(error, "status_code", None) or getattr(response, "status_code", None)
    if isinstance(status, int) and 100 <= status <= 599:
        raw_headers = getattr(response, "headers", None)
        return {
            "status_code": status,
            "error": _error_fields(error),
            "headers": dict(raw_headers.items()) if raw_headers is not None else None,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
        }
    if isinstance(error, asyncio.TimeoutError) or _named(error, _TIMEOUT_NAMES):
        kind, status = "upstream_timeout", TIMEOUT_STATUS
    elif _named(error, _CONNECTION_NAMES):
        kind, status = "upstream_unreachable", UNREACHABLE_STATUS
    else:
        kind, status = "abandoned", ABANDONED_STATUS
    message = f"{type(error).__name__}: {error}"[:500]
    return {"status_code": status, "error": {"type": kind, "message": message}}


class ReservationState:
    """An admitted call between its check and its settlement: what it will
    report. Shared by the blocking and the asyncio reservations."""

    def __init__(self, check: Check, model: Optional[str]) -> None:
        self.check = check
        self.model = model
        self.settled = False
        self._started = time.monotonic()
        self._outcome: Optional[Dict[str, Any]] = None

    @property
    def reservation_id(self) -> str:
        return self.check.reservation_id

    @property
    def probe(self) -> bool:
        return self.check.probe

    def report(
        self,
        usage: Any = None,
        *,
        status_code: Optional[int] = None,
        error: Any = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Says how the call ended, to be sent when the reservation settles:
        ``usage`` as OpenAI returned it (chat, embeddings or Responses
        shape; None keeps the estimate), OpenAI's status, its error object
        and its response headers (``x-ratelimit-*``, ``retry-after``)."""
        self._outcome = {"usage": usage, "status_code": status_code, "error": error, "headers": headers}

    def fail(self, error: BaseException) -> None:
        """Records an exception as the call's end, unless the call already
        reported how it ended."""
        if self._outcome is None:
            self._outcome = outcome_of_exception(error)

    def settlement(self) -> Dict[str, Any]:
        """The usage report, marking the reservation settled: a
        reservation settles once."""
        self.settled = True
        outcome = self._outcome or {"status_code": 200}
        return usage_body(
            reservation_id=self.reservation_id,
            model=self.model,
            latency_ms=int((time.monotonic() - self._started) * 1000),
            **outcome,
        )
