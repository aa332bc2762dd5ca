//! Forecasts: when each limit runs out at the rate it is being used now.
//!
//! A forecast needs a rate that follows the recent pace without jumping at
//! every burst, over a horizon that fits the window:
//!
//! - **The minute** slides, so its rate is read straight from its one-second
//!   buckets: the average of the last [`MINUTE_HORIZON`]. A longer memory
//!   would still be warning about a pace the window has long forgotten.
//! - **The day and the month** are calendar counters, which only grow within
//!   their period. Their rate is an exponentially weighted moving average of
//!   the counter's growth between samples (taken at each tick, not at each
//!   admission), with a time constant of [`DAY_HORIZON`] for the day and
//!   [`MONTH_HORIZON`] for the month. Exponential weighting needs no history
//!   beyond the last sample, adapts to a pace that changes within hours
//!   (which a linear projection from the start of the period does not), and
//!   spreads a short burst over its horizon, so that a burst followed by
//!   silence fades instead of alarming. The first sample, with nothing to
//!   compare it to (after a start or a restart), seeds the rate with the
//!   period's average so far, so that a steady pace reads exactly from the
//!   first tick.
//!
//! The counters are signed in both directions: a settlement that used fewer
//! tokens than were reserved lowers the count, and the rate with it (never
//! below zero), so that generous estimates do not inflate the forecast.
//! Both backends feed the same counters (Redis's answers are loaded into
//! the same calendar counters), so the forecast is computed alike on both.

use std::time::Duration;

use super::limits::{LimitKind, Metric, PerLimit, Window};
use super::time::{Period, Timestamp};
use super::window::{Calendars, Usage};

/// How far back the minute's rate reaches.
pub const MINUTE_HORIZON: Duration = Duration::from_secs(10);
/// The time constant of the day's smoothed rate.
pub const DAY_HORIZON: Duration = Duration::from_secs(3600);
/// The time constant of the month's smoothed rate.
pub const MONTH_HORIZON: Duration = Duration::from_secs(6 * 3600);

/// How long before a day or month limit runs out its forecast alerts, by
/// default (`QUOTAWATCH_FORECAST_LEAD_TIME`).
pub const DEFAULT_LEAD_TIME: Duration = Duration::from_secs(2 * 3600);

/// How far past the reset a projection must move before its alert ends:
/// a pace hovering around "just runs out at midnight" would otherwise
/// raise and resolve it again and again.
pub const FORECAST_HYSTERESIS: Duration = Duration::from_secs(15 * 60);

const MS_PER_HOUR: f64 = 3_600_000.0;

/// What a forecast's rate rests on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The minute's average over its last [`MINUTE_HORIZON`].
    RecentSeconds,
    /// Less than one horizon has been watched since this process started
    /// watching (or the counters were reset): the rate is still mostly the
    /// period's average so far.
    PeriodAverage,
    /// The smoothed rate over the window's horizon.
    Smoothed,
    /// The limit is used up already.
    UsedUp,
}

impl Basis {
    pub const fn name(self) -> &'static str {
        match self {
            Basis::RecentSeconds => "recent_seconds",
            Basis::PeriodAverage => "period_average",
            Basis::Smoothed => "smoothed",
            Basis::UsedUp => "used_up",
        }
    }
}

/// When a limit runs out at the recent rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Forecast {
    /// When the limit is used up at the current rate; `None` when it does
    /// not run out before it resets (a calendar period's end), or, for the
    /// minute, when the rate held for a whole minute stays within the limit.
    pub exhausts_at: Option<Timestamp>,
    /// The rate, in the limit's counter units (nano-dollars for usd) per
    /// hour.
    pub rate_per_hour: f64,
    pub basis: Basis,
    /// When the limit runs out at this rate, whether before the reset or
    /// not (`None` at a zero rate): what the alert's hysteresis compares.
    pub runs_out_at: Option<Timestamp>,
}

/// The smoothed rate of one calendar period's counter.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct PeriodRate {
    /// The last sample: when, the period it counted (by its start), what it
    /// counted.
    last: Option<(Timestamp, Timestamp, Usage)>,
    /// Per metric, in counter units per millisecond.
    per_ms: [f64; Metric::ALL.len()],
    /// How long the rate has been followed since it was seeded.
    watched_ms: i64,
}

/// The smoothed rates of every calendar period's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates([PeriodRate; Period::ALL.len()]);

/// The smoothing horizon of `period`.
/// The smallest pace kept, in units of its metric over its horizon.
const NEGLIGIBLE_PER_HORIZON: f64 = 1e-6;

pub const fn horizon(period: Period) -> Duration {
    match period {
        Period::Day => DAY_HORIZON,
        Period::Month => MONTH_HORIZON,
    }
}

impl Rates {
    /// Takes a sample of every calendar counter at `now`.
    pub fn sample(&mut self, calendars: &Calendars, now: Timestamp) {
        for period in Period::ALL {
            let counter = calendars.get(period);
            self.0[period.index()].sample(
                now,
                counter.start,
                counter.used_at(now),
                horizon(period),
            );
        }
    }

    /// Forgets every rate: the counters were reset, and what they counted
    /// before says nothing of the pace from now on.
    pub fn forget(&mut self) {
        *self = Self::default();
    }

    /// While the counters do not grow, until when samples leave what the
    /// rates answer as it is: `None` when the next sample changes it (none
    /// was taken yet, or a rate above zero, which decays at every sample);
    /// else the instant the first period that has been watched for less
    /// than its horizon reaches it (its basis becomes smoothed), or the
    /// end of time.
    pub fn steady_until(&self) -> Option<Timestamp> {
        let mut until = Timestamp::from_millis(i64::MAX);
        for period in Period::ALL {
            let rate = &self.0[period.index()];
            let (at, _, _) = rate.last?;
            if rate.per_ms.iter().any(|per_ms| *per_ms != 0.0) {
                return None;
            }
            let horizon_ms = super::time::duration_millis(horizon(period));
            if rate.watched_ms < horizon_ms {
                until = until.min(Timestamp::from_millis(
                    at.millis().saturating_add(horizon_ms - rate.watched_ms),
                ));
            }
        }
        Some(until)
    }

    /// Counts the time from the last sample until `at` as watched without
    /// growth, exactly as samples taken meanwhile would have, when every
    /// rate is zero (see [`steady_until`](Self::steady_until)): a state
    /// that was not sampled while nothing changed then measures what it
    /// grows by afterwards over the time since `at`, as if it had been.
    /// With a rate above zero it does nothing: such rates are sampled at
    /// every tick.
    pub fn rested_until(&mut self, at: Timestamp) {
        if self.steady_until().is_none() {
            return;
        }
        for rate in &mut self.0 {
            if let Some((last, counted_from, used)) = rate.last
                && at > last
            {
                rate.watched_ms = rate.watched_ms.saturating_add(at.millis() - last.millis());
                rate.last = Some((at, counted_from, used));
            }
        }
    }

    /// The smoothed rate of `metric` over `period`, per millisecond, and
    /// whether it has been followed for a whole horizon.
    fn rate(&self, period: Period, metric: Metric) -> (f64, Basis) {
        let rate = &self.0[period.index()];
        let basis = if rate.watched_ms >= super::time::duration_millis(horizon(period)) {
            Basis::Smoothed
        } else {
            Basis::PeriodAverage
        };
        (rate.per_ms[metric.index()], basis)
    }
}

impl PeriodRate {
    fn sample(&mut self, now: Timestamp, start: Timestamp, used: Usage, horizon: Duration) {
        let Some((at, counted_from, before)) = self.last else {
            // Seeded with the average since the period began, over at least
            // a minute: a call in the first second of a day is no pace.
            let elapsed = (now.millis() - start.millis()).max(60_000) as f64;
            self.per_ms = Metric::ALL.map(|metric| used.of(metric) as f64 / elapsed);
            self.last = Some((now, start, used));
            return;
        };
        let elapsed = now.millis() - at.millis();
        if elapsed <= 0 {
            return;
        }
        // A new period counts from zero: all it counted is growth.
        let before = if counted_from == start {
            before
        } else {
            Usage::default()
        };
        let horizon_ms = horizon.as_millis() as f64;
        let weight = 1.0 - (-(elapsed as f64) / horizon_ms).exp();
        for metric in Metric::ALL {
            let grown = used.of(metric) as f64 - before.of(metric) as f64;
            let instant = grown / elapsed as f64;
            let rate = &mut self.per_ms[metric.index()];
            *rate = (*rate + weight * (instant - *rate)).max(0.0);
            // A pace that decays without growth only nears zero (it would
            // stop among the smallest floats, never at zero); below a
            // millionth of a unit over the horizon it forecasts nothing in
            // any period and is zero, so that an idle workspace's rates
            // become steady and its ticks can be skipped
            // (`steady_until`).
            if *rate * horizon_ms < NEGLIGIBLE_PER_HORIZON {
                *rate = 0.0;
            }
        }
        self.watched_ms = self.watched_ms.saturating_add(elapsed);
        self.last = Some((now, start, used));
    }
}

/// The rate of one limit's metric over its window, per millisecond: the
/// minute's from its recent seconds (`recent`, what they counted), the
/// calendar windows' from `rates`.
pub fn rate_of(kind: LimitKind, rates: &Rates, recent: Usage) -> (f64, Basis) {
    match kind.window.period() {
        None => (
            recent.of(kind.metric) as f64 / MINUTE_HORIZON.as_millis() as f64,
            Basis::RecentSeconds,
        ),
        Some(period) => rates.rate(period, kind.metric),
    }
}

/// The forecast of a limit of `max` with `used` of it counted, at `rate`
/// (per millisecond), as of `now`. `resets_at` is when a calendar limit's
/// period ends; the minute never resets as a whole, so it runs out only
/// if the rate, held for a whole minute, exceeds the limit.
pub fn forecast(
    kind: LimitKind,
    used: u64,
    max: u64,
    (rate, basis): (f64, Basis),
    resets_at: Option<Timestamp>,
    now: Timestamp,
) -> Forecast {
    let rate_per_hour = rate * MS_PER_HOUR;
    if used >= max {
        return Forecast {
            exhausts_at: Some(now),
            rate_per_hour,
            basis: Basis::UsedUp,
            runs_out_at: Some(now),
        };
    }
    let runs_out_at = (rate > 0.0).then(|| {
        let remaining_ms = ((max - used) as f64 / rate).ceil();
        // Beyond any reset, a later instant says nothing more.
        Timestamp::from_millis(now.millis().saturating_add(remaining_ms.min(1e15) as i64))
    });
    let runs_out_in_time = match kind.window {
        Window::Minute => rate * 60_000.0 > max as f64,
        Window::Day | Window::Month => runs_out_at
            .zip(resets_at)
            .is_some_and(|(out, reset)| out < reset),
    };
    Forecast {
        exhausts_at: runs_out_at.filter(|_| runs_out_in_time),
        rate_per_hour,
        basis,
        runs_out_at,
    }
}

/// Whether a calendar limit's forecast alert holds: it is raised when the
/// limit runs out before its reset and within `lead` of `now`, and ends only
/// once the projection moves [`FORECAST_HYSTERESIS`] past the reset. A used-up
/// limit raises none (its own notification reports it), but keeps one raised
/// before: a settlement giving back a few tokens must not raise it again.
pub fn alerting(
    forecast: Forecast,
    resets_at: Timestamp,
    lead: Duration,
    active: bool,
    now: Timestamp,
) -> bool {
    if forecast.basis == Basis::UsedUp {
        return active;
    }
    let Some(out) = forecast.runs_out_at else {
        return false;
    };
    if active {
        out < resets_at.plus(FORECAST_HYSTERESIS)
    } else {
        out < resets_at && out <= now.plus(lead)
    }
}

/// Each calendar limit's forecast as of the last tick, with when its period
/// ends, and the earliest instant at which one of them runs out before its
/// reset. Every admission asks whether a forecast alert would be raised;
/// while the workspace is far from its limits that one instant answers it,
/// so a cold admission reads one field instead of a forecast per limit:
/// laid out in declaration order (`repr(C)`), that field comes last, next to
/// the workspace state's fields that admission reads.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct Forecasts {
    by_limit: PerLimit<Option<(Forecast, Timestamp)>>,
    /// The earliest `runs_out_at` of a forecast that [`alerting`] could
    /// raise: not used up, and running out before its reset.
    earliest_run_out: Option<Timestamp>,
}

impl Forecasts {
    pub fn new(by_limit: PerLimit<Option<(Forecast, Timestamp)>>) -> Self {
        let earliest_run_out = by_limit
            .0
            .iter()
            .flatten()
            .filter(|(forecast, _)| forecast.basis != Basis::UsedUp)
            .filter_map(|(forecast, resets_at)| forecast.runs_out_at.filter(|out| out < resets_at))
            .min();
        Self {
            by_limit,
            earliest_run_out,
        }
    }

    pub fn get(&self, kind: LimitKind) -> Option<(Forecast, Timestamp)> {
        self.by_limit.get(kind)
    }

    /// Whether no forecast would raise an alert at `now` (what [`alerting`]
    /// answers for an alert not raised yet), whatever the limit.
    pub fn none_alerting(&self, lead: Duration, now: Timestamp) -> bool {
        self.earliest_run_out.is_none_or(|out| out > now.plus(lead))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::limits::{REQUESTS_PER_MINUTE, TOKENS_PER_DAY, TOKENS_PER_MONTH};
    use crate::domain::time::Period;
    use crate::domain::window::Calendars;
    use chrono_tz::Tz;

    const MINUTE: i64 = 60_000;
    const HOUR: i64 = 60 * MINUTE;

    /// A day's counter fed `per_minute` tokens each minute from the start
    /// of the day, sampled every minute as the ticker would.
    struct Feed {
        calendars: Calendars,
        rates: Rates,
        now: Timestamp,
        tz: Tz,
    }

    impl Feed {
        /// A feed from `start`, whose first sample (seeding the rate) is
        /// taken at the end of its first minute.
        fn at(start: Timestamp, tz: Tz) -> Self {
            Self {
                calendars: Calendars::new(start, tz),
                rates: Rates::default(),
                now: start,
                tz,
            }
        }

        /// Lets `minutes` pass, adding `tokens(minute)` in each.
        fn run(&mut self, minutes: i64, tokens: impl Fn(i64) -> u64) {
            for minute in 0..minutes {
                self.now = Timestamp::from_millis(self.now.millis() + MINUTE);
                self.calendars.roll(self.now, self.tz);
                self.calendars.add(Usage::tokens(tokens(minute)));
                self.rates.sample(&self.calendars, self.now);
            }
        }

        fn forecast(&self, kind: LimitKind, max: u64) -> Forecast {
            let period = kind.window.period().expect("a calendar limit");
            let counter = self.calendars.get(period);
            forecast(
                kind,
                counter.used_at(self.now).of(kind.metric),
                max,
                rate_of(kind, &self.rates, Usage::default()),
                Some(counter.end),
                self.now,
            )
        }

        fn alerts(&self, kind: LimitKind, max: u64, active: bool) -> bool {
            let period = kind.window.period().expect("a calendar limit");
            alerting(
                self.forecast(kind, max),
                self.calendars.get(period).end,
                DEFAULT_LEAD_TIME,
                active,
                self.now,
            )
        }
    }

    fn utc(text: &str) -> Timestamp {
        Timestamp::from_millis(
            chrono::DateTime::parse_from_rfc3339(text)
                .expect("an instant")
                .timestamp_millis(),
        )
    }

    #[test]
    fn a_steady_rate_gives_the_exact_time() {
        let midnight = utc("2026-03-10T00:00:00Z");
        let mut feed = Feed::at(midnight, Tz::UTC);
        // 100 tokens a minute: 6,000 an hour; 12,000 of 20,000 by 02:00.
        feed.run(120, |_| 100);
        let forecast = feed.forecast(TOKENS_PER_DAY, 20_000);
        assert!(
            (forecast.rate_per_hour - 6_000.0).abs() < 1e-6,
            "{forecast:?}"
        );
        assert_eq!(
            forecast.exhausts_at,
            Some(utc("2026-03-10T03:20:00Z")),
            "8,000 tokens left at 6,000 an hour"
        );
        assert_eq!(forecast.basis, Basis::Smoothed);
        assert!(feed.alerts(TOKENS_PER_DAY, 20_000, false), "within 2 h");
        // A limit the day does not reach has no exhaustion time.
        let far = feed.forecast(TOKENS_PER_DAY, 1_000_000);
        assert_eq!(far.exhausts_at, None);
        assert!(
            far.runs_out_at
                .is_some_and(|at| at > utc("2026-03-11T00:00:00Z"))
        );
        assert!(!feed.alerts(TOKENS_PER_DAY, 1_000_000, false));
    }

    #[test]
    fn a_pace_that_ends_decays_to_zero_and_the_rates_become_steady() {
        let start = utc("2026-03-02T00:00:00Z");
        let mut feed = Feed::at(start, Tz::UTC);
        feed.run(60, |_| 1_000_000);
        assert_eq!(feed.rates.steady_until(), None, "a pace is sampled");
        // Silence: the day's pace (an hour's horizon) and the month's (six
        // hours') decay towards zero, and reach it within days.
        let mut minutes = 0;
        while feed.rates.steady_until().is_none() {
            feed.run(1, |_| 0);
            minutes += 1;
            assert!(minutes < 14 * 24 * 60, "still not steady after two weeks");
        }
        assert!(
            minutes > 24 * 60,
            "the month's pace lasts beyond a day: {minutes} minutes"
        );
    }

    #[test]
    fn a_burst_followed_by_silence_does_not_alert() {
        let midnight = utc("2026-03-10T00:00:00Z");
        let mut feed = Feed::at(midnight, Tz::UTC);
        feed.run(8 * 60, |_| 10);
        // 30,000 tokens in one minute at 08:00: at that pace the 85,200
        // left of the day's 120,000 would be gone in three minutes.
        feed.run(1, |_| 30_000);
        let mut alerted = false;
        for _ in 0..(6 * 60) {
            alerted |= feed.alerts(TOKENS_PER_DAY, 120_000, false);
            feed.run(1, |_| 0);
        }
        assert!(
            !alerted,
            "a burst spread over an hour leaves plenty of time"
        );
        let settled = feed.forecast(TOKENS_PER_DAY, 120_000);
        assert!(settled.rate_per_hour < 100.0, "it fades: {settled:?}");
        assert_eq!(settled.exhausts_at, None);
    }

    #[test]
    fn a_rising_rate_alerts_earlier_than_the_month_to_date_average() {
        let start = utc("2026-04-01T00:00:00Z");
        let mut feed = Feed::at(start, Tz::UTC);
        let max = 2_000_000;
        // The pace rises by one token a minute every hour.
        let pace = |minute: i64| minute as u64 / 60 + 1;
        let mut elapsed = 0;
        let mut smoothed_alert = None;
        let mut linear_alert = None;
        while elapsed < 30 * 24 * 60 && linear_alert.is_none() {
            feed.run(1, |_| pace(elapsed));
            elapsed += 1;
            let used = feed.calendars.get(Period::Month).used.tokens;
            if smoothed_alert.is_none() && feed.alerts(TOKENS_PER_MONTH, max, false) {
                smoothed_alert = Some(feed.now);
            }
            // The linear projection: the month's average so far, carried on.
            let average = used as f64 / (elapsed * MINUTE) as f64;
            let linear_out = feed.now.millis() + ((max - used.min(max)) as f64 / average) as i64;
            if linear_out <= feed.now.millis() + 2 * HOUR {
                linear_alert = Some(feed.now);
            }
        }
        let (smoothed, linear) = (
            smoothed_alert.expect("the smoothed rate alerts"),
            linear_alert.expect("the average alerts too, in the end"),
        );
        // The pace doubles the average here, so the smoothed rate alerts
        // about half the lead time sooner.
        assert!(
            linear.millis() - smoothed.millis() > HOUR / 2,
            "smoothed at {smoothed}, linear at {linear}"
        );
    }

    #[test]
    fn no_rate_no_forecast_and_a_used_up_limit_is_out_now() {
        let now = utc("2026-03-10T12:00:00Z");
        let end = utc("2026-03-11T00:00:00Z");
        let idle = forecast(
            TOKENS_PER_DAY,
            10,
            100,
            (0.0, Basis::Smoothed),
            Some(end),
            now,
        );
        assert_eq!((idle.exhausts_at, idle.runs_out_at), (None, None));
        assert_eq!(idle.rate_per_hour, 0.0);
        assert!(!alerting(idle, end, DEFAULT_LEAD_TIME, true, now));
        let used_up = forecast(
            TOKENS_PER_DAY,
            100,
            100,
            (1.0, Basis::Smoothed),
            Some(end),
            now,
        );
        assert_eq!(used_up.exhausts_at, Some(now));
        assert_eq!(used_up.basis, Basis::UsedUp);
        assert!(
            !alerting(used_up, end, DEFAULT_LEAD_TIME, false, now),
            "its exhaustion notification says it"
        );
        assert!(
            alerting(used_up, end, DEFAULT_LEAD_TIME, true, now),
            "one raised before stays until the reset"
        );
    }

    #[test]
    fn the_minute_runs_out_only_if_its_recent_pace_fills_a_minute() {
        let now = utc("2026-03-10T12:00:00Z");
        // 20 requests in the last 10 seconds: 120 a minute.
        let recent = Usage::requests(20);
        let rate = rate_of(REQUESTS_PER_MINUTE, &Rates::default(), recent);
        assert_eq!(rate.1, Basis::RecentSeconds);
        let tight = forecast(REQUESTS_PER_MINUTE, 40, 100, rate, None, now);
        assert_eq!(tight.exhausts_at, Some(utc("2026-03-10T12:00:30Z")));
        assert!((tight.rate_per_hour - 7_200.0).abs() < 1e-6);
        let roomy = forecast(REQUESTS_PER_MINUTE, 40, 500, rate, None, now);
        assert_eq!(roomy.exhausts_at, None, "120 a minute fits in 500");
    }

    #[test]
    fn the_alert_ends_only_once_the_projection_moves_well_past_the_reset() {
        let now = utc("2026-03-10T22:30:00Z");
        let reset = utc("2026-03-11T00:00:00Z");
        let at = |out: &str| Forecast {
            exhausts_at: None,
            rate_per_hour: 1.0,
            basis: Basis::Smoothed,
            runs_out_at: Some(utc(out)),
        };
        let lead = DEFAULT_LEAD_TIME;
        assert!(alerting(
            at("2026-03-10T23:50:00Z"),
            reset,
            lead,
            false,
            now
        ));
        assert!(!alerting(
            at("2026-03-11T00:05:00Z"),
            reset,
            lead,
            false,
            now
        ));
        assert!(
            alerting(at("2026-03-11T00:05:00Z"), reset, lead, true, now),
            "just past the reset holds"
        );
        assert!(!alerting(
            at("2026-03-11T00:20:00Z"),
            reset,
            lead,
            true,
            now
        ));
        let early = utc("2026-03-10T12:00:00Z");
        assert!(
            !alerting(at("2026-03-10T23:50:00Z"), reset, lead, false, early),
            "beyond the lead time"
        );
    }

    #[test]
    fn a_month_ends_at_local_midnight_and_the_next_starts_afresh() {
        // Berlin's April starts at 22:00 UTC on 31 March (summer time).
        let tz: Tz = "Europe/Berlin".parse().expect("a timezone");
        let start = utc("2026-03-31T18:00:00Z");
        let mut feed = Feed::at(start, tz);
        feed.run(3 * 60, |_| 1_000);
        let march = feed.calendars.get(Period::Month);
        assert_eq!(march.end, utc("2026-03-31T22:00:00Z"));
        // 180,000 tokens counted at 21:00 at 1,000 a minute: the 100,000
        // left would take past the end of March, so it does not run out
        // this month.
        let before = feed.forecast(TOKENS_PER_MONTH, 280_000);
        assert_eq!(before.exhausts_at, None, "{before:?}");
        feed.run(90, |_| 1_000);
        let april = feed.calendars.get(Period::Month);
        assert_eq!(april.start, utc("2026-03-31T22:00:00Z"));
        assert_eq!(
            april.used.tokens, 31_000,
            "April counts from its start: the minutes of 22:00 to 22:30"
        );
        let after = feed.forecast(TOKENS_PER_MONTH, 100_000);
        assert!(
            after.rate_per_hour > before.rate_per_hour,
            "the new month's count is growth, not a fall: {before:?} then {after:?}"
        );
        assert!(after.exhausts_at.is_some());
    }

    proptest::proptest! {
        /// `Forecasts::none_alerting` answers from one instant what asking
        /// `alerting` of every limit's forecast (none raised yet) answers.
        #[test]
        fn none_alerting_answers_what_each_forecast_would(
            limits in proptest::collection::vec(
                proptest::option::of((
                    proptest::option::of(0i64..600),
                    0i64..600,
                    proptest::bool::ANY,
                )),
                LimitKind::COUNT,
            ),
            lead_minutes in 0u64..300,
        ) {
            let now = Timestamp::from_millis(1_000_000_000);
            let minutes = |n: i64| now.plus(Duration::from_secs(n as u64 * 60));
            let lead = Duration::from_secs(lead_minutes * 60);
            let mut by_limit = PerLimit::default();
            for (kind, limit) in LimitKind::ALL.into_iter().zip(limits) {
                let forecast = limit.map(|(runs_out, resets, used_up)| {
                    let runs_out_at = runs_out.map(minutes);
                    let forecast = Forecast {
                        exhausts_at: runs_out_at,
                        rate_per_hour: 1.0,
                        basis: if used_up { Basis::UsedUp } else { Basis::Smoothed },
                        runs_out_at,
                    };
                    (forecast, minutes(resets))
                });
                by_limit.set(kind, forecast);
            }
            let each = LimitKind::ALL.into_iter().all(|kind| {
                by_limit.get(kind).is_none_or(|(forecast, resets_at)| {
                    !alerting(forecast, resets_at, lead, false, now)
                })
            });
            proptest::prop_assert_eq!(Forecasts::new(by_limit).none_alerting(lead, now), each);
        }
    }
}
