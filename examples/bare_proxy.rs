//! The floor under the /v1 proxy's cost, for `bench/proxy.sh`: a reverse
//! proxy built from the same HTTP stack as quotawatch (axum's server over
//! hyper, hyper-util's pooled HTTP/1 client, tokio with one worker per
//! core, mimalloc, TCP_NODELAY on both sides), doing nothing else. Like
//! quotawatch, it reads the whole request body before forwarding it and
//! passes the answer on as it comes. No key, no limits, no tokens, no
//! settlement, no metrics, no logs.
//!
//! What quotawatch costs above this, in the same run, is its own work per
//! call; what this costs above the upstream served directly is the price of
//! the stack as configured here, which that work does not include.
//!
//! `cargo run --release --example bare_proxy -- UPSTREAM_BASE_URL`
//! (e.g. `http://127.0.0.1:8080`); prints `bare proxy listening on
//! http://ADDR` and serves until killed.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Upstream = Client<HttpConnector, Full<bytes::Bytes>>;

#[derive(Clone)]
struct Proxy {
    client: Upstream,
    /// The upstream's scheme and authority, e.g. `http://127.0.0.1:8080`.
    base: String,
    authority: HeaderValue,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::args()
        .nth(1)
        .ok_or("usage: bare_proxy UPSTREAM_BASE_URL")?;
    let base = base.trim_end_matches('/').to_owned();
    let authority = HeaderValue::from_str(
        base.parse::<Uri>()?
            .authority()
            .ok_or("the upstream URL has no host")?
            .as_str(),
    )?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    let proxy = Proxy {
        client,
        base,
        authority,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("bare proxy listening on http://{}", listener.local_addr()?);
    let listener = axum::serve::ListenerExt::tap_io(listener, |connection| {
        let _ = connection.set_nodelay(true);
    });
    let router = axum::Router::new().fallback(forward).with_state(proxy);
    axum::serve(listener, router).await?;
    Ok(())
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    match forward_to_upstream(&proxy, request).await {
        Ok(response) => response,
        Err(error) => (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}

async fn forward_to_upstream(
    proxy: &Proxy,
    request: Request,
) -> Result<Response, Box<dyn std::error::Error + Send + Sync>> {
    let (mut parts, body) = request.into_parts();
    let body = to_bytes(body, usize::MAX).await?;
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    parts.uri = format!("{}{path}", proxy.base).parse()?;
    parts.headers.insert(header::HOST, proxy.authority.clone());
    let answer = proxy
        .client
        .request(hyper::Request::from_parts(parts, Full::new(body)))
        .await?;
    Ok(answer.map(Body::new))
}
