//! History as the API serves it: usage per step and notifications, each the
//! database's rows merged with what the engine holds and has not written
//! yet (the flush runs every second), so that an answer never lags behind
//! the live status. Below the HTTP edge; the handlers only parse and render.

use std::time::Duration;

use crate::domain::limits::WorkspaceId;
use crate::domain::notification::Notification;
use crate::domain::time::{Period, Timestamp, duration_millis};
use crate::engine::{Engine, EngineError};
use crate::store::{Resolution, RollupDelta, Store, StoreError};

/// How many resolved notifications a history holds at most.
pub const NOTIFICATION_HISTORY_LIMIT: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("could not read history: {0}")]
    Store(#[from] StoreError),
}

/// The length of one point of a usage history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Minute,
    Hour,
    /// A local day of the workspace's timezone (23 to 25 hours around DST).
    Day,
    /// A local calendar month of the workspace's timezone, as month limits
    /// count it; made of the days that lie in it.
    Month,
}

impl Step {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "1m" => Some(Step::Minute),
            "1h" => Some(Step::Hour),
            "1d" => Some(Step::Day),
            "1mo" => Some(Step::Month),
            _ => None,
        }
    }

    fn resolution(self) -> Resolution {
        match self {
            Step::Minute => Resolution::Minute,
            Step::Hour => Resolution::Hour,
            Step::Day | Step::Month => Resolution::Day,
        }
    }

    /// A step's length; a month's counts as 30 days, so that a window of
    /// month steps is written in days (`90d`: three months).
    pub fn length(self) -> Duration {
        Duration::from_secs(match self {
            Step::Minute => 60,
            Step::Hour => 3600,
            Step::Day => 86_400,
            Step::Month => 30 * 86_400,
        })
    }

    /// The calendar period a step is, if it is one.
    fn period(self) -> Option<Period> {
        match self {
            Step::Minute | Step::Hour => None,
            Step::Day => Some(Period::Day),
            Step::Month => Some(Period::Month),
        }
    }

    /// How far back history of this step is kept.
    pub fn retention(self) -> Duration {
        self.resolution().retention()
    }

    /// How many steps `window` holds: `None` unless it is a whole number of
    /// them, at least one, within what is kept.
    pub fn count_in(self, window: Duration) -> Option<u64> {
        let step = self.length().as_millis();
        let window_ms = window.as_millis();
        (window_ms > 0 && window_ms.is_multiple_of(step) && window <= self.retention())
            .then(|| (window_ms / step) as u64)
    }

    /// Starts of the `count` steps ending with the one that holds `now`.
    fn starts(self, count: u64, now: Timestamp, tz: chrono_tz::Tz) -> Vec<i64> {
        match self.period() {
            None => {
                let length = duration_millis(self.length());
                let current = now.millis() - now.millis().rem_euclid(length);
                (0..count as i64)
                    .rev()
                    .map(|i| current - i * length)
                    .collect()
            }
            Some(period) => {
                // Local days and months vary in length (around DST changes,
                // by the calendar); walk them back.
                let mut starts = vec![period.bounds(now, tz).0.millis()];
                while (starts.len() as u64) < count {
                    let earlier = Timestamp::from_millis(starts[starts.len() - 1] - 1);
                    starts.push(period.bounds(earlier, tz).0.millis());
                }
                starts.reverse();
                starts
            }
        }
    }
}

/// Usage of `workspace` in each of the `count` steps up to now: the
/// step's start (milliseconds) and its totals.
pub async fn usage(
    engine: &Engine,
    store: &Store,
    workspace: &WorkspaceId,
    step: Step,
    count: u64,
) -> Result<Vec<(i64, RollupDelta)>, HistoryError> {
    let now = engine.now();
    let tz = engine.snapshot(workspace)?.config.timezone;
    let starts = step.starts(count, now, tz);
    let from = starts.first().copied().unwrap_or(now.millis());
    let to = now.millis() + duration_millis(step.length()) + 1;
    let _reading = engine.reading_history().await;
    let stored = store
        .history(workspace, step.resolution(), from, to)
        .await?
        .into_iter()
        .map(|row| (row.bucket, row.totals));
    let unflushed = engine.unflushed_rollups(workspace)?;
    Ok(bin(starts, stored.chain(unflushed)))
}

/// Adds each row to the step that holds it: stored rows and the minutes
/// not written yet alike (after a timezone change, stored days no longer
/// start where today's days do). Rows before the first step are left out.
fn bin(
    starts: Vec<i64>,
    rows: impl Iterator<Item = (i64, RollupDelta)>,
) -> Vec<(i64, RollupDelta)> {
    let mut totals = vec![RollupDelta::default(); starts.len()];
    for (at, delta) in rows {
        if let Some(index) = starts.partition_point(|start| *start <= at).checked_sub(1) {
            totals[index] += delta;
        }
    }
    starts.into_iter().zip(totals).collect()
}

/// The active notifications of `workspace` (service-wide ones included,
/// those for operators only when `operator` reads), most severe first; with
/// `with_history`, followed by resolved ones, newest first, at most
/// [`NOTIFICATION_HISTORY_LIMIT`].
pub async fn notifications(
    engine: &Engine,
    store: &Store,
    workspace: &WorkspaceId,
    with_history: bool,
    operator: bool,
) -> Result<Vec<Notification>, HistoryError> {
    let mut notifications = engine.active_notifications(workspace)?;
    if with_history {
        let _reading = engine.reading_history().await;
        let stored = store
            .notifications(Some(workspace), true, NOTIFICATION_HISTORY_LIMIT as i64)
            .await?;
        let unflushed = engine.unflushed_notifications(workspace);
        notifications.extend(resolved(unflushed, stored));
    }
    notifications.retain(|n| operator || !n.kind.for_operators_only());
    Ok(notifications)
}

/// Resolved notifications from what the engine has not written yet
/// (`unflushed`, whose versions are the newer) and what the database holds,
/// each once, newest first, at most [`NOTIFICATION_HISTORY_LIMIT`].
fn resolved(unflushed: Vec<Notification>, stored: Vec<Notification>) -> Vec<Notification> {
    let mut resolved: Vec<Notification> =
        unflushed.into_iter().filter(|n| !n.is_active()).collect();
    for notification in stored {
        if !notification.is_active() && resolved.iter().all(|n| n.id != notification.id) {
            resolved.push(notification);
        }
    }
    resolved.sort_by_key(|n| std::cmp::Reverse(n.created_at));
    resolved.truncate(NOTIFICATION_HISTORY_LIMIT);
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::notification::{NotificationKind, Severity, TenantText};

    const MINUTE: i64 = 60_000;

    fn at(text: &str) -> Timestamp {
        Timestamp::from_millis(
            chrono::DateTime::parse_from_rfc3339(text)
                .expect("RFC 3339")
                .timestamp_millis(),
        )
    }

    fn requests(n: i64) -> RollupDelta {
        RollupDelta {
            requests: n,
            ..RollupDelta::default()
        }
    }

    #[test]
    fn a_window_is_a_whole_number_of_steps_within_what_is_kept() {
        assert_eq!(Step::Minute.count_in(Duration::from_secs(3600)), Some(60));
        assert_eq!(
            Step::Day.count_in(Duration::from_secs(30 * 86_400)),
            Some(30)
        );
        assert_eq!(Step::Hour.count_in(Duration::from_secs(90 * 60)), None);
        assert_eq!(Step::Minute.count_in(Duration::ZERO), None);
        assert_eq!(
            Step::Minute.count_in(Step::Minute.retention() + Duration::from_secs(60)),
            None
        );
    }

    #[test]
    fn minute_steps_end_with_the_current_minute() {
        let now = at("2026-03-29T10:15:42Z");
        let starts = Step::Minute.starts(3, now, chrono_tz::UTC);
        assert_eq!(
            starts,
            vec![
                at("2026-03-29T10:13:00Z").millis(),
                at("2026-03-29T10:14:00Z").millis(),
                at("2026-03-29T10:15:00Z").millis(),
            ]
        );
    }

    #[test]
    fn local_days_follow_daylight_saving_time() {
        // Berlin moves its clocks forward on 2026-03-29: that day has 23 hours.
        let now = at("2026-03-30T12:00:00+02:00");
        let starts = Step::Day.starts(3, now, chrono_tz::Europe::Berlin);
        assert_eq!(
            starts,
            vec![
                at("2026-03-28T00:00:00+01:00").millis(),
                at("2026-03-29T00:00:00+01:00").millis(),
                at("2026-03-30T00:00:00+02:00").millis(),
            ]
        );
        assert_eq!(starts[2] - starts[1], 23 * 60 * MINUTE);
    }

    #[test]
    fn local_months_are_calendar_months_across_daylight_saving_time() {
        // March holds Berlin's change to summer time, February a leap day.
        let now = at("2028-04-10T12:00:00+02:00");
        let starts = Step::Month.starts(3, now, chrono_tz::Europe::Berlin);
        assert_eq!(
            starts,
            vec![
                at("2028-02-01T00:00:00+01:00").millis(),
                at("2028-03-01T00:00:00+01:00").millis(),
                at("2028-04-01T00:00:00+02:00").millis(),
            ]
        );
        assert_eq!(starts[1] - starts[0], 29 * 24 * 60 * MINUTE);
        assert_eq!(starts[2] - starts[1], (31 * 24 - 1) * 60 * MINUTE);
        assert_eq!(Step::parse("1mo"), Some(Step::Month));
        assert_eq!(
            Step::Month.count_in(Duration::from_secs(90 * 86_400)),
            Some(3)
        );
        assert_eq!(Step::Month.count_in(Duration::from_secs(45 * 86_400)), None);
    }

    #[test]
    fn rows_stored_and_unwritten_add_up_in_the_step_that_holds_them() {
        let starts = vec![0, 60 * MINUTE, 120 * MINUTE];
        let stored = [(5 * MINUTE, requests(2)), (61 * MINUTE, requests(3))];
        let unflushed = [(61 * MINUTE, requests(1)), (150 * MINUTE, requests(4))];
        let earlier = [(-MINUTE, requests(100))];
        let binned = bin(starts, stored.into_iter().chain(unflushed).chain(earlier));
        let counts: Vec<(i64, i64)> = binned.iter().map(|(t, d)| (*t, d.requests)).collect();
        assert_eq!(
            counts,
            vec![(0, 2), (60 * MINUTE, 4), (120 * MINUTE, 4)],
            "the row before the first step is left out"
        );
    }

    fn notification(id: &str, created: i64, resolved: Option<i64>, message: &str) -> Notification {
        Notification {
            id: id.to_owned(),
            workspace: Some("acme".parse().expect("id")),
            cause: None,
            severity: Severity::Warning,
            kind: NotificationKind::ApproachingLimit,
            title: "t".to_owned(),
            message: message.to_owned(),
            suggested_actions: Vec::new(),
            limit: None,
            crossing: None,
            created_at: Timestamp::from_millis(created),
            resolves_at: None,
            resolved_at: resolved.map(Timestamp::from_millis),
            tenant: TenantText::default(),
        }
    }

    #[test]
    fn resolved_notifications_appear_once_in_their_newest_version_newest_first() {
        let unflushed = vec![
            notification("ntf_b", 20, Some(30), "newer"),
            notification("ntf_c", 40, None, "still active"),
        ];
        let stored = vec![
            notification("ntf_a", 10, Some(15), "stored"),
            notification("ntf_b", 20, Some(30), "older"),
            notification("ntf_d", 5, None, "active when written"),
        ];
        let merged = resolved(unflushed, stored);
        let seen: Vec<(&str, &str)> = merged
            .iter()
            .map(|n| (n.id.as_str(), n.message.as_str()))
            .collect();
        assert_eq!(seen, vec![("ntf_b", "newer"), ("ntf_a", "stored")]);
    }

    #[test]
    fn a_notification_history_is_bounded() {
        let stored = (0..300)
            .map(|i| notification(&format!("ntf_{i}"), i, Some(i + 1), "m"))
            .collect();
        let merged = resolved(Vec::new(), stored);
        assert_eq!(merged.len(), NOTIFICATION_HISTORY_LIMIT);
        assert_eq!(merged[0].id, "ntf_299");
    }
}
