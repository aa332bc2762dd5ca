//! Storage conformance: every check runs against SQLite and PostgreSQL, so
//! both backends behave the same. PostgreSQL checks need
//! `QUOTAWATCH_TEST_DATABASE_URL`; each gets a fresh database.

use std::future::Future;
use std::time::Duration;

use quotawatch::domain::limits::{LimitKind, Limits, Metric, Window, WorkspaceConfig, WorkspaceId};
use quotawatch::domain::notification::{
    Crossing, Notification, NotificationKind, Severity, TenantText,
};
use quotawatch::domain::status::{Cause, Status};
use quotawatch::domain::threshold::{AlertThresholds, Fired, Percents};
use quotawatch::domain::time::Period;
use quotawatch::domain::time::Timestamp;
use quotawatch::domain::window::{CalendarCounter, Usage};
use quotawatch::domain::workspace::{Reservation, Saved};
use quotawatch::keys::{KeyGrant, PlainKey, Scopes};
use quotawatch::store::{Batch, KeyRecord, Resolution, RollupDelta, RollupKey, Store, StoreError};
use serde_json::json;

use crate::support::postgres::TestDatabase;
use crate::support::{ADMIN_KEY, TestServer, eventually};

async fn on_sqlite<F, Fut>(check: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = Store::open(&url).await.expect("open SQLite");
    check(store.clone()).await;
    store.close().await;
}

async fn on_postgres<F, Fut>(test: &str, check: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(database) = TestDatabase::create(test).await else {
        return;
    };
    let store = Store::open(&database.url).await.expect("open PostgreSQL");
    check(store.clone()).await;
    store.close().await;
    database.drop_database().await;
}

/// Runs one conformance check against each backend.
macro_rules! conformance {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::on_sqlite(super::$name).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::on_postgres(concat!("store::", stringify!($name)), super::$name).await;
            }
        }
    };
}

fn id(name: &str) -> WorkspaceId {
    name.parse().expect("valid id")
}

fn workspace(name: &str) -> WorkspaceConfig {
    let mut limits = Limits::default();
    limits.set(LimitKind::new(Metric::Requests, Window::Minute), Some(60));
    limits.set(
        LimitKind::new(Metric::Tokens, Window::Day),
        Some(u64::from(u32::MAX) * 4),
    );
    let mut config = WorkspaceConfig::new(id(name), limits);
    config.name = format!("Workspace {name}");
    config.timezone = "America/Sao_Paulo".parse().expect("zone");
    config.warn_at = 0.75;
    config
}

const T0: Timestamp = Timestamp::from_millis(1_780_000_000_000);

async fn workspaces_round_trip(store: Store) {
    let acme = workspace("acme");
    let g1 = store.insert_workspace(&acme, T0).await.expect("insert");
    assert!(matches!(
        store.insert_workspace(&acme, T0).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.workspace(&id("acme")).await.expect("read"),
        Some(acme.clone())
    );
    let mut changed = acme.clone();
    changed
        .limits
        .set(LimitKind::new(Metric::Requests, Window::Minute), None);
    changed.name = "Renamed".into();
    let g2 = store
        .update_workspace(&changed, T0)
        .await
        .expect("update")
        .expect("exists");
    assert!(g2 > g1, "every change moves the catalog generation");
    assert_eq!(
        store.workspace(&id("acme")).await.expect("read"),
        Some(changed)
    );
    assert_eq!(
        store
            .update_workspace(&workspace("ghost"), T0)
            .await
            .expect("update"),
        None
    );
    assert_eq!(store.catalog_generation().await.expect("generation"), g2);
    let g3 = store
        .delete_workspace(&id("acme"))
        .await
        .expect("delete")
        .expect("existed");
    assert!(g3 > g2);
    assert_eq!(
        store.delete_workspace(&id("acme")).await.expect("delete"),
        None
    );
    assert_eq!(
        store.load_catalog().await.expect("catalog").workspaces,
        vec![]
    );
}
conformance!(workspaces_round_trip);

/// The generation watch reads what `catalog_generation` reads, change after
/// change, over the one connection it keeps.
async fn a_generation_watch_follows_every_change(store: Store) {
    let mut watch = store.generation_watch();
    let before = watch.read().await.expect("generation");
    assert_eq!(
        before,
        store.catalog_generation().await.expect("generation")
    );
    let inserted = store
        .insert_workspace(&workspace("acme"), T0)
        .await
        .expect("insert");
    assert_eq!(watch.read().await.expect("generation"), inserted);
    let deleted = store
        .delete_workspace(&id("acme"))
        .await
        .expect("delete")
        .expect("existed");
    assert!(deleted > inserted);
    assert_eq!(watch.read().await.expect("generation"), deleted);
}
conformance!(a_generation_watch_follows_every_change);

/// Every limit kind, the month's included, is stored in its own column and
/// read back as written, set or cleared.
async fn every_limit_kind_round_trips(store: Store) {
    let mut acme = workspace("acme");
    for kind in LimitKind::ALL {
        acme.limits.set(kind, Some(1_000 + kind.index() as u64));
    }
    acme.limits.set(
        LimitKind::new(Metric::Tokens, Window::Month),
        Some(u64::from(u32::MAX) * 40),
    );
    store.insert_workspace(&acme, T0).await.expect("insert");
    assert_eq!(
        store.load_catalog().await.expect("catalog").workspaces,
        vec![acme.clone()]
    );
    acme.limits
        .set(LimitKind::new(Metric::Requests, Window::Month), None);
    store
        .update_workspace(&acme, T0)
        .await
        .expect("update")
        .expect("exists");
    assert_eq!(
        store.workspace(&id("acme")).await.expect("read"),
        Some(acme)
    );
}
conformance!(every_limit_kind_round_trips);

/// A workspace's alert thresholds are stored with it (the defaults as
/// none), and a threshold notification keeps its crossing.
async fn alert_thresholds_and_crossings_round_trip(store: Store) {
    let mut acme = workspace("acme");
    store.insert_workspace(&acme, T0).await.expect("insert");
    assert_eq!(
        store.workspace(&id("acme")).await.expect("read"),
        Some(acme.clone()),
        "the defaults"
    );
    let tokens_per_day = LimitKind::new(Metric::Tokens, Window::Day);
    acme.alert_thresholds = AlertThresholds {
        default: Percents::of(&[60, 90]),
        ..AlertThresholds::default()
    };
    acme.alert_thresholds
        .per_limit
        .set(tokens_per_day, Some(Percents::default()));
    acme.alert_thresholds.per_limit.set(
        LimitKind::new(Metric::Usd, Window::Month),
        Some(Percents::of(&[25, 100])),
    );
    store
        .update_workspace(&acme, T0)
        .await
        .expect("update")
        .expect("exists");
    assert_eq!(
        store.load_catalog().await.expect("catalog").workspaces,
        vec![acme]
    );
    let crossed = Notification {
        id: "ntf_threshold".into(),
        kind: NotificationKind::ThresholdCrossed,
        cause: None,
        limit: Some(tokens_per_day),
        crossing: Some(Crossing {
            percent: 80,
            used: 4_100,
            max: 5_000,
            period_start: Timestamp::from_millis(T0.millis() - 3_600_000),
            period_end: Timestamp::from_millis(T0.millis() + 3_600_000),
        }),
        ..notification(Some("acme"), T0.millis(), None)
    };
    let mut batch = Batch::default();
    batch
        .notifications
        .insert(crossed.id.clone(), crossed.clone());
    store.write_batch(&batch, T0).await.expect("write");
    assert_eq!(
        store
            .notifications(Some(&id("acme")), false, 10)
            .await
            .expect("read"),
        vec![crossed]
    );
}
conformance!(alert_thresholds_and_crossings_round_trip);

async fn keys_are_stored_hashed_and_revocable(store: Store) {
    store
        .insert_workspace(&workspace("acme"), T0)
        .await
        .expect("insert");
    let key = PlainKey::generate();
    let record = KeyRecord {
        id: "key_1".into(),
        grant: KeyGrant::Workspace {
            workspace: id("acme"),
            scopes: Scopes::parse_list("read,report").expect("scopes"),
        },
        hash: key.hash(),
        prefix: key.display_prefix(),
        name: "dashboard of acme".into(),
        created_at: T0,
        expires_at: Some(Timestamp::from_millis(T0.millis() + 86_400_000)),
        last_used_at: None,
        revoked_at: None,
    };
    store.insert_key(&record).await.expect("insert key");
    let service_key = PlainKey::generate();
    let service = KeyRecord {
        id: "key_2".into(),
        grant: KeyGrant::Service {
            workspaces: Some(vec![id("acme"), id("globex")]),
        },
        hash: service_key.hash(),
        prefix: service_key.display_prefix(),
        name: "backend".into(),
        created_at: T0,
        expires_at: None,
        last_used_at: None,
        revoked_at: None,
    };
    store
        .insert_key(&service)
        .await
        .expect("insert service key");
    let mut catalog = store.load_catalog().await.expect("catalog").keys;
    catalog.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(catalog, vec![record.clone(), service.clone()]);
    assert!(catalog[0].hash.matches(&key.hash()));
    let found = store.active_key(&key.hash()).await.expect("look up");
    assert_eq!(found, Some(record.clone()));
    let by_id = store.active_key_by_id("key_2").await.expect("look up");
    assert_eq!(by_id, Some(service.clone()));
    let unknown = PlainKey::generate().hash();
    assert_eq!(store.active_key(&unknown).await.expect("look up"), None);
    assert_eq!(
        store.list_keys(None).await.expect("list"),
        vec![service.clone()],
        "service keys are listed apart"
    );
    // Last uses only move forward, whichever instance writes last.
    let used = Timestamp::from_millis(T0.millis() + 120_000);
    let earlier = Timestamp::from_millis(T0.millis() + 60_000);
    store
        .touch_keys(&[("key_1".into(), used)])
        .await
        .expect("touch");
    store
        .touch_keys(&[("key_1".into(), earlier)])
        .await
        .expect("touch");
    let listed = store.list_keys(Some(&id("acme"))).await.expect("list");
    assert_eq!(listed[0].last_used_at, Some(used));
    let later = Timestamp::from_millis(T0.millis() + 1000);
    assert!(
        store
            .revoke_key("key_1", later)
            .await
            .expect("revoke")
            .is_some()
    );
    assert!(
        store
            .revoke_key("key_1", later)
            .await
            .expect("revoke")
            .is_none()
    );
    assert_eq!(
        store.load_catalog().await.expect("catalog").keys,
        vec![service.clone()]
    );
    assert_eq!(
        store.active_key(&key.hash()).await.expect("look up"),
        None,
        "a revoked key is not found"
    );
    let listed = store.list_keys(Some(&id("acme"))).await.expect("list");
    assert_eq!(listed[0].revoked_at, Some(later));
    store.delete_workspace(&id("acme")).await.expect("delete");
    assert!(
        store
            .list_keys(Some(&id("acme")))
            .await
            .expect("list")
            .is_empty(),
        "keys go with the workspace"
    );
    // The first value stored wins: instances starting at once agree.
    assert_eq!(
        store.meta_or_insert("secret", "first").await.expect("meta"),
        "first"
    );
    assert_eq!(
        store
            .meta_or_insert("secret", "second")
            .await
            .expect("meta"),
        "first"
    );
}
conformance!(keys_are_stored_hashed_and_revocable);

fn saved() -> Saved {
    Saved {
        minute: vec![(
            1_780_000_000,
            Usage {
                requests: 3,
                tokens: 300,
                ..Usage::default()
            },
        )],
        calendars: vec![
            CalendarCounter {
                period: Period::Day,
                start: Timestamp::from_millis(T0.millis() - 3_600_000),
                end: Timestamp::from_millis(T0.millis() + 3_600_000),
                used: Usage {
                    requests: 42,
                    tokens: 4200,
                    ..Usage::default()
                },
            },
            CalendarCounter {
                period: Period::Month,
                start: Timestamp::from_millis(T0.millis() - 86_400_000),
                end: Timestamp::from_millis(T0.millis() + 30 * 86_400_000),
                used: Usage {
                    requests: 420,
                    tokens: 42_000,
                    ..Usage::default()
                },
            },
        ],
        reservations: vec![Reservation {
            id: u64::MAX - 1,
            charged_at: T0,
            estimate: Usage::call(100),
            expires_at: Timestamp::from_millis(T0.millis() + 600_000),
            model: Some("gpt-4o".into()),
            probe: false,
            charged_elsewhere_us: None,
        }],
        rate_block_until: Some(Timestamp::from_millis(T0.millis() + 20_000)),
        billing_block: None,
        upstream_view: Default::default(),
        errors: vec![],
        last_error: None,
        key_rejected: false,
        status: Status::RateLimited,
        since: T0,
        unpriced_models: Vec::new(),
        thresholds_fired: vec![(
            LimitKind::new(Metric::Tokens, Window::Day),
            Fired {
                period_start: Timestamp::from_millis(T0.millis() - 3_600_000),
                max: 5_000,
                percents: Percents::of(&[50, 80]),
            },
        )],
        scopes: Vec::new(),
    }
}

fn notification(workspace: Option<&str>, at: i64, resolved: Option<i64>) -> Notification {
    Notification {
        id: format!("ntf_{at}"),
        workspace: workspace.map(id),
        cause: workspace
            .map(|_| Cause::LimitExhausted(LimitKind::new(Metric::Requests, Window::Day))),
        severity: Severity::Critical,
        kind: NotificationKind::QuotaExhausted(Period::Day),
        title: "title".into(),
        message: "message with numbers: 10 of 10".into(),
        suggested_actions: vec!["raise requests_per_day".into(), "reduce volume".into()],
        tenant: TenantText {
            title: "Daily limit reached".into(),
            message: "Today's requests are used up \"for now\".".into(),
            suggested_actions: vec!["Try again after the limit resets.".into()],
        },
        limit: Some(LimitKind::new(Metric::Requests, Window::Day)),
        crossing: None,
        created_at: Timestamp::from_millis(at),
        resolves_at: Some(Timestamp::from_millis(at + 1000)),
        resolved_at: resolved.map(Timestamp::from_millis),
    }
}

async fn batches_write_state_and_notifications(store: Store) {
    store
        .insert_workspace(&workspace("acme"), T0)
        .await
        .expect("insert");
    let mut batch = Batch::default();
    batch
        .states
        .insert(id("acme"), quotawatch::store::saved_to_json(&saved()));
    let raised = notification(Some("acme"), T0.millis(), None);
    batch
        .notifications
        .insert(raised.id.clone(), raised.clone());
    let service = notification(None, T0.millis() + 5, None);
    batch
        .notifications
        .insert(service.id.clone(), service.clone());
    store.write_batch(&batch, T0).await.expect("write");
    assert_eq!(
        store.load_states().await.expect("states").get(&id("acme")),
        Some(&saved())
    );
    let active = store
        .notifications(Some(&id("acme")), false, 10)
        .await
        .expect("read");
    assert_eq!(
        active,
        vec![service.clone(), raised.clone()],
        "newest first, service-wide included"
    );

    // A resolved version replaces the active one.
    let mut resolved = raised.clone();
    resolved.resolved_at = Some(Timestamp::from_millis(T0.millis() + 10));
    let mut batch = Batch::default();
    batch
        .notifications
        .insert(resolved.id.clone(), resolved.clone());
    store.write_batch(&batch, T0).await.expect("write");
    let active = store
        .notifications(Some(&id("acme")), false, 10)
        .await
        .expect("read");
    assert_eq!(active, vec![service.clone()]);
    let all = store
        .notifications(Some(&id("acme")), true, 10)
        .await
        .expect("read");
    assert_eq!(all, vec![service, resolved]);
    assert!(
        store
            .notifications(Some(&id("other")), false, 10)
            .await
            .expect("read")
            .iter()
            .all(|n| n.workspace.is_none())
    );
}
conformance!(batches_write_state_and_notifications);

async fn rollups_add_up_per_resolution(store: Store) {
    store
        .insert_workspace(&workspace("acme"), T0)
        .await
        .expect("insert");
    let minute = T0.millis() - T0.millis().rem_euclid(60_000);
    let day = minute - 5 * 3_600_000;
    let delta = RollupDelta {
        requests: 1,
        tokens: 30,
        prompt_tokens: 20,
        completion_tokens: 10,
        errors: 2,
        client_errors: 1,
        server_errors: 1,
        refused: 0,
        latency_ms_sum: 100,
        ..Default::default()
    };
    for (offset, model) in [(0, "gpt-4o"), (0, "gpt-4o-mini"), (60_000, "gpt-4o")] {
        let mut batch = Batch::default();
        let key = RollupKey {
            workspace: id("acme"),
            minute: minute + offset,
            day,
            model: model.into(),
        };
        batch.rollups.insert(key.clone(), delta);
        store.write_batch(&batch, T0).await.expect("write");
        // Writing the same delta again adds, it does not replace.
        let mut again = Batch::default();
        again.rollups.insert(
            key,
            RollupDelta {
                refused: 1,
                ..Default::default()
            },
        );
        store.write_batch(&again, T0).await.expect("write");
    }
    let minutes = store
        .history(&id("acme"), Resolution::Minute, minute, minute + 120_000)
        .await
        .expect("history");
    assert_eq!(minutes.len(), 2);
    assert_eq!(
        (
            minutes[0].bucket,
            minutes[0].totals.requests,
            minutes[0].totals.tokens
        ),
        (minute, 2, 60),
        "summed over models"
    );
    assert_eq!(minutes[0].totals.refused, 2);
    assert_eq!(
        (
            minutes[0].totals.errors,
            minutes[0].totals.client_errors,
            minutes[0].totals.server_errors
        ),
        (4, 2, 2),
        "error counts add up by kind"
    );
    assert_eq!(minutes[1].totals.requests, 1);
    let days = store
        .history(&id("acme"), Resolution::Day, day, day + 1)
        .await
        .expect("history");
    assert_eq!(
        (
            days.len(),
            days[0].totals.requests,
            days[0].totals.latency_ms_sum
        ),
        (1, 3, 300)
    );
    let hour = minute - minute.rem_euclid(3_600_000);
    let hours = store
        .history(&id("acme"), Resolution::Hour, hour, hour + 7_200_000)
        .await
        .expect("history");
    assert_eq!(hours.iter().map(|h| h.totals.requests).sum::<i64>(), 3);
    // Minute rollups older than two days are pruned; days are kept.
    let much_later = Timestamp::from_millis(T0.millis() + 3 * 86_400_000);
    assert!(store.prune(much_later).await.expect("prune") >= 2);
    assert!(
        store
            .history(&id("acme"), Resolution::Minute, minute, minute + 120_000)
            .await
            .expect("history")
            .is_empty()
    );
    assert_eq!(
        store
            .history(&id("acme"), Resolution::Day, day, day + 1)
            .await
            .expect("history")
            .len(),
        1
    );
}
conformance!(rollups_add_up_per_resolution);

async fn write_rollup(store: &Store, model: &str, delta: RollupDelta) {
    let minute = T0.millis() - T0.millis().rem_euclid(60_000);
    let mut batch = Batch::default();
    batch.rollups.insert(
        RollupKey {
            workspace: id("acme"),
            minute,
            day: minute,
            model: model.into(),
        },
        delta,
    );
    store
        .write_batch(&batch, T0)
        .await
        .expect("adding to a count at its maximum is written");
}

/// Counts at the largest BIGINT stay there: a write that adds to them, and
/// history summing them over models, neither overflow nor fail.
async fn rollups_saturate_instead_of_overflowing(store: Store) {
    store
        .insert_workspace(&workspace("acme"), T0)
        .await
        .expect("insert");
    let minute = T0.millis() - T0.millis().rem_euclid(60_000);
    let huge = RollupDelta {
        requests: 1,
        tokens: i64::MAX,
        latency_ms_sum: i64::MAX,
        ..Default::default()
    };
    let history = |models: i64| {
        let store = store.clone();
        async move {
            for resolution in [Resolution::Minute, Resolution::Hour, Resolution::Day] {
                let history = store
                    .history(
                        &id("acme"),
                        resolution,
                        minute - 86_400_000,
                        minute + 60_000,
                    )
                    .await
                    .expect("history sums without overflowing");
                assert_eq!(history.len(), 1, "{resolution:?}");
                let totals = history[0].totals;
                assert_eq!(
                    (totals.requests, totals.tokens, totals.latency_ms_sum),
                    (models, i64::MAX, i64::MAX),
                    "{resolution:?}"
                );
            }
        }
    };
    // Two models at the maximum: their sum overflows.
    for model in ["gpt-4o", "gpt-4o-mini"] {
        write_rollup(&store, model, huge).await;
    }
    history(2).await;
    // Adding to a stored maximum overflows.
    write_rollup(&store, "gpt-4o", huge).await;
    history(3).await;
}
conformance!(rollups_saturate_instead_of_overflowing);

fn rollup(workspace: &str, model: &str, requests: i64) -> (RollupKey, RollupDelta) {
    let minute = T0.millis() - T0.millis().rem_euclid(60_000);
    (
        RollupKey {
            workspace: id(workspace),
            minute,
            day: minute,
            model: model.into(),
        },
        RollupDelta {
            requests,
            tokens: 10,
            ..Default::default()
        },
    )
}

/// Rows the database refuses (built below the API, which no longer lets
/// them through) are dropped alone and reported; the rest of their batch
/// is written.
async fn a_refused_row_is_dropped_alone(store: Store) {
    for name in ["acme", "beta"] {
        store
            .insert_workspace(&workspace(name), T0)
            .await
            .expect("insert");
    }
    let mut batch = Batch::default();
    for name in ["acme", "beta"] {
        batch
            .states
            .insert(id(name), quotawatch::store::saved_to_json(&saved()));
    }
    let raised = notification(Some("acme"), T0.millis(), None);
    batch
        .notifications
        .insert(raised.id.clone(), raised.clone());
    for (key, delta) in [
        rollup("acme", "gpt-4o", 1),
        rollup("beta", "gpt-4o", 2),
        rollup("beta", "gpt-4o-mini", 3),
        // Longer than any model name the database accepts.
        rollup("acme", &"x".repeat(3000), 4),
        // A negative count.
        rollup("beta", "o3", -5),
    ] {
        batch.rollups.insert(key, delta);
    }
    let salvage = store.write_or_salvage(batch, T0).await;
    assert!(salvage.error.is_none(), "{:?}", salvage.error);
    assert!(salvage.unwritten.is_empty());
    let mut refused: Vec<(String, &str)> = salvage
        .refused
        .iter()
        .map(|refused| {
            let workspace = refused.row.workspace().map(ToString::to_string);
            (workspace.unwrap_or_default(), refused.row.kind())
        })
        .collect();
    refused.sort();
    assert_eq!(
        refused,
        vec![("acme".into(), "rollup"), ("beta".into(), "rollup")]
    );

    assert_eq!(store.load_states().await.expect("states").len(), 2);
    assert_eq!(
        store
            .notifications(Some(&id("acme")), false, 10)
            .await
            .expect("read"),
        vec![raised]
    );
    let minute = T0.millis() - T0.millis().rem_euclid(60_000);
    for (name, requests) in [("acme", 1), ("beta", 5)] {
        let history = store
            .history(&id(name), Resolution::Minute, minute, minute + 60_000)
            .await
            .expect("history");
        assert_eq!(history[0].totals.requests, requests, "{name}");
    }
}
conformance!(a_refused_row_is_dropped_alone);

/// When the database accepts no write at all, nothing is dropped: the whole
/// batch comes back, to be retried.
async fn nothing_is_dropped_while_the_database_is_unusable(store: Store) {
    store
        .insert_workspace(&workspace("acme"), T0)
        .await
        .expect("insert");
    let mut batch = Batch::default();
    for (key, delta) in [rollup("acme", "gpt-4o", 1), rollup("acme", "o3", 2)] {
        batch.rollups.insert(key, delta);
    }
    store.close().await;
    let salvage = store.write_or_salvage(batch, T0).await;
    assert!(salvage.error.is_some());
    assert!(salvage.refused.is_empty());
    assert_eq!(salvage.unwritten.rollups.len(), 2);
}
conformance!(nothing_is_dropped_while_the_database_is_unusable);

async fn recent_model_names_are_read_per_day(store: Store) {
    for name in ["acme", "beta"] {
        store
            .insert_workspace(&workspace(name), T0)
            .await
            .expect("insert");
    }
    let day_ms = 86_400_000;
    let mut batch = Batch::default();
    for (name, day, model) in [
        ("acme", T0.millis() - 3 * day_ms, "too-old"),
        ("acme", T0.millis(), "gpt-4o"),
        ("beta", T0.millis() - day_ms, "o3"),
    ] {
        batch.rollups.insert(
            RollupKey {
                workspace: id(name),
                minute: day,
                day,
                model: model.into(),
            },
            RollupDelta {
                requests: 1,
                ..Default::default()
            },
        );
    }
    store.write_batch(&batch, T0).await.expect("write");
    assert_eq!(
        store
            .models_by_day(T0.millis() - 2 * day_ms)
            .await
            .expect("read"),
        vec![
            (id("beta"), T0.millis() - day_ms, "o3".to_owned()),
            (id("acme"), T0.millis(), "gpt-4o".to_owned()),
        ],
        "oldest day first"
    );
}
conformance!(recent_model_names_are_read_per_day);

/// Spend by model is read from the daily buckets of the recent days: each
/// model's tokens by kind and cost, leaving out rows that spent nothing.
async fn recent_spend_is_read_per_day_and_model(store: Store) {
    store
        .insert_workspace(&workspace("acme"), T0)
        .await
        .expect("insert");
    let day_ms = 86_400_000;
    let mut batch = Batch::default();
    let spent = |prompt, cached, completion, usd_nano| RollupDelta {
        requests: 1,
        tokens: prompt + completion,
        prompt_tokens: prompt,
        cached_tokens: cached,
        completion_tokens: completion,
        usd_nano,
        ..Default::default()
    };
    for (day, model, delta) in [
        (T0.millis() - 40 * day_ms, "gpt-4o", spent(1, 0, 1, 1)),
        (T0.millis(), "gpt-4o", spent(1000, 200, 50, 2_300_000)),
        (
            T0.millis(),
            "",
            RollupDelta {
                refused: 1,
                ..Default::default()
            },
        ),
    ] {
        batch.rollups.insert(
            RollupKey {
                workspace: id("acme"),
                minute: day,
                day,
                model: model.into(),
            },
            delta,
        );
    }
    store.write_batch(&batch, T0).await.expect("write");
    let read = store
        .spend_by_day(T0.millis() - 32 * day_ms)
        .await
        .expect("read");
    assert_eq!(read.len(), 1, "{read:?}");
    let (workspace, day, model, spend) = &read[0];
    assert_eq!(
        (workspace, *day, model.as_str()),
        (&id("acme"), T0.millis(), "gpt-4o")
    );
    assert_eq!(
        (spend.prompt, spend.cached, spend.completion, spend.usd),
        (1000, 200, 50, 2_300_000)
    );
}
conformance!(recent_spend_is_read_per_day_and_model);

/// Text that came from a client or the upstream (an error message quoted in
/// a notification) may hold a NUL character, which PostgreSQL's text cannot
/// store: it is written as U+FFFD on both backends rather than failing.
async fn notification_text_with_nul_is_stored(store: Store) {
    store
        .insert_workspace(&workspace("acme"), T0)
        .await
        .expect("insert");
    let mut raised = notification(Some("acme"), T0.millis(), None);
    raised.title = "title\0".into();
    raised.message = "OpenAI answered: \"bad\0text\"".into();
    let mut batch = Batch::default();
    batch
        .notifications
        .insert(raised.id.clone(), raised.clone());
    store.write_batch(&batch, T0).await.expect("write");
    let stored = store
        .notifications(Some(&id("acme")), false, 10)
        .await
        .expect("read");
    assert_eq!(stored[0].title, "title\u{fffd}");
    assert_eq!(stored[0].message, "OpenAI answered: \"bad\u{fffd}text\"");
}
conformance!(notification_text_with_nul_is_stored);

async fn meta_values_upsert(store: Store) {
    assert_eq!(store.meta("admin_key_sha256").await.expect("read"), None);
    store
        .set_meta("admin_key_sha256", "one")
        .await
        .expect("write");
    store
        .set_meta("admin_key_sha256", "two")
        .await
        .expect("write");
    assert_eq!(
        store
            .meta("admin_key_sha256")
            .await
            .expect("read")
            .as_deref(),
        Some("two")
    );
    store.probe(T0).await.expect("a write probe succeeds");
}
conformance!(meta_values_upsert);

/// The whole server on PostgreSQL: counts survive a restart as on SQLite.
#[tokio::test]
async fn the_server_runs_on_postgres() {
    let Some(database) = TestDatabase::create("store::the_server_runs_on_postgres").await else {
        return;
    };
    let mut server = TestServer::start_on(database.url.clone(), None, &[]).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 5}}))
        .await;
    for _ in 0..5 {
        server.check(&key, 10).await;
    }
    assert_eq!(server.status(&key).await["status"], "quota_exceeded");
    server.restart().await;
    let status = server.status(&key).await;
    assert_eq!(status["status"], "quota_exceeded");
    assert_eq!(status["limits"]["requests_per_day"]["used"], 5);
    let history = server
        .get("/api/quota/notifications?include=history", ADMIN_KEY)
        .await;
    assert!(history.status.is_success());
    server.stop().await;
    database.drop_database().await;
}

/// Runs `sql` on the server's database over a connection of its own.
async fn execute_on(database_url: &str, sql: &'static str) {
    use sqlx::Connection;
    if database_url.starts_with("sqlite:") {
        let mut connection = sqlx::SqliteConnection::connect(database_url)
            .await
            .expect("connect to SQLite");
        sqlx::raw_sql(sql)
            .execute(&mut connection)
            .await
            .expect("SQL runs");
    } else {
        let mut connection = sqlx::PgConnection::connect(database_url)
            .await
            .expect("connect to PostgreSQL");
        sqlx::raw_sql(sql)
            .execute(&mut connection)
            .await
            .expect("SQL runs");
    }
}

/// How many rollup rows of `model` the database holds.
async fn stored_rollups(database_url: &str, model: &str) -> i64 {
    use sqlx::Connection;
    let query = "SELECT COUNT(*) FROM rollups WHERE model = $1";
    if database_url.starts_with("sqlite:") {
        let mut connection = sqlx::SqliteConnection::connect(database_url)
            .await
            .expect("connect to SQLite");
        sqlx::query_scalar(query)
            .bind(model)
            .fetch_one(&mut connection)
            .await
            .expect("count")
    } else {
        let mut connection = sqlx::PgConnection::connect(database_url)
            .await
            .expect("connect to PostgreSQL");
        sqlx::query_scalar(query)
            .bind(model)
            .fetch_one(&mut connection)
            .await
            .expect("count")
    }
}

/// A row the database refuses no longer stops every later flush: the server
/// drops it, counts it in a metric, writes the rest, and stays ready. The
/// database is made to refuse the rows of one model by a trigger, the way a
/// constraint would.
async fn a_refused_row_stops_nothing_else(server: TestServer, refuse: &'static str) {
    let acme = server.workspace(json!({"id": "acme"})).await;
    let beta = server.workspace(json!({"id": "beta"})).await;
    execute_on(&server.database_url, refuse).await;
    for (key, model) in [
        (&acme, "refused-model"),
        (&acme, "gpt-4o"),
        (&beta, "gpt-4o"),
    ] {
        let answer = server
            .post("/api/quota/usage", key, json!({"model": model}))
            .await;
        assert_eq!(answer.status.as_u16(), 202, "{:?}", answer.body);
    }
    // The rest is committed while the batch is still being split, and the
    // dropped row is counted once the split is over.
    eventually(
        "the other rows to be written and the dropped one counted",
        Duration::from_secs(10),
        || async {
            // Minute, hour and day of each workspace.
            let written = stored_rollups(&server.database_url, "gpt-4o").await == 6;
            let metrics = server.metrics().await;
            let counted = metrics.contains("quotawatch_store_rows_dropped_total 1\n");
            (written && counted).then_some(())
        },
    )
    .await;
    assert_eq!(
        stored_rollups(&server.database_url, "refused-model").await,
        0
    );
    eventually("readyz to answer 200", Duration::from_secs(10), || async {
        (server.get("/readyz", "").await.status.as_u16() == 200).then_some(())
    })
    .await;

    // Later flushes write as before.
    server
        .post("/api/quota/usage", &beta, json!({"model": "o3"}))
        .await;
    eventually(
        "a later row to be written",
        Duration::from_secs(10),
        || async { (stored_rollups(&server.database_url, "o3").await == 3).then_some(()) },
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_refused_row_stops_nothing_else_on_sqlite() {
    let server = TestServer::start(&[]).await;
    a_refused_row_stops_nothing_else(
        server,
        "CREATE TRIGGER refuse_model BEFORE INSERT ON rollups WHEN NEW.model = 'refused-model' BEGIN SELECT RAISE(ABORT, 'this model is refused'); END",
    )
    .await;
}

#[tokio::test]
async fn a_refused_row_stops_nothing_else_on_postgres() {
    let Some(database) =
        TestDatabase::create("store::a_refused_row_stops_nothing_else_on_postgres").await
    else {
        return;
    };
    let server = TestServer::start_on(database.url.clone(), None, &[]).await;
    a_refused_row_stops_nothing_else(
        server,
        "CREATE FUNCTION refuse_model() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.model = 'refused-model' THEN RAISE EXCEPTION 'this model is refused'; END IF; RETURN NEW; END $$; CREATE TRIGGER refuse_model BEFORE INSERT ON rollups FOR EACH ROW EXECUTE FUNCTION refuse_model()",
    )
    .await;
    database.drop_database().await;
}

async fn the_alert_outbox_enqueues_each_event_once_and_one_dispatcher_claims_it(store: Store) {
    use quotawatch::domain::alert::{ChannelKind, Filter, Phase};
    use quotawatch::store::{
        AttemptRecord, ChannelRecord, ChannelSource, DeliveryQuery, DeliveryStatus,
    };
    store
        .insert_workspace(&workspace("acme"), T0)
        .await
        .expect("insert");
    let raised = notification(Some("acme"), T0.millis(), None);
    let mut resolved = raised.clone();
    resolved.resolved_at = Some(Timestamp::from_millis(T0.millis() + 10));
    // Each written twice, as a second writer or a rewrite would.
    for written in [&raised, &raised, &resolved, &resolved] {
        let mut batch = Batch::default();
        batch
            .notifications
            .insert(written.id.clone(), (*written).clone());
        store.write_batch(&batch, T0).await.expect("write");
    }
    let events = store.unfanned_alert_events(10).await.expect("events");
    let phases: Vec<Phase> = events.iter().map(|event| event.phase).collect();
    assert_eq!(phases, vec![Phase::Raised, Phase::Resolved]);
    assert_eq!(events[0].title, raised.title);
    assert_eq!(events[0].suggested_actions, raised.suggested_actions);
    assert_eq!(events[1].occurred_at.millis(), T0.millis() + 10);

    let channel = ChannelRecord {
        id: "ch_1".into(),
        name: "ops".into(),
        workspace: None,
        kind: ChannelKind::Webhook,
        url: "https://hooks.example.com/".into(),
        recipients: Vec::new(),
        secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
        filter: Filter::default(),
        enabled: true,
        source: ChannelSource::Api,
        created_at: T0,
        updated_at: T0,
    };
    store.save_alert_channel(&channel).await.expect("channel");
    assert_eq!(
        store.alert_channel("ch_1").await.expect("read"),
        Some(channel.clone())
    );
    // An email channel keeps its recipients, in their order, and no URL.
    let email = ChannelRecord {
        id: "ch_2".into(),
        kind: ChannelKind::Email,
        url: String::new(),
        recipients: vec!["ops@example.com".into(), "oncall@example.com".into()],
        secret: None,
        ..channel.clone()
    };
    store
        .save_alert_channel(&email)
        .await
        .expect("email channel");
    assert_eq!(
        store.alert_channel("ch_2").await.expect("read"),
        Some(email.clone())
    );
    assert!(store.delete_alert_channel("ch_2").await.expect("delete"));
    assert_eq!(
        store
            .notification_raised_at(&raised.id)
            .await
            .expect("read"),
        Some(raised.created_at)
    );
    for event in &events {
        // Twice, as two dispatchers would: one delivery each.
        for _ in 0..2 {
            store
                .fan_out_alert_event(event, &[&channel], T0)
                .await
                .expect("fan out");
        }
    }
    assert!(
        store
            .unfanned_alert_events(10)
            .await
            .expect("events")
            .is_empty()
    );
    let until = Timestamp::from_millis(T0.millis() + 60_000);
    let first = store
        .claim_alert_deliveries("ch_1", T0, "dsp_a", until, 20)
        .await
        .expect("claim");
    let second = store
        .claim_alert_deliveries("ch_1", T0, "dsp_b", until, 20)
        .await
        .expect("claim");
    assert_eq!(first.len(), 2);
    assert!(second.is_empty(), "claimed already: {second:?}");

    let attempt = |delivery: &str, outcome, next: Option<i64>| AttemptRecord {
        delivery_id: delivery.to_owned(),
        number: 1,
        attempted_at: T0,
        outcome,
        http_status: Some(if next.is_some() { 503 } else { 200 }),
        error: next.map(|_| "x".repeat(2000)),
        duration_ms: 12,
        next_attempt_at: next.map(Timestamp::from_millis),
        digest_id: None,
    };
    let (retried, delivered) = (&first[0].0, &first[1].0);
    store
        .record_alert_attempt(
            &attempt(&retried.id, "retry", Some(T0.millis() + 1000)),
            DeliveryStatus::Pending,
        )
        .await
        .expect("record");
    store
        .record_alert_attempt(
            &attempt(&delivered.id, "delivered", None),
            DeliveryStatus::Delivered,
        )
        .await
        .expect("record");
    let early = Timestamp::from_millis(T0.millis() + 500);
    assert!(
        store
            .claim_alert_deliveries("ch_1", early, "dsp_b", until, 20)
            .await
            .expect("claim")
            .is_empty(),
        "the retry is not due yet"
    );
    let due = Timestamp::from_millis(T0.millis() + 1000);
    let again = store
        .claim_alert_deliveries("ch_1", due, "dsp_b", until, 20)
        .await
        .expect("claim");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0.id, retried.id);
    assert_eq!(again[0].0.attempts, 1);
    // Released claims are due again at once.
    store.release_alert_claims("dsp_b").await.expect("release");
    assert_eq!(
        store.channels_with_due_deliveries(due).await.expect("due"),
        vec!["ch_1".to_owned()]
    );
    let listed = store
        .alert_deliveries(&DeliveryQuery {
            status: Some(DeliveryStatus::Delivered),
            limit: 10,
            ..DeliveryQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].attempts[0].http_status, Some(200));
    let pending = store
        .alert_deliveries(&DeliveryQuery {
            status: Some(DeliveryStatus::Pending),
            limit: 10,
            ..DeliveryQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(
        pending[0].attempts[0].error.as_deref().map(str::len),
        Some(quotawatch::store::MAX_ATTEMPT_ERROR),
        "error texts are bounded"
    );
    assert_eq!(store.pending_alert_deliveries().await.expect("count"), 1);

    // A month later the delivered one is pruned with its event; a rewrite
    // of the notification enqueues nothing again.
    let later = Timestamp::from_millis(T0.millis() + 31 * 86_400_000);
    store.prune(later).await.expect("prune");
    let left = store
        .alert_deliveries(&DeliveryQuery {
            limit: 10,
            ..DeliveryQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].delivery.status, DeliveryStatus::Pending);
    let mut batch = Batch::default();
    batch
        .notifications
        .insert(resolved.id.clone(), resolved.clone());
    store.write_batch(&batch, later).await.expect("write");
    assert!(
        store
            .unfanned_alert_events(10)
            .await
            .expect("events")
            .is_empty()
    );
    assert!(store.delete_alert_channel("ch_1").await.expect("delete"));
    assert_eq!(store.pending_alert_deliveries().await.expect("count"), 0);
}
conformance!(the_alert_outbox_enqueues_each_event_once_and_one_dispatcher_claims_it);
