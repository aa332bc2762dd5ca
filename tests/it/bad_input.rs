//! Bad input gets a clear error, loses nothing, and leaves the server working.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, TestServer};

async fn raw(
    server: &TestServer,
    path: &str,
    key: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let response = server
        .client
        .post(server.url(path))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("every error is JSON"))
}

#[tokio::test]
async fn malformed_bodies_are_answered_with_json_naming_the_problem() {
    let server = TestServer::start(&[("QUOTAWATCH_MAX_BODY_BYTES", "4096")]).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 100}}))
        .await;
    let json_type = "application/json";
    let cases: Vec<(&str, &str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "/api/quota/check",
            json_type,
            b"{\"estimated_tokens\": ".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/api/quota/check",
            json_type,
            b"{\"estimated_tokens\": \"many\"}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "/api/quota/check",
            json_type,
            b"{\"estimated_tokens\": -5}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "/api/quota/check",
            json_type,
            b"{\"estimatd_tokens\": 5}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "/api/quota/check",
            "text/plain",
            b"hello".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "/api/quota/usage",
            json_type,
            b"[1,2,3]".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "/api/quota/usage",
            json_type,
            b"{\"usage\": {\"prompt_tokens\": 1.5}}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "/api/quota/usage",
            json_type,
            b"{\"status_code\": 1000}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "/api/quota/usage",
            json_type,
            b"{\"reservation_id\": \"abc\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "/api/quota/usage",
            json_type,
            b"{\"reservation_id\": \"rsv_0000000000000001\"}".to_vec(),
            StatusCode::NOT_FOUND,
            "reservation_not_found",
        ),
        (
            "/api/quota/usage",
            json_type,
            format!("{{\"model\": \"{}\"}}", "x".repeat(8000)).into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    for (path, content_type, body, expected_status, expected_code) in cases {
        let shown = String::from_utf8_lossy(&body)
            .chars()
            .take(60)
            .collect::<String>();
        let (status, error) = raw(&server, path, &key, content_type, body).await;
        assert_eq!(status, expected_status, "{path} {shown}: {error}");
        assert_eq!(error["error"]["code"], expected_code, "{path} {shown}");
        assert!(!error["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let (status, error) = raw(
        &server,
        "/api/quota/usage",
        &key,
        json_type,
        b"{\"reservation_id\": \"abc\"}".to_vec(),
    )
    .await;
    assert_eq!(
        (status, error["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("reservation_id"))
    );

    // Nothing bad was counted, and the server still answers.
    let status = server.status(&key).await;
    assert_eq!(status["limits"]["requests_per_day"]["used"], 0);
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    server.stop().await;
}

/// Model names, token counts and latencies out of bounds are refused with a
/// 400 naming the field, and nothing of the call is counted.
#[tokio::test]
async fn reports_out_of_bounds_are_refused_naming_the_field() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 100}}))
        .await;
    let too_long = "m".repeat(101);
    let cases = [
        ("/api/quota/check", json!({"model": too_long}), "model"),
        ("/api/quota/check", json!({"model": "gpt 4o"}), "model"),
        ("/api/quota/check", json!({"model": ""}), "model"),
        (
            "/api/quota/check",
            json!({"estimated_tokens": 1_000_000_001u64}),
            "estimated_tokens",
        ),
        ("/api/quota/usage", json!({"model": too_long}), "model"),
        ("/api/quota/usage", json!({"model": "gpt-4o\u{0}"}), "model"),
        ("/api/quota/usage", json!({"model": "modèle"}), "model"),
        (
            "/api/quota/usage",
            json!({"latency_ms": 18_446_744_073_709_551_615u64}),
            "latency_ms",
        ),
        (
            "/api/quota/usage",
            json!({"latency_ms": 86_400_001u64}),
            "latency_ms",
        ),
        (
            "/api/quota/usage",
            json!({"usage": {"prompt_tokens": 1_000_000_001u64, "completion_tokens": 1}}),
            "usage.prompt_tokens",
        ),
    ];
    for (path, body, param) in cases {
        let shown = body.to_string();
        let answer = server.post(path, &key, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path} {shown}");
        assert_eq!(answer.error_code(), "invalid_value", "{path} {shown}");
        assert_eq!(answer.body["error"]["param"], param, "{path} {shown}");
    }
    let status = server.status(&key).await;
    assert_eq!(status["limits"]["requests_per_day"]["used"], 0);

    // The bounds themselves are accepted.
    let longest = "m".repeat(100);
    let answer = server
        .post(
            "/api/quota/usage",
            &key,
            json!({"model": longest, "latency_ms": 86_400_000u64,
                   "usage": {"prompt_tokens": 1_000_000_000u64, "completion_tokens": 0}}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    server.stop().await;
}

#[tokio::test]
async fn unknown_workspaces_and_routes_answer_404_in_json() {
    let server = TestServer::start(&[]).await;
    for path in [
        "/api/quota/status?workspace=nope",
        "/api/quota/status?workspace=NOT%20VALID",
        "/api/workspaces/nope",
        "/api/nothing/here",
    ] {
        let response = server.get(path, ADMIN_KEY).await;
        assert_eq!(response.status, StatusCode::NOT_FOUND, "{path}");
        assert!(response.body["error"]["message"].is_string(), "{path}");
    }
    let ws_over_http = server.get("/api/quota/ws", ADMIN_KEY).await;
    assert_eq!(ws_over_http.status, StatusCode::BAD_REQUEST);
    assert_eq!(ws_over_http.error_code(), "websocket_required");
    server.stop().await;
}

#[tokio::test]
async fn an_array_is_never_read_as_an_object() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_minute": 5}}))
        .await;
    // serde fills a struct from an array in field order; each of these
    // would have set something nobody reading the request sees.
    for (method, path, credential, body) in [
        (
            reqwest::Method::POST,
            "/api/workspaces",
            ADMIN_KEY,
            json!(["beta", "Beta"]),
        ),
        (
            reqwest::Method::PATCH,
            "/api/workspaces/acme",
            ADMIN_KEY,
            json!({"limits": [null]}),
        ),
        (
            reqwest::Method::POST,
            "/api/quota/check",
            key.as_str(),
            json!([1000]),
        ),
        (
            reqwest::Method::POST,
            "/api/quota/usage",
            key.as_str(),
            json!({"usage": [1, 2, 3]}),
        ),
        (
            reqwest::Method::POST,
            "/api/quota/usage",
            key.as_str(),
            json!({"status_code": 429, "error": ["insufficient_quota"]}),
        ),
    ] {
        let answer = server
            .send(method.clone(), path, credential, Some(body.clone()))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {path} {body}: {:?}",
            answer.body
        );
        assert_eq!(answer.error_code(), "invalid_field", "{body}");
    }
    let acme = server.get("/api/workspaces/acme", ADMIN_KEY).await;
    assert_eq!(acme.body["limits"]["requests_per_minute"], 5, "unchanged");
    assert_eq!(
        server.get("/api/workspaces/beta", ADMIN_KEY).await.status,
        StatusCode::NOT_FOUND
    );
    let status = server.status(&key).await;
    assert_eq!(status["limits"]["requests_per_minute"]["used"], 0);
    assert!(status["billing_block"].is_null());
    server.stop().await;
}
