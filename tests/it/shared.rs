//! The Redis script's own rules, called through `RedisCounters` directly:
//! every key expires by itself, billing blocks last beyond the day, and a
//! late lift cannot undo a newer block. Needs `QUOTAWATCH_TEST_REDIS_URL`.

use std::time::Duration;

use quotawatch::domain::limits::{LimitKind, Limits, WorkspaceId};
use quotawatch::domain::time::Timestamp;
use quotawatch::domain::upstream::BillingCode;
use quotawatch::domain::workspace::BillingBlock;
use quotawatch::shared::{AdmitArgs, BillingChange, BlockChange, RedisCounters};

use crate::support::redis::{clean, fresh_prefix, server_url};

struct Store {
    counters: RedisCounters,
    url: String,
    prefix: String,
    workspace: WorkspaceId,
}

impl Store {
    fn open(test: &str) -> Option<Self> {
        let url = server_url(test)?;
        let prefix = fresh_prefix();
        let counters =
            RedisCounters::new(&url, &prefix, Duration::from_secs(2)).expect("Redis URL");
        Some(Self {
            counters,
            url,
            prefix,
            workspace: "acme".parse().expect("id"),
        })
    }

    fn now() -> Timestamp {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock");
        Timestamp::from_millis(since_epoch.as_millis() as i64)
    }

    async fn block(&self, billing: BillingChange) -> Option<BillingBlock> {
        let change = BlockChange {
            hold_until: None,
            billing,
        };
        let reply = self
            .counters
            .block(&self.workspace, chrono_tz::UTC, Self::now(), change)
            .await
            .expect("block");
        reply.counters.billing
    }

    /// Milliseconds until each of the workspace's keys expires.
    async fn lifetimes(&self) -> Vec<(String, i64)> {
        let client = redis::Client::open(self.url.as_str()).expect("url");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut connection)
            .await
            .expect("KEYS");
        let mut lifetimes = Vec::new();
        for key in keys {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .expect("PTTL");
            lifetimes.push((key, ttl));
        }
        lifetimes.sort();
        lifetimes
    }

    async fn finish(self) {
        clean(&self.url, &self.prefix).await;
    }
}

fn billing(since: Timestamp) -> BillingBlock {
    BillingBlock {
        code: BillingCode::CreditBalanceExhausted,
        since,
        next_probe_at: Timestamp::from_millis(since.millis() + 60_000),
    }
}

#[tokio::test]
async fn every_key_expires_by_itself_and_a_billing_block_outlives_the_day() {
    let Some(store) = Store::open("shared::expiry") else {
        return;
    };
    let mut limits = Limits::default();
    limits.set(LimitKind::RequestsPerMinute, Some(10));
    let args = AdmitArgs {
        limits: &limits,
        tokens: 5,
        reservation: 7,
        reservation_ttl: Duration::from_secs(600),
        probe_interval: Duration::from_secs(60),
        model: Some("gpt-4o-mini"),
    };
    let (admitted, _) = store
        .counters
        .admit(&store.workspace, chrono_tz::UTC, Store::now(), args)
        .await
        .expect("admit");
    assert!(admitted.is_some());
    let lifetimes = store.lifetimes().await;
    assert_eq!(
        lifetimes.len(),
        3,
        "state, reservations, expiry: {lifetimes:?}"
    );
    let day = 86_400_000;
    for (key, ttl) in &lifetimes {
        assert!(*ttl > 0 && *ttl <= 2 * day, "{key} lives {ttl} ms");
    }

    store.block(BillingChange::Set(billing(Store::now()))).await;
    let state = store
        .lifetimes()
        .await
        .into_iter()
        .find(|(key, _)| key.ends_with(":state"))
        .expect("state key");
    assert!(state.1 > 29 * day, "a billing block lives {} ms", state.1);
    store.finish().await;
}

#[tokio::test]
async fn a_late_lift_does_not_undo_a_newer_billing_block() {
    let Some(store) = Store::open("shared::late_lift") else {
        return;
    };
    let first = Store::now();
    let newer = Timestamp::from_millis(first.millis() + 5_000);
    store.block(BillingChange::Set(billing(first))).await;
    // Another instance's probe succeeded and lifted the first block, then a
    // new one began.
    assert_eq!(
        store.block(BillingChange::Lift { since: first }).await,
        None
    );
    store.block(BillingChange::Set(billing(newer))).await;
    // An instance that still saw the first block lifts it late: no effect.
    let after_late_lift = store.block(BillingChange::Lift { since: first }).await;
    assert_eq!(after_late_lift.map(|block| block.since), Some(newer));
    assert_eq!(
        store.block(BillingChange::Lift { since: newer }).await,
        None
    );
    store.finish().await;
}
