//! Counting over time: a sliding window of fixed-width buckets (the per-minute
//! limits use 60 one-second buckets, the error history 60 one-minute buckets)
//! and calendar counters (a day, a month) that reset when their local period
//! ends.

use std::ops::{Add, AddAssign};

use chrono_tz::Tz;

use super::limits::Metric;
use super::time::{Period, Timestamp};

/// A count that can be summed into buckets and taken out again when a bucket
/// leaves the window.
pub trait Tally: Copy + Default + PartialEq + AddAssign {
    /// `self - other`, never below zero in any field.
    fn saturating_sub(self, other: Self) -> Self;
}

/// What was used of each metric. A new metric is a field here, named in
/// [`Usage::of`] and [`Usage::set`]: everything else that counts, charges,
/// stores or sends usage goes over [`Metric::ALL`] through those two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub requests: u64,
    pub tokens: u64,
    /// Money, in nano-dollars (`domain::price::NanoUsd`).
    pub usd: u64,
}

impl Usage {
    pub fn requests(n: u64) -> Self {
        Self::default().with(Metric::Requests, n)
    }

    pub fn tokens(n: u64) -> Self {
        Self::default().with(Metric::Tokens, n)
    }

    /// What one call costs: a request, and its tokens (with its cost to
    /// add where it is known, `.with(Metric::Usd, ...)`).
    pub fn call(tokens: u64) -> Self {
        Self::requests(1).with(Metric::Tokens, tokens)
    }

    pub fn of(self, metric: Metric) -> u64 {
        match metric {
            Metric::Requests => self.requests,
            Metric::Tokens => self.tokens,
            Metric::Usd => self.usd,
        }
    }

    pub fn set(&mut self, metric: Metric, value: u64) {
        match metric {
            Metric::Requests => self.requests = value,
            Metric::Tokens => self.tokens = value,
            Metric::Usd => self.usd = value,
        }
    }

    /// This usage with `metric` at `value`.
    pub fn with(mut self, metric: Metric, value: u64) -> Self {
        self.set(metric, value);
        self
    }

    /// The usage whose every metric is `value(metric)`.
    pub fn from_fn(value: impl Fn(Metric) -> u64) -> Self {
        Metric::ALL
            .into_iter()
            .fold(Self::default(), |usage, metric| {
                usage.with(metric, value(metric))
            })
    }

    /// `self` and `other` combined metric by metric.
    fn zip(self, other: Self, combine: impl Fn(u64, u64) -> u64) -> Self {
        Self::from_fn(|metric| combine(self.of(metric), other.of(metric)))
    }

    /// Whether any metric is above zero.
    pub fn any(self) -> bool {
        Metric::ALL.into_iter().any(|metric| self.of(metric) > 0)
    }
}

impl Add for Usage {
    type Output = Usage;
    fn add(self, other: Usage) -> Usage {
        self.zip(other, u64::saturating_add)
    }
}

impl AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        *self = *self + other;
    }
}

impl Tally for Usage {
    fn saturating_sub(self, other: Self) -> Self {
        self.zip(other, u64::saturating_sub)
    }
}

/// `N` buckets of `bucket_ms` each; the window is the newest bucket (the one
/// containing "now") and the `N - 1` before it. Any run of `N` consecutive
/// buckets therefore holds at most what an admission check against `total`
/// allowed, which is what makes a per-minute limit hold over *every* 60-second
/// span rather than per calendar minute.
///
/// The fields every operation reads (`newest`, `total`) come first, so that
/// they share a cache line with the start of the buckets.
#[derive(Clone, Debug, PartialEq)]
#[repr(C)]
pub struct SlidingWindow<T, const N: usize> {
    /// Absolute index (`time / bucket_ms`) of the newest bucket.
    newest: i64,
    total: T,
    bucket_ms: i64,
    buckets: [T; N],
}

impl<T: Tally, const N: usize> SlidingWindow<T, N> {
    pub fn new(bucket_ms: i64) -> Self {
        Self {
            bucket_ms,
            buckets: [T::default(); N],
            newest: 0,
            total: T::default(),
        }
    }

    fn bucket_of(&self, at: Timestamp) -> i64 {
        at.millis().div_euclid(self.bucket_ms)
    }

    fn slot(index: i64) -> usize {
        index.rem_euclid(N as i64) as usize
    }

    /// Moves the window forward to `now`, dropping buckets that left it. Time
    /// that goes backwards (a clock step) leaves the window where it is.
    pub fn advance(&mut self, now: Timestamp) {
        let target = self.bucket_of(now);
        if target <= self.newest {
            return;
        }
        // The total is the sum of the buckets, so a zero total means every
        // bucket is zero already: a workspace idle for a while moves its
        // window without writing it, which spares a cold call writing every
        // cache line of it.
        if self.total == T::default() {
            self.newest = target;
            return;
        }
        if target - self.newest >= N as i64 {
            self.buckets = [T::default(); N];
            self.total = T::default();
        } else {
            for index in self.newest + 1..=target {
                let slot = Self::slot(index);
                self.total = self.total.saturating_sub(self.buckets[slot]);
                self.buckets[slot] = T::default();
            }
        }
        self.newest = target;
    }

    /// The sum over the window as of the last `advance`.
    pub fn total(&self) -> T {
        self.total
    }

    pub fn add(&mut self, now: Timestamp, amount: T) {
        self.advance(now);
        // After `advance` the newest bucket is the one holding `now` (or a later
        // one, if the clock stepped back), so that is where the amount goes.
        self.buckets[Self::slot(self.newest)] += amount;
        self.total += amount;
    }

    /// Applies a correction to the bucket that holds `at`, if that bucket is
    /// still inside the window, and says whether it was; once a bucket has
    /// left, corrections to it no longer matter for this window.
    pub fn correct(&mut self, at: Timestamp, add: T, remove: T) -> bool {
        let index = self.bucket_of(at);
        if index > self.newest || index <= self.newest - N as i64 {
            return false;
        }
        let slot = Self::slot(index);
        let before = self.buckets[slot];
        let mut after = before.saturating_sub(remove);
        after += add;
        self.buckets[slot] = after;
        self.total = self.total.saturating_sub(before);
        self.total += after;
        true
    }

    /// Non-empty buckets from oldest to newest, with the instant each one
    /// leaves the window.
    pub fn expiring(&self) -> impl Iterator<Item = (Timestamp, T)> + '_ {
        (self.newest - N as i64 + 1..=self.newest).filter_map(move |index| {
            let value = self.buckets[Self::slot(index)];
            (value != T::default()).then(|| {
                (
                    Timestamp::from_millis((index + N as i64) * self.bucket_ms),
                    value,
                )
            })
        })
    }

    /// When the newest bucket matching `wanted` leaves the window: the time
    /// by which everything it counts has expired. Scans from the newest
    /// bucket, so it is quick while the window is in use.
    pub fn clear_at(&self, wanted: impl Fn(&T) -> bool) -> Option<Timestamp> {
        (self.newest - N as i64 + 1..=self.newest)
            .rev()
            .find(|index| wanted(&self.buckets[Self::slot(*index)]))
            .map(|index| Timestamp::from_millis((index + N as i64) * self.bucket_ms))
    }

    /// The non-empty buckets as `(absolute index, value)`, for persistence.
    pub fn to_entries(&self) -> Vec<(i64, T)> {
        (self.newest - N as i64 + 1..=self.newest)
            .map(|index| (index, self.buckets[Self::slot(index)]))
            .filter(|(_, value)| *value != T::default())
            .collect()
    }

    /// Rebuilds a window from [`to_entries`](Self::to_entries); entries that
    /// have since left the window at `now` are dropped.
    pub fn from_entries(bucket_ms: i64, entries: &[(i64, T)], now: Timestamp) -> Self {
        let mut window = Self::new(bucket_ms);
        window.newest = window.bucket_of(now);
        for &(index, value) in entries {
            if index <= window.newest && index > window.newest - N as i64 {
                window.buckets[Self::slot(index)] += value;
                window.total += value;
            }
        }
        window
    }
}

/// Counts for one calendar period (a day, a month) in a timezone, reset when
/// the period ends.
#[derive(Clone, Debug, PartialEq)]
pub struct CalendarCounter {
    pub period: Period,
    pub start: Timestamp,
    pub end: Timestamp,
    pub used: Usage,
}

impl CalendarCounter {
    pub fn new(period: Period, now: Timestamp, tz: Tz) -> Self {
        let (start, end) = period.bounds(now, tz);
        Self {
            period,
            start,
            end,
            used: Usage::default(),
        }
    }

    /// Starts a new period when `now` has passed the end of the current one
    /// (or, after a timezone change or clock step, lies before its start).
    pub fn roll(&mut self, now: Timestamp, tz: Tz) {
        if now >= self.end || now < self.start {
            *self = Self::new(self.period, now, tz);
        }
    }

    pub fn contains(&self, at: Timestamp) -> bool {
        self.start <= at && at < self.end
    }

    /// What was used in the period holding `now`: nothing once it is over.
    pub fn used_at(&self, now: Timestamp) -> Usage {
        if self.contains(now) {
            self.used
        } else {
            Usage::default()
        }
    }
}

/// One counter per calendar period, indexed by [`Period::index`].
#[derive(Clone, Debug, PartialEq)]
pub struct Calendars(pub [CalendarCounter; Period::ALL.len()]);

impl Calendars {
    pub fn new(now: Timestamp, tz: Tz) -> Self {
        Self(Period::ALL.map(|period| CalendarCounter::new(period, now, tz)))
    }

    pub fn get(&self, period: Period) -> &CalendarCounter {
        &self.0[period.index()]
    }

    pub fn get_mut(&mut self, period: Period) -> &mut CalendarCounter {
        &mut self.0[period.index()]
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut CalendarCounter> {
        self.0.iter_mut()
    }

    pub fn roll(&mut self, now: Timestamp, tz: Tz) {
        for counter in self.iter_mut() {
            counter.roll(now, tz);
        }
    }

    /// Charges every period.
    pub fn add(&mut self, usage: Usage) {
        for counter in self.iter_mut() {
            counter.used += usage;
        }
    }

    /// Every period's count, to compare before and after an operation.
    pub fn used(&self) -> [Usage; Period::ALL.len()] {
        self.0.each_ref().map(|counter| counter.used)
    }

    /// Moves every period to `tz`, keeping the counts: a new timezone moves
    /// the bounds of today and this month, not what they used.
    pub fn move_to(&mut self, now: Timestamp, tz: Tz) {
        for counter in self.iter_mut() {
            let used = counter.used;
            *counter = CalendarCounter::new(counter.period, now, tz);
            counter.used = used;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Minute = SlidingWindow<Usage, 60>;

    fn at(seconds: f64) -> Timestamp {
        Timestamp::from_millis((seconds * 1000.0) as i64)
    }

    #[test]
    fn counts_the_last_sixty_seconds_including_the_current_one() {
        let mut window = Minute::new(1000);
        window.add(at(100.0), Usage::requests(3));
        window.add(at(130.5), Usage::requests(2));
        window.advance(at(159.999));
        assert_eq!(window.total().requests, 5);
        // The bucket of second 100 leaves the window when second 160 begins.
        window.advance(at(160.0));
        assert_eq!(window.total().requests, 2);
        window.advance(at(190.0));
        assert_eq!(window.total().requests, 0);
    }

    #[test]
    fn a_long_gap_empties_the_window() {
        let mut window = Minute::new(1000);
        window.add(at(1.0), Usage::tokens(500));
        window.advance(at(10_000.0));
        assert_eq!(window.total(), Usage::default());
        assert_eq!(window.expiring().count(), 0);
    }

    #[test]
    fn clock_going_backwards_keeps_counts() {
        let mut window = Minute::new(1000);
        window.add(at(100.0), Usage::requests(1));
        window.add(at(95.0), Usage::requests(1));
        assert_eq!(window.total().requests, 2);
    }

    #[test]
    fn corrections_apply_only_inside_the_window() {
        let mut window = Minute::new(1000);
        window.add(at(100.0), Usage::tokens(100));
        assert!(window.correct(at(100.2), Usage::tokens(30), Usage::default()));
        assert_eq!(window.total().tokens, 130);
        window.correct(at(100.2), Usage::default(), Usage::tokens(500));
        assert_eq!(window.total().tokens, 0, "saturates at zero");
        window.add(at(100.0), Usage::tokens(10));
        window.advance(at(170.0));
        assert!(!window.correct(at(100.0), Usage::tokens(1000), Usage::default()));
        assert_eq!(
            window.total().tokens,
            0,
            "expired bucket is not resurrected"
        );
    }

    #[test]
    fn expiring_lists_buckets_oldest_first_with_their_expiry() {
        let mut window = Minute::new(1000);
        window.add(at(10.0), Usage::requests(1));
        window.add(at(20.0), Usage::requests(2));
        let expiring: Vec<_> = window.expiring().collect();
        assert_eq!(
            expiring,
            vec![
                (at(70.0), Usage::requests(1)),
                (at(80.0), Usage::requests(2))
            ]
        );
    }

    #[test]
    fn clear_at_is_when_the_newest_matching_bucket_leaves() {
        let mut window = Minute::new(1000);
        assert_eq!(window.clear_at(|u| u.requests > 0), None);
        window.add(at(10.0), Usage::requests(1));
        window.add(at(20.0), Usage::tokens(5));
        assert_eq!(window.clear_at(|u| u.requests > 0), Some(at(70.0)));
        assert_eq!(window.clear_at(|u| u.tokens > 0), Some(at(80.0)));
    }

    #[test]
    fn round_trips_through_entries() {
        let mut window = Minute::new(1000);
        window.add(at(10.0), Usage::requests(1));
        window.add(at(50.0), Usage::requests(2));
        let restored = Minute::from_entries(1000, &window.to_entries(), at(69.0));
        assert_eq!(restored.total().requests, 3);
        let restored = Minute::from_entries(1000, &window.to_entries(), at(70.0));
        assert_eq!(
            restored.total().requests,
            2,
            "second 10 leaves the window at 70"
        );
    }

    /// One operation on a window: how many seconds later it happens (the
    /// window advances there first), and what it does there.
    #[derive(Clone, Debug)]
    enum Step {
        Advance,
        Add(u64),
        /// Corrects the bucket this many seconds back: adds, removes.
        Correct(i64, u64, u64),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = (i64, Step)> {
        use proptest::prelude::*;
        // Gaps up to two minutes, so that windows empty out often.
        let gap = prop_oneof![0i64..3, 0i64..130];
        let op = prop_oneof![
            Just(Step::Advance),
            (0u64..50).prop_map(Step::Add),
            (0i64..70, 0u64..50, 0u64..80)
                .prop_map(|(back, add, remove)| { Step::Correct(back, add, remove) }),
        ];
        (gap, op)
    }

    proptest::proptest! {
        /// The window holds what a list of every second's count says it
        /// should, whatever the order of additions, corrections and gaps:
        /// its total is always the sum of its buckets, which `advance`
        /// relies on to leave an empty window unwritten.
        #[test]
        fn the_window_counts_what_a_list_of_seconds_would(
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let mut window = Minute::new(1000);
            let mut seconds: std::collections::BTreeMap<i64, u64> = Default::default();
            let mut now = 0i64;
            for (gap, op) in steps {
                now += gap;
                window.advance(at(now as f64));
                seconds.retain(|second, _| *second > now - 60);
                match op {
                    Step::Advance => {}
                    Step::Add(tokens) => {
                        window.add(at(now as f64), Usage::tokens(tokens));
                        *seconds.entry(now).or_default() += tokens;
                    }
                    Step::Correct(back, add, remove) => {
                        let second = now - back;
                        let inside = second > now - 60;
                        let corrected = window.correct(
                            at(second as f64),
                            Usage::tokens(add),
                            Usage::tokens(remove),
                        );
                        proptest::prop_assert_eq!(corrected, inside);
                        if inside {
                            let count = seconds.entry(second).or_default();
                            *count = count.saturating_sub(remove) + add;
                        }
                    }
                }
                seconds.retain(|_, count| *count > 0);
                let listed: Vec<(Timestamp, u64)> = seconds
                    .iter()
                    .map(|(second, count)| (at((second + 60) as f64), *count))
                    .collect();
                let held: Vec<(Timestamp, u64)> = window
                    .expiring()
                    .map(|(leaves_at, usage)| (leaves_at, usage.tokens))
                    .collect();
                proptest::prop_assert_eq!(held, listed);
                proptest::prop_assert_eq!(window.total().tokens, seconds.values().sum::<u64>());
            }
        }
    }

    #[test]
    fn day_counter_rolls_at_local_midnight() {
        let tz: Tz = "Asia/Tokyo".parse().expect("zone");
        // 2026-01-01T14:59:59Z is 23:59:59 in Tokyo (UTC+9).
        let before = Timestamp::from_millis(1_767_279_599_000);
        let mut day = CalendarCounter::new(Period::Day, before, tz);
        day.used += Usage::requests(7);
        day.roll(before, tz);
        assert_eq!(day.used.requests, 7);
        day.roll(Timestamp::from_millis(before.millis() + 1000), tz);
        assert_eq!(day.used.requests, 0);
        assert_eq!(day.start.millis(), 1_767_279_600_000);
    }

    #[test]
    fn month_counter_rolls_at_the_local_start_of_the_next_month() {
        let tz: Tz = "America/Sao_Paulo".parse().expect("zone");
        // 2026-07-01T02:59:59Z is 23:59:59 on 30 June in São Paulo (UTC-3).
        let before = Timestamp::from_millis(1_782_874_799_000);
        let mut calendars = Calendars::new(before, tz);
        calendars.add(Usage::tokens(40));
        calendars.roll(Timestamp::from_millis(before.millis() + 999), tz);
        assert_eq!(calendars.get(Period::Month).used.tokens, 40);
        let next = Timestamp::from_millis(before.millis() + 1000);
        calendars.roll(next, tz);
        let month = calendars.get(Period::Month);
        assert_eq!((month.used, month.start), (Usage::default(), next));
        assert_eq!(month.end.millis(), 1_785_553_200_000, "1 August, 03:00 UTC");
        assert_eq!(calendars.get(Period::Day).start, next);
    }
}
