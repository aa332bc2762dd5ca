//! Authentication and isolation between workspaces.

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{ADMIN_KEY, TestServer};

#[tokio::test]
async fn a_workspace_key_sees_only_its_own_workspace() {
    let server = TestServer::start(&[]).await;
    let acme = server.workspace(json!({"id": "acme"})).await;
    let beta = server.workspace(json!({"id": "beta"})).await;
    assert_eq!(server.check(&beta, 0).await.status, StatusCode::OK);

    let own = server.status(&acme).await;
    assert_eq!(own["workspace"], "acme");
    assert_eq!(
        own["limits"]["requests_per_day"]["used"], 0,
        "beta's usage is not acme's"
    );

    // Naming another workspace answers exactly like naming one that does
    // not exist, so a key cannot probe for workspace names.
    let other = server.get("/api/quota/status?workspace=beta", &acme).await;
    let missing = server.get("/api/quota/status?workspace=zzz", &acme).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(other.error_code(), missing.error_code());
    for path in [
        "/api/quota/notifications?workspace=beta",
        "/api/quota/history?workspace=beta",
        "/api/workspaces/beta",
    ] {
        assert_eq!(
            server.get(path, &acme).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    let usage = server
        .post("/api/quota/usage?workspace=beta", &acme, json!({}))
        .await;
    assert_eq!(usage.status, StatusCode::NOT_FOUND);
    let check = server
        .post("/api/quota/check?workspace=beta", &acme, json!({}))
        .await;
    assert_eq!(check.status, StatusCode::NOT_FOUND);
    assert_eq!(
        server.status(&beta).await["limits"]["requests_per_day"]["used"],
        1,
        "nothing was charged to beta"
    );

    // Admin operations are refused, not hidden.
    for (path, body) in [
        ("/api/workspaces", json!({"id": "gamma"})),
        ("/api/workspaces/acme/keys", json!({})),
    ] {
        assert_eq!(
            server.post(path, &acme, body).await.status,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    assert_eq!(
        server.get("/api/workspaces", &acme).await.status,
        StatusCode::FORBIDDEN
    );
    server.stop().await;
}

#[tokio::test]
async fn the_admin_key_sees_every_workspace_and_may_pick_one() {
    let server = TestServer::start(&[]).await;
    server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 1}}))
        .await;
    let beta = server.workspace(json!({"id": "beta"})).await;
    server.check(&beta, 0).await;
    let acme_key = server.workspace(json!({"id": "acme2"})).await;
    drop(acme_key);
    let all = server.status(ADMIN_KEY).await;
    let ids: Vec<&str> = all["workspaces"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|w| w["workspace"].as_str())
        .collect();
    assert_eq!(ids.len(), 4);
    let one = server
        .get("/api/quota/status?workspace=beta", ADMIN_KEY)
        .await;
    assert_eq!(one.body["workspace"], "beta");
    assert_eq!(one.body["limits"]["requests_per_day"]["used"], 1);
    let admin_check = server
        .post("/api/quota/check?workspace=acme", ADMIN_KEY, json!({}))
        .await;
    assert_eq!(admin_check.status, StatusCode::OK);
    let no_target = server.post("/api/quota/check", ADMIN_KEY, json!({})).await;
    assert_eq!(no_target.status, StatusCode::BAD_REQUEST);
    assert_eq!(no_target.error_code(), "workspace_required");
    let notifications = server.get("/api/quota/notifications", ADMIN_KEY).await;
    assert_eq!(
        notifications.body["workspaces"].as_array().map(Vec::len),
        Some(4)
    );
    server.stop().await;
}

#[tokio::test]
async fn missing_or_wrong_keys_get_401_with_a_reason() {
    let server = TestServer::start(&[]).await;
    let missing = server
        .client
        .get(server.url("/api/quota/status"))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = missing.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "missing_api_key");
    let wrong = server
        .get("/api/quota/status", "qw_0123456789abcdef0123456789abcdef")
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.error_code(), "invalid_api_key");
    let basic = server
        .client
        .get(server.url("/api/quota/status"))
        .header("authorization", format!("Basic {ADMIN_KEY}"))
        .send()
        .await
        .expect("request");
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
    server.stop().await;
}
