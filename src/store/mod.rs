//! Durable state: workspaces, key hashes, each workspace's live state,
//! notifications and usage rollups, and alert delivery's channels, outbox
//! and log (`alerts.rs`), in SQLite (the embedded default) or PostgreSQL.
//!
//! Both backends sit behind this one type. Every query is written once, in
//! the SQL the two databases share (`$1` parameters, `ON CONFLICT` upserts,
//! `CAST` around aggregates), and the [`on_pool!`] macro runs it on whichever
//! pool was chosen at start-up. The conformance tests in `tests/it/store.rs`
//! run the same checks against both.
//!
//! Architecture invariant: nothing here is called on the request path except
//! through the batched flush; handlers that change the catalog (admin
//! operations) write through directly because they are rare.

mod salvage;
mod saved;

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::domain::limits::{LimitKind, PerLimit, WorkspaceConfig, WorkspaceId, parse_timezone};
use crate::domain::notification::{Crossing, Notification, NotificationKind, Severity, TenantText};
use crate::domain::scope::{RuleInput, ScopeKind, ScopedLimits, Selector};
use crate::domain::spend::ModelSpend;
use crate::domain::status::Cause;
use crate::domain::threshold::{AlertThresholds, Percents, ThresholdsInput};
use crate::domain::time::Timestamp;
use crate::domain::workspace::Saved;
use crate::keys::{KeyGrant, KeyHash, Scopes};

pub use salvage::{Refused, Row, Salvage};
pub use saved::{from_json as saved_from_json, to_json as saved_to_json};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Conflict(String),
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    #[error("{0}")]
    FileGone(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the concrete pool, so that one query
/// text serves both databases.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` (which evaluates to the number of rows it changed) in a
/// transaction bound to `$tx`. When rows changed, the catalog generation is
/// bumped in the same transaction, so other instances and a running server
/// notice; evaluates to `Ok(Some(new generation))`, or `Ok(None)` when
/// nothing changed.
macro_rules! change_catalog {
    ($store:expr, |$tx:ident| $body:expr) => {
        on_pool!($store, |pool| async {
            let mut $tx = pool.begin().await?;
            let changed: u64 = $body;
            if changed == 0 {
                return Ok::<Option<i64>, sqlx::Error>(None);
            }
            let (generation,) = sqlx::query_as::<_, (i64,)>(
                "UPDATE catalog SET generation = generation + 1 WHERE id = 1 RETURNING generation",
            )
            .fetch_one(&mut *$tx)
            .await?;
            $tx.commit().await?;
            Ok(Some(generation))
        }
        .await)
    };
}

/// `column = stored + new` for a rollup upsert, stopping at the largest
/// BIGINT: a count stuck at its maximum is wrong, but an overflow would fail
/// the write, and with it every later flush. Counts are never negative (the
/// schema checks), so the subtraction cannot overflow.
macro_rules! saturating_add {
    ($column:literal) => {
        concat!(
            $column,
            " = CASE WHEN excluded.",
            $column,
            " > 9223372036854775807 - rollups.",
            $column,
            " THEN 9223372036854775807 ELSE rollups.",
            $column,
            " + excluded.",
            $column,
            " END"
        )
    };
}

mod alerts;

pub use alerts::{
    AttemptRecord, ChannelRecord, ChannelSource, DeliveryQuery, DeliveryRecord, DeliveryStatus,
    DeliveryView, EventRecord, MAX_ATTEMPT_ERROR,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// An API key as stored: never the key itself.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub grant: KeyGrant,
    pub hash: KeyHash,
    pub prefix: String,
    pub name: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    /// To the minute: uses are written by the flush, at most once a minute.
    pub last_used_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

/// The columns of `api_keys`, in the order [`key_from_row`] reads them.
macro_rules! key_columns {
    () => {
        "id, workspace_id, key_hash, prefix, name, scopes, service_workspaces, created_at, expires_at, last_used_at, revoked_at"
    };
}

type KeyRow = (
    String,
    Option<String>,
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// Everything needed to authenticate and to know the workspaces.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub generation: i64,
    pub workspaces: Vec<WorkspaceConfig>,
    pub keys: Vec<KeyRecord>,
}

/// Counts of finished requests in one minute, added to the stored rollups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RollupDelta {
    pub requests: i64,
    pub tokens: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub reasoning_tokens: i64,
    /// Every call that did not succeed upstream.
    pub errors: i64,
    /// Calls the upstream answered with a 4xx.
    pub client_errors: i64,
    /// Calls the upstream answered with a 5xx, or never answered.
    pub server_errors: i64,
    pub refused: i64,
    pub latency_ms_sum: i64,
    /// What the calls cost, as budgets count it: whole nano-dollars.
    pub usd_nano: i64,
}

impl std::ops::AddAssign for RollupDelta {
    /// Saturating: a count stuck at its maximum is wrong, but an overflow
    /// would be wrong and also fail every later write of the row.
    fn add_assign(&mut self, o: Self) {
        self.requests = self.requests.saturating_add(o.requests);
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(o.cached_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(o.reasoning_tokens);
        self.errors = self.errors.saturating_add(o.errors);
        self.client_errors = self.client_errors.saturating_add(o.client_errors);
        self.server_errors = self.server_errors.saturating_add(o.server_errors);
        self.refused = self.refused.saturating_add(o.refused);
        self.latency_ms_sum = self.latency_ms_sum.saturating_add(o.latency_ms_sum);
        self.usd_nano = self.usd_nano.saturating_add(o.usd_nano);
    }
}

impl RollupDelta {
    /// What the calls used and cost, as spend by model counts it.
    pub fn spend(&self) -> ModelSpend {
        let unsigned = |count: i64| u64::try_from(count).unwrap_or(0);
        ModelSpend {
            prompt: unsigned(self.prompt_tokens),
            cached: unsigned(self.cached_tokens),
            completion: unsigned(self.completion_tokens),
            usd: unsigned(self.usd_nano),
        }
    }
}

/// Where a rollup delta belongs: the workspace, the start of its minute, the
/// start of the workspace's local day containing that minute, and the model.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RollupKey {
    pub workspace: WorkspaceId,
    pub minute: i64,
    pub day: i64,
    pub model: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    Minute,
    Hour,
    Day,
}

impl Resolution {
    fn code(self) -> &'static str {
        match self {
            Resolution::Minute => "m",
            Resolution::Hour => "h",
            Resolution::Day => "d",
        }
    }

    /// How long rollups of this resolution are kept.
    pub fn retention(self) -> Duration {
        const DAY: u64 = 86_400;
        Duration::from_secs(match self {
            Resolution::Minute => 2 * DAY,
            Resolution::Hour => 35 * DAY,
            Resolution::Day => 400 * DAY,
        })
    }
}

/// One bucket of history, summed over models.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryRow {
    pub bucket: i64,
    pub totals: RollupDelta,
}

/// Writes gathered by one flush, applied in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub states: HashMap<WorkspaceId, String>,
    pub notifications: HashMap<String, Notification>,
    pub rollups: HashMap<RollupKey, RollupDelta>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.states.is_empty() && self.notifications.is_empty() && self.rollups.is_empty()
    }

    pub fn len(&self) -> usize {
        self.states.len() + self.notifications.len() + self.rollups.len()
    }

    /// Folds a newer batch into this one: newer states and notification
    /// versions replace older ones, rollup deltas add up.
    pub fn absorb(&mut self, newer: Batch) {
        self.states.extend(newer.states);
        self.notifications.extend(newer.notifications);
        for (key, delta) in newer.rollups {
            *self.rollups.entry(key).or_default() += delta;
        }
    }
}

/// A row of `workspaces` as read: the columns that make a
/// [`WorkspaceConfig`], with a column per limit kind named after it.
struct WorkspaceRow {
    id: String,
    name: String,
    timezone: String,
    limits: [Option<i64>; LimitKind::COUNT],
    warn_at: f64,
    upstream_key_env: Option<String>,
    upstream_organization: Option<String>,
    upstream_project: Option<String>,
    scoped_limits: Option<String>,
    alert_thresholds: Option<String>,
}

impl<'r, R> sqlx::FromRow<'r, R> for WorkspaceRow
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> std::result::Result<Self, sqlx::Error> {
        let mut limits = [None; LimitKind::COUNT];
        for kind in LimitKind::ALL {
            limits[kind.index()] = row.try_get(kind.name())?;
        }
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            timezone: row.try_get("timezone")?,
            limits,
            warn_at: row.try_get("warn_at")?,
            upstream_key_env: row.try_get("upstream_key_env")?,
            upstream_organization: row.try_get("upstream_organization")?,
            upstream_project: row.try_get("upstream_project")?,
            scoped_limits: row.try_get("scoped_limits")?,
            alert_thresholds: row.try_get("alert_thresholds")?,
        })
    }
}

/// The queries that read and write a workspace's settings. They name a
/// column per limit kind, so they are written once at start-up from
/// [`LimitKind::ALL`]: a new kind needs its columns (a migration) and
/// nothing here.
struct WorkspaceQueries {
    select_all: String,
    select_one: String,
    insert: String,
    update: String,
}

static WORKSPACE_QUERIES: std::sync::LazyLock<WorkspaceQueries> = std::sync::LazyLock::new(|| {
    // In the order `bind_workspace!` binds them, as $1, $2, ...
    let columns: Vec<&str> = ["id", "name", "timezone"]
        .into_iter()
        .chain(LimitKind::ALL.iter().map(|kind| kind.name()))
        .chain([
            "warn_at",
            "upstream_key_env",
            "upstream_organization",
            "upstream_project",
            "scoped_limits",
            "alert_thresholds",
        ])
        .collect();
    let now = columns.len() + 1;
    let placeholders: Vec<String> = (1..=columns.len()).map(|n| format!("${n}")).collect();
    let assignments: Vec<String> = columns
        .iter()
        .enumerate()
        .skip(1)
        .map(|(index, column)| format!("{column} = ${}", index + 1))
        .collect();
    WorkspaceQueries {
        select_all: format!("SELECT {} FROM workspaces ORDER BY id", columns.join(", ")),
        select_one: format!(
            "SELECT {} FROM workspaces WHERE id = $1",
            columns.join(", ")
        ),
        insert: format!(
            "INSERT INTO workspaces ({}, created_at, updated_at) VALUES ({}, ${now}, ${now})",
            columns.join(", "),
            placeholders.join(", ")
        ),
        update: format!(
            "UPDATE workspaces SET {}, updated_at = ${now} WHERE id = $1",
            assignments.join(", ")
        ),
    }
});

/// Binds a workspace's columns, in the order of [`WORKSPACE_QUERIES`], then
/// `now`.
macro_rules! bind_workspace {
    ($query:expr, $ws:expr, $now:expr) => {{
        let ws: &WorkspaceConfig = $ws;
        let mut query = $query
            .bind(ws.id.as_str())
            .bind(&ws.name)
            .bind(ws.timezone.name());
        for (_, max) in ws.limits.iter() {
            query = query.bind(limit_value(max));
        }
        query
            .bind(ws.warn_at)
            .bind(ws.upstream_key_env.as_deref())
            .bind(ws.upstream_organization.as_deref())
            .bind(ws.upstream_project.as_deref())
            .bind(scoped_limits_json(&ws.scoped_limits))
            .bind(thresholds_json(&ws.alert_thresholds))
            .bind($now.millis())
    }};
}

type NotificationRow = (
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// The columns of `notifications`, as a literal so that queries stay
/// `&'static str` (sqlx refuses SQL assembled at run time).
macro_rules! notification_columns {
    () => {
        "id, workspace_id, cause, severity, kind, title, message, suggested_actions, limit_name, created_at, resolves_at, resolved_at, tenant, threshold"
    };
}

fn limit_value(value: Option<u64>) -> Option<i64> {
    value.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// A workspace's scoped limits as stored: a list of rules in the shape the
/// API takes (`{"models": [...] | "each", "limits": {...}}`, keyed by
/// `ScopeKind::field`), with maxima in the units their counters count.
/// `None` when there are none.
fn scoped_limits_json(scoped: &ScopedLimits) -> Option<String> {
    if scoped.is_empty() {
        return None;
    }
    let rules: Vec<serde_json::Value> = scoped
        .rules()
        .iter()
        .map(|rule| {
            let selected = match &rule.selector {
                Selector::Each => serde_json::Value::from("each"),
                Selector::Listed(patterns) => patterns.iter().map(ToString::to_string).collect(),
            };
            let limits: serde_json::Map<String, serde_json::Value> = rule
                .limits
                .configured()
                .map(|(kind, max)| (kind.name().to_owned(), max.into()))
                .collect();
            serde_json::json!({ rule.kind.field(): selected, "limits": limits })
        })
        .collect();
    Some(serde_json::Value::from(rules).to_string())
}

/// Reads what [`scoped_limits_json`] wrote, validated again; a document
/// that does not read as valid rules is logged and loads as none, so that
/// one bad row cannot stop the workspace.
fn scoped_limits_from_json(workspace: &str, json: &str) -> ScopedLimits {
    let read = || -> Option<Vec<RuleInput>> {
        let rules: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_str(json).ok()?;
        rules
            .iter()
            .map(|rule| {
                let kind = ScopeKind::ALL
                    .into_iter()
                    .find(|kind| rule.contains_key(kind.field()))?;
                let listed = match &rule[kind.field()] {
                    serde_json::Value::String(each) if each == "each" => None,
                    other => Some(serde_json::from_value(other.clone()).ok()?),
                };
                let mut limits = crate::domain::limits::Limits::default();
                for (name, max) in rule.get("limits")?.as_object()? {
                    limits.set(LimitKind::from_name(name)?, Some(max.as_u64()?));
                }
                Some(RuleInput {
                    kind: Some(kind),
                    listed,
                    limits,
                })
            })
            .collect()
    };
    valid_or_default(
        workspace,
        "scoped limits",
        read().map(|rules| ScopedLimits::validate(&rules)),
    )
}

/// A stored setting read and validated again (`None` when it does not
/// read at all): one that is not valid is logged and loads as the default,
/// so that one bad row cannot stop the workspace.
fn valid_or_default<T: Default>(
    workspace: &str,
    what: &str,
    read: Option<std::result::Result<T, crate::domain::limits::ValidationError>>,
) -> T {
    match read {
        Some(Ok(valid)) => valid,
        other => {
            tracing::error!(
                workspace,
                error = ?other.map(|result| result.err()),
                "stored {what} do not read as valid; loading the workspace with the defaults"
            );
            T::default()
        }
    }
}

/// A workspace's alert thresholds as stored: the shape the API takes
/// (`{"default": [...], "limits": {"tokens_per_day": [...]}}`), `None` for
/// the defaults.
fn thresholds_json(thresholds: &AlertThresholds) -> Option<String> {
    if thresholds.is_default() {
        return None;
    }
    let listed = |percents: Percents| percents.iter().collect::<Vec<u8>>();
    let limits: serde_json::Map<String, serde_json::Value> = thresholds
        .per_limit
        .iter()
        .filter_map(|(kind, percents)| Some((kind.name().to_owned(), listed(percents?).into())))
        .collect();
    Some(serde_json::json!({ "default": listed(thresholds.default), "limits": limits }).to_string())
}

/// Reads what [`thresholds_json`] wrote, validated again; a document that
/// does not read as valid thresholds is logged and loads as the defaults,
/// so that one bad row cannot stop the workspace.
fn thresholds_from_json(workspace: &str, json: &str) -> AlertThresholds {
    let read = || -> Option<ThresholdsInput> {
        let value: serde_json::Value = serde_json::from_str(json).ok()?;
        let listed = |value: &serde_json::Value| -> Option<Vec<f64>> {
            value
                .as_array()?
                .iter()
                .map(serde_json::Value::as_f64)
                .collect()
        };
        Some(ThresholdsInput {
            default: Some(listed(&value["default"])?),
            limits: value["limits"]
                .as_object()?
                .iter()
                .map(|(name, percents)| Some((name.clone(), Some(listed(percents)?))))
                .collect::<Option<_>>()?,
        })
    };
    valid_or_default(
        workspace,
        "alert thresholds",
        read().map(|input| AlertThresholds::validate(&input)),
    )
}

/// A threshold crossing as stored beside its notification: a JSON object.
fn crossing_json(crossing: &Crossing) -> String {
    serde_json::json!({
        "percent": crossing.percent,
        "used": crossing.used,
        "max": crossing.max,
        "period_start": crossing.period_start.millis(),
        "period_end": crossing.period_end.millis(),
    })
    .to_string()
}

fn crossing_from_json(json: &str) -> Option<Crossing> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(Crossing {
        percent: u8::try_from(value["percent"].as_u64()?).ok()?,
        used: value["used"].as_u64()?,
        max: value["max"].as_u64()?,
        period_start: Timestamp::from_millis(value["period_start"].as_i64()?),
        period_end: Timestamp::from_millis(value["period_end"].as_i64()?),
    })
}

fn workspace_from_row(row: WorkspaceRow) -> Option<WorkspaceConfig> {
    Some(WorkspaceConfig {
        id: row.id.parse().ok()?,
        name: row.name,
        timezone: parse_timezone(&row.timezone).ok()?,
        limits: PerLimit(
            row.limits
                .map(|max| max.and_then(|max| u64::try_from(max).ok())),
        ),
        warn_at: row.warn_at,
        upstream_key_env: row.upstream_key_env,
        upstream_organization: row.upstream_organization,
        upstream_project: row.upstream_project,
        scoped_limits: row
            .scoped_limits
            .as_deref()
            .map_or_else(Default::default, |json| {
                scoped_limits_from_json(&row.id, json)
            }),
        alert_thresholds: row
            .alert_thresholds
            .as_deref()
            .map_or_else(Default::default, |json| thresholds_from_json(&row.id, json)),
    })
}

fn notification_from_row(row: NotificationRow) -> Option<Notification> {
    let (
        id,
        workspace,
        cause,
        severity,
        kind,
        title,
        message,
        actions,
        limit,
        created_at,
        resolves_at,
        resolved_at,
        tenant,
        threshold,
    ) = row;
    Some(Notification {
        id,
        workspace: workspace.and_then(|w| w.parse().ok()),
        cause: cause.as_deref().and_then(Cause::from_key),
        severity: Severity::from_name(&severity)?,
        kind: NotificationKind::from_name(&kind)?,
        title,
        message,
        suggested_actions: serde_json::from_str(&actions).unwrap_or_default(),
        tenant: tenant.as_deref().map(tenant_from_json).unwrap_or_default(),
        limit: limit.as_deref().and_then(LimitKind::from_name),
        crossing: threshold.as_deref().and_then(crossing_from_json),
        created_at: Timestamp::from_millis(created_at),
        resolves_at: resolves_at.map(Timestamp::from_millis),
        resolved_at: resolved_at.map(Timestamp::from_millis),
    })
}

/// The tenant's text of a notification as stored: a JSON object.
fn tenant_to_json(tenant: &TenantText) -> String {
    serde_json::json!({
        "title": storable(&tenant.title),
        "message": storable(&tenant.message),
        "suggested_actions": tenant.suggested_actions,
    })
    .to_string()
}

fn tenant_from_json(json: &str) -> TenantText {
    let value: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let text = |field: &str| value[field].as_str().unwrap_or_default().to_owned();
    TenantText {
        title: text("title"),
        message: text("message"),
        suggested_actions: value["suggested_actions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|action| action.as_str().map(str::to_owned))
            .collect(),
    }
}

/// Text as both databases can store it: PostgreSQL's text cannot hold a NUL
/// character, which a message quoted from a client or the upstream may
/// carry, so it becomes U+FFFD (on SQLite too, so that both read the same).
fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// The SQLite file, to notice when it is removed or replaced.
    file: Option<SqliteFile>,
}

#[derive(Clone, Debug)]
struct SqliteFile {
    path: std::path::PathBuf,
    identity: (u64, u64),
}

/// The file behind a `sqlite:` URL and its current identity.
fn sqlite_file(url: &str) -> Option<SqliteFile> {
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let path = options.get_filename().to_owned();
    let identity = file_identity(&path)?;
    Some(SqliteFile { path, identity })
}

/// Device and inode: what tells one file from another at the same path.
#[cfg(unix)]
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.dev(), metadata.ino()))
}

#[cfg(not(unix))]
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|_| (0, 0))
}

const GENERATION_QUERY: &str = "SELECT generation FROM catalog WHERE id = 1";

/// Reads the catalog generation over one connection kept from the pool, as
/// the catalog follower does four times a second: a connection taken from
/// the pool for each read costs two more round trips (the pool pings it on
/// its way back) and a task. The connection is taken at the first read, and
/// again after a read failed, when the failed one goes back to the pool,
/// which tests it.
pub struct GenerationWatch {
    store: Store,
    held: Option<HeldConnection>,
}

enum HeldConnection {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

impl GenerationWatch {
    /// The catalog generation, as [`Store::catalog_generation`] reads it.
    pub async fn read(&mut self) -> Result<i64> {
        let held = match &mut self.held {
            Some(held) => held,
            None => self.held.insert(match &self.store.pool {
                Pool::Sqlite(pool) => HeldConnection::Sqlite(pool.acquire().await?),
                Pool::Postgres(pool) => HeldConnection::Postgres(pool.acquire().await?),
            }),
        };
        let read: sqlx::Result<(i64,)> = match held {
            HeldConnection::Sqlite(connection) => {
                sqlx::query_as(GENERATION_QUERY)
                    .fetch_one(&mut **connection)
                    .await
            }
            HeldConnection::Postgres(connection) => {
                sqlx::query_as(GENERATION_QUERY)
                    .fetch_one(&mut **connection)
                    .await
            }
        };
        if read.is_err() {
            self.held = None;
        }
        Ok(read?.0)
    }
}

impl Store {
    /// Opens (and for SQLite creates) the database at `url` and applies the
    /// embedded migrations.
    pub async fn open(url: &str) -> Result<Self> {
        let pool = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // In WAL mode, NORMAL loses nothing on a process crash; only
                // an operating-system crash can drop the last transactions.
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_millis(500))
                .foreign_keys(true);
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    // Four, and the one the catalog follower keeps.
                    .max_connections(5)
                    .acquire_timeout(Duration::from_secs(5))
                    // A connection to a file cannot go stale as one to a
                    // server can: a ping before each use would only double
                    // the round trips to its thread.
                    .test_before_acquire(false)
                    .connect_with(options)
                    .await?,
            )
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Pool::Postgres(
                PgPoolOptions::new()
                    // Eight, and the one the catalog follower keeps.
                    .max_connections(9)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(url)
                    .await?,
            )
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        let file = sqlite_file(url);
        let store = Self { pool, file };
        on_pool!(store, |pool| MIGRATOR.run(pool).await)?;
        Ok(store)
    }

    /// Fails when the SQLite file was removed or replaced since it was
    /// opened: writes would then go to a file nobody will ever read again.
    fn check_file(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        match file_identity(&file.path) {
            Some(identity) if identity == file.identity => Ok(()),
            Some(_) => Err(StoreError::FileGone(format!(
                "the database file {} was replaced after quotawatch opened it; restart quotawatch to use the new file",
                file.path.display()
            ))),
            None => Err(StoreError::FileGone(format!(
                "the database file {} was removed; restore it (or restart quotawatch to start afresh)",
                file.path.display()
            ))),
        }
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await);
    }

    /// Succeeds when the database answers a query.
    /// Succeeds when the database accepts a write: a database that answers
    /// reads but not writes (disk full, locked, read-only) is not ready.
    pub async fn probe(&self, now: Timestamp) -> Result<()> {
        self.check_file()?;
        on_pool!(self, |pool| {
            sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('ready_probe', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        .bind(now.millis().to_string())
        .execute(pool)
        .await
        .map(|_| ())
        })?;
        Ok(())
    }

    pub async fn catalog_generation(&self) -> Result<i64> {
        let (generation,): (i64,) = on_pool!(self, |pool| sqlx::query_as(GENERATION_QUERY)
            .fetch_one(pool)
            .await)?;
        Ok(generation)
    }

    /// A reader of the catalog generation over a connection of its own,
    /// for whoever reads it again and again (see [`GenerationWatch`]).
    pub fn generation_watch(&self) -> GenerationWatch {
        GenerationWatch {
            store: self.clone(),
            held: None,
        }
    }

    /// Workspaces and active keys, with the generation they reflect. The
    /// generation is read before and after; if a writer slipped in between,
    /// the read is repeated, so the result is always one consistent state.
    pub async fn load_catalog(&self) -> Result<Catalog> {
        loop {
            let before = self.catalog_generation().await?;
            let catalog = self.read_catalog(before).await?;
            if self.catalog_generation().await? == before {
                return Ok(catalog);
            }
        }
    }

    async fn read_catalog(&self, generation: i64) -> Result<Catalog> {
        let workspace_rows: Vec<WorkspaceRow> = on_pool!(self, |pool| {
            sqlx::query_as(WORKSPACE_QUERIES.select_all.as_str())
                .fetch_all(pool)
                .await
        })?;
        let key_rows: Vec<KeyRow> = on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE revoked_at IS NULL"
            ))
            .fetch_all(pool)
            .await
        })?;
        Ok(Catalog {
            generation,
            workspaces: workspace_rows
                .into_iter()
                .filter_map(workspace_from_row)
                .collect(),
            keys: key_rows.into_iter().filter_map(key_from_row).collect(),
        })
    }

    pub async fn workspace(&self, id: &WorkspaceId) -> Result<Option<WorkspaceConfig>> {
        let row: Option<WorkspaceRow> = on_pool!(self, |pool| {
            sqlx::query_as(WORKSPACE_QUERIES.select_one.as_str())
                .bind(id.as_str())
                .fetch_optional(pool)
                .await
        })?;
        Ok(row.and_then(workspace_from_row))
    }

    /// Creates a workspace; fails with [`StoreError::Conflict`] if the id is
    /// taken. Returns the new catalog generation.
    pub async fn insert_workspace(&self, ws: &WorkspaceConfig, now: Timestamp) -> Result<i64> {
        let inserted = change_catalog!(self, |tx| {
            let insert = sqlx::query(WORKSPACE_QUERIES.insert.as_str());
            bind_workspace!(insert, ws, now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
        });
        match inserted {
            Ok(generation) => Ok(generation.unwrap_or_default()),
            Err(error) if is_unique_violation(&error) => Err(StoreError::Conflict(format!(
                "workspace {} already exists",
                ws.id
            ))),
            Err(error) => Err(error.into()),
        }
    }

    /// Replaces a workspace's settings; `None` if it does not exist.
    pub async fn update_workspace(
        &self,
        ws: &WorkspaceConfig,
        now: Timestamp,
    ) -> Result<Option<i64>> {
        Ok(change_catalog!(self, |tx| {
            let update = sqlx::query(WORKSPACE_QUERIES.update.as_str());
            bind_workspace!(update, ws, now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
        })?)
    }

    /// Deletes a workspace with its keys, state, notifications and history;
    /// `None` if it did not exist.
    pub async fn delete_workspace(&self, id: &WorkspaceId) -> Result<Option<i64>> {
        Ok(change_catalog!(self, |tx| {
            let deleted = sqlx::query("DELETE FROM workspaces WHERE id = $1")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            for statement in [
                "DELETE FROM api_keys WHERE workspace_id = $1",
                "DELETE FROM workspace_state WHERE workspace_id = $1",
                "DELETE FROM notifications WHERE workspace_id = $1",
                "DELETE FROM rollups WHERE workspace_id = $1",
                "DELETE FROM alert_attempts WHERE delivery_id IN (SELECT id FROM alert_deliveries WHERE channel_id IN (SELECT id FROM alert_channels WHERE workspace_id = $1))",
                "DELETE FROM alert_deliveries WHERE channel_id IN (SELECT id FROM alert_channels WHERE workspace_id = $1)",
                "DELETE FROM alert_channels WHERE workspace_id = $1",
            ] {
                sqlx::query(statement)
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            deleted
        })?)
    }

    pub async fn insert_key(&self, key: &KeyRecord) -> Result<i64> {
        let (workspace, scopes, service_workspaces) = match &key.grant {
            KeyGrant::Workspace { workspace, scopes } => {
                (Some(workspace.as_str()), scopes.to_list(), None)
            }
            KeyGrant::Service { workspaces } => (
                None,
                SERVICE_SCOPE.to_owned(),
                workspaces.as_ref().map(|list| {
                    list.iter()
                        .map(WorkspaceId::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                }),
            ),
        };
        let generation = change_catalog!(self, |tx| {
            sqlx::query(concat!(
                "INSERT INTO api_keys (",
                key_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL)"
            ))
            .bind(&key.id)
            .bind(workspace)
            .bind(key.hash.to_hex())
            .bind(&key.prefix)
            .bind(&key.name)
            .bind(&scopes)
            .bind(&service_workspaces)
            .bind(key.created_at.millis())
            .bind(key.expires_at.map(Timestamp::millis))
            .execute(&mut *tx)
            .await?
            .rows_affected()
        })?;
        Ok(generation.unwrap_or_default())
    }

    /// Revokes a key; `None` if there is no such active key.
    pub async fn revoke_key(&self, key_id: &str, now: Timestamp) -> Result<Option<i64>> {
        Ok(change_catalog!(self, |tx| {
            sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(key_id)
                .bind(now.millis())
                .execute(&mut *tx)
                .await?
                .rows_affected()
        })?)
    }

    /// The active key with this hash, if there is one: how an instance finds
    /// a key that another instance created since its last catalog reload.
    pub async fn active_key(&self, hash: &KeyHash) -> Result<Option<KeyRecord>> {
        self.find_key(KeyColumn::Hash, &hash.to_hex()).await
    }

    /// The active key with this id, if there is one: how an instance checks
    /// the minter of a browser token made through another instance.
    pub async fn active_key_by_id(&self, id: &str) -> Result<Option<KeyRecord>> {
        self.find_key(KeyColumn::Id, id).await
    }

    async fn find_key(&self, column: KeyColumn, value: &str) -> Result<Option<KeyRecord>> {
        let query = match column {
            KeyColumn::Hash => concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"
            ),
            KeyColumn::Id => concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE id = $1 AND revoked_at IS NULL"
            ),
        };
        let row: Option<KeyRow> = on_pool!(self, |pool| {
            sqlx::query_as(query).bind(value).fetch_optional(pool).await
        })?;
        Ok(row.and_then(key_from_row))
    }

    /// All keys of a workspace, or (with `None`) all service keys, revoked
    /// ones included, newest first.
    pub async fn list_keys(&self, workspace: Option<&WorkspaceId>) -> Result<Vec<KeyRecord>> {
        let rows: Vec<KeyRow> = on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE workspace_id = $1 OR ($1 IS NULL AND workspace_id IS NULL)",
                " ORDER BY created_at DESC, id"
            ))
            .bind(workspace.map(WorkspaceId::as_str))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().filter_map(key_from_row).collect())
    }

    /// Records when keys were last used; a time never moves back, whichever
    /// instance writes last. Not a catalog change: nothing reloads for it.
    pub async fn touch_keys(&self, uses: &[(String, Timestamp)]) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        on_pool!(self, |pool| {
            async {
            let mut tx = pool.begin().await?;
            for (id, at) in uses {
                sqlx::query(
                    "UPDATE api_keys SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)",
                )
                .bind(id)
                .bind(at.millis())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }
        .await
        })?;
        Ok(())
    }

    pub async fn meta(&self, key: &str) -> Result<Option<String>> {
        let row: Option<(String,)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT value FROM meta WHERE key = $1"
        )
        .bind(key)
        .fetch_optional(pool)
        .await)?;
        Ok(row.map(|(value,)| value))
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        .bind(key)
        .bind(value)
        .execute(pool)
        .await
        .map(|_| ())
        })?;
        Ok(())
    }

    /// The value of `key`, which is set to `value` first if it has none: every
    /// instance that calls this at once gets the same value.
    pub async fn meta_or_insert(&self, key: &str, value: &str) -> Result<String> {
        on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(value)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        Ok(self.meta(key).await?.unwrap_or_else(|| value.to_owned()))
    }

    /// The saved live state of every workspace that has one.
    pub async fn load_states(&self) -> Result<HashMap<WorkspaceId, Saved>> {
        let rows: Vec<(String, String)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT workspace_id, state FROM workspace_state"
        )
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, state)| Some((id.parse().ok()?, saved_from_json(&state)?)))
            .collect())
    }

    /// Notifications, newest first. `workspace` narrows to one workspace (and
    /// the service-wide ones); `include_resolved` adds history.
    pub async fn notifications(
        &self,
        workspace: Option<&WorkspaceId>,
        include_resolved: bool,
        limit: i64,
    ) -> Result<Vec<Notification>> {
        let rows: Vec<NotificationRow> = on_pool!(self, |pool| {
            sqlx::query_as(concat!(
            "SELECT ",
            notification_columns!(),
            " FROM notifications WHERE ($1 IS NULL OR workspace_id = $1 OR workspace_id IS NULL) AND ($2 = 1 OR resolved_at IS NULL) ORDER BY created_at DESC, id LIMIT $3"
        ))
            .bind(workspace.map(WorkspaceId::as_str))
            .bind(i64::from(include_resolved))
            .bind(limit)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().filter_map(notification_from_row).collect())
    }

    /// Applies a flush in one transaction: all of it lands, or none. Each
    /// notification's alert events are enqueued in the same transaction
    /// (see `alerts::ENQUEUE_EVENT`).
    pub async fn write_batch(&self, batch: &Batch, now: Timestamp) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.check_file()?;
        on_pool!(self, |pool| {
            async {
            let mut tx = pool.begin().await?;
            for (workspace, state) in &batch.states {
                sqlx::query(
                    // Rows of a workspace deleted meanwhile are dropped, so
                    // that a re-created workspace does not inherit them.
                    "INSERT INTO workspace_state (workspace_id, state, updated_at) SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM workspaces WHERE id = $1) ON CONFLICT (workspace_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                )
                .bind(workspace.as_str())
                .bind(state)
                .bind(now.millis())
                .execute(&mut *tx)
                .await?;
            }
            for n in batch.notifications.values() {
                for (event_id, phase, occurred_at) in alerts::event_phases(n) {
                    sqlx::query(alerts::ENQUEUE_EVENT)
                        .bind(event_id)
                        .bind(&n.id)
                        .bind(phase.name())
                        .bind(n.workspace.as_ref().map(WorkspaceId::as_str))
                        .bind(n.kind.name())
                        .bind(n.severity.name())
                        .bind(storable(&n.title))
                        .bind(storable(&n.message))
                        .bind(serde_json::to_string(&n.suggested_actions).unwrap_or_default())
                        .bind(n.limit.map(LimitKind::name))
                        .bind(n.crossing.as_ref().map(crossing_json))
                        .bind(n.resolves_at.map(Timestamp::millis))
                        .bind(occurred_at.millis())
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(concat!(
                    "INSERT INTO notifications (",
                    notification_columns!(),
                    ") SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 WHERE $2 IS NULL OR EXISTS (SELECT 1 FROM workspaces WHERE id = $2) ON CONFLICT (id) DO UPDATE SET resolves_at = excluded.resolves_at, resolved_at = excluded.resolved_at, message = excluded.message"
                ))
                .bind(&n.id)
                .bind(n.workspace.as_ref().map(WorkspaceId::as_str))
                .bind(n.cause.map(Cause::key))
                .bind(n.severity.name())
                .bind(n.kind.name())
                .bind(storable(&n.title))
                .bind(storable(&n.message))
                .bind(serde_json::to_string(&n.suggested_actions).unwrap_or_default())
                .bind(n.limit.map(LimitKind::name))
                .bind(n.created_at.millis())
                .bind(n.resolves_at.map(Timestamp::millis))
                .bind(n.resolved_at.map(Timestamp::millis))
                .bind(tenant_to_json(&n.tenant))
                .bind(n.crossing.as_ref().map(crossing_json))
                .execute(&mut *tx)
                .await?;
            }
            for (key, delta) in &batch.rollups {
                let hour = key.minute - key.minute.rem_euclid(3_600_000);
                for (resolution, bucket) in [
                    (Resolution::Minute, key.minute),
                    (Resolution::Hour, hour),
                    (Resolution::Day, key.day),
                ] {
                    sqlx::query(
                        concat!(
                            "INSERT INTO rollups (workspace_id, resolution, bucket, model, requests, tokens, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, errors, client_errors, server_errors, refused, latency_ms_sum, usd_nano) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16 WHERE EXISTS (SELECT 1 FROM workspaces WHERE id = $1) ON CONFLICT (workspace_id, resolution, bucket, model) DO UPDATE SET ",
                            saturating_add!("requests"), ", ",
                            saturating_add!("tokens"), ", ",
                            saturating_add!("prompt_tokens"), ", ",
                            saturating_add!("completion_tokens"), ", ",
                            saturating_add!("cached_tokens"), ", ",
                            saturating_add!("reasoning_tokens"), ", ",
                            saturating_add!("errors"), ", ",
                            saturating_add!("client_errors"), ", ",
                            saturating_add!("server_errors"), ", ",
                            saturating_add!("refused"), ", ",
                            saturating_add!("latency_ms_sum"), ", ",
                            saturating_add!("usd_nano"),
                        ),

                    )
                    .bind(key.workspace.as_str())
                    .bind(resolution.code())
                    .bind(bucket)
                    .bind(&key.model)
                    .bind(delta.requests)
                    .bind(delta.tokens)
                    .bind(delta.prompt_tokens)
                    .bind(delta.completion_tokens)
                    .bind(delta.cached_tokens)
                    .bind(delta.reasoning_tokens)
                    .bind(delta.errors)
                    .bind(delta.client_errors)
                    .bind(delta.server_errors)
                    .bind(delta.refused)
                    .bind(delta.latency_ms_sum)
                    .bind(delta.usd_nano)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await
        }
        .await
        })?;
        Ok(())
    }

    /// History buckets of one resolution in `[from, to)`, summed over models.
    /// The sum is taken here, saturating, rather than by the database, whose
    /// `SUM` fails the whole query when one bucket's total overflows.
    pub async fn history(
        &self,
        workspace: &WorkspaceId,
        resolution: Resolution,
        from: i64,
        to: i64,
    ) -> Result<Vec<HistoryRow>> {
        type Row = (
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        );
        let rows: Vec<Row> = on_pool!(self, |pool| {
            sqlx::query_as(
            "SELECT bucket, requests, tokens, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, errors, client_errors, server_errors, refused, latency_ms_sum, usd_nano FROM rollups WHERE workspace_id = $1 AND resolution = $2 AND bucket >= $3 AND bucket < $4 ORDER BY bucket"
        )
        .bind(workspace.as_str())
        .bind(resolution.code())
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await
        })?;
        let mut history: Vec<HistoryRow> = Vec::new();
        for r in rows {
            let totals = RollupDelta {
                requests: r.1,
                tokens: r.2,
                prompt_tokens: r.3,
                completion_tokens: r.4,
                cached_tokens: r.5,
                reasoning_tokens: r.6,
                errors: r.7,
                client_errors: r.8,
                server_errors: r.9,
                refused: r.10,
                latency_ms_sum: r.11,
                usd_nano: r.12,
            };
            match history.last_mut() {
                Some(last) if last.bucket == r.0 => last.totals += totals,
                _ => history.push(HistoryRow {
                    bucket: r.0,
                    totals,
                }),
            }
        }
        Ok(history)
    }

    /// The model names of the daily history buckets starting at or after
    /// `since`, oldest day first, so that a starting engine goes on capping
    /// the names of the days it did not see begin.
    pub async fn models_by_day(&self, since: i64) -> Result<Vec<(WorkspaceId, i64, String)>> {
        let rows: Vec<(String, i64, String)> = on_pool!(self, |pool| {
            sqlx::query_as(
            "SELECT workspace_id, bucket, model FROM rollups WHERE resolution = 'd' AND bucket >= $1 ORDER BY bucket"
        )
        .bind(since)
        .fetch_all(pool)
        .await
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, day, model)| Some((id.parse().ok()?, day, model)))
            .collect())
    }

    /// Spend by model of every workspace from the daily history buckets
    /// starting at or after `since`: `(workspace, day start, model,
    /// spend)`, for the engine's spend by model of the current periods.
    pub async fn spend_by_day(
        &self,
        since: i64,
    ) -> Result<Vec<(WorkspaceId, i64, String, ModelSpend)>> {
        let rows: Vec<(String, i64, String, i64, i64, i64, i64)> = on_pool!(self, |pool| {
            sqlx::query_as(
            "SELECT workspace_id, bucket, model, prompt_tokens, cached_tokens, completion_tokens, usd_nano FROM rollups WHERE resolution = 'd' AND bucket >= $1 AND (usd_nano > 0 OR tokens > 0)"
        )
        .bind(since)
        .fetch_all(pool)
        .await
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, day, model, prompt, cached, completion, usd)| {
                let delta = RollupDelta {
                    prompt_tokens: prompt,
                    cached_tokens: cached,
                    completion_tokens: completion,
                    usd_nano: usd,
                    ..RollupDelta::default()
                };
                Some((id.parse().ok()?, day, model, delta.spend()))
            })
            .collect())
    }

    /// Deletes rollups older than their resolution's retention and resolved
    /// notifications older than the longest one, and finished alert
    /// deliveries older than theirs.
    pub async fn prune(&self, now: Timestamp) -> Result<u64> {
        let mut deleted = 0;
        for resolution in [Resolution::Minute, Resolution::Hour, Resolution::Day] {
            let cutoff =
                now.millis() - crate::domain::time::duration_millis(resolution.retention());
            deleted += on_pool!(self, |pool| sqlx::query(
                "DELETE FROM rollups WHERE resolution = $1 AND bucket < $2"
            )
            .bind(resolution.code())
            .bind(cutoff)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        }
        let cutoff =
            now.millis() - crate::domain::time::duration_millis(Resolution::Day.retention());
        deleted += on_pool!(self, |pool| sqlx::query(
            "DELETE FROM notifications WHERE resolved_at IS NOT NULL AND resolved_at < $1"
        )
        .bind(cutoff)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))?;
        deleted += self.prune_alerts(now).await?;
        Ok(deleted)
    }
}

/// The columns a single active key is found by.
enum KeyColumn {
    Hash,
    Id,
}

/// How a service key's scopes are stored.
const SERVICE_SCOPE: &str = "service";

fn key_from_row(row: KeyRow) -> Option<KeyRecord> {
    let (
        id,
        workspace,
        hash,
        prefix,
        name,
        scopes,
        service_workspaces,
        created_at,
        expires_at,
        last_used_at,
        revoked_at,
    ) = row;
    let grant = match workspace {
        Some(workspace) => KeyGrant::Workspace {
            workspace: workspace.parse().ok()?,
            scopes: Scopes::parse_list(&scopes).ok()?,
        },
        None if scopes == SERVICE_SCOPE => KeyGrant::Service {
            workspaces: match service_workspaces {
                Some(list) => Some(
                    list.split(',')
                        .map(str::parse)
                        .collect::<std::result::Result<_, _>>()
                        .ok()?,
                ),
                None => None,
            },
        },
        None => return None,
    };
    Some(KeyRecord {
        id,
        grant,
        hash: KeyHash::from_hex(&hash)?,
        prefix,
        name,
        created_at: Timestamp::from_millis(created_at),
        expires_at: expires_at.map(Timestamp::from_millis),
        last_used_at: last_used_at.map(Timestamp::from_millis),
        revoked_at: revoked_at.map(Timestamp::from_millis),
    })
}
