//! Each REST endpoint against a real server and SQLite file.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use std::time::Duration;

use crate::support::{ADMIN_KEY, TestServer, eventually, fixture_headers, fixture_json};

#[tokio::test]
async fn the_status_document_has_every_documented_field() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "name": "Acme", "timezone": "Europe/Berlin",
            "limits": {"requests_per_minute": 10, "requests_per_day": 100, "tokens_per_minute": 1000, "tokens_per_day": 10000}}))
        .await;
    assert_eq!(server.check(&key, 100).await.status, StatusCode::OK);
    let doc = server.status(&key).await;
    for field in [
        "workspace",
        "status",
        "since",
        "reasons",
        "blocked",
        "retry_after_seconds",
        "limits",
        "upstream",
        "errors",
        "updated_at",
    ] {
        assert!(doc.get(field).is_some(), "missing {field}: {doc}");
    }
    assert_eq!(doc["workspace"], "acme");
    assert_eq!(doc["status"], "normal");
    assert_eq!(doc["blocked"], false);
    let rpm = &doc["limits"]["requests_per_minute"];
    assert_eq!(
        (
            rpm["limit"].as_u64(),
            rpm["used"].as_u64(),
            rpm["remaining"].as_u64()
        ),
        (Some(10), Some(1), Some(9))
    );
    assert_eq!(rpm["utilization"].as_f64(), Some(0.1));
    assert_eq!(doc["limits"]["tokens_per_minute"]["used"], 100);
    // The day ends at midnight in Berlin: 23:00 or 22:00 UTC.
    let day_end = doc["limits"]["requests_per_day"]["resets_at"]
        .as_str()
        .expect("resets_at");
    assert!(
        day_end.ends_with("T23:00:00.000Z") || day_end.ends_with("T22:00:00.000Z"),
        "{day_end}"
    );
    assert_eq!(doc["errors"]["rate_limited"], 0);
    assert_eq!(doc["errors"]["last"], Value::Null);
    assert_eq!(
        doc["usage"],
        json!({"last_minute": {"requests": 1, "tokens": 100, "usd": 0.0},
            "today": {"requests": 1, "tokens": 100, "usd": 0.0},
            "this_month": {"requests": 1, "tokens": 100, "usd": 0.0}})
    );
    server.stop().await;
}

#[tokio::test]
async fn usage_is_counted_and_shown_without_any_limit() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "free", "limits": {"requests_per_minute": null, "requests_per_day": null, "tokens_per_minute": null, "tokens_per_day": null}}))
        .await;
    for _ in 0..3 {
        assert_eq!(server.check(&key, 40).await.status, StatusCode::OK);
    }
    let doc = server.status(&key).await;
    assert_eq!(doc["limits"], json!({}), "no limits: {doc}");
    assert_eq!(
        doc["usage"]["today"],
        json!({"requests": 3, "tokens": 120, "usd": 0.0})
    );
    assert_eq!(
        doc["usage"]["last_minute"],
        json!({"requests": 3, "tokens": 120, "usd": 0.0})
    );
    server.stop().await;
}

#[tokio::test]
async fn a_check_reserves_the_estimate_and_a_usage_report_settles_it() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"tokens_per_minute": 10000, "tokens_per_day": 100000}}),
        )
        .await;
    let check = server.check(&key, 1000).await;
    assert_eq!(check.status, StatusCode::OK);
    assert_eq!(check.body["allowed"], true);
    assert_eq!(check.body["remaining"]["tokens_per_minute"], 9000);
    assert_eq!(check.header("x-ratelimit-remaining-tokens"), Some("9000"));
    let reservation = check.body["reservation_id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert!(reservation.starts_with("rsv_"));
    assert_eq!(
        server.status(&key).await["limits"]["tokens_per_minute"]["used"],
        1000
    );

    let report = server
        .post(
            "/api/quota/usage",
            &key,
            json!({"reservation_id": reservation, "model": "gpt-4o-mini",
                "usage": fixture_json("chat_completion.json")["usage"], "status_code": 200,
                "headers": fixture_headers("chat_completion.headers"), "latency_ms": 840}),
        )
        .await;
    assert_eq!(report.status, StatusCode::ACCEPTED, "{:?}", report.body);
    let actual = fixture_json("chat_completion.json")["usage"]["total_tokens"]
        .as_u64()
        .expect("total");
    assert_eq!(
        report.body["limits"]["tokens_per_minute"]["used"].as_u64(),
        Some(actual)
    );
    assert_eq!(
        report.body["limits"]["tokens_per_day"]["used"].as_u64(),
        Some(actual)
    );
    // The upstream's own headroom comes from the reported headers.
    assert_eq!(report.body["upstream"]["requests"]["limit"], 500);
    assert_eq!(report.body["upstream"]["tokens"]["remaining"], 28713);

    // A reservation settles once.
    let again = server
        .post(
            "/api/quota/usage",
            &key,
            json!({"reservation_id": reservation}),
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.error_code(), "reservation_not_found");
    server.stop().await;
}

#[tokio::test]
async fn a_usage_report_without_reservation_counts_one_request_and_its_tokens() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_day": 100, "tokens_per_day": 100000}}),
        )
        .await;
    for (usage, expected_tokens) in [
        (
            fixture_json("embeddings.json")["usage"].clone(),
            fixture_json("embeddings.json")["usage"]["total_tokens"].as_u64(),
        ),
        (
            fixture_json("responses.json")["usage"].clone(),
            fixture_json("responses.json")["usage"]["total_tokens"].as_u64(),
        ),
    ] {
        let before = server.status(&key).await["limits"]["tokens_per_day"]["used"]
            .as_u64()
            .expect("used");
        let report = server
            .post("/api/quota/usage", &key, json!({"usage": usage}))
            .await;
        assert_eq!(report.status, StatusCode::ACCEPTED, "{:?}", report.body);
        let after = report.body["limits"]["tokens_per_day"]["used"]
            .as_u64()
            .expect("used");
        assert_eq!(Some(after - before), expected_tokens);
    }
    assert_eq!(
        server.status(&key).await["limits"]["requests_per_day"]["used"],
        2
    );
    server.stop().await;
}

#[tokio::test]
async fn an_upstream_billing_error_blocks_without_retry_until_reset() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let error = fixture_json("error_429_credit_balance_exhausted.json")["error"].clone();
    let report = server
        .post(
            "/api/quota/usage",
            &key,
            json!({"status_code": 429, "error": error}),
        )
        .await;
    assert_eq!(report.body["status"], "quota_exceeded");
    assert_eq!(
        report.body["reasons"],
        json!(["upstream_credit_balance_exhausted"])
    );
    assert_eq!(report.body["blocked"], true);
    assert_eq!(report.body["retry_after_seconds"], Value::Null);
    assert_eq!(report.body["errors"]["insufficient_quota"], 1);
    assert_eq!(
        report.body["errors"]["last"]["code"],
        "credit_balance_exhausted"
    );

    let notifications = server.get("/api/quota/notifications", &key).await;
    let list = notifications.body["notifications"]
        .as_array()
        .expect("list");
    assert_eq!(list.len(), 1, "{list:?}");
    let notification = &list[0];
    assert_eq!(notification["kind"], "upstream_quota_exhausted");
    assert_eq!(notification["severity"], "critical");
    assert_eq!(notification["resolves_at"], Value::Null);
    assert!(
        notification["suggested_actions"][0]
            .as_str()
            .expect("action")
            .contains("Add credits in the OpenAI billing settings")
    );

    let refused = server.check(&key, 0).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["error"]["type"], "insufficient_quota");
    assert_eq!(refused.error_code(), "credit_balance_exhausted");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("acme")
    );
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    assert_eq!(
        refused.header("retry-after"),
        None,
        "no time is known for billing"
    );
    assert!(refused.body["error"].get("param").is_some());

    let reset = server
        .post("/api/quota/reset", ADMIN_KEY, json!({"workspace": "acme"}))
        .await;
    assert_eq!(reset.status, StatusCode::OK);
    assert_eq!(reset.body["reset"], json!(["acme"]));
    assert_eq!(server.status(&key).await["status"], "normal");
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    let active = server.get("/api/quota/notifications", &key).await;
    assert_eq!(active.body["notifications"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn an_upstream_rate_limit_holds_requests_until_retry_after() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let report = server
        .post(
            "/api/quota/usage",
            &key,
            json!({"status_code": 429, "error": fixture_json("error_429_rate_limit_requests.json")["error"],
                "headers": fixture_headers("error_429_rate_limit_requests.headers")}),
        )
        .await;
    assert_eq!(report.body["status"], "rate_limited");
    assert_eq!(report.body["reasons"], json!(["upstream_rate_limited"]));
    assert_eq!(report.body["upstream"]["requests"]["limit"], 3);
    assert_eq!(report.body["upstream"]["requests"]["remaining"], 0);
    let refused = server.check(&key, 0).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "upstream_rate_limited");
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((19..=20).contains(&retry_after), "{retry_after}");
    let retry_after_ms: u64 = refused
        .header("retry-after-ms")
        .expect("ms")
        .parse()
        .expect("ms");
    assert!(
        (18_000..=20_000).contains(&retry_after_ms),
        "{retry_after_ms}"
    );
    assert_eq!(
        refused.header("x-should-retry"),
        None,
        "waiting helps, so the SDKs may retry"
    );
    let notifications = server.get("/api/quota/notifications", &key).await;
    assert_eq!(
        notifications.body["notifications"][0]["kind"],
        "upstream_rate_limited"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_local_minute_refusal_has_openai_shape_and_headers() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 2, "requests_per_day": null}}),
        )
        .await;
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    let refused = server.check(&key, 0).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let error = &refused.body["error"];
    assert_eq!(error["type"], "requests");
    assert_eq!(error["code"], "rate_limit_exceeded");
    let message = error["message"].as_str().expect("message");
    assert!(
        message.contains("acme")
            && message.contains("requests_per_minute")
            && message.contains("2 of 2"),
        "{message}"
    );
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after));
    assert!(refused.header("retry-after-ms").is_some());
    assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(
        refused
            .header("x-ratelimit-reset-requests")
            .expect("reset")
            .ends_with('s')
    );
    assert_eq!(refused.header("x-should-retry"), None);
    let status = server.status(&key).await;
    assert_eq!(status["status"], "rate_limited");
    assert_eq!(status["errors"]["refused"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_daily_refusal_tells_clients_not_to_retry() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 1, "tokens_per_day": 100}}))
        .await;
    assert_eq!(server.check(&key, 10).await.status, StatusCode::OK);
    let refused = server.check(&key, 10).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "daily_limit_exceeded");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    assert!(
        refused.header("retry-after").is_some(),
        "the reset time is known"
    );
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("100"));
    assert_eq!(server.status(&key).await["status"], "quota_exceeded");
    let notifications = server.get("/api/quota/notifications", &key).await;
    let first = &notifications.body["notifications"][0];
    assert_eq!(first["kind"], "daily_quota_exhausted");
    assert_eq!(first["limit"], "requests_per_day");
    assert!(
        first["message"]
            .as_str()
            .expect("message")
            .contains("1 of 1 requests today")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_request_bigger_than_a_whole_limit_is_refused_for_good() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"tokens_per_minute": 1000}}))
        .await;
    let refused = server.check(&key, 5000).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "request_too_large");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    assert_eq!(server.status(&key).await["status"], "normal");
    server.stop().await;
}

#[tokio::test]
async fn notifications_keep_resolved_ones_in_history() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 10}}))
        .await;
    for _ in 0..8 {
        assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    }
    let active = server.get("/api/quota/notifications", &key).await;
    assert_eq!(active.body["status"], "warning");
    let notification = active.body["notifications"][0].clone();
    assert_eq!(notification["kind"], "approaching_limit");
    assert_eq!(notification["limit"], "requests_per_day");
    assert_eq!(notification["resolved_at"], Value::Null);
    for field in [
        "id",
        "severity",
        "kind",
        "title",
        "message",
        "suggested_actions",
        "limit",
        "created_at",
        "resolves_at",
    ] {
        assert!(notification.get(field).is_some(), "missing {field}");
    }
    // More requests do not repeat the notification.
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    let still = server.get("/api/quota/notifications", &key).await;
    assert_eq!(
        still.body["notifications"].as_array().map(Vec::len),
        Some(1)
    );

    server
        .post("/api/quota/reset", ADMIN_KEY, json!({"workspace": "acme"}))
        .await;
    let active = server.get("/api/quota/notifications", &key).await;
    assert_eq!(active.body["notifications"], json!([]));
    assert_eq!(active.body["status"], "normal");
    let history = server
        .get("/api/quota/notifications?include=history", &key)
        .await;
    let list = history.body["notifications"].as_array().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], notification["id"]);
    assert!(list[0]["resolved_at"].is_string());
    let bad = server
        .get("/api/quota/notifications?include=everything", &key)
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.body["error"]["param"], "include");
    server.stop().await;
}

#[tokio::test]
async fn reset_needs_the_admin_key() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    server.workspace(json!({"id": "beta"})).await;
    let forbidden = server
        .post("/api/quota/reset", &key, json!({"workspace": "acme"}))
        .await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert_eq!(forbidden.error_code(), "admin_key_required");
    let wrong = server
        .post("/api/quota/reset", "qw_not_a_key", json!({"all": true}))
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let missing = server
        .client
        .post(server.url("/api/quota/reset"))
        .json(&json!({"all": true}))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let neither = server.post("/api/quota/reset", ADMIN_KEY, json!({})).await;
    assert_eq!(neither.status, StatusCode::BAD_REQUEST);
    let unknown = server
        .post("/api/quota/reset", ADMIN_KEY, json!({"workspace": "nope"}))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let all = server
        .post("/api/quota/reset", ADMIN_KEY, json!({"all": true}))
        .await;
    assert_eq!(all.status, StatusCode::OK);
    let mut reset: Vec<String> = serde_json::from_value(all.body["reset"].clone()).expect("list");
    reset.sort();
    assert_eq!(reset, ["acme", "beta", "default"]);
    server.stop().await;
}

#[tokio::test]
async fn history_counts_requests_tokens_and_errors_per_step() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "timezone": "Asia/Tokyo"}))
        .await;
    for tokens in [100, 200] {
        let check = server.check(&key, 500).await;
        let reservation = check.body["reservation_id"].clone();
        server
            .post("/api/quota/usage", &key, json!({"reservation_id": reservation, "usage": {"prompt_tokens": tokens, "completion_tokens": 1}, "latency_ms": 100}))
            .await;
    }
    server
        .post("/api/quota/usage", &key, json!({"status_code": 500, "error": fixture_json("error_500_server_error.json")["error"]}))
        .await;
    // A write in flight can hide the newest requests for a moment.
    let minutes = eventually(
        "all three requests in history",
        Duration::from_secs(5),
        || async {
            let minutes = server
                .get("/api/quota/history?window=1h&step=1m", &key)
                .await;
            let requests: i64 = minutes.body["points"]
                .as_array()?
                .iter()
                .map(|p| p["requests"].as_i64().unwrap_or(0))
                .sum();
            (requests == 3).then_some(minutes)
        },
    )
    .await;
    assert_eq!(minutes.status, StatusCode::OK, "{:?}", minutes.body);
    let points = minutes.body["points"].as_array().expect("points");
    assert_eq!(points.len(), 60);
    let total = |field: &str| {
        points
            .iter()
            .map(|p| p[field].as_i64().unwrap_or(0))
            .sum::<i64>()
    };
    assert_eq!(total("requests"), 3);
    assert_eq!(total("tokens"), 302);
    assert_eq!(total("prompt_tokens"), 300);
    assert_eq!(total("errors"), 1);
    let hours = server
        .get("/api/quota/history?window=7d&step=1h", &key)
        .await;
    assert_eq!(hours.body["points"].as_array().map(Vec::len), Some(168));
    let days = server
        .get("/api/quota/history?window=30d&step=1d", &key)
        .await;
    let days = days.body["points"].as_array().expect("points").clone();
    assert_eq!(days.len(), 30);
    assert_eq!(
        days[29]["requests"], 3,
        "today's requests are in the last day"
    );
    // Days start at midnight in Tokyo (15:00 UTC).
    assert_eq!(
        days[29]["t"].as_i64().expect("t").rem_euclid(86_400_000),
        15 * 3_600_000
    );
    let default = server.get("/api/quota/history", &key).await;
    assert_eq!(default.body["points"].as_array().map(Vec::len), Some(1440));
    for (query, param) in [
        ("window=3d&step=1m", "window"),
        ("step=1w", "step"),
        ("window=90m&step=1h", "window"),
        ("window=soon", "window"),
    ] {
        let bad = server
            .get(&format!("/api/quota/history?{query}"), &key)
            .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(bad.body["error"]["param"], param, "{query}");
    }
    server.stop().await;
}

/// Month limits are set, shown and charted like the day's: in the
/// workspace's body, its status (limits and `usage.this_month`) and its
/// history by calendar month; a month limit of 0 is refused naming it.
#[tokio::test]
async fn month_limits_are_set_shown_and_charted_like_the_days() {
    let server = TestServer::start(&[]).await;
    let created = server
        .post(
            "/api/workspaces",
            ADMIN_KEY,
            json!({"id": "acme", "timezone": "Asia/Tokyo",
                "limits": {"requests_per_month": 300, "tokens_per_month": 50_000}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["limits"]["requests_per_month"], 300);
    assert_eq!(created.body["limits"]["tokens_per_month"], 50_000);
    for limit in ["requests_per_month", "tokens_per_month"] {
        let zero = server
            .send(
                Method::PATCH,
                "/api/workspaces/acme",
                ADMIN_KEY,
                Some(json!({"limits": {limit: 0}})),
            )
            .await;
        assert_eq!(zero.status, StatusCode::BAD_REQUEST, "{limit}");
        assert_eq!(zero.body["error"]["param"], limit);
    }
    let patched = server
        .send(
            Method::PATCH,
            "/api/workspaces/acme",
            ADMIN_KEY,
            Some(json!({"limits": {"requests_per_month": null}})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    assert_eq!(patched.body["limits"]["requests_per_month"], Value::Null);
    assert_eq!(patched.body["limits"]["tokens_per_month"], 50_000, "kept");
    let key = server
        .post("/api/workspaces/acme/keys", ADMIN_KEY, json!({}))
        .await
        .body["key"]
        .as_str()
        .expect("key")
        .to_owned();
    for _ in 0..2 {
        server
            .post(
                "/api/quota/usage",
                &key,
                json!({"usage": {"prompt_tokens": 20, "completion_tokens": 5}}),
            )
            .await;
    }
    let status = server.status(&key).await;
    assert_eq!(
        status["usage"]["this_month"],
        json!({"requests": 2, "tokens": 50, "usd": 0.0})
    );
    assert_eq!(status["limits"]["tokens_per_month"]["used"], 50);
    let months = eventually(
        "both calls in monthly history",
        Duration::from_secs(5),
        || async {
            let months = server
                .get("/api/quota/history?window=90d&step=1mo", &key)
                .await;
            let points = months.body["points"].as_array()?.clone();
            (points.last()?["requests"] == 2).then_some(points)
        },
    )
    .await;
    assert_eq!(months.len(), 3);
    // Months start at midnight in Tokyo (15:00 UTC) on the first.
    let start = months[2]["t"].as_i64().expect("t");
    let start = chrono::DateTime::from_timestamp_millis(start).expect("instant");
    assert_eq!(
        start
            .with_timezone(&chrono_tz::Asia::Tokyo)
            .format("%d %H:%M")
            .to_string(),
        "01 00:00"
    );
    server.stop().await;
}

/// A workspace keeps at most 50 model names per day in history; calls of
/// further models count under `other`, so made-up names cannot grow the
/// database, and nothing is lost from the totals.
#[tokio::test]
async fn spend_is_charted_in_history_and_counted_in_metrics_per_model() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    // The chat fixture's usage for gpt-4o-mini: 19 prompt tokens at $0.15/M
    // and 10 completion tokens at $0.60/M, $0.00000885; twice.
    let usage = fixture_json("chat_completion.json")["usage"].clone();
    for _ in 0..2 {
        let reported = server
            .post(
                "/api/quota/usage",
                &key,
                json!({"model": "gpt-4o-mini", "usage": usage}),
            )
            .await;
        assert_eq!(reported.status, StatusCode::ACCEPTED, "{:?}", reported.body);
    }
    let spent = |points: &Value| -> f64 {
        points.as_array().map_or(0.0, |points| {
            points
                .iter()
                .map(|p| p["usd"].as_f64().unwrap_or(0.0))
                .sum()
        })
    };
    let days = eventually("both calls in history", Duration::from_secs(5), || async {
        let days = server
            .get("/api/quota/history?window=30d&step=1d", &key)
            .await;
        let requests: i64 = days.body["points"]
            .as_array()?
            .iter()
            .map(|p| p["requests"].as_i64().unwrap_or(0))
            .sum();
        (requests == 2).then_some(days)
    })
    .await;
    assert!(
        (spent(&days.body["points"]) - 0.0000177).abs() < 1e-12,
        "{:?}",
        days.body
    );
    let metrics = server.metrics().await;
    let line = metrics
        .lines()
        .find(|line| {
            line.starts_with("quotawatch_cost_usd_total{")
                && line.contains("workspace=\"acme\"")
                && line.contains("model=\"gpt-4o-mini\"")
        })
        .unwrap_or_else(|| panic!("no cost line in {metrics}"));
    let value: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!((value - 0.0000177).abs() < 1e-12, "{line}");
    server.stop().await;
}

#[tokio::test]
async fn history_keeps_a_bounded_number_of_models_per_day() {
    use sqlx::Connection;
    const MODELS: i64 = 90;
    const CAP: i64 = 50;
    let mut server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    for i in 0..MODELS {
        if i == 80 {
            // A restart does not open the day to new names.
            server.restart().await;
        }
        let answer = server
            .post(
                "/api/quota/usage",
                &key,
                json!({"model": format!("made-up-{i}"),
                       "usage": {"prompt_tokens": 2, "completion_tokens": 1}}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
    }
    let url = server.database_url.clone();
    // Per stored day: (its model rows, its requests, rows named `other`).
    let days: Vec<(i64, i64, i64)> = eventually(
        "every call in daily history",
        Duration::from_secs(10),
        || async {
            let mut db = sqlx::SqliteConnection::connect(&url).await.ok()?;
            let days: Vec<(i64, i64, i64)> = sqlx::query_as(
                "SELECT COUNT(*), CAST(SUM(requests) AS BIGINT), CAST(SUM(model = 'other') AS BIGINT) FROM rollups WHERE workspace_id = 'acme' AND resolution = 'd' GROUP BY bucket",
            )
            .fetch_all(&mut db)
            .await
            .ok()?;
            (days.iter().map(|day| day.1).sum::<i64>() == MODELS).then_some(days)
        },
    )
    .await;
    for (rows, _, other) in &days {
        assert!(*rows <= CAP + 1, "{rows} model rows in one day");
        assert!(*other <= 1);
    }
    if let [(rows, _, other)] = days[..] {
        assert_eq!((rows, other), (CAP + 1, 1), "50 names and other");
    }
    let history = server
        .get("/api/quota/history?window=2d&step=1d", &key)
        .await;
    let points = history.body["points"].as_array().expect("points");
    let sum = |field: &str| -> i64 { points.iter().map(|p| p[field].as_i64().unwrap_or(0)).sum() };
    assert_eq!((sum("requests"), sum("tokens")), (MODELS, 3 * MODELS));
    server.stop().await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_api_route() {
    let server = TestServer::start(&[]).await;
    let doc = server
        .client
        .get(server.url("/api/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(doc.status(), StatusCode::OK);
    let doc: Value = doc.json().await.expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let expected = [
        ("/api/quota/status", "get"),
        ("/api/quota/notifications", "get"),
        ("/api/quota/check", "post"),
        ("/api/quota/usage", "post"),
        ("/api/quota/reset", "post"),
        ("/api/quota/history", "get"),
        ("/api/quota/ws-ticket", "post"),
        ("/api/quota/ws", "get"),
        ("/api/workspaces", "get"),
        ("/api/workspaces", "post"),
        ("/api/workspaces/{id}", "get"),
        ("/api/workspaces/{id}", "patch"),
        ("/api/workspaces/{id}", "delete"),
        ("/api/workspaces/{id}/keys", "post"),
        ("/api/workspaces/{id}/keys", "get"),
        ("/api/workspaces/{id}/keys/{key_id}", "delete"),
        ("/api/service-keys", "post"),
        ("/api/service-keys", "get"),
        ("/api/service-keys/{key_id}", "delete"),
        ("/api/tokens", "post"),
        ("/api/credentials", "get"),
        ("/api/credentials/{credential}/lift", "post"),
        ("/api/alerts/channels", "get"),
        ("/api/alerts/channels", "post"),
        ("/api/alerts/channels/{id}", "get"),
        ("/api/alerts/channels/{id}", "patch"),
        ("/api/alerts/channels/{id}", "delete"),
        ("/api/alerts/deliveries", "get"),
        ("/api/alerts/test", "post"),
        ("/api/prices", "get"),
        ("/api/prices/reload", "post"),
        ("/api/openapi.json", "get"),
    ];
    for (path, method) in expected {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    let documented: usize = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .filter(|(path, _)| path.starts_with("/api"))
        .map(|(_, item)| item.as_object().map_or(0, |ops| ops.len()))
        .sum();
    assert_eq!(
        documented,
        expected.len(),
        "an /api route is documented but not tested here"
    );
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    server.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let server = TestServer::start(&[]).await;
    let health = server.get("/healthz", "").await;
    assert_eq!(
        (health.status, health.body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let ready = server.get("/readyz", "").await;
    assert_eq!(
        (ready.status, ready.body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    server.stop().await;
}

#[tokio::test]
async fn workspaces_and_keys_are_managed_by_the_admin() {
    let server = TestServer::start(&[
        ("OPENAI_RATE_LIMIT_PER_MINUTE", "60"),
        ("OPENAI_RATE_LIMIT_PER_DAY", "600"),
    ])
    .await;
    let created = server
        .post("/api/workspaces", ADMIN_KEY, json!({"id": "acme", "name": "Acme Inc", "limits": {"tokens_per_day": 5000, "requests_per_day": null}}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(
        created.body,
        json!({"id": "acme", "name": "Acme Inc", "timezone": "UTC", "warn_at": 0.8, "upstream_key_env": null,
            "upstream_organization": null, "upstream_project": null,
            "limits": {"requests_per_minute": 60, "requests_per_day": null, "requests_per_month": null,
                "tokens_per_minute": null, "tokens_per_day": 5000, "tokens_per_month": null,
                "usd_per_minute": null, "usd_per_day": null, "usd_per_month": null},
            "alert_thresholds": {"default": [50, 80, 95, 100], "limits": {}}})
    );
    let duplicate = server
        .post("/api/workspaces", ADMIN_KEY, json!({"id": "acme"}))
        .await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    let bad_zone = server
        .post(
            "/api/workspaces",
            ADMIN_KEY,
            json!({"id": "beta", "timezone": "Mars/Base"}),
        )
        .await;
    assert_eq!(bad_zone.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_zone.body["error"]["param"], "timezone");
    let bad_id = server
        .post("/api/workspaces", ADMIN_KEY, json!({"id": "Not Valid"}))
        .await;
    assert_eq!(bad_id.body["error"]["param"], "id");

    let patched = server
        .send(
            Method::PATCH,
            "/api/workspaces/acme",
            ADMIN_KEY,
            Some(json!({"limits": {"requests_per_minute": 5}, "warn_at": 0.9})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    assert_eq!(patched.body["limits"]["requests_per_minute"], 5);
    assert_eq!(
        patched.body["limits"]["tokens_per_day"], 5000,
        "PATCH keeps what it does not name"
    );
    assert_eq!(patched.body["warn_at"], 0.9);
    let rename = server
        .send(
            Method::PATCH,
            "/api/workspaces/acme",
            ADMIN_KEY,
            Some(json!({"id": "other"})),
        )
        .await;
    assert_eq!(rename.status, StatusCode::BAD_REQUEST);

    let list = server.get("/api/workspaces", ADMIN_KEY).await;
    let ids: Vec<&str> = list.body["workspaces"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert_eq!(ids, ["acme", "default"]);

    let key = server
        .post("/api/workspaces/acme/keys", ADMIN_KEY, json!({}))
        .await;
    assert_eq!(key.status, StatusCode::CREATED);
    let plaintext = key.body["key"].as_str().expect("key").to_owned();
    let key_id = key.body["id"].as_str().expect("id").to_owned();
    assert!(
        plaintext.starts_with("qw_") && plaintext.len() >= 3 + 22,
        "128 bits or more"
    );
    let own = server.get("/api/workspaces/acme", &plaintext).await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(
        own.body["limits"]["requests_per_minute"], 5,
        "the engine follows the PATCH"
    );
    let keys = server.get("/api/workspaces/acme/keys", ADMIN_KEY).await;
    assert_eq!(keys.body["keys"][0]["id"], key_id.as_str());
    assert!(
        keys.body.to_string().find(&plaintext).is_none(),
        "listed keys never include the key"
    );

    let revoked = server
        .send(
            Method::DELETE,
            &format!("/api/workspaces/acme/keys/{key_id}"),
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    assert_eq!(
        server.get("/api/quota/status", &plaintext).await.status,
        StatusCode::UNAUTHORIZED
    );
    let again = server
        .send(
            Method::DELETE,
            &format!("/api/workspaces/acme/keys/{key_id}"),
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);

    let deleted = server
        .send(Method::DELETE, "/api/workspaces/acme", ADMIN_KEY, None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        server.get("/api/workspaces/acme", ADMIN_KEY).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server
            .get("/api/quota/status?workspace=acme", ADMIN_KEY)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test]
async fn one_probe_per_interval_goes_through_a_billing_block_and_its_success_lifts_it() {
    let server = TestServer::start(&[("QUOTAWATCH_PROBE_INTERVAL", "1s")]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let billing = json!({"status_code": 429, "error": fixture_json("error_429_insufficient_quota.json")["error"]});
    server.post("/api/quota/usage", &key, billing).await;
    assert_eq!(
        server.check(&key, 0).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A success reported without a reservation says nothing about billing.
    let unreserved = server
        .post("/api/quota/usage", &key, json!({"status_code": 200}))
        .await;
    assert_eq!(unreserved.body["status"], "quota_exceeded");
    let probe = eventually(
        "a probe to be let through",
        Duration::from_secs(5),
        || async {
            let check = server.check(&key, 0).await;
            (check.status == StatusCode::OK).then_some(check.body)
        },
    )
    .await;
    assert_eq!(probe["probe"], true);
    assert_eq!(
        server.check(&key, 0).await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "one probe per interval"
    );
    let lifted = server
        .post(
            "/api/quota/usage",
            &key,
            json!({"reservation_id": probe["reservation_id"], "status_code": 200}),
        )
        .await;
    assert_eq!(lifted.body["status"], "normal");
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn implausible_values_are_refused_without_harm() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let huge = server
        .post(
            "/api/quota/usage",
            &key,
            json!({"usage": {"prompt_tokens": 9_000_000_000_000_000_000u64}}),
        )
        .await;
    assert_eq!(huge.status, StatusCode::BAD_REQUEST);
    assert_eq!(huge.body["error"]["param"], "usage.prompt_tokens");
    let estimate = server.check(&key, 1 << 60).await;
    assert_eq!(estimate.body["error"]["param"], "estimated_tokens");
    // An absurd retry-after from an upstream holds the workspace a day at most.
    let absurd = server
        .post("/api/quota/usage", &key, json!({"status_code": 429, "error": {"type": "requests", "code": "rate_limit_exceeded"}, "headers": {"retry-after": "1e300"}}))
        .await;
    assert_eq!(absurd.status, StatusCode::ACCEPTED);
    let long = server
        .post("/api/quota/usage", &key, json!({"status_code": 429, "error": {"type": "requests", "code": "rate_limit_exceeded"}, "headers": {"retry-after": "999999999999"}}))
        .await;
    let seconds = long.body["retry_after_seconds"]
        .as_f64()
        .expect("retry after");
    assert!(seconds <= 86_400.0, "{seconds}");
    let history = server
        .get("/api/quota/history?window=1e30&step=1h", &key)
        .await;
    assert_eq!(history.status, StatusCode::BAD_REQUEST);
    server.stop().await;
}

#[tokio::test]
async fn history_survives_a_timezone_change_and_deleted_workspaces_leave_nothing_behind() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "timezone": "Pacific/Kiritimati"}))
        .await;
    server
        .post(
            "/api/quota/usage",
            &key,
            json!({"usage": {"prompt_tokens": 10}}),
        )
        .await;
    let requests = |body: &Value| {
        body["points"].as_array().map_or(0, |points| {
            points
                .iter()
                .map(|point| point["requests"].as_i64().unwrap_or(0))
                .sum::<i64>()
        })
    };
    // The one request counts once in the daily history, however days fall.
    let one_request_in_daily_history = |what: &'static str| {
        eventually(what, Duration::from_secs(5), || async {
            let history = server
                .get("/api/quota/history?window=30d&step=1d", &key)
                .await
                .body;
            (requests(&history) == 1).then_some(())
        })
    };
    one_request_in_daily_history("the request in daily history").await;
    // Kiritimati is UTC+14: moving to UTC shifts where days start.
    server
        .send(
            Method::PATCH,
            "/api/workspaces/acme",
            ADMIN_KEY,
            Some(json!({"timezone": "UTC"})),
        )
        .await;
    one_request_in_daily_history("the stored day to be binned into the new days").await;

    server
        .send(Method::DELETE, "/api/workspaces/acme", ADMIN_KEY, None)
        .await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let fresh = server.status(&key).await;
    assert_eq!(fresh["limits"]["requests_per_day"]["used"], 0);
    assert_eq!(
        requests(
            &server
                .get("/api/quota/history?window=1h&step=1m", &key)
                .await
                .body
        ),
        0
    );
    server.stop().await;
}

#[tokio::test]
async fn wrong_methods_get_json_errors() {
    let server = TestServer::start(&[]).await;
    let response = server
        .send(Method::DELETE, "/api/quota/status", ADMIN_KEY, None)
        .await;
    assert_eq!(response.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.error_code(), "method_not_allowed");
    server.stop().await;
}

#[tokio::test]
async fn notifications_carry_a_text_for_tenants_without_operator_details() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_day": 2, "requests_per_minute": null}}),
        )
        .await;
    for _ in 0..2 {
        assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    }
    let billing = json!({"status_code": 429,
        "error": crate::support::fixture_json("error_429_credit_balance_exhausted.json")["error"]});
    server.post("/api/quota/usage", &key, billing).await;
    let doc = server.get("/api/quota/notifications", &key).await.body;
    let notifications = doc["notifications"].as_array().expect("notifications");
    let kinds: Vec<&str> = notifications
        .iter()
        .filter_map(|n| n["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"upstream_quota_exhausted") && kinds.contains(&"daily_quota_exhausted"),
        "{kinds:?}"
    );
    for notification in notifications {
        let tenant = &notification["tenant"];
        let title = tenant["title"].as_str().expect("a tenant title");
        let message = tenant["message"].as_str().expect("a tenant message");
        let actions = tenant["suggested_actions"]
            .as_array()
            .expect("tenant actions");
        assert!(
            !title.is_empty() && !message.is_empty() && !actions.is_empty(),
            "{tenant}"
        );
        let text = tenant.to_string();
        for operator_only in [
            "/api/",
            "http",
            "POST",
            "PATCH",
            "OPENAI_",
            "QUOTAWATCH_",
            "credit",
            "acme",
        ] {
            assert!(
                !text.contains(operator_only),
                "{operator_only:?} shown to tenants: {text}"
            );
        }
        // The operator's text keeps the details.
        assert_ne!(notification["message"], tenant["message"]);
    }
    let billing = notifications
        .iter()
        .find(|n| n["kind"] == "upstream_quota_exhausted")
        .expect("billing");
    assert!(
        billing["suggested_actions"]
            .to_string()
            .contains("/api/quota/reset")
    );
    server.stop().await;
}

/// Budgets are set and shown in dollars, as JSON numbers, and what is not
/// an amount of dollars within bounds is refused naming the limit.
#[tokio::test]
async fn budgets_are_set_and_shown_in_dollars() {
    let server = TestServer::start(&[]).await;
    let created = server
        .post(
            "/api/workspaces",
            ADMIN_KEY,
            json!({"id": "acme", "limits": {"usd_per_day": 12.5, "usd_per_month": 300}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["limits"]["usd_per_day"], json!(12.5));
    assert_eq!(created.body["limits"]["usd_per_month"], json!(300.0));
    assert_eq!(created.body["limits"]["usd_per_minute"], Value::Null);
    for (limit, value, status) in [
        ("usd_per_day", json!(-1), StatusCode::BAD_REQUEST),
        ("usd_per_day", json!(0), StatusCode::BAD_REQUEST),
        (
            "usd_per_month",
            json!(1_000_000.01),
            StatusCode::BAD_REQUEST,
        ),
        ("tokens_per_day", json!(1.5), StatusCode::BAD_REQUEST),
        (
            "usd_per_day",
            json!("12.5"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let refused = server
            .send(
                Method::PATCH,
                "/api/workspaces/acme",
                ADMIN_KEY,
                Some(json!({"limits": {limit: value}})),
            )
            .await;
        assert_eq!(
            refused.status, status,
            "{limit}={value}: {:?}",
            refused.body
        );
        if status == StatusCode::BAD_REQUEST {
            assert_eq!(refused.body["error"]["param"], limit, "{:?}", refused.body);
        }
    }
    let key = server
        .post("/api/workspaces/acme/keys", ADMIN_KEY, json!({}))
        .await
        .body["key"]
        .as_str()
        .expect("key")
        .to_owned();
    // 1,000,000 completion tokens of gpt-4o-mini at $0.60/M.
    let check = json!({"model": "gpt-4o-mini", "estimated_tokens": 1_000_000});
    let admitted = server.post("/api/quota/check", &key, check).await;
    assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    assert_eq!(admitted.body["remaining"]["usd_per_day"], json!(11.9));
    let status = server.status(&key).await;
    let day = &status["limits"]["usd_per_day"];
    assert_eq!(
        (&day["limit"], &day["used"], &day["remaining"]),
        (&json!(12.5), &json!(0.6), &json!(11.9))
    );
    assert_eq!(status["unpriced_models"], json!([]));
    let odd =
        json!({"model": "gpt-4o-mini", "estimated_tokens": 10, "estimated_prompt_tokens": 11});
    let refused = server.post("/api/quota/check", &key, odd).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.body["error"]["param"], "estimated_prompt_tokens");
    server.stop().await;
}
