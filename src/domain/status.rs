//! The status machine: from what is observed about a workspace (usage against
//! each limit, upstream blocks and errors) to a status with reasons, and to
//! the notifications that tell people about each cause.
//!
//! Every status is the highest level among the active causes. Causes are
//! compared as a bit set on every evaluation, so the common case (nothing
//! changed) costs a few comparisons and no allocation; notification texts are
//! only written when a cause appears.

use std::time::Duration;

use super::forecast::{Forecast, Forecasts, alerting};
use super::limits::{LimitKind, Metric, PerLimit, WARNING_HYSTERESIS, Window};
use super::notification::Notification;
use super::price::PriceTable;
use super::spend::SpendBook;
use super::time::Timestamp;
use super::upstream::{BillingCode, LastError, Outcomes, UpstreamView};
use super::window::Calendars;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    Normal,
    Warning,
    RateLimited,
    QuotaExceeded,
}

impl Status {
    pub const fn name(self) -> &'static str {
        match self {
            Status::Normal => "normal",
            Status::Warning => "warning",
            Status::RateLimited => "rate_limited",
            Status::QuotaExceeded => "quota_exceeded",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Status::Normal,
            Status::Warning,
            Status::RateLimited,
            Status::QuotaExceeded,
        ]
        .into_iter()
        .find(|status| status.name() == name)
    }
}

/// One reason for a workspace not to be `normal`. Each active cause has
/// exactly one notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// Utilisation of the limit reached `warn_at` (and has not yet fallen
    /// below `warn_at - 0.05`).
    Approaching(LimitKind),
    /// The limit is used up: a minute limit rate-limits, a calendar limit (a
    /// day's, a month's) exhausts the quota.
    LimitExhausted(LimitKind),
    /// The upstream answered a transient 429; requests are held until it frees.
    UpstreamRateLimited,
    /// The upstream reported a billing problem; requests are held until a
    /// probe succeeds or an admin resets the workspace.
    UpstreamQuotaExhausted,
    /// Over 20 % of the last minute's upstream answers were server errors.
    UpstreamErrorRate,
    /// The upstream rejected quotawatch's key for this workspace.
    UpstreamKeyRejected,
    /// A calendar limit (a day's, a month's; never the minute's) is
    /// projected to run out before its period ends, within the lead time
    /// (see `domain::forecast`).
    ForecastExhaustion(LimitKind),
}

/// Limits whose windows are calendar periods: used up, they exhaust the quota.
const CALENDAR_LIMITS: usize = LimitKind::COUNT - Metric::ALL.len();

/// How many causes there are: two per limit, a forecast per calendar limit,
/// and four from the upstream.
const CAUSES: usize = 2 * LimitKind::COUNT + CALENDAR_LIMITS + 4;

impl Cause {
    /// Every cause, in the order reasons are listed within one level: used-up
    /// calendar limits (the day's, then the month's, metric by metric),
    /// the upstream's quota, used-up minute limits, the upstream's rate
    /// limit, every limit approaching, the upstream's key and errors, then
    /// the calendar limits forecast to run out.
    const ALL: [Cause; CAUSES] = {
        let mut all = [Cause::UpstreamErrorRate; CAUSES];
        let mut i = 0;
        while i < LimitKind::COUNT {
            let kind = LimitKind::ALL[i];
            all[Cause::LimitExhausted(kind).position()] = Cause::LimitExhausted(kind);
            all[Cause::Approaching(kind).position()] = Cause::Approaching(kind);
            if kind.window.period().is_some() {
                all[Cause::ForecastExhaustion(kind).position()] = Cause::ForecastExhaustion(kind);
            }
            i += 1;
        }
        all[Cause::UpstreamQuotaExhausted.position()] = Cause::UpstreamQuotaExhausted;
        all[Cause::UpstreamRateLimited.position()] = Cause::UpstreamRateLimited;
        all[Cause::UpstreamKeyRejected.position()] = Cause::UpstreamKeyRejected;
        all[Cause::UpstreamErrorRate.position()] = Cause::UpstreamErrorRate;
        all
    };

    pub fn level(self) -> Status {
        match self {
            Cause::LimitExhausted(kind) if kind.window.period().is_some() => Status::QuotaExceeded,
            Cause::UpstreamQuotaExhausted => Status::QuotaExceeded,
            Cause::LimitExhausted(_) | Cause::UpstreamRateLimited => Status::RateLimited,
            Cause::Approaching(_)
            | Cause::ForecastExhaustion(_)
            | Cause::UpstreamErrorRate
            | Cause::UpstreamKeyRejected => Status::Warning,
        }
    }

    /// The cause's place in [`Cause::ALL`].
    const fn position(self) -> usize {
        let metrics = Metric::ALL.len();
        let minute_exhausted = CALENDAR_LIMITS + 1;
        let approaching = minute_exhausted + metrics + 1;
        let forecast = approaching + LimitKind::COUNT + 2;
        match self {
            Cause::LimitExhausted(LimitKind {
                metric,
                window: Window::Minute,
            }) => minute_exhausted + metric.index(),
            // The calendar windows follow the minute in `Window::ALL`.
            Cause::LimitExhausted(LimitKind { metric, window }) => {
                (window.index() - 1) * metrics + metric.index()
            }
            Cause::UpstreamQuotaExhausted => CALENDAR_LIMITS,
            Cause::UpstreamRateLimited => minute_exhausted + metrics,
            Cause::Approaching(kind) => approaching + kind.index(),
            Cause::UpstreamKeyRejected => approaching + LimitKind::COUNT,
            Cause::UpstreamErrorRate => approaching + LimitKind::COUNT + 1,
            // Only calendar limits have one, laid out as their exhaustion.
            Cause::ForecastExhaustion(LimitKind { metric, window }) => {
                forecast + (window.index().saturating_sub(1)) * metrics + metric.index()
            }
        }
    }

    /// The cause's bit in a [`CauseSet`].
    const fn bit(self) -> u32 {
        1 << self.position()
    }

    /// The machine-readable reason listed in the status document.
    pub fn reason(self, billing: Option<BillingCode>) -> String {
        match self {
            Cause::Approaching(kind) => format!("{kind}_approaching"),
            Cause::LimitExhausted(kind) => format!("{kind}_exhausted"),
            Cause::ForecastExhaustion(kind) => format!("{kind}_forecast_exhaustion"),
            Cause::UpstreamRateLimited => "upstream_rate_limited".to_owned(),
            Cause::UpstreamQuotaExhausted => format!(
                "upstream_{}",
                billing.unwrap_or(BillingCode::InsufficientQuota).code()
            ),
            Cause::UpstreamErrorRate => "upstream_error_rate".to_owned(),
            Cause::UpstreamKeyRejected => "upstream_key_rejected".to_owned(),
        }
    }

    /// A stable key for storage.
    pub fn key(self) -> String {
        match self {
            Cause::Approaching(kind) => format!("approaching:{kind}"),
            Cause::LimitExhausted(kind) => format!("exhausted:{kind}"),
            Cause::ForecastExhaustion(kind) => format!("forecast:{kind}"),
            Cause::UpstreamRateLimited => "upstream_rate_limited".to_owned(),
            Cause::UpstreamQuotaExhausted => "upstream_quota_exhausted".to_owned(),
            Cause::UpstreamErrorRate => "upstream_error_rate".to_owned(),
            Cause::UpstreamKeyRejected => "upstream_key_rejected".to_owned(),
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|cause| cause.key() == key)
    }
}

/// How long a used-up minute limit keeps counting as used up once it has
/// room again. A workspace running at its limit gets room back every second
/// and fills it at once; without this hold its status (and notifications)
/// would flap between `rate_limited` and `warning` every second.
pub const RATE_LIMIT_HOLD: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Exhaustion {
    #[default]
    Free,
    UsedUp,
    /// Has room again, but counts as used up until then.
    HeldUntil(Timestamp),
}

/// Whether `used` of `max` is at least the fraction `threshold` of it.
fn reaches(used: u64, max: u64, threshold: f64) -> bool {
    used as f64 / max as f64 >= threshold
}

/// A set of causes as a bit mask over [`Cause::ALL`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CauseSet(u32);

impl CauseSet {
    pub fn insert(&mut self, cause: Cause) {
        self.0 |= cause.bit();
    }

    pub fn contains(self, cause: Cause) -> bool {
        self.0 & cause.bit() != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Cause> {
        Cause::ALL
            .into_iter()
            .filter(move |cause| self.contains(*cause))
    }

    pub fn level(self) -> Status {
        self.iter()
            .map(Cause::level)
            .max()
            .unwrap_or(Status::Normal)
    }

    /// Reasons of the active causes, highest level first.
    pub fn reasons(self, billing: Option<BillingCode>) -> Vec<String> {
        let mut causes: Vec<Cause> = self.iter().collect();
        causes.sort_by_key(|cause| std::cmp::Reverse(cause.level()));
        causes
            .into_iter()
            .map(|cause| cause.reason(billing))
            .collect()
    }
}

/// The cheap observations a status is derived from, gathered on every
/// admission.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observation {
    /// `(used, max)` per configured limit.
    pub usage: PerLimit<Option<(u64, u64)>>,
    /// Per configured calendar limit, its forecast (as of the last tick)
    /// and when its period ends.
    pub forecasts: Forecasts,
    /// How long before a calendar limit runs out its forecast alerts.
    pub forecast_lead: Duration,
    pub warn_at: f64,
    pub upstream_rate_limited: bool,
    pub upstream_quota_exhausted: bool,
    pub upstream_error_rate: bool,
    pub upstream_key_rejected: bool,
}

/// How one limit stands, with the timing details that notification texts need.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LimitFacts {
    pub max: u64,
    pub used: u64,
    /// When all current usage has left the window (minute limits) or the
    /// calendar period ends (day and month limits); `None` for a minute
    /// window with nothing in it.
    pub resets_at: Option<Timestamp>,
    /// The earliest time a one-request, zero-token call fits again; `None`
    /// when it fits now.
    pub frees_at: Option<Timestamp>,
    /// When the limit runs out at the recent rate; `None` where no rate is
    /// followed (scoped limits).
    pub forecast: Option<Forecast>,
}

impl LimitFacts {
    pub fn utilization(&self) -> f64 {
        if self.max == 0 {
            1.0
        } else {
            self.used as f64 / self.max as f64
        }
    }

    pub fn remaining(&self) -> u64 {
        self.max.saturating_sub(self.used)
    }
}

/// Everything a notification text may mention, computed only when one is
/// written.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    pub limits: PerLimit<Option<LimitFacts>>,
    pub upstream_blocked_until: Option<Timestamp>,
    pub billing_code: Option<BillingCode>,
    pub upstream_outcomes: Outcomes,
    pub last_error: Option<&'a LastError>,
    pub upstream: &'a UpstreamView,
    pub probe_interval: Duration,
    /// The current calendar periods, whose bounds budget texts project
    /// spend over.
    pub calendars: &'a Calendars,
    /// Spend by model in those periods, and the prices in force: what a
    /// budget notification prices a cheaper model with.
    pub spend: &'a SpendBook,
    pub prices: &'a PriceTable,
}

impl Facts<'_> {
    pub fn limit(&self, kind: LimitKind) -> LimitFacts {
        self.limits.get(kind).unwrap_or_default()
    }
}

/// What an evaluation changed, for the caller to publish, log and persist.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// The level or its reasons changed.
    Status {
        from: Status,
        to: Status,
    },
    Raised(Notification),
    Resolved(Notification),
}

/// The status of one workspace and its active notifications.
///
/// Laid out in declaration order (`repr(C)`), with what every admission
/// reads (the causes, and whether anything is remembered) last, next to the
/// workspace state's own fields that admission reads.
#[derive(Clone, Debug, PartialEq)]
#[repr(C)]
pub struct StatusTracker {
    active: Vec<Notification>,
    /// Which limits are in warning, kept separately because leaving a warning
    /// takes a lower threshold than entering it.
    approaching: PerLimit<bool>,
    /// Which calendar limits are forecast to run out, kept separately
    /// because ending the alert takes a projection well past the reset
    /// (see `forecast::alerting`).
    forecast: PerLimit<bool>,
    /// Whether each limit is used up, or held as such for a moment after
    /// (see [`RATE_LIMIT_HOLD`]).
    exhaustion: PerLimit<Exhaustion>,
    since: Timestamp,
    status: Status,
    causes: CauseSet,
    /// None of the three above remembers anything: what
    /// [`stays_clear`](Self::stays_clear) reads on every admission instead
    /// of the three, kept by [`settle_memory`](Self::settle_memory) after
    /// each change to them.
    quiet: bool,
}

impl StatusTracker {
    pub fn new(now: Timestamp) -> Self {
        Self {
            status: Status::Normal,
            since: now,
            causes: CauseSet::default(),
            approaching: PerLimit::default(),
            forecast: PerLimit::default(),
            exhaustion: PerLimit::default(),
            quiet: true,
            active: Vec::new(),
        }
    }

    /// Rebuilds a tracker from persisted parts. Causes are those of the active
    /// notifications; the next evaluation resolves whatever no longer holds.
    pub fn restore(status: Status, since: Timestamp, active: Vec<Notification>) -> Self {
        let mut causes = CauseSet::default();
        let mut approaching = PerLimit::default();
        let mut forecast = PerLimit::default();
        for cause in active.iter().filter_map(|n| n.cause) {
            causes.insert(cause);
            match cause {
                Cause::Approaching(kind) => approaching.set(kind, true),
                Cause::ForecastExhaustion(kind) => forecast.set(kind, true),
                _ => {}
            }
        }
        let mut tracker = Self {
            status,
            since,
            causes,
            approaching,
            forecast,
            exhaustion: PerLimit::default(),
            quiet: true,
            active,
        };
        tracker.settle_memory();
        tracker
    }

    /// Records whether any limit's warning, forecast or exhaustion is
    /// remembered, after a change to them.
    fn settle_memory(&mut self) {
        self.quiet = self.remembers_nothing();
    }

    fn remembers_nothing(&self) -> bool {
        self.approaching == PerLimit::default()
            && self.forecast == PerLimit::default()
            && self.exhaustion == PerLimit::default()
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn since(&self) -> Timestamp {
        self.since
    }

    pub fn causes(&self) -> CauseSet {
        self.causes
    }

    pub fn active(&self) -> &[Notification] {
        &self.active
    }

    fn observed_causes(&mut self, observation: &Observation, now: Timestamp) -> CauseSet {
        let mut causes = CauseSet::default();
        for kind in LimitKind::ALL {
            let Some((used, max)) = observation.usage.get(kind) else {
                self.approaching.set(kind, false);
                self.forecast.set(kind, false);
                self.exhaustion.set(kind, Exhaustion::Free);
                continue;
            };
            let forecast = observation
                .forecasts
                .get(kind)
                .is_some_and(|(forecast, resets_at)| {
                    alerting(
                        forecast,
                        resets_at,
                        observation.forecast_lead,
                        self.forecast.get(kind),
                        now,
                    )
                });
            self.forecast.set(kind, forecast);
            if forecast {
                causes.insert(Cause::ForecastExhaustion(kind));
            }
            if self.exhausted(kind, used >= max, now) {
                causes.insert(Cause::LimitExhausted(kind));
            }
            let threshold = if self.approaching.get(kind) {
                observation.warn_at - WARNING_HYSTERESIS
            } else {
                observation.warn_at
            };
            let approaching = reaches(used, max, threshold);
            self.approaching.set(kind, approaching);
            if approaching {
                causes.insert(Cause::Approaching(kind));
            }
        }
        self.settle_memory();
        let flags = [
            (
                observation.upstream_rate_limited,
                Cause::UpstreamRateLimited,
            ),
            (
                observation.upstream_quota_exhausted,
                Cause::UpstreamQuotaExhausted,
            ),
            (observation.upstream_error_rate, Cause::UpstreamErrorRate),
            (
                observation.upstream_key_rejected,
                Cause::UpstreamKeyRejected,
            ),
        ];
        for (active, cause) in flags {
            if active {
                causes.insert(cause);
            }
        }
        causes
    }

    /// Whether the limit counts as used up: it is, or it is a minute limit
    /// that was within the last [`RATE_LIMIT_HOLD`].
    fn exhausted(&mut self, kind: LimitKind, used_up: bool, now: Timestamp) -> bool {
        let next = match (used_up, self.exhaustion.get(kind)) {
            (true, _) => Exhaustion::UsedUp,
            (false, Exhaustion::UsedUp) if kind.window == Window::Minute => {
                Exhaustion::HeldUntil(now.plus(RATE_LIMIT_HOLD))
            }
            (false, Exhaustion::HeldUntil(until)) if now < until => Exhaustion::HeldUntil(until),
            (false, _) => Exhaustion::Free,
        };
        self.exhaustion.set(kind, next);
        next != Exhaustion::Free
    }

    /// Whether observing the configured limits at these `(used, max)`,
    /// with no upstream cause, would change nothing: no cause is
    /// active, none would appear (no limit near its warning, none forecast
    /// to run out), and no limit's warning, forecast or exhaustion is still
    /// being remembered. It answers what [`observe`](Self::observe) would,
    /// for the one case that is nearly every call of a workspace far from
    /// its limits, without the cost of building an [`Observation`] of every
    /// limit kind.
    pub fn stays_clear(
        &self,
        mut usage: impl Iterator<Item = (u64, u64)>,
        warn_at: f64,
        forecasts: &Forecasts,
        forecast_lead: Duration,
        now: Timestamp,
    ) -> bool {
        debug_assert_eq!(
            self.quiet,
            self.remembers_nothing(),
            "the tracker's memory changed without settle_memory"
        );
        self.causes == CauseSet::default()
            && self.quiet
            && forecasts.none_alerting(forecast_lead, now)
            && usage.all(|(used, max)| used < max && !reaches(used, max, warn_at))
    }

    /// Re-derives the causes from `observation`. Returns the new set when
    /// it differs from the current one; the caller then writes the
    /// notifications of the causes that [`appeared`](Self::appeared) and
    /// completes the change with [`transition`](Self::transition).
    pub fn observe(&mut self, observation: &Observation, now: Timestamp) -> Option<CauseSet> {
        let causes = self.observed_causes(observation, now);
        (causes != self.causes).then_some(causes)
    }

    /// The causes in `causes` that are not active yet.
    pub fn appeared(&self, causes: CauseSet) -> impl Iterator<Item = Cause> + '_ {
        causes.iter().filter(|cause| !self.causes.contains(*cause))
    }

    /// Switches to `causes`: resolves the notifications of causes that ended,
    /// adds `raised` (one per appeared cause, or one that replaces the
    /// notification of an active cause, which is then resolved) and updates
    /// the level.
    pub fn transition(
        &mut self,
        causes: CauseSet,
        raised: Vec<Notification>,
        now: Timestamp,
    ) -> Vec<Change> {
        self.causes = causes;
        let from = self.status;
        self.status = causes.level();
        if self.status != from {
            self.since = now;
        }
        let mut changes = vec![Change::Status {
            from,
            to: self.status,
        }];
        let (ended, kept): (Vec<Notification>, Vec<Notification>) =
            std::mem::take(&mut self.active).into_iter().partition(|n| {
                n.cause.is_some_and(|cause| {
                    !causes.contains(cause) || raised.iter().any(|r| r.cause == Some(cause))
                })
            });
        self.active = kept;
        for mut notification in ended {
            notification.resolved_at = Some(now);
            changes.push(Change::Resolved(notification));
        }
        for notification in raised {
            self.active.push(notification.clone());
            changes.push(Change::Raised(notification));
        }
        changes
    }

    /// Raises `notification`, which reports no cause: it stays active until
    /// the workspace is reset (see [`clear`](Self::clear)).
    pub fn raise(&mut self, notification: Notification) -> Change {
        self.active.push(notification.clone());
        Change::Raised(notification)
    }

    /// Gives the active notification `from` the id `to`, telling no one:
    /// for a notification nobody has seen yet. Answers whether it was
    /// active.
    pub fn rename(&mut self, from: &str, to: &str) -> bool {
        let Some(notification) = self.active.iter_mut().find(|n| n.id == from) else {
            return false;
        };
        to.clone_into(&mut notification.id);
        true
    }

    /// Replaces the active notification `from` by the same notification
    /// under the id `to`: the one resolved, the other raised. For a
    /// notification already seen under an id that turned out not to be the
    /// one agreed on; nothing changes when `from` is no longer active.
    pub fn reissue(&mut self, from: &str, to: &str, now: Timestamp) -> Vec<Change> {
        let Some(notification) = self.active.iter().find(|n| n.id == from) else {
            return Vec::new();
        };
        let renamed = Notification {
            id: to.to_owned(),
            ..notification.clone()
        };
        self.transition(self.causes, vec![renamed], now)
    }

    /// Resolves the active notifications without a cause that `ends`
    /// picks (threshold crossings that ended).
    pub fn resolve_where(
        &mut self,
        ends: impl Fn(&Notification) -> bool,
        now: Timestamp,
    ) -> Vec<Change> {
        let (ended, kept): (Vec<Notification>, Vec<Notification>) =
            std::mem::take(&mut self.active)
                .into_iter()
                .partition(|n| n.cause.is_none() && ends(n));
        self.active = kept;
        ended
            .into_iter()
            .map(|mut notification| {
                notification.resolved_at = Some(now);
                Change::Resolved(notification)
            })
            .collect()
    }

    /// Forgets every cause (an admin reset), resolving their notifications.
    pub fn clear(&mut self, now: Timestamp) -> Vec<Change> {
        self.approaching = PerLimit::default();
        self.forecast = PerLimit::default();
        // A reset frees the limits at once: no hold against flapping.
        self.exhaustion = PerLimit::default();
        self.settle_memory();
        // Notifications without a cause end with the reset too.
        let (ended, kept) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|n| n.cause.is_none());
        self.active = kept;
        let mut changes: Vec<Change> = ended
            .into_iter()
            .map(|mut notification: Notification| {
                notification.resolved_at = Some(now);
                Change::Resolved(notification)
            })
            .collect();
        if self.causes != CauseSet::default() {
            changes.extend(self.transition(CauseSet::default(), Vec::new(), now));
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_has_its_own_bit_in_the_listed_order() {
        for (position, cause) in Cause::ALL.iter().enumerate() {
            assert_eq!(cause.bit(), 1 << position, "{cause:?}");
            assert_eq!(Cause::from_key(&cause.key()), Some(*cause));
        }
        let keys: std::collections::HashSet<String> =
            Cause::ALL.iter().map(|cause| cause.key()).collect();
        assert_eq!(keys.len(), CAUSES, "no cause is listed twice");
        assert!(CAUSES <= u32::BITS as usize, "every cause fits in a set");
    }

    mod properties {
        use super::*;
        use crate::domain::forecast::Basis;
        use proptest::prelude::*;

        /// One limit in a step: `(used, max)`, when its forecast runs out
        /// (minutes from now) if it has one (calendar limits only), and
        /// whether that forecast is of a limit used up.
        type Limit = (u64, u64, Option<i64>, bool);

        /// One step of a workspace's life: each limit kind, set or not.
        fn step() -> impl Strategy<Value = Vec<Option<Limit>>> {
            let limit = (
                0u64..120,
                1u64..100,
                prop::option::of(0i64..600),
                any::<bool>(),
            );
            prop::collection::vec(prop::option::of(limit), LimitKind::COUNT)
        }

        proptest! {
            /// `stays_clear` is a shortcut of `observe`: whenever it says the
            /// status stays clear, observing changes neither the causes nor
            /// anything the tracker remembers.
            #[test]
            fn stays_clear_answers_what_observe_would(
                steps in prop::collection::vec(step(), 1..40),
                warn_percent in 20u32..=100,
            ) {
                let warn_at = f64::from(warn_percent) / 100.0;
                let lead = Duration::from_secs(2 * 3600);
                let mut tracker = StatusTracker::new(Timestamp::from_millis(0));
                for (index, limits) in steps.into_iter().enumerate() {
                    let now = Timestamp::from_millis(1_000_000 + index as i64 * 500);
                    let mut observation = Observation {
                        warn_at,
                        forecast_lead: lead,
                        ..Observation::default()
                    };
                    let mut forecasts = PerLimit::default();
                    for (kind, limit) in LimitKind::ALL.into_iter().zip(limits) {
                        let Some((used, max, runs_out, used_up)) = limit else { continue };
                        observation.usage.set(kind, Some((used, max)));
                        if kind.window.period().is_some() {
                            let runs_out_at = runs_out.map(|minutes| now.plus(Duration::from_secs(minutes as u64 * 60)));
                            let forecast = Forecast {
                                exhausts_at: runs_out_at,
                                rate_per_hour: 1.0,
                                basis: if used_up { Basis::UsedUp } else { Basis::Smoothed },
                                runs_out_at,
                            };
                            forecasts.set(kind, Some((forecast, now.plus(Duration::from_secs(3 * 3600)))));
                        }
                    }
                    observation.forecasts = Forecasts::new(forecasts);
                    let configured = LimitKind::ALL.into_iter().filter_map(|kind| observation.usage.get(kind));
                    let clear = tracker.stays_clear(
                        configured,
                        warn_at,
                        &observation.forecasts,
                        lead,
                        now,
                    );
                    let before = tracker.clone();
                    let observed = tracker.observe(&observation, now);
                    if clear {
                        prop_assert_eq!(observed, None);
                        prop_assert_eq!(&tracker, &before);
                    }
                    if let Some(causes) = observed {
                        tracker.transition(causes, Vec::new(), now);
                    }
                }
            }
        }
    }

    #[test]
    fn a_used_up_month_exceeds_the_quota_like_a_day() {
        let month = LimitKind::new(Metric::Tokens, Window::Month);
        assert_eq!(Cause::LimitExhausted(month).level(), Status::QuotaExceeded);
        assert_eq!(Cause::Approaching(month).level(), Status::Warning);
        let listed: Vec<String> = Cause::ALL
            .iter()
            .filter(|cause| cause.level() == Status::QuotaExceeded)
            .map(|cause| cause.reason(None))
            .collect();
        assert_eq!(
            listed,
            [
                "requests_per_day_exhausted",
                "tokens_per_day_exhausted",
                "usd_per_day_exhausted",
                "requests_per_month_exhausted",
                "tokens_per_month_exhausted",
                "usd_per_month_exhausted",
                "upstream_insufficient_quota",
            ]
        );
    }
}
