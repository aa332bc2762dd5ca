//! The `/v1/*` proxy against the fake OpenAI upstream: forwarding,
//! streaming, timeouts, enforcement, accounting and what upstream answers
//! mean.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use quotawatch::mock::MockOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, TestServer, UPSTREAM_KEY, Upstream, eventually, fixture, proxied};

/// Workspace `acme` with room for every test's tokens.
fn roomy_workspace() -> Value {
    json!({"id": "acme", "limits": {"tokens_per_day": 1000000}})
}

/// A fake upstream that waits `millis` between streamed events.
async fn streaming_upstream(millis: u64) -> Upstream {
    Upstream::start(MockOptions {
        chunk_delay: Duration::from_millis(millis),
        ..Default::default()
    })
    .await
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 50, "stream": stream})
}

pub(crate) async fn used_tokens(server: &TestServer, key: &str) -> u64 {
    server.status(key).await["limits"]["tokens_per_day"]["used"]
        .as_u64()
        .expect("a tokens_per_day limit")
}

/// Waits until the workspace's day count of tokens settles at `expected`.
pub(crate) async fn tokens_settle_at(server: &TestServer, key: &str, expected: u64) {
    eventually(
        &format!("{expected} tokens to be counted"),
        Duration::from_secs(5),
        || async { (used_tokens(server, key).await == expected).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_chat_completion_is_forwarded_with_the_upstream_key_and_comes_back_unchanged() {
    let upstream = Upstream::strict().await;
    let (server, key) = proxied(&upstream, &[], json!({"id": "acme", "limits": {"requests_per_minute": 100, "tokens_per_minute": 100000, "tokens_per_day": 1000000}})).await;
    let response = server
        .client
        .post(server.url("/v1/chat/completions?api-version=2024-10-21"))
        .bearer_auth(&key)
        .header("OpenAI-Organization", "org-test")
        .header("OpenAI-Project", "proj_test")
        .header("X-Stainless-Retry-Count", "0")
        .header("Proxy-Authorization", "Basic c2VjcmV0")
        .json(&chat(false))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    let body = response.text().await.expect("body");
    assert_eq!(
        body,
        fixture("chat_completion.json"),
        "the body comes back byte for byte"
    );
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        header("x-request-id").as_deref(),
        Some("req_33432b46a09d2e3e4918cdc085747825")
    );
    assert_eq!(header("openai-processing-ms").as_deref(), Some("1531"));
    // The workspace's own headroom, and the upstream's where it differs.
    assert_eq!(header("x-ratelimit-limit-requests").as_deref(), Some("100"));
    assert_eq!(
        header("x-ratelimit-remaining-requests").as_deref(),
        Some("99")
    );
    assert_eq!(
        header("x-upstream-ratelimit-limit-requests").as_deref(),
        Some("500")
    );
    assert_eq!(
        header("x-upstream-ratelimit-remaining-tokens").as_deref(),
        Some("28713")
    );
    let overhead: f64 = header("x-quotawatch-overhead-ms")
        .expect("overhead")
        .parse()
        .expect("a number");
    assert!(overhead >= 0.0);

    let seen = upstream.last().await;
    assert_eq!(seen["path"], "/v1/chat/completions");
    assert_eq!(seen["query"], "api-version=2024-10-21");
    assert_eq!(
        seen["headers"]["authorization"],
        format!("Bearer {UPSTREAM_KEY}")
    );
    assert!(
        seen["headers"].get("openai-organization").is_none()
            && seen["headers"].get("openai-project").is_none(),
        "a tenant does not choose which of the operator's organizations or projects is billed"
    );
    assert_eq!(seen["headers"]["x-stainless-retry-count"], "0");
    assert!(
        seen["headers"].get("proxy-authorization").is_none(),
        "hop-by-hop headers are dropped"
    );
    assert!(
        !seen.to_string().contains(&key),
        "the workspace key never goes upstream"
    );
    let sent: Value = serde_json::from_str(seen["body"].as_str().expect("body")).expect("JSON");
    assert_eq!(sent, chat(false), "the body goes upstream as sent");

    // Counted with the actual usage, and the upstream's view recorded.
    tokens_settle_at(&server, &key, 29).await;
    let status = server.status(&key).await;
    assert_eq!(status["upstream"]["requests"]["limit"], 500);
    assert_eq!(status["upstream"]["tokens"]["remaining"], 28713);
    server.stop().await;
}

#[tokio::test]
async fn streams_pass_through_as_they_arrive_with_usage_counted() {
    let upstream = streaming_upstream(150).await;
    let (server, key) = proxied(&upstream, &[], roomy_workspace()).await;

    // Without include_usage: quotawatch asks for it upstream, and removes it
    // again, so the client sees exactly the stream it asked for.
    let started = Instant::now();
    let response = server.openai("/chat/completions", &key, chat(true)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream; charset=utf-8")
    );
    let mut body = response.bytes_stream();
    let mut received = Vec::new();
    let mut first_chunk_at = None;
    while let Some(chunk) = body.next().await {
        first_chunk_at.get_or_insert_with(|| started.elapsed());
        received.extend_from_slice(&chunk.expect("chunk"));
    }
    let total = started.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&received),
        fixture("chat_completion_stream.sse")
    );
    // Eleven gaps of 150 ms upstream: the first chunk came long before the end.
    let first = first_chunk_at.expect("chunks");
    assert!(
        first + Duration::from_millis(1000) < total,
        "first chunk at {first:?} of {total:?}"
    );
    let sent = upstream.last().await;
    assert!(
        sent["body"]
            .as_str()
            .expect("body")
            .contains(r#""stream_options":{"include_usage":true}"#)
    );
    tokens_settle_at(&server, &key, 15).await;

    // With include_usage: passed through unchanged.
    let mut asked = chat(true);
    asked["stream_options"] = json!({"include_usage": true});
    let body = server
        .openai("/chat/completions", &key, asked)
        .await
        .text()
        .await
        .expect("body");
    assert_eq!(body, fixture("chat_completion_stream_include_usage.sse"));
    tokens_settle_at(&server, &key, 30).await;
    server.stop().await;
}

#[tokio::test]
async fn embeddings_responses_and_legacy_completions_are_counted() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(&upstream, &[], roomy_workspace()).await;
    let embeddings = server
        .openai(
            "/embeddings",
            &key,
            json!({"model": "text-embedding-3-small", "input": "Hello"}),
        )
        .await;
    assert_eq!(
        embeddings.text().await.expect("body"),
        fixture("embeddings.json")
    );
    tokens_settle_at(&server, &key, 8).await;
    server
        .openai(
            "/responses",
            &key,
            json!({"model": "gpt-4.1", "input": "Hi"}),
        )
        .await
        .text()
        .await
        .expect("body");
    tokens_settle_at(&server, &key, 8 + 11).await;
    let streamed = server
        .openai(
            "/responses",
            &key,
            json!({"model": "gpt-4.1", "input": "Hi", "stream": true}),
        )
        .await
        .text()
        .await
        .expect("body");
    assert_eq!(streamed, fixture("responses_stream.sse"));
    tokens_settle_at(&server, &key, 8 + 11 + 11).await;
    server
        .openai(
            "/completions",
            &key,
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Hi", "max_tokens": 5}),
        )
        .await
        .text()
        .await
        .expect("body");
    tokens_settle_at(&server, &key, 8 + 11 + 11 + 8).await;
    let history = eventually("history by model", Duration::from_secs(5), || async {
        let body = server
            .get("/api/quota/history?window=1h&step=1m", &key)
            .await
            .body;
        let requests: i64 = body["points"]
            .as_array()?
            .iter()
            .map(|p| p["requests"].as_i64().unwrap_or(0))
            .sum();
        (requests == 4).then_some(body)
    })
    .await;
    let prompt: i64 = history["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["prompt_tokens"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(prompt, 8 + 9 + 9 + 5);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_upstream_and_is_charged_what_it_got() {
    let upstream = streaming_upstream(200).await;
    let (server, key) = proxied(&upstream, &[], roomy_workspace()).await;
    let mut request = chat(true);
    request["max_tokens"] = json!(5000);
    let response = server.openai("/chat/completions", &key, request).await;
    let mut body = response.bytes_stream();
    body.next().await.expect("a first chunk").expect("chunk");
    assert!(
        used_tokens(&server, &key).await > 5000,
        "the estimate is reserved while the stream runs"
    );
    drop(body);
    eventually(
        "the upstream stream to be dropped",
        Duration::from_secs(5),
        || async { (upstream.stats().await["streams"]["abandoned"] == 1).then_some(()) },
    )
    .await;
    // Settled with the prompt estimate and what was streamed, not the 5000
    // completion tokens reserved.
    let used = eventually("the settlement", Duration::from_secs(5), || async {
        let used = used_tokens(&server, &key).await;
        (used < 100).then_some(used)
    })
    .await;
    assert!(used > 0);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_a_reasoning_stream_is_charged_its_whole_estimate() {
    let upstream = streaming_upstream(200).await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_TOKENIZER", "bytes")],
        roomy_workspace(),
    )
    .await;
    for (round, model) in (0u64..).zip(["o3-mini", "gpt-5"]) {
        let before = used_tokens(&server, &key).await;
        let mut request = chat(true);
        request["model"] = json!(model);
        request["max_tokens"] = json!(5000);
        let response = server.openai("/chat/completions", &key, request).await;
        let reserved = used_tokens(&server, &key).await - before;
        assert!(reserved > 5000, "{model}: the estimate is reserved");
        let mut body = response.bytes_stream();
        body.next().await.expect("a first chunk").expect("chunk");
        let abandoned = upstream.stats().await["streams"]["abandoned"]
            .as_u64()
            .unwrap_or(0);
        drop(body);
        eventually(
            "the upstream stream to be dropped",
            Duration::from_secs(5),
            || async {
                let now = upstream.stats().await["streams"]["abandoned"].as_u64();
                (now == Some(abandoned + 1)).then_some(())
            },
        )
        .await;
        // The hidden reasoning may have used the whole allowance: the
        // estimate stays, where another model is charged what it streamed.
        eventually("the settlement", Duration::from_secs(5), || async {
            let settled: u64 = server
                .metrics()
                .await
                .lines()
                .filter(|line| {
                    line.starts_with(
                        r#"quotawatch_requests_total{workspace="acme",endpoint="chat.completions""#,
                    )
                })
                .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            (settled == round + 1).then_some(())
        })
        .await;
        assert_eq!(
            used_tokens(&server, &key).await - before,
            reserved,
            "{model}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn broken_and_stalled_streams_settle_with_the_estimate_and_count_as_errors() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_UPSTREAM_IDLE_TIMEOUT", "300ms")],
        roomy_workspace(),
    )
    .await;
    let estimate = {
        let check = server.check(&key, 0).await;
        server.post("/api/quota/usage", &key, json!({"reservation_id": check.body["reservation_id"], "usage": {"prompt_tokens": 0}})).await;
        used_tokens(&server, &key).await
    };
    assert_eq!(estimate, 0);
    for scenario in ["stream_break", "stream_stall"] {
        let response = server
            .client
            .post(server.url(&format!("/v1/chat/completions?mock_scenario={scenario}")))
            .bearer_auth(&key)
            .json(&chat(true))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "the stream had begun");
        assert!(
            response.bytes().await.is_err(),
            "{scenario}: the client sees the stream break"
        );
    }
    // An error event inside a 200 stream ends it cleanly for the client
    // (the SDKs raise it), and counts as the server error it reports.
    let response = server
        .client
        .post(server.url("/v1/chat/completions?mock_scenario=stream_error"))
        .bearer_auth(&key)
        .json(&chat(true))
        .send()
        .await
        .expect("request");
    let text = response.text().await.expect("the stream ends cleanly");
    assert!(text.contains(r#"{"error":{"message":"The server had an error"#));
    let status = eventually(
        "the three failures counted",
        Duration::from_secs(5),
        || async {
            let status = server.status(&key).await;
            (status["errors"]["server_error"] == 3).then_some(status)
        },
    )
    .await;
    // Prompt estimate plus the 50 max_tokens, twice: the estimate stands.
    let used = status["limits"]["tokens_per_day"]["used"]
        .as_u64()
        .expect("used");
    assert!(used >= 100, "{used}");
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_or_silent_upstream_gets_502_or_504_with_retry() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dead = format!("http://{}/v1", closed.local_addr().expect("address"));
    drop(closed);
    let server = TestServer::start(&[
        ("QUOTAWATCH_UPSTREAM_URL", &dead),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
    ])
    .await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_minute": 100}}))
        .await;
    let response = server.openai("/chat/completions", &key, chat(false)).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("x-should-retry").as_deref(), Some("true"));
    assert_eq!(
        header("x-ratelimit-remaining-requests").as_deref(),
        Some("99"),
        "the workspace's headroom comes with failures too"
    );
    let overhead: f64 = header("x-quotawatch-overhead-ms")
        .expect("overhead")
        .parse()
        .expect("a number");
    assert!(overhead >= 0.0);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    assert_eq!(server.status(&key).await["errors"]["server_error"], 1);
    let metrics = server.metrics().await;
    for expected in [
        r#"quotawatch_upstream_errors_total{class="upstream_failed"} 1"#,
        r#"quotawatch_requests_total{workspace="acme",endpoint="chat.completions",outcome="upstream_failed"} 1"#,
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in\n{metrics}"
        );
    }
    server.stop().await;

    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_UPSTREAM_HEADERS_TIMEOUT", "300ms")],
        json!({"id": "acme"}),
    )
    .await;
    let response = server
        .client
        .post(server.url("/v1/chat/completions?mock_scenario=timeout"))
        .bearer_auth(&key)
        .json(&chat(false))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        response
            .headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert_eq!(server.status(&key).await["errors"]["server_error"], 1);
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_are_answered_in_openai_shape() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_PROXY_MAX_BODY_BYTES", "4096")],
        json!({"id": "acme"}),
    )
    .await;
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let response = server.openai("/chat/completions", &key, big.clone()).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "request_too_large");
    // The same body sent chunked, without a Content-Length to judge by.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .to_string()
        .into_bytes()
        .chunks(1000)
        .map(|chunk| Ok(chunk.to_vec()))
        .collect();
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "request_too_large");
    for (bearer, status, code) in [
        ("", StatusCode::UNAUTHORIZED, "missing_api_key"),
        ("qw_wrong", StatusCode::UNAUTHORIZED, "invalid_api_key"),
        (ADMIN_KEY, StatusCode::FORBIDDEN, "workspace_key_required"),
    ] {
        let response = server
            .openai("/chat/completions", bearer, chat(false))
            .await;
        assert_eq!(response.status(), status, "{bearer}");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], code);
        assert!(body["error"]["type"].is_string());
    }
    assert_eq!(
        upstream.stats().await["total"],
        0,
        "none of these reached the upstream"
    );
    // A model listing passes through like anything else under /v1.
    let models = server
        .client
        .get(server.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(models.status(), StatusCode::OK);
    server.stop().await;

    let server = TestServer::start(&[("QUOTAWATCH_UPSTREAM_URL", &upstream.url)]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let upstream_key_missing = |reader: String| {
        let server = &server;
        async move {
            server
                .get("/api/quota/notifications?workspace=acme", &reader)
                .await
                .body["notifications"]
                .as_array()
                .expect("notifications")
                .iter()
                .find(|n| n["kind"] == "upstream_key_missing")
                .cloned()
        }
    };
    let notification = upstream_key_missing(ADMIN_KEY.to_owned())
        .await
        .expect("operators are told at start-up");
    assert!(notification["workspace"].is_null(), "service-wide");
    assert_eq!(notification["severity"], "critical");
    assert!(
        upstream_key_missing(key.clone()).await.is_none(),
        "a tenant is not shown the server's configuration"
    );
    let response = server.openai("/chat/completions", &key, chat(false)).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers()["x-should-retry"],
        "false",
        "no retry mends a missing key"
    );
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "upstream_key_missing");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("OPENAI_API_KEY")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_workspace_can_use_its_own_upstream_key() {
    let upstream = Upstream::start(MockOptions {
        require_key: Some("sk-acme-own".to_owned()),
        ..Default::default()
    })
    .await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_UPSTREAM_KEY_ACME", "sk-acme-own")],
        json!({"id": "acme", "upstream_key_env": "QUOTAWATCH_UPSTREAM_KEY_ACME"}),
    )
    .await;
    let response = server.openai("/chat/completions", &key, chat(false)).await;
    assert_eq!(response.status(), StatusCode::OK);
    // A variable that is not set could only fail every call: refused.
    let other = server
        .post(
            "/api/workspaces",
            ADMIN_KEY,
            json!({"id": "other", "upstream_key_env": "QUOTAWATCH_UPSTREAM_KEY_NOT_SET"}),
        )
        .await;
    assert_eq!(other.status, StatusCode::BAD_REQUEST);
    assert_eq!(other.body["error"]["param"], "upstream_key_env");
    assert!(
        other.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("QUOTAWATCH_UPSTREAM_KEY_NOT_SET is not set")
    );
    server.stop().await;
}

#[tokio::test]
async fn refused_requests_never_reach_the_upstream() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[],
        json!({"id": "acme", "limits": {"requests_per_minute": 2, "requests_per_day": null}}),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(
            server
                .openai("/chat/completions", &key, chat(false))
                .await
                .status(),
            StatusCode::OK
        );
    }
    let refused = server.openai("/chat/completions", &key, chat(false)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().get("retry-after").is_some());
    assert!(refused.headers().get("x-quotawatch-overhead-ms").is_some());
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("acme")
    );
    assert_eq!(upstream.hits("/chat/completions").await, 2);
    // A request whose estimate exceeds a whole token limit is refused for good.
    let small = server
        .workspace(json!({"id": "small", "limits": {"tokens_per_minute": 100}}))
        .await;
    let mut greedy = chat(false);
    greedy["max_tokens"] = json!(500);
    let refused = server.openai("/chat/completions", &small, greedy).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused
            .headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("false")
    );
    server.stop().await;
}

/// Sends one chat request answered with `scenario`.
async fn with_scenario(server: &TestServer, key: &str, scenario: &str) -> reqwest::Response {
    server
        .client
        .post(server.url(&format!("/v1/chat/completions?mock_scenario={scenario}")))
        .bearer_auth(key)
        .json(&chat(false))
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn a_transient_upstream_429_holds_the_workspace_until_retry_after() {
    for (scenario, fixture_name, hold) in [
        (
            "rate_limit_requests",
            "error_429_rate_limit_requests.json",
            20,
        ),
        ("rate_limit_tokens", "error_429_rate_limit_tokens.json", 10),
        ("slow_down", "error_429_slow_down.json", 1),
        ("azure_429", "azure_error_429.json", 10),
    ] {
        let upstream = Upstream::start(MockOptions::default()).await;
        let (server, key) = proxied(&upstream, &[], json!({"id": "acme"})).await;
        let answer = with_scenario(&server, &key, scenario).await;
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS, "{scenario}");
        assert_eq!(
            answer
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some(hold.to_string().as_str())
        );
        assert!(
            answer.headers().get("x-should-retry").is_none(),
            "{scenario}: the SDKs may retry after the wait"
        );
        assert_eq!(
            answer.text().await.expect("body"),
            fixture(fixture_name),
            "{scenario}: the upstream's body is passed on"
        );
        let status = server.status(&key).await;
        assert_eq!(status["status"], "rate_limited", "{scenario}");
        assert_eq!(status["reasons"], json!(["upstream_rate_limited"]));
        // The next request is held back locally, not sent.
        let held = server.openai("/chat/completions", &key, chat(false)).await;
        assert_eq!(held.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = held
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .expect("retry-after");
        assert!(
            retry_after <= hold && retry_after >= 1,
            "{scenario}: {retry_after}"
        );
        let body: Value = held.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "upstream_rate_limited");
        assert_eq!(upstream.hits("/chat/completions").await, 1, "{scenario}");
        server.stop().await;
    }
}

#[tokio::test]
async fn request_too_large_is_passed_on_without_blocking_anyone() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(&upstream, &[], json!({"id": "acme"})).await;
    let answer = with_scenario(&server, &key, "request_too_large").await;
    assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        answer
            .headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("false")
    );
    assert_eq!(
        answer.text().await.expect("body"),
        fixture("error_429_request_too_large.json")
    );
    assert_eq!(server.status(&key).await["status"], "normal");
    assert_eq!(
        server
            .openai("/chat/completions", &key, chat(false))
            .await
            .status(),
        StatusCode::OK
    );
    server.stop().await;
}

#[tokio::test]
async fn a_billing_429_blocks_locally_and_one_probe_per_interval_finds_it_fixed() {
    for (scenario, code) in [
        ("insufficient_quota", "insufficient_quota"),
        ("insufficient_quota_legacy", "insufficient_quota"),
        ("credit_balance_exhausted", "credit_balance_exhausted"),
        (
            "organization_spend_limit_exceeded",
            "organization_spend_limit_exceeded",
        ),
        (
            "project_spend_limit_exceeded",
            "project_spend_limit_exceeded",
        ),
    ] {
        let upstream = Upstream::start(MockOptions::default()).await;
        let (server, key) = proxied(
            &upstream,
            &[("QUOTAWATCH_PROBE_INTERVAL", "1s")],
            json!({"id": "acme"}),
        )
        .await;
        upstream.set_scenario(scenario).await;
        let answer = server.openai("/chat/completions", &key, chat(false)).await;
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            answer
                .headers()
                .get("x-should-retry")
                .and_then(|v| v.to_str().ok()),
            Some("false"),
            "{scenario}"
        );
        let status = server.status(&key).await;
        assert_eq!(status["status"], "quota_exceeded", "{scenario}");
        assert_eq!(status["reasons"], json!([format!("upstream_{code}")]));
        let notifications = server.get("/api/quota/notifications", &key).await.body;
        assert_eq!(
            notifications["notifications"][0]["kind"],
            "upstream_quota_exhausted"
        );

        // Refused locally while blocked: no retry, no time.
        let held = server.openai("/chat/completions", &key, chat(false)).await;
        assert_eq!(held.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            held.headers()
                .get("x-should-retry")
                .and_then(|v| v.to_str().ok()),
            Some("false")
        );
        assert!(held.headers().get("retry-after").is_none());
        assert_eq!(upstream.hits("/chat/completions").await, 1);

        // Billing is fixed upstream; the next probe finds out.
        upstream.set_scenario("ok").await;
        eventually(
            "a probe to lift the block",
            Duration::from_secs(5),
            || async {
                (server
                    .openai("/chat/completions", &key, chat(false))
                    .await
                    .status()
                    == StatusCode::OK)
                    .then_some(())
            },
        )
        .await;
        assert_eq!(server.status(&key).await["status"], "normal", "{scenario}");
        assert_eq!(
            upstream.hits("/chat/completions").await,
            2,
            "{scenario}: exactly one probe went upstream"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn failing_upstream_calls_raise_one_upstream_errors_notification() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(&upstream, &[], json!({"id": "acme"})).await;
    for _ in 0..4 {
        assert_eq!(
            server
                .openai("/chat/completions", &key, chat(false))
                .await
                .status(),
            StatusCode::OK
        );
    }
    for scenario in [
        "server_error",
        "overloaded",
        "overloaded_legacy",
        "server_error",
        "server_error",
    ] {
        let answer = with_scenario(&server, &key, scenario).await;
        assert!(answer.status().is_server_error());
        assert!(
            answer.headers().get("x-should-retry").is_none(),
            "5xx are the SDKs' to retry"
        );
    }
    let notifications = server.get("/api/quota/notifications", &key).await.body;
    let errors: Vec<&Value> = notifications["notifications"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|n| n["kind"] == "upstream_errors")
        .collect();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]["message"]
            .as_str()
            .expect("message")
            .contains("5 of 9")
    );
    assert_eq!(server.status(&key).await["errors"]["server_error"], 5);
    server.stop().await;
}

#[tokio::test]
async fn a_rejected_upstream_key_raises_a_critical_notification() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(&upstream, &[], json!({"id": "acme"})).await;
    let answer = with_scenario(&server, &key, "invalid_api_key").await;
    // Not OpenAI's 401, which would send the app's developers to check
    // their own key: a 502 that names the server's configuration.
    assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(answer.headers()["x-should-retry"], "false");
    assert!(
        answer
            .headers()
            .contains_key("x-ratelimit-remaining-requests")
    );
    let body = answer.json::<Value>().await.expect("JSON");
    assert_eq!(body["error"]["code"], "upstream_authentication_failed");
    assert_eq!(body["error"]["type"], "server_error");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("OPENAI_API_KEY") && !message.contains("Incorrect API key"));
    let notifications = server.get("/api/quota/notifications", &key).await.body;
    let notification = &notifications["notifications"][0];
    assert_eq!(
        (
            notification["kind"].as_str(),
            notification["severity"].as_str()
        ),
        (Some("upstream_errors"), Some("critical"))
    );
    assert!(
        notification["title"]
            .as_str()
            .expect("title")
            .contains("rejected")
    );
    // The client's own mistakes (a 400) block nobody.
    let bad = with_scenario(&server, &key, "context_length_exceeded").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    server.stop().await;
}

#[tokio::test]
async fn metrics_describe_requests_tokens_refusals_status_and_overhead() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[],
        json!({"id": "acme", "limits": {"requests_per_minute": 2, "requests_per_day": null}}),
    )
    .await;
    server
        .openai("/chat/completions", &key, chat(false))
        .await
        .text()
        .await
        .expect("body");
    server
        .openai(
            "/chat/completions",
            &key,
            json!({"model": "my-fine-tune", "messages": []}),
        )
        .await
        .text()
        .await
        .expect("body");
    server
        .openai("/chat/completions", &key, chat(false))
        .await
        .text()
        .await
        .expect("body");
    let forbidden = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let text = eventually("the metrics", Duration::from_secs(5), || async {
        let text = server.metrics().await;
        text.contains("quotawatch_tokens_total").then_some(text)
    })
    .await;
    for expected in [
        r#"quotawatch_requests_total{workspace="acme",endpoint="chat.completions",outcome="success"} 2"#,
        r#"quotawatch_requests_total{workspace="acme",endpoint="chat.completions",outcome="refused"} 1"#,
        r#"quotawatch_refusals_total{workspace="acme",limit="requests_per_minute"} 1"#,
        r#"quotawatch_tokens_total{workspace="acme",model="gpt-4o-mini",kind="prompt"} 19"#,
        r#"quotawatch_tokens_total{workspace="acme",model="other",kind="prompt"} 19"#,
        r#"quotawatch_workspace_status{workspace="acme"} 2"#,
        r#"quotawatch_limit_utilization{workspace="acme",limit="requests_per_minute"} 1.0"#,
        r#"quotawatch_upstream_remaining{workspace="acme",bucket="requests"} 499"#,
        r#"quotawatch_overhead_seconds_count{phase="request"} 2"#,
        r#"quotawatch_overhead_seconds_count{phase="response"} 2"#,
        r#"quotawatch_upstream_latency_seconds_count 2"#,
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
    assert!(
        !text.contains("my-fine-tune"),
        "unknown models are not labels"
    );
    server.stop().await;
}

#[tokio::test]
async fn other_methods_and_multipart_uploads_are_forwarded_as_sent() {
    let upstream = Upstream::strict().await;
    let (server, key) = proxied(&upstream, &[], roomy_workspace()).await;

    let models = server
        .client
        .get(server.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(models.status(), StatusCode::OK);
    let listed: Value = models.json().await.expect("JSON");
    assert_eq!(listed["object"], "list");
    assert_eq!(upstream.last().await["method"], "GET");

    let deleted = server
        .client
        .delete(server.url("/v1/files/file-abc123"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(deleted.status(), StatusCode::OK);
    let deleted: Value = deleted.json().await.expect("JSON");
    assert_eq!(
        (&deleted["id"], &deleted["deleted"]),
        (&json!("file-abc123"), &json!(true))
    );
    let seen = upstream.last().await;
    assert_eq!(
        (&seen["method"], &seen["path"]),
        (&json!("DELETE"), &json!("/v1/files/file-abc123"))
    );

    let boundary = "quotawatch-test-boundary";
    let upload = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"upload.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{{\"custom_id\":\"1\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\"}}\r\n--{boundary}--\r\n"
    );
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let created = server
        .client
        .post(server.url("/v1/files"))
        .bearer_auth(&key)
        .header("content-type", &content_type)
        .body(upload.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(created.status(), StatusCode::OK);
    let created: Value = created.json().await.expect("JSON");
    assert_eq!(created["bytes"], upload.len());
    let seen = upstream.last().await;
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["headers"]["content-type"], content_type.as_str());
    assert_eq!(
        seen["body"],
        upload.as_str(),
        "the upload goes upstream byte for byte"
    );

    // Three requests counted, none with tokens: none of them generates any.
    let status = server.status(&key).await;
    assert_eq!(status["limits"]["tokens_per_day"]["used"], 0);
    assert_eq!(status["limits"]["requests_per_day"]["used"], 3);
    server.stop().await;
}

#[tokio::test]
async fn connection_headers_stop_at_the_proxy_in_both_directions() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(&upstream, &[], json!({"id": "acme"})).await;

    // The mock does send them, so their absence below is the proxy's doing.
    let direct = server
        .client
        .post(format!(
            "{}/chat/completions?mock_scenario=hop_headers",
            upstream.url
        ))
        .json(&chat(false))
        .send()
        .await
        .expect("request");
    assert!(direct.headers().contains_key("x-mock-hop"));

    let response = server
        .client
        .post(server.url("/v1/chat/completions?mock_scenario=hop_headers"))
        .bearer_auth(&key)
        .header("connection", "x-client-hop")
        .header("x-client-hop", "this connection only")
        .json(&chat(false))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    for name in ["x-mock-hop", "keep-alive"] {
        assert!(!response.headers().contains_key(name), "{name} came back");
    }
    assert!(response.headers().contains_key("x-request-id"));
    let seen = upstream.last().await;
    assert!(
        seen["headers"].get("x-client-hop").is_none(),
        "a header the client's Connection named went upstream"
    );
    assert_eq!(seen["query"], "mock_scenario=hop_headers");
    server.stop().await;
}

#[tokio::test]
async fn a_stream_may_run_longer_than_the_headers_timeout() {
    let upstream = streaming_upstream(100).await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_UPSTREAM_HEADERS_TIMEOUT", "300ms")],
        roomy_workspace(),
    )
    .await;
    let started = Instant::now();
    let body = server
        .openai("/chat/completions", &key, chat(true))
        .await
        .text()
        .await
        .expect("the whole stream");
    assert!(started.elapsed() > Duration::from_millis(300));
    assert_eq!(body, fixture("chat_completion_stream.sse"));
    tokens_settle_at(&server, &key, 15).await;
    assert_eq!(server.status(&key).await["errors"]["server_error"], 0);
    server.stop().await;
}

#[tokio::test]
async fn bodies_without_a_json_content_type_or_with_odd_options_are_still_charged() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[],
        json!({"id": "acme", "limits": {"tokens_per_minute": 1000, "tokens_per_day": 1000000}}),
    )
    .await;
    // A request whose max_tokens alone exceeds the minute's tokens is refused
    // by its estimate, whatever its Content-Type says.
    let mut greedy = chat(false);
    greedy["max_tokens"] = json!(5000);
    for content_type in [None, Some("text/plain")] {
        let mut request = server
            .client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .body(greedy.to_string());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.expect("request");
        assert_eq!(
            response.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{content_type:?}"
        );
    }
    assert_eq!(upstream.stats().await["total"], 0);

    // `stream_options` that is null or not an object counts as absent: usage
    // is asked for in its place (so the stream is charged what it used),
    // and removed again before the client sees the stream.
    for options in [json!(null), json!("yes"), json!([true])] {
        let mut odd = chat(true);
        odd["stream_options"] = options.clone();
        let before = used_tokens(&server, &key).await;
        let response = server.openai("/chat/completions", &key, odd.clone()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.text().await.expect("body"),
            fixture("chat_completion_stream.sse"),
            "{options}"
        );
        let sent: Value =
            serde_json::from_str(upstream.last().await["body"].as_str().expect("body"))
                .expect("JSON");
        assert_eq!(
            sent["stream_options"],
            json!({"include_usage": true}),
            "{options}"
        );
        tokens_settle_at(&server, &key, before + 15).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn cached_and_reasoning_tokens_reach_history_and_metrics() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_METRICS_MODELS", "gpt-4o-mini")],
        roomy_workspace(),
    )
    .await;
    let response = with_scenario(&server, &key, "usage_details").await;
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("body");
    let failed = with_scenario(&server, &key, "server_error").await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    tokens_settle_at(&server, &key, 250).await;

    let point = eventually("the history", Duration::from_secs(5), || async {
        let history = server
            .get("/api/quota/history?window=1h&step=1m", &key)
            .await;
        let points = history.body["points"].as_array()?.clone();
        points.into_iter().find(|point| point["requests"] == 2)
    })
    .await;
    assert_eq!(
        (
            &point["tokens"],
            &point["prompt_tokens"],
            &point["completion_tokens"],
            &point["cached_tokens"],
            &point["reasoning_tokens"]
        ),
        (&json!(250), &json!(200), &json!(50), &json!(64), &json!(30))
    );
    assert_eq!(
        (
            &point["errors"],
            &point["client_errors"],
            &point["server_errors"]
        ),
        (&json!(1), &json!(0), &json!(1))
    );

    let text = server.metrics().await;
    for expected in [
        r#"quotawatch_tokens_total{workspace="acme",model="gpt-4o-mini",kind="cached"} 64"#,
        r#"quotawatch_tokens_total{workspace="acme",model="gpt-4o-mini",kind="reasoning"} 30"#,
        r#"quotawatch_upstream_errors_total{class="server_error"} 1"#,
        r#"quotawatch_requests_total{workspace="acme",endpoint="chat.completions",outcome="server_error"} 1"#,
        r#"quotawatch_overhead_seconds_count{phase="response"} 2"#,
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
    server.stop().await;
}

/// An upstream that answers every call with a redirect to `location`.
async fn redirecting_upstream(location: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("address"));
    let app = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(reqwest::header::LOCATION, location)],
                "",
            )
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A listener that counts the connections it is offered and says nothing
/// on them (a TLS server that never answers the handshake, or where a
/// redirect would lead).
async fn silent_listener() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    (address, accepted)
}

#[tokio::test]
async fn an_upstream_redirect_reaches_the_client_and_is_never_followed() {
    // Following it would send the upstream key wherever it points.
    let (elsewhere, offered) = silent_listener().await;
    let upstream = redirecting_upstream(format!("http://{elsewhere}/v1/chat/completions")).await;
    let server = TestServer::start(&[
        ("QUOTAWATCH_UPSTREAM_URL", upstream.as_str()),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
    ])
    .await;
    let key = server.workspace(roomy_workspace()).await;

    // A client that does not follow redirects either, to see the answer.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let response = client
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(false))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        response.headers()[reqwest::header::LOCATION],
        format!("http://{elsewhere}/v1/chat/completions").as_str()
    );
    assert_eq!(
        offered.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing went where the redirect points"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_https_upstream_that_never_answers_the_handshake_times_out_at_the_connect_timeout() {
    // The TCP connection succeeds; the TLS handshake never completes. The
    // connect timeout covers the handshake, so the call fails after it
    // rather than after the (here much longer) headers timeout.
    let (silent, offered) = silent_listener().await;
    let upstream = format!("https://{silent}/v1");
    let server = TestServer::start(&[
        ("QUOTAWATCH_UPSTREAM_URL", upstream.as_str()),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
        ("QUOTAWATCH_UPSTREAM_CONNECT_TIMEOUT", "1s"),
        ("QUOTAWATCH_UPSTREAM_HEADERS_TIMEOUT", "600s"),
    ])
    .await;
    let key = server.workspace(roomy_workspace()).await;

    let response = tokio::time::timeout(
        Duration::from_secs(60),
        server.openai("/chat/completions", &key, chat(false)),
    )
    .await
    .expect("answered well before the headers timeout");
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(offered.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    server.stop().await;
}
