//! What survives restarts, crashes and an unwritable database.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::sqlite::SqliteConnection;

use crate::support::binary::Server;
use crate::support::{ADMIN_KEY, TestServer, client, eventually, fixture_json};

#[tokio::test]
async fn counters_blocks_and_notifications_survive_a_graceful_restart() {
    // With an hour between flushes, only the shutdown flush can have
    // written anything.
    let mut server = TestServer::start(&[("QUOTAWATCH_FLUSH_INTERVAL", "1h")]).await;
    let acme = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_minute": 100, "requests_per_day": 10, "tokens_per_day": 100000}}))
        .await;
    let billing = server.workspace(json!({"id": "billing"})).await;
    for _ in 0..9 {
        assert_eq!(server.check(&acme, 250).await.status, StatusCode::OK);
    }
    let open = server.check(&acme, 1000).await.body["reservation_id"].clone();
    server
        .post("/api/quota/usage", &billing, json!({"status_code": 429, "error": fixture_json("error_429_insufficient_quota.json")["error"]}))
        .await;
    let before_acme = server.status(&acme).await;
    let before_notifications = server.get("/api/quota/notifications", &billing).await.body;
    assert_eq!(before_acme["status"], "quota_exceeded");

    server.restart().await;

    let after = server.status(&acme).await;
    assert_eq!(after["status"], "quota_exceeded");
    assert_eq!(after["since"], before_acme["since"]);
    assert_eq!(after["limits"]["requests_per_day"]["used"], 10);
    assert_eq!(
        after["limits"]["requests_per_minute"]["used"], 10,
        "the minute window survives too"
    );
    assert_eq!(after["limits"]["tokens_per_day"]["used"], 9 * 250 + 1000);
    let blocked = server.status(&billing).await;
    assert_eq!(blocked["status"], "quota_exceeded");
    assert_eq!(blocked["reasons"], json!(["upstream_insufficient_quota"]));
    let refused = server.check(&billing, 0).await;
    assert_eq!(
        refused.header("x-should-retry"),
        Some("false"),
        "the billing block survives"
    );
    let notifications = server.get("/api/quota/notifications", &billing).await.body;
    assert_eq!(
        notifications["notifications"][0]["id"],
        before_notifications["notifications"][0]["id"]
    );
    // A reservation made before the restart still settles.
    let settled = server
        .post(
            "/api/quota/usage",
            &acme,
            json!({"reservation_id": open, "usage": {"prompt_tokens": 10, "completion_tokens": 0}}),
        )
        .await;
    assert_eq!(settled.status, StatusCode::ACCEPTED);
    assert_eq!(
        settled.body["limits"]["tokens_per_day"]["used"],
        9 * 250 + 10
    );
    let history = server
        .get("/api/quota/history?window=1h&step=1m", &acme)
        .await;
    let requests: i64 = history.body["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["requests"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(requests, 1, "the settled request is in history");
    server.stop().await;
}

fn env<'a>(db: &'a str, flush: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("QUOTAWATCH_DATABASE_URL", db),
        ("QUOTA_ADMIN_RESET_KEY", ADMIN_KEY),
        ("QUOTAWATCH_FLUSH_INTERVAL", flush),
    ]
}

async fn used_today(base: &str, key: &str) -> u64 {
    let response = client()
        .get(format!("{base}/api/quota/status"))
        .bearer_auth(key)
        .send()
        .await
        .expect("status");
    let body: Value = response.json().await.expect("JSON");
    body["limits"]["requests_per_day"]["used"]
        .as_u64()
        .expect("used")
}

async fn check(base: &str, key: &str) -> StatusCode {
    client()
        .post(format!("{base}/api/quota/check"))
        .bearer_auth(key)
        .send()
        .await
        .expect("check")
        .status()
}

/// The requests-per-day count of `default` as written in the database file.
async fn persisted_requests(db: &str) -> Option<u64> {
    let mut connection = SqliteConnection::connect(db).await.ok()?;
    let row: Option<(String,)> =
        sqlx::query_as("SELECT state FROM workspace_state WHERE workspace_id = 'default'")
            .fetch_optional(&mut connection)
            .await
            .ok()?;
    let state: Value = serde_json::from_str(&row?.0).ok()?;
    state["day_requests"].as_u64()
}

#[tokio::test]
async fn after_kill_9_only_the_last_flush_interval_can_be_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}", dir.path().join("qw.db").display());
    let settings = env(&db, "200ms");
    let server = Server::start(dir.path(), &settings).await;
    let key = server
        .printed_keys()
        .first()
        .cloned()
        .expect("the default workspace's key is printed");
    for _ in 0..10 {
        assert_eq!(check(&server.base, &key).await, StatusCode::OK);
    }
    // The flush writes without being asked, within its interval.
    eventually(
        "the count to be flushed",
        Duration::from_secs(10),
        || async { (persisted_requests(&db).await == Some(10)).then_some(()) },
    )
    .await;
    server.kill9().await;

    let restarted = Server::start(dir.path(), &settings).await;
    assert!(
        restarted.printed_keys().is_empty(),
        "keys are printed on the first start only"
    );
    assert_eq!(used_today(&restarted.base, &key).await, 10);
    assert!(
        !restarted.stderr().contains(&key),
        "keys never reach the logs"
    );
    restarted.terminate().await;
}

#[tokio::test]
async fn sigterm_writes_everything_before_exiting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}", dir.path().join("qw.db").display());
    let settings = env(&db, "1h");
    let server = Server::start(dir.path(), &settings).await;
    let key = server.printed_keys().first().cloned().expect("key printed");
    for _ in 0..7 {
        assert_eq!(check(&server.base, &key).await, StatusCode::OK);
    }
    let stderr = server.stderr_path.clone();
    let status = server.terminate().await;
    assert!(
        status.success(),
        "clean exit: {}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
    assert_eq!(persisted_requests(&db).await, Some(7));
    let restarted = Server::start(dir.path(), &settings).await;
    assert_eq!(used_today(&restarted.base, &key).await, 7);
    restarted.terminate().await;
}

#[tokio::test]
async fn an_unwritable_database_degrades_gracefully_and_recovers() {
    let mut server = TestServer::start(&[]).await;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 3, "requests_per_day": 100}}),
        )
        .await;
    assert_eq!(server.get("/readyz", "").await.status, StatusCode::OK);

    // Another process holds an exclusive lock: every write now fails.
    let mut blocker = SqliteConnection::connect(&server.database_url)
        .await
        .expect("open");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut blocker)
        .await
        .expect("lock");

    for _ in 0..3 {
        assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    }
    assert_eq!(
        server.check(&key, 0).await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "still enforced from memory"
    );
    let not_ready = eventually(
        "readyz to report the database",
        Duration::from_secs(10),
        || async {
            let ready = server.get("/readyz", "").await;
            (ready.status == StatusCode::SERVICE_UNAVAILABLE).then_some(ready.body)
        },
    )
    .await;
    assert_eq!(not_ready["status"], "not_ready");
    assert!(
        not_ready["reason"]
            .as_str()
            .expect("reason")
            .contains("database"),
        "{not_ready}"
    );
    // The flush fails too, and says so.
    let storage = eventually(
        "a storage notification",
        Duration::from_secs(10),
        || async {
            let notifications = server.get("/api/quota/notifications", &key).await.body;
            notifications["notifications"]
                .as_array()?
                .iter()
                .find(|n| n["kind"] == "storage_unavailable")
                .cloned()
        },
    )
    .await;
    assert_eq!(storage["severity"], "critical");
    assert_eq!(storage["workspace"], Value::Null);

    sqlx::query("ROLLBACK")
        .execute(&mut blocker)
        .await
        .expect("unlock");
    blocker.close().await.expect("close");
    eventually("readyz to recover", Duration::from_secs(10), || async {
        (server.get("/readyz", "").await.status == StatusCode::OK).then_some(())
    })
    .await;
    let active = server.get("/api/quota/notifications", &key).await.body;
    assert!(
        active["notifications"]
            .as_array()
            .expect("list")
            .iter()
            .all(|n| n["kind"] != "storage_unavailable")
    );
    let history = server
        .get("/api/quota/notifications?include=history", &key)
        .await
        .body;
    let resolved = history["notifications"]
        .as_array()
        .expect("list")
        .iter()
        .find(|n| n["kind"] == "storage_unavailable")
        .cloned()
        .expect("kept in history");
    assert!(resolved["resolved_at"].is_string());

    // What was counted during the outage reached the database.
    server.restart().await;
    assert_eq!(
        server.status(&key).await["limits"]["requests_per_day"]["used"],
        3
    );
    server.stop().await;
}

#[tokio::test]
async fn a_removed_database_file_is_noticed() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    std::fs::remove_file(server.database_path()).expect("remove the database file");
    let not_ready = eventually("readyz to notice", Duration::from_secs(10), || async {
        let ready = server.get("/readyz", "").await;
        (ready.status == StatusCode::SERVICE_UNAVAILABLE).then_some(ready.body)
    })
    .await;
    assert!(
        not_ready["reason"]
            .as_str()
            .expect("reason")
            .contains("was removed"),
        "{not_ready}"
    );
    // Enforcement goes on, and the pending writes raise the alarm.
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    eventually(
        "a storage notification",
        Duration::from_secs(10),
        || async {
            let body = server.get("/api/quota/notifications", &key).await.body;
            body["notifications"]
                .as_array()?
                .iter()
                .any(|n| {
                    n["kind"] == "storage_unavailable"
                        && n["message"].as_str().unwrap_or("").contains("removed")
                })
                .then_some(())
        },
    )
    .await;
    server.stop().await;
}
