//! Behaviour of a workspace as a whole, with time injected: admission at the
//! edges of windows and days, settlement, expiry, every status transition with
//! its notification, and hysteresis.

use std::time::Duration;

use chrono::DateTime;
use chrono_tz::Tz;

use super::limits::{LimitKind, Limits, WorkspaceConfig};
use super::limits::{
    REQUESTS_PER_DAY, REQUESTS_PER_MINUTE, REQUESTS_PER_MONTH, TOKENS_PER_DAY, TOKENS_PER_MINUTE,
    TOKENS_PER_MONTH,
};
use super::notification::{NotificationKind, Severity};
use super::status::{Change, LimitFacts, Status};
use super::time::{Period, Timestamp};
use super::upstream::{BillingCode, ErrorFields, RateLimitHeaders};
use super::window::Usage;
use super::workspace::{
    Admission, Admitted, Answer, Blocks, Counts, Enforcement, Expired, Outcome, Recorded,
    RefusalCause, Request, Reservation, Returned, Settings, Settled, WorkspaceState,
};

fn ts(rfc3339: &str) -> Timestamp {
    Timestamp::from_millis(
        DateTime::parse_from_rfc3339(rfc3339)
            .expect("valid timestamp")
            .timestamp_millis(),
    )
}

/// A workspace plus a clock and an id counter, so tests read as a script.
struct Script {
    state: WorkspaceState,
    now: Timestamp,
    settings: Settings,
    next_id: u64,
}

impl Script {
    fn new(limits: &[(LimitKind, u64)]) -> Self {
        Self::with_config(limits, "UTC", ts("2026-05-04T10:00:00Z"))
    }

    fn with_config(limits: &[(LimitKind, u64)], tz: &str, now: Timestamp) -> Self {
        let mut all = Limits::default();
        for &(kind, max) in limits {
            all.set(kind, Some(max));
        }
        let mut config = WorkspaceConfig::new("acme".parse().expect("id"), all);
        config.timezone = tz.parse::<Tz>().expect("zone");
        Self {
            state: WorkspaceState::new(config, now),
            now,
            settings: Settings::default(),
            next_id: 0,
        }
    }

    fn at(&mut self, rfc3339: &str) -> &mut Self {
        self.now = ts(rfc3339);
        self
    }

    fn after(&mut self, millis: i64) -> &mut Self {
        self.now = Timestamp::from_millis(self.now.millis() + millis);
        self
    }

    fn admit(&mut self, tokens: u64) -> Admission {
        let mut next_id = self.next_id;
        let admission = self.state.admit(
            &Request {
                estimate: Usage::call(tokens),
                model: None,
                ..Request::default()
            },
            self.now,
            &self.settings,
            &mut || {
                next_id += 1;
                next_id
            },
        );
        self.next_id = next_id;
        admission
    }

    fn admitted(&mut self, tokens: u64) -> u64 {
        match self.admit(tokens).result {
            Ok(admitted) => admitted.id,
            Err(refusal) => panic!("refused at {}: {refusal:?}", self.now),
        }
    }

    fn refused(&mut self, tokens: u64) -> super::workspace::Refusal {
        match self.admit(tokens).result {
            Ok(_) => panic!("admitted at {}", self.now),
            Err(refusal) => refusal,
        }
    }

    fn record(&mut self, outcome: &Outcome<'_>) -> Recorded {
        let mut next_id = self.next_id;
        let recorded = self
            .state
            .record(outcome, self.now, &self.settings, &mut || {
                next_id += 1;
                next_id
            });
        self.next_id = next_id;
        recorded
    }

    /// Settles a reservation with a successful answer; false when the
    /// reservation was unknown.
    fn settle(&mut self, id: u64, actual: u64) -> bool {
        self.record(&Outcome {
            scoped: Default::default(),
            reservation: Some(id),
            usage: Some(Usage::call(actual)),
            answer: Some(Answer::success()),
            tokens: None,
        })
        .settled
            != Settled::Missing
    }

    /// Reports an upstream answer for a call without reservation.
    fn upstream(
        &mut self,
        status: u16,
        error_type: &str,
        code: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Vec<Change> {
        let outcome = Outcome {
            answer: Some(Answer {
                status,
                error: ErrorFields {
                    error_type: Some(error_type).filter(|t| !t.is_empty()),
                    code,
                    message: Some("upstream says no"),
                },
                headers: RateLimitHeaders::parse(headers.iter().copied()),
                ..Answer::default()
            }),
            ..Outcome::default()
        };
        self.record(&outcome).changes
    }

    fn success(&mut self) -> Vec<Change> {
        self.upstream(200, "", None, &[])
    }

    fn tick(&mut self) -> Vec<Change> {
        let mut next_id = self.next_id;
        let (_, _, changes) = self.state.tick(self.now, &self.settings, &mut || {
            next_id += 1;
            next_id
        });
        self.next_id = next_id;
        changes
    }

    /// Loads blocks as an instance following counters kept elsewhere does.
    fn load(&mut self, blocks: Blocks) -> Vec<Change> {
        self.state.load_blocks(blocks, self.now);
        let mut next_id = self.next_id;
        let changes = self.state.reevaluate(self.now, &self.settings, &mut || {
            next_id += 1;
            next_id
        });
        self.next_id = next_id;
        changes
    }

    fn facts(&self, kind: LimitKind) -> LimitFacts {
        self.state
            .snapshot(self.now)
            .limits
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, facts)| *facts)
            .expect("limit configured")
    }

    fn used(&self, kind: LimitKind) -> u64 {
        self.facts(kind).used
    }

    fn status(&self) -> Status {
        self.state.status()
    }

    fn active_kinds(&self) -> Vec<(NotificationKind, Option<LimitKind>)> {
        self.state
            .active_notifications()
            .iter()
            .map(|n| (n.kind, n.limit))
            .collect()
    }
}

fn raised(changes: &[Change]) -> Vec<NotificationKind> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Raised(n) => Some(n.kind),
            _ => None,
        })
        .collect()
}

fn resolved(changes: &[Change]) -> Vec<NotificationKind> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Resolved(n) => Some(n.kind),
            _ => None,
        })
        .collect()
}

#[test]
fn a_minute_limit_holds_over_every_sixty_second_span() {
    // Table: (seconds after 10:00:00, expected admitted?) for a limit of 3.
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 3)]);
    let steps = [
        (59.0, true),
        (59.5, true),
        (59.9, true),
        // A new calendar minute starts, but the last 60 seconds are full.
        (60.0, false),
        (61.0, false),
        (118.9, false),
        // Second 59, with all three, leaves the window at 119.
        (119.0, true),
        (119.1, true),
        (119.2, true),
        (119.3, false),
    ];
    for (seconds, expect_admitted) in steps {
        script
            .at("2026-05-04T10:00:00Z")
            .after((seconds * 1000.0) as i64);
        let admitted = script.admit(0).result.is_ok();
        assert_eq!(admitted, expect_admitted, "at +{seconds}s");
    }
}

#[test]
fn a_refusal_names_the_limit_and_when_it_frees() {
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 2)]);
    script.at("2026-05-04T10:00:10Z").admitted(0);
    script.at("2026-05-04T10:00:20Z").admitted(0);
    let refusal = script.at("2026-05-04T10:00:30Z").refused(0);
    assert_eq!(refusal.cause, RefusalCause::Limit(REQUESTS_PER_MINUTE));
    assert_eq!((refusal.used, refusal.max), (2, 2));
    assert_eq!(refusal.retry_at, Some(ts("2026-05-04T10:01:10Z")));
    assert!(refusal.retryable);
}

#[test]
fn a_day_limit_resets_at_local_midnight_in_a_non_utc_timezone() {
    // Tokyo is UTC+9: local midnight of 5 May is 15:00 UTC on 4 May.
    let mut script = Script::with_config(
        &[(REQUESTS_PER_DAY, 2)],
        "Asia/Tokyo",
        ts("2026-05-04T14:58:00Z"),
    );
    script.admitted(0);
    script.after(1000).admitted(0);
    let refusal = script.at("2026-05-04T14:59:59.999Z").refused(0);
    assert_eq!(refusal.cause, RefusalCause::Limit(REQUESTS_PER_DAY));
    assert_eq!(refusal.retry_at, Some(ts("2026-05-04T15:00:00Z")));
    assert!(
        !refusal.retryable,
        "waiting for midnight is not a short wait"
    );
    assert_eq!(script.status(), Status::QuotaExceeded);
    // At local midnight the quota is back, and its notification resolves.
    script.at("2026-05-04T15:00:00Z");
    let changes = script.tick();
    assert_eq!(script.status(), Status::Normal);
    assert!(resolved(&changes).contains(&NotificationKind::QuotaExhausted(Period::Day)));
    script.admitted(0);
    assert_eq!(script.used(REQUESTS_PER_DAY), 1);
    assert_eq!(script.status(), Status::Normal);
    let snapshot = script.state.snapshot(script.now);
    let (_, day) = snapshot.limits[0];
    assert_eq!(day.resets_at, Some(ts("2026-05-05T15:00:00Z")));
}

#[test]
fn admission_is_atomic_across_all_limits() {
    let mut script = Script::new(&[
        (REQUESTS_PER_MINUTE, 10),
        (REQUESTS_PER_DAY, 100),
        (TOKENS_PER_MINUTE, 1000),
        (TOKENS_PER_DAY, 5000),
    ]);
    script.admitted(900);
    // The token limit has no room for 200 more: nothing may be charged.
    let refusal = script.refused(200);
    assert_eq!(refusal.cause, RefusalCause::Limit(TOKENS_PER_MINUTE));
    assert_eq!(script.used(REQUESTS_PER_MINUTE), 1);
    assert_eq!(script.used(REQUESTS_PER_DAY), 1);
    assert_eq!(script.used(TOKENS_PER_MINUTE), 900);
    assert_eq!(script.used(TOKENS_PER_DAY), 900);
    // A request that fits everywhere is charged everywhere.
    script.admitted(100);
    assert_eq!(script.used(REQUESTS_PER_MINUTE), 2);
    assert_eq!(script.used(REQUESTS_PER_DAY), 2);
    assert_eq!(script.used(TOKENS_PER_MINUTE), 1000);
    assert_eq!(script.used(TOKENS_PER_DAY), 1000);
}

#[test]
fn the_room_left_names_the_tightest_request_and_token_limits() {
    use super::limits::USD_PER_DAY;
    let mut script = Script::new(&[
        (REQUESTS_PER_MINUTE, 10),
        (REQUESTS_PER_DAY, 10),
        (TOKENS_PER_MINUTE, 1000),
        (TOKENS_PER_DAY, 600),
        (USD_PER_DAY, 1),
    ]);
    script.admitted(100);
    let (headroom, remaining) = script.state.room();
    // Two request limits with as much left: the first listed is named.
    let requests = headroom.requests.expect("request limits");
    assert_eq!(
        (requests.kind, requests.max, requests.remaining),
        (REQUESTS_PER_MINUTE, 10, 9)
    );
    let tokens = headroom.tokens.expect("token limits");
    assert_eq!(
        (tokens.kind, tokens.max, tokens.remaining),
        (TOKENS_PER_DAY, 600, 500)
    );
    assert_eq!(
        tokens.resets_at,
        Some(ts("2026-05-05T00:00:00Z")),
        "a day's limit resets with the day"
    );
    // Every configured limit has its remainder, the budget too, which
    // the rate-limit headers leave out; an unset one has none.
    assert_eq!(remaining.get(REQUESTS_PER_DAY), Some(9));
    assert_eq!(remaining.get(TOKENS_PER_MINUTE), Some(900));
    assert_eq!(remaining.get(USD_PER_DAY), Some(1));
    assert_eq!(remaining.get(REQUESTS_PER_MONTH), None);
}

#[test]
fn a_request_larger_than_a_whole_limit_is_refused_without_retry() {
    let mut script = Script::new(&[(TOKENS_PER_MINUTE, 1000)]);
    let refusal = script.refused(1001);
    assert_eq!(refusal.cause, RefusalCause::TooLarge(TOKENS_PER_MINUTE));
    assert!(!refusal.retryable);
    assert_eq!(refusal.retry_at, None);
    assert_eq!(
        script.status(),
        Status::Normal,
        "an oversized request blocks nobody"
    );
}

#[test]
fn settlement_replaces_the_estimate_with_the_actual_count() {
    let mut script = Script::new(&[(TOKENS_PER_MINUTE, 10_000), (TOKENS_PER_DAY, 100_000)]);
    let id = script.admitted(1000);
    assert_eq!(script.used(TOKENS_PER_MINUTE), 1000);
    assert!(script.after(2000).settle(id, 250));
    assert_eq!(script.used(TOKENS_PER_MINUTE), 250);
    assert_eq!(script.used(TOKENS_PER_DAY), 250);
    assert!(!script.settle(id, 250), "a reservation settles once");

    let id = script.admitted(100);
    assert!(script.after(500).settle(id, 400));
    assert_eq!(script.used(TOKENS_PER_MINUTE), 650);
    assert_eq!(script.used(TOKENS_PER_DAY), 650);
}

#[test]
fn settlement_after_the_window_moved_on_charges_only_extra_tokens_now() {
    let mut script = Script::new(&[(TOKENS_PER_MINUTE, 10_000), (TOKENS_PER_DAY, 100_000)]);
    let id = script.admitted(1000);
    // A long stream: settled 90 s later, when its second has left the window.
    assert!(script.after(90_000).settle(id, 1500));
    assert_eq!(script.used(TOKENS_PER_MINUTE), 500);
    assert_eq!(script.used(TOKENS_PER_DAY), 1500);
}

#[test]
fn an_unsettled_reservation_expires_and_keeps_its_estimate() {
    let mut script = Script::new(&[(TOKENS_PER_DAY, 100_000)]);
    let id = script.admitted(700);
    script.after(Duration::from_secs(599).as_millis() as i64);
    assert!(script.state.snapshot(script.now).limits[0].1.used == 700);
    let (_, expired, _) = {
        let mut counter = 100;
        script.after(1000);
        script.state.tick(script.now, &script.settings, &mut || {
            counter += 1;
            counter
        })
    };
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].usage.tokens, 700);
    assert!(
        !script.settle(id, 10),
        "expired reservations cannot be settled"
    );
    assert_eq!(script.used(TOKENS_PER_DAY), 700);
}

/// Reservations expire in the order they were admitted, each when its
/// time-to-live is over and not before, also once restored from a save that
/// lists them in another order.
#[test]
fn reservations_expire_in_order_each_at_its_time_also_once_restored() {
    let mut script = Script::new(&[(TOKENS_PER_DAY, 100_000)]);
    let admitted_at = script.now;
    script.admitted(100);
    script.after(1000);
    script.admitted(200);
    let mut saved = script.state.save(None);
    saved.reservations.reverse();
    let config = script.state.config().clone();
    script.state = WorkspaceState::restore(config, saved, Vec::new(), script.now);
    let ttl = script.settings.reservation_ttl.as_millis() as i64;
    let mut expired_at = |millis: i64| {
        script.now = Timestamp::from_millis(admitted_at.millis() + millis);
        let mut counter = 100;
        let (_, expired, _) = script.state.tick(script.now, &script.settings, &mut || {
            counter += 1;
            counter
        });
        expired
            .iter()
            .map(|expired| expired.usage.tokens)
            .collect::<Vec<_>>()
    };
    assert_eq!(expired_at(ttl - 1), Vec::<u64>::new());
    assert_eq!(expired_at(ttl), vec![100]);
    assert_eq!(expired_at(ttl + 999), Vec::<u64>::new());
    assert_eq!(expired_at(ttl + 1000), vec![200]);
    assert_eq!(expired_at(ttl + 5000), Vec::<u64>::new());
}

#[test]
fn warning_has_hysteresis() {
    // warn_at 0.8, clears below 0.75.
    let mut script = Script::new(&[(REQUESTS_PER_DAY, 100)]);
    for _ in 0..79 {
        script.admitted(0);
    }
    assert_eq!(script.status(), Status::Normal);
    let changes = script.admit(0).changes;
    assert_eq!(script.status(), Status::Warning);
    assert_eq!(raised(&changes), vec![NotificationKind::ApproachingLimit]);
    let notification = &script.state.active_notifications()[0];
    assert_eq!(notification.severity, Severity::Warning);
    assert_eq!(notification.limit, Some(REQUESTS_PER_DAY));
    assert!(
        notification.message.contains("80 of 100 requests today"),
        "{}",
        notification.message
    );
    assert!(
        notification
            .suggested_actions
            .iter()
            .any(|a| a.contains("raise requests_per_day"))
    );
    assert!(
        notification
            .suggested_actions
            .iter()
            .any(|a| a.contains("reduce volume"))
    );

    // Usage reported lower (settling never lowers requests, so use a fresh
    // script on minutes): utilisation between 0.75 and 0.8 keeps the warning.
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 100)]);
    for _ in 0..40 {
        script.admitted(0);
    }
    script.after(30_000);
    for _ in 0..40 {
        script.admitted(0);
    }
    assert_eq!(script.status(), Status::Warning);
    // At +60 s the first 40 leave: 40 % is below 75 %, warning clears.
    script.after(30_000);
    let changes = script.tick();
    assert_eq!(script.status(), Status::Normal);
    assert_eq!(resolved(&changes), vec![NotificationKind::ApproachingLimit]);

    // Now hover: 80 in the window, then 77 (above 0.75): stays in warning.
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 100)]);
    for _ in 0..3 {
        script.admitted(0);
    }
    script.after(1000);
    for _ in 0..77 {
        script.admitted(0);
    }
    assert_eq!(script.status(), Status::Warning);
    script.after(59_000);
    assert!(
        script.tick().is_empty(),
        "77 % is above the 75 % clearing line"
    );
    assert_eq!(script.status(), Status::Warning);
}

#[test]
fn minute_exhaustion_rate_limits_and_clears_when_the_window_frees() {
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 5)]);
    for _ in 0..4 {
        script.admitted(0);
    }
    assert_eq!(script.status(), Status::Warning);
    let changes = script.admit(0).changes;
    assert_eq!(script.status(), Status::RateLimited);
    assert_eq!(
        changes[0],
        Change::Status {
            from: Status::Warning,
            to: Status::RateLimited
        }
    );
    assert_eq!(raised(&changes), vec![NotificationKind::RateLimited]);
    let snapshot = script.state.snapshot(script.now);
    assert!(snapshot.blocked);
    assert_eq!(
        snapshot.reasons,
        vec![
            "requests_per_minute_exhausted",
            "requests_per_minute_approaching"
        ]
    );
    let rate_limited = script
        .state
        .active_notifications()
        .iter()
        .find(|n| n.kind == NotificationKind::RateLimited)
        .expect("raised");
    assert_eq!(rate_limited.resolves_at, Some(ts("2026-05-04T10:01:00Z")));
    assert!(
        rate_limited
            .message
            .contains("5 of 5 requests in the last 60 seconds")
    );

    // Refusals do not raise a second notification.
    for _ in 0..10 {
        assert!(raised(&script.admit(0).changes).is_empty());
    }
    assert_eq!(script.state.active_notifications().len(), 2);

    // The window is empty at 10:01:00; the limit counts as used up for the
    // hold, and then the status is normal again.
    script.at("2026-05-04T10:01:00Z");
    let changes = script.tick();
    assert_eq!(script.status(), Status::RateLimited);
    assert_eq!(resolved(&changes), vec![NotificationKind::ApproachingLimit]);
    script.at("2026-05-04T10:01:02Z");
    let changes = script.tick();
    assert_eq!(script.status(), Status::Normal);
    assert_eq!(resolved(&changes), vec![NotificationKind::RateLimited]);
}

#[test]
fn a_workspace_running_at_its_minute_limit_does_not_flap() {
    // 60 per minute, and a client sending one request every half second:
    // each second a slot frees up and is taken again at once.
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 60)]);
    let mut raised_total = Vec::new();
    let mut resolved_total = Vec::new();
    let mut statuses = std::collections::BTreeSet::new();
    for step in 0..600 {
        script.at("2026-05-04T10:00:00Z").after(step * 500);
        raised_total.extend(raised(&script.tick()));
        raised_total.extend(raised(&script.admit(0).changes));
        if step >= 120 {
            statuses.insert(script.status());
        }
    }
    assert_eq!(
        statuses.into_iter().collect::<Vec<_>>(),
        vec![Status::RateLimited]
    );
    let rate_limited = raised_total
        .iter()
        .filter(|k| **k == NotificationKind::RateLimited)
        .count();
    assert_eq!(rate_limited, 1, "one notification for the whole episode");
    // When the client stops, the episode ends once: the window drains, and
    // the hold runs out.
    script.after(62_000);
    resolved_total.extend(resolved(&script.tick()));
    script.after(2_000);
    resolved_total.extend(resolved(&script.tick()));
    assert_eq!(script.status(), Status::Normal);
    assert!(resolved_total.contains(&NotificationKind::RateLimited));
}

#[test]
fn daily_exhaustion_is_critical_and_tells_how_to_unblock() {
    let mut script = Script::new(&[(REQUESTS_PER_DAY, 3)]);
    for _ in 0..3 {
        script.admitted(0);
    }
    assert_eq!(script.status(), Status::QuotaExceeded);
    let kinds = script.active_kinds();
    assert!(kinds.contains(&(
        NotificationKind::QuotaExhausted(Period::Day),
        Some(REQUESTS_PER_DAY)
    )));
    let exhausted = script
        .state
        .active_notifications()
        .iter()
        .find(|n| n.kind == NotificationKind::QuotaExhausted(Period::Day))
        .expect("raised");
    assert_eq!(exhausted.severity, Severity::Critical);
    assert_eq!(exhausted.resolves_at, Some(ts("2026-05-05T00:00:00Z")));
    assert!(exhausted.message.contains("3 of 3 requests today"));
    assert!(
        exhausted
            .suggested_actions
            .iter()
            .any(|a| a.contains("POST /api/quota/reset"))
    );

    let changes = script.state.reset(script.now);
    assert_eq!(script.status(), Status::Normal);
    assert_eq!(resolved(&changes).len(), 2);
    assert!(script.state.active_notifications().is_empty());
    script.admitted(0);
}

#[test]
fn an_upstream_rate_limit_holds_requests_until_retry_after() {
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 100)]);
    let changes = script.upstream(
        429,
        "requests",
        Some("rate_limit_exceeded"),
        &[
            ("retry-after", "20"),
            ("x-ratelimit-limit-requests", "3"),
            ("x-ratelimit-remaining-requests", "0"),
        ],
    );
    assert_eq!(script.status(), Status::RateLimited);
    assert_eq!(
        raised(&changes),
        vec![NotificationKind::UpstreamRateLimited]
    );
    let refusal = script.after(5000).refused(0);
    assert_eq!(refusal.cause, RefusalCause::UpstreamRateLimited);
    assert_eq!(refusal.retry_at, Some(ts("2026-05-04T10:00:20Z")));
    assert!(refusal.retryable);
    let upstream = script
        .state
        .snapshot(script.now)
        .upstream
        .expect("headers observed");
    assert_eq!(upstream.requests.and_then(|b| b.remaining), Some(0));

    script.at("2026-05-04T10:00:20Z");
    let changes = script.tick();
    assert_eq!(script.status(), Status::Normal);
    assert_eq!(
        resolved(&changes),
        vec![NotificationKind::UpstreamRateLimited]
    );
    script.admitted(0);
}

#[test]
fn a_billing_block_refuses_without_retry_and_lets_one_probe_through_per_interval() {
    for code in BillingCode::ALL {
        let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 100)]);
        let changes = script.upstream(429, "insufficient_quota", Some(code.code()), &[]);
        assert_eq!(script.status(), Status::QuotaExceeded, "{code:?}");
        assert_eq!(
            raised(&changes),
            vec![NotificationKind::UpstreamQuotaExhausted]
        );
        let notification = &script.state.active_notifications()[0];
        assert_eq!(notification.severity, Severity::Critical);
        assert_eq!(notification.resolves_at, None);
        let snapshot = script.state.snapshot(script.now);
        assert_eq!(snapshot.reasons, vec![format!("upstream_{}", code.code())]);
        assert!(snapshot.blocked);
        assert_eq!(snapshot.retry_at, None, "no time is known for billing");

        let refusal = script.after(1000).refused(0);
        assert_eq!(refusal.cause, RefusalCause::UpstreamQuota(code));
        assert!(!refusal.retryable);
        assert_eq!(refusal.retry_at, None);

        // After the probe interval exactly one request goes through.
        script.at("2026-05-04T10:01:00Z");
        let probe = script.admit(0).result.expect("probe admitted");
        assert!(probe.probe);
        script.refused(0);
        // The probe failed again: the next probe is one interval later.
        script.upstream(429, "insufficient_quota", Some(code.code()), &[]);
        script.after(59_000).refused(0);
        let probe = script.after(1000).admitted(0);
        // A success reported without a reservation says nothing about
        // billing; the probe's own success ends the block.
        script.success();
        assert_eq!(script.status(), Status::QuotaExceeded);
        let changes = script
            .record(&Outcome {
                scoped: Default::default(),
                reservation: Some(probe),
                usage: Some(Usage::call(5)),
                answer: Some(Answer::success()),
                tokens: None,
            })
            .changes;
        assert_eq!(script.status(), Status::Normal);
        assert_eq!(
            resolved(&changes),
            vec![NotificationKind::UpstreamQuotaExhausted]
        );
        script.admitted(0);
    }
}

#[test]
fn a_call_without_an_answer_settles_but_says_nothing_about_the_upstream() {
    let mut script = Script::new(&[(TOKENS_PER_MINUTE, 10_000)]);
    script.upstream(429, "insufficient_quota", None, &[]);
    script.at("2026-05-04T10:01:00Z");
    let probe = script.admitted(500);
    // The client went away before the upstream answered: the estimate stays
    // charged, and the billing block neither lifts nor counts an error.
    let recorded = script.record(&Outcome {
        scoped: Default::default(),
        tokens: None,
        reservation: Some(probe),
        usage: None,
        answer: None,
    });
    assert!(matches!(recorded.settled, Settled::Reservation(_)));
    assert_eq!((recorded.usage.tokens, recorded.class), (500, None));
    assert_eq!(script.status(), Status::QuotaExceeded);
    assert_eq!(script.state.snapshot(script.now).errors.server_error, 0);
}

#[test]
fn an_answer_for_a_missing_reservation_still_counts() {
    let mut script = Script::new(&[(TOKENS_PER_DAY, 10_000)]);
    let id = script.admitted(300);
    script.after(601_000);
    script.tick();
    // The reservation expired with its estimate; the billing answer that
    // comes late still blocks the workspace, and nothing is charged again.
    let recorded = script.record(&Outcome {
        scoped: Default::default(),
        tokens: None,
        reservation: Some(id),
        usage: Some(Usage::call(10)),
        answer: Some(Answer {
            status: 429,
            error: ErrorFields {
                error_type: Some("insufficient_quota"),
                code: Some("insufficient_quota"),
                message: None,
            },
            ..Answer::default()
        }),
    });
    assert_eq!(recorded.settled, Settled::Missing);
    assert_eq!(script.status(), Status::QuotaExceeded);
    assert_eq!(script.used(TOKENS_PER_DAY), 300);
}

#[test]
fn billing_messages_name_the_fix() {
    let mut script = Script::new(&[]);
    script.upstream(
        429,
        "insufficient_quota",
        Some("credit_balance_exhausted"),
        &[],
    );
    let notification = &script.state.active_notifications()[0];
    assert!(
        notification.suggested_actions[0].contains("Add credits in the OpenAI billing settings")
    );
    assert!(notification.message.contains("credit_balance_exhausted"));
}

#[test]
fn a_success_admitted_before_a_billing_block_does_not_lift_it() {
    let mut script = Script::new(&[]);
    let early = script.admitted(0);
    script
        .after(1000)
        .upstream(429, "insufficient_quota", None, &[]);
    // The early request's success says nothing about billing since the block.
    assert!(script.after(1000).settle(early, 10));
    assert_eq!(script.status(), Status::QuotaExceeded);
}

#[test]
fn request_too_large_from_upstream_blocks_nobody() {
    let mut script = Script::new(&[]);
    let changes = script.upstream(429, "tokens", Some("rate_limit_exceeded"), &[]);
    assert_eq!(
        script.status(),
        Status::RateLimited,
        "a plain 429 does block"
    );
    drop(changes);
    let mut script = Script::new(&[]);
    let recorded = script
        .record(&Outcome {
            answer: Some(Answer {
                status: 429,
                error: ErrorFields {
                    error_type: Some("tokens"),
                    code: Some("rate_limit_exceeded"),
                    message: Some("Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 31538."),
                },
                ..Answer::default()
            }),
            ..Outcome::default()
        });
    assert_eq!(
        recorded.class,
        Some(super::upstream::UpstreamClass::RequestTooLarge)
    );
    assert!(recorded.changes.is_empty());
    assert_eq!(script.status(), Status::Normal);
}

#[test]
fn upstream_errors_alarm_above_twenty_percent_and_at_least_five() {
    let mut script = Script::new(&[]);
    for _ in 0..16 {
        script.success();
    }
    for _ in 0..4 {
        assert!(script.upstream(500, "server_error", None, &[]).is_empty());
    }
    // 5 of 21 is 23.8 %: the alarm goes off.
    let changes = script.upstream(
        503,
        "service_unavailable_error",
        Some("server_is_overloaded"),
        &[],
    );
    assert_eq!(raised(&changes), vec![NotificationKind::UpstreamErrors]);
    assert_eq!(script.status(), Status::Warning);
    let notification = &script.state.active_notifications()[0];
    assert!(
        notification.message.contains("5 of 21 upstream requests"),
        "{}",
        notification.message
    );
    // A minute later the failures have left the window.
    script.after(60_000);
    let changes = script.tick();
    assert_eq!(resolved(&changes), vec![NotificationKind::UpstreamErrors]);
    let errors = script.state.snapshot(script.now).errors;
    assert_eq!(
        errors.server_error, 5,
        "the hour's error history keeps them"
    );
}

#[test]
fn a_rejected_upstream_key_is_critical_until_a_success() {
    let mut script = Script::new(&[]);
    let changes = script.upstream(401, "invalid_request_error", Some("invalid_api_key"), &[]);
    assert_eq!(raised(&changes), vec![NotificationKind::UpstreamErrors]);
    assert_eq!(
        script.state.active_notifications()[0].severity,
        Severity::Critical
    );
    let changes = script.success();
    assert_eq!(resolved(&changes), vec![NotificationKind::UpstreamErrors]);
}

#[test]
fn the_highest_cause_wins_and_since_moves_only_with_the_level() {
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 2), (REQUESTS_PER_DAY, 3)]);
    script.admitted(0);
    script.admitted(0);
    assert_eq!(script.status(), Status::RateLimited);
    let since = script.state.snapshot(script.now).since;
    script.after(61_000).admitted(0);
    assert_eq!(script.status(), Status::QuotaExceeded);
    assert_eq!(script.state.snapshot(script.now).since, script.now);
    assert!(script.now > since);
}

#[test]
fn a_timezone_change_keeps_todays_count() {
    let mut script = Script::new(&[(REQUESTS_PER_DAY, 10)]);
    script.admitted(0);
    let mut config = script.state.config().clone();
    config.timezone = "Europe/Berlin".parse().expect("zone");
    script
        .state
        .reconfigure(config, script.now, &script.settings, &mut || 1);
    assert_eq!(script.used(REQUESTS_PER_DAY), 1);
    let snapshot = script.state.snapshot(script.now);
    assert_eq!(
        snapshot.limits[0].1.resets_at,
        Some(ts("2026-05-04T22:00:00Z"))
    );
}

#[test]
fn lowering_a_limit_changes_the_status_at_once() {
    let mut script = Script::new(&[(REQUESTS_PER_DAY, 10)]);
    for _ in 0..5 {
        script.admitted(0);
    }
    let mut config = script.state.config().clone();
    config.limits.set(REQUESTS_PER_DAY, Some(5));
    let changes = script
        .state
        .reconfigure(config, script.now, &script.settings, &mut || 7);
    assert_eq!(script.status(), Status::QuotaExceeded);
    assert!(raised(&changes).contains(&NotificationKind::QuotaExhausted(Period::Day)));
}

#[test]
fn saved_state_restores_counters_blocks_and_status() {
    let mut script = Script::new(&[(REQUESTS_PER_DAY, 10), (TOKENS_PER_MINUTE, 1000)]);
    let id = script.admitted(300);
    script.upstream(
        429,
        "insufficient_quota",
        Some("credit_balance_exhausted"),
        &[],
    );
    let saved = script.state.save(None);
    let notifications = script.state.active_notifications().to_vec();
    let config = script.state.config().clone();
    script.after(5000);
    let mut restored = WorkspaceState::restore(config, saved, notifications, script.now);
    assert_eq!(restored.status(), Status::QuotaExceeded);
    let snapshot = restored.snapshot(script.now);
    assert_eq!(
        snapshot.limits[0].1.used, 2,
        "the admitted call and the reported one"
    );
    assert_eq!(snapshot.limits[1].1.used, 300);
    assert!(snapshot.blocked);
    let outcome = Outcome {
        scoped: Default::default(),
        tokens: None,
        reservation: Some(id),
        usage: Some(Usage::call(100)),
        answer: Some(Answer::success()),
    };
    let recorded = restored.record(&outcome, script.now, &script.settings, &mut || 9);
    assert!(
        matches!(recorded.settled, Settled::Reservation(_)),
        "reservations survive"
    );
    assert_eq!(restored.snapshot(script.now).limits[1].1.used, 100);
}

impl Script {
    fn enforce(&mut self, enforcement: Enforcement) -> Vec<Change> {
        let mut next_id = self.next_id;
        let changes =
            self.state
                .set_enforcement(enforcement, self.now, &self.settings, &mut || {
                    next_id += 1;
                    next_id
                });
        self.next_id = next_id;
        changes
    }
}

#[test]
fn a_share_of_the_limits_is_enforced_as_the_whole_would_be() {
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 10), (REQUESTS_PER_DAY, 1000)]);
    for _ in 0..3 {
        script.admitted(0);
    }
    script.enforce(Enforcement::Share(2));
    assert!(script.state.snapshot(script.now).degraded);
    let minute = script.facts(REQUESTS_PER_MINUTE);
    assert_eq!((minute.used, minute.max), (3, 5));
    script.admitted(0);
    script.admitted(0);
    let refusal = script.refused(0);
    assert_eq!(refusal.cause, RefusalCause::Limit(REQUESTS_PER_MINUTE));
    assert_eq!(refusal.max, 5);

    script.enforce(Enforcement::Whole);
    assert!(!script.state.snapshot(script.now).degraded);
    script.admitted(0);
}

#[test]
fn counting_only_admits_beyond_the_limits_but_not_through_a_billing_block() {
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 2)]);
    script.enforce(Enforcement::CountOnly);
    for _ in 0..4 {
        script.admitted(0);
    }
    assert_eq!(
        script.state.snapshot(script.now).status,
        Status::RateLimited
    );
    script.upstream(429, "insufficient_quota", Some("insufficient_quota"), &[]);
    let refusal = script.refused(0);
    assert_eq!(
        refusal.cause,
        RefusalCause::UpstreamQuota(BillingCode::InsufficientQuota)
    );
}

#[test]
fn loaded_counts_replace_the_counts_and_a_day_that_is_over_counts_nothing() {
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 10), (REQUESTS_PER_DAY, 100)]);
    let second = script.now.millis() / 1000;
    let counts = |requests, day_start| {
        let mut counts = Counts {
            minute: vec![(second, Usage::requests(requests))],
            calendars: [(ts("2026-05-01T00:00:00Z"), Usage::requests(requests)); Period::ALL.len()],
        };
        counts.calendars[Period::Day.index()].0 = ts(day_start);
        counts
    };
    script
        .state
        .load_counts(&counts(7, "2026-05-04T00:00:00Z"), script.now);
    assert_eq!(
        (
            script.used(REQUESTS_PER_MINUTE),
            script.used(REQUESTS_PER_DAY)
        ),
        (7, 7)
    );
    script
        .state
        .load_counts(&counts(9, "2026-05-03T00:00:00Z"), script.now);
    assert_eq!(
        (
            script.used(REQUESTS_PER_MINUTE),
            script.used(REQUESTS_PER_DAY)
        ),
        (9, 0)
    );
}

#[test]
fn a_reservation_charged_elsewhere_is_taken_once_and_never_saved() {
    let mut script = Script::new(&[(TOKENS_PER_MINUTE, 10_000)]);
    let now = script.now;
    let charged_us = now.millis() * 1000 + 250;
    // The proxy's reservation is held here, to be settled where it was
    // charged.
    script.admit_elsewhere(1, false, charged_us);
    assert_eq!(
        script.state.reservation_estimate(1),
        None,
        "not charged here"
    );
    let held = script
        .state
        .take_reservation_charged_elsewhere(1, now)
        .expect("held");
    assert_eq!(
        (held.estimate.tokens, held.charged_elsewhere_us),
        (40, Some(charged_us))
    );
    assert!(
        script
            .state
            .take_reservation_charged_elsewhere(1, now)
            .is_none(),
        "taken once"
    );
    // Put back, it is settled here; one whose time ran out meanwhile ends,
    // keeping its estimate.
    assert_eq!(
        script.state.return_reservation(held.clone(), now),
        Returned::Held {
            estimate: Usage::call(40)
        }
    );
    assert_eq!(script.state.reservation_estimate(1), Some(Usage::call(40)));
    let later = now.plus(script.settings.reservation_ttl);
    match script.state.return_reservation(held, later) {
        Returned::Expired(expired) => assert_eq!(expired.usage.tokens, 40),
        held => panic!("expected it to expire, got {held:?}"),
    }
    // The REST API's is left where it was charged, which any instance asks.
    script.admit_elsewhere(2, true, charged_us);
    assert!(
        script
            .state
            .take_reservation_charged_elsewhere(2, now)
            .is_none()
    );
    // Instances share what they save: one held here is not saved, and a
    // reset here leaves its estimate to the counters that charged it.
    script.admit_elsewhere(3, false, charged_us);
    assert!(
        script
            .state
            .save(None)
            .reservations
            .iter()
            .all(|reservation| reservation.id == 1)
    );
    script.state.reset(now);
    let held = script
        .state
        .take_reservation_charged_elsewhere(3, now)
        .expect("held");
    assert_eq!(held.estimate.tokens, 40);
    script.state.return_reservation(held, now);
    // Its time up, it is not taken to be settled, but expires, naming
    // when it was charged there.
    script.after(script.settings.reservation_ttl.as_millis() as i64 + 1);
    let ran_out = Reservation {
        id: 4,
        charged_at: script.now,
        estimate: Usage::call(5),
        expires_at: script.now,
        model: None,
        probe: false,
        charged_elsewhere_us: Some(charged_us),
    };
    assert!(matches!(
        script.state.return_reservation(ran_out, script.now),
        Returned::Expired(Expired {
            charged_elsewhere_us: Some(_),
            ..
        })
    ));
}

impl Script {
    /// Concludes reservation `id` of 40 tokens, admitted now by counters
    /// kept elsewhere at `charged_us` of their clock.
    fn admit_elsewhere(&mut self, id: u64, settled_anywhere: bool, charged_us: i64) {
        let admitted = Admitted {
            id,
            charged_at: self.now,
            expires_at: self.now.plus(self.settings.reservation_ttl),
            probe: false,
        };
        let request = Request {
            scoped: Default::default(),
            estimate: Usage::call(40),
            model: None,
            settled_anywhere,
        };
        let admission = self.state.conclude_admission_made_elsewhere(
            Some(admitted),
            &request,
            charged_us,
            self.now,
            &self.settings,
            &mut || 99,
        );
        assert!(admission.result.is_ok());
    }
}

fn notification_ids(changes: &[Change]) -> (Vec<String>, Vec<String>) {
    let mut raised = Vec::new();
    let mut resolved = Vec::new();
    for change in changes {
        match change {
            Change::Raised(n) => raised.push(n.id.clone()),
            Change::Resolved(n) => resolved.push(n.id.clone()),
            Change::Status { .. } => {}
        }
    }
    (raised, resolved)
}

/// Two instances: `a` sees the upstream's answers, `b` draws other fresh
/// ids, so that only an agreed id can be the same on both.
fn two_instances() -> (Script, Script) {
    let a = Script::new(&[(REQUESTS_PER_MINUTE, 100)]);
    let mut b = Script::new(&[(REQUESTS_PER_MINUTE, 100)]);
    b.next_id = 1_000_000;
    (a, b)
}

#[test]
fn a_billing_blocks_notification_has_one_id_wherever_the_block_is_seen() {
    let (mut a, mut b) = two_instances();
    a.upstream(429, "insufficient_quota", Some("insufficient_quota"), &[]);
    let block = a.state.blocks().billing.expect("blocked");
    let on_a = a.state.active_notifications()[0].id.clone();
    b.after(300);
    let (raised, _) = notification_ids(&b.load(Blocks {
        rate_until: None,
        billing: Some(block),
    }));
    assert_eq!(raised, vec![on_a.clone()]);

    // The block lifts; a later one is another notification.
    a.after(1000);
    a.state.reset(a.now);
    a.upstream(429, "insufficient_quota", Some("insufficient_quota"), &[]);
    let again = a.state.active_notifications()[0].id.clone();
    assert_ne!(again, on_a);
}

#[test]
fn an_instance_that_started_a_billing_block_later_takes_the_id_of_the_earlier_start() {
    let (mut a, mut b) = two_instances();
    a.upstream(429, "insufficient_quota", Some("insufficient_quota"), &[]);
    let earlier = a.state.blocks().billing.expect("blocked");
    let on_a = a.state.active_notifications()[0].id.clone();
    // B saw a block of its own at the same moment, before loading A's.
    b.after(5)
        .upstream(429, "insufficient_quota", Some("insufficient_quota"), &[]);
    let own = b.state.active_notifications()[0].id.clone();
    assert_ne!(own, on_a);
    // The store kept the earlier start; loaded, the notification follows.
    let earlier_block = Blocks {
        rate_until: None,
        billing: Some(earlier),
    };
    let (raised, resolved) = notification_ids(&b.load(earlier_block));
    assert_eq!((raised, resolved), (vec![on_a.clone()], vec![own]));
    assert_eq!(b.state.active_notifications().len(), 1);
    assert_eq!(b.status(), Status::QuotaExceeded);
    // Loading the same block again changes nothing.
    assert!(notification_ids(&b.load(earlier_block)).0.is_empty());
}

#[test]
fn an_agreed_id_renames_an_unseen_notification_and_reissues_a_seen_one() {
    let mut script = Script::new(&[(REQUESTS_PER_MINUTE, 10)]);
    for _ in 0..8 {
        assert!(script.admit(0).result.is_ok());
    }
    let active_ids = |script: &Script| -> Vec<String> {
        script
            .state
            .active_notifications()
            .iter()
            .map(|n| n.id.clone())
            .collect()
    };
    let drawn = active_ids(&script);
    assert_eq!(drawn.len(), 1, "approaching");
    // Nobody saw it yet: it only changes its name.
    assert!(script.state.rename_notification(&drawn[0], "ntf_agreed"));
    assert_eq!(active_ids(&script), vec!["ntf_agreed".to_owned()]);
    // Seen under one id, agreed under another: that one replaces it.
    let changes = script
        .state
        .reissue_notification("ntf_agreed", "ntf_elsewhere", script.now);
    assert_eq!(
        notification_ids(&changes),
        (
            vec!["ntf_elsewhere".to_owned()],
            vec!["ntf_agreed".to_owned()]
        )
    );
    assert_eq!(active_ids(&script), vec!["ntf_elsewhere".to_owned()]);
    assert_eq!(script.status(), Status::Warning);
    // A notification no longer active is left alone.
    assert!(!script.state.rename_notification("ntf_agreed", "ntf_late"));
    assert!(
        script
            .state
            .reissue_notification("ntf_agreed", "ntf_late", script.now)
            .is_empty()
    );
}

#[test]
fn a_month_limit_refuses_until_the_local_start_of_the_next_month() {
    // Berlin switches to summer time on 29 March 2026: March starts at UTC+1
    // and ends at UTC+2, so April begins at 22:00 UTC on 31 March.
    let mut script = Script::with_config(
        &[(REQUESTS_PER_MONTH, 2), (REQUESTS_PER_DAY, 100)],
        "Europe/Berlin",
        ts("2026-03-02T12:00:00Z"),
    );
    script.admitted(0);
    script.at("2026-03-31T21:59:00Z").admitted(0);
    assert_eq!(
        script.used(REQUESTS_PER_DAY),
        1,
        "a new day, the same month"
    );
    let refusal = script.at("2026-03-31T21:59:59.999Z").refused(0);
    assert_eq!(refusal.cause, RefusalCause::Limit(REQUESTS_PER_MONTH));
    assert_eq!((refusal.used, refusal.max), (2, 2));
    assert_eq!(refusal.retry_at, Some(ts("2026-03-31T22:00:00Z")));
    assert!(!refusal.retryable, "the month's end is no short wait");
    assert!(script.state.refuses_any_request(script.now));
    assert_eq!(script.status(), Status::QuotaExceeded);
    assert!(script.active_kinds().contains(&(
        NotificationKind::QuotaExhausted(Period::Month),
        Some(REQUESTS_PER_MONTH)
    )));
    script.at("2026-03-31T22:00:00Z");
    assert!(!script.state.refuses_any_request(script.now));
    let changes = script.tick();
    assert_eq!(script.status(), Status::Normal);
    assert!(resolved(&changes).contains(&NotificationKind::QuotaExhausted(Period::Month)));
    script.admitted(0);
    assert_eq!(script.used(REQUESTS_PER_MONTH), 1);
    assert_eq!(
        script.facts(REQUESTS_PER_MONTH).resets_at,
        Some(ts("2026-04-30T22:00:00Z"))
    );
    assert_eq!(
        script
            .state
            .snapshot(script.now)
            .usage
            .calendar(Period::Month)
            .requests,
        1
    );
}

#[test]
fn a_month_rolls_over_at_local_midnight_in_every_timezone() {
    // (zone, the month's last millisecond, the next month's first) in UTC.
    let cases = [
        ("UTC", "2026-12-31T23:59:59.999Z", "2027-01-01T00:00:00Z"),
        (
            "Asia/Tokyo",
            "2026-04-30T14:59:59.999Z",
            "2026-04-30T15:00:00Z",
        ),
        // October ends in summer time in New York (UTC-4)...
        (
            "America/New_York",
            "2026-11-01T03:59:59.999Z",
            "2026-11-01T04:00:00Z",
        ),
        // ...and in winter time in Berlin (UTC+1), since 25 October.
        (
            "Europe/Berlin",
            "2026-10-31T22:59:59.999Z",
            "2026-10-31T23:00:00Z",
        ),
        // A leap February.
        (
            "America/Sao_Paulo",
            "2028-03-01T02:59:59.999Z",
            "2028-03-01T03:00:00Z",
        ),
    ];
    for (zone, last, first) in cases {
        let mut script = Script::with_config(&[(TOKENS_PER_MONTH, 1000)], zone, ts(last));
        script.admitted(1000);
        let refusal = script.refused(0);
        assert_eq!(refusal.retry_at, Some(ts(first)), "{zone}");
        script.at(first).admitted(1000);
        assert_eq!(script.used(TOKENS_PER_MONTH), 1000, "{zone}");
    }
}

#[test]
fn a_settlement_corrects_the_month_only_when_charged_in_it() {
    // (admitted at, settled at, actual tokens, this month's count after):
    // unused tokens come off the month they were charged in, extra ones
    // count in the month they are reported.
    let cases = [
        ("2026-05-15T10:00:00Z", "2026-05-15T10:00:30Z", 400, 400),
        ("2026-05-15T10:00:00Z", "2026-05-15T10:00:30Z", 1500, 1500),
        ("2026-05-31T23:59:50Z", "2026-06-01T00:00:10Z", 400, 0),
        ("2026-05-31T23:59:50Z", "2026-06-01T00:00:10Z", 1500, 500),
    ];
    for (admitted, settled, actual, month) in cases {
        let mut script = Script::with_config(&[(TOKENS_PER_MONTH, 100_000)], "UTC", ts(admitted));
        let id = script.admitted(1000);
        assert!(script.at(settled).settle(id, actual));
        assert_eq!(
            script.used(TOKENS_PER_MONTH),
            month,
            "{admitted} settled at {settled} with {actual}"
        );
    }
}

#[test]
fn month_texts_say_when_the_month_resets() {
    let mut script = Script::with_config(
        &[(TOKENS_PER_MONTH, 1000)],
        "Europe/Berlin",
        ts("2026-05-20T10:00:00Z"),
    );
    script.admitted(850);
    let approaching = script
        .state
        .active_notifications()
        .iter()
        .find(|n| n.kind == NotificationKind::ApproachingLimit)
        .expect("approaching")
        .clone();
    assert_eq!(approaching.severity, Severity::Warning);
    assert!(
        approaching
            .message
            .contains("850 of 1,000 tokens this month")
            && approaching
                .message
                .contains("resets at the start of next month, midnight Europe/Berlin"),
        "{}",
        approaching.message
    );
    assert!(
        approaching
            .suggested_actions
            .iter()
            .any(|a| a.contains("raise tokens_per_month")),
        "{:?}",
        approaching.suggested_actions
    );
    script.admitted(150);
    let exhausted = script
        .state
        .active_notifications()
        .iter()
        .find(|n| n.kind == NotificationKind::QuotaExhausted(Period::Month))
        .expect("exhausted")
        .clone();
    assert_eq!(exhausted.severity, Severity::Critical);
    assert_eq!(exhausted.resolves_at, Some(ts("2026-05-31T22:00:00Z")));
    assert!(
        exhausted.title.contains("monthly tokens quota"),
        "{}",
        exhausted.title
    );
    assert!(
        exhausted
            .message
            .contains("1,000 of 1,000 tokens this month"),
        "{}",
        exhausted.message
    );
    assert_eq!(exhausted.tenant.title, "Monthly limit reached");
    assert!(
        exhausted
            .tenant
            .message
            .starts_with("This month's tokens are used up")
    );
    assert!(
        exhausted
            .suggested_actions
            .iter()
            .any(|a| a.contains("\"what\":\"usage\"")),
        "an admin can unblock it now"
    );
}

#[test]
fn the_month_survives_a_new_timezone_and_goes_with_a_reset() {
    let mut script = Script::with_config(
        &[(REQUESTS_PER_MONTH, 100)],
        "UTC",
        ts("2026-05-20T10:00:00Z"),
    );
    script.admitted(0);
    let mut config = script.state.config().clone();
    config.timezone = "Pacific/Auckland".parse().expect("zone");
    script
        .state
        .reconfigure(config, script.now, &script.settings, &mut || 1);
    assert_eq!(script.used(REQUESTS_PER_MONTH), 1);
    // Auckland is UTC+12 in May: June starts at 12:00 UTC on 31 May.
    assert_eq!(
        script.facts(REQUESTS_PER_MONTH).resets_at,
        Some(ts("2026-05-31T12:00:00Z"))
    );
    script.state.reset(script.now);
    assert_eq!(script.used(REQUESTS_PER_MONTH), 0);
}

#[test]
fn the_month_is_saved_and_an_older_save_starts_it_from_today() {
    let mut script = Script::with_config(
        &[(TOKENS_PER_MONTH, 100_000), (TOKENS_PER_DAY, 100_000)],
        "Asia/Tokyo",
        ts("2026-05-20T10:00:00Z"),
    );
    script.admitted(300);
    let config = script.state.config().clone();
    let restore = |saved, at: &str| {
        let state = WorkspaceState::restore(config.clone(), saved, Vec::new(), ts(at));
        state.snapshot(ts(at)).usage
    };
    let mut saved = script.state.save(None);
    saved.calendars[Period::Month.index()].used.tokens = 5000;
    assert_eq!(
        restore(saved.clone(), "2026-05-20T11:00:00Z")
            .calendar(Period::Month)
            .tokens,
        5000
    );
    // A state saved before months were counted has the day alone: the month
    // starts from the saved day's count, if that day is in this month.
    saved
        .calendars
        .retain(|counter| counter.period == Period::Day);
    let usage = restore(saved.clone(), "2026-05-20T11:00:00Z");
    assert_eq!(
        (
            usage.calendar(Period::Day).tokens,
            usage.calendar(Period::Month).tokens
        ),
        (300, 300)
    );
    let usage = restore(saved.clone(), "2026-05-21T11:00:00Z");
    assert_eq!(
        (
            usage.calendar(Period::Day).tokens,
            usage.calendar(Period::Month).tokens
        ),
        (0, 300)
    );
    let usage = restore(saved, "2026-06-01T11:00:00Z");
    assert_eq!(
        (
            usage.calendar(Period::Day).tokens,
            usage.calendar(Period::Month).tokens
        ),
        (0, 0)
    );
}

#[test]
fn loaded_counts_carry_the_month_they_count() {
    let mut script = Script::new(&[(REQUESTS_PER_MONTH, 100)]);
    let counts = |month_start, requests| {
        let mut counts = Counts {
            minute: Vec::new(),
            calendars: [(ts("2026-05-04T00:00:00Z"), Usage::default()); Period::ALL.len()],
        };
        counts.calendars[Period::Month.index()] = (ts(month_start), Usage::requests(requests));
        counts
    };
    script
        .state
        .load_counts(&counts("2026-05-01T00:00:00Z", 40), script.now);
    assert_eq!(script.used(REQUESTS_PER_MONTH), 40);
    assert_eq!(
        script.state.counts().calendar(Period::Month).1,
        Usage::requests(40)
    );
    // A month that is over counts nothing this month.
    script
        .state
        .load_counts(&counts("2026-04-01T00:00:00Z", 90), script.now);
    assert_eq!(script.used(REQUESTS_PER_MONTH), 0);
}

#[test]
fn an_unpriced_model_is_noticed_once_and_forgotten_at_a_reset() {
    let mut script = Script::new(&[]);
    let model: super::workspace::Model = "acme-llm".into();
    let raised = script.state.note_unpriced(&model, script.now);
    let [Change::Raised(notification)] = &raised[..] else {
        panic!("one notification: {raised:?}");
    };
    assert_eq!(notification.kind, NotificationKind::UnpricedModel);
    assert_eq!(notification.severity, Severity::Warning);
    assert!(
        notification.suggested_actions[0].contains("QUOTAWATCH_PRICES_FILE"),
        "{notification:?}"
    );
    assert!(
        script.state.note_unpriced(&model, script.now).is_empty(),
        "once per model"
    );
    assert_eq!(
        script.state.snapshot(script.now).unpriced_models,
        vec![model.clone()]
    );
    // A restored state keeps its models and their notifications, so the
    // next call of one raises nothing again.
    let restored = WorkspaceState::restore(
        script.state.config().clone(),
        script.state.save(None),
        script.state.active_notifications().to_vec(),
        script.now,
    );
    assert_eq!(
        restored.snapshot(script.now).unpriced_models,
        vec![model.clone()]
    );
    let changes = script.state.reset(script.now);
    assert!(
        changes
            .iter()
            .any(|change| matches!(change, Change::Resolved(n) if n.id == notification.id)),
        "{changes:?}"
    );
    assert!(script.state.snapshot(script.now).unpriced_models.is_empty());
    assert_eq!(
        script.state.note_unpriced(&model, script.now).len(),
        1,
        "noticed again after the reset"
    );
}

#[test]
fn unpriced_models_are_bounded() {
    let mut script = Script::new(&[]);
    for i in 0..super::workspace::MAX_UNPRICED_MODELS + 5 {
        let model: super::workspace::Model = format!("made-up-{i}").into();
        script.state.note_unpriced(&model, script.now);
    }
    assert_eq!(
        script.state.snapshot(script.now).unpriced_models.len(),
        super::workspace::MAX_UNPRICED_MODELS
    );
    assert_eq!(
        script.state.active_notifications().len(),
        super::workspace::MAX_UNPRICED_MODELS
    );
}

#[test]
fn a_proxied_billing_answer_is_left_to_the_credential_whose_block_the_workspace_shows() {
    use super::credential::{CredentialBlock, CredentialId};
    use super::upstream::UpstreamClass;
    use super::workspace::{BillingBlock, BillingScope};

    let mut script = Script::new(&[]);
    let recorded = script.record(&Outcome {
        answer: Some(Answer {
            status: 429,
            error: ErrorFields {
                error_type: Some("insufficient_quota"),
                code: Some("insufficient_quota"),
                message: None,
            },
            billing: BillingScope::Credential,
            ..Answer::default()
        }),
        ..Outcome::default()
    });
    // Classified as billing, but the engine blocks the credential for all
    // its workspaces: no block or notification of this workspace's own.
    assert_eq!(
        recorded.class,
        Some(UpstreamClass::QuotaExhausted(
            BillingCode::InsufficientQuota
        ))
    );
    assert_eq!(script.status(), Status::Normal);
    assert!(script.state.active_notifications().is_empty());
    assert_eq!(script.state.blocks().billing, None);

    // Told of the credential's block, the workspace shows it as its own
    // would be shown, still without a notification of its own.
    let block = CredentialBlock {
        credential: CredentialId::of("sk-test", None, None),
        block: BillingBlock::answered(
            None,
            BillingCode::ProjectSpendLimitExceeded,
            script.now,
            Settings::default().probe_interval,
        ),
    };
    assert!(script.state.set_credential_block(Some(block.clone())));
    assert!(
        !script.state.set_credential_block(Some(block.clone())),
        "no change"
    );
    let snapshot = script.state.snapshot(script.now);
    assert_eq!(snapshot.status, Status::QuotaExceeded);
    assert_eq!(
        snapshot.reasons,
        vec!["upstream_project_spend_limit_exceeded"]
    );
    assert!(snapshot.blocked);
    assert_eq!(snapshot.billing, None, "not the workspace's own");
    assert_eq!(snapshot.credential_block, Some(block));
    assert!(script.state.active_notifications().is_empty());
    assert!(script.state.set_credential_block(None));
    assert_eq!(script.state.snapshot(script.now).status, Status::Normal);
}

/// A workspace with scoped limits, admitting calls of a model by a user.
mod scoped {
    use super::*;
    use crate::domain::scope::{RuleInput, ScopeKind, ScopeValue, ScopeValues, ScopedLimits};
    use crate::domain::workspace::ScopedFacts;

    fn rule(kind: ScopeKind, listed: Option<&[&str]>, limits: &[(LimitKind, u64)]) -> RuleInput {
        let mut all = Limits::default();
        for &(kind, max) in limits {
            all.set(kind, Some(max));
        }
        RuleInput {
            kind: Some(kind),
            listed: listed.map(|listed| listed.iter().map(|p| p.to_string()).collect()),
            limits: all,
        }
    }

    fn script(workspace: &[(LimitKind, u64)], rules: &[RuleInput]) -> Script {
        let mut script = Script::new(workspace);
        let mut config = script.state.config().clone();
        config.scoped_limits = ScopedLimits::validate(rules).expect("valid rules");
        let now = script.now;
        script
            .state
            .reconfigure(config, now, &Settings::default(), &mut || 0);
        script
    }

    fn request(model: &str, user: &str, tokens: u64) -> Request {
        let user = ScopeValue::parse(ScopeKind::User, user).expect("valid");
        Request {
            estimate: Usage::call(tokens),
            model: Some(model.into()),
            scoped: ScopeValues::of(Some(user)),
            ..Request::default()
        }
    }

    impl Script {
        fn admit_as(&mut self, model: &str, user: &str, tokens: u64) -> Admission {
            let mut next_id = self.next_id;
            let admission = self.state.admit(
                &request(model, user, tokens),
                self.now,
                &self.settings,
                &mut || {
                    next_id += 1;
                    next_id
                },
            );
            self.next_id = next_id;
            admission
        }

        fn refusal_as(&mut self, model: &str, user: &str) -> super::super::workspace::Refusal {
            self.admit_as(model, user, 1).result.expect_err("refused")
        }

        fn listed_used(&self, rule: usize, kind: LimitKind) -> u64 {
            match &self.state.snapshot(self.now).scoped[rule] {
                ScopedFacts::Listed(facts) => {
                    facts
                        .iter()
                        .find(|(k, _)| *k == kind)
                        .expect("limit")
                        .1
                        .used
                }
                ScopedFacts::Each(_) => panic!("an each-rule"),
            }
        }
    }

    #[test]
    fn a_model_rule_refuses_its_models_and_lets_others_pass() {
        let mut script = script(
            &[(REQUESTS_PER_MINUTE, 100)],
            &[rule(
                ScopeKind::Model,
                Some(&["gpt-4o", "o3*"]),
                &[(REQUESTS_PER_MINUTE, 2)],
            )],
        );
        script.admit_as("gpt-4o", "a", 1).result.expect("first");
        script
            .admit_as("o3-mini", "a", 1)
            .result
            .expect("second, same counter");
        let refusal = script.refusal_as("o3", "b");
        assert_eq!(refusal.cause, RefusalCause::Limit(REQUESTS_PER_MINUTE));
        let scope = refusal.scope.expect("scoped");
        assert_eq!((scope.kind, scope.rule), (ScopeKind::Model, 0));
        assert!(refusal.retryable);
        assert_eq!(
            refusal.retry_at,
            Some(script.now.plus(Duration::from_secs(60)))
        );
        script
            .admit_as("gpt-4o-mini", "a", 1)
            .result
            .expect("another model");
    }

    #[test]
    fn a_user_rule_counts_each_user_apart() {
        let mut script = script(
            &[(REQUESTS_PER_MINUTE, 100)],
            &[rule(ScopeKind::User, None, &[(REQUESTS_PER_MINUTE, 1)])],
        );
        script.admit_as("gpt-4o", "alice", 1).result.expect("alice");
        let refusal = script.refusal_as("gpt-4o", "alice");
        assert_eq!(refusal.scope.map(|s| s.kind), Some(ScopeKind::User));
        script
            .admit_as("gpt-4o", "bob", 1)
            .result
            .expect("bob has his own");
        match &script.state.snapshot(script.now).scoped[0] {
            ScopedFacts::Each(summary) => assert_eq!((summary.tracked, summary.refused), (2, 1)),
            ScopedFacts::Listed(_) => panic!("an each-rule"),
        }
    }

    #[test]
    fn a_refusal_anywhere_charges_nothing_anywhere() {
        let mut script = script(
            &[(REQUESTS_PER_MINUTE, 3)],
            &[
                rule(
                    ScopeKind::Model,
                    Some(&["gpt-4o"]),
                    &[(REQUESTS_PER_MINUTE, 10)],
                ),
                rule(ScopeKind::User, None, &[(REQUESTS_PER_MINUTE, 1)]),
            ],
        );
        script.admit_as("gpt-4o", "alice", 1).result.expect("alice");
        // Alice's own limit refuses: the workspace and the model rule are
        // not charged.
        script.refusal_as("gpt-4o", "alice");
        assert_eq!(script.state.room().1.get(REQUESTS_PER_MINUTE), Some(2));
        assert_eq!(script.listed_used(0, REQUESTS_PER_MINUTE), 1);
        // The workspace refuses: Bob's counter is not charged.
        script.admit_as("gpt-4o", "bob", 1).result.expect("bob");
        script.admit_as("gpt-4o", "carol", 1).result.expect("carol");
        let refusal = script.refusal_as("gpt-4o", "dave");
        assert_eq!(refusal.scope, None, "the workspace's own limit");
        script.after(60_000);
        script
            .admit_as("gpt-4o", "dave", 1)
            .result
            .expect("dave charged nothing before");
        script.refusal_as("gpt-4o", "dave");
    }

    #[test]
    fn a_used_up_day_of_a_user_refuses_until_midnight() {
        let mut script = script(
            &[],
            &[rule(ScopeKind::User, None, &[(TOKENS_PER_DAY, 100)])],
        );
        script.admit_as("gpt-4o", "alice", 99).result.expect("fits");
        let refusal = script
            .admit_as("gpt-4o", "alice", 2)
            .result
            .expect_err("over the day");
        assert_eq!(refusal.cause, RefusalCause::Limit(TOKENS_PER_DAY));
        assert!(!refusal.retryable);
        assert_eq!(refusal.retry_at, Some(ts("2026-05-05T00:00:00Z")));
        let too_large = script
            .admit_as("gpt-4o", "bob", 101)
            .result
            .expect_err("too large");
        assert_eq!(too_large.cause, RefusalCause::TooLarge(TOKENS_PER_DAY));
        script.at("2026-05-05T00:00:00Z");
        script
            .admit_as("gpt-4o", "alice", 99)
            .result
            .expect("a new day");
    }

    #[test]
    fn a_settlement_corrects_each_counter_charged_once() {
        let mut script = script(
            &[],
            &[
                rule(
                    ScopeKind::Model,
                    Some(&["gpt-4o"]),
                    &[(TOKENS_PER_DAY, 1000)],
                ),
                rule(ScopeKind::User, None, &[(TOKENS_PER_DAY, 100)]),
            ],
        );
        let id = script
            .admit_as("gpt-4o", "alice", 90)
            .result
            .expect("fits")
            .id;
        script.after(1000);
        assert!(script.settle(id, 10));
        assert!(!script.settle(id, 10), "settled once");
        assert_eq!(script.listed_used(0, TOKENS_PER_DAY), 10);
        script
            .admit_as("gpt-4o", "alice", 90)
            .result
            .expect("alice got 80 back");
    }

    #[test]
    fn a_reset_clears_scopes_and_a_reconfiguration_keeps_surviving_rules() {
        let gpt = rule(
            ScopeKind::Model,
            Some(&["gpt-4o"]),
            &[(REQUESTS_PER_DAY, 2)],
        );
        let mut script = script(&[], std::slice::from_ref(&gpt));
        script.admit_as("gpt-4o", "a", 1).result.expect("one");
        // A higher maximum keeps the count: the rule selects the same.
        let mut config = script.state.config().clone();
        let mut raised = gpt.clone();
        raised.limits.set(REQUESTS_PER_DAY, Some(3));
        config.scoped_limits = ScopedLimits::validate(&[raised]).expect("valid");
        let now = script.now;
        script
            .state
            .reconfigure(config, now, &Settings::default(), &mut || 0);
        assert_eq!(script.listed_used(0, REQUESTS_PER_DAY), 1);
        script.state.reset(now);
        assert_eq!(script.listed_used(0, REQUESTS_PER_DAY), 0);
    }

    #[test]
    fn a_call_without_reservation_is_charged_to_its_scopes() {
        let mut script = script(
            &[],
            &[rule(ScopeKind::User, None, &[(REQUESTS_PER_MINUTE, 1)])],
        );
        let request = request("gpt-4o", "alice", 0);
        script.record(&Outcome {
            reservation: None,
            usage: Some(Usage::call(5)),
            answer: Some(Answer::success()),
            scoped: Some((request.model.as_deref(), &request.scoped)),
            tokens: None,
        });
        script.refusal_as("gpt-4o", "alice");
        script.admit_as("gpt-4o", "bob", 1).result.expect("bob");
    }

    #[test]
    fn a_share_divides_scoped_limits_too() {
        let mut script = script(
            &[],
            &[rule(ScopeKind::User, None, &[(REQUESTS_PER_MINUTE, 4)])],
        );
        let now = script.now;
        script
            .state
            .set_enforcement(Enforcement::Share(2), now, &Settings::default(), &mut || 0);
        script.admit_as("gpt-4o", "alice", 1).result.expect("one");
        script.admit_as("gpt-4o", "alice", 1).result.expect("two");
        script.refusal_as("gpt-4o", "alice");
    }

    #[test]
    fn per_user_state_goes_once_its_windows_are_clear() {
        let mut script = script(
            &[],
            &[rule(ScopeKind::User, None, &[(REQUESTS_PER_MINUTE, 5)])],
        );
        for user in 0..1000 {
            script
                .admit_as("gpt-4o", &format!("user-{user}"), 1)
                .result
                .expect("own budget");
        }
        let tracked = |script: &Script| match &script.state.snapshot(script.now).scoped[0] {
            ScopedFacts::Each(summary) => summary.tracked,
            ScopedFacts::Listed(_) => panic!("an each-rule"),
        };
        assert_eq!(tracked(&script), 1000);
        script.after(59_999);
        script.tick();
        assert_eq!(tracked(&script), 1000, "still in the minute");
        script.after(1);
        script.tick();
        assert_eq!(tracked(&script), 0);
    }
}

/// A workspace of `limits` whose prices hold gpt-4o and gpt-4o-mini, and
/// which spent `usd` on gpt-4o today: 10M uncached prompt tokens at
/// $2.50/M and 1.5M completion tokens at $10/M, $40 in all.
fn spent_on_gpt_4o(limits: &[(LimitKind, u64)], now: &str) -> Script {
    use super::price::{Price, PriceTable, Rates};
    use super::spend::ModelSpend;
    let mut script = Script::with_config(limits, "Europe/Berlin", ts(now));
    let per_million = |dollars: u64| dollars * 1_000_000;
    let mut models = std::collections::BTreeMap::new();
    models.insert(
        "gpt-4o".to_owned(),
        Price::new(
            "chat",
            Rates {
                input: per_million(2) + 500_000,
                cached_input: per_million(1) + 250_000,
                output: per_million(10),
            },
        ),
    );
    models.insert(
        "gpt-4o-mini".to_owned(),
        Price::new(
            "chat",
            Rates {
                input: 150_000,
                cached_input: 75_000,
                output: 600_000,
            },
        ),
    );
    script
        .state
        .use_prices(std::sync::Arc::new(PriceTable::new("2026-12-02", models)));
    let spend = ModelSpend {
        prompt: 10_000_000,
        cached: 0,
        completion: 1_500_000,
        usd: 40 * DOLLAR,
    };
    script.state.note_spend(script.now, &"gpt-4o".into(), spend);
    script
}

const DOLLAR: u64 = super::price::NANO_USD_PER_DOLLAR;

/// Charges `usd` nano-dollars as one admitted call.
fn spend_now(script: &mut Script, usd: u64) {
    let mut next_id = script.next_id;
    let admission = script.state.admit(
        &Request {
            estimate: Usage::call(0).with(super::limits::Metric::Usd, usd),
            ..Request::default()
        },
        script.now,
        &script.settings,
        &mut || {
            next_id += 1;
            next_id
        },
    );
    script.next_id = next_id;
    assert!(admission.result.is_ok(), "{admission:?}");
}

#[test]
fn a_budget_notification_suggests_a_raise_and_a_cheaper_model_with_the_figures() {
    use super::limits::USD_PER_DAY;
    // Noon in Berlin: half of the local day is over.
    let mut script = spent_on_gpt_4o(&[(USD_PER_DAY, 50 * DOLLAR)], "2026-05-04T10:00:00Z");
    spend_now(&mut script, 40 * DOLLAR);
    assert_eq!(
        script.active_kinds(),
        vec![(NotificationKind::BudgetApproaching, Some(USD_PER_DAY))],
        "one notification, of the budget's own kind"
    );
    let approaching = script.state.active_notifications()[0].clone();
    assert_eq!(approaching.severity, Severity::Warning);
    assert_eq!(
        approaching.title,
        "Workspace acme is approaching its usd_per_day budget"
    );
    assert_eq!(
        approaching.message,
        "Workspace acme has spent $40.00 of its $50.00 budget (usd_per_day) today (80%), above its warning threshold of 80%. The daily budget resets at midnight Europe/Berlin in 12h 0m (at 2026-05-04T22:00:00.000Z)."
    );
    assert_eq!(
        approaching.suggested_actions,
        vec![
            "Raise the budget: at the pace so far today's spend reaches $80.00 by its end; set usd_per_day for workspace acme to $80.00 (PATCH /api/workspaces/acme with {\"limits\":{\"usd_per_day\":80}}).".to_owned(),
            "Or move traffic to a cheaper model: gpt-4o-mini costs 6% of gpt-4o for this workload's token mix (gpt-4o's calls today cost $40.00; at gpt-4o-mini's rates they would have cost about $2.40).".to_owned(),
        ]
    );

    spend_now(&mut script, 10 * DOLLAR);
    assert_eq!(
        script.active_kinds(),
        vec![
            (NotificationKind::BudgetApproaching, Some(USD_PER_DAY)),
            (NotificationKind::BudgetExhausted, Some(USD_PER_DAY)),
        ],
        "no daily_quota_exhausted beside it"
    );
    let exhausted = script.state.active_notifications()[1].clone();
    assert_eq!(exhausted.kind.name(), "budget_exhausted");
    assert_eq!(exhausted.severity, Severity::Critical);
    assert_eq!(exhausted.resolves_at, Some(ts("2026-05-04T22:00:00Z")));
    assert_eq!(
        exhausted.message,
        "Workspace acme has spent $50.00 of its $50.00 budget (usd_per_day) today. Requests are refused with HTTP 429 workspace_budget_exceeded (x-should-retry: false) until the budget resets at midnight Europe/Berlin, in 12h 0m (at 2026-05-04T22:00:00.000Z)."
    );
    assert_eq!(
        exhausted.suggested_actions[0],
        "Raise the budget: at the pace so far today's spend reaches $100.00 by its end; set usd_per_day for workspace acme to $100.00 (PATCH /api/workspaces/acme with {\"limits\":{\"usd_per_day\":100}})."
    );
    assert!(
        exhausted.suggested_actions[1]
            .starts_with("Or move traffic to a cheaper model: gpt-4o-mini costs 6% of gpt-4o")
    );
    assert!(exhausted.suggested_actions[2].contains("\"what\":\"usage\""));
}

#[test]
fn a_budget_late_in_its_period_is_not_told_to_grow_and_a_minute_cap_names_its_spend() {
    use super::limits::{USD_PER_DAY, USD_PER_MINUTE};
    // 21:00 in Berlin: at the pace so far, $40 by 21:00 is $45.71 by midnight.
    let mut script = spent_on_gpt_4o(&[(USD_PER_DAY, 50 * DOLLAR)], "2026-05-04T19:00:00Z");
    spend_now(&mut script, 40 * DOLLAR);
    assert_eq!(
        script.state.active_notifications()[0].suggested_actions[0],
        "At the pace so far today's spend reaches $45.714285714 by its end, within the budget; if more traffic is coming, raise usd_per_day for workspace acme (PATCH /api/workspaces/acme)."
    );

    let mut script = spent_on_gpt_4o(&[(USD_PER_MINUTE, DOLLAR)], "2026-05-04T10:00:00Z");
    spend_now(&mut script, DOLLAR);
    let kinds: Vec<NotificationKind> = script
        .active_kinds()
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            NotificationKind::BudgetExhausted,
            NotificationKind::BudgetApproaching
        ],
        "no rate_limited beside them"
    );
    let capped = script.state.active_notifications()[0].clone();
    assert_eq!(capped.severity, Severity::Warning);
    assert_eq!(
        capped.suggested_actions[0],
        "If this rate of spend is expected, raise usd_per_minute for workspace acme above the $1.00 the last 60 seconds spent (PATCH /api/workspaces/acme)."
    );
    assert!(
        capped.suggested_actions[1].contains("gpt-4o-mini costs 6% of gpt-4o"),
        "a minute's cap compares today's mix: {:?}",
        capped.suggested_actions
    );
}

impl Script {
    /// Applies `limits` (the rest as configured) as an admin's edit does.
    fn set_limit(&mut self, kind: LimitKind, max: u64) -> Vec<Change> {
        let mut config = self.state.config().clone();
        config.limits.set(kind, Some(max));
        let mut next_id = self.next_id;
        let changes = self
            .state
            .reconfigure(config, self.now, &self.settings, &mut || {
                next_id += 1;
                next_id
            });
        self.next_id = next_id;
        changes
    }

    /// Uses `tokens` in one settled call, then lets the ticker run.
    fn use_then_tick(&mut self, tokens: u64) -> Vec<Change> {
        if tokens > 0 {
            let id = self.admitted(tokens);
            assert!(self.settle(id, tokens));
        }
        self.tick()
    }
}

#[test]
fn a_pace_that_runs_the_day_out_raises_one_forecast_until_the_limit_is_raised() {
    let mut script = Script::with_config(
        &[(TOKENS_PER_DAY, 100_000)],
        "UTC",
        ts("2026-05-04T00:00:00Z"),
    );
    let mut forecasts = Vec::new();
    for _ in 0..20 {
        script.after(60_000);
        let changes = script.use_then_tick(1_000);
        forecasts.extend(
            raised(&changes)
                .into_iter()
                .filter(|kind| *kind == NotificationKind::ForecastExhaustion),
        );
    }
    assert_eq!(forecasts.len(), 1, "raised once, not at every tick");
    let snapshot = script.state.snapshot(script.now);
    assert_eq!(snapshot.status, Status::Warning);
    assert!(
        snapshot
            .reasons
            .contains(&"tokens_per_day_forecast_exhaustion".to_owned()),
        "{:?}",
        snapshot.reasons
    );
    // 20,000 used at 60,000 an hour: the 80,000 left last until 01:40.
    let forecast = script.facts(TOKENS_PER_DAY).forecast.expect("a forecast");
    assert_eq!(forecast.exhausts_at, Some(ts("2026-05-04T01:40:00Z")));
    let active = &script.state.active_notifications()[0];
    assert_eq!(active.kind, NotificationKind::ForecastExhaustion);
    assert_eq!(active.severity, Severity::Warning);
    assert!(
        active.message.contains("60,000 tokens an hour"),
        "{}",
        active.message
    );
    // Raised far enough, the day no longer runs out: resolved at once.
    let changes = script.set_limit(TOKENS_PER_DAY, 10_000_000);
    assert_eq!(resolved(&changes), [NotificationKind::ForecastExhaustion]);
    assert_eq!(
        script
            .facts(TOKENS_PER_DAY)
            .forecast
            .and_then(|f| f.exhausts_at),
        None
    );
}

#[test]
fn each_threshold_is_announced_once_per_day_across_a_restart() {
    let mut script = Script::with_config(
        &[(TOKENS_PER_DAY, 1_000)],
        "UTC",
        ts("2026-05-04T10:00:00Z"),
    );
    let threshold = |changes: &[Change]| -> Vec<u8> {
        changes
            .iter()
            .filter_map(|change| match change {
                Change::Raised(n) if n.kind == NotificationKind::ThresholdCrossed => {
                    n.crossing.map(|crossing| crossing.percent)
                }
                _ => None,
            })
            .collect()
    };
    script.after(1_000);
    assert_eq!(threshold(&script.use_then_tick(600)), [50]);
    script.after(1_000);
    assert!(threshold(&script.use_then_tick(10)).is_empty(), "once");
    // A restart from the saved state and the stored notifications.
    let saved = script.state.save(Some(script.now));
    let active = script.state.active_notifications().to_vec();
    let config = script.state.config().clone();
    script.state = WorkspaceState::restore(config, saved, active, script.now);
    script.after(1_000);
    assert!(
        threshold(&script.tick()).is_empty(),
        "not again after a restart"
    );
    script.after(1_000);
    let changes = script.use_then_tick(200);
    assert_eq!(threshold(&changes), [80]);
    let crossed = script
        .state
        .active_notifications()
        .iter()
        .find(|n| n.crossing.is_some_and(|c| c.percent == 80))
        .expect("active")
        .clone();
    assert_eq!(crossed.limit, Some(TOKENS_PER_DAY));
    assert_eq!(crossed.severity, Severity::Warning);
    let crossing = crossed.crossing.expect("its numbers");
    assert_eq!((crossing.used, crossing.max), (810, 1_000));
    assert_eq!(crossing.period_end, ts("2026-05-05T00:00:00Z"));
    // Raising the limit to 1,500 puts 810 below 80 % (54 %), not below 50 %.
    let thresholds_resolved = |changes: &[Change]| {
        resolved(changes)
            .into_iter()
            .filter(|kind| *kind == NotificationKind::ThresholdCrossed)
            .count()
    };
    let changes = script.set_limit(TOKENS_PER_DAY, 1_500);
    assert_eq!(thresholds_resolved(&changes), 1);
    // The next day ends the other crossing and starts afresh.
    script.at("2026-05-05T00:00:01Z");
    let changes = script.tick();
    assert_eq!(thresholds_resolved(&changes), 1);
    assert!(
        script
            .state
            .active_notifications()
            .iter()
            .all(|n| n.kind != NotificationKind::ThresholdCrossed)
    );
    assert_eq!(threshold(&script.use_then_tick(750)), [50]);
}

/// What happens to a workspace between two ticks in
/// [`ticking_only_when_due_changes_nothing`].
#[derive(Clone, Copy, Debug)]
enum Step {
    Nothing,
    /// A call admitted with this estimate, left in flight.
    Admit(u64),
    /// The oldest call in flight settled with what it used.
    Settle(u64),
    /// A call without reservation that the upstream failed.
    UpstreamFailed,
    /// A call without reservation that the upstream refused for a while.
    UpstreamRateLimited,
}

impl Script {
    /// Does `step` now, remembering the reservations it opens in
    /// `in_flight`.
    fn take(&mut self, step: Step, in_flight: &mut std::collections::VecDeque<u64>) {
        match step {
            Step::Nothing => {}
            Step::Admit(tokens) => {
                if let Ok(admitted) = self.admit(tokens).result {
                    in_flight.push_back(admitted.id);
                }
            }
            Step::Settle(tokens) => {
                if let Some(id) = in_flight.pop_front() {
                    self.settle(id, tokens);
                }
            }
            Step::UpstreamFailed => {
                self.upstream(500, "server_error", None, &[]);
            }
            Step::UpstreamRateLimited => {
                self.upstream(429, "requests", None, &[("retry-after", "20")]);
            }
        }
    }

    fn tick_fully(&mut self) -> (bool, Vec<Expired>, Vec<Change>) {
        let mut next_id = self.next_id;
        let ticked = self.state.tick(self.now, &self.settings, &mut || {
            next_id += 1;
            next_id
        });
        self.next_id = next_id;
        ticked
    }
}

mod ticking_when_due {
    use super::*;
    use proptest::prelude::*;

    const TICK_MS: i64 = 1_000;

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Nothing),
            (1u64..400).prop_map(Step::Admit),
            (0u64..400).prop_map(Step::Settle),
            Just(Step::UpstreamFailed),
            Just(Step::UpstreamRateLimited),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The engine ticks a workspace only when `next_change_at` says a
        /// tick can change something, or after something touched it, and
        /// notes before each tick how long it rested: a workspace ticked so
        /// answers exactly what one ticked every second does, at every
        /// second, through a day's and a month's end and a rate's horizon.
        #[test]
        fn ticking_only_when_due_changes_nothing(
            steps in prop::collection::vec((0i64..900, step()), 0..8),
            idle_first in any::<bool>(),
        ) {
            let start = ts("2026-05-31T22:50:00Z");
            let limits = [(REQUESTS_PER_MINUTE, 4), (TOKENS_PER_DAY, 2_000), (TOKENS_PER_MONTH, 50_000)];
            let mut every_tick = Script::with_config(&limits, "UTC", start);
            let mut when_due = Script::with_config(&limits, "UTC", start);
            let (mut in_flight_every, mut in_flight_due) = Default::default();
            // Steps at chosen seconds, after a quiet first hour if asked.
            let mut at = if idle_first { 3_700 } else { 1 };
            let mut planned = std::collections::BTreeMap::new();
            for (gap, step) in steps {
                at += gap;
                planned.insert(at, step);
            }
            let mut due = start;
            let mut touched = false;
            let mut previous = None;
            let mut skipped = 0;
            for second in 1..=2 * 3_600 + 600 {
                let now = Timestamp::from_millis(start.millis() + second * TICK_MS);
                every_tick.now = now;
                when_due.now = now;
                let ticked = every_tick.tick_fully();
                if touched || now >= due {
                    if let Some(previous) = previous {
                        when_due.state.rested_until(previous);
                    }
                    prop_assert_eq!(when_due.tick_fully(), ticked, "at {}", now);
                    due = when_due.state.next_change_at(now, &when_due.settings);
                    touched = false;
                } else {
                    skipped += 1;
                    prop_assert_eq!(ticked, (false, Vec::new(), Vec::new()), "at {}", now);
                }
                previous = Some(now);
                prop_assert_eq!(when_due.state.snapshot(now), every_tick.state.snapshot(now), "at {}", now);
                prop_assert_eq!(when_due.state.save(Some(now)), every_tick.state.save(Some(now)), "at {}", now);
                if let Some(step) = planned.get(&second) {
                    every_tick.take(*step, &mut in_flight_every);
                    when_due.take(*step, &mut in_flight_due);
                    touched = true;
                }
            }
            prop_assert!(skipped > 0 || !idle_first, "a quiet hour is not ticked");
        }
    }
}
