//! Alert delivery rules: which channel receives which event, what a
//! receiver's answer means for the next attempt (retry with exponential
//! backoff and full jitter, `retry-after` on 429, give up on other 4xx and
//! after the longest retry age), the per-channel rate limit and when events
//! go out as one digest. The dispatcher (`crate::alerts`) does the IO and
//! passes the time and the random draws in.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::DateTime;

use super::limits::ValidationError;
use super::notification::{NotificationKind, Severity};
use super::time::{Timestamp, duration_millis};

/// Whether an event announces a notification or its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Raised,
    Resolved,
}

impl Phase {
    pub const fn name(self) -> &'static str {
        match self {
            Phase::Raised => "raised",
            Phase::Resolved => "resolved",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Phase::Raised, Phase::Resolved]
            .into_iter()
            .find(|phase| phase.name() == name)
    }
}

/// The event a test send carries, beside the notification kinds.
pub const TEST_EVENT: &str = "test";

/// How a channel's messages are sent. Each kind has its own message shape
/// and sender; a new kind adds its variant here and its sender in
/// `crate::alerts::send`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    /// A generic HTTPS endpoint, signed per Standard Webhooks.
    Webhook,
    /// A Slack incoming webhook, sent Block Kit messages.
    Slack,
    /// Email to a list of recipients, through the SMTP server the settings
    /// name.
    Email,
}

impl ChannelKind {
    pub const ALL: [ChannelKind; 3] =
        [ChannelKind::Webhook, ChannelKind::Slack, ChannelKind::Email];

    pub const fn name(self) -> &'static str {
        match self {
            ChannelKind::Webhook => "webhook",
            ChannelKind::Slack => "slack",
            ChannelKind::Email => "email",
        }
    }

    /// Whether the receiver is a URL (else a list of recipients).
    pub const fn has_url(self) -> bool {
        !matches!(self, ChannelKind::Email)
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// Whether messages of this kind are signed with the channel's secret.
    pub const fn is_signed(self) -> bool {
        matches!(self, ChannelKind::Webhook)
    }
}

/// Which events a channel receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Notification kind names; `None` is every kind.
    pub events: Option<Vec<String>>,
    /// Events below this severity are not sent.
    pub min_severity: Severity,
    /// Whether resolutions are sent too.
    pub resolutions: bool,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            events: None,
            min_severity: Severity::Info,
            resolutions: true,
        }
    }
}

impl Filter {
    /// Whether an event of `kind` (a notification kind's name), `severity`
    /// and `phase` goes to the channel.
    pub fn accepts(&self, kind: &str, severity: Severity, phase: Phase) -> bool {
        let listed = self
            .events
            .as_ref()
            .is_none_or(|events| events.iter().any(|event| event == kind));
        listed && severity >= self.min_severity && (phase == Phase::Raised || self.resolutions)
    }
}

/// The most events a channel may name.
pub const MAX_EVENTS: usize = 32;
/// The longest channel URL.
pub const MAX_URL_LENGTH: usize = 2048;
/// The longest channel name.
pub const MAX_NAME_LENGTH: usize = 100;
/// A webhook secret's random part, in bytes (Standard Webhooks asks for
/// 24 to 64).
pub const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;
/// What a webhook secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";

/// A channel's name: 1 to 100 characters, none of them control characters.
pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    let length = name.chars().count();
    if length == 0 || length > MAX_NAME_LENGTH || name.chars().any(char::is_control) {
        return Err(ValidationError::new(
            "name",
            format!(
                "a channel's name is 1 to {MAX_NAME_LENGTH} characters without control characters"
            ),
        ));
    }
    Ok(())
}

/// A receiver's URL: `http://` or `https://` followed by a host, at most
/// 2048 characters, without spaces or control characters. The full
/// parse is the sender's (`crate::alerts`), which checks it again.
pub fn validate_url(url: &str) -> Result<(), ValidationError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let fault = match rest {
        None => Some("must start with http:// or https://"),
        Some(_) if url.len() > MAX_URL_LENGTH => Some("is longer than 2048 characters"),
        Some(_) if url.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            Some("contains spaces or control characters")
        }
        Some(rest) if rest.is_empty() || rest.starts_with('/') => Some("names no host"),
        Some(_) => None,
    };
    match fault {
        Some(fault) => Err(ValidationError::new(
            "url",
            format!("the receiver's URL {fault}"),
        )),
        None => Ok(()),
    }
}

/// The events a channel names: each a notification kind, at most 32,
/// each once. Answers them deduplicated, in their order.
pub fn validate_events(events: &[String]) -> Result<Vec<String>, ValidationError> {
    if events.len() > MAX_EVENTS {
        return Err(ValidationError::new(
            "events",
            format!("a channel names at most {MAX_EVENTS} events"),
        ));
    }
    let mut kept: Vec<String> = Vec::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        if NotificationKind::from_name(event).is_none() {
            return Err(ValidationError::new(
                format!("events[{index}]"),
                format!(
                    "unknown event {:?}: events are notification kinds such as threshold_crossed, forecast_exhaustion, rate_limited, daily_quota_exhausted, upstream_quota_exhausted, upstream_errors or storage_unavailable",
                    event.chars().take(64).collect::<String>()
                ),
            ));
        }
        if !kept.contains(event) {
            kept.push(event.clone());
        }
    }
    Ok(kept)
}

/// The random bytes of a `whsec_` secret, or why it is not one.
pub fn secret_bytes(secret: &str) -> Result<Vec<u8>, ValidationError> {
    use base64::Engine as _;
    let invalid = || {
        ValidationError::new(
            "secret",
            "a webhook secret is whsec_ followed by the standard base64 of 24 to 64 random bytes",
        )
    };
    let encoded = secret.strip_prefix(SECRET_PREFIX).ok_or_else(invalid)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| invalid())?;
    if SECRET_BYTES.contains(&bytes.len()) {
        Ok(bytes)
    } else {
        Err(invalid())
    }
}

/// How deliveries are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The delay before the first retry, doubled for each one after.
    pub base: Duration,
    /// The longest delay between two attempts.
    pub cap: Duration,
    /// How long after its first attempt a delivery is given up.
    pub max_age: Duration,
}

/// What a receiver answered to one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP status, with the `retry-after` header's text if it had one.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// No answer within the attempt's timeout.
    Timeout,
    /// The receiver could not be reached, or broke off.
    Failed,
    /// The receiver took the message, and has no HTTP status to say so
    /// with (an SMTP server's 250).
    Accepted,
    /// The receiver refused the message for good, and has no HTTP status
    /// to say so with (an SMTP server's 5xx, a certificate not trusted).
    Refused,
}

/// What follows an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Delivered,
    /// Another attempt at `at`.
    Retry {
        at: Timestamp,
    },
    GiveUp {
        reason: GiveUpReason,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The receiver refused the message (a 4xx other than 429, or a
    /// redirect, which is not followed; an SMTP server's 5xx).
    Refused,
    /// The next attempt would fall past the longest retry age.
    Expired,
}

impl GiveUpReason {
    pub const fn describe(self) -> &'static str {
        match self {
            GiveUpReason::Refused => "the receiver refused the message; it is not sent again",
            GiveUpReason::Expired => "retries ran out of time; the delivery is given up",
        }
    }
}

impl Decision {
    /// The outcome as attempts and metrics name it.
    pub const fn outcome(self) -> &'static str {
        match self {
            Decision::Delivered => "delivered",
            Decision::Retry { .. } => "retry",
            Decision::GiveUp { .. } => "gave_up",
        }
    }
}

/// What follows the `attempt`th attempt (1 for the first) of a delivery
/// first tried at `first_attempt`, answered `answer` at `now`. `random` is
/// a draw in `[0, 1)` for the jitter.
///
/// 2xx (or a message accepted otherwise) is delivered. 429 retries at its `retry-after` (seconds or an HTTP
/// date), or with backoff when it has none; 5xx, 408, timeouts and
/// failures retry with backoff: `random × min(cap, base × 2^(attempt−1))`
/// ("full jitter", so that receivers coming back are not hit by every
/// sender at once). Any other answer, and a refusal without a status, gives
/// up, as does a retry that would fall past `max_age` after the first
/// attempt.
pub fn decide(
    policy: RetryPolicy,
    answer: &Answer,
    attempt: u32,
    first_attempt: Timestamp,
    now: Timestamp,
    random: f64,
) -> Decision {
    let retry_at = match answer {
        Answer::Accepted => return Decision::Delivered,
        Answer::Status { status, .. } if (200..300).contains(status) => {
            return Decision::Delivered;
        }
        Answer::Status {
            status: 429,
            retry_after,
        } => retry_after
            .as_deref()
            .and_then(|text| parse_retry_after(text, now))
            .unwrap_or_else(|| now.plus(backoff(policy, attempt, random))),
        Answer::Status { status, .. } if *status == 408 || *status >= 500 => {
            now.plus(backoff(policy, attempt, random))
        }
        Answer::Status { .. } | Answer::Refused => {
            return Decision::GiveUp {
                reason: GiveUpReason::Refused,
            };
        }
        Answer::Timeout | Answer::Failed => now.plus(backoff(policy, attempt, random)),
    };
    if retry_at.millis()
        > first_attempt
            .millis()
            .saturating_add(duration_millis(policy.max_age))
    {
        Decision::GiveUp {
            reason: GiveUpReason::Expired,
        }
    } else {
        Decision::Retry { at: retry_at }
    }
}

/// The delay after the `attempt`th attempt: full jitter over the capped
/// exponential.
pub fn backoff(policy: RetryPolicy, attempt: u32, random: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let exponential = policy
        .base
        .checked_mul(1u32 << doublings)
        .unwrap_or(policy.cap)
        .min(policy.cap);
    exponential.mul_f64(random.clamp(0.0, 1.0))
}

/// A `retry-after` header as the instant it names: a number of seconds
/// from `now`, or an HTTP date (RFC 9110: IMF-fixdate, as RFC 2822 reads
/// it). `None` when it is neither; an instant already past is `now`.
pub fn parse_retry_after(text: &str, now: Timestamp) -> Option<Timestamp> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(now.plus(Duration::from_secs(seconds.min(u64::from(u32::MAX)))));
    }
    let at = DateTime::parse_from_rfc2822(text).ok()?;
    Some(Timestamp::from_millis(
        at.timestamp_millis().max(now.millis()),
    ))
}

/// A channel's rate limit: a token bucket holding up to `burst` messages,
/// refilled at `per_second`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    updated: Timestamp,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_second: f64, burst: u32, now: Timestamp) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            updated: now,
        }
    }

    /// Takes one message's token: `Ok` when there was one, or the instant
    /// the next one comes.
    pub fn take(&mut self, now: Timestamp) -> Result<(), Timestamp> {
        let elapsed = (now.millis() - self.updated.millis()).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.updated = now.max(self.updated);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / self.per_second;
        Err(now.plus(Duration::from_secs_f64(wait.max(0.001))))
    }
}

/// How due events go out to one channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// One message per event.
    Each,
    /// One message listing them all.
    Digest,
}

/// The events sent to one channel over the last minute, which decides
/// when the next ones go out as a digest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecentEvents {
    sent: VecDeque<Timestamp>,
}

const DIGEST_WINDOW_MS: i64 = 60_000;

impl RecentEvents {
    /// How `due` events go out at `now`: as one digest when, with those
    /// sent in the last minute, more than `threshold` would have gone to
    /// the channel within it; one at a time otherwise (and always for one).
    pub fn plan(&mut self, now: Timestamp, due: usize, threshold: usize) -> Plan {
        self.forget_before(now);
        if due > 1 && self.sent.len() + due > threshold {
            Plan::Digest
        } else {
            Plan::Each
        }
    }

    /// Notes `count` events sent at `now`.
    pub fn record(&mut self, now: Timestamp, count: usize) {
        self.forget_before(now);
        self.sent.extend(std::iter::repeat_n(now, count));
    }

    fn forget_before(&mut self, now: Timestamp) {
        while self
            .sent
            .front()
            .is_some_and(|at| now.millis() - at.millis() >= DIGEST_WINDOW_MS)
        {
            self.sent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(60),
        max_age: Duration::from_secs(86_400),
    };
    const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

    fn status(status: u16) -> Answer {
        Answer::Status {
            status,
            retry_after: None,
        }
    }

    #[test]
    fn success_is_delivered_and_other_4xx_give_up() {
        assert_eq!(
            decide(POLICY, &status(204), 1, T0, T0, 0.5),
            Decision::Delivered
        );
        for refused in [400, 401, 403, 404, 410, 301] {
            assert_eq!(
                decide(POLICY, &status(refused), 1, T0, T0, 0.5),
                Decision::GiveUp {
                    reason: GiveUpReason::Refused
                },
                "{refused}"
            );
        }
        assert_eq!(
            decide(POLICY, &Answer::Accepted, 1, T0, T0, 0.5),
            Decision::Delivered
        );
        assert_eq!(
            decide(POLICY, &Answer::Refused, 1, T0, T0, 0.5),
            Decision::GiveUp {
                reason: GiveUpReason::Refused
            }
        );
    }

    #[test]
    fn server_errors_and_timeouts_back_off_exponentially_with_full_jitter() {
        for answer in [
            status(500),
            status(503),
            status(408),
            Answer::Timeout,
            Answer::Failed,
        ] {
            assert_eq!(
                decide(POLICY, &answer, 3, T0, T0, 0.5),
                Decision::Retry {
                    at: T0.plus(Duration::from_secs(2))
                },
                "{answer:?}: half of 4 s"
            );
        }
        assert_eq!(
            backoff(POLICY, 1, 0.999),
            Duration::from_secs(1).mul_f64(0.999)
        );
        assert_eq!(backoff(POLICY, 1, 0.0), Duration::ZERO);
        // Capped at a minute however many attempts came before.
        assert_eq!(backoff(POLICY, 10, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(POLICY, 400, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn a_429_retries_when_its_retry_after_says() {
        let seconds = Answer::Status {
            status: 429,
            retry_after: Some("120".into()),
        };
        assert_eq!(
            decide(POLICY, &seconds, 1, T0, T0, 0.0),
            Decision::Retry {
                at: T0.plus(Duration::from_secs(120))
            }
        );
        let date = Answer::Status {
            status: 429,
            retry_after: Some("Tue, 14 Nov 2023 22:15:20 GMT".into()),
        };
        assert_eq!(
            decide(POLICY, &date, 1, T0, T0, 0.0),
            Decision::Retry {
                at: Timestamp::from_millis(1_700_000_120_000)
            }
        );
        // Without one (or an unreadable one), the backoff.
        let bare = Answer::Status {
            status: 429,
            retry_after: Some("soon".into()),
        };
        assert_eq!(
            decide(POLICY, &bare, 2, T0, T0, 1.0),
            Decision::Retry {
                at: T0.plus(Duration::from_secs(2))
            }
        );
        // A date already past is now.
        assert_eq!(
            parse_retry_after("Mon, 13 Nov 2023 00:00:00 GMT", T0),
            Some(T0)
        );
    }

    #[test]
    fn retries_stop_after_the_longest_age() {
        let first = T0;
        let late = T0.plus(Duration::from_secs(86_400 - 30));
        assert_eq!(
            decide(POLICY, &status(500), 20, first, late, 1.0),
            Decision::GiveUp {
                reason: GiveUpReason::Expired
            }
        );
        assert_eq!(
            decide(POLICY, &status(500), 20, first, late, 0.1),
            Decision::Retry {
                at: late.plus(Duration::from_secs(6))
            }
        );
        let beyond = Answer::Status {
            status: 429,
            retry_after: Some("86400".into()),
        };
        assert_eq!(
            decide(POLICY, &beyond, 1, T0, T0.plus(Duration::from_secs(1)), 0.0),
            Decision::GiveUp {
                reason: GiveUpReason::Expired
            }
        );
    }

    #[test]
    fn the_bucket_lets_a_burst_through_then_one_per_interval() {
        let mut bucket = TokenBucket::new(1.0, 2, T0);
        assert_eq!(bucket.take(T0), Ok(()));
        assert_eq!(bucket.take(T0), Ok(()));
        assert_eq!(bucket.take(T0), Err(T0.plus(Duration::from_secs(1))));
        let half = T0.plus(Duration::from_millis(500));
        assert_eq!(bucket.take(half), Err(T0.plus(Duration::from_secs(1))));
        assert_eq!(bucket.take(T0.plus(Duration::from_secs(1))), Ok(()));
        // An idle bucket fills up to its burst, not beyond.
        let later = T0.plus(Duration::from_secs(100));
        assert_eq!(bucket.take(later), Ok(()));
        assert_eq!(bucket.take(later), Ok(()));
        assert!(bucket.take(later).is_err());
    }

    #[test]
    fn more_than_the_threshold_within_a_minute_goes_as_one_digest() {
        let mut recent = RecentEvents::default();
        assert_eq!(recent.plan(T0, 1, 3), Plan::Each);
        assert_eq!(recent.plan(T0, 3, 3), Plan::Each);
        assert_eq!(recent.plan(T0, 4, 3), Plan::Digest);
        recent.record(T0, 2);
        assert_eq!(recent.plan(T0, 2, 3), Plan::Digest, "2 sent + 2 due > 3");
        assert_eq!(
            recent.plan(T0, 1, 3),
            Plan::Each,
            "one event is one message"
        );
        // A minute later the earlier ones no longer count.
        assert_eq!(
            recent.plan(T0.plus(Duration::from_secs(60)), 3, 3),
            Plan::Each
        );
    }

    #[test]
    fn filters_choose_events_by_kind_severity_and_phase() {
        let all = Filter::default();
        assert!(all.accepts("rate_limited", Severity::Info, Phase::Resolved));
        let narrow = Filter {
            events: Some(vec!["threshold_crossed".into()]),
            min_severity: Severity::Warning,
            resolutions: false,
        };
        assert!(narrow.accepts("threshold_crossed", Severity::Critical, Phase::Raised));
        assert!(!narrow.accepts("threshold_crossed", Severity::Info, Phase::Raised));
        assert!(!narrow.accepts("threshold_crossed", Severity::Warning, Phase::Resolved));
        assert!(!narrow.accepts("rate_limited", Severity::Critical, Phase::Raised));
    }

    #[test]
    fn channel_fields_are_validated_with_their_names() {
        assert!(validate_url("https://hooks.example.com/x").is_ok());
        assert!(validate_url("http://127.0.0.1:9/").is_ok());
        for bad in [
            "ftp://x",
            "https://",
            "https:///path",
            "https://a b",
            "hooks.example.com",
        ] {
            assert_eq!(
                validate_url(bad).map_err(|e| e.field),
                Err("url".into()),
                "{bad}"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LENGTH));
        assert!(validate_url(&long).is_err());
        assert!(validate_name("ops").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a\nb").is_err());
        assert_eq!(
            validate_events(&["rate_limited".into(), "rate_limited".into()]),
            Ok(vec!["rate_limited".to_owned()])
        );
        assert_eq!(
            validate_events(&["rate_limited".into(), "nope".into()]).map_err(|e| e.field),
            Err("events[1]".into())
        );
        assert_eq!(
            secret_bytes("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").map(|b| b.len()),
            Ok(24)
        );
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_short",
            "whsec_!!!!",
        ] {
            assert!(secret_bytes(bad).is_err(), "{bad}");
        }
    }
}
