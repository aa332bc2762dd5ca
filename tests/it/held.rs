//! The engine over Redis with the reservations the proxy holds: a call
//! counts once in history whatever becomes of its settlement (dropped on
//! the way, too late, cut off from Redis, or around a reset), and its
//! history agrees with what Redis charged. Needs `QUOTAWATCH_TEST_REDIS_URL`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use quotawatch::domain::limits::{LimitKind, Limits, Metric, Window, WorkspaceConfig, WorkspaceId};
use quotawatch::domain::time::{Period, Timestamp};
use quotawatch::domain::window::Usage;
use quotawatch::domain::workspace::{Admitted, Request, ResetScope, Settings};
use quotawatch::engine::{
    Clock, Counters, Engine, OnStoreError, SystemClock, TokenUsage, UsageReport, WorkspaceDefaults,
};
use quotawatch::redis::RedisCounters;

use crate::support::eventually;
use crate::support::redis::{Relay, clean, fresh_prefix, server_url};

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
    engine: Arc<Engine>,
    clock: Arc<MovableClock>,
    url: String,
    prefix: String,
    workspace: WorkspaceId,
}

impl Instance {
    fn start(test: &str) -> Option<Self> {
        let url = server_url(test)?;
        Some(Self::start_on(&url, &url))
    }

    /// An instance that reaches Redis through a relay the test can cut.
    async fn start_behind_relay(test: &str) -> Option<(Self, Relay)> {
        let url = server_url(test)?;
        let relay = Relay::start(&url).await;
        Some((Self::start_on(&url, &relay.url), relay))
    }

    /// Counts in Redis at `url`, reached at `reached_at`.
    fn start_on(url: &str, reached_at: &str) -> Self {
        let prefix = fresh_prefix();
        let clock = Arc::new(MovableClock::default());
        let mut limits = Limits::default();
        limits.set(
            LimitKind::new(Metric::Tokens, Window::Minute),
            Some(100_000),
        );
        limits.set(LimitKind::new(Metric::Tokens, Window::Day), Some(1_000_000));
        let defaults = WorkspaceDefaults {
            limits,
            warn_at: 0.8,
        };
        let mut engine = Engine::new(Settings::default(), defaults, clock.clone());
        engine.count_in(Counters::redis(
            Self::counters(reached_at, &prefix),
            OnStoreError::Local { instances: 2 },
        ));
        let workspace: WorkspaceId = "acme".parse().expect("id");
        engine.upsert_workspace(WorkspaceConfig::new(workspace.clone(), limits));
        Self {
            engine: Arc::new(engine),
            clock,
            url: url.to_owned(),
            prefix,
            workspace,
        }
    }

    /// Another instance's view of the same counters.
    fn counters(url: &str, prefix: &str) -> RedisCounters {
        RedisCounters::new(url, prefix, Duration::from_secs(2)).expect("Redis URL")
    }

    /// Admits a proxied call estimated at `tokens`: its reservation is held
    /// here.
    async fn admit_proxied(&self, tokens: u64) -> Admitted {
        self.admit(tokens, false).await
    }

    /// Admits a call the REST API reports, estimated at `tokens`: its
    /// reservation is recorded in Redis, for any instance to settle.
    async fn admit_recorded(&self, tokens: u64) -> Admitted {
        self.admit(tokens, true).await
    }

    async fn admit(&self, tokens: u64, settled_anywhere: bool) -> Admitted {
        let request = Request {
            scoped: Default::default(),
            estimate: Usage::call(tokens),
            model: Some("gpt-4o-mini".into()),
            settled_anywhere,
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
            ..UsageReport::default()
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
            .peek(&self.workspace, chrono_tz::UTC, SystemClock.now(), &[])
            .await
            .expect("peek");
        reply.counters.counts.calendar(Period::Day).1.tokens
    }

    async fn finish(self) {
        clean(&self.url, &self.prefix).await;
    }
}

// Single-threaded on purpose: the batching task that sends the settlement
// cannot run before the caller goes away, so Redis surely keeps the
// estimate the history counts.
#[tokio::test(flavor = "current_thread")]
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
        .reset(
            &instance.workspace,
            chrono_tz::UTC,
            SystemClock.now(),
            ResetScope::All,
        )
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

#[tokio::test(flavor = "current_thread")]
async fn a_recorded_settlement_whose_caller_leaves_still_counts_the_call() {
    let Some(instance) = Instance::start("held::recorded_caller_leaves") else {
        return;
    };
    let admitted = instance.admit_recorded(100).await;
    let settling = instance.engine.settle_to_the_end(
        instance.workspace.clone(),
        Instance::report(&admitted, Some(30)),
    );
    // One poll sends it on its way; then its caller (a client of the REST
    // API) goes away. Redis settles it all the same, and so does history.
    assert!(settling.now_or_never().is_none());
    let history = eventually("the call in history", Duration::from_secs(5), || async {
        Some(instance.history()).filter(|history| *history != (0, 0))
    })
    .await;
    assert_eq!(history, (1, 30));
    assert_eq!(instance.tokens_today_in_redis().await, 30);
    instance.finish().await;
}

#[tokio::test]
async fn a_held_call_admitted_just_after_a_reset_in_redis_is_charged_once() {
    let Some(instance) = Instance::start("held::admitted_after_reset") else {
        return;
    };
    // A reset made here resets Redis, then this instance. An admission in
    // between is charged after the first: the second must leave it be.
    Instance::counters(&instance.url, &instance.prefix)
        .reset(
            &instance.workspace,
            chrono_tz::UTC,
            SystemClock.now(),
            ResetScope::All,
        )
        .await
        .expect("reset in Redis");
    let admitted = instance.admit_proxied(100).await;
    instance
        .engine
        .reset_here(Some(&instance.workspace), ResetScope::All)
        .expect("known workspace");
    instance
        .engine
        .settle(&instance.workspace, Instance::report(&admitted, Some(30)))
        .await
        .expect("known workspace");
    assert_eq!(
        instance.tokens_today_in_redis().await,
        30,
        "its estimate replaced by its count, not kept beside it"
    );
    assert_eq!(instance.history(), (1, 30));
    instance.finish().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_reset_everywhere_clears_the_estimates_held_here() {
    let Some(instance) = Instance::start("held::reset_everywhere") else {
        return;
    };
    let dropped = instance.admit_proxied(100).await;
    let settled = instance.admit_proxied(100).await;
    instance
        .engine
        .reset(Some(&instance.workspace), ResetScope::All)
        .await
        .expect("reset");
    // Dropped on its way, a settlement counts its estimate as it stands
    // after the reset: nothing.
    let settling = instance
        .engine
        .settle(&instance.workspace, Instance::report(&dropped, None));
    assert!(settling.now_or_never().is_none());
    assert_eq!(instance.history(), (1, 0));
    instance
        .engine
        .settle(&instance.workspace, Instance::report(&settled, None))
        .await
        .expect("known workspace");
    assert_eq!(instance.history(), (2, 0));
    assert_eq!(instance.tokens_today_in_redis().await, 0);
    instance.finish().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_held_call_whose_time_runs_out_while_redis_is_cut_off_keeps_its_estimate() {
    let Some((instance, relay)) = Instance::start_behind_relay("held::expired_while_cut_off").await
    else {
        return;
    };
    let admitted = instance.admit_proxied(100).await;
    relay.cut();
    let ttl = Settings::default().reservation_ttl;
    // While the settlement waits for Redis, the reservation's time runs out
    // and the ticker passes its expiry by.
    let (late, ()) = tokio::join!(
        instance
            .engine
            .settle(&instance.workspace, Instance::report(&admitted, Some(300))),
        async {
            instance
                .clock
                .ahead_ms
                .store(ttl.as_millis() as i64 + 1000, Ordering::SeqCst);
            instance.engine.tick();
        }
    );
    let late = late.expect("known workspace");
    assert!(late.missing_reservation, "too late to be settled");
    assert_eq!(instance.history(), (1, 100), "it expired with its estimate");
    // Back in touch, the merge adds nothing beyond the estimate Redis kept.
    relay.restore();
    eventually("Redis back", Duration::from_secs(10), || async {
        instance.engine.tend_counters().await;
        (!instance.engine.degraded()).then_some(())
    })
    .await;
    instance.engine.tend_counters().await;
    assert_eq!(instance.tokens_today_in_redis().await, 100);
    instance.finish().await;
}
