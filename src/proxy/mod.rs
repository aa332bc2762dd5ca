//! The OpenAI-compatible reverse proxy at `/v1/*`.
//!
//! Request path:
//! 1. authenticate the workspace key, normalise the path once (`path`),
//!    refuse a workspace that cannot be admitted whatever the request costs,
//!    and find the upstream account to use;
//! 2. read the body (bounded) and, for a priced endpoint, read it as one
//!    JSON object and estimate its token charge (`request`, `estimate`);
//! 3. admit through the engine, or answer the 429 of `edge::refusal`;
//! 4. forward the normalised path with the listed headers (`headers`) and
//!    the upstream key (asking chat streams for usage when the client did
//!    not), timing out on connect and on response headers;
//! 5. pass the answer back as it arrives, with the workspace's own
//!    `x-ratelimit-*` headers; the body is scanned on the way for usage;
//! 6. settle when the body ends, breaks, stalls or the client leaves (see
//!    `body`), which also feeds the upstream's answer to the status machine.
//!
//! Architecture invariant: nothing here decides about quotas; the engine
//! does. The proxy only translates between HTTP and the engine's types.

mod body;
pub mod estimate;
mod headers;
pub mod path;
mod pretokenizer;
pub mod request;
pub mod scan;
mod upstream;
pub mod vocabulary;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::domain::credential::CredentialId;
use crate::domain::model::parse_model;
use crate::domain::price::{Tier, TokenCounts};
use crate::domain::scope::PerScope;
use crate::domain::upstream::{RateLimitHeaders, UpstreamClass};
use crate::domain::workspace::{BillingScope, Model, Request as Admission};
use crate::edge::auth::Auth;
use crate::edge::error::ApiError;
use crate::edge::refusal::{RateLimitValues, refusal_error};
use crate::engine::{
    CredentialCall, CredentialResolver, Engine, Principal, TokenUsage, UpstreamAccount,
    UpstreamAnswer,
};
use crate::keys::Scope;
use crate::metrics::{Metrics, Phase, RequestOutcome};
use crate::openai::ErrorEnvelope;
use body::{MeteredBody, SettleGuard, Settlement};
use estimate::{Endpoint, Estimate, Estimator};

/// Largest error body read from the upstream; error bodies are small.
const MAX_ERROR_BODY: usize = 1 << 20;

/// How `/v1/*` reaches the upstream.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The base URL, without a trailing slash (e.g. `https://api.openai.com/v1`).
    pub url: String,
    pub api_key: Option<crate::keys::Secret>,
    pub connect_timeout: Duration,
    /// Roots to trust beside the platform's, for a private upstream.
    pub extra_root: Option<crate::mail::ExtraRoot>,
    pub headers_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_body_bytes: usize,
    pub default_max_tokens: u64,
    pub tokenizer: estimate::Tokenizer,
    /// The proxies the environment names (`HTTPS_PROXY` and the others),
    /// read with the rest of the configuration so that a test can give its
    /// own without changing its process's environment.
    pub proxies: Arc<hyper_util::client::proxy::matcher::Matcher>,
}

pub struct Proxy {
    upstream: upstream::Upstream,
    keys: Arc<UpstreamKeys>,
    headers_timeout: Duration,
    idle_timeout: Duration,
    max_body_bytes: usize,
    pub estimator: Estimator,
}

impl Proxy {
    pub fn new(config: &UpstreamConfig, env: crate::keys::EnvLookup) -> Result<Self, ProxyError> {
        Ok(Self {
            upstream: upstream::Upstream::new(config)?,
            keys: Arc::new(UpstreamKeys::new(
                config.api_key.as_ref().map(|key| key.expose().to_owned()),
                env,
            )),
            headers_timeout: config.headers_timeout,
            idle_timeout: config.idle_timeout,
            max_body_bytes: config.max_body_bytes,
            estimator: Estimator::new(config.default_max_tokens, config.tokenizer),
        })
    }

    /// How a workspace's calls go upstream: with its own variable's key, or
    /// the server's `OPENAI_API_KEY`, as its credential.
    fn sent_as(&self, account: &UpstreamAccount) -> Result<Arc<SentAs>, ApiError> {
        self.keys.sent_as(account).map_err(|what| {
            // The operator's configuration is at fault, which no retry mends.
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "upstream_key_missing",
                format!("quotawatch has no upstream key for this workspace: {what}"),
            )
            .with_header("x-should-retry", "false")
        })
    }

    /// How the engine names the credential of an upstream account: by the
    /// key this proxy sends for it, with its organization and project.
    pub fn credentials(&self) -> CredentialResolver {
        let keys = Arc::clone(&self.keys);
        Box::new(move |account: &UpstreamAccount| {
            Some(keys.sent_as(account).ok()?.credential.clone())
        })
    }
}

/// Why the proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the upstream URL cannot be used: {0}")]
    UpstreamUrl(String),
    #[error("QUOTAWATCH_UPSTREAM_CA_FILE cannot be used: {0}")]
    ExtraRoot(String),
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
    #[error("the proxy the environment names for the upstream cannot be used: {0}")]
    Proxy(String),
}

/// Where the upstream keys are: the server's own, and the environment that
/// holds the workspaces' own; with what each upstream account was found to
/// be.
struct UpstreamKeys {
    default_key: Option<String>,
    env: crate::keys::EnvLookup,
    /// Each account as it is sent, worked out on its first call: its
    /// credential's fingerprint (a SHA-256) and its headers cost more than
    /// the rest of what the proxy does with a small call. The environment
    /// does not change while the server runs, so neither do these.
    sent: RwLock<hashbrown::HashMap<AccountNames, Arc<SentAs>, rustc_hash::FxBuildHasher>>,
}

/// The most accounts [`UpstreamKeys`] remembers. Each account is named by a
/// workspace, so this is far more than most installations have; one with
/// more in use still works: the map is emptied when full, and the accounts
/// in use are worked out again, one call each.
const ACCOUNTS_REMEMBERED: usize = 16_384;

/// An upstream account as a workspace names it, the key of
/// [`UpstreamKeys::sent`].
#[derive(Hash, PartialEq, Eq)]
struct AccountNames {
    key_env: Option<String>,
    organization: Option<String>,
    project: Option<String>,
}

/// [`AccountNames`] borrowed from an account, to look it up without a copy;
/// it hashes as the owned names do, field by field.
#[derive(Hash)]
struct AccountNamesRef<'a> {
    key_env: Option<&'a str>,
    organization: Option<&'a str>,
    project: Option<&'a str>,
}

impl<'a> AccountNamesRef<'a> {
    fn of(account: &'a UpstreamAccount) -> Self {
        Self {
            key_env: account.key_env.as_deref(),
            organization: account.organization.as_deref(),
            project: account.project.as_deref(),
        }
    }

    fn to_owned(&self) -> AccountNames {
        AccountNames {
            key_env: self.key_env.map(str::to_owned),
            organization: self.organization.map(str::to_owned),
            project: self.project.map(str::to_owned),
        }
    }
}

impl hashbrown::Equivalent<AccountNames> for AccountNamesRef<'_> {
    fn equivalent(&self, names: &AccountNames) -> bool {
        self.key_env == names.key_env.as_deref()
            && self.organization == names.organization.as_deref()
            && self.project == names.project.as_deref()
    }
}

/// How an upstream account's calls go upstream.
struct SentAs {
    /// The credential they are billed to.
    credential: CredentialId,
    /// `Bearer` and the key, marked sensitive so that it is never logged.
    authorization: HeaderValue,
    /// The account's own organization and project, never the client's.
    organization: Option<HeaderValue>,
    project: Option<HeaderValue>,
}

impl UpstreamKeys {
    fn new(default_key: Option<String>, env: crate::keys::EnvLookup) -> Self {
        Self {
            default_key,
            env,
            sent: RwLock::default(),
        }
    }

    /// How `account`'s calls go upstream, or what is missing for them to.
    fn sent_as(&self, account: &UpstreamAccount) -> Result<Arc<SentAs>, String> {
        let names = AccountNamesRef::of(account);
        if let Some(sent) = crate::sync::read(&self.sent).get(&names) {
            return Ok(Arc::clone(sent));
        }
        let key = self.key(names.key_env)?;
        let mut authorization = HeaderValue::try_from(format!("Bearer {key}"))
            .map_err(|_| "the key contains characters not allowed in a header".to_owned())?;
        authorization.set_sensitive(true);
        let header = |id: Option<&str>| id.and_then(|id| HeaderValue::from_str(id).ok());
        let sent = Arc::new(SentAs {
            credential: CredentialId::of(&key, names.organization, names.project),
            authorization,
            organization: header(names.organization),
            project: header(names.project),
        });
        let mut remembered = crate::sync::write(&self.sent);
        if remembered.len() >= ACCOUNTS_REMEMBERED {
            remembered.clear();
        }
        remembered.insert(names.to_owned(), Arc::clone(&sent));
        Ok(sent)
    }

    /// The value of `variable` (the server's key for `None`), or what is
    /// missing.
    fn key(&self, variable: Option<&str>) -> Result<String, String> {
        match variable {
            // A name stored before the rule on upstream key variables was
            // made is not looked up either.
            Some(name) if crate::domain::limits::validate_env_name(name).is_err() => Err(format!(
                "the workspace names the variable {name}, which cannot hold an upstream key; name one QUOTAWATCH_UPSTREAM_KEY_<NAME>"
            )),
            Some(name) => (self.env)(name)
                .filter(|key| !key.is_empty())
                .ok_or_else(|| {
                    format!("the environment variable {name} named by the workspace is not set")
                }),
            None => self
                .default_key
                .clone()
                .ok_or_else(|| "set OPENAI_API_KEY".to_owned()),
        }
    }
}

/// Puts the workspace's own `x-ratelimit-*` values on a response; where the
/// upstream's differ, the upstream's stay available as `x-upstream-ratelimit-*`.
fn apply_headroom(headers: &mut HeaderMap, ours: RateLimitValues) {
    for (header, value) in ours.into_headers() {
        match headers.entry(&header.ours) {
            header::Entry::Occupied(mut upstreams) => {
                let differs = *upstreams.get() != value;
                let theirs = upstreams.insert(value);
                if differs {
                    headers.insert(&header.upstreams, theirs);
                }
            }
            header::Entry::Vacant(slot) => {
                slot.insert(value);
            }
        }
    }
}

fn overhead_header(response: &mut Response, overhead: Duration) {
    // Milliseconds with three decimals, written from whole microseconds
    // (rounded): formatting a float cost more than the rest of the header.
    let micros = (overhead.as_nanos() + 500) / 1000;
    let millis = format!("{}.{:03}", micros / 1000, micros % 1000);
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
/// What the proxy needs, cheap to clone: the engine, the metrics and the
/// upstream.
#[derive(Clone)]
pub struct ProxyState(Arc<ProxyParts>);

pub struct ProxyParts {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub proxy: Proxy,
}

impl std::ops::Deref for ProxyState {
    type Target = ProxyParts;
    fn deref(&self) -> &ProxyParts {
        &self.0
    }
}

impl ProxyState {
    pub fn new(parts: ProxyParts) -> Self {
        Self(Arc::new(parts))
    }
}

/// The `/v1` routes with their state; `edge::serve` adds the API's.
pub fn router(state: ProxyState) -> axum::Router {
    axum::Router::new()
        .route("/v1/{*path}", axum::routing::any(forward))
        .with_state(state)
}

pub async fn forward(State(state): State<ProxyState>, request: Request) -> Response {
    let mut own_time = OwnTime::start();
    // A call's state machine is large (the request's parts, the upstream
    // call, the headers on the way): boxed once here, it is a pointer in
    // the futures of the layers around this handler, each of which is
    // boxed and moved in turn, rather than copied into each.
    let mut response = Box::pin(forward_admitted(&state, request, &mut own_time))
        .await
        .unwrap_or_else(IntoResponse::into_response);
    overhead_header(&mut response, own_time.so_far());
    response
}

/// What the proxy learned from a request before forwarding it.
struct Call {
    endpoint: Endpoint,
    model: Option<Model>,
    estimate: Estimate,
    tier: Tier,
    inject_usage: bool,
    /// The body's values for scoped limits (see `request::JsonRequest`).
    named: PerScope<Option<String>>,
    /// The body to forward, in pieces of the one received.
    body: Vec<Bytes>,
}

/// Reads what the request is and what it costs: a priced endpoint's body
/// must be one JSON object (see `request`); others pass as they are, and
/// requests of a method without a body must not have one.
fn understand(
    proxy: &Proxy,
    method: &axum::http::Method,
    endpoint: Endpoint,
    body: Bytes,
) -> Result<Call, ApiError> {
    if !estimate::carries_body(method) && !body.is_empty() {
        return Err(ApiError::bad_request(
            "unexpected_body",
            format!("a {method} request to the OpenAI API carries no body"),
        ));
    }
    if !endpoint.is_priced() {
        return Ok(Call {
            endpoint,
            model: None,
            estimate: Estimate::default(),
            tier: Tier::default(),
            inject_usage: false,
            named: Default::default(),
            body: vec![body],
        });
    }
    let read = request::read(&proxy.estimator, endpoint, &body).map_err(|error| {
        let refused = ApiError::bad_request("invalid_body", error.to_string());
        match error.field() {
            Some(field) => refused.with_param(field),
            None => refused,
        }
    })?;
    // Model names become history rows and metrics labels: the one rule for
    // them applies here as on the REST API.
    let model = read
        .model
        .as_deref()
        .map(parse_model)
        .transpose()
        .map_err(|error| {
            ApiError::bad_request("invalid_body", error.to_string()).with_param("model")
        })?;
    Ok(Call {
        endpoint,
        model,
        estimate: read.estimate,
        tier: read.tier,
        inject_usage: read.inject_usage,
        named: read.named.clone(),
        body: read.forwarded(body),
    })
}

/// Reads a request body up to `limit` bytes into one buffer, sized from
/// `Content-Length` when the client declared it, so that a large body is
/// held once rather than in pieces and then again whole.
async fn read_body(body: Body, declared: Option<usize>, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, limit);
    let mut buffer = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                body_too_large(limit)
            } else {
                ApiError::bad_request(
                    "unreadable_body",
                    format!("the request body could not be read: {error}"),
                )
            }
        })?;
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buffer))
}

/// The 400 for a path that cannot be forwarded.
fn invalid_path(error: path::PathError) -> ApiError {
    ApiError::bad_request(
        "invalid_path",
        format!("{error}; quotawatch forwards paths under /v1/ only, as OpenAI spells them"),
    )
}

/// A refusal by the engine, counted and answered as a 429.
fn refused(
    state: &ProxyState,
    workspace: &crate::domain::limits::WorkspaceId,
    endpoint: Endpoint,
    decision: &crate::engine::Decision,
    refusal: &crate::domain::workspace::Refusal,
) -> ApiError {
    state.metrics.refusal(workspace, refusal.cause);
    state
        .metrics
        .request(workspace, endpoint.label(), RequestOutcome::Refused);
    refusal_error(
        workspace,
        refusal,
        decision.refused_scope.as_deref(),
        &decision.headroom,
        state.engine.now(),
        state.engine.settings().probe_interval,
    )
}

async fn forward_admitted(
    state: &ProxyState,
    request: Request,
    own_time: &mut OwnTime,
) -> Result<Response, ApiError> {
    let proxy = &state.proxy;
    let (parts, body) = request.into_parts();
    let auth = Auth::of(&parts.headers, &state.engine).await?;
    if auth.principal == Principal::Admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "workspace_key_required",
            "OpenAI calls through quotawatch are made with a workspace key (or a service key naming the workspace), which decides whose limits apply; the admin key has none",
        ));
    }
    let workspace = auth.workspace(&state.engine, None, Scope::Proxy).await?;
    // The one reading of the path: classified, priced and forwarded alike.
    let path = path::normalise(parts.uri.path()).map_err(invalid_path)?;
    let endpoint = Endpoint::of(&parts.method, &path);
    // Cheap before expensive: a workspace that cannot be admitted whatever
    // the request costs is refused before its body is read.
    if let Some(decision) = state.engine.refuse_early(&workspace)?
        && let Err(refusal) = &decision.result
    {
        return Err(refused(state, &workspace, endpoint, &decision, refusal));
    }
    let account = state.engine.upstream_account(&workspace)?;
    let sent_as = proxy.sent_as(&account)?;
    // A credential blocked by billing refuses as early, for every workspace
    // billed to it, or lets this call through as its probe.
    if let Some(decision) = state
        .engine
        .pass_credential(&workspace, &sent_as.credential)
        .await?
        && let Err(refusal) = &decision.result
    {
        return Err(refused(state, &workspace, endpoint, &decision, refusal));
    }

    let declared_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > proxy.max_body_bytes) {
        return Err(body_too_large(proxy.max_body_bytes));
    }
    let body = own_time
        .excluding(read_body(body, declared_length, proxy.max_body_bytes))
        .await?;
    let call = understand(proxy, &parts.method, endpoint, body)?;
    let scoped = crate::edge::scope::values(&parts.headers, &call.named)?;
    // The cost estimate: the prompt at the input rate, and the completion
    // allowance of every choice (`n` × max_tokens, or the default) at the
    // output rate; nothing is assumed cached.
    let estimate = state.engine.pricing().usage(
        call.model.as_deref(),
        TokenCounts {
            prompt: call.estimate.prompt,
            cached: 0,
            completion: call.estimate.completion,
        },
        call.tier,
    );

    let decision = state
        .engine
        .admit(
            &workspace,
            Admission {
                estimate,
                model: call.model.clone(),
                // The guard below settles the call here, however it ends.
                settled_anywhere: false,
                scoped,
            },
        )
        .await?;
    let admitted = match &decision.result {
        Ok(admitted) => admitted,
        Err(refusal) => return Err(refused(state, &workspace, endpoint, &decision, refusal)),
    };
    let headroom = RateLimitValues::of(&decision.headroom, state.engine.now());
    let mut guard = SettleGuard::new(Settlement {
        state: state.clone(),
        workspace: workspace.clone(),
        reservation: admitted.id,
        model: call.model.clone(),
        tier: call.tier,
        endpoint: call.endpoint,
        estimate: call.estimate,
        arrived: own_time.arrived,
        credential: CredentialCall {
            credential: sent_as.credential.clone(),
            admitted_at: admitted.charged_at,
        },
    });

    let under_v1 = path.strip_prefix("/v1").unwrap_or(&path);
    let uri = proxy
        .upstream
        .uri(under_v1, parts.uri.query())
        .map_err(|error| {
            ApiError::internal(format!("the upstream URI cannot be built: {error}"))
        })?;
    let mut headers = headers::to_upstream(&parts.headers);
    // What HTTP clients send when the caller says nothing about it, as the
    // upstream has always received it through quotawatch.
    headers
        .entry(header::ACCEPT)
        .or_insert(HeaderValue::from_static("*/*"));
    if endpoint.is_priced() {
        // The body was read as JSON whatever its declared type: it goes as JSON.
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    // Bodies are read for usage on the way back, so they must come plain.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers.insert(header::AUTHORIZATION, sent_as.authorization.clone());
    // The workspace's own organization and project, never the client's.
    for (name, id) in [
        ("openai-organization", &sent_as.organization),
        ("openai-project", &sent_as.project),
    ] {
        if let Some(id) = id {
            headers.insert(name, id.clone());
        }
    }
    let mut upstream_request = axum::http::Request::new(upstream::RequestBody::new(call.body));
    *upstream_request.method_mut() = parts.method;
    *upstream_request.uri_mut() = uri;
    *upstream_request.headers_mut() = headers;

    let request_phase = own_time.so_far();
    state.metrics.overhead(Phase::Request, request_phase);
    let sent = Instant::now();
    let answer = own_time
        .excluding(tokio::time::timeout(
            proxy.headers_timeout,
            proxy.upstream.send(upstream_request),
        ))
        .await;
    state.metrics.upstream_latency(sent.elapsed());
    let response = match answer {
        Ok(Ok(response)) => response,
        // The settlements of failed calls wait boxed: inline, their futures
        // would be part of every call's, which is moved whole into its box
        // as each call begins.
        Ok(Err(failure)) => {
            tracing::warn!(detail = %failure.detail, "upstream call failed");
            let failed = upstream_failed(&mut guard, &failure.reason, failure.timed_out, headroom);
            return Ok(Box::pin(failed).await);
        }
        Err(_) => {
            let reason = "no response headers in time";
            return Ok(Box::pin(upstream_failed(&mut guard, reason, true, headroom)).await);
        }
    };

    // The answer's own header map becomes the client's: read first, then
    // trimmed and added to in place.
    let (answer, answer_body) = response.into_parts();
    let status = answer.status;
    let rate = RateLimitHeaders::parse(
        answer
            .headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
    );
    let scanner = status.is_success().then(|| {
        let content_type = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("");
        scan::Scanner::new(call.endpoint, content_type, call.inject_usage)
    });
    let mut client_headers = headers::to_client(answer.headers);
    apply_headroom(&mut client_headers, headroom);

    let reply = if let Some(scanner) = scanner {
        if call.inject_usage {
            // The body changes length when the added usage is removed.
            client_headers.remove(header::CONTENT_LENGTH);
        }
        let body = MeteredBody::new(
            answer_body,
            scanner,
            guard.into_settlement(),
            UpstreamAnswer {
                status: status.as_u16(),
                headers: rate,
                billing: BillingScope::Credential,
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
            .excluding(read_error_body(answer_body, proxy.idle_timeout))
            .await;
        let error = ErrorEnvelope::parse(&error_body).unwrap_or_default();
        let settled = guard.settle(
            Some(TokenUsage::default()),
            Some(UpstreamAnswer {
                status: status.as_u16(),
                error_type: error.error_type,
                error_code: error.code,
                error_message: error.message,
                headers: rate,
                billing: BillingScope::Credential,
            }),
        );
        let class = Box::pin(settled).await;
        client_headers.remove(header::CONTENT_LENGTH);
        if class == Some(UpstreamClass::KeyRejected) {
            return Ok(upstream_key_rejected(&client_headers));
        }
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

/// OpenAI refused the key quotawatch sent: passed on as it came (a 401
/// "Incorrect API key provided"), it would send the app's developers to
/// check their own key, which is fine. So the app gets a 502 that says
/// whose configuration is at fault, with the workspace's headroom and the
/// upstream's request id, and no retry.
fn upstream_key_rejected(upstream_headers: &HeaderMap) -> Response {
    let mut reply = ApiError::new(
        StatusCode::BAD_GATEWAY,
        "server_error",
        "upstream_authentication_failed",
        "OpenAI rejected the key quotawatch sends for this workspace: the quotawatch server's configuration (OPENAI_API_KEY, or the workspace's upstream_key_env) needs fixing, not the key this request was sent with",
    )
    .with_header("x-should-retry", "false")
    .into_response();
    for (name, value) in upstream_headers {
        let name_str = name.as_str();
        if name_str.starts_with("x-ratelimit-")
            || name_str.starts_with("x-upstream-ratelimit-")
            || name_str == "x-request-id"
        {
            reply.headers_mut().insert(name.clone(), value.clone());
        }
    }
    reply
}

/// Reads an upstream error body, which is small; a body that does not come
/// in time counts as empty.
async fn read_error_body(mut answer: hyper::body::Incoming, within: Duration) -> Bytes {
    use http_body_util::BodyExt;
    let collect = async {
        let mut body = Vec::new();
        while let Some(Ok(frame)) = answer.frame().await {
            if let Ok(chunk) = frame.into_data() {
                body.extend_from_slice(&chunk);
            }
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
    headroom: RateLimitValues,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> UpstreamKeys {
        let env: crate::keys::EnvLookup = Arc::new(|name: &str| match name {
            "QUOTAWATCH_UPSTREAM_KEY_TEAM" => Some("sk-team".to_owned()),
            "QUOTAWATCH_UPSTREAM_KEY_BROKEN" => Some("sk-broken\nkey".to_owned()),
            _ => None,
        });
        UpstreamKeys::new(Some("sk-server".to_owned()), env)
    }

    fn account(key_env: Option<&str>, project: Option<&str>) -> UpstreamAccount {
        UpstreamAccount {
            key_env: key_env.map(str::to_owned),
            organization: Some("org-ops".to_owned()),
            project: project.map(str::to_owned),
        }
    }

    #[test]
    fn an_account_is_worked_out_once_and_sent_with_its_own_key_and_ids() {
        let keys = keys();
        let team = account(Some("QUOTAWATCH_UPSTREAM_KEY_TEAM"), Some("proj_a"));
        let sent = keys.sent_as(&team).expect("the team's key is set");
        assert_eq!(sent.authorization, "Bearer sk-team");
        assert!(sent.authorization.is_sensitive(), "never logged");
        assert_eq!(sent.organization.as_ref().expect("set"), "org-ops");
        assert_eq!(sent.project.as_ref().expect("set"), "proj_a");
        assert_eq!(
            sent.credential,
            CredentialId::of("sk-team", Some("org-ops"), Some("proj_a"))
        );
        assert!(Arc::ptr_eq(&sent, &keys.sent_as(&team).expect("again")));

        let server = keys
            .sent_as(&account(None, None))
            .expect("the server's key");
        assert_eq!(server.authorization, "Bearer sk-server");
        assert!(server.project.is_none());
        assert_eq!(
            server.credential,
            CredentialId::of("sk-server", Some("org-ops"), None)
        );
    }

    #[test]
    fn an_account_without_a_usable_key_is_refused_and_not_remembered() {
        let keys = keys();
        let missing = account(Some("QUOTAWATCH_UPSTREAM_KEY_GONE"), None);
        let error = keys.sent_as(&missing).err().expect("no such variable");
        assert!(error.contains("QUOTAWATCH_UPSTREAM_KEY_GONE"), "{error}");
        let broken = account(Some("QUOTAWATCH_UPSTREAM_KEY_BROKEN"), None);
        let error = keys.sent_as(&broken).err().expect("not a header value");
        assert!(
            error.contains("characters not allowed in a header"),
            "{error}"
        );
        assert!(crate::sync::read(&keys.sent).is_empty());
    }

    #[test]
    fn the_accounts_remembered_stay_bounded() {
        let keys = keys();
        for n in 0..ACCOUNTS_REMEMBERED + 10 {
            let project = format!("proj_{n}");
            let sent = keys
                .sent_as(&account(None, Some(&project)))
                .expect("the server's key");
            assert_eq!(sent.project.as_ref().expect("set"), project.as_str());
            assert!(crate::sync::read(&keys.sent).len() <= ACCOUNTS_REMEMBERED);
        }
    }
}
