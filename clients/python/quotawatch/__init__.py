"""A Python client for quotawatch: status, pre-flight checks, usage reports,
notifications and live updates, for one workspace.

    from quotawatch import Client

    quota = Client("http://quotawatch:8000", WORKSPACE_KEY)
    with quota.reserve(model="gpt-4o-mini", estimated_tokens=1200) as reservation:
        answer = openai_client.chat.completions.create(...)
        reservation.report(usage=answer.usage)
"""

from ._client import (
    WORKSPACE_HEADER,
    AsyncClient,
    AsyncReservation,
    Client,
    Reservation,
    __version__,
)
from ._errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    QuotawatchError,
    RefusedError,
    ServerError,
    WebSocketError,
)
from ._models import (
    BillingBlock,
    Check,
    Counts,
    ErrorSummary,
    Event,
    LimitForecast,
    LimitState,
    Notification,
    Notifications,
    Status,
    TenantText,
    ThresholdCrossing,
    UpstreamBucket,
    UsageCounts,
)
from ._watch import AsyncWatch, Watch
from ._websocket import WebSocketClosed
from .openai import wrap_openai

__all__ = [
    "WORKSPACE_HEADER",
    "APIConnectionError",
    "APIError",
    "AsyncClient",
    "AsyncReservation",
    "AsyncWatch",
    "AuthenticationError",
    "BadRequestError",
    "BillingBlock",
    "Check",
    "Client",
    "ConflictError",
    "Counts",
    "ErrorSummary",
    "Event",
    "LimitForecast",
    "LimitState",
    "NotFoundError",
    "Notification",
    "Notifications",
    "PermissionDeniedError",
    "QuotawatchError",
    "RefusedError",
    "Reservation",
    "ServerError",
    "Status",
    "TenantText",
    "ThresholdCrossing",
    "UpstreamBucket",
    "UsageCounts",
    "Watch",
    "WebSocketClosed",
    "WebSocketError",
    "__version__",
    "wrap_openai",
]
