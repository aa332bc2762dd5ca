//! Every JSON shape of the REST and WebSocket API, and the conversions from
//! domain values. Serde and OpenAPI derive live here and nowhere else.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Number;
use utoipa::ToSchema;

use crate::admin::Change;
use crate::domain::credential::CredentialId;
use crate::domain::forecast::Forecast;
use crate::domain::limits::{
    LimitKind, Limits, Metric, PerLimit, Period, Unit, ValidationError, Window, WorkspaceConfig,
};
use crate::domain::notification::{Crossing, Notification};
use crate::domain::price::{PicoUsd, PriceTable, Rates, dollars};
use crate::domain::scope::{RuleInput, ScopeKind, ScopeRule, Selector};
use crate::domain::spend::ModelSpend;
use crate::domain::status::LimitFacts;
use crate::domain::threshold::{AlertThresholds, Percents, ThresholdsInput};
use crate::domain::time::Timestamp;
use crate::domain::upstream::UpstreamBucket;
use crate::domain::workspace::{BillingBlock, RecentUsage, ScopedFacts, Snapshot, SpendFacts};
use crate::edge::error::optional_object;
pub use crate::edge::error::{ErrorBody, ErrorDetail};
use crate::engine::BlockedCredential;
use crate::keys::KeyGrant;
use crate::store::KeyRecord;

/// Reads a field that may be absent (`Keep`, by `#[serde(default)]`), null
/// (`Set(None)`) or set.
fn change<'de, D, T>(deserializer: D) -> Result<Change<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Change::Set)
}

/// The reason a status gives while limits are enforced only in part: this
/// instance is cut off from the counters it shares with others.
const SHARED_STORE_UNREACHABLE: &str = "shared_store_unreachable";

/// A status's reasons, as the document lists them: the causes, highest
/// first, then whether this instance enforces limits alone.
fn reasons(snapshot: &Snapshot) -> Vec<String> {
    let mut reasons = snapshot.reasons.clone();
    if snapshot.degraded {
        reasons.push(SHARED_STORE_UNREACHABLE.to_owned());
    }
    reasons
}

fn rfc3339(at: Timestamp) -> String {
    at.to_rfc3339()
}

// ----- status -------------------------------------------------------------------

/// An amount of a limit's metric as the API writes it: a count of requests
/// or tokens, or dollars for a usd limit (whose counters hold nano-dollars).
pub fn amount(metric: Metric, value: u64) -> Number {
    match metric.unit() {
        Unit::Count => value.into(),
        // A count of nano-dollars in dollars is finite, so always a number.
        unit => Number::from_f64(unit.decimal(value)).unwrap_or_else(|| value.into()),
    }
}

/// A limit of `kind` as a client writes it (see [`amount`]), in the unit
/// its counters count. Dollars are rounded to the nearest nano-dollar,
/// which is exact for any amount of at most 9 decimal places up to
/// [`MAX_USD_LIMIT`](crate::domain::price::MAX_USD_LIMIT).
fn limit_of(kind: LimitKind, written: &Number) -> Result<u64, ValidationError> {
    let unit = kind.metric.unit();
    // A whole number is read as such, so that none loses a digit on its
    // way through a float.
    let value = match (unit, written.as_u64()) {
        (Unit::Count, whole) => whole,
        (_, _) => written.as_f64().and_then(|figure| unit.from_figure(figure)),
    };
    value.ok_or_else(|| {
        ValidationError::new(
            kind.name(),
            format!(
                "{kind} must be {}, or null for unlimited; got {written}",
                unit.expected()
            ),
        )
    })
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct LimitDoc {
    /// A count of requests or tokens; dollars for a usd limit.
    #[schema(value_type = f64)]
    pub limit: Number,
    #[schema(value_type = f64)]
    pub used: Number,
    #[schema(value_type = f64)]
    pub remaining: Number,
    /// `used / limit`, between 0 and 1 (above 1 when usage reported after the
    /// fact overshot the limit).
    pub utilization: f64,
    /// When the window is clear again (minute limits, null when empty) or
    /// the day or month ends (day and month limits).
    pub resets_at: Option<String>,
    /// When the limit runs out at the recent rate (the workspace's own
    /// limits; scoped limits have none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<ForecastDoc>,
}

impl LimitDoc {
    fn of(kind: LimitKind, facts: LimitFacts) -> Self {
        Self {
            limit: amount(kind.metric, facts.max),
            used: amount(kind.metric, facts.used),
            remaining: amount(kind.metric, facts.remaining()),
            utilization: (facts.utilization() * 10_000.0).round() / 10_000.0,
            resets_at: facts.resets_at.map(rfc3339),
            forecast: facts
                .forecast
                .map(|forecast| ForecastDoc::of(kind, forecast)),
        }
    }
}

/// When a limit runs out at the rate it is being used now.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct ForecastDoc {
    /// When the limit is used up at the recent rate; null when it does not
    /// run out before it resets (the end of the day or month; for the
    /// minute: when that rate, held for a minute, stays within the limit).
    /// The present instant when it is used up already.
    pub exhausts_at: Option<String>,
    /// The recent rate, in the limit's unit (requests, tokens, dollars) per
    /// hour.
    pub rate_per_hour: f64,
    /// What the rate rests on: `recent_seconds` (the minute: the average
    /// of its last 10 seconds), `smoothed` (day and month: an exponentially
    /// weighted average with a horizon of an hour for the day and six for
    /// the month), `period_average` (day and month, within a horizon of a
    /// start or reset: still mostly the period's average so far) or
    /// `used_up` (the limit is used up).
    pub basis: String,
}

impl ForecastDoc {
    fn of(kind: LimitKind, forecast: Forecast) -> Self {
        // Counts to a thousandth, dollars to a millionth: finer says nothing.
        let (rate, places) = match kind.metric.unit() {
            Unit::Count => (forecast.rate_per_hour, 1e3),
            Unit::Dollars => (
                forecast.rate_per_hour / crate::domain::price::NANO_USD_PER_DOLLAR as f64,
                1e6,
            ),
        };
        Self {
            exhausts_at: forecast.exhausts_at.map(rfc3339),
            rate_per_hour: (rate * places).round() / places,
            basis: forecast.basis.name().to_owned(),
        }
    }
}

/// The shapes with one field per limit kind, each field named after its
/// kind. The fields are listed once, in [`LimitKind::ALL`]'s order, so that
/// the conversions below go by position (an array of `LimitKind::COUNT`
/// destructured into them: a kind without its field does not compile).
macro_rules! limit_shapes {
    ($($field:ident),* $(,)?) => {
        /// One entry per configured limit; unlimited kinds are left out.
        #[derive(Serialize, ToSchema, Clone, Debug, Default)]
        pub struct LimitsDoc {
            $(
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $field: Option<LimitDoc>,
            )*
        }

        impl LimitsDoc {
            /// The document of the limits `facts` names; the others stay out.
            fn of<'a>(facts: impl IntoIterator<Item = &'a (LimitKind, LimitFacts)>) -> Self {
                let mut docs: [Option<LimitDoc>; LimitKind::COUNT] = Default::default();
                for (kind, facts) in facts {
                    docs[kind.index()] = Some(LimitDoc::of(*kind, *facts));
                }
                let [$($field),*] = docs;
                Self { $($field),* }
            }
        }

        /// Limits as configured (usd limits in dollars); null means
        /// unlimited.
        #[derive(Serialize, ToSchema, Debug, Clone)]
        pub struct LimitSettingsDoc {
            $(
                #[schema(value_type = Option<f64>)]
                pub $field: Option<Number>,
            )*
        }

        impl From<Limits> for LimitSettingsDoc {
            fn from(limits: Limits) -> Self {
                let [$($field),*] = LimitKind::ALL
                    .map(|kind| limits.get(kind).map(|max| amount(kind.metric, max)));
                Self { $($field),* }
            }
        }

        /// Limits to set: a number (usd limits in dollars), null for
        /// unlimited, or left out (on creation: the server default; on
        /// update: unchanged).
        #[derive(Deserialize, ToSchema, Debug, Default)]
        #[serde(deny_unknown_fields)]
        pub struct LimitsInput {
            $(
                #[serde(default, deserialize_with = "change")]
                #[schema(value_type = Option<f64>)]
                pub $field: Change<Option<Number>>,
            )*
        }

        impl LimitsInput {
            /// The limits in the units their counters count.
            pub fn to_per_limit(&self) -> Result<PerLimit<Change<Option<u64>>>, ValidationError> {
                let written = [$(&self.$field),*];
                let mut limits = PerLimit::default();
                for (kind, change) in LimitKind::ALL.into_iter().zip(written) {
                    if let Change::Set(value) = change {
                        let value = value.as_ref().map(|value| limit_of(kind, value)).transpose()?;
                        limits.set(kind, Change::Set(value));
                    }
                }
                Ok(limits)
            }
        }
    };
}

limit_shapes!(
    requests_per_minute,
    requests_per_day,
    requests_per_month,
    tokens_per_minute,
    tokens_per_day,
    tokens_per_month,
    usd_per_minute,
    usd_per_day,
    usd_per_month,
);

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct UpstreamBucketDoc {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub resets_at: Option<String>,
    pub observed_at: String,
}

impl From<UpstreamBucket> for UpstreamBucketDoc {
    fn from(bucket: UpstreamBucket) -> Self {
        Self {
            limit: bucket.limit,
            remaining: bucket.remaining,
            resets_at: bucket.resets_at.map(rfc3339),
            observed_at: rfc3339(bucket.observed_at),
        }
    }
}

/// The upstream's own headroom, from its last `x-ratelimit-*` headers.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct UpstreamDoc {
    pub requests: Option<UpstreamBucketDoc>,
    pub tokens: Option<UpstreamBucketDoc>,
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct LastErrorDoc {
    pub at: String,
    pub status_code: u16,
    #[serde(rename = "type")]
    pub error_type: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
}

/// Upstream errors and local refusals over the last hour.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct ErrorsDoc {
    pub window_seconds: u64,
    pub rate_limited: u64,
    pub insufficient_quota: u64,
    pub server_error: u64,
    pub other: u64,
    /// Requests quotawatch refused itself.
    pub refused: u64,
    pub last: Option<LastErrorDoc>,
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct BillingBlockDoc {
    pub code: String,
    pub since: String,
    pub next_probe_at: String,
    /// The upstream credential blocked (a fingerprint, never the key), for
    /// every workspace billed to it; null for a block of this workspace's
    /// own, from a billing error its app reported.
    pub credential: Option<String>,
}

impl BillingBlockDoc {
    fn of(block: BillingBlock, credential: Option<&CredentialId>) -> Self {
        Self {
            code: block.code.code().to_owned(),
            since: rfc3339(block.since),
            next_probe_at: rfc3339(block.next_probe_at),
            credential: credential.map(ToString::to_string),
        }
    }
}

/// Where a workspace stands.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct StatusDoc {
    pub workspace: String,
    pub name: String,
    /// `normal`, `warning`, `rate_limited` or `quota_exceeded`.
    pub status: String,
    pub since: String,
    /// Machine-readable causes, highest first, e.g. `requests_per_day_exhausted`.
    pub reasons: Vec<String>,
    /// True while this instance cannot reach the shared counters (Redis)
    /// and enforces limits on its own, as `QUOTAWATCH_ON_STORE_ERROR` says;
    /// `reasons` then includes `shared_store_unreachable`.
    pub degraded: bool,
    /// Whether a request would be refused right now.
    pub blocked: bool,
    /// Seconds until a request can succeed, when blocked and known.
    pub retry_after_seconds: Option<f64>,
    pub limits: LimitsDoc,
    /// What was used, whether or not limits are set.
    pub usage: UsageDoc,
    pub upstream: Option<UpstreamDoc>,
    pub billing_block: Option<BillingBlockDoc>,
    pub errors: ErrorsDoc,
    /// Models called that the prices do not know, charged at the unpriced
    /// rates (each raised an `unpriced_model` notification), first called
    /// first.
    pub unpriced_models: Vec<String>,
    /// Each scoped limit: a model rule's usage of its limits; of the
    /// per-user rule only how many users it tracks (never which).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scoped_limits: Vec<ScopedLimitStatusDoc>,
    /// What today and this month spent, in all and by model.
    pub spend: SpendDoc,
    pub updated_at: String,
}

/// Where one scoped limit stands.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct ScopedLimitStatusDoc {
    #[serde(flatten)]
    pub rule: ScopedLimitDoc,
    /// A listed rule's use of each of its limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<LimitsDoc>,
    /// Of a rule counting each value apart: how many it tracks now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracked: Option<usize>,
    /// Whether values beyond the most it tracks share one counter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overflow: Option<bool>,
    /// Requests it refused since it was configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
}

impl ScopedLimitStatusDoc {
    fn of(rule: &ScopeRule, facts: &ScopedFacts) -> Self {
        let rule = ScopedLimitDoc::from(rule);
        match facts {
            ScopedFacts::Listed(facts) => Self {
                rule,
                usage: Some(LimitsDoc::of(facts)),
                tracked: None,
                overflow: None,
                refused: None,
            },
            ScopedFacts::Each(summary) => Self {
                rule,
                usage: None,
                tracked: Some(summary.tracked),
                overflow: Some(summary.overflow),
                refused: Some(summary.refused),
            },
        }
    }
}

/// Requests, tokens and money counted (reservations of calls in flight
/// included, at their estimates).
#[derive(Serialize, ToSchema, Clone, Copy, Debug)]
pub struct CountsDoc {
    pub requests: u64,
    pub tokens: u64,
    /// Dollars spent, as the price table in force prices each call.
    pub usd: f64,
}

/// [`UsageDoc`], with a field per calendar period after the minute's. The
/// periods' fields are listed once, in [`Period::ALL`]'s order, so that the
/// conversion and [`usage_name`] go by position (a period without its field
/// does not compile).
macro_rules! usage_shape {
    ($($(#[doc = $doc:literal])* $field:ident),* $(,)?) => {
        #[derive(Serialize, ToSchema, Clone, Copy, Debug)]
        pub struct UsageDoc {
            /// Over the sliding minute.
            pub last_minute: CountsDoc,
            $(
                $(#[doc = $doc])*
                pub $field: CountsDoc,
            )*
        }

        impl From<RecentUsage> for UsageDoc {
            fn from(usage: RecentUsage) -> Self {
                let [$($field),*] = usage.calendars.map(CountsDoc::from);
                Self {
                    last_minute: usage.last_minute.into(),
                    $($field),*
                }
            }
        }

        /// What each current calendar period spent (a field per period,
        /// as `usage` has), in all and by model, and the day of the prices.
        #[derive(Serialize, ToSchema, Clone, Debug)]
        pub struct SpendDoc {
            $(
                $(#[doc = $doc])*
                pub $field: PeriodSpendDoc,
            )*
            /// The day the prices in force were taken (the price table's
            /// `taken`, as `GET /api/prices` shows it).
            pub prices_taken: String,
        }

        impl SpendDoc {
            fn of(usage: &RecentUsage, spend: &SpendFacts) -> Self {
                let [$($field),*] = Period::ALL.map(|period| {
                    PeriodSpendDoc::of(usage.calendar(period), &spend.calendars[period.index()])
                });
                Self {
                    $($field,)*
                    prices_taken: spend.prices_taken.clone(),
                }
            }
        }

        /// The field of [`UsageDoc`] that counts over `window`.
        pub fn usage_name(window: Window) -> &'static str {
            const CALENDARS: [&str; Period::ALL.len()] = [$(stringify!($field)),*];
            window
                .period()
                .map_or("last_minute", |period| CALENDARS[period.index()])
        }
    };
}

usage_shape!(
    /// Since midnight in the workspace's timezone.
    today,
    /// Since midnight on the first of the month in the workspace's timezone.
    this_month,
);

/// What a calendar period spent.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct PeriodSpendDoc {
    /// Dollars spent, as the period's usd counters count it (and its
    /// budgets, `usd_per_day` or `usd_per_month`, enforce): calls in
    /// flight included, at their estimates.
    pub usd: f64,
    /// Finished calls by model, as history records them (up to 100 models;
    /// further ones count as `other`); calls that named no model cost
    /// nothing and are left out.
    pub by_model: BTreeMap<String, ModelSpendDoc>,
}

impl PeriodSpendDoc {
    fn of(
        usage: crate::domain::window::Usage,
        by_model: &BTreeMap<crate::domain::workspace::Model, ModelSpend>,
    ) -> Self {
        Self {
            usd: dollars(usage.usd),
            by_model: by_model
                .iter()
                .map(|(model, spend)| (model.to_string(), ModelSpendDoc::from(*spend)))
                .collect(),
        }
    }
}

/// What one model's calls cost, with the tokens that cost it.
#[derive(Serialize, ToSchema, Clone, Copy, Debug)]
pub struct ModelSpendDoc {
    /// Dollars.
    pub usd: f64,
    /// Prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prompt cache.
    pub cached_tokens: u64,
    /// Completion tokens, reasoning included.
    pub completion_tokens: u64,
}

impl From<ModelSpend> for ModelSpendDoc {
    fn from(spend: ModelSpend) -> Self {
        Self {
            usd: dollars(spend.usd),
            prompt_tokens: spend.prompt,
            cached_tokens: spend.cached,
            completion_tokens: spend.completion,
        }
    }
}

impl From<crate::domain::window::Usage> for CountsDoc {
    fn from(usage: crate::domain::window::Usage) -> Self {
        Self {
            requests: usage.requests,
            tokens: usage.tokens,
            usd: dollars(usage.usd),
        }
    }
}

impl From<&Snapshot> for StatusDoc {
    fn from(snapshot: &Snapshot) -> Self {
        let limits = LimitsDoc::of(&snapshot.limits);
        let errors = snapshot.errors;
        Self {
            workspace: snapshot.config.id.to_string(),
            name: snapshot.config.name.clone(),
            status: snapshot.status.name().to_owned(),
            since: rfc3339(snapshot.since),
            reasons: reasons(snapshot),
            degraded: snapshot.degraded,
            blocked: snapshot.blocked,
            retry_after_seconds: snapshot
                .retry_at
                .map(|at| snapshot.at.until(at).as_millis() as f64 / 1000.0),
            limits,
            usage: snapshot.usage.into(),
            upstream: snapshot.upstream.map(|view| UpstreamDoc {
                requests: view.requests.map(Into::into),
                tokens: view.tokens.map(Into::into),
            }),
            // The workspace's own block, which an admin lifts with the
            // workspace, first.
            billing_block: match (&snapshot.billing, &snapshot.credential_block) {
                (Some(own), _) => Some(BillingBlockDoc::of(*own, None)),
                (None, Some(shown)) => {
                    Some(BillingBlockDoc::of(shown.block, Some(&shown.credential)))
                }
                (None, None) => None,
            },
            errors: ErrorsDoc {
                window_seconds: crate::domain::workspace::ERROR_HISTORY.as_secs(),
                rate_limited: errors.rate_limited,
                insufficient_quota: errors.insufficient_quota,
                server_error: errors.server_error,
                other: errors.other,
                refused: errors.refused,
                last: snapshot.last_error.as_ref().map(|e| LastErrorDoc {
                    at: rfc3339(e.at),
                    status_code: e.status_code,
                    error_type: e.error_type.clone(),
                    code: e.code.clone(),
                    message: e.message.clone(),
                }),
            },
            unpriced_models: snapshot
                .unpriced_models
                .iter()
                .map(ToString::to_string)
                .collect(),
            scoped_limits: snapshot
                .config
                .scoped_limits
                .rules()
                .iter()
                .zip(&snapshot.scoped)
                .map(|(rule, facts)| ScopedLimitStatusDoc::of(rule, facts))
                .collect(),
            spend: SpendDoc::of(&snapshot.usage, &snapshot.spend),
            updated_at: rfc3339(snapshot.at),
        }
    }
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct TenantTextDoc {
    pub title: String,
    pub message: String,
    pub suggested_actions: Vec<String>,
}

/// The admin's view without `?workspace`: every workspace, worst first.
#[derive(Serialize, ToSchema, Debug)]
pub struct StatusListDoc {
    pub workspaces: Vec<StatusDoc>,
}

// ----- upstream credentials ---------------------------------------------------------

/// An upstream credential blocked by billing.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct CredentialDoc {
    /// A fingerprint of the upstream key with its organization and project;
    /// never the key itself.
    pub credential: String,
    pub billing_block: BillingBlockDoc,
    /// The block's one notification.
    pub notification: NotificationDoc,
    /// The workspaces billed to the credential, all refused while it lasts.
    pub workspaces: Vec<String>,
}

impl From<&BlockedCredential> for CredentialDoc {
    fn from(blocked: &BlockedCredential) -> Self {
        Self {
            credential: blocked.credential.to_string(),
            billing_block: BillingBlockDoc::of(blocked.block, Some(&blocked.credential)),
            notification: NotificationDoc::from(&blocked.notification),
            workspaces: blocked.workspaces.iter().map(ToString::to_string).collect(),
        }
    }
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct CredentialListDoc {
    pub credentials: Vec<CredentialDoc>,
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct LiftedDoc {
    pub credential: String,
    /// Whether the credential was blocked on this instance.
    pub lifted: bool,
}

// ----- notifications -------------------------------------------------------------

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct NotificationDoc {
    pub id: String,
    /// Null for service-wide notifications.
    pub workspace: Option<String>,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// `approaching_limit`, `rate_limited`, `daily_quota_exhausted`,
    /// `monthly_quota_exhausted`, `upstream_rate_limited`, `upstream_quota_exhausted`, `upstream_errors`,
    /// `storage_unavailable`, `shared_store_unavailable`,
    /// `upstream_key_missing` or `unpriced_model`.
    pub kind: String,
    /// `title`, `message` and `suggested_actions` are the operator's: what
    /// happened in full, and what to change where.
    pub title: String,
    pub message: String,
    pub suggested_actions: Vec<String>,
    /// What a tenant's own users may be shown instead: no internal
    /// endpoints, operator URLs or upstream error texts.
    pub tenant: TenantTextDoc,
    pub limit: Option<String>,
    /// Of a `threshold_crossed` notification: the threshold, the numbers it
    /// was crossed at and the period it belongs to; left out of others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ThresholdDoc>,
    pub created_at: String,
    /// When the cause is expected to end by itself, if known.
    pub resolves_at: Option<String>,
    /// When the cause ended; null while active.
    pub resolved_at: Option<String>,
}

impl From<&Notification> for NotificationDoc {
    fn from(n: &Notification) -> Self {
        Self {
            id: n.id.clone(),
            workspace: n.workspace.as_ref().map(ToString::to_string),
            severity: n.severity.name().to_owned(),
            kind: n.kind.name().to_owned(),
            title: n.title.clone(),
            message: n.message.clone(),
            suggested_actions: n.suggested_actions.clone(),
            tenant: TenantTextDoc {
                title: n.tenant.title.clone(),
                message: n.tenant.message.clone(),
                suggested_actions: n.tenant.suggested_actions.clone(),
            },
            limit: n.limit.map(|kind| kind.name().to_owned()),
            threshold: n
                .limit
                .zip(n.crossing)
                .map(|(kind, crossing)| ThresholdDoc::of(kind, crossing)),
            created_at: rfc3339(n.created_at),
            resolves_at: n.resolves_at.map(rfc3339),
            resolved_at: n.resolved_at.map(rfc3339),
        }
    }
}

/// A limit's usage crossing one of its alert thresholds.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct ThresholdDoc {
    /// The threshold, a percentage of the limit.
    pub percent: u8,
    /// What the period had used when the crossing was seen, and the limit
    /// then (dollars for a usd limit).
    #[schema(value_type = f64)]
    pub used: Number,
    #[schema(value_type = f64)]
    pub limit: Number,
    /// `day` or `month`.
    pub window: String,
    /// The period the crossing belongs to: it is announced once in it.
    pub period_start: String,
    pub period_end: String,
}

impl ThresholdDoc {
    fn of(kind: LimitKind, crossing: Crossing) -> Self {
        Self {
            percent: crossing.percent,
            used: amount(kind.metric, crossing.used),
            limit: amount(kind.metric, crossing.max),
            window: kind.window.name().to_owned(),
            period_start: rfc3339(crossing.period_start),
            period_end: rfc3339(crossing.period_end),
        }
    }
}

#[derive(Serialize, ToSchema, Debug)]
pub struct NotificationsDoc {
    pub workspace: String,
    pub status: String,
    /// Active notifications, most severe first; with `?include=history`
    /// resolved ones follow, newest first.
    pub notifications: Vec<NotificationDoc>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct NotificationsListDoc {
    pub workspaces: Vec<NotificationsDoc>,
}

// ----- check and usage -------------------------------------------------------------

#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// Tokens the call will use at most (prompt plus maximum completion);
    /// charged now and settled when usage is reported. At most
    /// 1,000,000,000, as is each token count of a usage report.
    pub estimated_tokens: Option<u64>,
    /// Of `estimated_tokens`, those of the prompt, which the cost estimate
    /// charges at the model's input rate; the rest (the completion
    /// allowance) at its output rate. Without it, every estimated token is
    /// charged at the output rate, the higher, so that a budget errs toward
    /// refusing.
    pub estimated_prompt_tokens: Option<u64>,
    /// 1 to 100 characters among ASCII letters, digits and `. _ - : / @`.
    /// The cost estimate is at its price (see `GET /api/prices`); a model
    /// the prices do not know at the unpriced rates; without a model, the
    /// call costs nothing.
    pub model: Option<String>,
    /// The processing tier the call asks for (`flex`, `priority`; others
    /// are the standard tier), where the prices have its rates.
    pub service_tier: Option<String>,
    /// The end user the call is for (1 to 256 bytes, no control
    /// characters), whom per-user scoped limits count apart; the
    /// `X-Quotawatch-User` header takes precedence.
    pub user: Option<String>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct CheckResponse {
    pub allowed: bool,
    /// Pass this to `POST /api/quota/usage` to settle the estimate.
    pub reservation_id: String,
    /// When an unsettled reservation becomes final with its estimate.
    pub expires_at: String,
    /// True when this call is the one probe let through a billing block:
    /// report its outcome so the block can lift.
    pub probe: bool,
    /// What is left of each configured limit after this call (of usd
    /// limits, in dollars).
    #[schema(value_type = BTreeMap<String, f64>)]
    pub remaining: BTreeMap<String, Number>,
}

#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct UsageRequest {
    /// From `POST /api/quota/check`; without it the call counts as one
    /// request plus its tokens.
    pub reservation_id: Option<String>,
    /// 1 to 100 characters among ASCII letters, digits and `. _ - : / @`.
    /// The call's exact cost is at its price.
    pub model: Option<String>,
    /// The processing tier the call used (`flex`, `priority`; others are
    /// the standard tier).
    pub service_tier: Option<String>,
    /// As in `POST /api/quota/check`: a call reported without reservation
    /// is charged to its end user's scoped limits.
    pub user: Option<String>,
    #[serde(default, deserialize_with = "optional_object")]
    pub usage: Option<crate::openai::Usage>,
    /// The upstream's HTTP status (default 200, or 429 when `error` is given).
    pub status_code: Option<u16>,
    #[serde(default, deserialize_with = "optional_object")]
    pub error: Option<crate::openai::ErrorObject>,
    /// The upstream's response headers; `x-ratelimit-*`, `retry-after` and
    /// `retry-after-ms` are read.
    #[schema(value_type = Option<Object>)]
    pub headers: Option<BTreeMap<String, String>>,
    /// How long the call took, for history; at most a day (86,400,000).
    pub latency_ms: Option<u64>,
}

// ----- reset -----------------------------------------------------------------------

#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    pub workspace: Option<String>,
    pub all: Option<bool>,
    /// What to set back: `block` lifts the upstream's blocks (billing,
    /// rate, rejected key) and keeps the counts; `usage` sets the counts
    /// to zero and keeps the blocks; `all` (the default) does both and
    /// clears the notifications.
    #[serde(default)]
    pub what: ResetWhat,
}

#[derive(Deserialize, Serialize, ToSchema, Debug, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResetWhat {
    Block,
    Usage,
    #[default]
    All,
}

impl From<ResetWhat> for crate::domain::workspace::ResetScope {
    fn from(what: ResetWhat) -> Self {
        match what {
            ResetWhat::Block => Self::Blocks,
            ResetWhat::Usage => Self::Usage,
            ResetWhat::All => Self::All,
        }
    }
}

#[derive(Serialize, ToSchema, Debug)]
pub struct ResetResponse {
    pub reset: Vec<String>,
    pub what: ResetWhat,
}

// ----- history -----------------------------------------------------------------------

#[derive(Deserialize, ToSchema, Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// `1h`, `24h`, `7d`, `30d`, ... (default `24h`).
    pub window: Option<String>,
    /// `1m` (windows up to 48h), `1h` (up to 35d), `1d` (up to 400d; days
    /// in the workspace's timezone) or `1mo` (calendar months in the
    /// workspace's timezone, as month limits count them; the window in
    /// 30-day months, e.g. `90d` for three, up to 390d). Default `1m`.
    pub step: Option<String>,
    /// Admin only: the workspace to show.
    pub workspace: Option<String>,
}

#[derive(Serialize, ToSchema, Debug, Clone, Copy, Default)]
pub struct HistoryPoint {
    /// Start of the step, milliseconds since the Unix epoch.
    pub t: i64,
    pub requests: i64,
    pub tokens: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub reasoning_tokens: i64,
    /// Calls that did not succeed upstream, of any kind.
    pub errors: i64,
    /// Calls the upstream answered with a 4xx (including 429s).
    pub client_errors: i64,
    /// Calls the upstream answered with a 5xx, or that got no answer at all.
    pub server_errors: i64,
    /// Calls quotawatch refused before they reached the upstream.
    pub refused: i64,
    /// What the step's calls cost, in dollars, as budgets count it (each
    /// call rounded up to a whole nano-dollar).
    pub usd: f64,
    /// Mean latency of the step's reported calls, in milliseconds.
    pub avg_latency_ms: Option<f64>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct HistoryDoc {
    pub workspace: String,
    pub window: String,
    pub step: String,
    pub points: Vec<HistoryPoint>,
}

// ----- workspaces and keys -------------------------------------------------------------

#[derive(Serialize, ToSchema, Debug, Clone)]
pub struct WorkspaceDoc {
    pub id: String,
    pub name: String,
    pub timezone: String,
    pub limits: LimitSettingsDoc,
    pub warn_at: f64,
    /// The environment variable holding this workspace's own OpenAI key, or
    /// null for the server's `OPENAI_API_KEY`. The key itself is never shown.
    pub upstream_key_env: Option<String>,
    /// The OpenAI organization billed for this workspace's calls, or null
    /// for the upstream key's default. Clients cannot choose it.
    pub upstream_organization: Option<String>,
    /// The OpenAI project billed for this workspace's calls, or null for the
    /// upstream key's default. Clients cannot choose it.
    pub upstream_project: Option<String>,
    /// Limits on the calls of some models, or of each end user; left out
    /// when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scoped_limits: Vec<ScopedLimitDoc>,
    pub alert_thresholds: AlertThresholdsDoc,
}

/// The shares of the day and month limits whose crossing raises a
/// `threshold_crossed` notification, once per limit and period.
#[derive(Serialize, ToSchema, Debug, Clone)]
pub struct AlertThresholdsDoc {
    /// Percentages of every day and month limit without a list of its own.
    pub default: Vec<u8>,
    /// Lists of their own, by limit name (`tokens_per_day`); an empty list
    /// announces nothing for that limit.
    pub limits: BTreeMap<String, Vec<u8>>,
}

impl From<&AlertThresholds> for AlertThresholdsDoc {
    fn from(thresholds: &AlertThresholds) -> Self {
        let listed = |percents: Percents| percents.iter().collect();
        Self {
            default: listed(thresholds.default),
            limits: thresholds
                .per_limit
                .iter()
                .filter_map(|(kind, percents)| Some((kind.name().to_owned(), listed(percents?))))
                .collect(),
        }
    }
}

/// Alert thresholds to set; they replace the workspace's whole (`{}` sets
/// the defaults back).
#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct AlertThresholdsInput {
    /// Whole percentages from 1 to 100 for every day and month limit;
    /// default 50, 80, 95 and 100.
    pub default: Option<Vec<f64>>,
    /// Lists of their own by day or month limit name; null returns a limit
    /// to the default list, an empty list turns its alerts off.
    #[serde(default)]
    pub limits: BTreeMap<String, Option<Vec<f64>>>,
}

impl From<&AlertThresholdsInput> for ThresholdsInput {
    fn from(input: &AlertThresholdsInput) -> Self {
        Self {
            default: input.default.clone(),
            limits: input
                .limits
                .iter()
                .map(|(name, percents)| (name.clone(), percents.clone()))
                .collect(),
        }
    }
}

impl From<&WorkspaceConfig> for WorkspaceDoc {
    fn from(config: &WorkspaceConfig) -> Self {
        Self {
            id: config.id.to_string(),
            name: config.name.clone(),
            timezone: config.timezone.name().to_owned(),
            limits: config.limits.into(),
            warn_at: config.warn_at,
            upstream_key_env: config.upstream_key_env.clone(),
            upstream_organization: config.upstream_organization.clone(),
            upstream_project: config.upstream_project.clone(),
            scoped_limits: config
                .scoped_limits
                .rules()
                .iter()
                .map(ScopedLimitDoc::from)
                .collect(),
            alert_thresholds: (&config.alert_thresholds).into(),
        }
    }
}

#[derive(Serialize, ToSchema, Debug)]
pub struct WorkspaceListDoc {
    pub workspaces: Vec<WorkspaceDoc>,
}

/// A workspace's settings, for `POST` (where `id` is required) and `PATCH`
/// (where every field is optional, and `id`, if given, must match the path).
#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceInput {
    pub id: Option<String>,
    pub name: Option<String>,
    /// An IANA timezone name; the day and month limits reset at its
    /// midnight. Default UTC.
    pub timezone: Option<String>,
    #[serde(default, deserialize_with = "optional_object")]
    pub limits: Option<LimitsInput>,
    pub warn_at: Option<f64>,
    /// The environment variable holding this workspace's own OpenAI key;
    /// null for the server's `OPENAI_API_KEY`.
    #[serde(default, deserialize_with = "change")]
    #[schema(value_type = Option<String>)]
    pub upstream_key_env: Change<Option<String>>,
    /// The OpenAI organization (`org-…`) billed for this workspace's calls;
    /// null for the upstream key's default.
    #[serde(default, deserialize_with = "change")]
    #[schema(value_type = Option<String>)]
    pub upstream_organization: Change<Option<String>>,
    /// The OpenAI project (`proj_…`) billed for this workspace's calls; null
    /// for the upstream key's default.
    #[serde(default, deserialize_with = "change")]
    #[schema(value_type = Option<String>)]
    pub upstream_project: Change<Option<String>>,
    /// Limits on the calls of some models, or of each end user, on top of
    /// the workspace's own: a list replaces them, null or [] removes them.
    #[serde(default, deserialize_with = "change")]
    #[schema(value_type = Option<Vec<ScopedLimitInput>>)]
    pub scoped_limits: Change<Option<Vec<ScopedLimitInput>>>,
    /// The alert thresholds, replaced whole; left out (or null), they stay
    /// as they are.
    #[serde(default, deserialize_with = "optional_object")]
    pub alert_thresholds: Option<AlertThresholdsInput>,
}

impl WorkspaceInput {
    pub fn to_spec(&self) -> Result<crate::admin::WorkspaceSpec, ValidationError> {
        Ok(crate::admin::WorkspaceSpec {
            name: self.name.clone(),
            timezone: self.timezone.clone(),
            limits: self
                .limits
                .as_ref()
                .map(LimitsInput::to_per_limit)
                .transpose()?
                .unwrap_or_default(),
            warn_at: self.warn_at,
            upstream_key_env: self.upstream_key_env.clone(),
            upstream_organization: self.upstream_organization.clone(),
            upstream_project: self.upstream_project.clone(),
            scoped_limits: match &self.scoped_limits {
                Change::Keep => Change::Keep,
                Change::Set(None) => Change::Set(Vec::new()),
                Change::Set(Some(rules)) => Change::Set(
                    rules
                        .iter()
                        .enumerate()
                        .map(|(index, rule)| rule.to_rule(index))
                        .collect::<Result<_, _>>()?,
                ),
            },
            alert_thresholds: self.alert_thresholds.as_ref().map(Into::into),
        })
    }
}

/// What a scoped limit selects: `"each"` value apart, or listed patterns
/// counted together.
#[derive(Deserialize, Serialize, ToSchema, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum SelectionDoc {
    /// `"each"`: every value counted apart (the only choice for users).
    Each(String),
    /// Model names, or prefixes ending in `*`, sharing one counter.
    Listed(Vec<String>),
}

/// The field of each scope kind, by `ScopeKind::index`, so that a kind
/// without its field here does not compile.
fn selections<T>(models: T, users: T) -> crate::domain::scope::PerScope<T> {
    [models, users]
}

/// A scoped limit as the API takes it: exactly one of `models` and
/// `users`, and its limits (as a workspace's, with no defaults).
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct ScopedLimitInput {
    pub models: Option<SelectionDoc>,
    pub users: Option<SelectionDoc>,
    #[serde(default)]
    pub limits: LimitsInput,
}

impl ScopedLimitInput {
    fn to_rule(&self, index: usize) -> Result<RuleInput, ValidationError> {
        let at = format!("scoped_limits[{index}]");
        let given: Vec<(ScopeKind, &SelectionDoc)> = ScopeKind::ALL
            .into_iter()
            .zip(selections(&self.models, &self.users))
            .filter_map(|(kind, selection)| Some((kind, selection.as_ref()?)))
            .collect();
        let (kind, listed) = match given.as_slice() {
            [] => (None, None),
            [(kind, SelectionDoc::Each(each))] if each == "each" => (Some(*kind), None),
            [(kind, SelectionDoc::Listed(listed))] => (Some(*kind), Some(listed.clone())),
            [(kind, SelectionDoc::Each(other))] => {
                return Err(ValidationError::new(
                    format!("{at}.{}", kind.field()),
                    format!("{other:?} is neither \"each\" nor a list of patterns"),
                ));
            }
            [_, ..] => {
                return Err(ValidationError::new(
                    at,
                    "a scoped limit names exactly one of models and users",
                ));
            }
        };
        let mut limits = Limits::default();
        let written = self.limits.to_per_limit().map_err(|error| {
            ValidationError::new(format!("{at}.limits.{}", error.field), error.message)
        })?;
        for (limit, change) in written.iter() {
            if let Change::Set(max) = change {
                limits.set(limit, max);
            }
        }
        Ok(RuleInput {
            kind,
            listed,
            limits,
        })
    }
}

/// A scoped limit as configured, in the shape the API takes.
#[derive(Serialize, ToSchema, Debug, Clone)]
pub struct ScopedLimitDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<SelectionDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<SelectionDoc>,
    pub limits: LimitSettingsDoc,
}

impl From<&ScopeRule> for ScopedLimitDoc {
    fn from(rule: &ScopeRule) -> Self {
        let selection = match &rule.selector {
            Selector::Each => SelectionDoc::Each("each".to_owned()),
            Selector::Listed(patterns) => {
                SelectionDoc::Listed(patterns.iter().map(ToString::to_string).collect())
            }
        };
        let mut by_kind: crate::domain::scope::PerScope<Option<SelectionDoc>> = Default::default();
        by_kind[rule.kind.index()] = Some(selection);
        let [models, users] = by_kind;
        Self {
            models,
            users,
            limits: rule.limits.into(),
        }
    }
}

/// What can be chosen when a workspace key is made; every field is optional.
#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyInput {
    /// What the key is for, shown in lists (up to 100 characters).
    pub name: Option<String>,
    /// Of `proxy` (`/v1`), `report` (`/api/quota/check` and `usage`) and
    /// `read` (status, notifications, history, the WebSocket); all three
    /// when left out.
    pub scopes: Option<Vec<String>>,
    /// Seconds until the key stops working (60 to ten years); never when
    /// left out.
    pub expires_in: Option<u64>,
}

/// What can be chosen when a service key is made; every field is optional.
#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ServiceKeyInput {
    pub name: Option<String>,
    /// The workspaces the key may act for; any when left out.
    pub workspaces: Option<Vec<String>>,
    pub expires_in: Option<u64>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct KeyDoc {
    pub id: String,
    /// The workspace of a workspace key; `null` for a service key.
    pub workspace: Option<String>,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub name: String,
    /// `proxy`, `report`, `read`; or `service` for a service key.
    pub scopes: Vec<String>,
    /// The workspaces a service key may act for; `null` for any (and for a
    /// workspace key).
    pub workspaces: Option<Vec<String>>,
    pub created_at: String,
    pub expires_at: Option<String>,
    /// To the minute, and up to a second late.
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl From<&KeyRecord> for KeyDoc {
    fn from(key: &KeyRecord) -> Self {
        let (workspace, scopes, workspaces) = match &key.grant {
            KeyGrant::Workspace { workspace, scopes } => (
                Some(workspace.to_string()),
                scopes
                    .iter()
                    .map(|scope| scope.as_str().to_owned())
                    .collect(),
                None,
            ),
            KeyGrant::Service { workspaces } => (
                None,
                vec!["service".to_owned()],
                workspaces
                    .as_ref()
                    .map(|list| list.iter().map(ToString::to_string).collect()),
            ),
        };
        Self {
            id: key.id.clone(),
            workspace,
            prefix: key.prefix.clone(),
            name: key.name.clone(),
            scopes,
            workspaces,
            created_at: rfc3339(key.created_at),
            expires_at: key.expires_at.map(rfc3339),
            last_used_at: key.last_used_at.map(rfc3339),
            revoked_at: key.revoked_at.map(rfc3339),
        }
    }
}

#[derive(Serialize, ToSchema, Debug)]
pub struct CreatedKeyDoc {
    /// The key itself. It is shown this once and cannot be retrieved again.
    pub key: String,
    #[serde(flatten)]
    pub doc: KeyDoc,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct KeyListDoc {
    pub keys: Vec<KeyDoc>,
}

/// A browser token to mint.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct TokenInput {
    /// The workspace whose status the token may read.
    pub workspace: String,
    /// Seconds the token lasts: 60 to 86400, 900 when left out.
    pub expires_in: Option<u64>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct TokenDoc {
    /// Send as `Authorization: Bearer <token>`; read-only, for one workspace.
    pub token: String,
    pub workspace: String,
    /// Always `["read"]`.
    pub scopes: Vec<String>,
    pub expires_at: String,
    pub expires_in: u64,
}

// ----- WebSocket ----------------------------------------------------------------------

#[derive(Serialize, ToSchema, Debug)]
pub struct TicketDoc {
    /// Pass as `?ticket=` to `GET /api/quota/ws`; valid once, for 60 seconds.
    pub ticket: String,
    pub expires_at: String,
}

/// Messages the server sends on the WebSocket.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    /// The full status, on connect, on every status change, and after a
    /// client fell behind (`resync: true`).
    Status {
        workspace: &'a str,
        data: &'a StatusDoc,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        resync: bool,
    },
    /// Usage moved; at most twice a second per workspace.
    Usage {
        workspace: &'a str,
        data: &'a StatusDoc,
    },
    /// A notification was raised or resolved.
    Notification {
        workspace: Option<&'a str>,
        event: &'a str,
        data: &'a NotificationDoc,
    },
    /// The workspace was deleted.
    Removed {
        workspace: &'a str,
    },
    Pong {
        ts: i64,
    },
    Subscribed {
        workspaces: Vec<&'a str>,
    },
    Error {
        message: &'a str,
    },
}

/// Messages clients send on the WebSocket.
#[derive(Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    Ping,
    /// Admin only: `"*"` or a list of workspace ids.
    Subscribe {
        workspaces: SubscribeTarget,
    },
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum SubscribeTarget {
    All(String),
    Some(Vec<String>),
}

/// The prices in force (`GET /api/prices`).
#[derive(Serialize, ToSchema)]
pub struct PricesDoc {
    /// When the built-in prices were taken, and which file lies over them.
    pub taken: String,
    /// Every priced model, by the name a request's model resolves to: the
    /// exact name, else a dated snapshot's base name, else a fine-tuned
    /// model's base.
    pub models: BTreeMap<String, ModelPriceDoc>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelPriceDoc {
    /// What the model is for: `chat`, `responses`, `embedding`, ...
    pub mode: String,
    /// The standard tier's prices.
    pub standard: RatesDoc,
    /// Prices the table gives apart: `flex`, `priority`, and with
    /// `_long_prompt` those of prompts over 272,000 tokens.
    pub other: BTreeMap<String, RatesDoc>,
}

/// Prices in USD per million tokens.
#[derive(Serialize, ToSchema)]
pub struct RatesDoc {
    /// Prompt tokens not served from the prompt cache.
    pub input: f64,
    /// Prompt tokens served from the prompt cache.
    pub cached_input: f64,
    /// Completion tokens, reasoning tokens included.
    pub output: f64,
}

/// What `POST /api/prices/reload` read.
#[derive(Serialize, ToSchema)]
pub struct ReloadedDoc {
    pub models: usize,
    pub taken: String,
}

impl From<&PriceTable> for PricesDoc {
    fn from(table: &PriceTable) -> Self {
        let per_million = |pico: PicoUsd| pico as f64 / 1_000_000.0;
        let rates = |rates: Rates| RatesDoc {
            input: per_million(rates.input),
            cached_input: per_million(rates.cached_input),
            output: per_million(rates.output),
        };
        let models = table
            .models()
            .map(|(name, price)| {
                let other = price
                    .special()
                    .map(|((tier, long), special)| {
                        let suffix = if long { "_long_prompt" } else { "" };
                        (format!("{}{suffix}", tier.name()), rates(special))
                    })
                    .collect();
                let doc = ModelPriceDoc {
                    mode: price.mode.clone(),
                    standard: rates(price.standard()),
                    other,
                };
                (name.to_owned(), doc)
            })
            .collect();
        Self {
            taken: table.taken.clone(),
            models,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::window::Usage;

    #[test]
    fn every_limit_kind_has_its_own_field_by_name() {
        let mut limits = Limits::default();
        for kind in LimitKind::ALL {
            limits.set(kind, Some(kind.index() as u64 + 1));
        }
        let settings = serde_json::to_value(LimitSettingsDoc::from(limits)).expect("json");
        let facts: Vec<(LimitKind, LimitFacts)> = LimitKind::ALL
            .into_iter()
            .map(|kind| {
                let max = kind.index() as u64 + 1;
                (
                    kind,
                    LimitFacts {
                        max,
                        ..LimitFacts::default()
                    },
                )
            })
            .collect();
        let status = serde_json::to_value(LimitsDoc::of(&facts)).expect("json");
        let input: LimitsInput = serde_json::from_value(settings.clone()).expect("input");
        let input = input.to_per_limit().expect("valid");
        for kind in LimitKind::ALL {
            let expected = kind.index() as u64 + 1;
            // Each in its public unit: a count, or dollars for usd limits.
            let shown = serde_json::Value::Number(amount(kind.metric, expected));
            assert_eq!(settings[kind.name()], shown, "{kind}");
            assert_eq!(status[kind.name()]["limit"], shown, "{kind}");
            assert_eq!(input.get(kind), Change::Set(Some(expected)), "{kind}");
        }
        assert_eq!(
            settings.as_object().map(|o| o.len()),
            Some(LimitKind::COUNT)
        );
    }

    #[test]
    fn every_window_has_its_usage_field_by_name() {
        let mut usage = RecentUsage {
            last_minute: Usage::requests(100),
            ..RecentUsage::default()
        };
        for period in Period::ALL {
            usage.calendars[period.index()] = Usage::requests(period.index() as u64);
        }
        let doc = serde_json::to_value(UsageDoc::from(usage)).expect("json");
        for window in Window::ALL {
            let expected = window.period().map_or(100, |period| period.index());
            assert_eq!(doc[usage_name(window)]["requests"], expected, "{window:?}");
        }
        assert_eq!(doc.as_object().map(|o| o.len()), Some(Window::ALL.len()));
        assert_eq!(
            (usage_name(Window::Day), usage_name(Window::Month)),
            ("today", "this_month")
        );
    }
}

// ----- alerts ----------------------------------------------------------------------

/// A new alert channel.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct ChannelInput {
    /// 1 to 100 characters, for people.
    pub name: String,
    /// The workspace whose events the channel receives; absent or null
    /// for a global channel, which receives every workspace's events and
    /// the service-wide ones.
    pub workspace: Option<String>,
    /// `webhook` (signed per Standard Webhooks), `slack` (an incoming
    /// webhook, sent Block Kit messages) or `email` (through the SMTP
    /// server the settings name).
    #[serde(rename = "type")]
    pub kind: String,
    /// A webhook's or Slack's receiver: `http://` or `https://`, at most
    /// 2048 characters. Not for email.
    pub url: Option<String>,
    /// An email channel's recipients: 1 to 20 addresses, each once. Only
    /// for email.
    pub to: Option<Vec<String>>,
    /// A webhook's signing secret: `whsec_` and the base64 of 24 to 64
    /// random bytes. Generated when absent, and answered once. Write-only.
    pub secret: Option<String>,
    /// The notification kinds sent (such as `threshold_crossed`,
    /// `forecast_exhaustion`); absent or null for all.
    pub events: Option<Vec<String>>,
    /// `info` (default), `warning` or `critical`: less severe events are
    /// not sent.
    pub min_severity: Option<String>,
    /// Whether resolutions are sent too (default true).
    pub resolutions: Option<bool>,
    /// Default true.
    pub enabled: Option<bool>,
}

/// Changes to an alert channel; absent fields are kept.
#[derive(Deserialize, ToSchema, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ChannelPatch {
    pub name: Option<String>,
    /// A new receiver (webhook and Slack).
    pub url: Option<String>,
    /// New recipients (email), replacing the list.
    pub to: Option<Vec<String>>,
    /// A new signing secret (webhooks).
    pub secret: Option<String>,
    /// Null for all kinds.
    #[serde(default, deserialize_with = "change")]
    #[schema(value_type = Option<Vec<String>>)]
    pub events: Change<Option<Vec<String>>>,
    pub min_severity: Option<String>,
    pub resolutions: Option<bool>,
    pub enabled: Option<bool>,
}

/// An alert channel. Its secret is never shown (`secret_set` says whether
/// it has one), except once in the answer that created it.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct ChannelDoc {
    pub id: String,
    pub name: String,
    /// Null for a global channel.
    pub workspace: Option<String>,
    /// `webhook`, `slack` or `email`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The receiver of a webhook or Slack channel; null for email. A Slack
    /// URL is a credential (whoever has it may post): it is shown as its
    /// scheme and host only (`https://hooks.slack.com/…`), as a secret is
    /// never shown; PATCH replaces it.
    pub url: Option<String>,
    /// An email channel's recipients; null for the other kinds.
    pub to: Option<Vec<String>>,
    pub secret_set: bool,
    /// Null: every kind.
    pub events: Option<Vec<String>>,
    pub min_severity: String,
    pub resolutions: bool,
    pub enabled: bool,
    /// `api`, or `config` for a channel the TOML file declares (read-only
    /// here).
    pub source: String,
    pub created_at: String,
    pub updated_at: String,
}

/// A URL's scheme and host, the rest elided: what may be shown of a URL
/// that is a credential.
fn origin_only(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |at| at + 3);
    match url[after_scheme..].find('/') {
        Some(path) => format!("{}/…", &url[..after_scheme + path]),
        None => url.to_owned(),
    }
}

impl From<&crate::store::ChannelRecord> for ChannelDoc {
    fn from(channel: &crate::store::ChannelRecord) -> Self {
        Self {
            id: channel.id.clone(),
            name: channel.name.clone(),
            workspace: channel
                .workspace
                .as_ref()
                .map(|workspace| workspace.as_str().to_owned()),
            kind: channel.kind.name().to_owned(),
            url: channel.kind.has_url().then(|| match channel.kind {
                crate::domain::alert::ChannelKind::Slack => origin_only(&channel.url),
                _ => channel.url.clone(),
            }),
            to: (!channel.kind.has_url()).then(|| channel.recipients.clone()),
            secret_set: channel.secret.is_some(),
            events: channel.filter.events.clone(),
            min_severity: channel.filter.min_severity.name().to_owned(),
            resolutions: channel.filter.resolutions,
            enabled: channel.enabled,
            source: channel.source.name().to_owned(),
            created_at: rfc3339(channel.created_at),
            updated_at: rfc3339(channel.updated_at),
        }
    }
}

/// A channel just created.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct ChannelCreatedDoc {
    #[serde(flatten)]
    pub channel: ChannelDoc,
    /// The signing secret generated for a webhook created without one:
    /// shown here only, keep it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct ChannelListDoc {
    pub channels: Vec<ChannelDoc>,
}

/// One attempt to deliver an alert.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct AttemptDoc {
    /// 1 for the first.
    pub number: u32,
    pub attempted_at: String,
    /// `delivered`, `retry` (another attempt is due at `next_attempt_at`)
    /// or `gave_up`.
    pub outcome: String,
    /// The receiver's HTTP status, when it answered.
    pub http_status: Option<u16>,
    /// What went wrong (at most 500 characters).
    pub error: Option<String>,
    pub duration_ms: u64,
    pub next_attempt_at: Option<String>,
    /// The digest message the attempt sent the event in, if it went in one.
    pub digest_id: Option<String>,
}

impl From<&crate::store::AttemptRecord> for AttemptDoc {
    fn from(attempt: &crate::store::AttemptRecord) -> Self {
        Self {
            number: attempt.number,
            attempted_at: rfc3339(attempt.attempted_at),
            outcome: attempt.outcome.to_owned(),
            http_status: attempt.http_status,
            error: attempt.error.clone(),
            duration_ms: attempt.duration_ms,
            next_attempt_at: attempt.next_attempt_at.map(rfc3339),
            digest_id: attempt.digest_id.clone(),
        }
    }
}

/// One event for one channel, with its attempts.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct DeliveryDoc {
    /// The `webhook-id` a receiver sees, the same on every attempt.
    pub id: String,
    pub event_id: String,
    pub notification_id: String,
    /// The notification kind (`test` for a test send).
    pub event: String,
    /// `raised` or `resolved`.
    pub phase: String,
    pub channel: String,
    pub workspace: Option<String>,
    /// `pending`, `delivered` or `gave_up`.
    pub status: String,
    /// When a pending delivery is tried next.
    pub next_attempt_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Every attempt, first first.
    pub attempts: Vec<AttemptDoc>,
}

impl From<&crate::store::DeliveryView> for DeliveryDoc {
    fn from(view: &crate::store::DeliveryView) -> Self {
        let delivery = &view.delivery;
        Self {
            id: delivery.id.clone(),
            event_id: delivery.event_id.clone(),
            notification_id: view.notification_id.clone(),
            event: view.kind.clone(),
            phase: view.phase.name().to_owned(),
            channel: delivery.channel_id.clone(),
            workspace: delivery
                .workspace
                .as_ref()
                .map(|workspace| workspace.as_str().to_owned()),
            status: delivery.status.name().to_owned(),
            next_attempt_at: (delivery.status == crate::store::DeliveryStatus::Pending)
                .then(|| rfc3339(delivery.next_attempt_at)),
            created_at: rfc3339(delivery.created_at),
            updated_at: rfc3339(delivery.updated_at),
            attempts: view.attempts.iter().map(AttemptDoc::from).collect(),
        }
    }
}

#[derive(Serialize, ToSchema, Debug)]
pub struct DeliveryListDoc {
    pub deliveries: Vec<DeliveryDoc>,
}

/// A test send.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct TestInput {
    /// The channel's id.
    pub channel: String,
}

/// What the test send's attempt came to.
#[derive(Serialize, ToSchema, Debug)]
pub struct TestDoc {
    /// Listed by `GET /api/alerts/deliveries`.
    pub delivery_id: String,
    pub attempt: AttemptDoc,
}
