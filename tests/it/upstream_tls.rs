//! The proxy in front of an HTTPS upstream: one whose certificate a root
//! named by `QUOTAWATCH_UPSTREAM_CA_FILE` signed answers JSON and streams,
//! over HTTP/2 or HTTP/1.1 as the handshake settles, with usage counted;
//! one whose certificate nothing trusts is never sent the request.

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

#[tokio::test]
async fn a_call_an_http2_upstream_refuses_unprocessed_is_sent_again() {
    // A bare HTTP/2 server over TLS that refuses the first stream it is
    // sent (REFUSED_STREAM: it did not process it, RFC 9113 section 8.7)
    // and answers every other.
    let (config, root_pem) = server_config(&[b"h2"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let streams = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&streams);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(tls).await.expect("HTTP/2");
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst) == 0 {
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
            });
        }
    });
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
