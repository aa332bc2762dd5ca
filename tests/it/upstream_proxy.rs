//! The upstream behind the proxy the environment names: an HTTPS upstream
//! is reached through a CONNECT tunnel carrying the proxy's credentials
//! (to a proxy over TLS too), an HTTP upstream by calls in absolute form,
//! and `NO_PROXY` naming the upstream's host bypasses the proxy.

use std::sync::{Arc, Mutex};

use base64::Engine;
use quotawatch::mock::MockOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::proxy::tokens_settle_at;
use crate::support::tls::{TlsUpstream, server_config};
use crate::support::{TestServer, UPSTREAM_KEY, Upstream, fixture};

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 50})
}

/// The head of a request a client sent the proxy: its request line and
/// its `Proxy-Authorization`, if any.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    line: String,
    authorization: Option<String>,
}

/// A proxy on `127.0.0.1:0` that opens a tunnel for `CONNECT host:port`
/// and forwards a call in absolute form to the host it names, refusing
/// with 407 any request without the credentials it demands. It records
/// every connection accepted and the head of the first request on each.
struct TestProxy {
    port: u16,
    /// Where the proxy is spoken to over TLS, the root that signed its
    /// certificate for `localhost`, as PEM.
    root_pem: Option<String>,
    accepted: Arc<Mutex<usize>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestProxy {
    async fn start(user: &str, password: &str) -> Self {
        Self::serving(user, password, None).await
    }

    /// A proxy spoken to over TLS, as an `https://` proxy is.
    async fn over_tls(user: &str, password: &str) -> Self {
        let (config, root_pem) = server_config(&[b"http/1.1"]);
        let mut proxy =
            Self::serving(user, password, Some(TlsAcceptor::from(Arc::new(config)))).await;
        proxy.root_pem = Some(root_pem);
        proxy
    }

    async fn serving(user: &str, password: &str, tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let demanded = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let accepted = Arc::new(Mutex::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (counted, recorded) = (Arc::clone(&accepted), Arc::clone(&seen));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                *counted.lock().expect("lock") += 1;
                let (demanded, recorded) = (demanded.clone(), Arc::clone(&recorded));
                match &tls {
                    None => tokio::spawn(serve(client, demanded, recorded)),
                    Some(tls) => {
                        let accepting = tls.accept(client);
                        tokio::spawn(async move {
                            if let Ok(client) = accepting.await {
                                serve(client, demanded, recorded).await;
                            }
                        })
                    }
                };
            }
        });
        Self {
            port,
            root_pem: None,
            accepted,
            seen,
        }
    }

    /// The proxy's URL with `user` and `password` in it.
    fn url(&self, user: &str, password: &str) -> String {
        match self.root_pem {
            None => format!("http://{user}:{password}@127.0.0.1:{}", self.port),
            Some(_) => format!("https://{user}:{password}@localhost:{}", self.port),
        }
    }

    fn accepted(&self) -> usize {
        *self.accepted.lock().expect("lock")
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

/// Serves one connection to the proxy: reads the head of its first
/// request, records it, and then either refuses it or joins the client to
/// the host it names.
async fn serve<S>(mut client: S, demanded: String, seen: Arc<Mutex<Vec<Seen>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8(head.clone()).expect("a head in UTF-8");
    let mut lines = text.split("\r\n");
    let line = lines.next().expect("a request line").to_owned();
    let authorization = lines.find_map(|header| {
        let (name, value) = header.split_once(':')?;
        name.eq_ignore_ascii_case("proxy-authorization")
            .then(|| value.trim().to_owned())
    });
    let authorized = authorization.as_deref() == Some(demanded.as_str());
    seen.lock().expect("lock").push(Seen {
        line: line.clone(),
        authorization,
    });
    if !authorized {
        let _ = client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    }
    let mut words = line.split(' ');
    let (method, target) = (words.next(), words.next().expect("a target"));
    let mut upstream = if method == Some("CONNECT") {
        let upstream = TcpStream::connect(target).await.expect("the upstream");
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .expect("write");
        upstream
    } else {
        let host = target
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .expect("a request in absolute form");
        let mut upstream = TcpStream::connect(host).await.expect("the upstream");
        upstream.write_all(&head).await.expect("forward the head");
        upstream
    };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// A server proxying to `upstream` (a `/v1` URL), trusting `root_pem`
/// where the upstream has a private root, with `settings` beside; and the
/// key of its workspace `acme`. The directory holds the root's file for
/// as long as the server runs.
async fn server(
    upstream: &str,
    root_pem: Option<&str>,
    settings: &[(&str, &str)],
) -> (TestServer, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("upstream-root.pem");
    let root = root.to_str().expect("utf-8");
    let mut all = vec![
        ("QUOTAWATCH_UPSTREAM_URL", upstream),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
    ];
    if let Some(pem) = root_pem {
        std::fs::write(root, pem).expect("write the root");
        all.push(("QUOTAWATCH_UPSTREAM_CA_FILE", root));
    }
    all.extend_from_slice(settings);
    let server = TestServer::start(&all).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"tokens_per_day": 1000000}}))
        .await;
    (server, key, dir)
}

async fn https_upstream() -> TlsUpstream {
    TlsUpstream::start(
        MockOptions {
            require_key: Some(UPSTREAM_KEY.to_owned()),
            ..Default::default()
        },
        &[b"h2", b"http/1.1"],
    )
    .await
}

/// A chat completion through `server` answers 200 with the upstream's body.
async fn answers_the_chat(server: &TestServer, key: &str) {
    let response = server.openai("/chat/completions", key, chat()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.expect("body"),
        fixture("chat_completion.json")
    );
}

#[tokio::test]
async fn an_https_upstream_is_reached_through_one_connect_tunnel_carrying_the_proxy_credentials() {
    let upstream = https_upstream().await;
    let proxy = TestProxy::start("user", "pa ss").await;
    let port = upstream.url.trim_start_matches("https://localhost:");
    let port = port.split('/').next().expect("a port");
    let (server, key, _dir) = server(
        &upstream.url,
        Some(&upstream.root_pem),
        &[("HTTPS_PROXY", &proxy.url("user", "pa%20ss"))],
    )
    .await;

    for calls in 1..=2 {
        answers_the_chat(&server, &key).await;
        tokens_settle_at(&server, &key, 29 * calls).await;
    }
    // One tunnel carried both calls, with the credentials of the proxy's
    // URL, and TLS to the upstream inside it settled on HTTP/2.
    assert_eq!(
        proxy.seen(),
        vec![Seen {
            line: format!("CONNECT localhost:{port} HTTP/1.1"),
            authorization: Some("Basic dXNlcjpwYSBzcw==".to_owned()),
        }]
    );
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(upstream.protocols(), [Some(b"h2".to_vec())]);
    server.stop().await;
}

#[tokio::test]
async fn an_https_proxy_is_spoken_to_over_tls_with_the_tunnel_inside() {
    let upstream = https_upstream().await;
    let proxy = TestProxy::over_tls("user", "pass").await;
    // The file of roots to trust holds the upstream's and the proxy's.
    let roots = format!(
        "{}{}",
        upstream.root_pem,
        proxy.root_pem.as_deref().expect("a root")
    );
    let (server, key, _dir) = server(
        &upstream.url,
        Some(&roots),
        &[("HTTPS_PROXY", &proxy.url("user", "pass"))],
    )
    .await;

    answers_the_chat(&server, &key).await;
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].line.starts_with("CONNECT localhost:"), "{seen:?}");
    assert_eq!(upstream.protocols(), [Some(b"h2".to_vec())]);
    server.stop().await;
}

#[tokio::test]
async fn a_proxy_refusing_the_credentials_gets_a_502_that_does_not_show_them() {
    let upstream = https_upstream().await;
    let proxy = TestProxy::start("user", "right").await;
    let (server, key, _dir) = server(
        &upstream.url,
        Some(&upstream.root_pem),
        &[("ALL_PROXY", &proxy.url("user", "wrong-secret"))],
    )
    .await;

    let response = server.openai("/chat/completions", &key, chat()).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    let message = body["error"]["message"].as_str().expect("a message");
    assert!(
        message.contains("proxy authorization required") && !message.contains("wrong-secret"),
        "{message}"
    );
    assert_eq!(proxy.seen().len(), 1);
    assert!(
        upstream.protocols().is_empty(),
        "the upstream was not reached"
    );
    server.stop().await;
}

#[tokio::test]
async fn no_proxy_naming_the_upstream_host_bypasses_the_proxy() {
    let upstream = https_upstream().await;
    let proxy = TestProxy::start("user", "pass").await;
    let (server, key, _dir) = server(
        &upstream.url,
        Some(&upstream.root_pem),
        &[
            ("https_proxy", &proxy.url("user", "pass")),
            ("NO_PROXY", "example.com, localhost"),
        ],
    )
    .await;

    answers_the_chat(&server, &key).await;
    assert_eq!(upstream.protocols().len(), 1);
    assert_eq!(proxy.accepted(), 0);
    server.stop().await;
}

#[tokio::test]
async fn an_http_upstream_gets_calls_through_the_proxy_in_absolute_form_with_the_credentials() {
    let upstream = Upstream::strict().await;
    let proxy = TestProxy::start("user", "pass").await;
    let (server, key, _dir) = server(
        &upstream.url,
        None,
        &[("HTTP_PROXY", &proxy.url("user", "pass"))],
    )
    .await;

    answers_the_chat(&server, &key).await;
    assert_eq!(
        proxy.seen(),
        vec![Seen {
            line: format!("POST {}/chat/completions HTTP/1.1", upstream.url),
            authorization: Some("Basic dXNlcjpwYXNz".to_owned()),
        }]
    );
    assert_eq!(upstream.hits("/chat/completions").await, 1);
    server.stop().await;
}
