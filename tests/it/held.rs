//! The engine over Redis with the reservations the proxy holds: a call
//! counts once in history whatever becomes of its settlement (dropped on
//! the way, too late, or after a reset made by another instance), and its
//! history agrees with what Redis charged. Needs `QUOTAWATCH_TEST_REDIS_URL`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use quotawatch::domain::limits::{LimitKind, Limits, OnStoreError, WorkspaceConfig, WorkspaceId};
use quotawatch::domain::time::Timestamp;
use quotawatch::domain::workspace::{Admitted, Request, Settings};
use quotawatch::engine::{
    Clock, Engine, SharedCounting, SystemClock, TokenUsage, UsageReport, WorkspaceDefaults,
};
use quotawatch::shared::RedisCounters;

use crate::support::redis::{clean, fresh_prefix, server_url};

/// The system clock, moved on by `ahead_ms`: lets a test reach a
/// reservation's expiry without waiting for it.
#[derive(Default)]
struct MovableClock {
    ahead_ms: AtomicI64,
}

impl Clock for MovableClock {
    fn now(&self) -> Timestamp {
        let now = SystemClock.now();
        Timestamp::from_millis(now.millis() + self.ahead_ms.load(Ordering::SeqCst))
    }
}

struct Instance {
    engine: Engine,
    clock: Arc<MovableClock>,
    url: String,
    prefix: String,
    workspace: WorkspaceId,
}

impl Instance {
    fn start(test: &str) -> Option<Self> {
        let url = server_url(test)?;
        let prefix = fresh_prefix();
        let clock = Arc::new(MovableClock::default());
        let mut limits = Limits::default();
        limits.set(LimitKind::TokensPerMinute, Some(100_000));
        limits.set(LimitKind::TokensPerDay, Some(1_000_000));
        let defaults = WorkspaceDefaults {
            limits,
            warn_at: 0.8,
        };
        let mut engine = Engine::new(Settings::default(), defaults, clock.clone());
        engine.share_counters(SharedCounting::new(
            Self::counters(&url, &prefix),
            OnStoreError::Local { instances: 2 },
        ));
        let workspace: WorkspaceId = "acme".parse().expect("id");
        engine.upsert_workspace(WorkspaceConfig::new(workspace.clone(), limits));
        Some(Self {
            engine,
            clock,
            url,
            prefix,
            workspace,
        })
    }

    /// Another instance's view of the same counters.
    fn counters(url: &str, prefix: &str) -> RedisCounters {
        RedisCounters::new(url, prefix, Duration::from_secs(2)).expect("Redis URL")
    }

    /// Admits a proxied call estimated at `tokens`: its reservation is held
    /// here.
    async fn admit_proxied(&self, tokens: u64) -> Admitted {
        let request = Request {
            estimated_tokens: tokens,
            model: Some("gpt-4o-mini".into()),
            settled_anywhere: false,
        };
        let decision = self
            .engine
            .admit(&self.workspace, request)
            .await
            .expect("known workspace");
        decision.result.expect("admitted")
    }

    fn report(admitted: &Admitted, tokens: Option<u64>) -> UsageReport {
        UsageReport {
            reservation: Some(admitted.id),
            model: Some("gpt-4o-mini".into()),
            tokens: tokens.map(|completion| TokenUsage {
                completion,
                ..TokenUsage::default()
            }),
            answer: None,
            latency_ms: None,
        }
    }

    /// Requests and tokens of the history not yet written.
    fn history(&self) -> (i64, i64) {
        let rollups = self
            .engine
            .unflushed_rollups(&self.workspace)
            .expect("known workspace");
        rollups
            .iter()
            .fold((0, 0), |(requests, tokens), (_, delta)| {
                (requests + delta.requests, tokens + delta.tokens)
            })
    }

    /// Today's tokens as Redis counts them.
    async fn tokens_today_in_redis(&self) -> u64 {
        let reply = Self::counters(&self.url, &self.prefix)
            .peek(&self.workspace, chrono_tz::UTC, SystemClock.now())
            .await
            .expect("peek");
        reply.counters.day_used.tokens
    }

    async fn finish(self) {
        clean(&self.url, &self.prefix).await;
    }
}

#[tokio::test]
async fn a_settlement_dropped_on_its_way_to_redis_still_counts_the_call() {
    let Some(instance) = Instance::start("held::dropped") else {
        return;
    };
    let admitted = instance.admit_proxied(100).await;
    let settling = instance
        .engine
        .settle(&instance.workspace, Instance::report(&admitted, Some(30)));
    // One poll sends it on its way; then its caller goes away.
    assert!(
        settling.now_or_never().is_none(),
        "the settlement waits for Redis"
    );
    assert_eq!(
        instance.history(),
        (1, 100),
        "counted once, with its estimate, as an expired reservation is"
    );
    // It is not settled again, and Redis keeps the estimate the history
    // counts.
    let again = instance
        .engine
        .settle(&instance.workspace, Instance::report(&admitted, Some(30)))
        .await
        .expect("known workspace");
    assert!(again.missing_reservation);
    assert_eq!(instance.tokens_today_in_redis().await, 100);
    instance.finish().await;
}

#[tokio::test]
async fn a_held_reservation_settled_after_its_time_keeps_its_estimate() {
    let Some(instance) = Instance::start("held::late") else {
        return;
    };
    let admitted = instance.admit_proxied(100).await;
    let ttl = Settings::default().reservation_ttl;
    instance
        .clock
        .ahead_ms
        .store(ttl.as_millis() as i64 + 1000, Ordering::SeqCst);
    let late = instance
        .engine
        .settle(&instance.workspace, Instance::report(&admitted, Some(30)))
        .await
        .expect("known workspace");
    assert!(
        late.missing_reservation,
        "too late, as for a reservation charged here"
    );
    assert_eq!(
        instance.tokens_today_in_redis().await,
        100,
        "the estimate stays charged"
    );
    instance.engine.tick();
    assert_eq!(instance.history(), (1, 100), "it expired with its estimate");
    instance.finish().await;
}

#[tokio::test]
async fn a_held_call_settled_without_a_count_after_a_reset_elsewhere_counts_nothing() {
    let Some(instance) = Instance::start("held::reset_elsewhere") else {
        return;
    };
    let admitted = instance.admit_proxied(100).await;
    Instance::counters(&instance.url, &instance.prefix)
        .reset(&instance.workspace, chrono_tz::UTC, SystemClock.now())
        .await
        .expect("reset by another instance");
    instance
        .engine
        .settle(&instance.workspace, Instance::report(&admitted, None))
        .await
        .expect("known workspace");
    assert_eq!(
        instance.tokens_today_in_redis().await,
        0,
        "the reset cleared its estimate"
    );
    assert_eq!(
        instance.history(),
        (1, 0),
        "history counts what Redis charged"
    );
    instance.finish().await;
}
