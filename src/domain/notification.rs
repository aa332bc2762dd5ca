//! Notifications: what people are told when a workspace's situation changes.
//! One notification exists per active cause; it is raised when the cause
//! appears, resolved when it ends, and never duplicated per request. The texts
//! carry the numbers and the concrete next steps, because an alert that only
//! says "quota exceeded" sends its reader searching.

use std::sync::LazyLock;

use super::credential::CredentialId;
use super::limits::{LimitKind, Metric, Period, Window, WorkspaceConfig, WorkspaceId};
use super::price::{NANO_USD_PER_DOLLAR, NanoUsd, dollars, format_dollars};
use super::spend::cheaper_model;
use super::status::{Cause, Facts};
use super::time::{Timestamp, humanize_duration, in_time};
use super::upstream::BillingCode;
use super::workspace::BillingBlock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub const fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Severity::Info, Severity::Warning, Severity::Critical]
            .into_iter()
            .find(|severity| severity.name() == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationKind {
    ApproachingLimit,
    RateLimited,
    /// A calendar limit used up: one kind per period, named after it.
    QuotaExhausted(Period),
    UpstreamRateLimited,
    UpstreamQuotaExhausted,
    UpstreamErrors,
    /// Service-wide: quotawatch cannot persist what it counts.
    StorageUnavailable,
    /// Service-wide: the counters shared by all instances are unreachable.
    SharedStoreUnavailable,
    /// Service-wide, for operators: quotawatch was started without an
    /// upstream key of its own (`OPENAI_API_KEY`).
    UpstreamKeyMissing,
    /// A workspace called a model the price table does not know, which is
    /// charged at the unpriced rates: one per model.
    UnpricedModel,
    /// A usd limit (a budget) reached the warning threshold: raised instead
    /// of [`ApproachingLimit`](Self::ApproachingLimit) for it.
    BudgetApproaching,
    /// A usd limit is used up: raised instead of
    /// [`RateLimited`](Self::RateLimited) or
    /// [`QuotaExhausted`](Self::QuotaExhausted) for it.
    BudgetExhausted,
    /// A day or month limit is forecast to run out before it resets.
    ForecastExhaustion,
    /// A day or month limit's usage crossed one of its alert thresholds:
    /// one per threshold, limit and period.
    ThresholdCrossed,
}

impl NotificationKind {
    /// Whether only operators (the admin key) are shown notifications of
    /// this kind. A server's configuration is theirs to fix; a tenant whose
    /// call it affects learns it from that call's error.
    pub const fn for_operators_only(self) -> bool {
        matches!(self, NotificationKind::UpstreamKeyMissing)
    }

    pub fn name(self) -> &'static str {
        // A period's kind is named from its adjective, so that a new period
        // brings its kind's name ("daily_quota_exhausted") with it.
        static QUOTA_EXHAUSTED: LazyLock<[String; Period::ALL.len()]> = LazyLock::new(|| {
            Period::ALL.map(|period| format!("{}_quota_exhausted", period.adjective()))
        });
        match self {
            NotificationKind::ApproachingLimit => "approaching_limit",
            NotificationKind::RateLimited => "rate_limited",
            NotificationKind::QuotaExhausted(period) => &QUOTA_EXHAUSTED[period.index()],
            NotificationKind::UpstreamRateLimited => "upstream_rate_limited",
            NotificationKind::UpstreamQuotaExhausted => "upstream_quota_exhausted",
            NotificationKind::UpstreamErrors => "upstream_errors",
            NotificationKind::StorageUnavailable => "storage_unavailable",
            NotificationKind::SharedStoreUnavailable => "shared_store_unavailable",
            NotificationKind::UpstreamKeyMissing => "upstream_key_missing",
            NotificationKind::UnpricedModel => "unpriced_model",
            NotificationKind::BudgetApproaching => "budget_approaching",
            NotificationKind::BudgetExhausted => "budget_exhausted",
            NotificationKind::ForecastExhaustion => "forecast_exhaustion",
            NotificationKind::ThresholdCrossed => "threshold_crossed",
        }
    }

    /// The kind named `name`, as [`NotificationKind::name`] names it.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            NotificationKind::ApproachingLimit,
            NotificationKind::RateLimited,
            NotificationKind::UpstreamRateLimited,
            NotificationKind::UpstreamQuotaExhausted,
            NotificationKind::UpstreamErrors,
            NotificationKind::StorageUnavailable,
            NotificationKind::SharedStoreUnavailable,
            NotificationKind::UpstreamKeyMissing,
            NotificationKind::UnpricedModel,
            NotificationKind::BudgetApproaching,
            NotificationKind::BudgetExhausted,
            NotificationKind::ForecastExhaustion,
            NotificationKind::ThresholdCrossed,
        ]
        .into_iter()
        .chain(Period::ALL.map(NotificationKind::QuotaExhausted))
        .find(|kind| kind.name() == name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub id: String,
    /// `None` for service-wide notifications, which every workspace sees.
    pub workspace: Option<super::limits::WorkspaceId>,
    /// The workspace cause this notification reports; `None` for
    /// service-wide notifications.
    pub cause: Option<Cause>,
    pub severity: Severity,
    pub kind: NotificationKind,
    pub title: String,
    pub message: String,
    /// The operator's: what happened in full, and what to change where.
    pub suggested_actions: Vec<String>,
    /// What a tenant's own users may be shown instead.
    pub tenant: TenantText,
    pub limit: Option<LimitKind>,
    /// Of a `threshold_crossed` notification: the threshold and the numbers.
    pub crossing: Option<Crossing>,
    pub created_at: Timestamp,
    /// When the cause is expected to end by itself, if that is known.
    pub resolves_at: Option<Timestamp>,
    pub resolved_at: Option<Timestamp>,
}

/// A limit's usage crossing one of its alert thresholds in one period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crossing {
    /// The threshold, a percentage of the limit.
    pub percent: u8,
    /// What the period had counted when the crossing was seen.
    pub used: u64,
    pub max: u64,
    /// The period the crossing belongs to (its start and end).
    pub period_start: Timestamp,
    pub period_end: Timestamp,
}

impl Notification {
    pub fn is_active(&self) -> bool {
        self.resolved_at.is_none()
    }
}

/// The id of the notification of `cause` in `workspace` that started at
/// `started`, the same wherever it is computed. Instances sharing counters
/// each raise a notification for a cause they see in the shared state; when
/// they agree on when it started, they give it this one id, so that a
/// client behind a load balancer and the history see one notification.
pub fn shared_id(workspace: &WorkspaceId, cause: Cause, started: Timestamp) -> String {
    digest_id(&format!(
        "{}\n{}\n{}",
        workspace.as_str(),
        cause.key(),
        started.millis()
    ))
}

/// The id of the notification of `credential`'s billing block that started
/// at `started`: every instance that loads the block derives the same one,
/// as [`shared_id`] does for a workspace's.
pub fn credential_block_id(credential: &CredentialId, started: Timestamp) -> String {
    digest_id(&format!("{credential}\n{}", started.millis()))
}

/// A notification id drawn from `text`, the same wherever it is computed.
fn digest_id(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    format!("ntf_{:016x}", u64::from_be_bytes(first))
}

/// A notification as a tenant's own users may read it: what it means for
/// them and what they can do, without internal endpoints, operator URLs,
/// upstream error texts or the names of settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantText {
    pub title: String,
    pub message: String,
    pub suggested_actions: Vec<String>,
}

fn tenant_text(title: &str, message: String, actions: &[&str]) -> TenantText {
    TenantText {
        title: title.to_owned(),
        message,
        suggested_actions: actions.iter().map(|action| (*action).to_owned()).collect(),
    }
}

/// When something frees up, for a tenant's users: `in 12m`, or `soon`.
fn when_for_tenant(at: Option<Timestamp>, now: Timestamp) -> String {
    at.map_or_else(
        || "soon".to_owned(),
        |at| format!("in {}", humanize_duration(now.until(at))),
    )
}

/// The tenant's text of a billing block, the workspace's or its credential's.
fn upstream_quota_tenant_text() -> TenantText {
    tenant_text(
        "AI requests are paused",
        "The AI provider's quota for this service is used up. Requests are paused until it is restored.".to_owned(),
        &["Nothing to do on your side: requests resume once it is fixed.", "If this lasts, contact your administrator."],
    )
}

/// The tenant's text for `cause`.
fn tenant_text_of(cause: Cause, facts: &Facts, now: Timestamp) -> TenantText {
    const WAIT: &str = "Wait a moment and try again.";
    const ADMIN: &str = "If this lasts, contact your administrator.";
    match cause {
        Cause::Approaching(kind) => {
            let limit = facts.limit(kind);
            tenant_text(
                "Nearing a usage limit",
                format!(
                    "{} of the {} allowed{} {} are used. Requests may be paused for a while when the limit is reached.",
                    kind.metric.figure(limit.used),
                    kind.metric.figure(limit.max),
                    kind.metric.unit_suffix(),
                    period(kind),
                ),
                &["Spread requests out over time where you can."],
            )
        }
        Cause::LimitExhausted(kind) => {
            let limit = facts.limit(kind);
            match kind.window.period() {
                None => tenant_text(
                    "Too many requests right now",
                    format!(
                        "The per-minute limit is reached; requests resume {}.",
                        when_for_tenant(limit.frees_at, now)
                    ),
                    &[WAIT],
                ),
                Some(period) => tenant_text(
                    &format!("{} limit reached", capitalised(period.adjective())),
                    format!(
                        "{}'s {} used up; requests resume {}.",
                        capitalised(period.this()),
                        kind.metric.all_of_it(),
                        when_for_tenant(limit.resets_at, now)
                    ),
                    &[
                        "Try again after the limit resets.",
                        "If you need more, contact your administrator.",
                    ],
                ),
            }
        }
        Cause::ForecastExhaustion(kind) => {
            let limit = facts.limit(kind);
            let period = kind
                .window
                .period()
                .map_or("minute", |period| period.adjective());
            tenant_text(
                &format!("The {period} limit may run out soon"),
                format!(
                    "At the current pace, the {period} limit is reached {}, before it resets.",
                    when_for_tenant(
                        limit.forecast.and_then(|forecast| forecast.runs_out_at),
                        now
                    )
                ),
                &["Spread requests out over time where you can.", ADMIN],
            )
        }
        Cause::UpstreamRateLimited => tenant_text(
            "The AI service is busy",
            format!(
                "The AI provider asked to slow down; requests resume {}.",
                when_for_tenant(facts.upstream_blocked_until, now)
            ),
            &[WAIT],
        ),
        Cause::UpstreamQuotaExhausted => upstream_quota_tenant_text(),
        Cause::UpstreamErrorRate => tenant_text(
            "The AI service is having problems",
            "Many recent requests to the AI provider failed.".to_owned(),
            &["Try again in a few minutes.", ADMIN],
        ),
        Cause::UpstreamKeyRejected => tenant_text(
            "AI requests are failing",
            "The service cannot reach the AI provider with its current settings.".to_owned(),
            &[ADMIN],
        ),
    }
}

/// Writes the notification for `cause` as things stand at `now`.
pub fn describe(
    id: String,
    workspace: &WorkspaceConfig,
    cause: Cause,
    facts: &Facts,
    now: Timestamp,
) -> Notification {
    let ws = workspace.id.as_str();
    let text = match cause {
        Cause::Approaching(kind) if kind.metric == Metric::Usd => {
            budget_approaching(workspace, kind, facts, now)
        }
        Cause::LimitExhausted(kind) if kind.metric == Metric::Usd => {
            budget_exhausted(workspace, kind, facts, now)
        }
        Cause::Approaching(kind) => approaching(workspace, kind, facts, now),
        Cause::LimitExhausted(kind) => exhausted(workspace, kind, facts, now),
        Cause::ForecastExhaustion(kind) => forecast_exhaustion(workspace, kind, facts, now),
        Cause::UpstreamRateLimited => upstream_rate_limited(ws, facts, now),
        Cause::UpstreamQuotaExhausted => upstream_quota_exhausted(ws, facts),
        Cause::UpstreamErrorRate => upstream_error_rate(ws, facts),
        Cause::UpstreamKeyRejected => upstream_key_rejected(ws),
    };
    Notification {
        id,
        workspace: Some(workspace.id.clone()),
        cause: Some(cause),
        severity: severity_of(cause),
        kind: kind_of(cause),
        title: text.title,
        message: text.message,
        suggested_actions: text.actions,
        tenant: tenant_text_of(cause, facts, now),
        limit: match cause {
            Cause::Approaching(kind)
            | Cause::LimitExhausted(kind)
            | Cause::ForecastExhaustion(kind) => Some(kind),
            _ => None,
        },
        crossing: None,
        created_at: now,
        resolves_at: text.resolves_at,
        resolved_at: None,
    }
}

/// The notification of `workspace`'s first call of `model`, which the
/// price table does not know. Its id derives from the two, so that every
/// instance names it alike.
pub fn describe_unpriced(workspace: &WorkspaceConfig, model: &str, now: Timestamp) -> Notification {
    use sha2::{Digest, Sha256};
    let ws = workspace.id.as_str();
    let digest = Sha256::digest(format!("{ws}\nunpriced_model\n{model}"));
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Notification {
        id: format!("ntf_{:016x}", u64::from_be_bytes(first)),
        workspace: Some(workspace.id.clone()),
        cause: None,
        severity: Severity::Warning,
        kind: NotificationKind::UnpricedModel,
        title: format!("Workspace {ws} calls {model}, which has no price"),
        message: format!(
            "quotawatch's price table has no entry for {model}, so its calls are charged at the unpriced rates (QUOTAWATCH_UNPRICED_MODEL_RATE; by default the table's highest), and the spend and usd limits of workspace {ws} count them at those rates."
        ),
        suggested_actions: vec![
            format!(
                "Add {model} to the price file named by QUOTAWATCH_PRICES_FILE (the model_prices_and_context_window.json format, USD per token), then reload it with SIGHUP or POST /api/prices/reload."
            ),
            "Or set QUOTAWATCH_UNPRICED_MODEL_RATE to the rates such models should be charged."
                .to_owned(),
        ],
        tenant: tenant_text(
            "A model without a price",
            format!(
                "Calls of {model} are counted at a high estimated price, so budgets may run out sooner than expected."
            ),
            &[ADMIN_FOR_PRICES],
        ),
        limit: None,
        crossing: None,
        created_at: now,
        resolves_at: None,
        resolved_at: None,
    }
}

/// The one notification of a credential's billing block (see
/// `domain::credential`): service-wide, shown with every workspace billed to
/// the credential, and named by the block's start.
pub fn describe_credential_quota_exhausted(
    credential: &CredentialId,
    block: BillingBlock,
    probe_interval: std::time::Duration,
    now: Timestamp,
) -> Notification {
    let code = block.code;
    let mut actions = billing_actions(code);
    actions.push(format!(
        "After fixing billing, an admin can resume every workspace billed to it at once with POST /api/credentials/{credential}/lift (or by lifting the block of any one of them), which keeps the counts; otherwise the next probe resumes them by itself."
    ));
    Notification {
        id: credential_block_id(credential, block.since),
        workspace: None,
        cause: None,
        severity: Severity::Critical,
        kind: NotificationKind::UpstreamQuotaExhausted,
        title: format!("OpenAI billing quota exhausted for upstream credential {credential}"),
        message: format!(
            "OpenAI refused a proxied request with {}. This is a fact about the upstream account the request was billed to (its key, organization and project, fingerprinted as {credential}), so quotawatch refuses the requests of every workspace billed to it locally with HTTP 429 and x-should-retry: false, and lets one probe request from any of them through every {} to notice when billing is fixed.",
            code.code(),
            humanize_duration(probe_interval),
        ),
        suggested_actions: actions,
        tenant: upstream_quota_tenant_text(),
        limit: None,
        crossing: None,
        created_at: now,
        resolves_at: None,
        resolved_at: None,
    }
}

/// What a tenant is told to do about a price only the operator can set.
const ADMIN_FOR_PRICES: &str = "Ask your administrator to add the model's price.";

/// The service-wide notification raised while the database refuses writes.
pub fn describe_storage_unavailable(id: String, error: &str, now: Timestamp) -> Notification {
    service_problem(
        id,
        NotificationKind::StorageUnavailable,
        Severity::Critical,
        storage_unavailable(error, now),
        now,
    )
}

/// The service-wide notification raised when a `/v1` call needs the
/// upstream key quotawatch was started without.
pub fn describe_upstream_key_missing(id: String, now: Timestamp) -> Notification {
    let text = Text {
        title: "quotawatch has no OpenAI key of its own".to_owned(),
        message: "quotawatch was started without OPENAI_API_KEY, so /v1 calls of workspaces that do not name their own key (upstream_key_env) answer 503 upstream_key_missing. Usage reported through the REST API is not affected.".to_owned(),
        actions: vec![
            "Set OPENAI_API_KEY and restart quotawatch.".to_owned(),
            "Or give each workspace that calls /v1 its own key: upstream_key_env = QUOTAWATCH_UPSTREAM_KEY_<NAME>.".to_owned(),
        ],
        resolves_at: None,
    };
    service_problem(
        id,
        NotificationKind::UpstreamKeyMissing,
        Severity::Critical,
        text,
        now,
    )
}

/// The service-wide notification raised while the shared counters (Redis)
/// cannot be reached, saying what this instance does `meanwhile` (which
/// the configured fallback words).
pub fn describe_shared_store_unavailable(
    id: String,
    error: &str,
    meanwhile: &str,
    now: Timestamp,
) -> Notification {
    service_problem(
        id,
        NotificationKind::SharedStoreUnavailable,
        Severity::Critical,
        shared_store_unavailable(error, meanwhile, now),
        now,
    )
}

fn service_problem(
    id: String,
    kind: NotificationKind,
    severity: Severity,
    text: Text,
    now: Timestamp,
) -> Notification {
    Notification {
        id,
        workspace: None,
        cause: None,
        severity,
        kind,
        title: text.title,
        message: text.message,
        suggested_actions: text.actions,
        tenant: service_tenant_text(kind),
        limit: None,
        crossing: None,
        created_at: now,
        resolves_at: None,
        resolved_at: None,
    }
}

/// The tenant's text of a service-wide problem.
fn service_tenant_text(kind: NotificationKind) -> TenantText {
    const NOTHING: &str = "Nothing to do on your side.";
    match kind {
        NotificationKind::UpstreamKeyMissing => tenant_text(
            "AI requests are unavailable",
            "The service is not connected to the AI provider right now.".to_owned(),
            &["If this lasts, contact your administrator."],
        ),
        NotificationKind::SharedStoreUnavailable => tenant_text(
            "The service is running in a reduced mode",
            "Part of the service is unavailable; some requests may be refused sooner than usual until it recovers.".to_owned(),
            &[NOTHING],
        ),
        _ => tenant_text(
            "The service is having trouble saving its records",
            "Your requests still work; the service is recovering by itself.".to_owned(),
            &[NOTHING],
        ),
    }
}

fn severity_of(cause: Cause) -> Severity {
    match cause {
        Cause::Approaching(kind) if kind.window == Window::Minute => Severity::Info,
        Cause::Approaching(_) => Severity::Warning,
        Cause::LimitExhausted(kind) if kind.window == Window::Minute => Severity::Warning,
        Cause::LimitExhausted(_) => Severity::Critical,
        Cause::ForecastExhaustion(_) | Cause::UpstreamRateLimited | Cause::UpstreamErrorRate => {
            Severity::Warning
        }
        Cause::UpstreamQuotaExhausted | Cause::UpstreamKeyRejected => Severity::Critical,
    }
}

fn kind_of(cause: Cause) -> NotificationKind {
    match cause {
        Cause::Approaching(kind) if kind.metric == Metric::Usd => {
            NotificationKind::BudgetApproaching
        }
        Cause::LimitExhausted(kind) if kind.metric == Metric::Usd => {
            NotificationKind::BudgetExhausted
        }
        Cause::Approaching(_) => NotificationKind::ApproachingLimit,
        Cause::LimitExhausted(kind) => match kind.window.period() {
            None => NotificationKind::RateLimited,
            Some(period) => NotificationKind::QuotaExhausted(period),
        },
        Cause::ForecastExhaustion(_) => NotificationKind::ForecastExhaustion,
        Cause::UpstreamRateLimited => NotificationKind::UpstreamRateLimited,
        Cause::UpstreamQuotaExhausted => NotificationKind::UpstreamQuotaExhausted,
        Cause::UpstreamErrorRate | Cause::UpstreamKeyRejected => NotificationKind::UpstreamErrors,
    }
}

struct Text {
    title: String,
    message: String,
    actions: Vec<String>,
    resolves_at: Option<Timestamp>,
}

/// `12345` -> `12,345`, so that large limits stay readable in messages.
pub fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    grouped
}

fn period(kind: LimitKind) -> &'static str {
    kind.window
        .period()
        .map_or("in the last 60 seconds", Period::this)
}

/// "Daily", "Monthly": for the start of a sentence.
fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn approaching(
    workspace: &WorkspaceConfig,
    kind: LimitKind,
    facts: &Facts,
    now: Timestamp,
) -> Text {
    let ws = workspace.id.as_str();
    let limit = facts.limit(kind);
    let unit = kind.metric.unit_suffix();
    let percent = (limit.utilization() * 100.0).floor();
    let resets = match (kind.window.period(), limit.resets_at) {
        (Some(period), Some(at)) => format!(
            " The {} count resets {}.",
            period.adjective(),
            next_reset(period, workspace, at, now)
        ),
        (_, Some(at)) => format!(" The window is fully clear again {}.", in_time(at, now)),
        (_, None) => String::new(),
    };
    let actions = match kind.window.period() {
        Some(_) => vec![
            format!("If this volume is expected, raise {kind} for workspace {ws} (PATCH /api/workspaces/{ws})."),
            "Otherwise reduce volume: cache repeated answers, batch calls, or route simple tasks to a smaller model.".to_owned(),
        ],
        None => vec![
            "Spread requests more evenly: lower client concurrency or pace calls through a queue.".to_owned(),
            format!("If the upstream allows more, raise {kind} for workspace {ws}."),
        ],
    };
    Text {
        title: format!("Workspace {ws} is approaching its {kind} limit"),
        message: format!(
            "Workspace {ws} has used {} of {}{unit} {} ({percent}%), above its warning threshold of {}%.{resets}",
            kind.metric.figure(limit.used),
            kind.metric.figure(limit.max),
            period(kind),
            (workspace.warn_at * 100.0).round(),
        ),
        actions,
        resolves_at: limit.resets_at,
    }
}

fn exhausted(workspace: &WorkspaceConfig, kind: LimitKind, facts: &Facts, now: Timestamp) -> Text {
    let ws = workspace.id.as_str();
    let limit = facts.limit(kind);
    let used = format!(
        "Workspace {ws} has used {} of {}{} {}",
        kind.metric.figure(limit.used),
        kind.metric.figure(limit.max),
        kind.metric.unit_suffix(),
        period(kind)
    );
    match kind.window.period() {
        None => Text {
            title: format!("Workspace {ws} hit its {kind} limit"),
            message: format!(
                "{used}. Requests are refused with HTTP 429 until room frees up{}.",
                limit.frees_at.map(|at| format!(" {}", in_time(at, now))).unwrap_or_default()
            ),
            actions: vec![
                "Retry after the time in the retry-after header; the official OpenAI SDKs do this by themselves.".to_owned(),
                "Smooth bursts: lower client concurrency or pace calls through a queue.".to_owned(),
                format!("If the upstream allows more, raise {kind} for workspace {ws} (PATCH /api/workspaces/{ws})."),
            ],
            resolves_at: limit.frees_at,
        },
        Some(period) => Text {
            title: format!(
                "Workspace {ws} used up its {} {} quota",
                period.adjective(),
                kind.metric.name()
            ),
            message: format!(
                "{used}. Requests are refused with HTTP 429 (x-should-retry: false) until the quota resets {} {}{}.",
                period.next_starts(),
                workspace.timezone.name(),
                limit.resets_at.map(|at| format!(", {}", in_time(at, now))).unwrap_or_default()
            ),
            actions: vec![
                format!("If this volume is expected, raise {kind} for workspace {ws} (PATCH /api/workspaces/{ws})."),
                "Reduce volume: cache repeated answers, batch calls, or route simple tasks to a smaller model.".to_owned(),
                format!("To unblock now, an admin can reset the workspace's usage (POST /api/quota/reset with {{\"workspace\":\"{ws}\",\"what\":\"usage\"}})."),
            ],
            resolves_at: limit.resets_at,
        },
    }
}

/// What a budget's period has spent, for the start of a sentence:
/// "today", "this month", or "in the last 60 seconds" for a minute's.
fn budget_spent(workspace: &WorkspaceConfig, kind: LimitKind, facts: &Facts) -> String {
    let limit = facts.limit(kind);
    format!(
        "Workspace {} has spent {} of its {} budget ({kind}) {}",
        workspace.id,
        format_dollars(limit.used),
        format_dollars(limit.max),
        period(kind)
    )
}

/// When a calendar period that ends `at` resets, for the end of a
/// sentence: "at midnight Europe/Berlin in 4h 0m (at ...)".
fn next_reset(
    period: Period,
    workspace: &WorkspaceConfig,
    at: Timestamp,
    now: Timestamp,
) -> String {
    format!(
        "{} {} {}",
        period.next_starts(),
        workspace.timezone.name(),
        in_time(at, now)
    )
}

/// A budget proposed to an operator: rounded up to a whole cent below a
/// dollar, to a whole dollar above, so that it reads as a figure someone
/// would choose.
fn round_up_budget(amount: NanoUsd) -> NanoUsd {
    const CENT: NanoUsd = NANO_USD_PER_DOLLAR / 100;
    let step = if amount < NANO_USD_PER_DOLLAR {
        CENT
    } else {
        NANO_USD_PER_DOLLAR
    };
    amount.div_ceil(step).saturating_mul(step)
}

/// What a period that spent `used` from `start` to `now` spends by `end`
/// at the same pace. The first minute counts as a minute, so that a call
/// just after midnight does not project a fortune.
fn projected(used: NanoUsd, start: Timestamp, end: Timestamp, now: Timestamp) -> NanoUsd {
    let elapsed = (now.millis() - start.millis()).max(60_000) as u128;
    let length = (end.millis() - start.millis()).max(0) as u128;
    NanoUsd::try_from(u128::from(used) * length / elapsed)
        .unwrap_or(NanoUsd::MAX)
        .max(used)
}

/// The suggestion to raise a budget, with the figure: for a day's or a
/// month's, what the period spends at the pace so far; for a minute's, what
/// the last 60 seconds spent.
fn raise_budget(
    workspace: &WorkspaceConfig,
    kind: LimitKind,
    facts: &Facts,
    now: Timestamp,
) -> String {
    let ws = workspace.id.as_str();
    let limit = facts.limit(kind);
    let Some(period) = kind.window.period() else {
        return format!(
            "If this rate of spend is expected, raise {kind} for workspace {ws} above the {} the last 60 seconds spent (PATCH /api/workspaces/{ws}).",
            format_dollars(limit.used)
        );
    };
    let counter = facts.calendars.get(period);
    let pace = projected(limit.used, counter.start, counter.end, now);
    let spend = format!("{}'s spend", period.this());
    if pace > limit.max {
        let proposal = round_up_budget(pace);
        format!(
            "Raise the budget: at the pace so far {spend} reaches {} by its end; set {kind} for workspace {ws} to {} (PATCH /api/workspaces/{ws} with {{\"limits\":{{\"{kind}\":{}}}}}).",
            format_dollars(pace),
            format_dollars(proposal),
            dollars(proposal)
        )
    } else {
        format!(
            "At the pace so far {spend} reaches {} by its end, within the budget; if more traffic is coming, raise {kind} for workspace {ws} (PATCH /api/workspaces/{ws}).",
            format_dollars(pace)
        )
    }
}

/// The suggestion to move traffic to a cheaper model, with the figure
/// priced on the workspace's own token mix over the budget's period (a
/// minute's budget: today's), if the prices name one (see
/// [`cheaper_model`] for which).
fn cheaper_model_action(kind: LimitKind, facts: &Facts) -> Option<String> {
    let period = kind.window.period().unwrap_or(Period::Day);
    let cheaper = cheaper_model(facts.prices, &facts.spend.period(facts.calendars, period))?;
    let (from, to) = (&cheaper.from, &cheaper.to);
    Some(format!(
        "Or move traffic to a cheaper model: {to} costs {} of {from} for this workload's token mix ({from}'s calls {} cost {}; at {to}'s rates they would have cost about {}).",
        cheaper.share(),
        period.this(),
        format_dollars(cheaper.spent),
        format_dollars(cheaper.would_have_spent()),
    ))
}

fn budget_approaching(
    workspace: &WorkspaceConfig,
    kind: LimitKind,
    facts: &Facts,
    now: Timestamp,
) -> Text {
    let limit = facts.limit(kind);
    let percent = (limit.utilization() * 100.0).floor();
    let resets = match (kind.window.period(), limit.resets_at) {
        (Some(period), Some(at)) => format!(
            " The {} budget resets {}.",
            period.adjective(),
            next_reset(period, workspace, at, now)
        ),
        _ => String::new(),
    };
    let mut actions = vec![raise_budget(workspace, kind, facts, now)];
    actions.extend(cheaper_model_action(kind, facts));
    Text {
        title: format!(
            "Workspace {} is approaching its {kind} budget",
            workspace.id
        ),
        message: format!(
            "{} ({percent}%), above its warning threshold of {}%.{resets}",
            budget_spent(workspace, kind, facts),
            (workspace.warn_at * 100.0).round(),
        ),
        actions,
        resolves_at: limit.resets_at,
    }
}

/// The text of a calendar limit forecast to run out before it resets.
fn forecast_exhaustion(
    workspace: &WorkspaceConfig,
    kind: LimitKind,
    facts: &Facts,
    now: Timestamp,
) -> Text {
    let ws = workspace.id.as_str();
    let limit = facts.limit(kind);
    let forecast = limit.forecast;
    let pace = forecast.map_or_else(String::new, |forecast| {
        format!(
            " at the recent pace of {}{} an hour",
            kind.metric.figure(forecast.rate_per_hour.round() as u64),
            kind.metric.unit_suffix()
        )
    });
    let when = forecast
        .and_then(|forecast| forecast.runs_out_at)
        .map_or_else(String::new, |at| format!(" {}", in_time(at, now)));
    let resets = match (kind.window.period(), limit.resets_at) {
        (Some(period), Some(at)) => format!(
            ", before the {} count resets {}",
            period.adjective(),
            next_reset(period, workspace, at, now)
        ),
        _ => String::new(),
    };
    Text {
        title: format!("Workspace {ws} is forecast to use up its {kind} limit"),
        message: format!(
            "Workspace {ws} has used {} of {}{} {}. It runs out{when}{pace}{resets}; requests are then refused until it resets.",
            kind.metric.figure(limit.used),
            kind.metric.figure(limit.max),
            kind.metric.unit_suffix(),
            period(kind),
        ),
        actions: vec![
            format!("If this volume is expected, raise {kind} for workspace {ws} (PATCH /api/workspaces/{ws})."),
            "Otherwise slow down now: cache repeated answers, batch calls, or route simple tasks to a smaller model.".to_owned(),
        ],
        resolves_at: limit.resets_at,
    }
}

fn budget_exhausted(
    workspace: &WorkspaceConfig,
    kind: LimitKind,
    facts: &Facts,
    now: Timestamp,
) -> Text {
    let ws = workspace.id.as_str();
    let limit = facts.limit(kind);
    let mut actions = vec![raise_budget(workspace, kind, facts, now)];
    actions.extend(cheaper_model_action(kind, facts));
    let (refused, resolves_at) = match kind.window.period() {
        None => (
            format!(
                "Requests are refused with HTTP 429 until room frees up{}",
                limit
                    .frees_at
                    .map(|at| format!(" {}", in_time(at, now)))
                    .unwrap_or_default()
            ),
            limit.frees_at,
        ),
        Some(period) => {
            actions.push(format!("To unblock now, an admin can reset the workspace's usage (POST /api/quota/reset with {{\"workspace\":\"{ws}\",\"what\":\"usage\"}})."));
            (
                format!(
                    "Requests are refused with HTTP 429 workspace_budget_exceeded (x-should-retry: false) until the budget resets {} {}{}",
                    period.next_starts(),
                    workspace.timezone.name(),
                    limit
                        .resets_at
                        .map(|at| format!(", {}", in_time(at, now)))
                        .unwrap_or_default()
                ),
                limit.resets_at,
            )
        }
    };
    Text {
        title: format!("Workspace {ws} used up its {kind} budget"),
        message: format!("{}. {refused}.", budget_spent(workspace, kind, facts),),
        actions,
        resolves_at,
    }
}

/// The notification of `kind`'s usage crossing `crossing.percent` of its
/// limit. Its id derives from the workspace, the limit, its maximum, the
/// threshold and the period's start, so that every instance, and one
/// restarted, names the crossing alike.
pub fn describe_threshold(
    workspace: &WorkspaceConfig,
    kind: LimitKind,
    crossing: Crossing,
    now: Timestamp,
) -> Notification {
    let ws = workspace.id.as_str();
    let percent = crossing.percent;
    let adjective = kind.window.period().map_or("minute", Period::adjective);
    let used = format!(
        "{} of {}{}",
        kind.metric.figure(crossing.used),
        kind.metric.figure(crossing.max),
        kind.metric.unit_suffix()
    );
    let resets = kind.window.period().map_or_else(String::new, |period| {
        format!(
            " The {adjective} count resets {}.",
            next_reset(period, workspace, crossing.period_end, now)
        )
    });
    Notification {
        id: digest_id(&format!(
            "{ws}\nthreshold:{kind}:{percent}\n{}\n{}",
            crossing.period_start.millis(),
            crossing.max
        )),
        workspace: Some(workspace.id.clone()),
        cause: None,
        severity: match percent {
            100.. => Severity::Critical,
            80.. => Severity::Warning,
            _ => Severity::Info,
        },
        kind: NotificationKind::ThresholdCrossed,
        title: format!("Workspace {ws} crossed {percent}% of its {kind} limit"),
        message: format!(
            "Workspace {ws} has used {used} {}, crossing its alert threshold of {percent}%. Each threshold is announced once per {}.{resets}",
            period(kind),
            kind.window.name()
        ),
        suggested_actions: vec![
            format!(
                "If this volume is expected, raise {kind} for workspace {ws} (PATCH /api/workspaces/{ws})."
            ),
            format!(
                "To be told at other shares of the limit, set alert_thresholds for workspace {ws} (PATCH /api/workspaces/{ws})."
            ),
        ],
        tenant: tenant_text(
            &format!("{percent}% of the {adjective} limit used"),
            format!("{used} {} are used.", period(kind)),
            &["Spread requests out over time where you can."],
        ),
        limit: Some(kind),
        crossing: Some(crossing),
        created_at: now,
        resolves_at: Some(crossing.period_end),
        resolved_at: None,
    }
}

fn upstream_detail(facts: &Facts) -> String {
    match &facts.last_error {
        Some(error) => {
            let code = error
                .code
                .as_deref()
                .or(error.error_type.as_deref())
                .unwrap_or("no code");
            let message: String = error
                .message
                .as_deref()
                .unwrap_or("")
                .chars()
                .take(240)
                .collect();
            if message.is_empty() {
                format!("HTTP {} ({code})", error.status_code)
            } else {
                format!("HTTP {} ({code}): \"{message}\"", error.status_code)
            }
        }
        None => "HTTP 429".to_owned(),
    }
}

fn upstream_rate_limited(ws: &str, facts: &Facts, now: Timestamp) -> Text {
    let until = facts.upstream_blocked_until;
    let hold = until
        .map(|at| format!(" quotawatch holds this workspace's requests {} so that retries do not prolong the limit.", in_time(at, now)))
        .unwrap_or_default();
    let upstream_limits = match (
        facts.upstream.requests.and_then(|b| b.limit),
        facts.upstream.tokens.and_then(|b| b.limit),
    ) {
        (Some(requests), Some(tokens)) => format!(
            " (OpenAI reports {} requests and {} tokens per minute)",
            group_digits(requests),
            group_digits(tokens)
        ),
        (Some(requests), None) => format!(
            " (OpenAI reports {} requests per minute)",
            group_digits(requests)
        ),
        (None, Some(tokens)) => format!(
            " (OpenAI reports {} tokens per minute)",
            group_digits(tokens)
        ),
        (None, None) => String::new(),
    };
    Text {
        title: format!("OpenAI rate-limited workspace {ws}"),
        message: format!("OpenAI answered {}.{hold}", upstream_detail(facts)),
        actions: vec![
            "Nothing to do for a single occurrence: requests resume by themselves when the hold ends.".to_owned(),
            format!("If it repeats, set workspace {ws}'s requests_per_minute and tokens_per_minute a little below the upstream limits{upstream_limits}, so quotawatch paces requests before OpenAI refuses them."),
            "For a lasting need, request a higher usage tier from OpenAI.".to_owned(),
        ],
        resolves_at: until,
    }
}

fn billing_actions(code: BillingCode) -> Vec<String> {
    const BILLING: &str = "https://platform.openai.com/settings/organization/billing";
    const LIMITS: &str = "https://platform.openai.com/settings/organization/limits";
    match code {
        BillingCode::InsufficientQuota => vec![
            format!("Check the plan and billing details in the OpenAI billing settings ({BILLING})."),
            "Add credits or raise the usage limit there; on a free trial, add a payment method.".to_owned(),
        ],
        BillingCode::CreditBalanceExhausted => vec![
            format!("Add credits in the OpenAI billing settings ({BILLING})."),
            "Turn on auto-recharge there so the balance does not run out again.".to_owned(),
        ],
        BillingCode::OrganizationSpendLimitExceeded => vec![
            format!("Raise the organization's monthly spend limit in the OpenAI limits settings ({LIMITS}), or wait for the next billing period."),
        ],
        BillingCode::ProjectSpendLimitExceeded => vec![
            "Raise the project's monthly budget in the project's limits settings on platform.openai.com, or wait for the next billing period.".to_owned(),
        ],
        BillingCode::OrganizationUsageLimitExceeded => vec![
            format!("Raise the organization's usage limit in the OpenAI limits settings ({LIMITS}), or wait for the next billing period."),
        ],
    }
}

fn upstream_quota_exhausted(ws: &str, facts: &Facts) -> Text {
    let code = facts.billing_code.unwrap_or(BillingCode::InsufficientQuota);
    let mut actions = billing_actions(code);
    actions.push(format!(
        "After fixing billing, an admin can resume at once with POST /api/quota/reset {{\"workspace\":\"{ws}\",\"what\":\"block\"}}, which lifts the block and keeps the counts; otherwise the next probe resumes the workspace by itself."
    ));
    Text {
        title: format!("OpenAI billing quota exhausted for workspace {ws}"),
        message: format!(
            "OpenAI refused a request with {} ({}). Retrying cannot help until billing changes, so quotawatch refuses this workspace's requests locally with HTTP 429 and x-should-retry: false, and lets one probe request through every {} to notice when billing is fixed.",
            upstream_detail(facts),
            code.code(),
            humanize_duration(facts.probe_interval),
        ),
        actions,
        resolves_at: None,
    }
}

fn upstream_error_rate(ws: &str, facts: &Facts) -> Text {
    let outcomes = facts.upstream_outcomes;
    let percent = (outcomes.failed * 100)
        .checked_div(outcomes.total)
        .unwrap_or(0);
    Text {
        title: format!("OpenAI is failing for workspace {ws}"),
        message: format!(
            "{} of {} upstream requests in the last minute failed with server errors or timeouts ({percent}%). Latest: {}.",
            outcomes.failed,
            outcomes.total,
            upstream_detail(facts)
        ),
        actions: vec![
            "Check https://status.openai.com for an ongoing incident.".to_owned(),
            "Keep retries with back-off for these errors (the official SDKs retry them by themselves), and avoid adding retries on top.".to_owned(),
            "If it persists, fail over to another model or deployment.".to_owned(),
        ],
        resolves_at: None,
    }
}

fn upstream_key_rejected(ws: &str) -> Text {
    Text {
        title: format!("OpenAI rejected the API key used for workspace {ws}"),
        message: "The upstream answered HTTP 401 invalid_api_key: every request of this workspace fails until the key quotawatch sends upstream is fixed.".to_owned(),
        actions: vec![
            "Check OPENAI_API_KEY (or the variable named by the workspace's upstream key setting) in quotawatch's environment.".to_owned(),
            "If the key was revoked or rotated, create a new one at https://platform.openai.com/api-keys and restart quotawatch with it.".to_owned(),
        ],
        resolves_at: None,
    }
}

fn storage_unavailable(error: &str, now: Timestamp) -> Text {
    Text {
        title: "quotawatch cannot write to its database".to_owned(),
        message: format!(
            "Writes to the database have failed since {now}: {error}. Limits are still enforced from memory and pending writes are retried every flush interval; usage counted since then is lost if the process stops before the database recovers."
        ),
        actions: vec![
            "Check free disk space, permissions and locks on the database file, or that the database server is reachable.".to_owned(),
            "Avoid restarting quotawatch until writes succeed again (GET /readyz answers 200 then).".to_owned(),
        ],
        resolves_at: None,
    }
}

fn shared_store_unavailable(error: &str, meanwhile: &str, now: Timestamp) -> Text {
    Text {
        title: "quotawatch cannot reach its shared counters".to_owned(),
        message: format!("Redis has not answered since {now}: {error}. {meanwhile}"),
        actions: vec![
            "Check that Redis is running and reachable from every instance (QUOTAWATCH_REDIS_URL)."
                .to_owned(),
            "Shared counting resumes by itself once Redis answers; no restart is needed."
                .to_owned(),
        ],
        resolves_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_digits_in_threes() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1_234_567), "1,234,567");
    }

    #[test]
    fn every_billing_code_has_concrete_actions() {
        for code in BillingCode::ALL {
            let actions = billing_actions(code);
            assert!(!actions.is_empty());
            assert!(actions.iter().all(|a| a.ends_with('.')), "{code:?}");
        }
        assert!(billing_actions(BillingCode::CreditBalanceExhausted)[0].contains("Add credits"));
    }

    #[test]
    fn a_calendar_quota_kind_is_named_after_its_period_and_read_back() {
        assert_eq!(
            NotificationKind::QuotaExhausted(Period::Day).name(),
            "daily_quota_exhausted"
        );
        assert_eq!(
            NotificationKind::QuotaExhausted(Period::Month).name(),
            "monthly_quota_exhausted"
        );
        for period in Period::ALL {
            let kind = NotificationKind::QuotaExhausted(period);
            assert_eq!(NotificationKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(
            NotificationKind::from_name("rate_limited"),
            Some(NotificationKind::RateLimited)
        );
        assert_eq!(NotificationKind::from_name("weekly_quota"), None);
    }
}
