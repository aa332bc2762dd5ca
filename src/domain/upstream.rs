//! What OpenAI's answers mean: classification of upstream errors into the
//! cases quotawatch treats differently, and the `x-ratelimit-*` headers that
//! describe the upstream's own buckets. Callers hand in already-extracted
//! values (status, error type and code, header pairs); no wire parsing here.

use std::ops::AddAssign;
use std::time::Duration;

use super::time::{Timestamp, parse_duration};
use super::window::Tally;

/// How long to hold back after an upstream rate limit that named no time.
pub const DEFAULT_UPSTREAM_BACKOFF: Duration = Duration::from_secs(5);

/// The longest hold an upstream's rate limit can impose: a day (OpenAI's
/// longest window). A larger `retry-after` is a broken header, and must not
/// block a workspace for years.
pub const MAX_UPSTREAM_BACKOFF: Duration = Duration::from_secs(86_400);

/// The billing codes OpenAI sends with `type: insufficient_quota`. Waiting
/// never clears any of them; someone has to change billing settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BillingCode {
    InsufficientQuota,
    CreditBalanceExhausted,
    OrganizationSpendLimitExceeded,
    ProjectSpendLimitExceeded,
    OrganizationUsageLimitExceeded,
}

impl BillingCode {
    pub const ALL: [BillingCode; 5] = [
        BillingCode::InsufficientQuota,
        BillingCode::CreditBalanceExhausted,
        BillingCode::OrganizationSpendLimitExceeded,
        BillingCode::ProjectSpendLimitExceeded,
        BillingCode::OrganizationUsageLimitExceeded,
    ];

    pub const fn code(self) -> &'static str {
        match self {
            BillingCode::InsufficientQuota => "insufficient_quota",
            BillingCode::CreditBalanceExhausted => "credit_balance_exhausted",
            BillingCode::OrganizationSpendLimitExceeded => "organization_spend_limit_exceeded",
            BillingCode::ProjectSpendLimitExceeded => "project_spend_limit_exceeded",
            BillingCode::OrganizationUsageLimitExceeded => "organization_usage_limit_exceeded",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|billing| billing.code() == code)
    }
}

/// The error fields of an upstream answer, as far as they were present.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorFields<'a> {
    pub error_type: Option<&'a str>,
    pub code: Option<&'a str>,
    pub message: Option<&'a str>,
}

/// What an upstream answer means for the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamClass {
    Success,
    /// A transient rate limit: wait, then retry.
    RateLimited,
    /// The request alone exceeds a whole upstream limit: it must shrink, and
    /// nothing else is affected.
    RequestTooLarge,
    /// Billing blocks every request until someone changes billing settings.
    QuotaExhausted(BillingCode),
    /// 5xx, timeouts and unreachable upstreams.
    ServerError,
    /// The upstream rejected quotawatch's API key.
    KeyRejected,
    /// Any other 4xx: the request itself was wrong; not a workspace problem.
    ClientError,
}

/// Classifies an upstream answer. `status` 0 stands for "no answer" (the
/// upstream was unreachable or timed out).
pub fn classify(status: u16, error: ErrorFields<'_>) -> UpstreamClass {
    let billing = error.code.and_then(BillingCode::from_code).or(
        // Older answers carry `type: insufficient_quota` with a null code.
        (error.error_type == Some("insufficient_quota")).then_some(BillingCode::InsufficientQuota),
    );
    match status {
        200..=399 => UpstreamClass::Success,
        429 => match billing {
            Some(code) => UpstreamClass::QuotaExhausted(code),
            None if error
                .message
                .is_some_and(|m| m.starts_with("Request too large")) =>
            {
                UpstreamClass::RequestTooLarge
            }
            None => UpstreamClass::RateLimited,
        },
        401 => UpstreamClass::KeyRejected,
        // Billing codes have also been seen on other statuses; they still mean billing.
        400..=499 => billing.map_or(UpstreamClass::ClientError, UpstreamClass::QuotaExhausted),
        _ => UpstreamClass::ServerError,
    }
}

/// One of the upstream's buckets as its headers described it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BucketHeaders {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub reset: Option<Duration>,
}

impl BucketHeaders {
    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// The `x-ratelimit-*`, `retry-after` and `retry-after-ms` headers of one
/// upstream answer. Absent or unparsable values are `None`, never an error.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RateLimitHeaders {
    pub requests: BucketHeaders,
    pub tokens: BucketHeaders,
    pub retry_after: Option<Duration>,
}

impl RateLimitHeaders {
    /// Reads the headers from `(name, value)` pairs; names are matched
    /// case-insensitively.
    pub fn parse<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut parsed = Self::default();
        let mut retry_after_ms = None;
        for (name, value) in headers {
            // Every header of every answer passes here: skip the unrelated
            // ones without looking further.
            let prefix = name.as_bytes().get(..11).unwrap_or_default();
            let relevant = prefix.eq_ignore_ascii_case(b"x-ratelimit")
                || prefix.eq_ignore_ascii_case(b"retry-after");
            if !relevant {
                continue;
            }
            let name = name.to_ascii_lowercase();
            let value = value.trim();
            let count = || {
                value
                    .parse::<i64>()
                    .ok()
                    .and_then(|n| u64::try_from(n).ok())
            };
            match name.as_str() {
                "x-ratelimit-limit-requests" => parsed.requests.limit = count(),
                "x-ratelimit-remaining-requests" => parsed.requests.remaining = count(),
                "x-ratelimit-reset-requests" => parsed.requests.reset = parse_duration(value),
                "x-ratelimit-limit-tokens" => parsed.tokens.limit = count(),
                "x-ratelimit-remaining-tokens" => parsed.tokens.remaining = count(),
                "x-ratelimit-reset-tokens" => parsed.tokens.reset = parse_duration(value),
                "retry-after" => parsed.retry_after = parse_duration(value),
                "retry-after-ms" => {
                    retry_after_ms = value
                        .parse::<f64>()
                        .ok()
                        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok());
                }
                _ => {}
            }
        }
        // The SDKs prefer the millisecond header when both are present; so do we.
        parsed.retry_after = retry_after_ms.or(parsed.retry_after);
        parsed
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.tokens.is_empty() && self.retry_after.is_none()
    }

    /// How long a transient upstream rate limit lasts: the explicit
    /// `retry-after`, else the reset of whichever bucket is empty, else the
    /// longest reset given, else a short default.
    pub fn backoff(&self) -> Duration {
        let empty_bucket_reset = [self.requests, self.tokens]
            .into_iter()
            .filter(|bucket| bucket.remaining == Some(0))
            .filter_map(|bucket| bucket.reset)
            .max();
        let any_reset = [self.requests.reset, self.tokens.reset]
            .into_iter()
            .flatten()
            .max();
        self.retry_after
            .or(empty_bucket_reset)
            .or(any_reset)
            .unwrap_or(DEFAULT_UPSTREAM_BACKOFF)
            .min(MAX_UPSTREAM_BACKOFF)
    }
}

/// The latest known state of one upstream bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpstreamBucket {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub resets_at: Option<Timestamp>,
    pub observed_at: Timestamp,
}

/// The upstream's own view of the workspace's headroom, as last reported.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpstreamView {
    pub requests: Option<UpstreamBucket>,
    pub tokens: Option<UpstreamBucket>,
}

impl UpstreamView {
    /// Folds in the headers of an answer observed at `now`; a bucket the
    /// answer says nothing about keeps its previous state.
    pub fn observe(&mut self, headers: &RateLimitHeaders, now: Timestamp) {
        let update = |slot: &mut Option<UpstreamBucket>, bucket: &BucketHeaders| {
            if !bucket.is_empty() {
                *slot = Some(UpstreamBucket {
                    limit: bucket.limit,
                    remaining: bucket.remaining,
                    resets_at: bucket.reset.map(|reset| now.plus(reset)),
                    observed_at: now,
                });
            }
        };
        update(&mut self.requests, &headers.requests);
        update(&mut self.tokens, &headers.tokens);
    }

    pub fn is_known(&self) -> bool {
        self.requests.is_some() || self.tokens.is_some()
    }
}

/// Upstream answers counted by class, per bucket of the error history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorTally {
    pub rate_limited: u64,
    pub insufficient_quota: u64,
    pub server_error: u64,
    pub other: u64,
    /// Requests quotawatch refused itself, without asking the upstream.
    pub refused: u64,
}

impl ErrorTally {
    pub fn of_class(class: UpstreamClass) -> Self {
        let mut tally = Self::default();
        match class {
            UpstreamClass::Success => {}
            UpstreamClass::RateLimited => tally.rate_limited = 1,
            UpstreamClass::QuotaExhausted(_) => tally.insufficient_quota = 1,
            UpstreamClass::ServerError => tally.server_error = 1,
            UpstreamClass::RequestTooLarge
            | UpstreamClass::KeyRejected
            | UpstreamClass::ClientError => tally.other = 1,
        }
        tally
    }

    pub fn refusal() -> Self {
        Self {
            refused: 1,
            ..Self::default()
        }
    }
}

impl AddAssign for ErrorTally {
    fn add_assign(&mut self, other: Self) {
        self.rate_limited += other.rate_limited;
        self.insufficient_quota += other.insufficient_quota;
        self.server_error += other.server_error;
        self.other += other.other;
        self.refused += other.refused;
    }
}

impl Tally for ErrorTally {
    fn saturating_sub(self, other: Self) -> Self {
        Self {
            rate_limited: self.rate_limited.saturating_sub(other.rate_limited),
            insufficient_quota: self
                .insufficient_quota
                .saturating_sub(other.insufficient_quota),
            server_error: self.server_error.saturating_sub(other.server_error),
            other: self.other.saturating_sub(other.other),
            refused: self.refused.saturating_sub(other.refused),
        }
    }
}

/// Answers from the upstream over the last minute, for the error-rate alarm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub total: u64,
    pub failed: u64,
}

impl AddAssign for Outcomes {
    fn add_assign(&mut self, other: Self) {
        self.total += other.total;
        self.failed += other.failed;
    }
}

impl Tally for Outcomes {
    fn saturating_sub(self, other: Self) -> Self {
        Self {
            total: self.total.saturating_sub(other.total),
            failed: self.failed.saturating_sub(other.failed),
        }
    }
}

/// The upstream is failing when more than 20 % of the last minute's answers
/// were server errors, and at least five were: a single failure among three
/// requests is noise, not an incident.
pub fn error_rate_alarming(outcomes: Outcomes) -> bool {
    outcomes.failed >= 5 && outcomes.failed * 5 > outcomes.total
}

/// The most recent upstream error, for the status document.
#[derive(Clone, Debug, PartialEq)]
pub struct LastError {
    pub at: Timestamp,
    pub status_code: u16,
    pub error_type: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_error(name: &str) -> (Option<String>, Option<String>, Option<String>) {
        let value: serde_json::Value =
            serde_json::from_slice(&crate::domain::openai_fixture(name)).expect("fixture is JSON");
        let field = |key: &str| value["error"][key].as_str().map(str::to_owned);
        (field("type"), field("code"), field("message"))
    }

    fn classify_fixture(status: u16, name: &str) -> UpstreamClass {
        let (error_type, code, message) = fixture_error(name);
        classify(
            status,
            ErrorFields {
                error_type: error_type.as_deref(),
                code: code.as_deref(),
                message: message.as_deref(),
            },
        )
    }

    #[test]
    fn classifies_every_fixture() {
        use UpstreamClass::*;
        let cases = [
            (429, "error_429_rate_limit_requests.json", RateLimited),
            (
                429,
                "error_429_rate_limit_requests_per_day.json",
                RateLimited,
            ),
            (429, "error_429_rate_limit_tokens.json", RateLimited),
            (429, "error_429_slow_down.json", RateLimited),
            (429, "azure_error_429.json", RateLimited),
            (429, "error_429_request_too_large.json", RequestTooLarge),
            (
                429,
                "error_429_insufficient_quota.json",
                QuotaExhausted(BillingCode::InsufficientQuota),
            ),
            (
                429,
                "error_429_insufficient_quota_legacy_null_code.json",
                QuotaExhausted(BillingCode::InsufficientQuota),
            ),
            (
                429,
                "error_429_credit_balance_exhausted.json",
                QuotaExhausted(BillingCode::CreditBalanceExhausted),
            ),
            (
                429,
                "error_429_organization_spend_limit_exceeded.json",
                QuotaExhausted(BillingCode::OrganizationSpendLimitExceeded),
            ),
            (
                429,
                "error_429_project_spend_limit_exceeded.json",
                QuotaExhausted(BillingCode::ProjectSpendLimitExceeded),
            ),
            (500, "error_500_server_error.json", ServerError),
            (503, "error_503_server_is_overloaded.json", ServerError),
            (503, "error_503_legacy_overloaded.json", ServerError),
            (401, "error_401_invalid_api_key.json", KeyRejected),
            (400, "error_400_context_length_exceeded.json", ClientError),
        ];
        for (status, name, expected) in cases {
            assert_eq!(classify_fixture(status, name), expected, "{name}");
        }
        assert_eq!(classify(200, ErrorFields::default()), Success);
        assert_eq!(classify(0, ErrorFields::default()), ServerError);
    }

    fn header_fixture(name: &str) -> RateLimitHeaders {
        let text = String::from_utf8(crate::domain::openai_fixture(name)).expect("UTF-8");
        RateLimitHeaders::parse(
            text.lines()
                .skip(1)
                .filter_map(|line| line.split_once(": ")),
        )
    }

    #[test]
    fn parses_rate_limit_headers_of_a_success() {
        let headers = header_fixture("chat_completion.headers");
        assert_eq!(headers.requests.limit, Some(500));
        assert_eq!(headers.requests.remaining, Some(499));
        assert_eq!(headers.requests.reset, Some(Duration::from_millis(120)));
        assert_eq!(headers.tokens.limit, Some(30000));
        assert_eq!(headers.tokens.remaining, Some(28713));
        assert_eq!(headers.tokens.reset, Some(Duration::from_millis(2572)));
        assert_eq!(headers.retry_after, None);
    }

    #[test]
    fn backoff_prefers_retry_after_then_the_empty_bucket() {
        let headers = header_fixture("error_429_rate_limit_requests.headers");
        assert_eq!(headers.backoff(), Duration::from_secs(20));
        let headers = RateLimitHeaders::parse([
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "9.816s"),
            ("x-ratelimit-remaining-requests", "10"),
            ("x-ratelimit-reset-requests", "1m0s"),
        ]);
        assert_eq!(headers.backoff(), Duration::from_millis(9816));
        assert_eq!(
            RateLimitHeaders::default().backoff(),
            DEFAULT_UPSTREAM_BACKOFF
        );
        let azure = RateLimitHeaders::parse([("Retry-After", "10"), ("retry-after-ms", "10500")]);
        assert_eq!(azure.backoff(), Duration::from_millis(10500));
        let absurd = RateLimitHeaders::parse([("retry-after", "99999999999")]);
        assert_eq!(absurd.backoff(), MAX_UPSTREAM_BACKOFF);
        assert_eq!(
            RateLimitHeaders::parse([("retry-after-ms", "1e300")]).retry_after,
            None
        );
    }

    #[test]
    fn tolerates_absent_and_invalid_values() {
        let headers = RateLimitHeaders::parse([
            ("x-ratelimït-limit-requests", "5"),
            ("é", "1"),
            ("x-ratelimit-limit-requests", "lots"),
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-reset-requests", "soon"),
            ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ]);
        assert!(headers.is_empty());
    }

    #[test]
    fn the_view_keeps_buckets_an_answer_does_not_mention() {
        let mut view = UpstreamView::default();
        let now = Timestamp::from_millis(1_000_000);
        view.observe(&header_fixture("chat_completion.headers"), now);
        let later = Timestamp::from_millis(2_000_000);
        view.observe(
            &RateLimitHeaders::parse([("x-ratelimit-remaining-requests", "10")]),
            later,
        );
        let requests = view.requests.expect("requests known");
        assert_eq!(
            (requests.remaining, requests.observed_at),
            (Some(10), later)
        );
        let tokens = view.tokens.expect("tokens kept");
        assert_eq!(tokens.resets_at, Some(Timestamp::from_millis(1_002_572)));
    }

    #[test]
    fn error_rate_needs_both_share_and_count() {
        assert!(!error_rate_alarming(Outcomes {
            total: 4,
            failed: 4
        }));
        assert!(error_rate_alarming(Outcomes {
            total: 24,
            failed: 5
        }));
        assert!(!error_rate_alarming(Outcomes {
            total: 25,
            failed: 5
        }));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::domain::time::format_duration;

        const RELEVANT: &[&str] = &[
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
            "retry-after",
            "retry-after-ms",
        ];

        /// A header name as an upstream might spell it: one of ours in any
        /// case, or anything at all.
        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                (prop::sample::select(RELEVANT), any::<u64>()).prop_map(|(name, case)| {
                    name.chars()
                        .enumerate()
                        .map(|(i, c)| {
                            if case >> (i % 64) & 1 == 1 {
                                c.to_ascii_uppercase()
                            } else {
                                c
                            }
                        })
                        .collect()
                }),
                "\\PC{0,20}",
            ]
        }

        /// Values like OpenAI's, and values like nobody's.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|x| x.to_string()),
                "[0-9]{1,3}(h|m|s|ms|us|µs|ns|d)([0-9]{1,3}(\\.[0-9]{1,3})?(h|m|s|ms))?",
                "[0-9.hmsdnuµ -]{0,16}",
                "\\PC{0,16}",
            ]
        }

        fn reset_of(value: &str) -> Option<Duration> {
            RateLimitHeaders::parse([("x-ratelimit-reset-tokens", value)])
                .tokens
                .reset
        }

        /// Durations as OpenAI writes them, to the millisecond, up to a year.
        fn millis() -> impl Strategy<Value = u64> {
            prop_oneof![0..2_000u64, 0..365 * 86_400_000u64]
        }

        proptest! {
            #[test]
            fn any_headers_parse_without_panicking_and_bound_the_backoff(
                headers in prop::collection::vec((name(), value()), 0..12)
            ) {
                let parsed = RateLimitHeaders::parse(
                    headers.iter().map(|(name, value)| (name.as_str(), value.as_str())),
                );
                prop_assert!(parsed.backoff() <= MAX_UPSTREAM_BACKOFF);
                let mut view = UpstreamView::default();
                view.observe(&parsed, Timestamp::from_millis(1_000_000));
                prop_assert_eq!(view.is_known(), !(parsed.requests.is_empty() && parsed.tokens.is_empty()));
            }

            #[test]
            fn counts_round_trip_and_negatives_are_ignored(count in any::<i64>(), padded in any::<bool>()) {
                let text = if padded { format!(" {count} ") } else { count.to_string() };
                let parsed = RateLimitHeaders::parse([
                    ("x-ratelimit-limit-requests", text.as_str()),
                    ("X-RateLimit-Remaining-Tokens", text.as_str()),
                ]);
                let expected = u64::try_from(count).ok();
                prop_assert_eq!(parsed.requests.limit, expected);
                prop_assert_eq!(parsed.tokens.remaining, expected);
            }

            #[test]
            fn reset_durations_round_trip_through_openais_format(ms in millis()) {
                let duration = Duration::from_millis(ms);
                let text = format_duration(duration);
                let parsed = reset_of(&text).expect("our own format parses");
                // The format's seconds are decimal; parsing through f64 may
                // land a hair off, never a whole millisecond.
                let error = parsed.abs_diff(duration);
                prop_assert!(error < Duration::from_micros(1), "{} read as {:?}", text, parsed);
            }

            #[test]
            fn longer_resets_never_read_as_shorter(a in millis(), b in millis()) {
                let (short, long) = (a.min(b), a.max(b));
                let read = |ms: u64| reset_of(&format_duration(Duration::from_millis(ms)));
                prop_assert!(read(short) <= read(long));
                // Adding a unit never shortens a reset either.
                let text = format_duration(Duration::from_millis(short));
                let longer = format!("1h{text}");
                prop_assert!(reset_of(&longer) > reset_of(&text));
            }

            #[test]
            fn a_longer_retry_after_never_means_a_shorter_backoff(a in 0..200_000_000u64, b in 0..200_000_000u64) {
                let backoff = |ms: u64| {
                    let text = ms.to_string();
                    RateLimitHeaders::parse([("retry-after-ms", text.as_str()), ("retry-after", "1")]).backoff()
                };
                let (short, long) = (a.min(b), a.max(b));
                prop_assert!(backoff(short) <= backoff(long));
                prop_assert_eq!(backoff(short), Duration::from_millis(short).min(MAX_UPSTREAM_BACKOFF));
            }
        }
    }
}
