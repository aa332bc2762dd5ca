//! A fake OpenAI upstream, for tests, demos and benchmarks — never for
//! production. It answers `/v1/*` the way OpenAI does, from the recorded
//! wire format in `tests/fixtures/openai/` (compiled in): JSON bodies with
//! `x-ratelimit-*` headers, SSE streams (with or without the usage chunk, as
//! the request asks), and each documented error with its status and headers.
//!
//! Scenarios choose the answer: per request with the query parameter
//! `mock_scenario=NAME` (a query reaches the upstream through quotawatch as
//! sent, where an unknown header would not), or for every request with
//! `POST /mock/scenario {"scenario": "NAME"}` (or `--scenario NAME`). Knobs:
//! latency before the headers, a delay between streamed events, and a share
//! of requests that fail with a given scenario. `GET /mock/stats` counts
//! requests per path; `GET /mock/last` shows the last request as received;
//! `GET /mock/usage` lists the usage the mock sent in its answers, so that a
//! test can price what an upstream billed independently of quotawatch;
//! `POST /mock/reset` clears them and the scenario.
//!
//! An answer follows its request where OpenAI's would: a request for the
//! `flex` or `priority` tier is answered as served at that tier, and the
//! `usage_details` scenario puts cached prompt tokens and reasoning tokens
//! into the usage of every chat and Responses answer, streamed or not;
//! `standard_tier` answers as served at the standard tier whatever the
//! request asked.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures_util::stream;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::sync::lock;

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/openai/",
            $name
        ))
    };
}

const CHAT: &str = fixture!("chat_completion.json");
const CHAT_HEADERS: &str = fixture!("chat_completion.headers");
const CHAT_STREAM: &str = fixture!("chat_completion_stream.sse");
const CHAT_STREAM_USAGE: &str = fixture!("chat_completion_stream_include_usage.sse");
const EMBEDDINGS: &str = fixture!("embeddings.json");
const RESPONSES: &str = fixture!("responses.json");
const RESPONSES_STREAM: &str = fixture!("responses_stream.sse");

/// An error answer: status, body and headers beyond `content-type`.
struct ErrorAnswer {
    status: u16,
    body: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

/// Every error the mock can answer, by scenario name.
const ERRORS: &[(&str, ErrorAnswer)] = &[
    (
        "rate_limit_requests",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_rate_limit_requests.json"),
            headers: &[
                ("retry-after", "20"),
                ("x-ratelimit-limit-requests", "3"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "20s"),
            ],
        },
    ),
    (
        "rate_limit_requests_per_day",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_rate_limit_requests_per_day.json"),
            headers: &[("retry-after", "432")],
        },
    ),
    (
        "rate_limit_tokens",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_rate_limit_tokens.json"),
            headers: &[
                ("retry-after", "10"),
                ("x-ratelimit-limit-tokens", "10000"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "9.816s"),
            ],
        },
    ),
    (
        "slow_down",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_slow_down.json"),
            headers: &[("retry-after", "1")],
        },
    ),
    (
        "request_too_large",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_request_too_large.json"),
            headers: &[],
        },
    ),
    (
        "insufficient_quota",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_insufficient_quota.json"),
            headers: &[],
        },
    ),
    (
        "insufficient_quota_legacy",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_insufficient_quota_legacy_null_code.json"),
            headers: &[],
        },
    ),
    (
        "credit_balance_exhausted",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_credit_balance_exhausted.json"),
            headers: &[],
        },
    ),
    (
        "organization_spend_limit_exceeded",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_organization_spend_limit_exceeded.json"),
            headers: &[],
        },
    ),
    (
        "project_spend_limit_exceeded",
        ErrorAnswer {
            status: 429,
            body: fixture!("error_429_project_spend_limit_exceeded.json"),
            headers: &[],
        },
    ),
    (
        "azure_429",
        ErrorAnswer {
            status: 429,
            body: fixture!("azure_error_429.json"),
            headers: &[("retry-after", "10"), ("retry-after-ms", "10000")],
        },
    ),
    (
        "server_error",
        ErrorAnswer {
            status: 500,
            body: fixture!("error_500_server_error.json"),
            headers: &[],
        },
    ),
    (
        "overloaded",
        ErrorAnswer {
            status: 503,
            body: fixture!("error_503_server_is_overloaded.json"),
            headers: &[("retry-after", "1")],
        },
    ),
    (
        "overloaded_legacy",
        ErrorAnswer {
            status: 503,
            body: fixture!("error_503_legacy_overloaded.json"),
            headers: &[],
        },
    ),
    (
        "invalid_api_key",
        ErrorAnswer {
            status: 401,
            body: fixture!("error_401_invalid_api_key.json"),
            headers: &[],
        },
    ),
    (
        "context_length_exceeded",
        ErrorAnswer {
            status: 400,
            body: fixture!("error_400_context_length_exceeded.json"),
            headers: &[],
        },
    ),
];

/// Scenarios that shape the answer rather than replace it.
const BEHAVIOURS: &[&str] = &[
    "ok",
    "timeout",
    "stream_break",
    "stream_stall",
    "stream_error",
    "usage_details",
    "standard_tier",
    "hop_headers",
];

pub fn scenarios() -> Vec<&'static str> {
    BEHAVIOURS
        .iter()
        .copied()
        .chain(ERRORS.iter().map(|(name, _)| *name))
        .collect()
}

fn is_scenario(name: &str) -> bool {
    scenarios().contains(&name)
}

/// Settings of the mock.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Wait before the response headers.
    pub latency: Duration,
    /// Wait between streamed events.
    pub chunk_delay: Duration,
    /// The scenario of requests that name none.
    pub scenario: String,
    /// The share of requests (0 to 1) answered with `error_scenario` instead.
    pub error_rate: f64,
    pub error_scenario: String,
    /// When set, requests must carry `Authorization: Bearer <this>`, or get
    /// OpenAI's 401.
    pub require_key: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            scenario: "ok".to_owned(),
            error_rate: 0.0,
            error_scenario: "server_error".to_owned(),
            require_key: None,
        }
    }
}

#[derive(Default)]
struct Recorded {
    hits: BTreeMap<String, u64>,
    last: Option<Value>,
    /// The usage sent, by answer: how many answers carried each usage for
    /// each path, model and tier. Counted rather than listed, so that a
    /// benchmark's millions of identical answers take no more memory than
    /// one.
    usage: BTreeMap<String, (Value, u64)>,
}

/// Where one answer's usage is counted when it is sent: its path, the
/// model its request named and the tier it was served at.
#[derive(Clone)]
struct Ledger {
    recorded: Arc<Mutex<Recorded>>,
    answer: Value,
}

impl Ledger {
    fn sent(&self, usage: &Value) {
        let mut answer = self.answer.clone();
        answer["usage"] = usage.clone();
        let key = answer.to_string();
        let mut recorded = lock(&self.recorded);
        recorded.usage.entry(key).or_insert((answer, 0)).1 += 1;
    }
}

/// How an answer departs from its fixture for one request: the tier it
/// was served at, when the request asked for one priced apart, and whether
/// its usage carries cached and reasoning tokens.
#[derive(Clone, Default)]
struct Shape {
    tier: Option<String>,
    details: bool,
}

impl Shape {
    /// Shapes one answer object (a chat completion, a chat chunk, or a
    /// Responses object) and answers the usage it carries, if any.
    fn apply(&self, object: &mut Value) -> Option<Value> {
        if let Some(tier) = &self.tier
            && (object.get("service_tier").is_some() || object["object"] == "response")
        {
            object["service_tier"] = json!(tier);
        }
        let usage = object.get_mut("usage").filter(|usage| !usage.is_null())?;
        if self.details {
            *usage = detailed_usage(usage.get("input_tokens").is_some());
        }
        Some(usage.clone())
    }

    /// Shapes an SSE event: its data is a chat chunk, or a Responses event
    /// whose `response` is the object. Events left as they are keep their
    /// text; changed ones are written anew.
    fn event(&self, event: &str) -> (String, Option<Value>) {
        let Some((before, data)) = event
            .split_once("data: ")
            .filter(|(before, _)| before.is_empty() || before.ends_with('\n'))
        else {
            return (event.to_owned(), None);
        };
        let Ok(mut parsed) = serde_json::from_str::<Value>(data.trim_end()) else {
            return (event.to_owned(), None);
        };
        let object = match parsed.get_mut("response") {
            Some(response) if response.is_object() => response,
            _ => &mut parsed,
        };
        let unchanged = object.clone();
        let usage = self.apply(object);
        if *object == unchanged {
            return (event.to_owned(), usage);
        }
        (format!("{before}data: {parsed}\n\n"), usage)
    }
}

/// Usage with cached prompt tokens and reasoning tokens, as a reasoning
/// model with a cached prompt prefix reports it: in the Responses API's
/// shape or in chat's.
fn detailed_usage(responses: bool) -> Value {
    if responses {
        json!({
            "input_tokens": 200, "input_tokens_details": {"cached_tokens": 64},
            "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 30},
            "total_tokens": 250
        })
    } else {
        json!({
            "prompt_tokens": 200, "completion_tokens": 50, "total_tokens": 250,
            "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 30, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        })
    }
}

#[derive(Clone)]
struct Mock {
    options: Arc<Mutex<MockOptions>>,
    recorded: Arc<Mutex<Recorded>>,
    streams: Arc<StreamCounts>,
}

/// The mock upstream's routes.
pub fn router(options: MockOptions) -> Router {
    let mock = Mock {
        options: Arc::new(Mutex::new(options)),
        recorded: Arc::new(Mutex::new(Recorded::default())),
        streams: Arc::default(),
    };
    Router::new()
        .route("/mock/scenario", post(set_scenario))
        .route("/mock/stats", get(stats))
        .route("/mock/last", get(last))
        .route("/mock/usage", get(usage))
        .route("/mock/reset", post(reset))
        .route("/v1/{*path}", any(answer))
        .with_state(mock)
}

#[derive(Deserialize)]
struct ScenarioBody {
    scenario: String,
}

async fn set_scenario(
    State(mock): State<Mock>,
    axum::Json(body): axum::Json<ScenarioBody>,
) -> Response {
    if !is_scenario(&body.scenario) {
        let known = scenarios().join(", ");
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": format!("unknown scenario; known: {known}")})),
        )
            .into_response();
    }
    lock(&mock.options).scenario = body.scenario.clone();
    axum::Json(json!({"scenario": body.scenario})).into_response()
}

async fn stats(State(mock): State<Mock>) -> axum::Json<Value> {
    let recorded = lock(&mock.recorded);
    let total: u64 = recorded.hits.values().sum();
    let streams = &mock.streams;
    axum::Json(json!({
        "total": total,
        "requests": recorded.hits,
        "streams": {
            "started": streams.started.load(Ordering::Relaxed),
            "finished": streams.finished.load(Ordering::Relaxed),
            "abandoned": streams.abandoned.load(Ordering::Relaxed),
        },
    }))
}

async fn last(State(mock): State<Mock>) -> axum::Json<Value> {
    axum::Json(lock(&mock.recorded).last.clone().unwrap_or(Value::Null))
}

/// The usage the mock sent: `{"answers": [{"path", "model",
/// "service_tier", "usage", "count"}]}`, one entry per distinct usage of a
/// path, requested model and tier, with how many answers carried it.
async fn usage(State(mock): State<Mock>) -> axum::Json<Value> {
    let recorded = lock(&mock.recorded);
    let answers: Vec<Value> = recorded
        .usage
        .values()
        .map(|(answer, count)| {
            let mut answer = answer.clone();
            answer["count"] = json!(count);
            answer
        })
        .collect();
    axum::Json(json!({ "answers": answers }))
}

async fn reset(State(mock): State<Mock>) -> StatusCode {
    *lock(&mock.recorded) = Recorded::default();
    lock(&mock.options).scenario = "ok".to_owned();
    StatusCode::NO_CONTENT
}

fn headers_of(lines: &str) -> Vec<(String, String)> {
    lines
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, _)| !name.eq_ignore_ascii_case("content-type"))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

fn with_headers(
    mut response: Response,
    headers: impl IntoIterator<Item = (String, String)>,
) -> Response {
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::try_from(name),
            HeaderValue::try_from(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn json_response(status: u16, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// How streams ended: completely, or dropped early because the reader went
/// away (which is how a proxy cancelling its upstream request looks here).
#[derive(Default)]
struct StreamCounts {
    started: AtomicU64,
    finished: AtomicU64,
    abandoned: AtomicU64,
}

/// Counts its stream as abandoned unless it was marked finished.
struct StreamGuard {
    counts: Arc<StreamCounts>,
    finished: bool,
}

impl StreamGuard {
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let counter = if self.finished {
            &self.counts.finished
        } else {
            &self.counts.abandoned
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct StreamState {
    /// Each event's text, with the usage it carries.
    events: std::vec::IntoIter<(String, Option<Value>)>,
    sent: usize,
    ended: bool,
    guard: StreamGuard,
    ledger: Ledger,
}

/// An SSE body of `text`'s events, shaped by `shape`, sent event by event
/// with `delay` between events; `cut` decides what happens instead of the
/// event at that position, if set. The usage an event carries is written
/// to `ledger` when the event is sent, so a stream cut before it counts
/// none.
fn event_stream(
    text: &'static str,
    shape: &Shape,
    delay: Duration,
    cut: Option<(usize, Ending)>,
    counts: Arc<StreamCounts>,
    ledger: Ledger,
) -> Response {
    counts.started.fetch_add(1, Ordering::Relaxed);
    let state = StreamState {
        events: text
            .split_inclusive("\n\n")
            .map(|event| shape.event(event))
            .collect::<Vec<_>>()
            .into_iter(),
        sent: 0,
        ended: false,
        guard: StreamGuard {
            counts,
            finished: false,
        },
        ledger,
    };
    let stream = stream::unfold(state, move |mut state| async move {
        if state.ended {
            return None;
        }
        if !delay.is_zero() && state.sent > 0 {
            tokio::time::sleep(delay).await;
        }
        if let Some((after, ending)) = cut
            && state.sent == after
        {
            state.ended = true;
            // Let what was sent so far reach the reader before the ending.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return match ending {
                Ending::Break => Some((Err(std::io::Error::other("connection reset by mock")), state)),
                Ending::Stall => {
                    std::future::pending::<()>().await;
                    None
                }
                Ending::Error => Some((
                    Ok(Bytes::from_static(b"data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n")),
                    state,
                )),
            };
        }
        match state.events.next() {
            Some((event, usage)) => {
                state.sent += 1;
                if let Some(usage) = &usage {
                    state.ledger.sent(usage);
                }
                Some((Ok(Bytes::from(event)), state))
            }
            None => {
                state.guard.finish();
                None
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    response
}

#[derive(Clone, Copy)]
enum Ending {
    Break,
    Stall,
    Error,
}

fn not_found(path: &str) -> Response {
    json_response(
        404,
        json!({"error": {"message": format!("Invalid URL (POST /v1{path})"), "type": "invalid_request_error", "param": null, "code": null}}).to_string(),
    )
}

async fn answer(State(mock): State<Mock>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().trim_start_matches("/v1").to_owned();
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("").to_owned()))
        .collect();
    {
        let mut recorded = lock(&mock.recorded);
        *recorded.hits.entry(path.clone()).or_default() += 1;
        recorded.last = Some(json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        }));
    }
    let options = lock(&mock.options).clone();
    if !options.latency.is_zero() {
        tokio::time::sleep(options.latency).await;
    }
    if let Some(expected) = &options.require_key
        && !authorized(&parts.headers, expected)
    {
        return error_answer("invalid_api_key");
    }
    let mut scenario = parts
        .uri
        .query()
        .into_iter()
        .flat_map(|query| query.split('&'))
        .find_map(|pair| pair.strip_prefix("mock_scenario="))
        .unwrap_or(&options.scenario)
        .to_owned();
    if options.error_rate > 0.0 && rand::random::<f64>() < options.error_rate {
        scenario = options.error_scenario.clone();
    }
    if scenario == "timeout" {
        std::future::pending::<()>().await;
    }
    if ERRORS.iter().any(|(name, _)| *name == scenario) {
        return error_answer(&scenario);
    }
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let streaming = json.get("stream") == Some(&Value::Bool(true));
    let cut = match scenario.as_str() {
        "stream_break" => Some((2, Ending::Break)),
        "stream_stall" => Some((2, Ending::Stall)),
        "stream_error" => Some((2, Ending::Error)),
        _ => None,
    };
    let asked = json
        .get("service_tier")
        .and_then(Value::as_str)
        .filter(|tier| matches!(*tier, "flex" | "priority"));
    let shape = Shape {
        // OpenAI serves a priority request past its ramp limit at the
        // standard tier, and says so.
        tier: if scenario == "standard_tier" {
            Some("default".to_owned())
        } else {
            asked.map(str::to_owned)
        },
        details: scenario == "usage_details",
    };
    let ledger = Ledger {
        recorded: mock.recorded.clone(),
        answer: json!({
            "path": path,
            "model": json.get("model").cloned().unwrap_or(Value::Null),
            "service_tier": shape.tier.as_deref().unwrap_or("default"),
        }),
    };
    let stream = |text| {
        event_stream(
            text,
            &shape,
            options.chunk_delay,
            cut,
            mock.streams.clone(),
            ledger.clone(),
        )
    };
    // A JSON answer goes as its text when shaping leaves it as it was.
    let answer_json = |text: String| {
        let Ok(mut body) = serde_json::from_str::<Value>(&text) else {
            return json_response(200, text);
        };
        let unchanged = body.clone();
        if let Some(usage) = shape.apply(&mut body) {
            ledger.sent(&usage);
        }
        json_response(
            200,
            if body == unchanged {
                text
            } else {
                body.to_string()
            },
        )
    };
    let response = match (path.as_str(), streaming) {
        ("/chat/completions", true) => {
            let with_usage = json.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
            stream(if with_usage { CHAT_STREAM_USAGE } else { CHAT_STREAM })
        }
        ("/chat/completions", false) => answer_json(CHAT.to_owned()),
        ("/completions", _) => answer_json(
            json!({"id": "cmpl-mock", "object": "text_completion", "created": 1761564674,
                "model": json.get("model").cloned().unwrap_or(json!("gpt-3.5-turbo-instruct")),
                "choices": [{"text": "Hello there!", "index": 0, "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
            .to_string(),
        ),
        ("/embeddings", _) => answer_json(EMBEDDINGS.to_owned()),
        ("/responses", true) => stream(RESPONSES_STREAM),
        ("/responses", false) => answer_json(RESPONSES.to_owned()),
        ("/models", _) => json_response(
            200,
            json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}]}).to_string(),
        ),
        ("/files", _) if parts.method == Method::POST => json_response(
            200,
            json!({"id": "file-mock", "object": "file", "bytes": body.len(), "created_at": 1761564674,
                "filename": "upload.jsonl", "purpose": "batch", "status": "processed"})
            .to_string(),
        ),
        (file, _) if parts.method == Method::DELETE && file.starts_with("/files/") => json_response(
            200,
            json!({"id": &file["/files/".len()..], "object": "file", "deleted": true}).to_string(),
        ),
        _ => return not_found(&path),
    };
    let response = with_headers(response, headers_of(CHAT_HEADERS));
    if scenario == "hop_headers" {
        // Headers of one connection, which a proxy must not pass on: the
        // standard ones, and one the `Connection` header names.
        return with_headers(
            response,
            [
                ("connection", "x-mock-hop"),
                ("x-mock-hop", "this connection only"),
                ("keep-alive", "timeout=5"),
            ]
            .map(|(name, value)| (name.to_owned(), value.to_owned())),
        );
    }
    response
}

fn authorized(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        == Some(expected)
}

fn error_answer(scenario: &str) -> Response {
    let Some((_, answer)) = ERRORS.iter().find(|(name, _)| *name == scenario) else {
        return not_found(scenario);
    };
    let headers = answer
        .headers
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .chain([("x-request-id".to_owned(), "req_mock".to_owned())]);
    with_headers(
        json_response(answer.status, answer.body.to_owned()),
        headers,
    )
}

/// Serves the mock on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: MockOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(options))
        .with_graceful_shutdown(shutdown)
        .await
}
