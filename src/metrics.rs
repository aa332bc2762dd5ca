//! Prometheus metrics, served at `GET /metrics`.
//!
//! Label values stay bounded: workspaces are those of the catalog (a caller
//! can only name its own), models are those listed in
//! `QUOTAWATCH_METRICS_MODELS` and everything else is `other`; every other
//! label takes a fixed set of values. Gauges that describe current state
//! (status, utilisation, upstream headroom) are computed from the engine at
//! scrape time, so they are never stale and vanish with their workspace.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::domain::limits::{Metric, WorkspaceId};
use crate::domain::price::dollars;
use crate::domain::status::Status;
use crate::domain::upstream::UpstreamClass;
use crate::domain::workspace::RefusalCause;
use crate::engine::{Engine, TokenUsage};

/// A workspace label is the id itself, which is stored inline: building the
/// labels of a call's series then allocates nothing.
impl EncodeLabelValue for WorkspaceId {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    workspace: WorkspaceId,
    endpoint: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    workspace: WorkspaceId,
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    workspace: WorkspaceId,
    model: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    workspace: WorkspaceId,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkspaceLabels {
    workspace: WorkspaceId,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    workspace: WorkspaceId,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    workspace: WorkspaceId,
    bucket: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    channel_type: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// Where quotawatch's own time is spent, for the overhead histogram.
#[derive(Clone, Copy, Debug)]
pub enum Phase {
    /// From the request's arrival to the upstream call.
    Request = 0,
    /// From the upstream's response headers to ours.
    Response = 1,
}

fn phase_labels(phase: Phase) -> PhaseLabels {
    let phase = match phase {
        Phase::Request => "request",
        Phase::Response => "response",
    };
    PhaseLabels { phase }
}

/// How a proxied request ended, as counted in `quotawatch_requests_total`.
#[derive(Clone, Copy, Debug)]
pub enum RequestOutcome {
    /// Refused locally, without reaching the upstream.
    Refused,
    /// The upstream answered; by class.
    Upstream(UpstreamClass),
    /// The upstream could not be reached, did not answer in time, or broke
    /// off its answer.
    UpstreamFailed,
    /// The client left before the upstream answered.
    Abandoned,
}

impl RequestOutcome {
    fn label(self) -> &'static str {
        match self {
            RequestOutcome::Refused => "refused",
            RequestOutcome::Abandoned => "abandoned",
            RequestOutcome::Upstream(class) => class_label(class),
            RequestOutcome::UpstreamFailed => "upstream_failed",
        }
    }

    /// Whether the outcome counts in `quotawatch_upstream_errors_total`.
    fn is_upstream_error(self) -> bool {
        match self {
            RequestOutcome::Upstream(class) => class != UpstreamClass::Success,
            RequestOutcome::UpstreamFailed => true,
            RequestOutcome::Refused | RequestOutcome::Abandoned => false,
        }
    }
}

fn class_label(class: UpstreamClass) -> &'static str {
    match class {
        UpstreamClass::Success => "success",
        UpstreamClass::RateLimited => "rate_limited",
        UpstreamClass::RequestTooLarge => "request_too_large",
        UpstreamClass::QuotaExhausted(_) => "insufficient_quota",
        UpstreamClass::ServerError => "server_error",
        UpstreamClass::KeyRejected => "key_rejected",
        UpstreamClass::ClientError => "client_error",
    }
}

fn refusal_label(cause: RefusalCause) -> &'static str {
    match cause {
        RefusalCause::Limit(kind) | RefusalCause::TooLarge(kind) => kind.name(),
        RefusalCause::UpstreamRateLimited => "upstream_rate_limited",
        RefusalCause::UpstreamQuota(_) => "upstream_quota",
    }
}

/// From 50 µs to about 3 s: quotawatch's own time is small, but the tail
/// matters.
fn overhead_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<ModelLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    refusals: Family<RefusalLabels, Counter>,
    upstream_errors: Family<ClassLabels, Counter>,
    status: Family<WorkspaceLabels, Gauge>,
    utilization: Family<LimitLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    budget: Family<LimitLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    budget_spent: Family<LimitLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    upstream_remaining: Family<UpstreamLabels, Gauge>,
    /// The overhead histogram's two series, made with the family, so that
    /// observing is not a look-up by label on every call.
    overhead: [Histogram; 2],
    upstream_latency: Histogram,
    shared_store_degraded: Gauge,
    shared_store_errors: Counter,
    key_lookups: Counter,
    store_rows_dropped: Counter,
    alert_attempts: Family<AlertLabels, Counter>,
    alerts_pending: Gauge,
    /// The models counted apart, each label shared by all its series.
    models: HashSet<Arc<str>>,
    other: Arc<str>,
    /// Rendering clears and refills the state gauges; two scrapes at once
    /// would each see the other's half-filled families.
    rendering: Mutex<()>,
}

impl Metrics {
    pub fn new(models: &[String]) -> Self {
        let mut registry = Registry::with_prefix("quotawatch");
        let requests = Family::default();
        let tokens = Family::default();
        let cost = Family::default();
        let refusals = Family::default();
        let upstream_errors = Family::default();
        let status = Family::default();
        let utilization = Family::default();
        let budget = Family::default();
        let budget_spent = Family::default();
        let upstream_remaining = Family::default();
        let overhead: Family<PhaseLabels, Histogram> =
            Family::new_with_constructor(overhead_histogram);
        let upstream_latency = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        let shared_store_degraded = Gauge::default();
        let shared_store_errors = Counter::default();
        let key_lookups = Counter::default();
        let store_rows_dropped = Counter::default();
        let alert_attempts = Family::default();
        let alerts_pending = Gauge::default();
        registry.register(
            "alert_delivery_attempts",
            "Attempts to deliver alerts, by channel type (webhook, slack) and outcome (delivered, retry, gave_up)",
            alert_attempts.clone(),
        );
        registry.register(
            "alert_deliveries_pending",
            "Alert deliveries waiting to be sent or retried, as the last dispatcher pass of this instance counted them",
            alerts_pending.clone(),
        );
        registry.register(
            "store_rows_dropped",
            "Rows the database refused while it accepted the rest of their batch, dropped so that the rest could be written (each is logged with its workspace)",
            store_rows_dropped.clone(),
        );
        registry.register(
            "shared_store_degraded",
            "1 while this instance cannot reach the shared counters (Redis) and enforces limits on its own",
            shared_store_degraded.clone(),
        );
        registry.register(
            "shared_store_errors",
            "Calls to the shared counters (Redis) that failed or timed out",
            shared_store_errors.clone(),
        );
        registry.register(
            "key_lookups",
            "Keys this instance did not know, looked up in the database (at most a few a second)",
            key_lookups.clone(),
        );
        registry.register(
            "requests",
            "Proxied requests by workspace, endpoint and outcome",
            requests.clone(),
        );
        registry.register(
            "tokens",
            "Tokens used, by workspace, model and kind (prompt, completion, cached, reasoning)",
            tokens.clone(),
        );
        registry.register(
            "cost_usd",
            "What calls cost in dollars, by workspace and model, as budgets count it (each call rounded up to a whole nano-dollar)",
            cost.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused locally, by workspace and limit",
            refusals.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream errors by class (upstream_failed: no answer, a timeout, or a broken body)",
            upstream_errors.clone(),
        );
        registry.register(
            "workspace_status",
            "Status per workspace: 0 normal, 1 warning, 2 rate_limited, 3 quota_exceeded",
            status.clone(),
        );
        registry.register(
            "limit_utilization",
            "Used share of each configured limit, budgets (usd limits) included",
            utilization.clone(),
        );
        registry.register(
            "budget_usd",
            "Each budget (usd limit) in dollars, by workspace and limit",
            budget.clone(),
        );
        registry.register(
            "budget_spent_usd",
            "What each budget's window (the sliding minute, today, this month) has spent in dollars, as the budget counts it",
            budget_spent.clone(),
        );
        registry.register(
            "upstream_remaining",
            "What the upstream last reported as remaining, by bucket (requests, tokens)",
            upstream_remaining.clone(),
        );
        registry.register("overhead_seconds", "Time quotawatch adds to a proxied request, by phase (request: arrival to upstream call; response: upstream headers to ours)", overhead.clone());
        registry.register(
            "upstream_latency_seconds",
            "Time from the upstream call to its response headers",
            upstream_latency.clone(),
        );
        Self {
            registry,
            requests,
            tokens,
            cost,
            refusals,
            upstream_errors,
            status,
            utilization,
            budget,
            budget_spent,
            upstream_remaining,
            overhead: [Phase::Request, Phase::Response]
                .map(|phase| overhead.get_or_create(&phase_labels(phase)).clone()),
            upstream_latency,
            shared_store_degraded,
            shared_store_errors,
            key_lookups,
            store_rows_dropped,
            alert_attempts,
            alerts_pending,
            models: models
                .iter()
                .map(|model| Arc::from(model.as_str()))
                .collect(),
            other: Arc::from("other"),
            rendering: Mutex::new(()),
        }
    }

    /// Counts one attempt to deliver an alert.
    pub fn count_alert_attempt(&self, channel_type: &'static str, outcome: &'static str) {
        self.alert_attempts
            .get_or_create(&AlertLabels {
                channel_type,
                outcome,
            })
            .inc();
    }

    /// Sets how many alert deliveries wait.
    pub fn set_alerts_pending(&self, pending: i64) {
        self.alerts_pending.set(pending);
    }

    fn model_label(&self, model: Option<&str>) -> Arc<str> {
        model
            .and_then(|model| self.models.get(model))
            .unwrap_or(&self.other)
            .clone()
    }

    pub fn request(
        &self,
        workspace: &WorkspaceId,
        endpoint: &'static str,
        outcome: RequestOutcome,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                workspace: workspace.clone(),
                endpoint,
                outcome: outcome.label(),
            })
            .inc();
        if outcome.is_upstream_error() {
            self.upstream_errors
                .get_or_create(&ClassLabels {
                    class: outcome.label(),
                })
                .inc();
        }
    }

    pub fn refusal(&self, workspace: &WorkspaceId, cause: RefusalCause) {
        self.refusals
            .get_or_create(&RefusalLabels {
                workspace: workspace.clone(),
                limit: refusal_label(cause),
            })
            .inc();
    }

    pub fn tokens(&self, workspace: &WorkspaceId, model: Option<&str>, usage: TokenUsage) {
        let model = self.model_label(model);
        for (kind, count) in [
            ("prompt", usage.prompt),
            ("completion", usage.completion),
            ("cached", usage.cached),
            ("reasoning", usage.reasoning),
        ] {
            if count > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        workspace: workspace.clone(),
                        model: model.clone(),
                        kind,
                    })
                    .inc_by(count);
            }
        }
    }

    /// Counts what a call cost, `nano_usd` nano-dollars, under its model.
    pub fn cost(&self, workspace: &WorkspaceId, model: Option<&str>, nano_usd: u64) {
        if nano_usd > 0 {
            self.cost
                .get_or_create(&ModelLabels {
                    workspace: workspace.clone(),
                    model: self.model_label(model),
                })
                .inc_by(dollars(nano_usd));
        }
    }

    pub fn overhead(&self, phase: Phase, took: Duration) {
        self.overhead[phase as usize].observe(took.as_secs_f64());
    }

    pub fn upstream_latency(&self, took: Duration) {
        self.upstream_latency.observe(took.as_secs_f64());
    }

    /// The metrics in OpenMetrics text, with state gauges taken from `engine`
    /// now.
    pub fn render(&self, engine: &Engine) -> String {
        let _rendering = crate::sync::lock(&self.rendering);
        self.status.clear();
        self.utilization.clear();
        self.budget.clear();
        self.budget_spent.clear();
        self.upstream_remaining.clear();
        for snapshot in engine.snapshots() {
            let workspace = &snapshot.config.id;
            let level = match snapshot.status {
                Status::Normal => 0,
                Status::Warning => 1,
                Status::RateLimited => 2,
                Status::QuotaExceeded => 3,
            };
            self.status
                .get_or_create(&WorkspaceLabels {
                    workspace: workspace.clone(),
                })
                .set(level);
            for (kind, facts) in &snapshot.limits {
                let labels = LimitLabels {
                    workspace: workspace.clone(),
                    limit: kind.name(),
                };
                self.utilization
                    .get_or_create(&labels)
                    .set(facts.utilization());
                if kind.metric == Metric::Usd {
                    self.budget.get_or_create(&labels).set(dollars(facts.max));
                    self.budget_spent
                        .get_or_create(&labels)
                        .set(dollars(facts.used));
                }
            }
            let buckets = snapshot
                .upstream
                .map(|view| [("requests", view.requests), ("tokens", view.tokens)]);
            for (bucket, state) in buckets.into_iter().flatten() {
                if let Some(remaining) = state.and_then(|state| state.remaining) {
                    self.upstream_remaining
                        .get_or_create(&UpstreamLabels {
                            workspace: workspace.clone(),
                            bucket,
                        })
                        .set(i64::try_from(remaining).unwrap_or(i64::MAX));
                }
            }
        }
        self.shared_store_degraded.set(i64::from(engine.degraded()));
        let errors = engine.shared_store_errors();
        self.shared_store_errors
            .inc_by(errors.saturating_sub(self.shared_store_errors.get()));
        let lookups = engine.key_lookups();
        self.key_lookups
            .inc_by(lookups.saturating_sub(self.key_lookups.get()));
        self.store_rows_dropped.inc_by(
            engine
                .dropped_rows()
                .saturating_sub(self.store_rows_dropped.get()),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
