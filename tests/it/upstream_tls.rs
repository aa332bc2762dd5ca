//! The proxy in front of an HTTPS upstream: one whose certificate a root
//! named by `QUOTAWATCH_UPSTREAM_CA_FILE` signed answers JSON and streams,
//! over HTTP/2 or HTTP/1.1 as the handshake settles, with usage counted;
//! one whose certificate nothing trusts is never sent the request; a call
//! an HTTP/2 upstream left unprocessed (refused, or gone away from) is sent
//! again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use quotawatch::mock::MockOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::proxy::tokens_settle_at;
use crate::support::tls::{TlsUpstream, server_config};
use crate::support::{TestServer, UPSTREAM_KEY, fixture};

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 50, "stream": stream})
}

/// Sends a chat (streamed or not) through the proxy and checks that it is
/// answered with OpenAI's recorded answer, byte for byte.
async fn answers_as_recorded(server: &TestServer, key: &str, stream: bool) {
    let response = server.openai("/chat/completions", key, chat(stream)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let recorded = if stream {
        "chat_completion_stream.sse"
    } else {
        "chat_completion.json"
    };
    assert_eq!(response.text().await.expect("body"), fixture(recorded));
}

/// Every connection `upstream` served settled on `protocol` (by ALPN), and
/// there was at least one.
fn every_connection_spoke(upstream: &TlsUpstream, protocol: &[u8]) {
    let protocols = upstream.protocols();
    assert!(!protocols.is_empty());
    assert!(
        protocols
            .iter()
            .all(|spoken| spoken.as_deref() == Some(protocol)),
        "{protocols:?}"
    );
}

/// A mock that demands the upstream key, over TLS offering `alpn`.
async fn https_upstream(alpn: &[&[u8]]) -> TlsUpstream {
    TlsUpstream::start(
        MockOptions {
            require_key: Some(UPSTREAM_KEY.to_owned()),
            ..Default::default()
        },
        alpn,
    )
    .await
}

/// A server proxying to `upstream` (a `/v1` URL) and trusting `root_pem`
/// beside the system's roots, with workspace `acme`; the directory holds
/// the root's file for as long as the server runs.
async fn trusting(upstream: &str, root_pem: &str) -> (TestServer, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("upstream-root.pem");
    std::fs::write(&root, root_pem).expect("write the root");
    let server = TestServer::start(&[
        ("QUOTAWATCH_UPSTREAM_URL", upstream),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
        ("QUOTAWATCH_UPSTREAM_CA_FILE", root.to_str().expect("utf-8")),
    ])
    .await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"tokens_per_day": 1000000}}))
        .await;
    (server, key, dir)
}

#[tokio::test]
async fn an_https_upstream_signed_by_the_configured_root_answers_json_and_streams_over_http2() {
    let upstream = https_upstream(&[b"h2", b"http/1.1"]).await;
    let (server, key, _dir) = trusting(&upstream.url, &upstream.root_pem).await;

    answers_as_recorded(&server, &key, false).await;
    tokens_settle_at(&server, &key, 29).await;

    answers_as_recorded(&server, &key, true).await;
    tokens_settle_at(&server, &key, 29 + 15).await;

    // Both calls went over connections that settled on HTTP/2, as the
    // server preferred: the proxy offers it.
    every_connection_spoke(&upstream, b"h2");
    server.stop().await;
}

#[tokio::test]
async fn an_https_upstream_speaking_only_http1_is_reached_over_http1() {
    let upstream = https_upstream(&[b"http/1.1"]).await;
    let (server, key, _dir) = trusting(&upstream.url, &upstream.root_pem).await;

    answers_as_recorded(&server, &key, true).await;
    tokens_settle_at(&server, &key, 15).await;
    every_connection_spoke(&upstream, b"http/1.1");
    server.stop().await;
}

#[tokio::test]
async fn an_https_upstream_whose_certificate_is_not_trusted_gets_a_502_saying_the_handshake_failed()
{
    // The server trusts another private root than the one that signed the
    // upstream's certificate.
    let upstream = https_upstream(&[b"h2", b"http/1.1"]).await;
    let other = https_upstream(&[b"h2", b"http/1.1"]).await;
    let (server, key, _dir) = trusting(&upstream.url, &other.root_pem).await;

    let response = server.openai("/chat/completions", &key, chat(false)).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    let message = body["error"]["message"].as_str().expect("a message");
    // The kind of failure, but not the names rustls reads off the
    // certificate: those belong to the operator's network.
    assert_eq!(
        message,
        "the upstream could not be reached: error sending request: the TLS handshake failed"
    );
    assert!(
        upstream.protocols().is_empty(),
        "no handshake with the untrusted upstream succeeded"
    );
    assert_eq!(server.status(&key).await["errors"]["server_error"], 1);
    server.stop().await;
}

/// A bare HTTP/2 server over TLS on 127.0.0.1, serving each connection
/// with `serve` (given the TLS stream and the connection's number, from 0);
/// its port and the root that signed its certificate.
async fn http2_upstream<F, Served>(serve: F) -> (u16, String)
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, usize) -> Served
        + Send
        + Sync
        + 'static,
    Served: Future<Output = ()> + Send + 'static,
{
    let (config, root_pem) = server_config(&[b"h2"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            tokio::spawn(serve(tls, connections));
            connections += 1;
        }
    });
    (port, root_pem)
}

/// Answers every stream on `tls` with OpenAI's recorded chat completion,
/// but those `refuse` says to refuse (REFUSED_STREAM: not processed, RFC
/// 9113 section 8.7).
async fn answer_http2<Io>(tls: Io, refuse: impl Fn() -> bool)
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut connection = h2::server::handshake(tls).await.expect("HTTP/2");
    while let Some(Ok((_, mut respond))) = connection.accept().await {
        if refuse() {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        let head = axum::http::Response::builder()
            .header("content-type", "application/json")
            .body(())
            .expect("a response");
        let mut body = respond.send_response(head, false).expect("headers");
        body.send_data(Bytes::from(fixture("chat_completion.json")), true)
            .expect("the body");
    }
}

#[tokio::test]
async fn a_call_an_http2_upstream_refuses_unprocessed_is_sent_again() {
    // The first stream is refused, every other answered.
    let streams = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&streams);
    let (port, root_pem) = http2_upstream(move |tls, _| {
        let seen = Arc::clone(&seen);
        answer_http2(tls, move || seen.fetch_add(1, Ordering::SeqCst) == 0)
    })
    .await;
    let url = format!("https://localhost:{port}/v1");
    let (server, key, _dir) = trusting(&url, &root_pem).await;

    answers_as_recorded(&server, &key, false).await;
    assert_eq!(
        streams.load(Ordering::SeqCst),
        2,
        "refused once, then answered"
    );
    tokens_settle_at(&server, &key, 29).await;
    server.stop().await;
}

#[tokio::test]
async fn a_call_an_http2_upstream_going_away_left_unprocessed_is_sent_again() {
    // The first connection is shut down gracefully as the call arrives on
    // it: a GOAWAY frame without error whose last stream is none, so that
    // the call's stream is one the upstream says it did not process (RFC
    // 9113 section 6.8). Written frame by frame: an HTTP/2 library counts
    // a stream as processed once its headers arrive. Later connections
    // answer.
    let requests_dropped = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::clone(&requests_dropped);
    let (port, root_pem) = http2_upstream(move |mut tls, connection| {
        let dropped = Arc::clone(&dropped);
        async move {
            if connection > 0 {
                return answer_http2(tls, || false).await;
            }
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut preface = [0; 24];
            tls.read_exact(&mut preface).await.expect("the preface");
            assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            // An empty SETTINGS frame: the server's defaults.
            tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
                .await
                .expect("SETTINGS");
            loop {
                let mut head = [0; 9];
                if tls.read_exact(&mut head).await.is_err() {
                    return;
                }
                let length =
                    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                let mut payload = vec![0; length];
                tls.read_exact(&mut payload)
                    .await
                    .expect("a frame's payload");
                match (head[3], head[4]) {
                    // The client's SETTINGS, acknowledged.
                    (4, 0) => {
                        tls.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0])
                            .await
                            .expect("the ACK");
                    }
                    // HEADERS: a call. GOAWAY, last stream 0, NO_ERROR.
                    (1, _) => {
                        dropped.fetch_add(1, Ordering::SeqCst);
                        let go_away = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                        tls.write_all(&go_away).await.expect("GOAWAY");
                        tls.flush().await.expect("flushed");
                    }
                    _ => {}
                }
            }
        }
    })
    .await;
    let url = format!("https://localhost:{port}/v1");
    let (server, key, _dir) = trusting(&url, &root_pem).await;

    answers_as_recorded(&server, &key, false).await;
    assert_eq!(
        requests_dropped.load(Ordering::SeqCst),
        1,
        "the call reached the first connection, which went away"
    );
    tokens_settle_at(&server, &key, 29).await;
    server.stop().await;
}
