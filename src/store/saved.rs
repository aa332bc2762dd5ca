//! The JSON form of a workspace's live state, as kept in `workspace_state`.
//! These serde types exist only at this boundary; the domain never sees them.

use serde::{Deserialize, Serialize};

use crate::domain::status::Status;
use crate::domain::time::Period;
use crate::domain::time::Timestamp;
use crate::domain::upstream::{BillingCode, ErrorTally, LastError, UpstreamBucket, UpstreamView};
use crate::domain::window::{CalendarCounter, Usage};
use crate::domain::workspace::{BillingBlock, Reservation, Saved};

/// Bumped when the shape changes incompatibly; older documents are then
/// ignored (the workspace starts with empty windows) rather than misread.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct SavedJson {
    version: u32,
    /// `(second, requests, tokens)` buckets of the minute window.
    minute: Vec<(i64, u64, u64)>,
    day_start: i64,
    day_end: i64,
    day_requests: u64,
    day_tokens: u64,
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
}

#[derive(Serialize, Deserialize)]
struct CalendarJson {
    /// `Period::name`: "month".
    period: String,
    start: i64,
    end: i64,
    requests: u64,
    tokens: u64,
}

#[derive(Serialize, Deserialize)]
struct ReservationJson {
    id: u64,
    charged_at: i64,
    estimated_tokens: u64,
    expires_at: i64,
    model: Option<String>,
    probe: bool,
}

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
        minute: saved
            .minute
            .iter()
            .map(|(second, usage)| (*second, usage.requests, usage.tokens))
            .collect(),
        day_start: day.map_or(0, |day| day.start.millis()),
        day_end: day.map_or(0, |day| day.end.millis()),
        day_requests: day.map_or(0, |day| day.used.requests),
        day_tokens: day.map_or(0, |day| day.used.tokens),
        calendars: saved
            .calendars
            .iter()
            .filter(|counter| counter.period != Period::Day)
            .map(|counter| CalendarJson {
                period: counter.period.name().to_owned(),
                start: counter.start.millis(),
                end: counter.end.millis(),
                requests: counter.used.requests,
                tokens: counter.used.tokens,
            })
            .collect(),
        reservations: saved
            .reservations
            .iter()
            .map(|r| ReservationJson {
                id: r.id,
                charged_at: r.charged_at.millis(),
                estimated_tokens: r.estimated_tokens,
                expires_at: r.expires_at.millis(),
                model: r.model.as_deref().map(str::to_owned),
                probe: r.probe,
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
        minute: json
            .minute
            .into_iter()
            .map(|(second, requests, tokens)| (second, Usage { requests, tokens }))
            .collect(),
        calendars: std::iter::once(CalendarCounter {
            period: Period::Day,
            start: ts(json.day_start),
            end: ts(json.day_end),
            used: Usage {
                requests: json.day_requests,
                tokens: json.day_tokens,
            },
        })
        .chain(json.calendars.into_iter().filter_map(|counter| {
            Some(CalendarCounter {
                period: Period::ALL
                    .into_iter()
                    .find(|period| period.name() == counter.period)?,
                start: ts(counter.start),
                end: ts(counter.end),
                used: Usage {
                    requests: counter.requests,
                    tokens: counter.tokens,
                },
            })
        }))
        .collect(),
        reservations: json
            .reservations
            .into_iter()
            .map(|r| Reservation {
                id: r.id,
                charged_at: ts(r.charged_at),
                estimated_tokens: r.estimated_tokens,
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
    fn a_document_saved_before_months_has_the_day_alone() {
        let mut json: serde_json::Value =
            serde_json::from_str(&to_json(&saved(vec![counter(Period::Day, 5_000, 3)])))
                .expect("json");
        json.as_object_mut().expect("object").remove("calendars");
        let restored = from_json(&json.to_string()).expect("still read");
        assert_eq!(restored.calendars, vec![counter(Period::Day, 5_000, 3)]);
    }
}
