//! Scoped limits through the REST API and the proxy: limits per model and
//! per end user, on top of the workspace's, refused with the scope's code
//! and named in the message; configured, shown and stored with the
//! workspace. What depends on where the counters live runs on both
//! backends (`conformance!`): in this process, where the counts are saved
//! across a restart, and in Redis, where instances share them and each
//! end user's counter is a key that expires with its windows.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::conformance::{Backend, Setup, conformance};
use crate::support::postgres::TestDatabase;
use crate::support::redis::{clean, fresh_prefix, keys, server_url};
use crate::support::{ADMIN_KEY, TestServer, UPSTREAM_KEY, Upstream, eventually};

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

conformance!(a_model_limit_refuses_its_models_while_others_pass);
async fn a_model_limit_refuses_its_models_while_others_pass(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = workspace_with(
        server,
        json!([{"models": ["gpt-4o", "o3*"], "limits": {"requests_per_minute": 2}}]),
    )
    .await;
    assert_eq!(
        check_as(server, &key, "gpt-4o", "a").await.status,
        StatusCode::OK
    );
    assert_eq!(
        check_as(server, &key, "o3-mini", "b").await.status,
        StatusCode::OK
    );
    let refused = check_as(server, &key, "o3", "c").await;
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
        check_as(server, &key, "gpt-4o-mini", "a").await.status,
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
    setup.finish().await;
}

conformance!(a_per_user_limit_refuses_one_user_while_others_pass);
async fn a_per_user_limit_refuses_one_user_while_others_pass(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = workspace_with(
        server,
        json!([{"users": "each", "limits": {"requests_per_minute": 1}}]),
    )
    .await;
    assert_eq!(
        check_as(server, &key, "gpt-4o", "alice").await.status,
        StatusCode::OK
    );
    let refused = check_as(server, &key, "gpt-4o", "alice").await;
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
    setup.finish().await;
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

conformance!(the_proxy_reads_the_end_user_and_never_forwards_its_header);
async fn the_proxy_reads_the_end_user_and_never_forwards_its_header(backend: Backend, test: &str) {
    let upstream = Upstream::strict().await;
    let proxying = [
        ("QUOTAWATCH_UPSTREAM_URL", upstream.url.as_str()),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
    ];
    let Some(setup) = Setup::start(backend, test, &proxying).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({
            "id": "acme",
            "limits": {"requests_per_minute": 100, "requests_per_day": null},
            "scoped_limits": [{"users": "each", "limits": {"requests_per_minute": 1}}],
        }))
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
    setup.finish().await;
}

/// A check of `model` for `user` estimated at `prompt` prompt tokens,
/// which prices it at the model's input rate.
async fn priced_as(
    server: &TestServer,
    key: &str,
    model: &str,
    user: &str,
    prompt: u64,
) -> crate::support::Response {
    let check = json!({"model": model, "user": user, "estimated_tokens": prompt,
        "estimated_prompt_tokens": prompt});
    server.post("/api/quota/check", key, check).await
}

/// What the listed rule at `index` used of `limit`, in its unit.
fn scoped_used(status: &Value, index: usize, limit: &str) -> f64 {
    status["scoped_limits"][index]["usage"][limit]["used"]
        .as_f64()
        .unwrap_or_else(|| panic!("scoped_limits[{index}] {limit} in {status}"))
}

conformance!(a_model_budget_is_refused_in_its_own_words_and_settled_in_its_counter);
async fn a_model_budget_is_refused_in_its_own_words_and_settled_in_its_counter(
    backend: Backend,
    test: &str,
) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = workspace_with(
        server,
        json!([{"models": ["gpt-4o-mini"], "limits": {"usd_per_day": 0.01}}]),
    )
    .await;
    // 10,000 prompt tokens of gpt-4o-mini at $0.15/M: $0.0015 each.
    let first = priced_as(server, &key, "gpt-4o-mini", "a", 10_000).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    for _ in 0..5 {
        let admitted = priced_as(server, &key, "gpt-4o-mini", "a", 10_000).await;
        assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    }
    let refused = priced_as(server, &key, "gpt-4o-mini", "a", 10_000).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "model_budget_exceeded");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    let message = refused.body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("$0.009 of $0.01 used today for models gpt-4o-mini"),
        "{message}"
    );
    assert!(message.contains("resets at 00:00 UTC"), "{message}");
    // Another model is not in the rule.
    let other = priced_as(server, &key, "gpt-4o", "a", 10_000).await;
    assert_eq!(other.status, StatusCode::OK, "{:?}", other.body);
    // Settled for nothing used, the first call gives its estimate back to
    // the model's budget, wherever it was admitted.
    let report = json!({"reservation_id": first.body["reservation_id"], "model": "gpt-4o-mini",
        "usage": {"prompt_tokens": 0, "completion_tokens": 0}});
    let settled = server.post("/api/quota/usage", &key, report).await;
    assert_eq!(settled.status, StatusCode::ACCEPTED, "{:?}", settled.body);
    let status = server.status(&key).await;
    assert!(
        (scoped_used(&status, 0, "usd_per_day") - 0.0075).abs() < 1e-9,
        "{status}"
    );
    let again = priced_as(server, &key, "gpt-4o-mini", "a", 10_000).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    // A call reported without reservation counts in the model's budget,
    // even beyond it: it happened.
    let report = json!({"model": "gpt-4o-mini",
        "usage": {"prompt_tokens": 20_000, "completion_tokens": 0}});
    let counted = server.post("/api/quota/usage", &key, report).await;
    assert_eq!(counted.status, StatusCode::ACCEPTED, "{:?}", counted.body);
    let status = server.status(&key).await;
    assert!(
        (scoped_used(&status, 0, "usd_per_day") - 0.012).abs() < 1e-9,
        "{status}"
    );
    setup.finish().await;
}

conformance!(a_reset_clears_what_scoped_limits_counted);
async fn a_reset_clears_what_scoped_limits_counted(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = workspace_with(
        server,
        json!([
            {"models": ["gpt-4o"], "limits": {"requests_per_day": 1}},
            {"users": "each", "limits": {"requests_per_day": 1}},
        ]),
    )
    .await;
    let ok = |answer: crate::support::Response| {
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    };
    ok(check_as(server, &key, "gpt-4o", "alice").await);
    ok(check_as(server, &key, "gpt-4o-mini", "bob").await);
    let model = check_as(server, &key, "gpt-4o", "carol").await;
    assert_eq!(model.error_code(), "model_limit_exceeded");
    let user = check_as(server, &key, "gpt-4o-mini", "bob").await;
    assert_eq!(user.error_code(), "user_limit_exceeded");
    let reset = server
        .post("/api/quota/reset", ADMIN_KEY, json!({"workspace": "acme"}))
        .await;
    assert_eq!(reset.status, StatusCode::OK, "{:?}", reset.body);
    ok(check_as(server, &key, "gpt-4o", "carol").await);
    ok(check_as(server, &key, "gpt-4o-mini", "bob").await);
    setup.finish().await;
}

conformance!(a_restart_keeps_what_scoped_limits_counted);
async fn a_restart_keeps_what_scoped_limits_counted(backend: Backend, test: &str) {
    let Some(mut setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let key = workspace_with(
        &setup.server,
        json!([
            {"models": ["gpt-4o"], "limits": {"requests_per_day": 1}},
            {"users": "each", "limits": {"requests_per_day": 1}},
        ]),
    )
    .await;
    let admitted = check_as(&setup.server, &key, "gpt-4o", "alice").await;
    assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    let admitted = check_as(&setup.server, &key, "gpt-4o-mini", "bob").await;
    assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    setup.server.restart().await;
    let server = &setup.server;
    let model = check_as(server, &key, "gpt-4o", "carol").await;
    assert_eq!(
        model.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        model.body
    );
    assert_eq!(model.error_code(), "model_limit_exceeded");
    let user = check_as(server, &key, "gpt-4o-mini", "bob").await;
    assert_eq!(
        user.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        user.body
    );
    assert_eq!(user.error_code(), "user_limit_exceeded");
    let fresh = check_as(server, &key, "gpt-4o-mini", "dave").await;
    assert_eq!(fresh.status, StatusCode::OK, "{:?}", fresh.body);
    setup.finish().await;
}

/// Two instances on one Redis share a model's budget and each end user's
/// limit: what one admits, the other counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_model_limit_and_each_users_limit() {
    let test = "scopes::two_instances_share_a_model_limit_and_each_users_limit";
    let Some(url) = server_url(test) else {
        return;
    };
    let Some(database) = TestDatabase::create(test).await else {
        return;
    };
    let prefix = fresh_prefix();
    let redis = [
        ("QUOTAWATCH_REDIS_URL", url.as_str()),
        ("QUOTAWATCH_REDIS_PREFIX", prefix.as_str()),
        ("QUOTAWATCH_REDIS_TIMEOUT", "2s"),
    ];
    let one = TestServer::start_on(database.url.clone(), None, &redis).await;
    let two = TestServer::start_on(database.url.clone(), None, &redis).await;
    let key = workspace_with(
        &one,
        json!([
            {"models": ["gpt-4o"], "limits": {"requests_per_day": 2}},
            {"users": "each", "limits": {"requests_per_minute": 1}},
        ]),
    )
    .await;
    // The other instance learns of the workspace and its scoped limits
    // from the catalog.
    let first = eventually("the catalog reload", Duration::from_secs(10), || async {
        let answer = check_as(&two, &key, "gpt-4o", "alice").await;
        (answer.status == StatusCode::OK).then_some(answer)
    })
    .await;
    assert_eq!(first.status, StatusCode::OK);
    let alice = check_as(&one, &key, "gpt-4o-mini", "alice").await;
    assert_eq!(
        alice.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        alice.body
    );
    assert_eq!(alice.error_code(), "user_limit_exceeded");
    let bob = check_as(&one, &key, "gpt-4o", "bob").await;
    assert_eq!(bob.status, StatusCode::OK, "{:?}", bob.body);
    let carol = check_as(&two, &key, "gpt-4o", "carol").await;
    assert_eq!(
        carol.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        carol.body
    );
    assert_eq!(carol.error_code(), "model_limit_exceeded");
    let message = carol.body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("for models gpt-4o") && message.contains("(2 of 2 requests today"),
        "{message}"
    );
    let status = two.status(&key).await;
    assert_eq!(
        status["scoped_limits"][0]["usage"]["requests_per_day"]["used"],
        2
    );
    one.stop().await;
    two.stop().await;
    clean(&url, &prefix).await;
    database.drop_database().await;
}

/// In Redis each end user's counter is a key that lives as long as its
/// windows count, as does the rule's set of users it counts against the
/// cap; a listed rule's lives to the end of its longest period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_users_counters_in_redis_expire_with_their_windows() {
    let test = "scopes::end_users_counters_in_redis_expire_with_their_windows";
    let Some(url) = server_url(test) else {
        return;
    };
    let prefix = fresh_prefix();
    let server = TestServer::start(&[
        ("QUOTAWATCH_REDIS_URL", &url),
        ("QUOTAWATCH_REDIS_PREFIX", &prefix),
    ])
    .await;
    let key = workspace_with(
        &server,
        json!([
            {"users": "each", "limits": {"requests_per_minute": 5}},
            {"models": ["gpt-4o"], "limits": {"requests_per_day": 100}},
        ]),
    )
    .await;
    for user in ["alice", "bob"] {
        let admitted = check_as(&server, &key, "gpt-4o", user).await;
        assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    }
    let (connection, mut found) = keys(&url, &format!("{prefix}scope1:acme:*")).await;
    found.sort();
    let users: Vec<&String> = found
        .iter()
        .filter(|key| key.rsplit(':').next().is_some_and(|last| last.len() == 32))
        .collect();
    assert_eq!(users.len(), 2, "one counter per user: {found:?}");
    let tracked: Vec<&String> = found
        .iter()
        .filter(|key| key.ends_with(":tracked"))
        .collect();
    assert_eq!(tracked.len(), 1, "{found:?}");
    let listed: Vec<&String> = found
        .iter()
        .filter(|key| key.rsplit(':').next().is_some_and(|last| last.len() == 16))
        .collect();
    assert_eq!(listed.len(), 1, "{found:?}");
    let ttl = |key: String| {
        let mut connection = connection.clone();
        async move {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .expect("PTTL");
            ttl
        }
    };
    for key in users.iter().chain(&tracked) {
        let left = ttl((*key).clone()).await;
        assert!(
            0 < left && left <= 60_000,
            "{key} lives {left} ms, not until its minute clears"
        );
    }
    let count: u64 = redis::cmd("ZCARD")
        .arg(tracked[0])
        .query_async(&mut connection.clone())
        .await
        .expect("ZCARD");
    assert_eq!(count, 2, "both users count against the cap");
    let now = chrono::Utc::now();
    let day_end = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let until_day_end = (day_end - now).num_milliseconds();
    let left = ttl(listed[0].clone()).await;
    assert!(
        (until_day_end - 5_000..=until_day_end + 1_000).contains(&left),
        "the model's counter lives {left} ms, not until the day ends in {until_day_end} ms"
    );
    server.stop().await;
    clean(&url, &prefix).await;
}

conformance!(a_refusal_by_the_workspace_charges_no_scoped_limit);
async fn a_refusal_by_the_workspace_charges_no_scoped_limit(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({
            "id": "acme",
            "limits": {"requests_per_minute": 2, "requests_per_day": null},
            "scoped_limits": [{"models": ["gpt-4o"], "limits": {"requests_per_minute": 5}}],
        }))
        .await;
    for user in ["a", "b"] {
        let admitted = check_as(server, &key, "gpt-4o", user).await;
        assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    }
    let refused = check_as(server, &key, "gpt-4o", "c").await;
    assert_eq!(
        refused.error_code(),
        "rate_limit_exceeded",
        "{:?}",
        refused.body
    );
    let status = server.status(&key).await;
    assert_eq!(
        status["scoped_limits"][0]["usage"]["requests_per_minute"]["used"], 2,
        "{status}"
    );
    setup.finish().await;
}
