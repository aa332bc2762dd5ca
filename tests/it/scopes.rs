//! Scoped limits through the REST API and the proxy: limits per model and
//! per end user, on top of the workspace's, refused with the scope's code
//! and named in the message; configured, shown and stored with the
//! workspace. Counters in Redis do not count scoped limits yet, so a
//! server using them refuses to configure any.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::postgres::TestDatabase;
use crate::support::redis::{clean, fresh_prefix, server_url};
use crate::support::{ADMIN_KEY, TestServer, Upstream, eventually, proxied};

/// How a test request carries a value of each scope kind, by kind name.
const KINDS: &[(&str, &str)] = &[("model", "models"), ("user", "users")];

#[test]
fn every_kind_has_a_row() {
    for kind in quotawatch::domain::scope::ScopeKind::ALL {
        assert!(
            KINDS.contains(&(kind.name(), kind.field())),
            "{} has no row in KINDS",
            kind.name()
        );
    }
}

/// A check of `model` for `user` (in the body's `user`).
async fn check_as(
    server: &TestServer,
    key: &str,
    model: &str,
    user: &str,
) -> crate::support::Response {
    server
        .post(
            "/api/quota/check",
            key,
            json!({"estimated_tokens": 10, "model": model, "user": user}),
        )
        .await
}

async fn workspace_with(server: &TestServer, scoped: Value) -> String {
    server
        .workspace(json!({
            "id": "acme",
            "limits": {"requests_per_minute": 100, "requests_per_day": null},
            "scoped_limits": scoped,
        }))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_limit_refuses_its_models_while_others_pass() {
    let server = TestServer::start(&[]).await;
    let key = workspace_with(
        &server,
        json!([{"models": ["gpt-4o", "o3*"], "limits": {"requests_per_minute": 2}}]),
    )
    .await;
    assert_eq!(
        check_as(&server, &key, "gpt-4o", "a").await.status,
        StatusCode::OK
    );
    assert_eq!(
        check_as(&server, &key, "o3-mini", "b").await.status,
        StatusCode::OK
    );
    let refused = check_as(&server, &key, "o3", "c").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        refused.body
    );
    assert_eq!(refused.error_code(), "model_limit_exceeded");
    let message = refused.body["error"]["message"].as_str().expect("message");
    assert!(message.contains("models gpt-4o, o3*"), "{message}");
    assert!(message.contains("requests_per_minute"), "{message}");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        check_as(&server, &key, "gpt-4o-mini", "a").await.status,
        StatusCode::OK
    );
    let status = server.status(&key).await;
    let rule = &status["scoped_limits"][0];
    assert_eq!(rule["models"], json!(["gpt-4o", "o3*"]));
    assert_eq!(rule["usage"]["requests_per_minute"]["used"], 2);
    assert_eq!(
        status["limits"]["requests_per_minute"]["used"], 3,
        "the refusal charged nothing"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_user_limit_refuses_one_user_while_others_pass() {
    let server = TestServer::start(&[]).await;
    let key = workspace_with(
        &server,
        json!([{"users": "each", "limits": {"requests_per_minute": 1}}]),
    )
    .await;
    assert_eq!(
        check_as(&server, &key, "gpt-4o", "alice").await.status,
        StatusCode::OK
    );
    let refused = check_as(&server, &key, "gpt-4o", "alice").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        refused.body
    );
    assert_eq!(refused.error_code(), "user_limit_exceeded");
    let message = refused.body["error"]["message"].as_str().expect("message");
    assert!(message.contains("end user \"alice\""), "{message}");
    // The header names the user before the body does.
    let bob = server
        .send_with_headers(
            Method::POST,
            "/api/quota/check",
            &key,
            &[("x-quotawatch-user", "bob")],
            Some(json!({"estimated_tokens": 1, "user": "alice"})),
        )
        .await;
    assert_eq!(bob.status, StatusCode::OK, "{:?}", bob.body);
    let status = server.status(&key).await;
    let rule = &status["scoped_limits"][0];
    assert_eq!(
        (rule["users"].clone(), rule["tracked"].clone()),
        (json!("each"), json!(2))
    );
    assert_eq!(rule["refused"], 1);
    assert!(
        !status.to_string().contains("alice"),
        "users are never listed: {status}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_user_id_is_refused_naming_the_field() {
    let server = TestServer::start(&[]).await;
    let key = workspace_with(
        &server,
        json!([{"users": "each", "limits": {"requests_per_minute": 1}}]),
    )
    .await;
    for user in [String::new(), "x".repeat(257), "bell\u{7}".to_owned()] {
        let refused = check_as(&server, &key, "gpt-4o", &user).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            refused.body
        );
        assert_eq!(refused.error_code(), "invalid_user");
        assert_eq!(refused.body["error"]["param"], "user");
    }
    // The header twice: which user counts would be anyone's guess.
    let twice = server
        .client
        .post(server.url("/api/quota/check"))
        .bearer_auth(&key)
        .header("x-quotawatch-user", "alice")
        .header("x-quotawatch-user", "bob")
        .json(&json!({"model": "gpt-4o", "estimated_tokens": 1}))
        .send()
        .await
        .expect("check");
    assert_eq!(twice.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = twice.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_user", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("more than once"),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_limits_are_validated_shown_replaced_and_removed() {
    let server = TestServer::start(&[]).await;
    let key = workspace_with(
        &server,
        json!([{"users": "each", "limits": {"tokens_per_day": 1000}}]),
    )
    .await;
    let path = "/api/workspaces/acme";
    let bad = server
        .send(
            Method::PATCH,
            path,
            ADMIN_KEY,
            Some(json!({"scoped_limits": [
                {"users": "each", "limits": {"requests_per_minute": 5}},
                {"models": ["gpt-4o", "o*3"], "limits": {"requests_per_minute": 5}},
            ]})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{:?}", bad.body);
    assert_eq!(bad.body["error"]["param"], "scoped_limits[1].models[1]");
    let empty = server
        .send(
            Method::PATCH,
            path,
            ADMIN_KEY,
            Some(json!({"scoped_limits": [{"users": "each", "limits": {}}]})),
        )
        .await;
    assert_eq!(
        empty.body["error"]["param"], "scoped_limits[0].limits",
        "{:?}",
        empty.body
    );
    // Unchanged by the refusals, and kept by a PATCH that leaves it out.
    let kept = server
        .send(
            Method::PATCH,
            path,
            ADMIN_KEY,
            Some(json!({"name": "Acme"})),
        )
        .await;
    assert_eq!(
        kept.body["scoped_limits"],
        json!([{"users": "each", "limits": {
            "requests_per_minute": null, "requests_per_day": null, "requests_per_month": null,
            "tokens_per_minute": null, "tokens_per_day": 1000, "tokens_per_month": null,
            "usd_per_minute": null, "usd_per_day": null, "usd_per_month": null,
        }}])
    );
    let replaced = server
        .send(
            Method::PATCH,
            path,
            ADMIN_KEY,
            Some(json!({"scoped_limits": [{"models": ["o3*"], "limits": {"usd_per_day": 50}}]})),
        )
        .await;
    assert_eq!(replaced.status, StatusCode::OK, "{:?}", replaced.body);
    assert_eq!(replaced.body["scoped_limits"][0]["models"], json!(["o3*"]));
    assert_eq!(
        replaced.body["scoped_limits"][0]["limits"]["usd_per_day"],
        50.0
    );
    let removed = server
        .send(
            Method::PATCH,
            path,
            ADMIN_KEY,
            Some(json!({"scoped_limits": null})),
        )
        .await;
    assert!(
        removed.body.get("scoped_limits").is_none(),
        "{:?}",
        removed.body
    );
    assert!(server.status(&key).await.get("scoped_limits").is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_limits_survive_a_restart() {
    let mut server = TestServer::start(&[]).await;
    let key = workspace_with(
        &server,
        json!([{"models": ["gpt-4o"], "limits": {"requests_per_day": 1}}]),
    )
    .await;
    server.restart().await;
    assert_eq!(
        check_as(&server, &key, "gpt-4o", "a").await.status,
        StatusCode::OK
    );
    let shown = server.get("/api/workspaces/acme", ADMIN_KEY).await;
    assert_eq!(shown.body["scoped_limits"][0]["models"], json!(["gpt-4o"]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_reads_the_end_user_and_never_forwards_its_header() {
    let upstream = Upstream::strict().await;
    let (server, key) = proxied(
        &upstream,
        &[],
        json!({
            "id": "acme",
            "limits": {"requests_per_minute": 100, "requests_per_day": null},
            "scoped_limits": [{"users": "each", "limits": {"requests_per_minute": 1}}],
        }),
    )
    .await;
    let chat = |user: Value| json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "user": user});
    let send = |header: Option<&'static str>, body: Value| {
        let mut request = crate::support::client()
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body);
        if let Some(user) = header {
            request = request.header("x-quotawatch-user", user);
        }
        request.send()
    };
    let first = send(Some("carol"), chat(json!("dave")))
        .await
        .expect("sent");
    assert_eq!(first.status(), StatusCode::OK);
    let seen = upstream.last().await;
    assert!(seen["headers"].get("x-quotawatch-user").is_none(), "{seen}");
    // Carol was charged, not Dave: the header comes first.
    let carol = send(None, chat(json!("carol"))).await.expect("sent");
    assert_eq!(carol.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = carol.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "user_limit_exceeded");
    let dave = send(None, chat(json!("dave"))).await.expect("sent");
    assert_eq!(dave.status(), StatusCode::OK);
    // `safety_identifier` comes before `user`.
    let mut erin = chat(json!("frank"));
    erin["safety_identifier"] = json!("erin");
    assert_eq!(
        send(None, erin).await.expect("sent").status(),
        StatusCode::OK
    );
    let frank = send(None, chat(json!("frank"))).await.expect("sent");
    assert_eq!(frank.status(), StatusCode::OK, "frank was not charged");
    let bad = send(None, chat(json!(42))).await.expect("sent");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_in_redis_refuse_scoped_limits_rather_than_ignore_them() {
    let Some(url) =
        server_url("scopes::counters_in_redis_refuse_scoped_limits_rather_than_ignore_them")
    else {
        return;
    };
    let prefix = fresh_prefix();
    let server = TestServer::start(&[
        ("QUOTAWATCH_REDIS_URL", &url),
        ("QUOTAWATCH_REDIS_PREFIX", &prefix),
    ])
    .await;
    let refused = server
        .post(
            "/api/workspaces",
            ADMIN_KEY,
            json!({"id": "acme", "scoped_limits": [{"users": "each", "limits": {"requests_per_minute": 1}}]}),
        )
        .await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        refused.body
    );
    assert_eq!(refused.body["error"]["param"], "scoped_limits");
    let listed = server.get("/api/workspaces", ADMIN_KEY).await;
    assert!(
        !listed.body.to_string().contains("\"acme\""),
        "not saved: {:?}",
        listed.body
    );
    server.stop().await;
    clean(&url, &prefix).await;
}

/// A workspace given scoped limits by an instance counting on its own
/// reaches an instance counting in Redis through the shared database: its
/// calls there are refused, never admitted without the scoped limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_counting_in_redis_refuses_calls_of_a_workspace_with_scoped_limits() {
    let test =
        "scopes::an_instance_counting_in_redis_refuses_calls_of_a_workspace_with_scoped_limits";
    let Some(url) = server_url(test) else {
        return;
    };
    let Some(database) = TestDatabase::create(test).await else {
        return;
    };
    let prefix = fresh_prefix();
    let shared = TestServer::start_on(
        database.url.clone(),
        None,
        &[
            ("QUOTAWATCH_REDIS_URL", &url),
            ("QUOTAWATCH_REDIS_PREFIX", &prefix),
        ],
    )
    .await;
    let alone = TestServer::start_on(database.url.clone(), None, &[]).await;
    let key = workspace_with(
        &alone,
        json!([{"users": "each", "limits": {"requests_per_minute": 1}}]),
    )
    .await;
    let refused = eventually("the catalog reload", Duration::from_secs(10), || async {
        let answer = check_as(&shared, &key, "gpt-4o", "alice").await;
        (answer.status == StatusCode::SERVICE_UNAVAILABLE).then_some(answer)
    })
    .await;
    assert_eq!(refused.error_code(), "scoped_limits_not_enforced");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    // Nor does such an instance start while a workspace has them.
    let starting = tokio::spawn({
        let database = database.url.clone();
        let (url, prefix) = (url.clone(), prefix.clone());
        async move {
            TestServer::start_on(
                database,
                None,
                &[
                    ("QUOTAWATCH_REDIS_URL", &url),
                    ("QUOTAWATCH_REDIS_PREFIX", &prefix),
                ],
            )
            .await
        }
    });
    let Err(failed) = starting.await else {
        panic!("an instance counting in Redis started with scoped limits configured");
    };
    let failed = failed.into_panic();
    let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("ScopedLimitsInRedis"), "{message}");
    alone.stop().await;
    shared.stop().await;
    clean(&url, &prefix).await;
    database.drop_database().await;
}
