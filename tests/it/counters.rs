//! The counters' conformance: each rule runs against the engine with its
//! counters in this process and with its counters in Redis, chosen as the
//! assembly chooses them (`Engine::count_in`), and through the one path of
//! each operation (`admit`, `settle`, `reset`). `tests/it/conformance.rs`
//! runs the same kind of rules through the REST API and the proxy. Redis
//! needs `QUOTAWATCH_TEST_REDIS_URL`; each check uses a key prefix of its
//! own.

use std::sync::Arc;
use std::time::Duration;

use quotawatch::domain::limits::{LimitKind, Limits, WorkspaceConfig, WorkspaceId};
use quotawatch::domain::limits::{
    Metric, REQUESTS_PER_DAY, REQUESTS_PER_MINUTE, TOKENS_PER_DAY, TOKENS_PER_MINUTE,
    TOKENS_PER_MONTH, USD_PER_DAY,
};
use quotawatch::domain::time::Period;
use quotawatch::domain::window::Usage;
use quotawatch::domain::workspace::{Refusal, RefusalCause, Request, ResetScope, Settings};
use quotawatch::engine::{
    Counters, Engine, OnStoreError, SystemClock, TokenUsage, UsageReport, WorkspaceDefaults,
};
use quotawatch::redis::RedisCounters;

use crate::conformance::conformance;

use crate::support::redis::{clean, fresh_prefix, server_url};

#[derive(Clone, Copy, Debug)]
enum Backend {
    /// In this process.
    Local,
    Redis,
}

/// An engine counting on one backend, with one workspace of `limits`.
struct Setup {
    engine: Arc<Engine>,
    workspace: WorkspaceId,
    redis: Option<(String, String)>,
}

impl Setup {
    fn start(backend: Backend, test: &str, limits: &[(LimitKind, u64)]) -> Option<Self> {
        let mut all = Limits::default();
        for &(kind, max) in limits {
            all.set(kind, Some(max));
        }
        let defaults = WorkspaceDefaults {
            limits: all,
            warn_at: 0.8,
        };
        let mut engine = Engine::new(Settings::default(), defaults, Arc::new(SystemClock));
        let redis = match backend {
            Backend::Local => None,
            Backend::Redis => {
                let url = server_url(test)?;
                let prefix = fresh_prefix();
                let client =
                    RedisCounters::new(&url, &prefix, Duration::from_secs(2)).expect("Redis URL");
                engine.count_in(Counters::redis(client, OnStoreError::Closed));
                Some((url, prefix))
            }
        };
        let workspace: WorkspaceId = "acme".parse().expect("id");
        engine.upsert_workspace(WorkspaceConfig::new(workspace.clone(), all));
        Some(Self {
            engine: Arc::new(engine),
            workspace,
            redis,
        })
    }

    async fn admit(&self, tokens: u64) -> Result<u64, Refusal> {
        self.admit_usage(Usage::call(tokens)).await
    }

    async fn admit_usage(&self, estimate: Usage) -> Result<u64, Refusal> {
        let request = Request {
            scoped: Default::default(),
            estimate,
            model: Some("gpt-4o-mini".into()),
            settled_anywhere: true,
        };
        let decision = self
            .engine
            .admit(&self.workspace, request)
            .await
            .expect("known workspace");
        decision.result.map(|admitted| admitted.id)
    }

    async fn settle(&self, reservation: Option<u64>, tokens: u64) -> bool {
        let completion = TokenUsage {
            completion: tokens,
            ..TokenUsage::default()
        };
        self.settle_tokens(reservation, completion).await
    }

    async fn settle_tokens(&self, reservation: Option<u64>, tokens: TokenUsage) -> bool {
        let report = UsageReport {
            reservation,
            model: Some("gpt-4o-mini".into()),
            tokens: Some(tokens),
            answer: None,
            latency_ms: None,
            ..UsageReport::default()
        };
        let reported = self
            .engine
            .settle(&self.workspace, report)
            .await
            .expect("known workspace");
        !reported.missing_reservation
    }

    /// What `kind` counts now, as the status shows it.
    async fn used(&self, kind: LimitKind) -> u64 {
        self.engine.refresh(&self.workspace).await.expect("known");
        let snapshot = self.engine.snapshot(&self.workspace).expect("known");
        snapshot
            .limits
            .iter()
            .find(|(limit, _)| *limit == kind)
            .map(|(_, facts)| facts.used)
            .expect("the limit is set")
    }

    async fn finish(self) {
        if let Some((url, prefix)) = self.redis {
            clean(&url, &prefix).await;
        }
    }
}

conformance!(an_admission_charges_every_limit_or_none);
async fn an_admission_charges_every_limit_or_none(backend: Backend, test: &str) {
    let limits = [(REQUESTS_PER_MINUTE, 10), (TOKENS_PER_MINUTE, 100)];
    let Some(setup) = Setup::start(backend, test, &limits) else {
        return;
    };
    setup.admit(60).await.expect("room for 60 tokens");
    let refusal = setup.admit(60).await.expect_err("no room for 60 more");
    assert_eq!(refusal.cause, RefusalCause::Limit(TOKENS_PER_MINUTE));
    assert!(refusal.retryable);
    assert_eq!(
        (
            setup.used(REQUESTS_PER_MINUTE).await,
            setup.used(TOKENS_PER_MINUTE).await
        ),
        (1, 60),
        "the refused request charged nothing"
    );
    let too_large = setup.admit(101).await.expect_err("larger than the limit");
    assert_eq!(
        (too_large.cause, too_large.retryable),
        (RefusalCause::TooLarge(TOKENS_PER_MINUTE), false)
    );
    setup.finish().await;
}

conformance!(a_settlement_replaces_the_estimate_once);
async fn a_settlement_replaces_the_estimate_once(backend: Backend, test: &str) {
    let limits = [(TOKENS_PER_DAY, 1000)];
    let Some(setup) = Setup::start(backend, test, &limits) else {
        return;
    };
    let reservation = setup.admit(100).await.expect("admitted");
    assert_eq!(setup.used(TOKENS_PER_DAY).await, 100);
    assert!(setup.settle(Some(reservation), 30).await, "settled");
    assert_eq!(setup.used(TOKENS_PER_DAY).await, 30);
    assert!(
        !setup.settle(Some(reservation), 500).await,
        "a second settlement finds nothing"
    );
    assert_eq!(setup.used(TOKENS_PER_DAY).await, 30);
    setup.finish().await;
}

conformance!(a_call_without_reservation_counts_even_beyond_the_limits);
async fn a_call_without_reservation_counts_even_beyond_the_limits(backend: Backend, test: &str) {
    let limits = [(REQUESTS_PER_DAY, 1)];
    let Some(setup) = Setup::start(backend, test, &limits) else {
        return;
    };
    setup.admit(0).await.expect("the one request");
    assert!(setup.settle(None, 5).await);
    assert_eq!(setup.used(REQUESTS_PER_DAY).await, 2);
    let refusal = setup.admit(0).await.expect_err("the day is used up");
    assert_eq!(
        (refusal.cause, refusal.retryable),
        (RefusalCause::Limit(REQUESTS_PER_DAY), false)
    );
    setup.finish().await;
}

conformance!(a_reset_clears_the_counts_and_admits_again);
async fn a_reset_clears_the_counts_and_admits_again(backend: Backend, test: &str) {
    let limits = [(REQUESTS_PER_MINUTE, 2)];
    let Some(setup) = Setup::start(backend, test, &limits) else {
        return;
    };
    setup.admit(0).await.expect("first");
    setup.admit(0).await.expect("second");
    setup.admit(0).await.expect_err("the minute is used up");
    let reset = setup
        .engine
        .reset(Some(&setup.workspace), ResetScope::Usage)
        .await
        .expect("reset");
    assert_eq!(reset, vec![setup.workspace.clone()]);
    assert_eq!(setup.used(REQUESTS_PER_MINUTE).await, 0);
    setup.admit(0).await.expect("admitted after the reset");
    setup.finish().await;
}

conformance!(a_month_limit_refuses_until_the_month_ends_and_settles_in_it);
async fn a_month_limit_refuses_until_the_month_ends_and_settles_in_it(
    backend: Backend,
    test: &str,
) {
    let limits = [(TOKENS_PER_MONTH, 100), (TOKENS_PER_DAY, 1000)];
    let Some(setup) = Setup::start(backend, test, &limits) else {
        return;
    };
    let reservation = setup.admit(60).await.expect("room for 60 tokens");
    let refusal = setup.admit(60).await.expect_err("no room for 60 more");
    let (_, month_end) = Period::Month.bounds(setup.engine.now(), chrono_tz::UTC);
    assert_eq!(
        (refusal.cause, refusal.retryable, refusal.retry_at),
        (
            RefusalCause::Limit(TOKENS_PER_MONTH),
            false,
            Some(month_end)
        )
    );
    assert!(setup.settle(Some(reservation), 10).await, "settled");
    assert_eq!(setup.used(TOKENS_PER_MONTH).await, 10);
    setup.admit(60).await.expect("room again");
    assert_eq!(
        (
            setup.used(TOKENS_PER_MONTH).await,
            setup.used(TOKENS_PER_DAY).await
        ),
        (70, 70)
    );
    setup
        .engine
        .reset(Some(&setup.workspace), ResetScope::Usage)
        .await
        .expect("reset");
    assert_eq!(setup.used(TOKENS_PER_MONTH).await, 0);
    setup.finish().await;
}

/// A call's estimate with its cost in nano-dollars.
fn costing(tokens: u64, nano_usd: u64) -> Usage {
    Usage::call(tokens).with(Metric::Usd, nano_usd)
}

conformance!(a_usd_limit_is_charged_with_the_others_or_not_at_all);
async fn a_usd_limit_is_charged_with_the_others_or_not_at_all(backend: Backend, test: &str) {
    // A budget of a tenth of a cent, in nano-dollars.
    let limits = [(USD_PER_DAY, 1_000_000), (TOKENS_PER_DAY, 5_000)];
    let Some(setup) = Setup::start(backend, test, &limits) else {
        return;
    };
    setup
        .admit_usage(costing(4_000, 600_000))
        .await
        .expect("room in both");
    let over_budget = setup
        .admit_usage(costing(1_000, 600_000))
        .await
        .expect_err("the tokens fit, the cost does not");
    let (_, day_end) = Period::Day.bounds(setup.engine.now(), chrono_tz::UTC);
    assert_eq!(
        (
            over_budget.cause,
            over_budget.retryable,
            over_budget.retry_at
        ),
        (RefusalCause::Limit(USD_PER_DAY), false, Some(day_end))
    );
    let over_tokens = setup
        .admit_usage(costing(1_500, 100_000))
        .await
        .expect_err("the cost fits, the tokens do not");
    assert_eq!(over_tokens.cause, RefusalCause::Limit(TOKENS_PER_DAY));
    assert_eq!(
        (
            setup.used(USD_PER_DAY).await,
            setup.used(TOKENS_PER_DAY).await
        ),
        (600_000, 4_000),
        "neither refusal charged anything"
    );
    setup
        .admit_usage(costing(1_000, 400_000))
        .await
        .expect("exactly the rest of both");
    assert_eq!(setup.used(USD_PER_DAY).await, 1_000_000);
    setup.finish().await;
}

conformance!(a_settlement_replaces_the_estimated_cost_with_the_exact_cost);
async fn a_settlement_replaces_the_estimated_cost_with_the_exact_cost(
    backend: Backend,
    test: &str,
) {
    let limits = [(USD_PER_DAY, 1_000_000_000)];
    let Some(setup) = Setup::start(backend, test, &limits) else {
        return;
    };
    let reservation = setup
        .admit_usage(costing(1_500, 1_500_000))
        .await
        .expect("admitted");
    assert_eq!(setup.used(USD_PER_DAY).await, 1_500_000);
    // gpt-4o-mini: 600 uncached prompt tokens at $0.15/M, 400 cached at
    // $0.075/M and 500 completion tokens at $0.60/M: $0.00042.
    let used = TokenUsage {
        prompt: 1_000,
        cached: 400,
        completion: 500,
        reasoning: 0,
    };
    assert!(
        setup.settle_tokens(Some(reservation), used).await,
        "settled"
    );
    assert_eq!(setup.used(USD_PER_DAY).await, 420_000);
    assert!(
        !setup.settle_tokens(Some(reservation), used).await,
        "a second settlement finds nothing"
    );
    assert_eq!(setup.used(USD_PER_DAY).await, 420_000);
    setup.finish().await;
}
