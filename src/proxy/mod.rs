//! The OpenAI-compatible reverse proxy at `/v1/*`.
//!
//! Request path:
//! 1. authenticate the workspace key and find the upstream key to use;
//! 2. read the body (bounded) and estimate its token charge;
//! 3. admit through the engine, or answer the 429 of `api::refusal`;
//! 4. forward with the upstream key (asking chat streams for usage when the
//!    client did not), timing out on connect and on response headers;
//! 5. pass the answer back as it arrives, with the workspace's own
//!    `x-ratelimit-*` headers; the body is scanned on the way for usage;
//! 6. settle when the body ends, breaks, stalls or the client leaves (see
//!    `body`), which also feeds the upstream's answer to the status machine.
//!
//! Architecture invariant: nothing here decides about quotas; the engine
//! does. The proxy only translates between HTTP and the engine's types.

mod body;
pub mod estimate;
pub mod scan;
pub mod vocabulary;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;

use crate::api::AppState;
use crate::api::auth::{authenticate, bearer};
use crate::api::error::ApiError;
use crate::api::refusal::{ratelimit_headers, refusal_error};
use crate::config::UpstreamConfig;
use crate::domain::upstream::{RateLimitHeaders, UpstreamClass};
use crate::domain::workspace::{Model, Request as Admission};
use crate::engine::{Principal, TokenUsage, UpstreamAnswer};
use crate::metrics::{Phase, RequestOutcome};
use crate::openai::ErrorEnvelope;
use body::{MeteredBody, SettleGuard, Settlement};
use estimate::{Endpoint, Estimate, Estimator};

/// Largest error body read from the upstream; error bodies are small.
const MAX_ERROR_BODY: usize = 1 << 20;

/// Headers that describe one connection, not the message, and so are never
/// forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where environment variables named by workspaces are looked up.
pub type EnvLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

pub struct Proxy {
    client: reqwest::Client,
    base: String,
    default_key: Option<String>,
    env: EnvLookup,
    headers_timeout: Duration,
    idle_timeout: Duration,
    max_body_bytes: usize,
    pub estimator: Estimator,
}

impl Proxy {
    pub fn new(config: &UpstreamConfig, env: EnvLookup) -> Result<Self, reqwest::Error> {
        crate::telemetry::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            // Redirects would leak the upstream key to wherever they point.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            base: config.url.clone(),
            default_key: config.api_key.as_ref().map(|key| key.expose().to_owned()),
            env,
            headers_timeout: config.headers_timeout,
            idle_timeout: config.idle_timeout,
            max_body_bytes: config.max_body_bytes,
            estimator: Estimator::new(config.default_max_tokens, config.tokenizer),
        })
    }

    /// The key sent upstream for a workspace: its own variable's value, or
    /// the server's `OPENAI_API_KEY`.
    fn upstream_key(&self, variable: Option<&str>) -> Result<String, ApiError> {
        let missing = |what: String| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "upstream_key_missing",
                format!("quotawatch has no upstream key for this workspace: {what}"),
            )
        };
        match variable {
            Some(name) => (self.env)(name)
                .filter(|key| !key.is_empty())
                .ok_or_else(|| {
                    missing(format!(
                        "the environment variable {name} named by the workspace is not set"
                    ))
                }),
            None => self
                .default_key
                .clone()
                .ok_or_else(|| missing("set OPENAI_API_KEY".to_owned())),
        }
    }
}

fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .collect()
}

/// The headers that describe the message, without those of one connection.
fn end_to_end(headers: &HeaderMap, also_drop: &[HeaderName]) -> HeaderMap {
    let named = connection_tokens(headers);
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let drop = HOP_BY_HOP.contains(&name.as_str())
            || named.iter().any(|token| token == name.as_str())
            || also_drop.contains(name);
        if !drop {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// Puts the workspace's own `x-ratelimit-*` values on a response; where the
/// upstream's differ, the upstream's stay available as `x-upstream-ratelimit-*`.
fn apply_headroom(headers: &mut HeaderMap, ours: HeaderMap) {
    for (name, value) in ours {
        let Some(name) = name else { continue };
        let renamed = name
            .as_str()
            .replacen("x-ratelimit-", "x-upstream-ratelimit-", 1);
        if let Some(upstream) = headers.get(&name)
            && *upstream != value
            && let Ok(renamed) = HeaderName::try_from(renamed)
        {
            let upstream = upstream.clone();
            headers.insert(renamed, upstream);
        }
        headers.insert(name, value);
    }
}

fn overhead_header(response: &mut Response, overhead: Duration) {
    let millis = format!("{:.3}", overhead.as_secs_f64() * 1000.0);
    if let Ok(value) = HeaderValue::from_str(&millis) {
        response
            .headers_mut()
            .insert("x-quotawatch-overhead-ms", value);
    }
}

fn should_not_retry(response: &mut Response) {
    response
        .headers_mut()
        .insert("x-should-retry", HeaderValue::from_static("false"));
}

/// Adds `"stream_options":{"include_usage":true}` to a chat request. The
/// common case (no `stream_options` at all) is a byte insertion after the
/// opening brace, so the rest of the body goes upstream exactly as sent.
fn with_usage_requested(body: &Bytes, json: &Value) -> Bytes {
    if json.get("stream_options").is_none()
        && let Some(open) = body.iter().position(|b| *b == b'{')
    {
        let mut patched = Vec::with_capacity(body.len() + 40);
        patched.extend_from_slice(&body[..=open]);
        patched.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        let rest = &body[open + 1..];
        // `{}` has nothing after the insertion: drop its trailing comma.
        if rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}') {
            patched.pop();
        }
        patched.extend_from_slice(rest);
        return Bytes::from(patched);
    }
    // `stream_options` is there but lacks `include_usage` (the caller checked
    // it is an object): set it, re-serialising in the same key order.
    let mut json = json.clone();
    if let Some(options) = json
        .get_mut("stream_options")
        .and_then(Value::as_object_mut)
    {
        options.insert("include_usage".to_owned(), Value::Bool(true));
    }
    Bytes::from(json.to_string())
}

/// Model names as clients send them become history rows and metrics
/// labels; longer ones are cut, so a client cannot grow either at will.
const MAX_MODEL_NAME: usize = 100;

fn model_of(json: &Value) -> Option<Model> {
    let model = json.get("model")?.as_str()?;
    let end = model
        .char_indices()
        .nth(MAX_MODEL_NAME)
        .map_or(model.len(), |(at, _)| at);
    Some(Model::from(&model[..end]))
}

/// What the proxy learned from the request before forwarding it.
struct Call {
    endpoint: Endpoint,
    model: Option<Model>,
    estimate: Estimate,
    /// A chat stream that did not ask for usage: quotawatch asks instead and
    /// hides the answer.
    inject_usage: bool,
}

fn understand(
    proxy: &Proxy,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> (Call, Option<Value>) {
    let endpoint = Endpoint::of_path(path);
    // The body is read as JSON whatever its declared type says, so that a
    // missing or odd Content-Type cannot dodge the token charge; multipart
    // uploads (files, audio) are the bodies that are not JSON objects.
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("multipart/"));
    let json = (!is_multipart)
        .then(|| serde_json::from_slice::<Value>(body).ok())
        .flatten()
        .filter(Value::is_object);
    let call = match &json {
        Some(json) => Call {
            endpoint,
            model: model_of(json),
            estimate: proxy.estimator.estimate(endpoint, json),
            inject_usage: endpoint == Endpoint::ChatCompletions
                && json.get("stream") == Some(&Value::Bool(true))
                && json.pointer("/stream_options/include_usage") != Some(&Value::Bool(true))
                // Options that are not an object are the upstream's to refuse.
                && json.get("stream_options").is_none_or(Value::is_object),
        },
        None => Call {
            endpoint,
            model: None,
            estimate: Estimate::default(),
            inject_usage: false,
        },
    };
    (call, json)
}

fn body_too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "request_too_large",
        format!(
            "the request body is larger than quotawatch accepts ({limit} bytes; see QUOTAWATCH_PROXY_MAX_BODY_BYTES)"
        ),
    )
}

/// Time quotawatch itself spends on a request: the wall time since arrival
/// without the waits on others (the client's upload, the upstream's answer),
/// which a proxy cannot make shorter and which would hide its own cost.
struct OwnTime {
    arrived: Instant,
    waited: Duration,
}

impl OwnTime {
    fn start() -> Self {
        Self {
            arrived: Instant::now(),
            waited: Duration::ZERO,
        }
    }

    /// Awaits `wait`, leaving its time out of the count.
    async fn excluding<F: Future>(&mut self, wait: F) -> F::Output {
        let started = Instant::now();
        let output = wait.await;
        self.waited += started.elapsed();
        output
    }

    fn so_far(&self) -> Duration {
        self.arrived.elapsed().saturating_sub(self.waited)
    }
}

/// `ANY /v1/*`: forwards to the upstream, enforcing and accounting.
pub async fn forward(State(state): State<AppState>, request: Request) -> Response {
    let mut own_time = OwnTime::start();
    let mut response = forward_admitted(&state, request, &mut own_time)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    overhead_header(&mut response, own_time.so_far());
    response
}

async fn forward_admitted(
    state: &AppState,
    request: Request,
    own_time: &mut OwnTime,
) -> Result<Response, ApiError> {
    let proxy = &state.proxy;
    let (parts, body) = request.into_parts();
    let workspace = match authenticate(&state.engine, bearer(&parts.headers)).await? {
        Principal::Workspace(workspace) => workspace,
        Principal::Admin => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "workspace_key_required",
                "OpenAI calls through quotawatch are made with a workspace key, which decides whose limits apply; the admin key has none",
            ));
        }
    };
    let key = proxy.upstream_key(state.engine.upstream_key_env(&workspace)?.as_deref())?;

    let declared_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > proxy.max_body_bytes) {
        return Err(body_too_large(proxy.max_body_bytes));
    }
    let body = own_time
        .excluding(axum::body::to_bytes(body, proxy.max_body_bytes))
        .await
        .map_err(|error| {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            if too_large {
                body_too_large(proxy.max_body_bytes)
            } else {
                ApiError::bad_request(
                    "unreadable_body",
                    format!("the request body could not be read: {error}"),
                )
            }
        })?;

    let path = parts.uri.path().strip_prefix("/v1").unwrap_or("");
    let (call, json) = understand(proxy, path, &parts.headers, &body);
    let decision = state
        .engine
        .admit(
            &workspace,
            Admission {
                estimated_tokens: call.estimate.total(),
                model: call.model.clone(),
                // The guard below settles the call here, however it ends.
                settled_anywhere: false,
            },
        )
        .await?;
    let admitted = match decision.result {
        Ok(admitted) => admitted,
        Err(refusal) => {
            state.metrics.refusal(&workspace, refusal.cause);
            state
                .metrics
                .request(&workspace, call.endpoint.label(), RequestOutcome::Refused);
            return Err(refusal_error(
                &workspace,
                &refusal,
                &decision.headroom,
                state.engine.now(),
                state.engine.settings().probe_interval,
            ));
        }
    };
    let headroom = ratelimit_headers(&decision.headroom, state.engine.now());
    let mut guard = SettleGuard::new(Settlement {
        state: state.clone(),
        workspace: workspace.clone(),
        reservation: admitted.id,
        model: call.model.clone(),
        endpoint: call.endpoint,
        estimate: call.estimate,
        arrived: own_time.arrived,
    });

    let body = match (&json, call.inject_usage) {
        (Some(json), true) => with_usage_requested(&body, json),
        _ => body,
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let url = format!("{}{path}{query}", proxy.base);
    let mut headers = end_to_end(
        &parts.headers,
        &[
            header::HOST,
            header::AUTHORIZATION,
            header::CONTENT_LENGTH,
            header::ACCEPT_ENCODING,
        ],
    );
    // Bodies are read for usage on the way back, so they must come plain.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let mut authorization = HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
        ApiError::internal("the upstream key contains characters not allowed in a header")
    })?;
    authorization.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, authorization);
    let upstream_request = proxy
        .client
        .request(parts.method, url)
        .headers(headers)
        .body(body);

    let request_phase = own_time.so_far();
    state.metrics.overhead(Phase::Request, request_phase);
    let sent = Instant::now();
    let answer = own_time
        .excluding(tokio::time::timeout(
            proxy.headers_timeout,
            upstream_request.send(),
        ))
        .await;
    state.metrics.upstream_latency(sent.elapsed());
    let response = match answer {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            let timed_out = error.is_timeout();
            let reason = error.without_url().to_string();
            return Ok(upstream_failed(&mut guard, &reason, timed_out, headroom).await);
        }
        Err(_) => {
            let reason = "no response headers in time";
            return Ok(upstream_failed(&mut guard, reason, true, headroom).await);
        }
    };

    let status = response.status();
    let upstream_headers = response.headers().clone();
    let rate = RateLimitHeaders::parse(
        upstream_headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
    );
    let mut client_headers = end_to_end(&upstream_headers, &[]);
    apply_headroom(&mut client_headers, headroom);

    let reply = if status.is_success() {
        let content_type = upstream_headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("");
        let scanner = scan::Scanner::new(call.endpoint, content_type, call.inject_usage);
        if call.inject_usage {
            // The body changes length when the added usage is removed.
            client_headers.remove(header::CONTENT_LENGTH);
        }
        let body = MeteredBody::new(
            Box::pin(response.bytes_stream()),
            scanner,
            guard.into_settlement(),
            UpstreamAnswer {
                status: status.as_u16(),
                headers: rate,
                ..UpstreamAnswer::default()
            },
            proxy.idle_timeout,
        );
        let mut reply = Response::new(Body::from_stream(body));
        *reply.status_mut() = status;
        *reply.headers_mut() = client_headers;
        reply
    } else {
        let error_body = own_time
            .excluding(read_error_body(response, proxy.idle_timeout))
            .await;
        let error = ErrorEnvelope::parse(&error_body).unwrap_or_default();
        let class = guard
            .settle(
                Some(TokenUsage::default()),
                Some(UpstreamAnswer {
                    status: status.as_u16(),
                    error_type: error.error_type,
                    error_code: error.code,
                    error_message: error.message,
                    headers: rate,
                }),
            )
            .await;
        client_headers.remove(header::CONTENT_LENGTH);
        let mut reply = Response::new(Body::from(error_body));
        *reply.status_mut() = status;
        *reply.headers_mut() = client_headers;
        if matches!(
            class,
            Some(UpstreamClass::QuotaExhausted(_) | UpstreamClass::RequestTooLarge)
        ) {
            should_not_retry(&mut reply);
        }
        reply
    };
    state
        .metrics
        .overhead(Phase::Response, own_time.so_far() - request_phase);
    Ok(reply)
}

/// Reads an upstream error body, which is small; a body that does not come
/// in time counts as empty.
async fn read_error_body(response: reqwest::Response, within: Duration) -> Bytes {
    use futures_util::StreamExt;
    let collect = async {
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(Ok(chunk)) = stream.next().await {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_ERROR_BODY {
                break;
            }
        }
        Bytes::from(body)
    };
    tokio::time::timeout(within, collect)
        .await
        .unwrap_or_default()
}

/// The upstream could not be reached or did not answer in time: counted as a
/// server error, answered 502 or 504 so that clients retry with back-off,
/// with the workspace's own `x-ratelimit-*` headers like any other answer.
async fn upstream_failed(
    guard: &mut SettleGuard,
    reason: &str,
    timed_out: bool,
    headroom: HeaderMap,
) -> Response {
    let (status, code, what) = if timed_out {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "did not answer in time",
        )
    } else {
        (
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            "could not be reached",
        )
    };
    let answer = UpstreamAnswer::missing(code, reason, RateLimitHeaders::default());
    guard.settle(None, Some(answer)).await;
    tracing::warn!(code, reason, "upstream {what}");
    let mut response = ApiError::new(
        status,
        "server_error",
        code,
        format!("the upstream {what}: {reason}"),
    )
    .with_header("x-should-retry", "true")
    .into_response();
    apply_headroom(response.headers_mut(), headroom);
    response
}
