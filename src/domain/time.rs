//! Time as the domain sees it: a millisecond timestamp, calendar days in a
//! workspace's timezone, and the Go-style duration strings OpenAI uses in its
//! `x-ratelimit-reset-*` headers (which also serve as our configuration syntax).
//!
//! Nothing here reads a clock: every function takes the instant it reasons about.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Datelike, Months, NaiveDate, NaiveTime, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;

/// Milliseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    pub fn plus(self, duration: Duration) -> Self {
        Self(self.0.saturating_add(duration_millis(duration)))
    }

    /// How long from `self` until `later`; zero when `later` is not later.
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0).max(0) as u64)
    }

    pub fn to_utc(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0).unwrap_or(DateTime::UNIX_EPOCH)
    }

    /// RFC 3339 with millisecond precision and a `Z` suffix, the only textual
    /// form timestamps take on the wire.
    pub fn to_rfc3339(self) -> String {
        self.to_utc().to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

pub fn duration_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A calendar period in a workspace's timezone, which calendar limits count
/// over and which ends at the local start of the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub const ALL: [Period; 2] = [Period::Day, Period::Month];

    pub const fn index(self) -> usize {
        self as usize
    }

    pub const fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// How texts speak of the period: "daily", "monthly".
    pub const fn adjective(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Month => "monthly",
        }
    }

    /// The current one: "today", "this month".
    pub const fn this(self) -> &'static str {
        match self {
            Period::Day => "today",
            Period::Month => "this month",
        }
    }

    /// When the next one starts, before a timezone's name.
    pub const fn next_starts(self) -> &'static str {
        match self {
            Period::Day => "at midnight",
            Period::Month => "at the start of next month, midnight",
        }
    }

    /// The period containing `now` in `tz`, as `[start, end)`.
    ///
    /// A day is usually 24 hours, but 23 or 25 around daylight-saving
    /// changes, and months differ in length: both ends are computed from the
    /// local calendar, never by adding a fixed number of seconds.
    pub fn bounds(self, now: Timestamp, tz: Tz) -> (Timestamp, Timestamp) {
        let today = now.to_utc().with_timezone(&tz).date_naive();
        let (first, next) = match self {
            Period::Day => (today, today.succ_opt().unwrap_or(today)),
            Period::Month => {
                let first = today.with_day(1).unwrap_or(today);
                let next = first.checked_add_months(Months::new(1)).unwrap_or(first);
                (first, next)
            }
        };
        (local_day_start(first, tz), local_day_start(next, tz))
    }
}

/// The calendar day containing `now` in `tz`, as `[start, end)` (see
/// [`Period::bounds`]).
pub fn day_bounds(now: Timestamp, tz: Tz) -> (Timestamp, Timestamp) {
    Period::Day.bounds(now, tz)
}

/// The first instant of `date` in `tz`. A few zones skip midnight itself when
/// daylight saving starts, so the day then begins at the first local time that
/// exists.
fn local_day_start(date: NaiveDate, tz: Tz) -> Timestamp {
    let midnight = date.and_time(NaiveTime::MIN);
    (0..=24 * 60)
        .find_map(|minutes| {
            let local = midnight + chrono::Duration::minutes(minutes);
            tz.from_local_datetime(&local).earliest()
        })
        .map(|start| Timestamp(start.timestamp_millis()))
        .unwrap_or_else(|| Timestamp(midnight.and_utc().timestamp_millis()))
}

/// Parses a duration as OpenAI and Azure send it in rate-limit headers: a Go
/// duration string (`120ms`, `2.572s`, `1h23m31s`, decimals allowed in every
/// part) or Azure's plain number of seconds (`20`). Days (`7d`) are accepted
/// too, for configuration and history windows. Returns `None` for anything
/// else, including negative values.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let mut rest = text;
    let mut total_seconds = 0.0_f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "d" => 86_400.0,
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_seconds += number * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total_seconds).ok()
}

/// Formats a duration the way OpenAI's `x-ratelimit-reset-*` headers do
/// (`0s`, `120ms`, `2.5s`, `6m0s`, `1h23m31s`), so clients that parse
/// OpenAI's headers can parse ours.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    use std::fmt::Write;
    let hours = millis / 3_600_000;
    let minutes = (millis / 60_000) % 60;
    let (seconds, fraction) = ((millis / 1000) % 60, millis % 1000);
    // Written into one string in integers: this is on every proxied
    // answer's headers, where formatting a float cost more than the rest.
    let mut text = String::with_capacity(16);
    match (hours, minutes) {
        (0, 0) => {}
        (0, m) => _ = write!(text, "{m}m"),
        (h, m) => _ = write!(text, "{h}h{m}m"),
    }
    _ = write!(text, "{seconds}");
    if fraction > 0 {
        // Milliseconds as a decimal fraction without trailing zeros: 1.5s.
        let (mut digits, mut width) = (fraction, 3);
        while digits % 10 == 0 {
            digits /= 10;
            width -= 1;
        }
        _ = write!(text, ".{digits:0width$}");
    }
    text.push('s');
    text
}

/// "in 3h 12m (at 2026-…Z)": when `at` comes, as seen from `now`.
pub fn in_time(at: Timestamp, now: Timestamp) -> String {
    format!("in {} (at {at})", humanize_duration(now.until(at)))
}

/// Formats a duration for people, coarsely: `45s`, `12m`, `3h 12m`, `2d 4h`.
pub fn humanize_duration(duration: Duration) -> String {
    let secs = duration.as_secs() + u64::from(duration.subsec_millis() > 0);
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs.div_ceil(60)),
        3600..=86_399 => format!("{}h {}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d {}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(rfc3339: &str) -> Timestamp {
        Timestamp(
            DateTime::parse_from_rfc3339(rfc3339)
                .expect("valid timestamp")
                .timestamp_millis(),
        )
    }

    #[test]
    fn parses_every_reset_value_openai_and_azure_send() {
        let fixtures = include_str!("../../tests/fixtures/openai/ratelimit_reset_values.txt");
        let mut checked = 0;
        for line in fixtures
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (value, seconds) = line.split_once(' ').expect("two columns");
            let expected: f64 = seconds.parse().expect("seconds column");
            let parsed = parse_duration(value).unwrap_or_else(|| panic!("{value} parses"));
            assert!(
                (parsed.as_secs_f64() - expected).abs() < 1e-9,
                "{value}: {parsed:?} != {expected}"
            );
            checked += 1;
        }
        assert!(checked >= 10);
    }

    #[test]
    fn rejects_invalid_durations() {
        for bad in [
            "", "s", "10x", "-5", "1h-2m", "abc", "1.2.3s", "1e30", "NaN", "inf",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_like_go_and_round_trips() {
        let cases = [
            (0, "0s"),
            (120, "120ms"),
            (2_572, "2.572s"),
            (20_000, "20s"),
            (360_000, "6m0s"),
            (86_400, "1m26.4s"),
            (5_011_000, "1h23m31s"),
        ];
        for (millis, text) in cases {
            let duration = Duration::from_millis(millis);
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Some(duration));
        }
    }

    #[test]
    fn durations_read_as_seconds_written_as_decimals() {
        // The seconds were once formatted as a float; the integer writing
        // must say the same for every millisecond of a few minutes.
        for millis in 1000..=200_000u64 {
            let seconds = (millis % 60_000) as f64 / 1000.0;
            let (hours, minutes) = (millis / 3_600_000, (millis / 60_000) % 60);
            let expected = match (hours, minutes) {
                (0, 0) => format!("{seconds}s"),
                (0, m) => format!("{m}m{seconds}s"),
                (h, m) => format!("{h}h{m}m{seconds}s"),
            };
            assert_eq!(format_duration(Duration::from_millis(millis)), expected);
        }
    }

    #[test]
    fn humanizes_for_messages() {
        assert_eq!(humanize_duration(Duration::from_millis(1500)), "2s");
        assert_eq!(humanize_duration(Duration::from_secs(61)), "2m");
        assert_eq!(
            humanize_duration(Duration::from_secs(3 * 3600 + 12 * 60)),
            "3h 12m"
        );
        assert_eq!(
            humanize_duration(Duration::from_secs(2 * 86_400 + 3600)),
            "2d 1h"
        );
    }

    #[test]
    fn day_bounds_follow_the_local_calendar() {
        let tz: Tz = "America/New_York".parse().expect("zone");
        // 03:30 UTC on 10 March 2026 is still 9 March in New York (UTC-4 after DST).
        let (start, end) = day_bounds(ts("2026-03-10T03:30:00Z"), tz);
        assert_eq!(start, ts("2026-03-09T04:00:00Z"));
        assert_eq!(end, ts("2026-03-10T04:00:00Z"));
        // The day DST starts (8 March 2026) has 23 hours.
        let (start, end) = day_bounds(ts("2026-03-08T12:00:00Z"), tz);
        assert_eq!(start, ts("2026-03-08T05:00:00Z"));
        assert_eq!(end.millis() - start.millis(), 23 * 3_600_000);
    }

    #[test]
    fn month_bounds_follow_the_local_calendar() {
        // (zone, an instant, the local month's start and end in UTC)
        let cases = [
            // 23:30 UTC on 31 January is already 1 February in Berlin (UTC+1).
            (
                "Europe/Berlin",
                "2026-01-31T23:30:00Z",
                "2026-01-31T23:00:00Z",
                "2026-02-28T23:00:00Z",
            ),
            // March holds the switch to summer time: it starts at UTC+1 and
            // ends at UTC+2, an hour shorter than 31 days.
            (
                "Europe/Berlin",
                "2026-03-15T12:00:00Z",
                "2026-02-28T23:00:00Z",
                "2026-03-31T22:00:00Z",
            ),
            // 03:00 UTC on 1 November is still 31 October in New York.
            (
                "America/New_York",
                "2026-11-01T03:00:00Z",
                "2026-10-01T04:00:00Z",
                "2026-11-01T04:00:00Z",
            ),
            // December rolls over into the next year.
            (
                "UTC",
                "2026-12-31T23:59:59Z",
                "2026-12-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            // A leap February.
            (
                "Asia/Tokyo",
                "2028-02-29T14:00:00Z",
                "2028-01-31T15:00:00Z",
                "2028-02-29T15:00:00Z",
            ),
        ];
        for (zone, now, start, end) in cases {
            let tz: Tz = zone.parse().expect("zone");
            assert_eq!(
                Period::Month.bounds(ts(now), tz),
                (ts(start), ts(end)),
                "{zone} {now}"
            );
        }
        // Santiago skipped midnight on 7 September 2025, not on the 1st; a
        // month starts at its first existing time all the same.
        let tz: Tz = "America/Santiago".parse().expect("zone");
        let (start, _) = Period::Month.bounds(ts("2025-09-10T12:00:00Z"), tz);
        assert_eq!(start, ts("2025-09-01T04:00:00Z"));
    }

    #[test]
    fn day_starts_at_first_existing_time_when_midnight_is_skipped() {
        // Santiago skipped 00:00-01:00 on 7 September 2025 (clocks jumped to 01:00, UTC-3).
        let tz: Tz = "America/Santiago".parse().expect("zone");
        let (start, _) = day_bounds(ts("2025-09-07T15:00:00Z"), tz);
        assert_eq!(start, ts("2025-09-07T04:00:00Z"));
    }
}
