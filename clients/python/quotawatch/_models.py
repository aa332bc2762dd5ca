"""Typed documents of the quotawatch API, read from its JSON.

Every document keeps the JSON it was read from in ``raw``, so that fields a
newer server adds are not lost to older clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional, Union


def parse_time(text: Optional[str]) -> Optional[datetime]:
    """An RFC 3339 timestamp as quotawatch writes it (``...T09:12:03.120Z``)."""
    if text is None:
        return None
    # Python before 3.11 does not read a trailing "Z".
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


@dataclass(frozen=True)
class LimitForecast:
    """When a limit runs out at the rate it is being used now."""

    #: When the limit is used up at the recent rate; None when it does not
    #: run out before it resets; the present once it is used up.
    exhausts_at: Optional[datetime]
    #: The recent rate, in the limit's unit (requests, tokens, dollars) per hour.
    rate_per_hour: float
    #: What the rate rests on: ``recent_seconds``, ``smoothed``,
    #: ``period_average`` or ``used_up``.
    basis: str

    @classmethod
    def from_json(cls, doc: Optional[Dict[str, Any]]) -> Optional["LimitForecast"]:
        if doc is None:
            return None
        return cls(
            exhausts_at=parse_time(doc.get("exhausts_at")),
            rate_per_hour=doc["rate_per_hour"],
            basis=doc["basis"],
        )


@dataclass(frozen=True)
class LimitState:
    """One configured limit of a workspace: counts of requests or tokens,
    or dollars for a ``usd`` limit (a budget)."""

    limit: Union[int, float]
    used: Union[int, float]
    remaining: Union[int, float]
    utilization: float
    resets_at: Optional[datetime]
    #: When it runs out at the recent rate (the workspace's own limits;
    #: scoped limits have none).
    forecast: Optional[LimitForecast] = None

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "LimitState":
        return cls(
            limit=doc["limit"],
            used=doc["used"],
            remaining=doc["remaining"],
            utilization=doc["utilization"],
            resets_at=parse_time(doc.get("resets_at")),
            forecast=LimitForecast.from_json(doc.get("forecast")),
        )


@dataclass(frozen=True)
class Counts:
    requests: int
    tokens: int
    #: Dollars spent; 0 from a server older than budgets, which does not count it.
    usd: float = 0.0

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "Counts":
        return cls(requests=doc["requests"], tokens=doc["tokens"], usd=doc.get("usd", 0.0))


@dataclass(frozen=True)
class UsageCounts:
    """What was used over the sliding minute, today and this month (in the
    workspace's timezone), limits or not."""

    last_minute: Counts
    today: Counts
    #: None from a server older than month limits, which does not count it.
    this_month: Optional[Counts]

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "UsageCounts":
        this_month = doc.get("this_month")
        return cls(
            last_minute=Counts.from_json(doc["last_minute"]),
            today=Counts.from_json(doc["today"]),
            this_month=None if this_month is None else Counts.from_json(this_month),
        )


@dataclass(frozen=True)
class UpstreamBucket:
    """OpenAI's own headroom, from its last ``x-ratelimit-*`` headers."""

    limit: Optional[int]
    remaining: Optional[int]
    resets_at: Optional[datetime]
    observed_at: Optional[datetime]

    @classmethod
    def from_json(cls, doc: Optional[Dict[str, Any]]) -> Optional["UpstreamBucket"]:
        if doc is None:
            return None
        return cls(
            limit=doc.get("limit"),
            remaining=doc.get("remaining"),
            resets_at=parse_time(doc.get("resets_at")),
            observed_at=parse_time(doc.get("observed_at")),
        )


@dataclass(frozen=True)
class BillingBlock:
    """OpenAI reported the billing quota exhausted; one probe is let through
    at ``next_probe_at``."""

    code: str
    since: Optional[datetime]
    next_probe_at: Optional[datetime]
    #: The upstream credential blocked for every workspace billed to it (a
    #: fingerprint, never the key); ``None`` for the workspace's own block.
    credential: Optional[str] = None

    @classmethod
    def from_json(cls, doc: Optional[Dict[str, Any]]) -> Optional["BillingBlock"]:
        if doc is None:
            return None
        return cls(
            code=doc["code"],
            since=parse_time(doc.get("since")),
            next_probe_at=parse_time(doc.get("next_probe_at")),
            credential=doc.get("credential"),
        )


@dataclass(frozen=True)
class ErrorSummary:
    """Upstream errors and local refusals over the last ``window_seconds``."""

    window_seconds: int
    rate_limited: int
    insufficient_quota: int
    server_error: int
    other: int
    refused: int
    last: Optional[Dict[str, Any]]

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "ErrorSummary":
        return cls(
            window_seconds=doc["window_seconds"],
            rate_limited=doc["rate_limited"],
            insufficient_quota=doc["insufficient_quota"],
            server_error=doc["server_error"],
            other=doc["other"],
            refused=doc["refused"],
            last=doc.get("last"),
        )


@dataclass(frozen=True)
class Status:
    """Where a workspace stands (``GET /api/quota/status``)."""

    workspace: str
    name: str
    #: ``normal``, ``warning``, ``rate_limited`` or ``quota_exceeded``.
    status: str
    since: Optional[datetime]
    reasons: List[str]
    degraded: bool
    blocked: bool
    retry_after_seconds: Optional[float]
    #: One entry per configured limit, named ``{metric}_per_{window}``, e.g.
    #: ``requests_per_day`` or ``tokens_per_month``.
    limits: Dict[str, LimitState]
    usage: UsageCounts
    upstream_requests: Optional[UpstreamBucket]
    upstream_tokens: Optional[UpstreamBucket]
    billing_block: Optional[BillingBlock]
    errors: ErrorSummary
    updated_at: Optional[datetime]
    #: Models called that the prices do not know, charged at the unpriced rates.
    unpriced_models: List[str]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "Status":
        upstream = doc.get("upstream") or {}
        return cls(
            workspace=doc["workspace"],
            name=doc["name"],
            status=doc["status"],
            since=parse_time(doc.get("since")),
            reasons=list(doc.get("reasons", [])),
            degraded=doc.get("degraded", False),
            blocked=doc["blocked"],
            retry_after_seconds=doc.get("retry_after_seconds"),
            limits={name: LimitState.from_json(limit) for name, limit in doc["limits"].items()},
            usage=UsageCounts.from_json(doc["usage"]),
            upstream_requests=UpstreamBucket.from_json(upstream.get("requests")),
            upstream_tokens=UpstreamBucket.from_json(upstream.get("tokens")),
            billing_block=BillingBlock.from_json(doc.get("billing_block")),
            errors=ErrorSummary.from_json(doc["errors"]),
            updated_at=parse_time(doc.get("updated_at")),
            unpriced_models=list(doc.get("unpriced_models", [])),
            raw=doc,
        )


@dataclass(frozen=True)
class TenantText:
    """What a tenant's own users may be shown: no internal details."""

    title: str
    message: str
    suggested_actions: List[str]

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "TenantText":
        return cls(
            title=doc["title"],
            message=doc["message"],
            suggested_actions=list(doc.get("suggested_actions", [])),
        )


@dataclass(frozen=True)
class ThresholdCrossing:
    """A day or month limit's usage crossing one of its alert thresholds."""

    #: The threshold, a percentage of the limit.
    percent: int
    #: What the period had used when it was crossed, and the limit then
    #: (dollars for a ``usd`` limit).
    used: Union[int, float]
    limit: Union[int, float]
    #: ``day`` or ``month``: the period it is announced once in.
    window: str
    period_start: Optional[datetime]
    period_end: Optional[datetime]

    @classmethod
    def from_json(cls, doc: Optional[Dict[str, Any]]) -> Optional["ThresholdCrossing"]:
        if doc is None:
            return None
        return cls(
            percent=doc["percent"],
            used=doc["used"],
            limit=doc["limit"],
            window=doc["window"],
            period_start=parse_time(doc.get("period_start")),
            period_end=parse_time(doc.get("period_end")),
        )


@dataclass(frozen=True)
class Notification:
    id: str
    #: None for service-wide notifications.
    workspace: Optional[str]
    #: ``info``, ``warning`` or ``critical``.
    severity: str
    kind: str
    #: The operator's text: what happened in full, and what to change where.
    title: str
    message: str
    suggested_actions: List[str]
    tenant: TenantText
    limit: Optional[str]
    created_at: Optional[datetime]
    resolves_at: Optional[datetime]
    #: None while the notification is active.
    resolved_at: Optional[datetime]
    raw: Dict[str, Any] = field(repr=False, compare=False)
    #: Of a ``threshold_crossed`` notification: the threshold and the numbers.
    threshold: Optional[ThresholdCrossing] = None

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "Notification":
        return cls(
            id=doc["id"],
            workspace=doc.get("workspace"),
            severity=doc["severity"],
            kind=doc["kind"],
            title=doc["title"],
            message=doc["message"],
            suggested_actions=list(doc.get("suggested_actions", [])),
            tenant=TenantText.from_json(doc["tenant"]),
            limit=doc.get("limit"),
            created_at=parse_time(doc.get("created_at")),
            resolves_at=parse_time(doc.get("resolves_at")),
            resolved_at=parse_time(doc.get("resolved_at")),
            raw=doc,
            threshold=ThresholdCrossing.from_json(doc.get("threshold")),
        )


@dataclass(frozen=True)
class Notifications:
    """A workspace's notifications (``GET /api/quota/notifications``)."""

    workspace: str
    status: str
    #: Active ones, most severe first; with ``history=True`` resolved ones
    #: follow, newest first.
    notifications: List[Notification]

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "Notifications":
        return cls(
            workspace=doc["workspace"],
            status=doc["status"],
            notifications=[Notification.from_json(n) for n in doc["notifications"]],
        )


@dataclass(frozen=True)
class Check:
    """An admitted pre-flight check (``POST /api/quota/check``)."""

    #: Pass to ``usage()`` to settle the estimate.
    reservation_id: str
    #: When an unsettled reservation becomes final with its estimate.
    expires_at: Optional[datetime]
    #: True for the one probe let through a billing block: report its outcome
    #: so that the block can lift.
    probe: bool
    #: What is left of each configured limit after this call.
    remaining: Dict[str, int]

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "Check":
        return cls(
            reservation_id=doc["reservation_id"],
            expires_at=parse_time(doc.get("expires_at")),
            probe=doc.get("probe", False),
            remaining=dict(doc.get("remaining", {})),
        )


@dataclass(frozen=True)
class Event:
    """A live update from the WebSocket.

    ``type`` is ``status`` (on connect, on every status change, reset or
    settings change; ``resync`` is true when sent because the client fell
    behind), ``usage`` (usage moved; ``status`` carries the document),
    ``notification`` (``action`` is ``raised`` or ``resolved`` with
    ``notification`` set, or ``snapshot`` after every (re)connect with
    ``notifications`` listing the active ones) or ``removed`` (the workspace
    was deleted).
    """

    type: str
    workspace: Optional[str]
    status: Optional[Status] = None
    notification: Optional[Notification] = None
    notifications: Optional[List[Notification]] = None
    action: Optional[str] = None
    resync: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_message(cls, message: Dict[str, Any]) -> Optional["Event"]:
        """The event a server message stands for; None for messages that
        only keep the connection alive (``pong``, ``subscribed``) or that
        this client does not know."""
        kind = message.get("type")
        workspace = message.get("workspace")
        if kind in ("status", "usage"):
            return cls(
                type=kind,
                workspace=workspace,
                status=Status.from_json(message["data"]),
                resync=bool(message.get("resync", False)),
                raw=message,
            )
        if kind == "notification":
            return cls(
                type=kind,
                workspace=workspace,
                notification=Notification.from_json(message["data"]),
                action=message.get("event"),
                raw=message,
            )
        if kind == "removed":
            return cls(type=kind, workspace=workspace, raw=message)
        return None

    @classmethod
    def snapshot(cls, notifications: Notifications) -> "Event":
        """The active notifications fetched after a (re)connect."""
        return cls(
            type="notification",
            workspace=notifications.workspace,
            notifications=notifications.notifications,
            action="snapshot",
        )
