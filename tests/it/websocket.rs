//! The live WebSocket: initial status, ping, pushes on change, subscriptions,
//! tickets, heartbeats and slow clients.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{ADMIN_KEY, TestServer, eventually, fixture_json};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) fn ws_url(server: &TestServer, query: &str) -> String {
    format!(
        "{}/api/quota/ws{query}",
        server.base.replacen("http", "ws", 1)
    )
}

pub(crate) async fn connect(server: &TestServer, key: &str, query: &str) -> Ws {
    let mut request = ws_url(server, query)
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header"),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket connects");
    ws
}

/// The next JSON message, failing the test after `deadline`.
async fn next_json(ws: &mut Ws, deadline: Duration) -> Value {
    tokio::time::timeout(deadline, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text).expect("JSON message");
                }
                Some(Ok(_)) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a message before the deadline")
}

/// The first message satisfying `wanted`, skipping others.
pub(crate) async fn wait_for(
    ws: &mut Ws,
    deadline: Duration,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let message = next_json(ws, left).await;
        if wanted(&message) {
            return message;
        }
    }
}

/// Waits until every predicate has matched a message, in whatever order the
/// messages come; returns the matches in the predicates' order.
pub(crate) async fn wait_for_all(
    ws: &mut Ws,
    deadline: Duration,
    wanted: &[&dyn Fn(&Value) -> bool],
) -> Vec<Value> {
    let until = tokio::time::Instant::now() + deadline;
    let mut found: Vec<Option<Value>> = vec![None; wanted.len()];
    while found.iter().any(Option::is_none) {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let message = next_json(ws, left).await;
        for (slot, predicate) in found.iter_mut().zip(wanted) {
            if slot.is_none() && predicate(&message) {
                *slot = Some(message.clone());
            }
        }
    }
    found.into_iter().flatten().collect()
}

#[tokio::test]
async fn the_current_status_arrives_on_connect_and_changes_are_pushed() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 3, "requests_per_day": null}}),
        )
        .await;
    let mut ws = connect(&server, &key, "").await;
    let first = next_json(&mut ws, Duration::from_secs(1)).await;
    assert_eq!(first["type"], "status");
    assert_eq!(first["workspace"], "acme");
    assert_eq!(first["data"]["status"], "normal");
    assert_eq!(first["data"]["limits"]["requests_per_minute"]["used"], 0);

    // A status change is pushed at once, with its notification, and the
    // usage movement follows within a second; in whatever order they come.
    for _ in 0..3 {
        server.check(&key, 0).await;
    }
    let found = wait_for_all(
        &mut ws,
        Duration::from_secs(1),
        &[
            &|m| m["type"] == "status" && m["data"]["status"] == "rate_limited",
            &|m| m["type"] == "notification" && m["data"]["kind"] == "rate_limited",
            &|m| m["type"] == "usage" && m["data"]["limits"]["requests_per_minute"]["used"] == 3,
        ],
    )
    .await;
    let (status, notification) = (&found[0], &found[1]);
    assert_eq!(
        status["data"]["reasons"][0],
        "requests_per_minute_exhausted"
    );
    assert_eq!(notification["event"], "raised");
    assert_eq!(notification["workspace"], "acme");

    // An upstream billing error reported by the app is pushed too.
    server
        .post("/api/quota/usage", &key, json!({"status_code": 429, "error": fixture_json("error_429_insufficient_quota.json")["error"]}))
        .await;
    let blocked = wait_for(&mut ws, Duration::from_secs(1), |m| {
        m["type"] == "status" && m["data"]["status"] == "quota_exceeded"
    })
    .await;
    assert_eq!(blocked["data"]["blocked"], true);
    server
        .post("/api/quota/reset", ADMIN_KEY, json!({"workspace": "acme"}))
        .await;
    let found = wait_for_all(
        &mut ws,
        Duration::from_secs(1),
        &[
            &|m| m["type"] == "status" && m["data"]["status"] == "normal",
            &|m| {
                m["type"] == "notification"
                    && m["event"] == "resolved"
                    && m["data"]["kind"] == "upstream_quota_exhausted"
            },
        ],
    )
    .await;
    assert_eq!(found[0]["data"]["limits"]["requests_per_minute"]["used"], 0);
    assert!(found[1]["data"]["resolved_at"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn clients_ping_and_get_pong() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let mut ws = connect(&server, &key, "").await;
    next_json(&mut ws, Duration::from_secs(1)).await;
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .expect("send");
    let pong = wait_for(&mut ws, Duration::from_secs(1), |m| m["type"] == "pong").await;
    assert!(pong["ts"].as_i64().expect("ts") > 1_700_000_000_000);
    ws.send(Message::Text(r#"{"type":"dance"}"#.into()))
        .await
        .expect("send");
    let error = wait_for(&mut ws, Duration::from_secs(1), |m| m["type"] == "error").await;
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("unknown message")
    );
    server.stop().await;
}

#[tokio::test]
async fn usage_updates_are_throttled_per_workspace() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 1000}}))
        .await;
    let mut ws = connect(&server, &key, "").await;
    next_json(&mut ws, Duration::from_secs(1)).await;
    let started = tokio::time::Instant::now();
    let burst: Vec<_> = (0..60)
        .map(|_| {
            let client = server.client.clone();
            let url = server.url("/api/quota/check");
            let key = key.clone();
            tokio::spawn(async move {
                client
                    .post(url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .expect("check")
                    .status()
            })
        })
        .collect();
    for call in burst {
        assert_eq!(call.await.expect("task"), StatusCode::OK);
    }
    let burst_took = started.elapsed();
    let mut usage_messages = 0;
    loop {
        let message = next_json(&mut ws, Duration::from_secs(2)).await;
        if message["type"] == "usage" {
            usage_messages += 1;
            if message["data"]["limits"]["requests_per_day"]["used"] == 60 {
                break;
            }
        }
    }
    let window = started.elapsed().max(burst_took);
    // At most one usage message per half second, plus the one in flight.
    let allowed = (window.as_millis() / 500) as usize + 2;
    assert!(
        usage_messages <= allowed,
        "{usage_messages} usage messages in {window:?}"
    );
    assert!(usage_messages < 60, "usage is not pushed per request");
    server.stop().await;
}

#[tokio::test]
async fn browsers_use_single_use_tickets_instead_of_keys_in_urls() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let ticket = server.post("/api/quota/ws-ticket", &key, json!({})).await;
    assert_eq!(ticket.status, StatusCode::OK);
    let ticket = ticket.body["ticket"].as_str().expect("ticket").to_owned();
    let url = ws_url(&server, &format!("?ticket={ticket}"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("ticket accepted");
    let first = next_json(&mut ws, Duration::from_secs(1)).await;
    assert_eq!(first["workspace"], "acme");
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("a used ticket must be refused, got {other:?}"),
    }
    match tokio_tungstenite::connect_async(ws_url(&server, "")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("no credentials must be refused, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn subscriptions_follow_the_key() {
    let server = TestServer::start(&[]).await;
    let acme = server.workspace(json!({"id": "acme"})).await;
    let beta = server.workspace(json!({"id": "beta"})).await;

    // A workspace key follows only its workspace and cannot widen that.
    match tokio_tungstenite::connect_async({
        let mut request = ws_url(&server, "?workspace=beta")
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {acme}").parse().expect("header"),
        );
        request
    })
    .await
    {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("another workspace must look absent, got {other:?}"),
    }
    let mut own = connect(&server, &acme, "").await;
    assert_eq!(
        next_json(&mut own, Duration::from_secs(1)).await["workspace"],
        "acme"
    );
    own.send(Message::Text(
        r#"{"type":"subscribe","workspaces":"*"}"#.into(),
    ))
    .await
    .expect("send");
    let refused = wait_for(&mut own, Duration::from_secs(1), |m| m["type"] == "error").await;
    assert!(
        refused["message"]
            .as_str()
            .expect("message")
            .contains("admin")
    );

    // The admin follows everything by default, then narrows.
    let mut admin = connect(&server, ADMIN_KEY, "").await;
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(
            next_json(&mut admin, Duration::from_secs(1)).await["workspace"]
                .as_str()
                .expect("ws")
                .to_owned(),
        );
    }
    first.sort();
    assert_eq!(first, ["acme", "beta", "default"]);
    admin
        .send(Message::Text(
            r#"{"type":"subscribe","workspaces":["beta"]}"#.into(),
        ))
        .await
        .expect("send");
    let subscribed = wait_for(&mut admin, Duration::from_secs(1), |m| {
        m["type"] == "subscribed"
    })
    .await;
    assert_eq!(subscribed["workspaces"], json!(["beta"]));
    // Changes to acme are not delivered to a beta-only subscriber, nor to
    // beta's own key.
    server
        .post("/api/quota/reset", ADMIN_KEY, json!({"workspace": "acme"}))
        .await;
    server
        .post("/api/quota/reset", ADMIN_KEY, json!({"workspace": "beta"}))
        .await;
    let next = wait_for(&mut admin, Duration::from_secs(1), |m| {
        m["type"] == "status" && m.get("resync").is_none() && m["workspace"] != Value::Null
    })
    .await;
    assert_eq!(
        next["workspace"], "beta",
        "the acme reset came first but is filtered out"
    );
    let mut beta_ws = connect(&server, &beta, "").await;
    assert_eq!(
        next_json(&mut beta_ws, Duration::from_secs(1)).await["workspace"],
        "beta"
    );
    server
        .post("/api/quota/reset", ADMIN_KEY, json!({"workspace": "acme"}))
        .await;
    server.check(&beta, 0).await;
    let update = wait_for(&mut beta_ws, Duration::from_secs(2), |m| {
        m["type"] == "usage" || m["type"] == "status"
    })
    .await;
    assert_eq!(update["workspace"], "beta");
    server.stop().await;
}

#[tokio::test]
async fn revoking_a_key_closes_its_connections() {
    let server = TestServer::start(&[]).await;
    let created = server
        .post("/api/workspaces", ADMIN_KEY, json!({"id": "acme"}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let key = server
        .post("/api/workspaces/acme/keys", ADMIN_KEY, json!({}))
        .await
        .body;
    let (plaintext, key_id) = (
        key["key"].as_str().expect("key"),
        key["id"].as_str().expect("id"),
    );
    let mut ws = connect(&server, plaintext, "").await;
    next_json(&mut ws, Duration::from_secs(1)).await;
    let revoked = server
        .send(
            reqwest::Method::DELETE,
            &format!("/api/workspaces/acme/keys/{key_id}"),
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let error = wait_for(&mut ws, Duration::from_secs(2), |m| m["type"] == "error").await;
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("revoked")
    );
    assert_eq!(
        close_code(&mut ws).await,
        Some(1008),
        "closed as a policy violation, so clients do not reconnect"
    );
    server.stop().await;
}

/// Waits for the server to close `ws`; returns the close frame's code.
pub(crate) async fn close_code(ws: &mut Ws) -> Option<u16> {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|frame| u16::from(frame.code)),
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the connection is closed")
}

#[tokio::test]
async fn shutting_down_closes_connections_as_going_away() {
    let mut server = TestServer::start(&[]).await;
    let mut ws = connect(&server, ADMIN_KEY, "").await;
    next_json(&mut ws, Duration::from_secs(1)).await;
    server.restart().await;
    assert_eq!(
        close_code(&mut ws).await,
        Some(1001),
        "going away: clients reconnect, here or to another replica"
    );
    // The restarted server, on the same address, takes connections again.
    let mut again = connect(&server, ADMIN_KEY, "").await;
    assert_eq!(
        next_json(&mut again, Duration::from_secs(2)).await["type"],
        "status"
    );
    server.stop().await;
}

/// Opens a WebSocket by hand and never answers pings.
async fn silent_peer(server: &TestServer) -> tokio::net::TcpStream {
    let addr = server.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /api/quota/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("handshake");
    stream
}

#[tokio::test]
async fn peers_that_stop_answering_pings_are_closed() {
    let server = TestServer::start(&[("QUOTAWATCH_WS_PING_INTERVAL", "200ms")]).await;
    let mut silent = silent_peer(&server).await;
    let mut polite = connect(&server, ADMIN_KEY, "").await;
    // Read whatever the server sends until it hangs up; the polite client
    // keeps reading (which answers pings) at the same time.
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 4096];
        loop {
            tokio::select! {
                read = silent.read(&mut buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => received.extend_from_slice(&buffer[..n]),
                },
                message = polite.next() => assert!(matches!(message, Some(Ok(_))), "the polite client stays connected"),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent peer was not disconnected");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // Ping frames (opcode 0x9) were sent before giving up.
    assert!(
        received.windows(1).any(|b| b[0] == 0x89),
        "no ping was sent"
    );
    polite
        .send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .expect("polite client still open");
    wait_for(&mut polite, Duration::from_secs(1), |m| m["type"] == "pong").await;
    server.stop().await;
}

/// A client whose socket takes almost nothing: its kernel buffers fill at
/// once and it falls behind.
async fn stuck_client(server: &TestServer) -> Ws {
    let addr: std::net::SocketAddr = server
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let stream = socket.connect(addr).await.expect("connect");
    let mut request = ws_url(server, "").into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_KEY}").parse().expect("header"),
    );
    let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .expect("handshake");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_client_delays_nobody_and_resyncs_from_a_snapshot() {
    let server = TestServer::start(&[]).await;
    for i in 0..100 {
        let created = server
            .post(
                "/api/workspaces",
                ADMIN_KEY,
                json!({"id": format!("ws{i:03}")}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
    }
    let mut stuck = stuck_client(&server).await;
    let mut healthy = connect(&server, ADMIN_KEY, "?workspace=ws042").await;
    next_json(&mut healthy, Duration::from_secs(1)).await;

    // Every reset of all workspaces sends 101 status messages to the stuck
    // client: far more than its socket and queue can hold.
    let rounds = 120;
    for _ in 0..rounds {
        let reset = server
            .post("/api/quota/reset", ADMIN_KEY, json!({"all": true}))
            .await;
        assert_eq!(reset.status, StatusCode::OK);
    }
    // The healthy client is served promptly all along: the last change is
    // there within a second.
    let key = server
        .post("/api/workspaces/ws042/keys", ADMIN_KEY, json!({}))
        .await
        .body["key"]
        .as_str()
        .expect("key")
        .to_owned();
    server.check(&key, 0).await;
    wait_for(&mut healthy, Duration::from_secs(1), |m| {
        m["data"]["limits"]["requests_per_minute"]["used"] == 1
    })
    .await;

    // The stuck client, once it reads, finds a resync snapshot instead of the
    // whole backlog.
    let mut read = 0;
    let resync = loop {
        let message = next_json(&mut stuck, Duration::from_secs(5)).await;
        read += 1;
        if message["resync"] == true {
            break message;
        }
        assert!(
            read < rounds * 101,
            "read the whole backlog without a resync"
        );
    };
    assert_eq!(resync["type"], "status");
    assert!(read < rounds * 101);
    // After the snapshot it is current: ws042's latest usage is reachable.
    let current = wait_for(&mut stuck, Duration::from_secs(5), |m| {
        m["workspace"] == "ws042" && m["data"]["limits"]["requests_per_minute"]["used"] == 1
    })
    .await;
    assert_eq!(current["data"]["status"], "normal");
    server.stop().await;
}

#[tokio::test]
async fn a_message_over_64_kib_closes_the_connection_as_too_big() {
    let server = TestServer::start(&[]).await;
    let mut ws = connect(&server, ADMIN_KEY, "").await;
    // Just under the limit: understood as a (bad) message, answered.
    let under = json!({"type": "x".repeat(60 * 1024)}).to_string();
    ws.send(Message::text(under)).await.expect("send");
    let error = wait_for(&mut ws, Duration::from_secs(2), |m| m["type"] == "error").await;
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("unknown message")
    );
    let over = json!({"type": "x".repeat(65 * 1024)}).to_string();
    ws.send(Message::text(over)).await.expect("send");
    assert_eq!(close_code(&mut ws).await, Some(1009), "message too big");
    server.stop().await;
}

/// Opens a WebSocket with `key`, or returns the HTTP refusal.
async fn try_connect(server: &TestServer, key: &str) -> Result<Ws, (u16, Value)> {
    let mut request = ws_url(server, "").into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header"),
    );
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let body = serde_json::from_slice(&body).expect("a JSON error");
            Err((response.status().as_u16(), body))
        }
        Err(other) => panic!("unexpected failure: {other:?}"),
    }
}

#[tokio::test]
async fn one_key_holds_at_most_the_configured_connections() {
    let server = TestServer::start(&[("QUOTAWATCH_WS_MAX_CONNECTIONS_PER_KEY", "2")]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let mut first = try_connect(&server, &key).await.expect("first");
    let _second = try_connect(&server, &key).await.expect("second");
    let (status, body) = try_connect(&server, &key)
        .await
        .expect_err("the third is refused");
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "too_many_connections");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("QUOTAWATCH_WS_MAX_CONNECTIONS_PER_KEY")
    );
    // A ticket stands for its key, and counts under the same cap.
    let ticket = server.post("/api/quota/ws-ticket", &key, json!({})).await;
    let ticket = ticket.body["ticket"].as_str().expect("ticket");
    match tokio_tungstenite::connect_async(ws_url(&server, &format!("?ticket={ticket}"))).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("a ticket of a key at its cap must be refused, got {other:?}"),
    }
    // Other keys are not affected.
    let _admin = try_connect(&server, ADMIN_KEY).await.expect("admin");
    // Closing one frees its slot.
    first.close(None).await.expect("close");
    drop(first);
    eventually(
        "a slot to free when a connection closes",
        Duration::from_secs(5),
        || async { try_connect(&server, &key).await.ok() },
    )
    .await;
    server.stop().await;
}
