//! Alert thresholds: the shares of a day or month limit (50 %, 80 %, ...)
//! whose crossing is announced once per limit and period.
//!
//! Each crossing raises one `threshold_crossed` notification, named by the
//! workspace, the limit, its maximum, the threshold and the period's start,
//! so that every instance sharing the counters, and a restarted one, names
//! it alike and the store keeps one row of it. Which thresholds fired in the
//! current period is part of the workspace's saved state, so a restart does
//! not announce them again. A crossing ends (its notification resolves)
//! when the period ends, when the counters are reset, or when an admin
//! raises the limit so that the usage is below the threshold again; it can
//! then be crossed anew.
//!
//! The sliding minute has no thresholds: it fills and empties within
//! seconds, so "once per window" would mean an alert a minute, which its
//! `approaching_limit` and `rate_limited` notifications already cover with
//! hysteresis.

use super::limits::{LimitKind, PerLimit, ValidationError, Window};
use super::time::Timestamp;

/// The thresholds a workspace has unless it sets its own.
pub const DEFAULT_PERCENTS: [u8; 4] = [50, 80, 95, 100];

/// The highest threshold: the limit itself.
pub const MAX_PERCENT: u8 = 100;

/// A set of whole percentages from 1 to 100, as a bit set: copied with the
/// configuration, compared in one instruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percents(u128);

impl Percents {
    /// The set holding `percents`, each from 1 to [`MAX_PERCENT`].
    pub const fn of(percents: &[u8]) -> Self {
        let mut set = 0u128;
        let mut i = 0;
        while i < percents.len() {
            set |= 1 << percents[i];
            i += 1;
        }
        Self(set)
    }

    pub fn contains(self, percent: u8) -> bool {
        percent <= MAX_PERCENT && self.0 & (1 << percent) != 0
    }

    pub fn insert(&mut self, percent: u8) {
        if (1..=MAX_PERCENT).contains(&percent) {
            self.0 |= 1 << percent;
        }
    }

    pub fn remove(&mut self, percent: u8) {
        if percent <= MAX_PERCENT {
            self.0 &= !(1 << percent);
        }
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The percentages, lowest first.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (1..=MAX_PERCENT).filter(move |percent| self.contains(*percent))
    }
}

/// A workspace's alert thresholds: one set for every day and month limit,
/// and sets of their own for some.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlertThresholds {
    pub default: Percents,
    /// A limit's own set, replacing the default for it (an empty set: no
    /// alerts for that limit).
    pub per_limit: PerLimit<Option<Percents>>,
}

impl Default for AlertThresholds {
    fn default() -> Self {
        Self {
            default: Percents::of(&DEFAULT_PERCENTS),
            per_limit: PerLimit::default(),
        }
    }
}

/// Thresholds as a client or a file writes them: percentages, and lists
/// per limit by name (`null` returns a limit to the default).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ThresholdsInput {
    pub default: Option<Vec<f64>>,
    pub limits: Vec<(String, Option<Vec<f64>>)>,
}

/// The field every error about thresholds names, with the path within.
const FIELD: &str = "alert_thresholds";

impl AlertThresholds {
    /// The thresholds of `kind`: none for the minute.
    pub fn of(&self, kind: LimitKind) -> Percents {
        match kind.window {
            Window::Minute => Percents::default(),
            Window::Day | Window::Month => self.per_limit.get(kind).unwrap_or(self.default),
        }
    }

    /// Reads `input`: every percentage a whole number from 1 to 100 (given
    /// twice, it counts once), every limit named a day or month limit.
    /// Errors name the field and the place in it
    /// (`alert_thresholds.limits.tokens_per_day[1]`).
    pub fn validate(input: &ThresholdsInput) -> Result<Self, ValidationError> {
        let mut thresholds = Self::default();
        if let Some(default) = &input.default {
            thresholds.default = percents(&format!("{FIELD}.default"), default)?;
        }
        for (name, listed) in &input.limits {
            let at = format!("{FIELD}.limits.{name}");
            let kind = LimitKind::from_name(name)
                .filter(|kind| kind.window.period().is_some())
                .ok_or_else(|| {
                    let calendar: Vec<&str> = LimitKind::ALL
                        .iter()
                        .filter(|kind| kind.window.period().is_some())
                        .map(|kind| kind.name())
                        .collect();
                    ValidationError::new(
                        at.clone(),
                        format!(
                            "thresholds apply to day and month limits ({}); the sliding minute has none",
                            calendar.join(", ")
                        ),
                    )
                })?;
            let set = listed
                .as_ref()
                .map(|listed| percents(&at, listed))
                .transpose()?;
            thresholds.per_limit.set(kind, set);
        }
        Ok(thresholds)
    }

    /// Whether these are the defaults, which need not be stored.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn percents(at: &str, listed: &[f64]) -> Result<Percents, ValidationError> {
    let mut set = Percents::default();
    for (index, percent) in listed.iter().enumerate() {
        let whole = percent.fract() == 0.0 && (1.0..=f64::from(MAX_PERCENT)).contains(percent);
        if !whole {
            return Err(ValidationError::new(
                format!("{at}[{index}]"),
                format!("a threshold is a whole percentage from 1 to {MAX_PERCENT}, got {percent}"),
            ));
        }
        set.insert(*percent as u8);
    }
    Ok(set)
}

/// Which thresholds of one limit fired in its current period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fired {
    /// The start of the period they fired in.
    pub period_start: Timestamp,
    /// The limit's maximum when they were last checked.
    pub max: u64,
    pub percents: Percents,
}

/// What one check of a limit's thresholds decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Crossings that ended: their notifications resolve.
    pub ended: Percents,
    /// Thresholds crossed now: each raises its notification.
    pub crossed: Percents,
    /// What has fired from now on.
    pub fired: Option<Fired>,
}

/// The limit as a check reads it: its maximum, what its current period
/// counted, and when that period started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub max: u64,
    pub used: u64,
    pub period_start: Timestamp,
}

/// Whether `used` of `max` reaches `percent`, in whole numbers.
fn reaches(used: u64, max: u64, percent: u8) -> bool {
    u128::from(used) * 100 >= u128::from(max) * u128::from(percent)
}

/// Checks one limit's `thresholds` against `reading` (`None`: no such
/// limit any more), given what had `fired`.
pub fn check(fired: Option<Fired>, reading: Option<Reading>, thresholds: Percents) -> Step {
    let Some(reading) = reading else {
        return Step {
            ended: fired.map(|fired| fired.percents).unwrap_or_default(),
            ..Step::default()
        };
    };
    let mut ended = Percents::default();
    let mut still = match fired {
        Some(fired) if fired.period_start == reading.period_start => fired,
        // A new period: every crossing of the last one ends with it.
        other => {
            ended = other.map(|fired| fired.percents).unwrap_or_default();
            Fired {
                period_start: reading.period_start,
                max: reading.max,
                percents: Percents::default(),
            }
        }
    };
    if reading.max > still.max {
        // A raised limit ends the crossings it put back below.
        for percent in still.percents.iter() {
            if !reaches(reading.used, reading.max, percent) {
                still.percents.remove(percent);
                ended.insert(percent);
            }
        }
    }
    still.max = reading.max;
    let mut crossed = Percents::default();
    for percent in thresholds.iter() {
        if !still.percents.contains(percent) && reaches(reading.used, reading.max, percent) {
            still.percents.insert(percent);
            crossed.insert(percent);
        }
    }
    Step {
        ended,
        crossed,
        fired: Some(still),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::limits::{REQUESTS_PER_MINUTE, TOKENS_PER_DAY, USD_PER_MONTH};

    const DAY_ONE: Timestamp = Timestamp::from_millis(86_400_000);
    const DAY_TWO: Timestamp = Timestamp::from_millis(2 * 86_400_000);

    fn reading(max: u64, used: u64, period_start: Timestamp) -> Option<Reading> {
        Some(Reading {
            max,
            used,
            period_start,
        })
    }

    fn listed(percents: Percents) -> Vec<u8> {
        percents.iter().collect()
    }

    #[test]
    fn each_threshold_fires_once_per_period() {
        let thresholds = AlertThresholds::default().of(TOKENS_PER_DAY);
        let first = check(None, reading(1000, 499, DAY_ONE), thresholds);
        assert!(first.crossed.is_empty());
        let second = check(first.fired, reading(1000, 820, DAY_ONE), thresholds);
        assert_eq!(listed(second.crossed), [50, 80], "both crossed at once");
        let again = check(second.fired, reading(1000, 830, DAY_ONE), thresholds);
        assert!(again.crossed.is_empty(), "not on every request");
        assert!(again.ended.is_empty());
        // Settled below 80 % again: it fired this period, and stays so.
        let lower = check(again.fired, reading(1000, 700, DAY_ONE), thresholds);
        let back = check(lower.fired, reading(1000, 810, DAY_ONE), thresholds);
        assert!(back.crossed.is_empty());
        // The next day starts afresh, ending yesterday's crossings.
        let next = check(back.fired, reading(1000, 600, DAY_TWO), thresholds);
        assert_eq!(listed(next.ended), [50, 80]);
        assert_eq!(listed(next.crossed), [50]);
    }

    #[test]
    fn raising_the_limit_ends_the_crossings_it_puts_below() {
        let thresholds = AlertThresholds::default().of(USD_PER_MONTH);
        let crossed = check(None, reading(100, 96, DAY_ONE), thresholds);
        assert_eq!(listed(crossed.crossed), [50, 80, 95]);
        let raised = check(crossed.fired, reading(150, 96, DAY_ONE), thresholds);
        assert_eq!(listed(raised.ended), [80, 95], "96 of 150 is 64 %");
        assert!(raised.crossed.is_empty());
        let lowered = check(raised.fired, reading(120, 96, DAY_ONE), thresholds);
        assert_eq!(listed(lowered.crossed), [80], "96 of 120 is 80 %");
        assert!(lowered.ended.is_empty());
        let removed = check(lowered.fired, None, thresholds);
        assert_eq!(listed(removed.ended), [50, 80]);
        assert_eq!(removed.fired, None);
    }

    #[test]
    fn thresholds_are_configurable_per_limit_and_validated() {
        let thresholds = AlertThresholds::validate(&ThresholdsInput {
            default: Some(vec![90.0, 75.0, 90.0]),
            limits: vec![
                ("tokens_per_day".to_owned(), Some(vec![])),
                ("usd_per_month".to_owned(), Some(vec![25.0, 100.0])),
            ],
        })
        .expect("valid");
        assert_eq!(listed(thresholds.default), [75, 90]);
        assert!(thresholds.of(TOKENS_PER_DAY).is_empty());
        assert_eq!(listed(thresholds.of(USD_PER_MONTH)), [25, 100]);
        assert!(thresholds.of(REQUESTS_PER_MINUTE).is_empty(), "no minute");
        let refused = |input: ThresholdsInput| {
            AlertThresholds::validate(&input)
                .expect_err("invalid")
                .field
        };
        assert_eq!(
            refused(ThresholdsInput {
                default: Some(vec![50.0, 101.0]),
                limits: vec![],
            }),
            "alert_thresholds.default[1]"
        );
        assert_eq!(
            refused(ThresholdsInput {
                default: None,
                limits: vec![("tokens_per_day".to_owned(), Some(vec![12.5]))],
            }),
            "alert_thresholds.limits.tokens_per_day[0]"
        );
        assert_eq!(
            refused(ThresholdsInput {
                default: None,
                limits: vec![("requests_per_minute".to_owned(), Some(vec![50.0]))],
            }),
            "alert_thresholds.limits.requests_per_minute"
        );
        assert_eq!(
            refused(ThresholdsInput {
                default: Some(vec![0.0]),
                limits: vec![],
            }),
            "alert_thresholds.default[0]"
        );
        assert!(AlertThresholds::default().is_default());
    }
}
