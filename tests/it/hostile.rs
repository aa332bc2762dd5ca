//! A hostile tenant with a workspace key and a raw HTTP client: every way
//! around the limits found so far, each either charged exactly like the
//! request it disguises or refused without reaching the upstream.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use quotawatch::mock::MockOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::proxy::{tokens_settle_at, used_tokens};
use crate::support::{ADMIN_KEY, TestServer, Upstream, fixture, proxied};

/// A request sent exactly as written: no URL library between the test and
/// the server to resolve dot segments or decode escapes first.
struct Raw {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

struct RawAnswer {
    status: StatusCode,
    body: String,
}

impl RawAnswer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

impl Raw {
    fn new(server: &TestServer) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: server.base.clone(),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        key: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> RawAnswer {
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {key}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.into())).expect("a request");
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .expect("an answer within 10 s")
            .expect("an answer");
        let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the whole body")
            .to_bytes();
        RawAnswer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

fn streamed_chat() -> String {
    json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 50,
        "messages": [{"role": "user", "content": "Say hello"}]})
    .to_string()
}

#[tokio::test]
async fn every_alias_of_a_streamed_chat_is_charged_like_the_chat() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[],
        json!({"id": "acme", "limits": {"tokens_per_day": 1000000}}),
    )
    .await;
    let raw = Raw::new(&server);
    let mut charged = 0;
    for alias in [
        "/v1/chat/completions",
        "/v1/x/../chat/completions",
        "/v1/./chat/completions",
        "/v1/%2e/chat/completions",
        "/v1//chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1/chat%5Ccompletions",
        "/v1/chat/completions/",
    ] {
        let answer = raw.send("POST", alias, &key, &[], streamed_chat()).await;
        assert_eq!(answer.status, StatusCode::OK, "{alias}: {}", answer.body);
        assert_eq!(
            answer.body,
            fixture("chat_completion_stream.sse"),
            "{alias}: usage was asked for and hidden again"
        );
        let seen = upstream.last().await;
        let path = seen["path"].as_str().expect("a path");
        assert!(
            path.eq_ignore_ascii_case("/v1/chat/completions"),
            "{alias} reached the upstream as {path}"
        );
        let sent: Value =
            serde_json::from_str(seen["body"].as_str().expect("a body")).expect("JSON");
        assert_eq!(sent["stream_options"]["include_usage"], true, "{alias}");
        // The fixture stream's usage: 10 prompt and 5 completion tokens.
        charged += 15;
        tokens_settle_at(&server, &key, charged).await;
    }
    // Letter case is the upstream's to judge (OpenAI answers 404), but the
    // request is priced as a chat all the same.
    let answer = raw
        .send("POST", "/v1/Chat/Completions", &key, &[], streamed_chat())
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let sent: Value = serde_json::from_str(upstream.last().await["body"].as_str().expect("a body"))
        .expect("JSON");
    assert_eq!(sent["stream_options"]["include_usage"], true);
    server.stop().await;
}

#[tokio::test]
async fn paths_that_leave_v1_or_cannot_be_read_never_reach_the_upstream() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(&upstream, &[], json!({"id": "acme"})).await;
    let raw = Raw::new(&server);
    for path in [
        "/v1/../mock/stats",
        "/v1/%2e%2e/mock/stats",
        "/v1/%2E%2E/mock/reset",
        "/v1/./../../etc/passwd",
        "/v1/x/../../mock/last",
        "/v1/%252e%252e/mock/stats",
        "/v1/chat/completions%3Fx",
        "/v1/.../chat/completions",
    ] {
        for method in ["GET", "POST"] {
            let answer = raw.send(method, path, &key, &[], "").await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{method} {path}");
            assert_eq!(answer.json()["error"]["code"], "invalid_path", "{path}");
        }
    }
    assert_eq!(upstream.stats().await["total"], 0, "nothing was forwarded");
    server.stop().await;
}

/// Every query a client's request line can carry reaches the upstream as
/// the URL standard encodes it, on the path it named: no character
/// makes building the upstream's URI fail (a 500) or ends the path early.
#[tokio::test]
async fn any_query_a_request_line_carries_reaches_the_upstream_encoded() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(&upstream, &[], json!({"id": "acme"})).await;
    let raw = Raw::new(&server);
    for (sent, forwarded) in [
        (
            "a={b}|c^d`e\\f[g]h&i=~!$()*,;:@/?j",
            "a={b}|c^d`e\\f[g]h&i=~!$()*,;:@/?j",
        ),
        ("q='x'&r=%22y%22&s=%ZZ&t=%", "q=%27x%27&r=%22y%22&s=%ZZ&t=%"),
        ("", ""),
    ] {
        let answer = raw
            .send("GET", &format!("/v1/models?{sent}"), &key, &[], "")
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{sent}: {}", answer.body);
        let last = upstream.last().await;
        assert_eq!(last["path"], "/v1/models", "{sent}");
        assert_eq!(last["query"], forwarded, "{sent}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_body_is_read_as_json_whatever_its_type_and_refused_when_it_is_not() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_TOKENIZER", "bytes")],
        json!({"id": "acme", "limits": {"tokens_per_day": 1000000}}),
    )
    .await;
    let raw = Raw::new(&server);
    let deep = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":{}"hi"{}}}]}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );
    let long_model = format!(r#"{{"model":"{}","messages":[]}}"#, "m".repeat(3000));
    let refused = [
        (long_model.as_str(), "a model name of 3,000 characters"),
        (
            r#"{"model":"gpt-4o\u0000","messages":[]}"#,
            "a model name with a NUL",
        ),
        (
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\ud800"}]}"#,
            "a lone surrogate",
        ),
        (deep.as_str(), "nesting deeper than the parser goes"),
        (
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","#,
            "a truncated body",
        ),
        (
            r#"{"model":"gpt-4o-mini","stream":false,"stream":true,"messages":[]}"#,
            "a field given twice",
        ),
        (
            "--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n--x--",
            "a multipart body",
        ),
        (
            r#"{"model":"gpt-4o-mini","stream":"true","messages":[]}"#,
            "a stream flag that is a string",
        ),
    ];
    for (body, what) in refused {
        for content_type in ["application/json", "multipart/form-data; boundary=x"] {
            let answer = raw
                .send(
                    "POST",
                    "/v1/chat/completions",
                    &key,
                    &[("content-type", content_type)],
                    body.to_owned(),
                )
                .await;
            assert_eq!(
                answer.status,
                StatusCode::BAD_REQUEST,
                "{what} as {content_type}"
            );
            assert_eq!(answer.json()["error"]["code"], "invalid_body", "{what}");
        }
    }
    assert_eq!(upstream.stats().await["total"], 0, "nothing was forwarded");
    assert_eq!(used_tokens(&server, &key).await, 0, "nothing was charged");

    // A JSON body declared as multipart is priced as JSON and forwarded as
    // JSON: the non-streamed chat fixture's usage is charged.
    let answer = raw
        .send(
            "POST",
            "/v1/chat/completions",
            &key,
            &[("content-type", "multipart/form-data; boundary=x")],
            json!({"model": "gpt-4o-mini", "max_tokens": 50,
                "messages": [{"role": "user", "content": "Say hello"}]})
            .to_string(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        upstream.last().await["headers"]["content-type"],
        "application/json"
    );
    tokens_settle_at(&server, &key, 29).await;
    server.stop().await;
}

#[tokio::test]
async fn a_workspace_cannot_name_any_variable_as_its_upstream_key() {
    let server = TestServer::start(&[("QUOTAWATCH_UPSTREAM_KEY_ACME", "sk-acme")]).await;
    server.workspace(json!({"id": "acme"})).await;
    for variable in [
        "QUOTAWATCH_UPSTREAM_KEY_UNSET",
        "QUOTA_ADMIN_RESET_KEY",
        "QUOTAWATCH_DATABASE_URL",
        "PATH",
        "QUOTAWATCH_UPSTREAM_KEY_",
    ] {
        let response = server
            .send(
                reqwest::Method::PATCH,
                "/api/workspaces/acme",
                ADMIN_KEY,
                Some(json!({"upstream_key_env": variable})),
            )
            .await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{variable}");
        assert_eq!(response.body["error"]["param"], "upstream_key_env");
    }
    let response = server
        .send(
            reqwest::Method::PATCH,
            "/api/workspaces/acme",
            ADMIN_KEY,
            Some(json!({"upstream_key_env": "QUOTAWATCH_UPSTREAM_KEY_ACME"})),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn a_workspace_that_cannot_be_admitted_is_refused_before_its_body_is_read() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_PROXY_MAX_BODY_BYTES", "2048")],
        json!({"id": "acme", "limits": {"requests_per_day": 1}}),
    )
    .await;
    let small = json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": []});
    let response = server.openai("/chat/completions", &key, small).await;
    assert_eq!(response.status(), StatusCode::OK);
    // A body far over the size limit: refused for the day's limit, which
    // is known before reading it, not for its size.
    let raw = Raw::new(&server);
    let answer = raw
        .send(
            "POST",
            "/v1/chat/completions",
            &key,
            &[],
            vec![b' '; 200_000],
        )
        .await;
    assert_eq!(
        answer.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        answer.body
    );
    assert_eq!(upstream.stats().await["total"], 1);
    server.stop().await;
}

#[tokio::test]
async fn refusals_before_the_body_is_read_leave_a_pooled_connection_usable() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(&upstream, &[], json!({"id": "acme"})).await;
    // One connection, reused for every request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    // Bodies that cannot arrive in one read: the answer is decided from the
    // headers while most of the body is still on its way.
    let small = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(600_000)}]}).to_string();
    let large = format!(
        "{{\"estimated_tokens\": 1, \"pad\": \"{}\"}}",
        "x".repeat(100_000)
    );
    let mut failures = Vec::new();
    for round in 0..1500 {
        let (request, expected) = match round % 5 {
            0 => (
                client
                    .post(server.url("/api/quota/usage"))
                    .bearer_auth("qw_wrong")
                    .body(small.clone()),
                StatusCode::UNAUTHORIZED,
            ),
            1 => (
                client
                    .post(server.url("/v1/chat/completions"))
                    .bearer_auth(ADMIN_KEY)
                    .body(small.clone()),
                StatusCode::FORBIDDEN,
            ),
            2 => (
                client
                    .post(server.url("/api/quota/check"))
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(r#"{"estimated_tokens": "many"}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            3 => (
                client
                    .post(server.url("/api/quota/check"))
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(large.clone()),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            _ => (
                client
                    .get(server.url("/api/quota/status"))
                    .bearer_auth(&key),
                StatusCode::OK,
            ),
        };
        match request.send().await {
            Ok(response) if response.status() == expected => {
                response.bytes().await.expect("the whole answer");
            }
            Ok(response) => panic!("round {round}: {} instead of {expected}", response.status()),
            Err(error) => failures.push(format!("round {round}: {error:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} transport errors: {failures:#?}",
        failures.len()
    );
    server.stop().await;
}

/// HTTP/1.1 answers with a `content-length`, read one by one from a
/// connection; bytes of a later answer that arrived with an earlier one
/// wait for their turn.
struct Answers {
    stream: tokio::net::tcp::OwnedReadHalf,
    buffer: Vec<u8>,
}

impl Answers {
    /// Reads more of the connection; `None` when it ended.
    async fn fill(&mut self) -> Option<()> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        let read = self.stream.read(&mut chunk).await.ok()?;
        self.buffer.extend_from_slice(&chunk[..read]);
        (read > 0).then_some(())
    }

    /// The next answer's status and whether it asks to close the
    /// connection; `None` when the connection ends first.
    async fn next(&mut self) -> Option<(u16, bool)> {
        let head_end = loop {
            if let Some(at) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buffer[..head_end]).to_ascii_lowercase();
        let status = head.get(9..12)?.parse().ok()?;
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        while self.buffer.len() < head_end + length {
            self.fill().await?;
        }
        self.buffer.drain(..head_end + length);
        Some((status, head.contains("connection: close")))
    }
}

#[tokio::test]
async fn a_connection_answered_before_its_body_arrived_serves_the_next_request() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(&[]).await;
    let address = server.base.trim_start_matches("http://").to_owned();
    for round in 0..20 {
        let stream = tokio::net::TcpStream::connect(&address)
            .await
            .expect("connect");
        let (reader, mut writer) = stream.into_split();
        // The body follows the headers in pieces, as a client uploading it
        // would send it; the 401 is decided from the headers alone.
        let body = vec![b'x'; 512 << 10];
        let sending = tokio::spawn(async move {
            let head = format!(
                "POST /api/quota/usage HTTP/1.1\r\nhost: quotawatch\r\nauthorization: Bearer qw_wrong\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            writer.write_all(head.as_bytes()).await.ok()?;
            for piece in body.chunks(16 << 10) {
                writer.write_all(piece).await.ok()?;
                tokio::task::yield_now().await;
            }
            writer
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: quotawatch\r\n\r\n")
                .await
                .ok()?;
            Some(writer)
        });
        let mut answers = Answers {
            stream: reader,
            buffer: Vec::new(),
        };
        let within = Duration::from_secs(10);
        let first = tokio::time::timeout(within, answers.next())
            .await
            .expect("an answer within 10 s");
        assert_eq!(first.map(|(status, _)| status), Some(401), "round {round}");
        let writer = sending.await.expect("the sender");
        if first.is_some_and(|(_, close)| close) {
            // Announced: the client opens a new connection, nothing is lost.
            continue;
        }
        let second = tokio::time::timeout(within, answers.next())
            .await
            .expect("an answer within 10 s");
        assert!(
            writer.is_some() && second.map(|(status, _)| status) == Some(200),
            "round {round}: the connection kept open did not serve the next request ({second:?})"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_workspace_not_the_client_chooses_the_organization_and_project_billed() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[],
        json!({"id": "acme", "upstream_organization": "org-acme", "upstream_project": "proj_acme"}),
    )
    .await;
    let other = server.workspace(json!({"id": "plain"})).await;
    for (key, expected) in [(&key, Some(("org-acme", "proj_acme"))), (&other, None)] {
        let response = server
            .client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("OpenAI-Organization", "org-operator-main")
            .header("OpenAI-Project", "proj_operator_main")
            .json(&json!({"model": "gpt-4o-mini", "messages": []}))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers().get("openai-organization").is_none(),
            "the operator's organization is not shown to tenants"
        );
        let headers = &upstream.last().await["headers"];
        let sent = (
            headers["openai-organization"].as_str(),
            headers["openai-project"].as_str(),
        );
        assert_eq!(
            sent,
            expected.map_or((None, None), |(o, p)| (Some(o), Some(p)))
        );
    }
    let response = server
        .send(
            reqwest::Method::PATCH,
            "/api/workspaces/acme",
            ADMIN_KEY,
            Some(json!({"upstream_organization": "org acme\r\nx-evil: 1"})),
        )
        .await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(response.body["error"]["param"], "upstream_organization");
    server.stop().await;
}

#[tokio::test]
async fn methods_without_a_body_carry_none_and_are_not_priced_as_completions() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[],
        json!({"id": "acme", "limits": {"tokens_per_day": 1000000}}),
    )
    .await;
    let raw = Raw::new(&server);
    // A completion hidden in a GET: refused before the upstream.
    let answer = raw
        .send("GET", "/v1/chat/completions", &key, &[], streamed_chat())
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], "unexpected_body");
    assert_eq!(upstream.stats().await["total"], 0);
    // Listing stored completions is a GET without a body: forwarded, no tokens.
    let answer = raw.send("GET", "/v1/models", &key, &[], "").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(used_tokens(&server, &key).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn the_largest_numbers_are_refused_as_too_large_not_wrapped() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[],
        json!({"id": "acme", "limits": {"tokens_per_day": 1000000}}),
    )
    .await;
    let raw = Raw::new(&server);
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":{0},"n":{0},"messages":[]}}"#,
        u64::MAX
    );
    let answer = raw
        .send("POST", "/v1/chat/completions", &key, &[], body)
        .await;
    assert_eq!(
        answer.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        answer.body
    );
    let declared = raw
        .send(
            "POST",
            "/v1/chat/completions",
            &key,
            &[("content-length", "18446744073709551615")],
            "{}",
        )
        .await;
    assert!(declared.status.is_client_error(), "{}", declared.status);
    assert_eq!(upstream.stats().await["total"], 0);
    assert_eq!(used_tokens(&server, &key).await, 0);
    server.stop().await;
}
