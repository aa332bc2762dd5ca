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

/// One of the `x-ratelimit-*` headers quotawatch sets, with the name the
/// upstream's own value of it is passed on under where the two differ.
pub struct RateLimitHeader {
    pub ours: HeaderName,
    pub upstreams: HeaderName,
}

const fn ratelimit_header(ours: &'static str, upstreams: &'static str) -> RateLimitHeader {
    RateLimitHeader {
        ours: HeaderName::from_static(ours),
        upstreams: HeaderName::from_static(upstreams),
    }
}

/// The `x-ratelimit-*` headers quotawatch sets, for requests and for
/// tokens (limit, remaining, reset). Their names are made once, here: a
/// name made on each call was checked against the standard ones each time,
/// on every proxied answer.
pub static RATELIMIT_HEADERS: [[RateLimitHeader; 3]; 2] = [
    [
        ratelimit_header(
            "x-ratelimit-limit-requests",
            "x-upstream-ratelimit-limit-requests",
        ),
        ratelimit_header(
            "x-ratelimit-remaining-requests",
            "x-upstream-ratelimit-remaining-requests",
        ),
        ratelimit_header(
            "x-ratelimit-reset-requests",
            "x-upstream-ratelimit-reset-requests",
        ),
    ],
    [
        ratelimit_header(
            "x-ratelimit-limit-tokens",
            "x-upstream-ratelimit-limit-tokens",
        ),
        ratelimit_header(
            "x-ratelimit-remaining-tokens",
            "x-upstream-ratelimit-remaining-tokens",
        ),
        ratelimit_header(
            "x-ratelimit-reset-tokens",
            "x-upstream-ratelimit-reset-tokens",
        ),
    ],
];

/// The values of [`RATELIMIT_HEADERS`] for a workspace's tightest request
/// and token limits, in OpenAI's format: none for a bucket without a limit.
pub struct RateLimitValues([Option<[HeaderValue; 3]>; 2]);

impl RateLimitValues {
    pub fn of(headroom: &Headroom, now: Timestamp) -> Self {
        let values = |limit: Option<LimitHeadroom>| {
            let limit = limit?;
            let reset = limit
                .resets_at
                .map_or(std::time::Duration::ZERO, |at| now.until(at));
            Some([
                HeaderValue::from(limit.max),
                HeaderValue::from(limit.remaining),
                // The text of a duration is always a valid header value.
                HeaderValue::try_from(format_duration(reset)).ok()?,
            ])
        };
        Self([values(headroom.requests), values(headroom.tokens)])
    }

    /// Each header with its value.
    pub fn into_headers(self) -> impl Iterator<Item = (&'static RateLimitHeader, HeaderValue)> {
        RATELIMIT_HEADERS
            .iter()
            .zip(self.0)
            .filter_map(|(headers, values)| Some(headers.iter().zip(values?)))
            .flatten()
    }
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the
/// workspace's tightest request and token limits, in OpenAI's format.
pub fn ratelimit_headers(headroom: &Headroom, now: Timestamp) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(6);
    for (header, value) in RateLimitValues::of(headroom, now).into_headers() {
        headers.insert(header.ours.clone(), value);
    }
    headers
}

fn when(at: Option<Timestamp>, now: Timestamp) -> String {
    at.map_or_else(|| "at an unknown time".to_owned(), |at| in_time(at, now))
}

/// When a calendar limit resets, as the workspace's people read a clock: "at
/// 00:00 Europe/Berlin (in 5h 12m)", with the date when that is not within
/// a day.
fn local_reset(refusal: &Refusal, now: Timestamp) -> String {
    let Some(at) = refusal.retry_at else {
        return when(None, now);
    };
    let local = at.to_utc().with_timezone(&refusal.timezone);
    let date = if now.until(at) < RETRY_AFTER_AT_MOST {
        String::new()
    } else {
        local.format(" on %-d %B %Y").to_string()
    };
    format!(
        "at {} {}{date} (in {})",
        local.format("%H:%M"),
        refusal.timezone.name(),
        humanize_duration(now.until(at))
    )
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

/// The error code of a used-up scoped budget of `kind`
/// (`model_budget_exceeded`).
fn scope_budget_codes(kind: ScopeKind) -> &'static str {
    static CODES: LazyLock<[String; ScopeKind::COUNT]> =
        LazyLock::new(|| ScopeKind::ALL.map(ScopeKind::budget_code));
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
        // A scoped budget, as a workspace's, in its own words and its
        // kind's budget code.
        (RefusalCause::Limit(kind), Some((scope, described)))
            if kind.metric.unit() == Unit::Dollars && kind.window.period().is_some() =>
        {
            let (used, max, _) = figures(kind);
            let period = kind.window.period().map_or("", Period::this);
            (
                kind.metric.name(),
                scope_budget_codes(scope.kind),
                format!(
                    "{used} of {max} used {period} for {described} ({kind} in workspace {workspace}, enforced by quotawatch); resets {}. Retrying earlier cannot succeed.",
                    local_reset(refusal, now)
                ),
            )
        }
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
                        local_reset(refusal, now)
                    ),
                ),
                Some(period) => (
                    kind.metric.name(),
                    limit_exceeded_code(period),
                    format!(
                        "Workspace {workspace} used up its {kind} quota ({used} of {max}{unit} {}, enforced by quotawatch). It resets {}; retrying earlier cannot succeed.",
                        period.this(),
                        local_reset(refusal, now)
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
    // A budget's wait of a day or more is no retry a client should
    // schedule: the message says when the budget resets, and
    // `x-should-retry` stops the SDKs from trying before. Other limits keep
    // stating theirs, which clients already read.
    let budget = matches!(
        refusal.cause,
        RefusalCause::Limit(kind) if kind.metric.unit() == Unit::Dollars
    );
    if let Some(retry_at) = refusal
        .retry_at
        .filter(|at| !budget || now.until(*at) < RETRY_AFTER_AT_MOST)
    {
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

/// The longest wait a budget refusal's `retry-after` states.
const RETRY_AFTER_AT_MOST: std::time::Duration = std::time::Duration::from_secs(86_400);

#[cfg(test)]
mod tests {
    use super::*;

    fn used_up(kind: LimitKind, resets_in_hours: u64, now: Timestamp) -> ApiError {
        used_up_in(kind, None, resets_in_hours, now)
    }

    /// A refusal by `kind`, of the scoped limit `scope` described so when
    /// given, else the workspace's.
    fn used_up_in(
        kind: LimitKind,
        scope: Option<(ScopeKind, &str)>,
        resets_in_hours: u64,
        now: Timestamp,
    ) -> ApiError {
        let refusal = Refusal {
            cause: RefusalCause::Limit(kind),
            used: 49_980_000_000,
            max: 50_000_000_000,
            retry_at: Some(now.plus(std::time::Duration::from_secs(3600 * resets_in_hours))),
            retryable: false,
            timezone: chrono_tz::Europe::Berlin,
            scope: scope.map(|(kind, _)| crate::domain::scope::RefusedScope { kind, rule: 0 }),
        };
        let workspace: WorkspaceId = "acme".parse().expect("id");
        let probe = std::time::Duration::from_secs(60);
        let described = scope.map(|(_, described)| described);
        refusal_error(
            &workspace,
            &refusal,
            described,
            &Headroom::default(),
            now,
            probe,
        )
    }

    #[test]
    fn a_scoped_budget_refusal_names_its_scope_and_the_numbers() {
        use crate::domain::limits::{USD_PER_DAY, USD_PER_MINUTE};
        let now = Timestamp::from_millis(1_796_238_000_000);
        let model = used_up_in(
            USD_PER_DAY,
            Some((ScopeKind::Model, "models gpt-4o")),
            4,
            now,
        );
        assert_eq!(model.code, "model_budget_exceeded");
        assert!(
            model.message.starts_with(
                "$49.98 of $50.00 used today for models gpt-4o (usd_per_day in workspace acme"
            ) && model
                .message
                .contains("resets at 00:00 Europe/Berlin (in 4h 0m)"),
            "{}",
            model.message
        );
        assert_eq!(
            model.headers.get("x-should-retry").map(|v| v.to_str().ok()),
            Some(Some("false"))
        );
        assert!(model.headers.get("retry-after").is_some());
        let user = used_up_in(
            USD_PER_DAY,
            Some((ScopeKind::User, "end user \"alice\"")),
            4,
            now,
        );
        assert_eq!(user.code, "user_budget_exceeded");
        assert!(user.message.contains("for end user \"alice\""));
        // Dollars over the minute are a rate, not a budget.
        let rate = used_up_in(
            USD_PER_MINUTE,
            Some((ScopeKind::Model, "models o3*")),
            0,
            now,
        );
        assert_eq!(rate.code, "model_limit_exceeded");
    }

    #[test]
    fn a_budget_refusal_says_what_was_spent_and_when_it_resets_in_local_time() {
        use crate::domain::limits::{USD_PER_DAY, USD_PER_MONTH};
        // 2026-12-02 19:00 UTC is 20:00 in Berlin; the day resets in 4 hours.
        let now = Timestamp::from_millis(1_796_238_000_000);
        let day = used_up(USD_PER_DAY, 4, now);
        assert_eq!(day.code, BUDGET_EXCEEDED);
        let message = &day.message;
        assert!(
            message.contains("$49.98 of $50.00 used today")
                && message.contains("resets at 00:00 Europe/Berlin (in 4h 0m)"),
            "{message}"
        );
        assert_eq!(
            day.headers.get("retry-after").map(|v| v.to_str().ok()),
            Some(Some("14400"))
        );
        assert_eq!(
            day.headers.get("x-should-retry").map(|v| v.to_str().ok()),
            Some(Some("false"))
        );
        // A month that resets in 29 days says its date, and no retry-after:
        // nobody should schedule a retry a month away.
        let month = used_up(USD_PER_MONTH, 29 * 24 + 4, now);
        assert!(
            month
                .message
                .contains("resets at 00:00 Europe/Berlin on 1 January 2027"),
            "{}",
            month.message
        );
        assert!(month.headers.get("retry-after").is_none());
        assert!(month.headers.get("x-should-retry").is_some());
    }

    #[test]
    fn a_calendar_limit_code_is_named_after_its_period() {
        assert_eq!(limit_exceeded_code(Period::Day), "daily_limit_exceeded");
        assert_eq!(limit_exceeded_code(Period::Month), "monthly_limit_exceeded");
    }
}
