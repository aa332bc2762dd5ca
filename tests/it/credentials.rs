//! Billing blocks per upstream credential: workspaces that share the
//! server's upstream key share its billing block, its one notification, its
//! probe and its lift; a workspace with a key of its own is not concerned.

use std::time::Duration;

use futures_util::SinkExt;
use quotawatch::mock::MockOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{ADMIN_KEY, TestServer, UPSTREAM_KEY, Upstream, eventually};
use crate::websocket::{connect, wait_for};

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 20})
}

/// How long a change may take to show where it is awaited.
const PATIENCE: Duration = Duration::from_secs(5);

/// A server proxying to `upstream` with two workspaces on the server's key
/// (acme, beta) and one with a key of its own (gamma): their keys.
async fn three_workspaces(
    upstream: &Upstream,
    settings: &[(&str, &str)],
) -> (TestServer, [String; 3]) {
    let mut all = vec![("QUOTAWATCH_UPSTREAM_KEY_GAMMA", "sk-gamma-own")];
    all.extend_from_slice(settings);
    let server = TestServer::proxying(upstream, &all).await;
    let acme = server.workspace(json!({"id": "acme"})).await;
    let beta = server.workspace(json!({"id": "beta"})).await;
    let gamma = server
        .workspace(json!({"id": "gamma", "upstream_key_env": "QUOTAWATCH_UPSTREAM_KEY_GAMMA"}))
        .await;
    (server, [acme, beta, gamma])
}

/// The `upstream_quota_exhausted` notifications active for the workspace
/// of `key`.
async fn billing_notifications(server: &TestServer, key: &str) -> Vec<Value> {
    let listed = server.get("/api/quota/notifications", key).await.body;
    listed["notifications"]
        .as_array()
        .expect("notifications")
        .iter()
        .filter(|n| n["kind"] == "upstream_quota_exhausted")
        .cloned()
        .collect()
}

fn should_retry(response: &reqwest::Response) -> Option<&str> {
    response
        .headers()
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn one_billing_answer_blocks_every_workspace_on_the_credential_with_one_notification() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, [acme, beta, gamma]) = three_workspaces(&upstream, &[]).await;

    upstream.set_scenario("insufficient_quota").await;
    let answer = server.openai("/chat/completions", &acme, chat()).await;
    assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
    upstream.set_scenario("ok").await;

    // Beta shares the key: refused at once, without reaching the upstream.
    let refused = server.openai("/chat/completions", &beta, chat()).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(should_retry(&refused), Some("false"));
    assert!(refused.headers().get("retry-after").is_none());
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(upstream.hits("/chat/completions").await, 1);
    for key in [&acme, &beta] {
        let status = server.status(key).await;
        assert_eq!(status["status"], "quota_exceeded", "{status}");
        assert_eq!(status["reasons"], json!(["upstream_insufficient_quota"]));
        assert_eq!(status["billing_block"]["code"], "insufficient_quota");
    }

    // Gamma's own key is another credential: not concerned.
    let own = server.openai("/chat/completions", &gamma, chat()).await;
    assert_eq!(own.status(), StatusCode::OK);
    assert_eq!(upstream.hits("/chat/completions").await, 2);
    assert_eq!(server.status(&gamma).await["status"], "normal");
    assert!(billing_notifications(&server, &gamma).await.is_empty());

    // One critical notification, service-wide, seen by both workspaces.
    let of_acme = billing_notifications(&server, &acme).await;
    let of_beta = billing_notifications(&server, &beta).await;
    assert_eq!(of_acme.len(), 1, "{of_acme:?}");
    assert_eq!(of_acme, of_beta, "the same one");
    assert_eq!(of_acme[0]["severity"], "critical");
    assert!(of_acme[0]["workspace"].is_null(), "{}", of_acme[0]);
    let listed = server.get("/api/credentials", ADMIN_KEY).await.body;
    let credentials = listed["credentials"].as_array().expect("credentials");
    assert_eq!(credentials.len(), 1, "{listed}");
    let credential = &credentials[0];
    // The installation's default workspace uses the server's key too.
    assert_eq!(credential["workspaces"], json!(["acme", "beta", "default"]));
    assert_eq!(credential["notification"]["id"], of_acme[0]["id"]);
    assert_eq!(credential["billing_block"]["code"], "insufficient_quota");
    let name = credential["credential"].as_str().expect("a name");
    assert!(name.starts_with("cred_"), "{name}");
    // Each workspace's status names the credential its block belongs to.
    for key in [&acme, &beta] {
        assert_eq!(
            server.status(key).await["billing_block"]["credential"],
            name
        );
    }
    assert!(
        !listed.to_string().contains(UPSTREAM_KEY),
        "the key itself is never shown: {listed}"
    );
    // Each workspace's history holds it once, not once per workspace.
    let history = server
        .get("/api/quota/notifications?include=history", &acme)
        .await
        .body;
    let kept = history["notifications"]
        .as_array()
        .expect("notifications")
        .iter()
        .filter(|n| n["kind"] == "upstream_quota_exhausted")
        .count();
    assert_eq!(kept, 1, "{history}");
    server.stop().await;
}

#[tokio::test]
async fn one_probe_from_any_workspace_finds_billing_fixed_and_resumes_them_all() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, [acme, beta, _]) =
        three_workspaces(&upstream, &[("QUOTAWATCH_PROBE_INTERVAL", "1s")]).await;
    upstream.set_scenario("project_spend_limit_exceeded").await;
    let answer = server.openai("/chat/completions", &acme, chat()).await;
    assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
    let notification = billing_notifications(&server, &acme).await[0]["id"].clone();

    // Billing is fixed upstream; beta's next call after the interval is
    // the probe, and its success lifts the block for acme too.
    upstream.set_scenario("ok").await;
    eventually("beta's probe to lift the block", PATIENCE, || async {
        (server
            .openai("/chat/completions", &beta, chat())
            .await
            .status()
            == StatusCode::OK)
            .then_some(())
    })
    .await;
    assert_eq!(
        upstream.hits("/chat/completions").await,
        2,
        "exactly one probe went upstream"
    );
    for key in [&acme, &beta] {
        assert_eq!(server.status(key).await["status"], "normal");
        assert!(billing_notifications(&server, key).await.is_empty());
    }
    let answer = server.openai("/chat/completions", &acme, chat()).await;
    assert_eq!(
        answer.status(),
        StatusCode::OK,
        "acme resumed without a probe"
    );
    let history = server
        .get("/api/quota/notifications?include=history", &beta)
        .await
        .body;
    let resolved: Vec<&Value> = history["notifications"]
        .as_array()
        .expect("notifications")
        .iter()
        .filter(|n| n["id"] == notification)
        .collect();
    assert_eq!(resolved.len(), 1, "{history}");
    assert!(!resolved[0]["resolved_at"].is_null(), "{history}");
    assert!(
        server.get("/api/credentials", ADMIN_KEY).await.body["credentials"]
            .as_array()
            .expect("credentials")
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test]
async fn an_admin_lifts_a_credentials_block_for_every_workspace_billed_to_it() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, [acme, beta, _]) = three_workspaces(&upstream, &[]).await;
    upstream.set_scenario("insufficient_quota").await;
    server.openai("/chat/completions", &acme, chat()).await;
    upstream.set_scenario("ok").await;
    let listed = server.get("/api/credentials", ADMIN_KEY).await.body;
    let name = listed["credentials"][0]["credential"]
        .as_str()
        .expect("a blocked credential")
        .to_owned();

    let path = format!("/api/credentials/{name}/lift");
    let forbidden = server.post(&path, &acme, json!({})).await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    let malformed = server
        .post("/api/credentials/sk-upstream/lift", ADMIN_KEY, json!({}))
        .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.body["error"]["code"], "invalid_credential");

    let lifted = server.post(&path, ADMIN_KEY, json!({})).await;
    assert_eq!(lifted.status, StatusCode::OK, "{}", lifted.body);
    assert_eq!(lifted.body, json!({"credential": name, "lifted": true}));
    for key in [&beta, &acme] {
        assert_eq!(server.status(key).await["status"], "normal");
        let answer = server.openai("/chat/completions", key, chat()).await;
        assert_eq!(answer.status(), StatusCode::OK);
    }
    let again = server.post(&path, ADMIN_KEY, json!({})).await;
    assert_eq!(again.body["lifted"], false);

    // Lifting one workspace's blocks lifts its credential's for all.
    upstream.set_scenario("insufficient_quota").await;
    server.openai("/chat/completions", &beta, chat()).await;
    upstream.set_scenario("ok").await;
    assert_eq!(server.status(&acme).await["status"], "quota_exceeded");
    let reset = server
        .post(
            "/api/quota/reset",
            ADMIN_KEY,
            json!({"workspace": "beta", "what": "block"}),
        )
        .await;
    assert_eq!(reset.status, StatusCode::OK, "{}", reset.body);
    let answer = server.openai("/chat/completions", &acme, chat()).await;
    assert_eq!(answer.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn listeners_of_each_workspace_on_the_credential_hear_of_its_one_notification() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, [acme, beta, gamma]) = three_workspaces(&upstream, &[]).await;
    let mut of_beta = connect(&server, &beta, "").await;
    let mut of_gamma = connect(&server, &gamma, "").await;
    // Each connection starts with its workspace's status.
    for socket in [&mut of_beta, &mut of_gamma] {
        wait_for(socket, PATIENCE, |m| m["type"] == "status").await;
    }
    upstream.set_scenario("insufficient_quota").await;
    server.openai("/chat/completions", &acme, chat()).await;

    let raised = wait_for(&mut of_beta, PATIENCE, |m| m["type"] == "notification").await;
    assert_eq!(raised["workspace"], "beta", "{raised}");
    assert_eq!(raised["event"], "raised");
    assert_eq!(raised["data"]["kind"], "upstream_quota_exhausted");
    assert_eq!(raised["data"]["severity"], "critical");
    assert!(
        raised["data"]["workspace"].is_null(),
        "service-wide: {raised}"
    );
    let status = wait_for(&mut of_beta, PATIENCE, |m| m["type"] == "status").await;
    assert_eq!(status["data"]["status"], "quota_exceeded", "{status}");

    // Gamma's listener hears nothing of it: its answer to a ping, sent
    // after the block started, comes first.
    of_gamma
        .send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .expect("ping");
    let next = wait_for(&mut of_gamma, PATIENCE, |m| {
        m["type"] == "pong" || m["type"] == "notification"
    })
    .await;
    assert_eq!(next["type"], "pong", "{next}");
    server.stop().await;
}
