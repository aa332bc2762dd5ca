//! The JSON form of a workspace's live state, as kept in `workspace_state`.
//! These serde types exist only at this boundary; the domain never sees them.

use serde::{Deserialize, Serialize};

use crate::domain::status::Status;
use crate::domain::time::Timestamp;
use crate::domain::upstream::{BillingCode, ErrorTally, LastError, UpstreamBucket, UpstreamView};
use crate::domain::window::{DayCounter, Usage};
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
    let json = SavedJson {
        version: VERSION,
        minute: saved
            .minute
            .iter()
            .map(|(second, usage)| (*second, usage.requests, usage.tokens))
            .collect(),
        day_start: saved.day.start.millis(),
        day_end: saved.day.end.millis(),
        day_requests: saved.day.used.requests,
        day_tokens: saved.day.used.tokens,
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
        day: DayCounter {
            start: ts(json.day_start),
            end: ts(json.day_end),
            used: Usage {
                requests: json.day_requests,
                tokens: json.day_tokens,
            },
        },
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
