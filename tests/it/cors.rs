//! A browser UI on another origin (`QUOTAWATCH_CORS_ORIGINS`): preflights,
//! the headers a page may read, the WebSocket's `Origin` check, and the
//! client library used from a page of a second origin in Chromium.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::browser::{Browser, PATIENCE};
use crate::support::{TestServer, client};

/// A listener on a free port, and the origin of pages served from it.
async fn page_origin() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let origin = format!("http://{}", listener.local_addr().expect("address"));
    (listener, origin)
}

/// A preflight for `GET /api/quota/status` with a key, as a page of
/// `origin` would send it.
async fn preflight(server: &TestServer, origin: &str) -> reqwest::Response {
    client()
        .request(reqwest::Method::OPTIONS, server.url("/api/quota/status"))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("preflight")
}

/// The status of a WebSocket handshake sent with `origin`.
async fn handshake(server: &TestServer, key: &str, origin: Option<&str>) -> u16 {
    let url = server.url("/api/quota/ws").replacen("http", "ws", 1);
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header"),
    );
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("header"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut socket, response)) => {
            let _ = socket.close(None).await;
            while socket.next().await.is_some() {}
            response.status().as_u16()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(error) => panic!("handshake: {error}"),
    }
}

#[tokio::test]
async fn listed_origins_may_call_the_api_and_open_the_websocket_others_may_not() {
    let (_listener, listed) = page_origin().await;
    let server = TestServer::start(&[(
        "QUOTAWATCH_CORS_ORIGINS",
        &format!("{listed},https://app.example.com"),
    )])
    .await;
    let key = server.workspace(json!({"id": "acme"})).await;

    let allowed = preflight(&server, &listed).await;
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(headers["access-control-allow-origin"], listed.as_str());
    let allowed_headers = headers["access-control-allow-headers"]
        .to_str()
        .expect("text");
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );

    let answer = client()
        .get(server.url("/api/quota/status"))
        .header("origin", &listed)
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    let exposed = answer.headers()["access-control-expose-headers"]
        .to_str()
        .expect("text")
        .to_owned();
    for header in [
        "x-ratelimit-remaining-requests",
        "retry-after",
        "x-should-retry",
    ] {
        assert!(exposed.contains(header), "{header} not exposed: {exposed}");
    }

    let refused = preflight(&server, "http://evil.example").await;
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "an unlisted origin gets no permission"
    );

    assert_eq!(handshake(&server, &key, Some(&listed)).await, 101);
    assert_eq!(handshake(&server, &key, None).await, 101, "not a browser");
    let own = server.base.clone();
    assert_eq!(
        handshake(&server, &key, Some(&own)).await,
        101,
        "the dashboard"
    );
    assert_eq!(
        handshake(&server, &key, Some("http://evil.example")).await,
        403
    );
    server.stop().await;
}

#[tokio::test]
async fn without_listed_origins_browsers_keep_other_pages_out() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let answer = preflight(&server, "http://localhost:3000").await;
    assert!(
        answer
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert_eq!(
        handshake(&server, &key, Some("http://localhost:3000")).await,
        403
    );
    server.stop().await;
}

#[tokio::test]
async fn origins_that_are_not_origins_are_refused_at_start() {
    for value in [
        "localhost:3000",
        "http://localhost:3000/",
        "http://localhost:3000/app",
        "ftp://x",
    ] {
        let vars = std::collections::HashMap::from([(
            "QUOTAWATCH_CORS_ORIGINS".to_owned(),
            value.to_owned(),
        )]);
        let lookup = move |name: &str| vars.get(name).cloned();
        let error = quotawatch::config::load(quotawatch::config::Sources {
            file: None,
            dotenv: None,
            env: &lookup,
            cli: vec![],
        })
        .err()
        .unwrap_or_else(|| panic!("{value} should be refused"));
        assert_eq!(error.setting, "QUOTAWATCH_CORS_ORIGINS", "{value}");
    }
}

/// A page that uses the client library from quotawatch at `base` with
/// `key`, writing what it gets into `#status`, `#live` and `#used`.
fn app_page(base: &str, key: &str) -> String {
    format!(
        r#"<!doctype html><html><body>
<p id="status">loading</p><p id="live">-</p><p id="used">-</p>
<script type="module">
const out = (id, text) => {{ document.getElementById(id).textContent = text; }};
try {{
  const {{ QuotaMonitor }} = await import("{base}/sdk/quota-client.js");
  const monitor = new QuotaMonitor({{ baseUrl: "{base}", token: "{key}" }});
  monitor.getStatus().then(
    (status) => out("status", "status: " + status.status),
    (error) => out("status", "refused: " + error),
  );
  monitor.subscribe((event) => {{
    if (event.type === "connection") out("live", event.state);
    const used = event.data?.limits?.requests_per_minute?.used;
    if (event.type === "status" && used !== undefined) out("used", "used: " + used);
  }});
}} catch (error) {{
  out("status", "refused: " + error);
}}
</script></body></html>"#
    )
}

/// Serves `page` at `/` on `listener` until the test ends.
fn serve_page(listener: tokio::net::TcpListener, page: Arc<Mutex<String>>) {
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.lock().expect("page").clone();
            async move { axum::response::Html(page) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
}

#[tokio::test]
async fn a_page_of_a_listed_origin_follows_its_workspace_live_in_chromium() {
    let Some(browser) =
        Browser::start("a_page_of_a_listed_origin_follows_its_workspace_live_in_chromium").await
    else {
        return;
    };
    let (listed_listener, listed) = page_origin().await;
    let (unlisted_listener, unlisted) = page_origin().await;
    let server = TestServer::start(&[("QUOTAWATCH_CORS_ORIGINS", &listed)]).await;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_minute": 100}}))
        .await;
    let page = Arc::new(Mutex::new(app_page(&server.base, &key)));
    serve_page(listed_listener, page.clone());
    serve_page(unlisted_listener, page);

    // The listed origin: REST and the live WebSocket both work.
    browser
        .client
        .goto(&format!("{listed}/"))
        .await
        .expect("open the app");
    browser
        .wait_text("#status", PATIENCE, |text| text == "status: normal")
        .await;
    browser
        .wait_text("#live", PATIENCE, |text| text == "open")
        .await;
    let checked = server.check(&key, 0).await;
    assert_eq!(checked.status, StatusCode::OK);
    browser
        .wait_text("#used", PATIENCE, |text| text == "used: 1")
        .await;

    // Another origin: the browser refuses it the library and the API.
    browser
        .client
        .goto(&format!("{unlisted}/"))
        .await
        .expect("open the app");
    browser
        .wait_text("#status", PATIENCE, |text| text.starts_with("refused"))
        .await;
    assert_ne!(browser.text("#live").await.as_deref(), Some("open"));
    browser.close().await;
    server.stop().await;
}
