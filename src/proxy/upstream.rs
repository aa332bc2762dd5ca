//! The client that reaches the upstream: hyper-util's pooled client over
//! hyper-rustls, set up once from the upstream's URL.
//!
//! A general-purpose client would parse every call's URL again, wrap the
//! call in a redirect policy that follows none and wrap the connection in
//! further layers; a proxy of one upstream needs none of that. The upstream's
//! scheme and authority are read once, and each call's URI is them with the
//! call's path and query. TLS is rustls with the process's crypto provider
//! (ring) and the platform's roots, plus those of
//! `QUOTAWATCH_UPSTREAM_CA_FILE`; HTTP/2 where the upstream chooses it in
//! the handshake, HTTP/1.1 otherwise. Redirects are never followed: they
//! would take the upstream key wherever they point, so a 3xx reaches the
//! client as the upstream sent it.
//!
//! The proxy the environment names for the upstream (`HTTPS_PROXY`,
//! `HTTP_PROXY`, `ALL_PROXY`, unless `NO_PROXY` names the upstream's host)
//! is honoured as reqwest honoured it: an `https` upstream is reached
//! through a CONNECT tunnel with TLS to the upstream inside it, and an
//! `http` upstream by sending each call to the proxy in absolute form;
//! an `https://` proxy is spoken to over TLS, with the upstream's roots.
//! The upstream is one URL, so the choice is made once, at start.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::header::PROXY_AUTHORIZATION;
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{HeaderValue, Request, Response, Uri};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Intercept;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use percent_encoding::{AsciiSet, CONTROLS};

use super::{ProxyError, UpstreamConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Characters percent-encoded in a forwarded query: those the WHATWG URL
/// standard encodes in the query of an `http(s)` URL, as the URL library
/// that built upstream URLs before did, so that the upstream receives the
/// same query. A query that arrived holds no others.
const QUERY: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'\'');

/// The upstream and the connections kept to it.
pub struct Upstream {
    route: Route,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without its trailing slash, which every call's
    /// path (under `/v1`) follows: `/v1` for OpenAI.
    base_path: String,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Self, ProxyError> {
        crate::telemetry::install_crypto_provider();
        // The URL library reads the base as any client would (a default
        // port dropped, an IP address and the path normalised); the URI
        // parts are taken from its reading.
        let base = reqwest::Url::parse(&config.url)
            .map_err(|error| ProxyError::UpstreamUrl(error.to_string()))?;
        let scheme = Scheme::try_from(base.scheme())
            .map_err(|error| ProxyError::UpstreamUrl(error.to_string()))?;
        // Host and port, without the user and password a URL may carry:
        // the upstream key is what authenticates.
        let host = base
            .host_str()
            .ok_or_else(|| ProxyError::UpstreamUrl("the URL names no host".to_owned()))?;
        let authority = match base.port() {
            Some(port) => Authority::try_from(format!("{host}:{port}")),
            None => Authority::try_from(host),
        }
        .map_err(|error| ProxyError::UpstreamUrl(error.to_string()))?;
        let base_path = base.path().trim_end_matches('/').to_owned();

        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let extra_roots = match &config.extra_root {
            Some(root) => {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::pem_slice_iter(root.pem())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| ProxyError::ExtraRoot(error.to_string()))?
            }
            None => Vec::new(),
        };
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider.clone())
                .map_err(|error| ProxyError::Client(error.to_string()))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| ProxyError::Client(error.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();

        let proxy = upstream_proxy(config, &scheme, &authority)?;
        // A root no TLS connection would use most often means the URL lost
        // its `s`: said at the start rather than left unused.
        let over_tls = |scheme: Option<&Scheme>| scheme == Some(&Scheme::HTTPS);
        let tls_somewhere = over_tls(Some(&scheme))
            || proxy
                .as_ref()
                .is_some_and(|proxy| over_tls(proxy.uri().scheme()));
        if config.extra_root.is_some() && !tls_somewhere {
            return Err(ProxyError::ExtraRoot(
                "it is set, but no connection would use it: the upstream URL is http:// and is \
                 reached directly or through an http:// proxy"
                    .to_owned(),
            ));
        }

        let mut http = HttpConnector::new();
        // The scheme is the URI's, with TLS added by the layer above.
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        // Keepalive probes find a connection the network dropped while it
        // waited in the pool.
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        let timeout = config.connect_timeout;
        let route = match proxy {
            None => Route::Direct(client(https(tls, http), timeout)),
            Some(proxy) if scheme == Scheme::HTTPS => {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), to_proxy(tls.clone(), http));
                if let Some(authorization) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(authorization.clone());
                }
                Route::Tunnel(client(https(tls, tunnel), timeout))
            }
            Some(proxy) => Route::Forward {
                client: client(
                    Forward {
                        connector: to_proxy(tls, http),
                        proxy: proxy.uri().clone(),
                    },
                    timeout,
                ),
                authorization: proxy.basic_auth().cloned(),
            },
        };
        Ok(Self {
            route,
            scheme,
            authority,
            base_path,
        })
    }

    /// The URI of a call: the base's path, then the call's path under
    /// `/v1` (normalised, so it holds nothing to encode), then its query.
    pub fn uri(&self, under_v1: &str, query: Option<&str>) -> Result<Uri, axum::http::Error> {
        let mut path_and_query = String::with_capacity(
            self.base_path.len() + under_v1.len() + query.map_or(0, |query| query.len() + 1),
        );
        path_and_query.push_str(&self.base_path);
        path_and_query.push_str(under_v1);
        if let Some(query) = query {
            path_and_query.push('?');
            path_and_query.extend(percent_encoding::utf8_percent_encode(query, QUERY));
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(path_and_query)?)
            .build()
    }

    /// Sends `request` and answers the response once its headers came. A
    /// call an HTTP/2 upstream refused before processing it is sent again,
    /// at most [`RETRIES`] times.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, Failure> {
        let mut retries = 0;
        loop {
            // The request itself goes to the connection: a retry needs a
            // copy made before. Only TLS connections negotiate HTTP/2, so
            // only calls over TLS can be refused that way and need one.
            let copy =
                (self.scheme == Scheme::HTTPS && retries < RETRIES).then(|| copy_of(&request));
            let sending = match &self.route {
                Route::Direct(client) => client.request(request),
                Route::Tunnel(client) => client.request(request),
                Route::Forward {
                    client,
                    authorization,
                } => {
                    if let Some(authorization) = authorization {
                        request
                            .headers_mut()
                            .insert(PROXY_AUTHORIZATION, authorization.clone());
                    }
                    client.request(request)
                }
            };
            let error = match sending.await {
                Ok(response) => return Ok(response),
                Err(error) => error,
            };
            match copy {
                Some(copy) if refused_unprocessed(&error) => {
                    request = copy;
                    retries += 1;
                }
                _ => {
                    return Err(Failure {
                        timed_out: timed_out(&error),
                        reason: public_reason(&error),
                        detail: format!("error sending request: {}", with_causes(&error)),
                    });
                }
            }
        }
    }
}

/// How calls reach the upstream. Each way is a client of its own type, so
/// that without a proxy a call goes through the same client as it did
/// before proxies were honoured, with nothing added to it.
enum Route {
    Direct(Client<Timed<HttpsConnector<HttpConnector>>, RequestBody>),
    /// An `https` upstream behind a proxy: each connection is a CONNECT
    /// tunnel through the proxy, with TLS to the upstream inside it, so that
    /// the proxy sees neither the calls nor the upstream key.
    Tunnel(Client<Timed<HttpsConnector<Tunnel<ToProxyConnector>>>, RequestBody>),
    /// An `http` upstream behind a proxy: each call goes to the proxy in
    /// absolute form, as reqwest sent it, since proxies commonly allow
    /// CONNECT only to port 443.
    Forward {
        client: Client<Timed<Forward>, RequestBody>,
        /// The proxy's credentials, which every call carries.
        authorization: Option<HeaderValue>,
    },
}

/// TLS over the connections of `inner` where the scheme is `https`.
fn https<C>(tls: rustls::ClientConfig, inner: C) -> HttpsConnector<C> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(inner)
}

/// The connector to a proxy: TLS where the proxy is `https://`, and
/// HTTP/1.1 only, which CONNECT and calls in absolute form are written in.
type ToProxyConnector = HttpsConnector<HttpConnector>;

fn to_proxy(tls: rustls::ClientConfig, http: HttpConnector) -> ToProxyConnector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

fn client<C>(connector: C, timeout: Duration) -> Client<Timed<C>, RequestBody>
where
    Timed<C>: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(Timed {
            inner: connector,
            timeout,
        })
}

/// The proxy the environment names for the upstream, if any. Only
/// `http://` and `https://` proxies are supported, as by reqwest built
/// without SOCKS: a SOCKS proxy stops the start with a message saying so,
/// rather than every call failing later.
fn upstream_proxy(
    config: &UpstreamConfig,
    scheme: &Scheme,
    authority: &Authority,
) -> Result<Option<Intercept>, ProxyError> {
    let upstream = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|error| ProxyError::UpstreamUrl(error.to_string()))?;
    let Some(proxy) = config.proxies.intercept(&upstream) else {
        return Ok(None);
    };
    // The proxy's URI holds no credentials: the matcher keeps them apart.
    if !matches!(proxy.uri().scheme_str(), Some("http" | "https")) {
        return Err(ProxyError::Proxy(format!(
            "{} is neither an http:// nor an https:// proxy, the only kinds supported",
            proxy.uri()
        )));
    }
    tracing::info!(proxy = %proxy.uri(), "the upstream is reached through a proxy");
    Ok(Some(proxy))
}

/// A connector to the proxy for calls in absolute form: whatever the
/// destination, it connects to the proxy, and says so to the client,
/// which then writes each call's whole URI.
#[derive(Clone)]
struct Forward {
    connector: ToProxyConnector,
    proxy: Uri,
}

impl tower::Service<Uri> for Forward {
    type Response = ToProxy;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ToProxy, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.connector.poll_ready(cx)
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let connecting = self.connector.call(self.proxy.clone());
        Box::pin(async move { Ok(ToProxy(connecting.await?)) })
    }
}

/// A connection to a proxy that forwards calls in absolute form.
struct ToProxy(MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>);

impl Connection for ToProxy {
    fn connected(&self) -> Connected {
        self.0.connected().proxy(true)
    }
}

impl hyper::rt::Read for ToProxy {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ToProxy {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

/// How many times a call is sent again after the first, when the upstream
/// refused it unprocessed.
const RETRIES: u32 = 2;

fn copy_of(request: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Whether HTTP/2 says the upstream did not process the call, so that it
/// is safe to send again (RFC 9113 section 8.7): the server refused its
/// stream, or closed the connection gracefully before taking it.
fn refused_unprocessed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(error) = error.downcast_ref::<h2::Error>() {
            let refused = error.is_reset() && error.reason() == Some(h2::Reason::REFUSED_STREAM);
            let gone = error.is_go_away() && error.reason() == Some(h2::Reason::NO_ERROR);
            return error.is_remote() && (refused || gone);
        }
        cause = error.source();
    }
    false
}

/// Why a call got no answer.
pub struct Failure {
    /// The connection, or the TLS handshake on it, took too long.
    pub timed_out: bool,
    /// What the tenant is told: the kind of failure, never an address.
    pub reason: String,
    /// Every cause, for the operator's log: a TLS error names the hosts a
    /// certificate is valid for and a connection error the address tried,
    /// which are the operator's network, not the tenant's business.
    pub detail: String,
}

/// The error inside any I/O errors wrapping `error`: a TLS error comes
/// wrapped in two, and an I/O error's `source` skips the error it wraps.
fn unwrapped<'a>(
    mut error: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    while let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
    {
        error = inner;
    }
    error
}

/// What a tenant is told of a failed call: reqwest's "error sending
/// request", with the kind of failure where it is a TLS handshake or a
/// proxy's tunnel, whose own messages are fixed texts.
fn public_reason(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = Some(error);
    while let Some(inner) = cause {
        if unwrapped(inner).is::<rustls::Error>() {
            return "error sending request: the TLS handshake failed".to_owned();
        }
        // hyper-util does not export its tunnel's error type; its messages
        // are the fixed texts after this prefix.
        let text = inner.to_string();
        if let Some(tunnel) = text.strip_prefix("tunnel error: ") {
            return format!("error sending request: the proxy's tunnel failed: {tunnel}");
        }
        cause = inner.source();
    }
    "error sending request".to_owned()
}

/// Whether anything under `error` is a timeout.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        let io_timeout = error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|error| error.kind() == std::io::ErrorKind::TimedOut);
        let hyper_timeout = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if io_timeout || hyper_timeout {
            return true;
        }
        cause = error.source();
    }
    false
}

/// An error with the causes under it: the client's own message says only
/// that the request failed, and an operator needs the cause (a refused
/// connection, a certificate not trusted) to mend it.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// A connector whose whole connection, TLS handshake included, must be
/// made within `timeout`: the TCP connector's own timeout covers only the
/// TCP part, and an upstream that accepts and then says nothing must not
/// hold a call until the headers timeout.
#[derive(Clone)]
struct Timed<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower::Service<Uri> for Timed<C>
where
    C: tower::Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let connecting = self.inner.call(destination);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "operation timed out",
                )
                .into()),
            }
        })
    }
}

/// A request body: pieces of the one buffer received, sent as they are
/// with their total length declared, rather than copied into one.
#[derive(Clone)]
pub struct RequestBody {
    pieces: std::vec::IntoIter<Bytes>,
    remaining: u64,
}

impl RequestBody {
    pub fn new(pieces: Vec<Bytes>) -> Self {
        let remaining = pieces.iter().map(|piece| piece.len() as u64).sum();
        Self {
            pieces: pieces.into_iter(),
            remaining,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        // An empty piece would be an empty frame, which says nothing.
        let piece = self.pieces.find(|piece| !piece.is_empty());
        if let Some(piece) = &piece {
            self.remaining -= piece.len() as u64;
        }
        Poll::Ready(piece.map(|piece| Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use hyper_util::client::proxy::matcher::Matcher;

    use super::*;

    fn upstream(url: &str) -> Upstream {
        through(url, Matcher::builder().build()).unwrap_or_else(|_| panic!("an upstream"))
    }

    fn through(url: &str, proxies: Matcher) -> Result<Upstream, ProxyError> {
        trusting(url, proxies, None)
    }

    fn trusting(
        url: &str,
        proxies: Matcher,
        extra_root: Option<crate::mail::ExtraRoot>,
    ) -> Result<Upstream, ProxyError> {
        Upstream::new(&UpstreamConfig {
            url: url.to_owned(),
            api_key: None,
            connect_timeout: Duration::from_secs(1),
            extra_root,
            headers_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_body_bytes: 1024,
            default_max_tokens: 16,
            tokenizer: super::super::estimate::Tokenizer::Bytes,
            proxies: Arc::new(proxies),
        })
    }

    #[tokio::test]
    async fn a_socks_proxy_stops_the_start_naming_it_without_its_credentials() {
        for proxy in [
            "socks5://user:secret@gateway:1080",
            "socks5h://user:secret@gateway:1080",
        ] {
            let Err(error) = through(
                "https://api.openai.com/v1",
                Matcher::builder().all(proxy).build(),
            ) else {
                panic!("{proxy} was accepted");
            };
            let message = error.to_string();
            assert!(
                message.contains("gateway") && !message.contains("secret"),
                "{message}"
            );
        }
        // A proxy NO_PROXY sets aside is not used, whatever it is.
        through(
            "https://api.openai.com/v1",
            Matcher::builder()
                .all("socks5://gateway:1080")
                .no("api.openai.com")
                .build(),
        )
        .unwrap_or_else(|_| panic!("an upstream"));
    }

    #[tokio::test]
    async fn a_root_no_tls_connection_would_use_stops_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root.pem");
        let certified = rcgen::generate_simple_self_signed(vec!["upstream.internal".to_owned()])
            .expect("a certificate");
        std::fs::write(&path, certified.cert.pem()).expect("write the root");
        let root =
            || Some(crate::mail::read_extra_root(path.to_str().expect("utf-8")).expect("a root"));
        let plain = "http://upstream.internal/v1";
        for proxies in [
            Matcher::builder().build(),
            Matcher::builder()
                .http("http://proxy.internal:3128")
                .build(),
            // A proxy the upstream's host is set aside from is not used.
            Matcher::builder()
                .http("https://proxy.internal:3128")
                .no("upstream.internal")
                .build(),
        ] {
            let Err(error) = trusting(plain, proxies, root()) else {
                panic!("a root no connection uses was accepted");
            };
            let message = error.to_string();
            assert!(
                message.starts_with("QUOTAWATCH_UPSTREAM_CA_FILE cannot be used")
                    && message.contains("no connection would use it"),
                "{message}"
            );
        }
        // Over TLS to the upstream, or to the proxy, the root is used.
        trusting(
            "https://upstream.internal/v1",
            Matcher::builder().build(),
            root(),
        )
        .unwrap_or_else(|_| panic!("an https upstream"));
        let behind_https = Matcher::builder()
            .http("https://proxy.internal:3128")
            .build();
        trusting(plain, behind_https, root()).unwrap_or_else(|_| panic!("an https proxy"));
    }

    #[tokio::test]
    async fn a_call_goes_to_the_base_path_with_its_own_path_and_query() {
        let openai = upstream("https://api.openai.com/v1");
        assert_eq!(
            openai
                .uri("/chat/completions", Some("api-version=2024-10-21"))
                .expect("a URI")
                .to_string(),
            "https://api.openai.com/v1/chat/completions?api-version=2024-10-21"
        );
        // A base without a path, a default port, a user: none of them appear.
        let bare = upstream("http://user:secret@gateway.internal:80");
        assert_eq!(
            bare.uri("/models", None).expect("a URI").to_string(),
            "http://gateway.internal/models"
        );
        let ported = upstream("http://[::1]:8080/openai/v1");
        assert_eq!(
            ported.uri("/models", Some("")).expect("a URI").to_string(),
            "http://[::1]:8080/openai/v1/models?"
        );
    }

    #[tokio::test]
    async fn a_query_is_encoded_as_the_url_standard_encodes_it() {
        let openai = upstream("https://api.openai.com/v1");
        let query = "a='b'&c=%22d%22&e={f}|g";
        let ours = openai.uri("/files", Some(query)).expect("a URI");
        let mut theirs = reqwest::Url::parse("https://api.openai.com/v1/files").expect("a URL");
        theirs.set_query(Some(query));
        assert_eq!(ours.to_string(), theirs.as_str());
    }

    #[test]
    fn a_body_in_pieces_declares_its_whole_length_and_ends_after_the_last() {
        let body = RequestBody::new(vec![
            Bytes::from_static(b"{\"a\":"),
            Bytes::new(),
            Bytes::from_static(b"1}"),
        ]);
        assert_eq!(body.size_hint().exact(), Some(7));
        assert!(!body.is_end_stream());
        let mut body = std::pin::pin!(body);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut sent = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = body.as_mut().poll_frame(&mut cx) {
            sent.extend_from_slice(&frame.into_data().expect("data"));
        }
        assert_eq!(sent, b"{\"a\":1}");
        assert!(body.is_end_stream());
        assert!(RequestBody::new(vec![Bytes::new()]).is_end_stream());
    }
}
