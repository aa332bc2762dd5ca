//! How a refusal looks on the wire: HTTP 429 in OpenAI's error shape, with
//! the headers the official SDKs act on. `retry-after`/`retry-after-ms` say
//! when to come back; `x-should-retry: false` stops the SDKs from retrying
//! what no short wait can fix. The proxy answers with the same responses.

use std::sync::LazyLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::error::ApiError;
use crate::domain::limits::{LimitKind, Period, Unit, WorkspaceId};
use crate::domain::scope::ScopeKind;
use crate::domain::time::{Timestamp, format_duration, humanize_duration, in_time};
use crate::domain::workspace::{Headroom, LimitHeadroom, Refusal, RefusalCause};

fn insert(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the
/// workspace's tightest request and token limits, in OpenAI's format.
pub fn ratelimit_headers(headroom: &Headroom, now: Timestamp) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut add = |names: [&'static str; 3], limit: Option<LimitHeadroom>| {
        if let Some(limit) = limit {
            let reset = limit
                .resets_at
                .map_or(std::time::Duration::ZERO, |at| now.until(at));
            insert(&mut headers, names[0], limit.max.to_string());
            insert(&mut headers, names[1], limit.remaining.to_string());
            insert(&mut headers, names[2], format_duration(reset));
        }
    };
    add(
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        headroom.requests,
    );
    add(
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
        headroom.tokens,
    );
    headers
}

fn when(at: Option<Timestamp>, now: Timestamp) -> String {
    at.map_or_else(|| "at an unknown time".to_owned(), |at| in_time(at, now))
}

/// The error code of a used-up calendar limit, named from the period's
/// adjective ("daily_limit_exceeded"), so that a new period brings its code
/// with it.
fn limit_exceeded_code(period: Period) -> &'static str {
    static CODES: LazyLock<[String; Period::ALL.len()]> = LazyLock::new(|| {
        Period::ALL.map(|period| format!("{}_limit_exceeded", period.adjective()))
    });
    &CODES[period.index()]
}

/// The error code of a refusal by a scoped limit of `kind`
/// (`user_limit_exceeded`), named from the kind, whatever its window.
fn scope_codes(kind: ScopeKind) -> &'static str {
    static CODES: LazyLock<[String; ScopeKind::COUNT]> =
        LazyLock::new(|| ScopeKind::ALL.map(ScopeKind::code));
    &CODES[kind.index()]
}

/// The error code of a used-up calendar usd limit: a budget.
const BUDGET_EXCEEDED: &str = "workspace_budget_exceeded";

/// The 429 for a refused request, naming the workspace, the limit and when it
/// frees.
pub fn refusal_error(
    workspace: &WorkspaceId,
    refusal: &Refusal,
    refused_scope: Option<&str>,
    headroom: &Headroom,
    now: Timestamp,
    probe_interval: std::time::Duration,
) -> ApiError {
    let figures = |kind: LimitKind| {
        (
            kind.metric.figure(refusal.used),
            kind.metric.figure(refusal.max),
            kind.metric.unit_suffix(),
        )
    };
    let (error_type, code, message) = match (refusal.cause, refusal.scope.zip(refused_scope)) {
        // A scoped limit is refused in its kind's code, naming what it
        // limits, with the same figures and retry as a workspace's.
        (RefusalCause::Limit(kind), Some((scope, described))) => {
            let (used, max, unit) = figures(kind);
            let counted = match kind.window.period() {
                None => "in the last 60 seconds".to_owned(),
                Some(period) => period.this().to_owned(),
            };
            let retry = if refusal.retryable {
                format!("Room frees up {}; retry then.", when(refusal.retry_at, now))
            } else {
                format!(
                    "It resets {}; retrying earlier cannot succeed.",
                    when(refusal.retry_at, now)
                )
            };
            (
                kind.metric.name(),
                scope_codes(scope.kind),
                format!(
                    "The {kind} limit for {described} in workspace {workspace} is used up ({used} of {max}{unit} {counted}, enforced by quotawatch). {retry}"
                ),
            )
        }
        (RefusalCause::TooLarge(kind), Some((_, described))) => {
            let (_, max, unit) = figures(kind);
            (
                kind.metric.name(),
                "request_too_large",
                format!(
                    "This request needs more {} than the whole {kind} limit of {max}{unit} for {described} in workspace {workspace}, so it can never be admitted; reduce the prompt or max_tokens.",
                    kind.metric.name()
                ),
            )
        }
        (RefusalCause::Limit(kind), None) => {
            let (used, max, unit) = figures(kind);
            match kind.window.period() {
                None => (
                    kind.metric.name(),
                    "rate_limit_exceeded",
                    format!(
                        "Workspace {workspace} reached its {kind} limit ({used} of {max}{unit} in the last 60 seconds, enforced by quotawatch). Room frees up {}; retry then.",
                        when(refusal.retry_at, now)
                    ),
                ),
                // A budget is refused in its own words: what was spent of
                // it, and when it starts again.
                Some(period) if kind.metric.unit() == Unit::Dollars => (
                    kind.metric.name(),
                    BUDGET_EXCEEDED,
                    format!(
                        "Workspace {workspace} used up its {kind} budget: {used} of {max} used {}, enforced by quotawatch. It resets {}; retrying earlier cannot succeed.",
                        period.this(),
                        when(refusal.retry_at, now)
                    ),
                ),
                Some(period) => (
                    kind.metric.name(),
                    limit_exceeded_code(period),
                    format!(
                        "Workspace {workspace} used up its {kind} quota ({used} of {max}{unit} {}, enforced by quotawatch). It resets {}; retrying earlier cannot succeed.",
                        period.this(),
                        when(refusal.retry_at, now)
                    ),
                ),
            }
        }
        (RefusalCause::TooLarge(kind), None) => {
            let (_, max, unit) = figures(kind);
            (
                kind.metric.name(),
                "request_too_large",
                format!(
                    "This request needs more {} than workspace {workspace}'s whole {kind} limit of {max}{unit}, so it can never be admitted; reduce the prompt or max_tokens.",
                    kind.metric.name()
                ),
            )
        }
        (RefusalCause::UpstreamRateLimited, _) => (
            "requests",
            "upstream_rate_limited",
            format!(
                "OpenAI rate-limited workspace {workspace}; quotawatch holds its requests until the upstream limit frees, {}.",
                when(refusal.retry_at, now)
            ),
        ),
        (RefusalCause::UpstreamQuota(billing), _) => (
            "insufficient_quota",
            billing.code(),
            format!(
                "OpenAI reported {} for workspace {workspace}: its requests are refused until billing is fixed (quotawatch lets one probe request through every {}). See GET /api/quota/notifications for what to do.",
                billing.code(),
                humanize_duration(probe_interval)
            ),
        ),
    };
    let mut error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, error_type, code, message);
    error.headers = ratelimit_headers(headroom, now);
    if let Some(retry_at) = refusal.retry_at {
        let wait = now.until(retry_at);
        let seconds = wait.as_millis().div_ceil(1000).max(1);
        insert(&mut error.headers, "retry-after", seconds.to_string());
        insert(
            &mut error.headers,
            "retry-after-ms",
            wait.as_millis().max(1).to_string(),
        );
    }
    if !refusal.retryable {
        insert(&mut error.headers, "x-should-retry", "false".to_owned());
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calendar_limit_code_is_named_after_its_period() {
        assert_eq!(limit_exceeded_code(Period::Day), "daily_limit_exceeded");
        assert_eq!(limit_exceeded_code(Period::Month), "monthly_limit_exceeded");
    }
}
