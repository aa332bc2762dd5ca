//! Several instances sharing Redis and PostgreSQL: limits hold across them,
//! live events reach every instance's clients, a Redis outage behaves as
//! `QUOTAWATCH_ON_STORE_ERROR` says (a proxied call in flight still counts),
//! a restart of all loses nothing, and a notification has one id on every
//! instance and in history, whichever instance raised its cause first.
//! Needs `QUOTAWATCH_TEST_REDIS_URL` and `QUOTAWATCH_TEST_DATABASE_URL`.

use std::time::{Duration, Instant};

use quotawatch::domain::limits::{LimitKind, Metric, Window};
use quotawatch::domain::status::Cause;
use quotawatch::redis::{EpisodeStep, RedisCounters};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::postgres::TestDatabase;
use crate::support::redis::{Relay, clean, fresh_prefix, server_url};
use crate::support::{
    ADMIN_KEY, Response, TestServer, UPSTREAM_KEY, Upstream, concurrent_checks, eventually,
    fixture_json,
};
use crate::websocket::{Ws, connect, wait_for, wait_for_all, ws_url};

/// Two instances on one fresh PostgreSQL database and one Redis key prefix.
pub(crate) struct Cluster {
    pub(crate) a: TestServer,
    pub(crate) b: TestServer,
    redis_url: String,
    prefix: String,
    database: TestDatabase,
    /// Between the instances and Redis, when the test cuts it.
    relay: Option<Relay>,
}

impl Cluster {
    pub(crate) async fn start(
        test: &str,
        relayed: bool,
        settings: &[(&str, &str)],
    ) -> Option<Self> {
        let redis_url = server_url(test)?;
        let database = TestDatabase::create(test).await?;
        let prefix = fresh_prefix();
        let relay = if relayed {
            Some(Relay::start(&redis_url).await)
        } else {
            None
        };
        let url = relay
            .as_ref()
            .map_or(redis_url.clone(), |relay| relay.url.clone());
        let mut all: Vec<(&str, &str)> = vec![
            ("QUOTAWATCH_REDIS_URL", &url),
            ("QUOTAWATCH_REDIS_PREFIX", &prefix),
            ("QUOTAWATCH_REPLICAS", "2"),
            // A debug build serving 400 requests at once on a shared
            // machine can take longer than the 50 ms default to hear back,
            // and would then fall back as in an outage; outages are tested
            // with a cut connection, which fails at once.
            ("QUOTAWATCH_REDIS_TIMEOUT", "2s"),
        ];
        all.extend_from_slice(settings);
        // One after the other: the first creates the schema.
        let a = TestServer::start_on(database.url.clone(), None, &all).await;
        let b = TestServer::start_on(database.url.clone(), None, &all).await;
        Some(Self {
            a,
            b,
            redis_url,
            prefix,
            database,
            relay,
        })
    }

    /// Creates a workspace through A and waits until B knows it too.
    pub(crate) async fn workspace(&self, body: Value) -> String {
        let key = self.a.workspace(body).await;
        eventually("B knows the new key", Duration::from_secs(5), || async {
            (self.b.get("/api/quota/status", &key).await.status == StatusCode::OK).then_some(())
        })
        .await;
        key
    }

    pub(crate) async fn finish(self) {
        self.a.stop().await;
        self.b.stop().await;
        clean(&self.redis_url, &self.prefix).await;
        self.database.drop_database().await;
    }
}

fn used(status: &Value, limit: &str) -> u64 {
    status["limits"][limit]["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("{limit} in {status}"))
}

/// How many `upstream_quota_exhausted` notifications the history holds.
async fn billing_notifications(server: &TestServer, key: &str) -> usize {
    let history = server.notification_history(key).await;
    history
        .iter()
        .filter(|n| n["kind"] == "upstream_quota_exhausted")
        .count()
}

/// A check that must answer promptly, whatever state Redis is in.
async fn prompt_check(server: &TestServer, key: &str) -> Response {
    tokio::time::timeout(Duration::from_secs(5), server.check(key, 0))
        .await
        .expect("the check answers instead of hanging")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_hundred_requests_across_two_instances_admit_exactly_the_limit() {
    let Some(cluster) = Cluster::start("instances::four_hundred", false, &[]).await else {
        return;
    };
    let key = cluster
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 100, "requests_per_day": null}}),
        )
        .await;
    let (admitted, refused) = concurrent_checks(&[&cluster.a, &cluster.b], &key, 400).await;
    assert_eq!((admitted, refused), (100, 300));
    for server in [&cluster.a, &cluster.b] {
        let status = server.status(&key).await;
        assert_eq!(used(&status, "requests_per_minute"), 100);
        assert_eq!(status["status"], "rate_limited");
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_on_one_instance_sees_a_billing_block_caused_through_the_other() {
    let Some(cluster) = Cluster::start("instances::websocket", false, &[]).await else {
        return;
    };
    let key = cluster.workspace(json!({"id": "acme"})).await;
    let mut ws = connect(&cluster.a, &key, "").await;
    wait_for(&mut ws, Duration::from_secs(2), |m| {
        m["type"] == "status" && m["data"]["status"] == "normal"
    })
    .await;

    let admitted = cluster.b.check(&key, 10).await;
    assert_eq!(admitted.status, StatusCode::OK);
    let billing = json!({"reservation_id": admitted.body["reservation_id"], "status_code": 429,
        "error": fixture_json("error_429_insufficient_quota.json")["error"]});
    let caused = Instant::now();
    let reported = cluster.b.post("/api/quota/usage", &key, billing).await;
    assert_eq!(reported.body["status"], "quota_exceeded");

    // The promise: within a second on every instance.
    let seen = wait_for_all(
        &mut ws,
        Duration::from_secs(1),
        &[
            &|m| m["type"] == "status" && m["data"]["status"] == "quota_exceeded",
            &|m| m["type"] == "notification" && m["data"]["kind"] == "upstream_quota_exhausted",
        ],
    )
    .await;
    println!(
        "instance A's client saw B's block after {:?}",
        caused.elapsed()
    );
    assert_eq!(seen[1]["data"]["severity"], "critical");

    // The block itself is shared: A refuses without asking the upstream.
    let refused = cluster.a.check(&key, 0).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["error"]["type"], "insufficient_quota");
    assert_eq!(refused.header("x-should-retry"), Some("false"));

    // Every instance raised it for its own clients; once the writes settle,
    // history holds it once, whichever instance is asked.
    eventually(
        "one notification per cause in history",
        Duration::from_secs(5),
        || async {
            let counts = [
                billing_notifications(&cluster.a, &key).await,
                billing_notifications(&cluster.b, &key).await,
            ];
            (counts == [1, 1]).then_some(())
        },
    )
    .await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ticket_from_one_instance_opens_a_socket_on_the_other_once() {
    let Some(cluster) = Cluster::start("instances::tickets", false, &[]).await else {
        return;
    };
    let key = cluster.workspace(json!({"id": "acme"})).await;
    let ticket = cluster
        .a
        .post("/api/quota/ws-ticket", &key, json!({}))
        .await;
    assert_eq!(ticket.status, StatusCode::OK);
    let query = format!(
        "?ticket={}",
        ticket.body["ticket"].as_str().expect("ticket")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&cluster.b, &query).as_str())
        .await
        .expect("B accepts A's ticket");
    wait_for(&mut ws, Duration::from_secs(2), |m| m["type"] == "status").await;
    for server in [&cluster.a, &cluster.b] {
        match tokio_tungstenite::connect_async(ws_url(server, &query).as_str()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401);
            }
            other => panic!("a used ticket must be refused everywhere, got {other:?}"),
        }
    }
    cluster.finish().await;
}

/// Cuts Redis off for both instances, runs `during` against instance A
/// (which answers how many requests and tokens A counted alone), restores
/// Redis and checks that counting is shared again: what A counted meanwhile
/// counts on B too.
async fn outage(mode: &str, during: impl AsyncFnOnce(&Cluster, &str) -> (u64, u64)) {
    let test = format!("instances::outage_{mode}");
    let settings = [("QUOTAWATCH_ON_STORE_ERROR", mode)];
    let Some(cluster) = Cluster::start(&test, true, &settings).await else {
        return;
    };
    let key = cluster
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 10, "requests_per_day": 1000,
                "tokens_per_day": 1_000_000}}),
        )
        .await;
    for _ in 0..2 {
        assert_eq!(cluster.a.check(&key, 0).await.status, StatusCode::OK);
    }
    let relay = cluster.relay.as_ref().expect("relay");
    relay.cut();
    let (admitted_alone, tokens_alone) = during(&cluster, &key).await;

    relay.restore();
    let status = eventually(
        "A counts in Redis again",
        Duration::from_secs(10),
        || async {
            let status = cluster.a.status(&key).await;
            (status["degraded"] == false).then_some(status)
        },
    )
    .await;
    eventually(
        "B counts in Redis again",
        Duration::from_secs(10),
        || async { (cluster.b.status(&key).await["degraded"] == false).then_some(()) },
    )
    .await;
    assert!(
        !status["reasons"]
            .as_array()
            .expect("reasons")
            .contains(&json!("shared_store_unreachable"))
    );
    let resolved = cluster.a.get("/api/quota/notifications", &key).await.body["notifications"]
        .as_array()
        .expect("list")
        .iter()
        .all(|n| n["kind"] != "shared_store_unavailable");
    assert!(resolved, "the outage notification resolves");
    // Shared again: B sees A's count, including what A counted alone
    // (added in the background, off the request path).
    eventually(
        "B sees what A counted alone",
        Duration::from_secs(5),
        || async {
            let status = cluster.b.status(&key).await;
            let counts = (
                used(&status, "requests_per_day"),
                used(&status, "tokens_per_day"),
            );
            (counts == (2 + admitted_alone, tokens_alone)).then_some(())
        },
    )
    .await;
    let report = json!({"usage": {"prompt_tokens": 1, "completion_tokens": 1}});
    let reported = cluster.a.post("/api/quota/usage", &key, report).await;
    assert_eq!(reported.status, StatusCode::ACCEPTED);
    assert_eq!(
        used(&cluster.b.status(&key).await, "requests_per_day"),
        3 + admitted_alone,
        "a call reported to A counts on B at once"
    );
    cluster.finish().await;
}

/// The proxy's reservations are held by the instance that admits them; one
/// whose settlement cannot reach Redis is settled by the instance alone, so
/// the call still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxied_call_in_flight_when_redis_goes_away_still_counts() {
    let upstream = Upstream::start(quotawatch::mock::MockOptions {
        chunk_delay: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let proxying = [
        ("QUOTAWATCH_UPSTREAM_URL", upstream.url.as_str()),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
    ];
    let Some(cluster) = Cluster::start("instances::proxied_over_outage", true, &proxying).await
    else {
        return;
    };
    let key = cluster
        .workspace(json!({"id": "acme", "limits": {"tokens_per_day": 1_000_000}}))
        .await;
    let chat = json!({"model": "gpt-4o-mini", "max_tokens": 500, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Say hello"}]});
    // Admitted while Redis is reachable; the stream then takes a second.
    let response = cluster.a.openai("/chat/completions", &key, chat).await;
    assert_eq!(response.status(), StatusCode::OK);
    let relay = cluster.relay.as_ref().expect("relay");
    relay.cut();
    let stream = response.text().await.expect("the stream");
    let actual = stream
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find_map(|chunk| chunk["usage"]["total_tokens"].as_u64())
        .expect("usage in the stream");
    eventually(
        "the call in A's history, with its actual tokens",
        Duration::from_secs(10),
        || async {
            let history = cluster
                .a
                .get("/api/quota/history?window=1h&step=1m", &key)
                .await;
            let total = |field: &str| -> i64 {
                history.body["points"]
                    .as_array()
                    .map(|points| points.iter().map(|p| p[field].as_i64().unwrap_or(0)).sum())
                    .unwrap_or(0)
            };
            (total("requests") == 1 && total("tokens") == actual as i64).then_some(())
        },
    )
    .await;
    relay.restore();
    // Redis charged the admission before the outage and keeps its estimate,
    // which is more than the call used.
    eventually("B sees the admission", Duration::from_secs(10), || async {
        let status = cluster.b.status(&key).await;
        (status["degraded"] == false && used(&status, "requests_per_day") == 1)
            .then(|| used(&status, "tokens_per_day"))
            .filter(|tokens| *tokens > actual)
    })
    .await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_local_mode_enforces_each_instances_share() {
    outage("local", async |cluster, key| {
        // 2 of 10 were used, so each of the 2 instances has 1 + 4 = 5 of 5:
        // it admits 4 more alone. The first one's call uses more tokens than
        // estimated, which must reach Redis too.
        let first = cluster.a.check(key, 10).await;
        assert_eq!(first.status, StatusCode::OK);
        let report = json!({"reservation_id": first.body["reservation_id"],
            "usage": {"prompt_tokens": 300, "completion_tokens": 200}});
        let settled = cluster.a.post("/api/quota/usage", key, report).await;
        assert_eq!(settled.status, StatusCode::ACCEPTED, "{:?}", settled.body);
        let mut admitted = 1;
        for _ in 0..7 {
            let response = prompt_check(&cluster.a, key).await;
            match response.status {
                StatusCode::OK => admitted += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("unexpected {other}: {:?}", response.body),
            }
        }
        assert_eq!(admitted, 4);
        let status = cluster.a.status(key).await;
        assert_eq!(status["degraded"], true);
        assert!(
            status["reasons"]
                .as_array()
                .expect("reasons")
                .contains(&json!("shared_store_unreachable"))
        );
        assert_eq!(status["limits"]["requests_per_minute"]["limit"], 5);
        let notifications = cluster.a.get("/api/quota/notifications", key).await;
        let outage = notifications.body["notifications"]
            .as_array()
            .expect("list")
            .iter()
            .find(|n| n["kind"] == "shared_store_unavailable")
            .cloned()
            .expect("an outage notification");
        assert_eq!(outage["severity"], "critical");
        assert!(
            cluster
                .a
                .metrics()
                .await
                .contains("quotawatch_shared_store_degraded 1")
        );
        (admitted, 500)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_closed_mode_refuses_with_503_and_retry() {
    outage("closed", async |cluster, key| {
        for _ in 0..3 {
            let refused = prompt_check(&cluster.a, key).await;
            assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(refused.error_code(), "shared_store_unavailable");
            assert_eq!(refused.header("x-should-retry"), Some("true"));
        }
        assert_eq!(cluster.a.status(key).await["degraded"], true);
        (0, 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_open_mode_admits_and_counts() {
    outage("open", async |cluster, key| {
        for _ in 0..12 {
            let admitted = prompt_check(&cluster.a, key).await;
            assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
        }
        let status = cluster.a.status(key).await;
        assert_eq!(status["degraded"], true);
        assert_eq!(used(&status, "requests_per_day"), 14);
        (12, 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_both_instances_loses_nothing() {
    let Some(mut cluster) = Cluster::start("instances::restart", false, &[]).await else {
        return;
    };
    let key = cluster
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 1000}}))
        .await;
    for server in [&cluster.a, &cluster.b] {
        for _ in 0..3 {
            assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
        }
    }
    let billing = json!({"status_code": 429,
        "error": fixture_json("error_429_insufficient_quota.json")["error"]});
    cluster.b.post("/api/quota/usage", &key, billing).await;
    eventually(
        "the notification is written",
        Duration::from_secs(5),
        || async { (billing_notifications(&cluster.a, &key).await == 1).then_some(()) },
    )
    .await;

    cluster.a.restart().await;
    cluster.b.restart().await;

    for server in [&cluster.a, &cluster.b] {
        let status = server.status(&key).await;
        assert_eq!(
            used(&status, "requests_per_day"),
            7,
            "6 checks and 1 report"
        );
        assert_eq!(status["status"], "quota_exceeded");
        let history = server.notification_history(&key).await;
        assert_eq!(history.len(), 1, "{history:?}");
        assert_eq!(history[0]["kind"], "upstream_quota_exhausted");
    }
    let workspaces = cluster.b.get("/api/workspaces", ADMIN_KEY).await;
    assert!(workspaces.body.to_string().contains("\"acme\""));
    cluster.finish().await;
}

/// Creates a workspace and a key through `server` alone, without waiting for
/// any other instance to know them; answers the key and its id.
async fn workspace_and_key(server: &TestServer, id: &str) -> (String, String) {
    let created = server
        .post("/api/workspaces", ADMIN_KEY, json!({"id": id}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let key = server
        .post(&format!("/api/workspaces/{id}/keys"), ADMIN_KEY, json!({}))
        .await;
    assert_eq!(key.status, StatusCode::CREATED, "{:?}", key.body);
    let text = |field: &str| key.body[field].as_str().expect(field).to_owned();
    (text("key"), text("id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_made_through_one_instance_works_on_the_other_at_the_next_request() {
    let upstream = Upstream::start(quotawatch::mock::MockOptions::default()).await;
    let proxying = [
        ("QUOTAWATCH_UPSTREAM_URL", upstream.url.as_str()),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
    ];
    let Some(cluster) = Cluster::start("instances::next_request", false, &proxying).await else {
        return;
    };
    let chat = json!({"model": "gpt-4o-mini", "max_tokens": 50,
        "messages": [{"role": "user", "content": "Say hello"}]});

    // Each workspace's very first request on B is the one under test.
    let (status_first, _) = workspace_and_key(&cluster.a, "status-first").await;
    let status = cluster.b.get("/api/quota/status", &status_first).await;
    assert_eq!(status.status, StatusCode::OK, "{:?}", status.body);
    assert_eq!(status.body["workspace"], "status-first");
    let proxied = cluster
        .b
        .openai("/chat/completions", &status_first, chat.clone())
        .await;
    assert_eq!(proxied.status(), StatusCode::OK);

    let (proxy_first, _) = workspace_and_key(&cluster.a, "proxy-first").await;
    let proxied = cluster
        .b
        .openai("/chat/completions", &proxy_first, chat)
        .await;
    assert_eq!(proxied.status(), StatusCode::OK);
    let status = cluster.b.status(&proxy_first).await;
    assert_eq!(used(&status, "requests_per_day"), 1);
    assert_eq!(
        used(&cluster.a.status(&proxy_first).await, "requests_per_day"),
        1
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_through_one_instance_is_refused_by_the_other_within_a_second() {
    // Whatever the flush interval: catalog changes do not wait for writes.
    let Some(cluster) = Cluster::start(
        "instances::revoked",
        false,
        &[("QUOTAWATCH_FLUSH_INTERVAL", "4s")],
    )
    .await
    else {
        return;
    };
    // Three in a row, so that no lucky timing passes for a rule.
    for n in 0..3 {
        let (key, key_id) = workspace_and_key(&cluster.a, &format!("ws-{n}")).await;
        // Known to B first, however B learns of keys: only the revocation is timed.
        eventually("B knows the key", Duration::from_secs(5), || async {
            (cluster.b.check(&key, 0).await.status == StatusCode::OK).then_some(())
        })
        .await;
        let revoked = cluster
            .a
            .send(
                reqwest::Method::DELETE,
                &format!("/api/workspaces/ws-{n}/keys/{key_id}"),
                ADMIN_KEY,
                None,
            )
            .await;
        assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{:?}", revoked.body);
        let refused_at = eventually(
            "B refuses the revoked key",
            Duration::from_secs(1),
            || async {
                let response = cluster.b.check(&key, 0).await;
                (response.status == StatusCode::UNAUTHORIZED).then_some(response)
            },
        )
        .await;
        assert_eq!(refused_at.error_code(), "invalid_api_key");
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_key_and_its_tokens_work_on_every_instance_and_end_together() {
    let Some(cluster) = Cluster::start("instances::tokens", false, &[]).await else {
        return;
    };
    workspace_and_key(&cluster.a, "acme").await;
    let created = cluster
        .a
        .post("/api/service-keys", ADMIN_KEY, json!({"name": "backend"}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let service = created.body["key"].as_str().expect("key").to_owned();
    let service_id = created.body["id"].as_str().expect("id").to_owned();
    // Made through A, the key mints on B at once, and B's token reads on A
    // (and A's on B): both instances sign with the one stored secret.
    let minted = cluster
        .b
        .post("/api/tokens", &service, json!({"workspace": "acme"}))
        .await;
    assert_eq!(minted.status, StatusCode::CREATED, "{:?}", minted.body);
    let token_from_b = minted.body["token"].as_str().expect("token").to_owned();
    let minted = cluster
        .a
        .post("/api/tokens", &service, json!({"workspace": "acme"}))
        .await;
    let token_from_a = minted.body["token"].as_str().expect("token").to_owned();
    for (server, token) in [(&cluster.a, &token_from_b), (&cluster.b, &token_from_a)] {
        assert_eq!(server.status(token).await["workspace"], "acme");
    }
    let revoked = cluster
        .a
        .send(
            reqwest::Method::DELETE,
            &format!("/api/service-keys/{service_id}"),
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    for token in [&token_from_a, &token_from_b] {
        let refused = eventually(
            "B refuses the tokens of the revoked key",
            Duration::from_secs(1),
            || async {
                let response = cluster.b.get("/api/quota/status", token).await;
                (response.status == StatusCode::UNAUTHORIZED).then_some(response)
            },
        )
        .await;
        assert_eq!(refused.error_code(), "invalid_api_key");
    }
    cluster.finish().await;
}

/// The ids of the workspace's notifications of `kind` that `server` lists,
/// active ones or (with `history`) all.
async fn notification_ids(
    server: &TestServer,
    key: &str,
    kind: &str,
    history: bool,
) -> Vec<String> {
    let path = if history {
        "/api/quota/notifications?include=history"
    } else {
        "/api/quota/notifications"
    };
    let listed = server.get(path, key).await;
    listed.body["notifications"]
        .as_array()
        .expect("notifications")
        .iter()
        .filter(|n| n["kind"] == kind)
        .map(|n| n["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_billing_block_has_one_notification_id_on_every_instance_and_in_history() {
    let Some(cluster) = Cluster::start("instances::one_id", false, &[]).await else {
        return;
    };
    let key = cluster.workspace(json!({"id": "acme"})).await;
    let admitted = cluster.a.check(&key, 10).await;
    assert_eq!(admitted.status, StatusCode::OK);
    let billing = json!({"reservation_id": admitted.body["reservation_id"], "status_code": 429,
        "error": fixture_json("error_429_insufficient_quota.json")["error"]});
    let reported = cluster.a.post("/api/quota/usage", &key, billing).await;
    assert_eq!(reported.body["status"], "quota_exceeded");

    let kind = "upstream_quota_exhausted";
    let on_a = notification_ids(&cluster.a, &key, kind, false).await;
    assert_eq!(on_a.len(), 1, "{on_a:?}");
    eventually("B lists the block", Duration::from_secs(1), || async {
        let on_b = notification_ids(&cluster.b, &key, kind, false).await;
        (!on_b.is_empty()).then_some(())
    })
    .await;
    assert_eq!(notification_ids(&cluster.b, &key, kind, false).await, on_a);
    eventually(
        "history holds the one notification",
        Duration::from_secs(5),
        || async {
            let a = notification_ids(&cluster.a, &key, kind, true).await;
            let b = notification_ids(&cluster.b, &key, kind, true).await;
            (a == on_a && b == on_a).then_some(())
        },
    )
    .await;
    cluster.finish().await;
}

/// How many keys `server` looked up in the database, from its metrics.
pub(crate) async fn key_lookups(server: &TestServer) -> u64 {
    let metrics = server.metrics().await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("quotawatch_key_lookups_total "))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no key lookup count in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn made_up_keys_cause_a_bounded_number_of_database_lookups() {
    let Some(cluster) = Cluster::start("instances::made_up_keys", false, &[]).await else {
        return;
    };
    let server = &cluster.b;
    let refused = |response: Response| {
        assert_eq!(
            response.status,
            StatusCode::UNAUTHORIZED,
            "{:?}",
            response.body
        );
        assert_eq!(response.error_code(), "invalid_api_key");
    };
    let before = key_lookups(server).await;
    // The same unknown key, again and again: looked up once.
    for _ in 0..50 {
        refused(server.check("qw_not-a-key-anyone-made", 0).await);
    }
    assert_eq!(key_lookups(server).await - before, 1);

    // Different made-up keys, all at once: looked up at the budget's rate.
    let keys: Vec<String> = (0..400).map(|n| format!("qw_made-up-{n}")).collect();
    let started = Instant::now();
    let attempts =
        futures_util::future::join_all(keys.iter().map(|key| server.check(key, 0))).await;
    let elapsed = started.elapsed();
    attempts.into_iter().for_each(refused);
    let looked_up = key_lookups(server).await - before - 1;
    // 20 at once, then 20 a second.
    let bound = 20 + (20.0 * elapsed.as_secs_f64()).ceil() as u64;
    println!("400 made-up keys in {elapsed:?}: {looked_up} lookups (bound {bound})");
    assert!(
        looked_up >= 1 && looked_up <= bound,
        "{looked_up} > {bound}"
    );
    cluster.finish().await;
}

/// A notification event seen on a WebSocket: kind, `raised` or `resolved`,
/// and id.
type Seen = (String, String, String);

/// Reads `ws` until it has seen every `(kind, event)` of `wanted`; answers
/// every notification event of those kinds it saw on the way, so that an
/// event under another id cannot pass unnoticed.
async fn notification_events(ws: &mut Ws, wanted: &[(&str, &str)]) -> Vec<Seen> {
    let seen = std::cell::RefCell::new(Vec::<Seen>::new());
    wait_for(ws, Duration::from_secs(10), |message| {
        let data = &message["data"];
        let kind = data["kind"].as_str().unwrap_or_default();
        if message["type"] == "notification" && wanted.iter().any(|(k, _)| *k == kind) {
            let event = message["event"].as_str().expect("event").to_owned();
            let id = data["id"].as_str().expect("id").to_owned();
            seen.borrow_mut().push((kind.to_owned(), event, id));
        }
        let seen = seen.borrow();
        wanted
            .iter()
            .all(|(kind, event)| seen.iter().any(|(k, e, _)| k == kind && e == event))
    })
    .await;
    seen.into_inner()
}

/// The one id each of `kinds` has among `seen`, in the order of `kinds`.
fn one_id_each(seen: &[Seen], kinds: &[&str]) -> Vec<String> {
    kinds
        .iter()
        .map(|kind| {
            let mut ids: Vec<&str> = seen
                .iter()
                .filter(|(k, _, _)| k == kind)
                .map(|(_, _, id)| id.as_str())
                .collect();
            ids.dedup();
            assert_eq!(ids.len(), 1, "one id for {kind} in {seen:?}");
            ids[0].to_owned()
        })
        .collect()
}

/// The workspace's notifications of `kinds` as the database stores them:
/// kind, id and whether they are resolved, by kind.
async fn stored_notifications(
    cluster: &Cluster,
    workspace: &str,
    kinds: &[&str],
) -> Vec<(String, String, bool)> {
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(&cluster.database.url)
        .await
        .expect("connect to the test database");
    sqlx::query_as(
        "SELECT kind, id, resolved_at IS NOT NULL FROM notifications WHERE workspace_id = $1 ORDER BY kind, id",
    )
    .bind(workspace)
    .fetch_all(&mut db)
    .await
    .expect("the stored notifications")
    .into_iter()
    .filter(|(kind, _, _): &(String, String, bool)| kinds.contains(&kind.as_str()))
    .collect()
}

/// Raises the causes of `kinds` through both instances at once with
/// `cause`, then ends them with `end`, and checks that every view of each
/// notification has one id: both instances' WebSocket events (raised and
/// resolved), both instances' REST lists, and the history in the database.
/// The workspace `acme` has `settings` (its limits, ...).
async fn one_id_per_episode(
    test: &str,
    settings: Value,
    kinds: &[&str],
    cause: impl AsyncFnOnce(&Cluster, &str),
    end: impl AsyncFnOnce(&Cluster, &str),
) {
    let Some(cluster) = Cluster::start(test, false, &[]).await else {
        return;
    };
    let mut workspace = settings;
    workspace["id"] = json!("acme");
    let key = cluster.workspace(workspace).await;
    let mut sockets = Vec::new();
    for server in [&cluster.a, &cluster.b] {
        let mut ws = connect(server, &key, "").await;
        wait_for(&mut ws, Duration::from_secs(2), |m| m["type"] == "status").await;
        sockets.push(ws);
    }
    let raised: Vec<(&str, &str)> = kinds.iter().map(|kind| (*kind, "raised")).collect();
    let resolved: Vec<(&str, &str)> = kinds.iter().map(|kind| (*kind, "resolved")).collect();

    cause(&cluster, &key).await;
    let mut ids = Vec::new();
    for ws in &mut sockets {
        ids.push(one_id_each(&notification_events(ws, &raised).await, kinds));
    }
    assert_eq!(ids[0], ids[1], "instance A's events name what B's name");
    let ids = ids.swap_remove(0);
    for server in [&cluster.a, &cluster.b] {
        for (kind, id) in kinds.iter().zip(&ids) {
            let listed = notification_ids(server, &key, kind, false).await;
            assert_eq!(listed, vec![id.clone()], "{kind} through REST");
        }
    }
    let mut expected: Vec<(String, String, bool)> = kinds
        .iter()
        .zip(&ids)
        .map(|(kind, id)| ((*kind).to_owned(), id.clone(), false))
        .collect();
    expected.sort();
    eventually("history holds them", Duration::from_secs(5), || async {
        (stored_notifications(&cluster, "acme", kinds).await == expected).then_some(())
    })
    .await;

    end(&cluster, &key).await;
    for ws in &mut sockets {
        let seen = notification_events(ws, &resolved).await;
        assert_eq!(one_id_each(&seen, kinds), ids, "resolved under their ids");
    }
    for server in [&cluster.a, &cluster.b] {
        for kind in kinds {
            assert!(notification_ids(server, &key, kind, false).await.is_empty());
        }
    }
    for stored in &mut expected {
        stored.2 = true;
    }
    eventually("history resolves them", Duration::from_secs(5), || async {
        (stored_notifications(&cluster, "acme", kinds).await == expected).then_some(())
    })
    .await;
    cluster.finish().await;
}

/// Requests through both instances at once, past the limit: each instance
/// sees the limit approach and run out in its own answers, at about the
/// same moment.
async fn past_the_limit_through_both(cluster: &Cluster, key: &str) {
    let (admitted, refused) = concurrent_checks(&[&cluster.a, &cluster.b], key, 20).await;
    assert_eq!((admitted, refused), (10, 10));
}

async fn usage_reset(cluster: &Cluster, _key: &str) {
    let reset = cluster
        .a
        .post(
            "/api/quota/reset",
            ADMIN_KEY,
            json!({"workspace": "acme", "what": "usage"}),
        )
        .await;
    assert_eq!(reset.status, StatusCode::OK, "{:?}", reset.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_minute_limit_has_one_notification_id_on_every_instance_and_in_history() {
    one_id_per_episode(
        "instances::minute_episode",
        json!({"limits": {"requests_per_minute": 10, "requests_per_day": null}}),
        &["approaching_limit", "rate_limited"],
        past_the_limit_through_both,
        usage_reset,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_day_limit_has_one_notification_id_on_every_instance_and_in_history() {
    one_id_per_episode(
        "instances::day_episode",
        json!({"limits": {"requests_per_minute": null, "requests_per_day": 10}}),
        &["approaching_limit", "daily_quota_exhausted"],
        past_the_limit_through_both,
        usage_reset,
    )
    .await;
}

/// A threshold crossed through both instances at once is one
/// notification (its id derives from the crossing), and a usage reset
/// through one resolves it on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_threshold_crossing_has_one_notification_id_on_every_instance_and_in_history() {
    one_id_per_episode(
        "instances::threshold_episode",
        json!({"limits": {"requests_per_minute": null, "requests_per_day": 10},
               "alert_thresholds": {"default": [50]}}),
        &["threshold_crossed"],
        past_the_limit_through_both,
        usage_reset,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_rate_limit_has_one_notification_id_on_every_instance_and_in_history() {
    one_id_per_episode(
        "instances::rate_limit_episode",
        json!({"limits": {}}),
        &["upstream_rate_limited"],
        // Both instances hear the upstream's 429 at once, each from a call
        // of its own; the hold they store ends two seconds later.
        async |cluster, key| {
            let report = json!({"status_code": 429,
                "error": fixture_json("error_429_rate_limit_requests.json")["error"],
                "headers": {"retry-after": "2"}});
            let (a, b) = tokio::join!(
                cluster.a.post("/api/quota/usage", key, report.clone()),
                cluster.b.post("/api/quota/usage", key, report.clone())
            );
            for reported in [a, b] {
                assert_eq!(
                    reported.body["status"], "rate_limited",
                    "{:?}",
                    reported.body
                );
            }
        },
        async |_, _| {},
    )
    .await;
}

/// Makes `cause` of workspace acme an episode named `id` that another
/// instance holds for a minute, as if it had raised the cause first.
async fn held_elsewhere(cluster: &Cluster, cause: Cause, id: &str) {
    let counters = RedisCounters::new(&cluster.redis_url, &cluster.prefix, Duration::from_secs(2))
        .expect("Redis URL");
    let step = EpisodeStep::Hold {
        cause,
        candidate: id.to_owned(),
    };
    let workspace = "acme".parse().expect("id");
    let named = counters
        .agree_episodes("elsewhere", Duration::from_secs(60), &[(&workspace, &step)])
        .await
        .expect("the episode is held");
    assert_eq!(named, vec![Some(id.to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cause_another_instance_raised_first_is_only_ever_seen_under_its_name() {
    let Some(cluster) = Cluster::start("instances::named_elsewhere", false, &[]).await else {
        return;
    };
    let key = cluster
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 10, "requests_per_day": null}}),
        )
        .await;
    let elsewhere = "ntf_00000000e15e3e7e";
    held_elsewhere(
        &cluster,
        Cause::Approaching(LimitKind::new(Metric::Requests, Window::Minute)),
        elsewhere,
    )
    .await;
    let mut ws = connect(&cluster.a, &key, "").await;
    wait_for(&mut ws, Duration::from_secs(2), |m| m["type"] == "status").await;
    for _ in 0..8 {
        assert_eq!(cluster.a.check(&key, 0).await.status, StatusCode::OK);
    }
    // A drew an id of its own, and lost: nobody ever sees it.
    let kind = "approaching_limit";
    assert_eq!(
        notification_ids(&cluster.a, &key, kind, false).await,
        vec![elsewhere.to_owned()],
        "listed as soon as the request that raised it is answered"
    );
    let seen = notification_events(&mut ws, &[(kind, "raised")]).await;
    assert_eq!(one_id_each(&seen, &[kind]), vec![elsewhere.to_owned()]);
    eventually("B names it alike", Duration::from_secs(2), || async {
        (notification_ids(&cluster.b, &key, kind, false).await == [elsewhere]).then_some(())
    })
    .await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notification_raised_while_redis_was_away_takes_the_agreed_id_when_it_returns() {
    let Some(cluster) = Cluster::start("instances::raised_apart", true, &[]).await else {
        return;
    };
    let key = cluster.workspace(json!({"id": "acme"})).await;
    // Another instance holds the episode of the rejected key already.
    let agreed = "ntf_00000000a9eed0e1";
    held_elsewhere(&cluster, Cause::UpstreamKeyRejected, agreed).await;
    let mut ws = connect(&cluster.a, &key, "").await;
    wait_for(&mut ws, Duration::from_secs(2), |m| m["type"] == "status").await;

    let relay = cluster.relay.as_ref().expect("relay");
    relay.cut();
    let rejected = json!({"status_code": 401,
        "error": fixture_json("error_401_invalid_api_key.json")["error"]});
    let reported = cluster.a.post("/api/quota/usage", &key, rejected).await;
    assert_eq!(reported.status, StatusCode::ACCEPTED, "{:?}", reported.body);
    // Cut off, A names it on its own.
    let kind = "upstream_errors";
    let seen = notification_events(&mut ws, &[(kind, "raised")]).await;
    let own = one_id_each(&seen, &[kind]).swap_remove(0);
    assert_ne!(own, agreed);

    // Back in touch, Redis decides: A's own is resolved and the agreed
    // one raised in its place.
    relay.restore();
    let seen = notification_events(&mut ws, &[(kind, "resolved"), (kind, "raised")]).await;
    assert_eq!(
        seen,
        vec![
            (kind.to_owned(), "resolved".to_owned(), own),
            (kind.to_owned(), "raised".to_owned(), agreed.to_owned())
        ]
    );
    assert_eq!(
        notification_ids(&cluster.a, &key, kind, false).await,
        vec![agreed.to_owned()]
    );
    cluster.finish().await;
}

/// The id of the active `upstream_quota_exhausted` notification the
/// workspace of `key` sees on `server`, if there is one.
async fn billing_notification_id(server: &TestServer, key: &str) -> Option<Value> {
    let listed = server.get("/api/quota/notifications", key).await.body;
    listed["notifications"]
        .as_array()?
        .iter()
        .find(|n| n["kind"] == "upstream_quota_exhausted")
        .map(|n| n["id"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_credential_blocked_through_one_instance_is_refused_by_the_other_until_one_probe_lifts_it()
 {
    let upstream = Upstream::start(quotawatch::mock::MockOptions::default()).await;
    let settings = [
        ("QUOTAWATCH_UPSTREAM_URL", upstream.url.as_str()),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
        ("QUOTAWATCH_PROBE_INTERVAL", "1s"),
    ];
    let Some(cluster) = Cluster::start("instances::credential", false, &settings).await else {
        return;
    };
    let chat = json!({"model": "gpt-4o-mini", "max_tokens": 20,
        "messages": [{"role": "user", "content": "Say hello"}]});
    let acme = cluster.workspace(json!({"id": "acme"})).await;
    let beta = cluster.workspace(json!({"id": "beta"})).await;

    // Acme's call through A meets the billing answer...
    upstream.set_scenario("insufficient_quota").await;
    let answer = cluster
        .a
        .openai("/chat/completions", &acme, chat.clone())
        .await;
    assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
    upstream.set_scenario("ok").await;

    // ...and B, told through Redis, refuses beta (same key) locally.
    eventually("B to show beta blocked", Duration::from_secs(5), || async {
        (cluster.b.status(&beta).await["status"] == "quota_exceeded").then_some(())
    })
    .await;
    let refused = cluster
        .b
        .openai("/chat/completions", &beta, chat.clone())
        .await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused
            .headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("false")
    );
    assert_eq!(upstream.hits("/chat/completions").await, 1);
    // One notification, under one id on both instances.
    let on_a = billing_notification_id(&cluster.a, &acme).await;
    assert!(on_a.is_some());
    assert_eq!(billing_notification_id(&cluster.b, &beta).await, on_a);

    // The probe goes from B once the interval ends; its success lifts the
    // block on A too.
    eventually(
        "B's probe to lift the block",
        Duration::from_secs(5),
        || async {
            (cluster
                .b
                .openai("/chat/completions", &beta, chat.clone())
                .await
                .status()
                == StatusCode::OK)
                .then_some(())
        },
    )
    .await;
    eventually("A to lift the block", Duration::from_secs(5), || async {
        (cluster.a.status(&acme).await["status"] == "normal").then_some(())
    })
    .await;
    assert_eq!(
        upstream.hits("/chat/completions").await,
        2,
        "exactly one probe went upstream"
    );
    let answer = cluster.a.openai("/chat/completions", &acme, chat).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(billing_notification_id(&cluster.a, &acme).await, None);
    cluster.finish().await;
}

/// Each instance notes the calls it settles at once, and reads the other's
/// from history every 60 flushes (here every 6 seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spend_by_model_counts_the_calls_every_instance_recorded() {
    let Some(cluster) = Cluster::start(
        "instances::spend_by_model",
        false,
        &[("QUOTAWATCH_FLUSH_INTERVAL", "100ms")],
    )
    .await
    else {
        return;
    };
    let key = cluster.workspace(json!({"id": "acme"})).await;
    // 100,000 prompt tokens at $2.50/M through A, at $0.15/M through B.
    for (server, model) in [(&cluster.a, "gpt-4o"), (&cluster.b, "gpt-4o-mini")] {
        let usage = json!({"prompt_tokens": 100_000, "completion_tokens": 0});
        let reported = server
            .post(
                "/api/quota/usage",
                &key,
                json!({"model": model, "usage": usage}),
            )
            .await;
        assert_eq!(reported.status, StatusCode::ACCEPTED, "{:?}", reported.body);
    }
    let by_model = json!({
        "gpt-4o": {"usd": 0.25, "prompt_tokens": 100_000, "cached_tokens": 0, "completion_tokens": 0},
        "gpt-4o-mini": {"usd": 0.015, "prompt_tokens": 100_000, "cached_tokens": 0, "completion_tokens": 0},
    });
    for server in [&cluster.a, &cluster.b] {
        let status = eventually(
            "both calls in the spend by model",
            Duration::from_secs(20),
            || async {
                let status = server.status(&key).await;
                (status["spend"]["today"]["by_model"] == by_model).then_some(status)
            },
        )
        .await;
        assert_eq!(
            status["spend"]["today"]["usd"],
            json!(0.265),
            "shared totals"
        );
    }
    cluster.finish().await;
}
