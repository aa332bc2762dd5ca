//! The JSON form of a workspace's live state, as kept in `workspace_state`.
//! These serde types exist only at this boundary; the domain never sees them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::limits::{LimitKind, Metric};
use crate::domain::scope::{
    LoadedScope, RuleId, ScopeCounts, ScopeTarget, fingerprint_text, parse_fingerprint,
};
use crate::domain::status::Status;
use crate::domain::threshold::{Fired, Percents};
use crate::domain::time::Period;
use crate::domain::time::Timestamp;
use crate::domain::upstream::{BillingCode, ErrorTally, LastError, UpstreamBucket, UpstreamView};
use crate::domain::window::{CalendarCounter, Usage};
use crate::domain::workspace::{BillingBlock, MAX_UNPRICED_MODELS, Reservation, Saved};

/// Bumped when the shape changes incompatibly; older documents are then
/// ignored (the workspace starts with empty windows) rather than misread.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct SavedJson {
    version: u32,
    /// The minute window's buckets, `[second, count of each metric]` in
    /// the order of `Metric::ALL` (`[second, requests, tokens]`).
    minute: Vec<Vec<u64>>,
    day_start: i64,
    day_end: i64,
    /// What the day used, `day_{metric}` (`day_requests`, `day_tokens`).
    #[serde(flatten)]
    day_used: UsageFields,
    /// The calendar periods beyond the day (the month), which the day's
    /// fields above keep readable by versions that count only the day;
    /// absent from documents those versions saved.
    #[serde(default)]
    calendars: Vec<CalendarJson>,
    reservations: Vec<ReservationJson>,
    rate_block_until: Option<i64>,
    billing: Option<BillingJson>,
    upstream_requests: Option<BucketJson>,
    upstream_tokens: Option<BucketJson>,
    /// `(minute, [rate_limited, insufficient_quota, server_error, other, refused])`.
    errors: Vec<(i64, [u64; 5])>,
    last_error: Option<LastErrorJson>,
    key_rejected: bool,
    status: String,
    since: i64,
    /// Models called that the prices do not know; absent from documents
    /// of versions that did not price calls.
    #[serde(default)]
    unpriced_models: Vec<String>,
    /// The alert thresholds that fired in each limit's current period;
    /// absent from documents of versions without thresholds.
    #[serde(default)]
    thresholds_fired: Vec<FiredJson>,
    /// The scoped limits' counters that still count; absent from
    /// documents of versions that did not save them.
    #[serde(default)]
    scopes: Vec<ScopeJson>,
}

#[derive(Serialize, Deserialize)]
struct FiredJson {
    /// `LimitKind::name`: "tokens_per_day".
    limit: String,
    period_start: i64,
    max: u64,
    /// The thresholds that fired, in percent.
    percents: Vec<u8>,
}

/// One scope counter (see `domain::scope::LoadedScope`).
#[derive(Serialize, Deserialize)]
struct ScopeJson {
    /// The rule's id (`RuleId`), 16 hex digits.
    rule: String,
    /// Which of its counters: "listed", "overflow", or an end user's
    /// fingerprint (32 hex digits; never the id itself).
    counter: String,
    /// The seconds of the minute with usage, as `minute` above.
    minute: Vec<Vec<u64>>,
    /// Each calendar period's start and count (`{metric}`).
    calendars: Vec<ScopeCalendarJson>,
}

#[derive(Serialize, Deserialize)]
struct ScopeCalendarJson {
    period: String,
    start: i64,
    #[serde(flatten)]
    used: UsageFields,
}

const LISTED: &str = "listed";
const OVERFLOW: &str = "overflow";

/// Seconds of a minute as saved: `[second, count of each metric]`.
fn minute_json(minute: impl Iterator<Item = (i64, Usage)>) -> Vec<Vec<u64>> {
    minute
        .map(|(second, usage)| {
            let counts = Metric::ALL.into_iter().map(|metric| usage.of(metric));
            std::iter::once(u64::try_from(second).unwrap_or(0))
                .chain(counts)
                .collect()
        })
        .collect()
}

/// Seconds of a minute as [`minute_json`] writes them; a count it leaves
/// out is zero.
fn minute_from_json(minute: Vec<Vec<u64>>) -> Vec<(i64, Usage)> {
    minute
        .into_iter()
        .filter_map(|bucket| {
            let (second, counts) = bucket.split_first()?;
            let usage =
                Usage::from_fn(|metric| counts.get(metric.index()).copied().unwrap_or_default());
            Some((i64::try_from(*second).ok()?, usage))
        })
        .collect()
}

fn scope_json(scope: &LoadedScope) -> ScopeJson {
    ScopeJson {
        rule: format!("{:016x}", scope.rule.to_bits()),
        counter: match scope.target {
            ScopeTarget::Listed => LISTED.to_owned(),
            ScopeTarget::Overflow => OVERFLOW.to_owned(),
            ScopeTarget::Own(fingerprint) => fingerprint_text(&fingerprint),
        },
        minute: minute_json(scope.counts.minute_parts()),
        calendars: Period::ALL
            .into_iter()
            .zip(scope.counts.calendar_parts())
            .map(|(period, (start, used))| ScopeCalendarJson {
                period: period.name().to_owned(),
                start: start.millis(),
                used: UsageFields::of("", *used),
            })
            .collect(),
    }
}

/// A saved scope counter; `None` if it does not read (it is then
/// dropped, as a counter of a rule no longer configured is).
fn scope_from_json(json: ScopeJson) -> Option<LoadedScope> {
    let target = match json.counter.as_str() {
        LISTED => ScopeTarget::Listed,
        OVERFLOW => ScopeTarget::Overflow,
        fingerprint => ScopeTarget::Own(parse_fingerprint(fingerprint)?),
    };
    let calendars = Period::ALL.map(|period| {
        json.calendars
            .iter()
            .find(|saved| saved.period == period.name())
            .map_or((ts(0), Usage::default()), |saved| {
                (ts(saved.start), saved.used.usage("", Usage::default()))
            })
    });
    Some(LoadedScope {
        rule: RuleId::from_bits(u64::from_str_radix(&json.rule, 16).ok()?),
        target,
        counts: ScopeCounts::from_parts(calendars, minute_from_json(json.minute)),
    })
}

#[derive(Serialize, Deserialize)]
struct CalendarJson {
    /// `Period::name`: "month".
    period: String,
    start: i64,
    end: i64,
    /// What the period used, `{metric}` (`requests`, `tokens`).
    #[serde(flatten)]
    used: UsageFields,
}

#[derive(Serialize, Deserialize)]
struct ReservationJson {
    id: u64,
    charged_at: i64,
    expires_at: i64,
    model: Option<String>,
    probe: bool,
    /// What admission charged, `estimated_{metric}`; documents of versions
    /// that settled tokens alone have `estimated_tokens` only.
    #[serde(flatten)]
    estimate: UsageFields,
}

/// Usage as one field per metric, each named by a prefix and the metric
/// (`day_tokens`): the documents of every version read alike, and a metric
/// added later is one field more, absent (zero) from older documents.
#[derive(Serialize, Deserialize, Default)]
#[serde(transparent)]
struct UsageFields(BTreeMap<String, u64>);

impl UsageFields {
    fn of(prefix: &str, usage: Usage) -> Self {
        Self(
            Metric::ALL
                .into_iter()
                .map(|metric| (format!("{prefix}{}", metric.name()), usage.of(metric)))
                .collect(),
        )
    }

    /// The usage these fields name; a metric they leave out keeps its count
    /// in `absent`.
    fn usage(&self, prefix: &str, absent: Usage) -> Usage {
        Usage::from_fn(|metric| {
            self.0
                .get(&format!("{prefix}{}", metric.name()))
                .copied()
                .unwrap_or(absent.of(metric))
        })
    }
}

const DAY: &str = "day_";
const ESTIMATED: &str = "estimated_";

#[derive(Serialize, Deserialize)]
struct BillingJson {
    code: String,
    since: i64,
    next_probe_at: i64,
}

#[derive(Serialize, Deserialize)]
struct BucketJson {
    limit: Option<u64>,
    remaining: Option<u64>,
    resets_at: Option<i64>,
    observed_at: i64,
}

#[derive(Serialize, Deserialize)]
struct LastErrorJson {
    at: i64,
    status_code: u16,
    error_type: Option<String>,
    code: Option<String>,
    message: Option<String>,
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms)
}

pub fn to_json(saved: &Saved) -> String {
    let bucket = |b: &UpstreamBucket| BucketJson {
        limit: b.limit,
        remaining: b.remaining,
        resets_at: b.resets_at.map(Timestamp::millis),
        observed_at: b.observed_at.millis(),
    };
    let day = saved
        .calendars
        .iter()
        .find(|counter| counter.period == Period::Day);
    let json = SavedJson {
        version: VERSION,
        minute: minute_json(saved.minute.iter().copied()),
        day_start: day.map_or(0, |day| day.start.millis()),
        day_end: day.map_or(0, |day| day.end.millis()),
        day_used: UsageFields::of(DAY, day.map_or(Usage::default(), |day| day.used)),
        calendars: saved
            .calendars
            .iter()
            .filter(|counter| counter.period != Period::Day)
            .map(|counter| CalendarJson {
                period: counter.period.name().to_owned(),
                start: counter.start.millis(),
                end: counter.end.millis(),
                used: UsageFields::of("", counter.used),
            })
            .collect(),
        reservations: saved
            .reservations
            .iter()
            .map(|r| ReservationJson {
                id: r.id,
                charged_at: r.charged_at.millis(),
                expires_at: r.expires_at.millis(),
                model: r.model.as_deref().map(str::to_owned),
                probe: r.probe,
                estimate: UsageFields::of(ESTIMATED, r.estimate),
            })
            .collect(),
        rate_block_until: saved.rate_block_until.map(Timestamp::millis),
        billing: saved.billing_block.map(|b| BillingJson {
            code: b.code.code().to_owned(),
            since: b.since.millis(),
            next_probe_at: b.next_probe_at.millis(),
        }),
        upstream_requests: saved.upstream_view.requests.as_ref().map(bucket),
        upstream_tokens: saved.upstream_view.tokens.as_ref().map(bucket),
        errors: saved
            .errors
            .iter()
            .map(|(minute, t)| {
                (
                    *minute,
                    [
                        t.rate_limited,
                        t.insufficient_quota,
                        t.server_error,
                        t.other,
                        t.refused,
                    ],
                )
            })
            .collect(),
        last_error: saved.last_error.as_ref().map(|e| LastErrorJson {
            at: e.at.millis(),
            status_code: e.status_code,
            error_type: e.error_type.clone(),
            code: e.code.clone(),
            message: e.message.clone(),
        }),
        key_rejected: saved.key_rejected,
        status: saved.status.name().to_owned(),
        since: saved.since.millis(),
        unpriced_models: saved
            .unpriced_models
            .iter()
            .map(ToString::to_string)
            .collect(),
        thresholds_fired: saved
            .thresholds_fired
            .iter()
            .map(|(kind, fired)| FiredJson {
                limit: kind.name().to_owned(),
                period_start: fired.period_start.millis(),
                max: fired.max,
                percents: fired.percents.iter().collect(),
            })
            .collect(),
        scopes: saved.scopes.iter().map(scope_json).collect(),
    };
    // Serialising plain data with string keys cannot fail.
    serde_json::to_string(&json).unwrap_or_default()
}

/// Reads a saved state; `None` when the document is from another version or
/// unreadable, in which case the workspace starts afresh.
pub fn from_json(text: &str) -> Option<Saved> {
    let json: SavedJson = serde_json::from_str(text).ok()?;
    if json.version != VERSION {
        return None;
    }
    let bucket = |b: BucketJson| UpstreamBucket {
        limit: b.limit,
        remaining: b.remaining,
        resets_at: b.resets_at.map(ts),
        observed_at: ts(b.observed_at),
    };
    Some(Saved {
        minute: minute_from_json(json.minute),
        calendars: std::iter::once(CalendarCounter {
            period: Period::Day,
            start: ts(json.day_start),
            end: ts(json.day_end),
            used: json.day_used.usage(DAY, Usage::default()),
        })
        .chain(json.calendars.into_iter().filter_map(|counter| {
            Some(CalendarCounter {
                period: Period::ALL
                    .into_iter()
                    .find(|period| period.name() == counter.period)?,
                start: ts(counter.start),
                end: ts(counter.end),
                used: counter.used.usage("", Usage::default()),
            })
        }))
        .collect(),
        reservations: json
            .reservations
            .into_iter()
            .map(|r| Reservation {
                id: r.id,
                charged_at: ts(r.charged_at),
                // Older documents charged one request and estimated tokens.
                estimate: r.estimate.usage(ESTIMATED, Usage::requests(1)),
                expires_at: ts(r.expires_at),
                model: r.model.map(Into::into),
                probe: r.probe,
                // Held for a shared store, it is never saved.
                charged_elsewhere_us: None,
            })
            .collect(),
        rate_block_until: json.rate_block_until.map(ts),
        billing_block: json.billing.and_then(|b| {
            Some(BillingBlock {
                code: BillingCode::from_code(&b.code)?,
                since: ts(b.since),
                next_probe_at: ts(b.next_probe_at),
            })
        }),
        upstream_view: UpstreamView {
            requests: json.upstream_requests.map(bucket),
            tokens: json.upstream_tokens.map(bucket),
        },
        errors: json
            .errors
            .into_iter()
            .map(
                |(
                    minute,
                    [
                        rate_limited,
                        insufficient_quota,
                        server_error,
                        other,
                        refused,
                    ],
                )| {
                    (
                        minute,
                        ErrorTally {
                            rate_limited,
                            insufficient_quota,
                            server_error,
                            other,
                            refused,
                        },
                    )
                },
            )
            .collect(),
        last_error: json.last_error.map(|e| LastError {
            at: ts(e.at),
            status_code: e.status_code,
            error_type: e.error_type,
            code: e.code,
            message: e.message,
        }),
        key_rejected: json.key_rejected,
        status: Status::from_name(&json.status)?,
        since: ts(json.since),
        unpriced_models: json
            .unpriced_models
            .into_iter()
            .take(MAX_UNPRICED_MODELS)
            .map(Into::into)
            .collect(),
        // A limit this version does not know is left out: its thresholds
        // would fire afresh, which is better than never.
        thresholds_fired: json
            .thresholds_fired
            .into_iter()
            .filter_map(|fired| {
                let kind = LimitKind::from_name(&fired.limit)?;
                let mut percents = Percents::default();
                for percent in fired.percents {
                    percents.insert(percent);
                }
                Some((
                    kind,
                    Fired {
                        period_start: ts(fired.period_start),
                        max: fired.max,
                        percents,
                    },
                ))
            })
            .collect(),
        scopes: json
            .scopes
            .into_iter()
            .filter_map(scope_from_json)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(period: Period, start: i64, used: u64) -> CalendarCounter {
        CalendarCounter {
            period,
            start: ts(start),
            end: ts(start + 1000),
            used: Usage {
                requests: used,
                tokens: 10 * used,
                ..Usage::default()
            },
        }
    }

    fn saved(calendars: Vec<CalendarCounter>) -> Saved {
        Saved {
            minute: Vec::new(),
            calendars,
            reservations: Vec::new(),
            rate_block_until: None,
            billing_block: None,
            upstream_view: UpstreamView::default(),
            errors: Vec::new(),
            last_error: None,
            key_rejected: false,
            status: Status::Normal,
            since: ts(0),
            unpriced_models: Vec::new(),
            thresholds_fired: Vec::new(),
            scopes: Vec::new(),
        }
    }

    #[test]
    fn every_calendar_period_round_trips() {
        let state = saved(vec![
            counter(Period::Day, 5_000, 3),
            counter(Period::Month, 1_000, 7),
        ]);
        assert_eq!(from_json(&to_json(&state)), Some(state));
    }

    #[test]
    fn fired_thresholds_round_trip_and_older_documents_have_none() {
        let mut state = saved(vec![counter(Period::Day, 5_000, 3)]);
        state.thresholds_fired = vec![(
            crate::domain::limits::TOKENS_PER_DAY,
            Fired {
                period_start: ts(5_000),
                max: 40,
                percents: Percents::of(&[50, 80]),
            },
        )];
        let mut json: serde_json::Value = serde_json::from_str(&to_json(&state)).expect("json");
        assert_eq!(
            json["thresholds_fired"],
            serde_json::json!([{"limit": "tokens_per_day", "period_start": 5000, "max": 40, "percents": [50, 80]}])
        );
        assert_eq!(from_json(&json.to_string()), Some(state));
        json.as_object_mut()
            .expect("object")
            .remove("thresholds_fired");
        let older = from_json(&json.to_string()).expect("still read");
        assert!(older.thresholds_fired.is_empty());
    }

    #[test]
    fn scope_counters_round_trip_and_a_document_without_them_reads() {
        let counts = |requests| {
            ScopeCounts::from_parts(
                [
                    (ts(5_000), Usage::requests(requests)),
                    (ts(1_000), Usage::requests(requests)),
                ],
                vec![(5, Usage::requests(requests))],
            )
        };
        let mut state = saved(vec![counter(Period::Day, 5_000, 3)]);
        state.scopes = vec![
            LoadedScope {
                rule: RuleId::from_bits(u64::MAX),
                target: ScopeTarget::Listed,
                counts: counts(2),
            },
            LoadedScope {
                rule: RuleId::from_bits(7),
                target: ScopeTarget::Own([0xa5; 16]),
                counts: counts(1),
            },
            LoadedScope {
                rule: RuleId::from_bits(7),
                target: ScopeTarget::Overflow,
                counts: counts(4),
            },
        ];
        let text = to_json(&state);
        assert_eq!(from_json(&text), Some(state));
        let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
        json.as_object_mut().expect("object").remove("scopes");
        let restored = from_json(&json.to_string()).expect("still read");
        assert!(restored.scopes.is_empty());
    }

    #[test]
    fn a_document_saved_before_months_has_the_day_alone() {
        let mut json: serde_json::Value =
            serde_json::from_str(&to_json(&saved(vec![counter(Period::Day, 5_000, 3)])))
                .expect("json");
        json.as_object_mut().expect("object").remove("calendars");
        let restored = from_json(&json.to_string()).expect("still read");
        assert_eq!(restored.calendars, vec![counter(Period::Day, 5_000, 3)]);
    }

    fn held(estimate: Usage) -> Reservation {
        Reservation {
            id: 7,
            charged_at: ts(5_000),
            estimate,
            expires_at: ts(65_000),
            model: Some("gpt-4o".into()),
            probe: false,
            charged_elsewhere_us: None,
        }
    }

    #[test]
    fn usage_is_saved_as_one_field_or_count_per_metric() {
        let mut state = saved(vec![counter(Period::Day, 5_000, 3)]);
        state.minute = vec![(5, Usage::call(40)), (6, Usage::tokens(2))];
        state.reservations = vec![held(Usage::call(250))];
        let json: serde_json::Value = serde_json::from_str(&to_json(&state)).expect("json");
        assert_eq!(
            json["minute"],
            serde_json::json!([[5, 1, 40, 0], [6, 0, 2, 0]])
        );
        assert_eq!(
            (&json["day_requests"], &json["day_tokens"]),
            (&3.into(), &30.into())
        );
        let reservation = &json["reservations"][0];
        assert_eq!(reservation["estimated_requests"], 1);
        assert_eq!(reservation["estimated_tokens"], 250);
        assert_eq!(from_json(&json.to_string()), Some(state));
    }

    #[test]
    fn a_reservation_saved_with_tokens_alone_was_charged_one_request() {
        let mut state = saved(vec![counter(Period::Day, 5_000, 3)]);
        state.reservations = vec![held(Usage::call(250))];
        let mut json: serde_json::Value = serde_json::from_str(&to_json(&state)).expect("json");
        json["reservations"][0]
            .as_object_mut()
            .expect("object")
            .remove("estimated_requests");
        let restored = from_json(&json.to_string()).expect("still read");
        assert_eq!(restored.reservations[0].estimate, Usage::call(250));
    }
}
