//! `/api/quota/*`: status, notifications, pre-flight checks, usage reports,
//! resets and history. Handlers authenticate, translate between JSON and the
//! engine's types, and nothing more.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::dto::*;
use crate::domain::limits::{LimitKind, WorkspaceId};
use crate::domain::model::parse_model;
use crate::domain::price::{Tier, TokenCounts, dollars};
use crate::domain::scope::{PerScope, ScopeKind, ScopeValues};
use crate::domain::time::{format_duration, parse_duration};
use crate::domain::upstream::RateLimitHeaders;
use crate::domain::workspace::{BillingScope, Model, Request};
use crate::edge::auth::{Auth, Target};
use crate::edge::error::{ApiError, Json, Query};
use crate::edge::refusal::{ratelimit_headers, refusal_error};
use crate::engine::{Credential, EngineError, Principal, UpstreamAnswer, UsageReport};
use crate::history::{self, Step};
use crate::keys::Scope;

#[derive(Deserialize, IntoParams, Debug)]
#[into_params(parameter_in = Query)]
pub struct WorkspaceQuery {
    /// Admin only: the workspace to act on.
    pub workspace: Option<String>,
}

#[derive(Deserialize, IntoParams, Debug)]
#[into_params(parameter_in = Query)]
pub struct NotificationsQuery {
    /// Admin only: the workspace to show (default: all).
    pub workspace: Option<String>,
    /// `history` adds resolved notifications.
    pub include: Option<String>,
}

/// One workspace's status, or with the admin key and no `?workspace`, all.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum StatusAnswer {
    One(Box<StatusDoc>),
    All(StatusListDoc),
}

#[utoipa::path(get, path = "/api/quota/status", tag = "quota",
    params(WorkspaceQuery),
    responses(
        (status = 200, description = "The status document", body = StatusAnswer),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "The key lacks the scope this needs (`missing_scope`)", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn status(
    State(state): State<AppState>,
    auth: Auth,
    Query(query): Query<WorkspaceQuery>,
) -> Result<Json<StatusAnswer>, ApiError> {
    let answer = match auth
        .target(&state.engine, query.workspace.as_deref(), Scope::Read)
        .await?
    {
        Target::One(id) => {
            state.engine.refresh(&id).await?;
            StatusAnswer::One(Box::new(StatusDoc::from(&state.engine.snapshot(&id)?)))
        }
        Target::All => StatusAnswer::All(StatusListDoc {
            workspaces: state
                .engine
                .snapshots()
                .iter()
                .map(StatusDoc::from)
                .collect(),
        }),
    };
    Ok(Json(answer))
}

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum NotificationsAnswer {
    One(NotificationsDoc),
    All(NotificationsListDoc),
}

#[utoipa::path(get, path = "/api/quota/notifications", tag = "quota",
    params(NotificationsQuery),
    responses(
        (status = 200, description = "Active notifications (and history on request)", body = NotificationsAnswer),
        (status = 400, description = "Invalid `include`", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "The key lacks the scope this needs (`missing_scope`)", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn notifications(
    State(state): State<AppState>,
    auth: Auth,
    Query(query): Query<NotificationsQuery>,
) -> Result<Json<NotificationsAnswer>, ApiError> {
    let with_history = match query.include.as_deref() {
        None | Some("") => false,
        Some("history") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("include={other:?} is not supported; use include=history"),
            )
            .with_param("include"));
        }
    };
    let answer = match auth
        .target(&state.engine, query.workspace.as_deref(), Scope::Read)
        .await?
    {
        Target::One(id) => {
            NotificationsAnswer::One(notifications_of(&state, &auth, &id, with_history).await?)
        }
        Target::All => {
            let mut workspaces = Vec::new();
            for id in state.engine.workspace_ids() {
                workspaces.push(notifications_of(&state, &auth, &id, with_history).await?);
            }
            NotificationsAnswer::All(NotificationsListDoc { workspaces })
        }
    };
    Ok(Json(answer))
}

async fn notifications_of(
    state: &AppState,
    auth: &Auth,
    id: &WorkspaceId,
    with_history: bool,
) -> Result<NotificationsDoc, ApiError> {
    let status = state.engine.snapshot(id)?.status;
    let operator = auth.principal == Principal::Admin;
    let notifications =
        history::notifications(&state.engine, &state.store, id, with_history, operator)
            .await?
            .iter()
            .map(NotificationDoc::from)
            .collect();
    Ok(NotificationsDoc {
        workspace: id.to_string(),
        status: status.name().to_owned(),
        notifications,
    })
}

#[utoipa::path(post, path = "/api/quota/check", tag = "quota",
    params(WorkspaceQuery),
    request_body = CheckRequest,
    responses(
        (status = 200, description = "Admitted; the estimate is reserved", body = CheckResponse),
        (status = 400, description = "Malformed JSON or a value out of bounds (`param` names it)", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "The key lacks the scope this needs (`missing_scope`)", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Wrong field types", body = ErrorBody),
        (status = 429, description = "Refused; see retry-after and x-should-retry", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn check(
    State(state): State<AppState>,
    auth: Auth,
    Query(query): Query<WorkspaceQuery>,
    headers: axum::http::HeaderMap,
    body: Option<Json<CheckRequest>>,
) -> Result<Response, ApiError> {
    let workspace = auth
        .workspace(&state.engine, query.workspace.as_deref(), Scope::Report)
        .await?;
    let request = body.map(|Json(body)| body).unwrap_or_default();
    let estimated_tokens =
        plausible_tokens(request.estimated_tokens.unwrap_or(0), "estimated_tokens")?;
    let prompt_tokens = request.estimated_prompt_tokens.unwrap_or(0);
    if prompt_tokens > estimated_tokens {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!(
                "estimated_prompt_tokens of {prompt_tokens} is more than estimated_tokens of {estimated_tokens}, which counts the prompt and the completion"
            ),
        )
        .with_param("estimated_prompt_tokens"));
    }
    let model = request.model.as_deref().map(valid_model).transpose()?;
    let scoped = scope_values(&headers, request.user.clone())?;
    let estimate = state.engine.pricing().usage(
        model.as_deref(),
        TokenCounts {
            prompt: prompt_tokens,
            cached: 0,
            completion: estimated_tokens - prompt_tokens,
        },
        tier_of(request.service_tier.as_deref()),
    );
    let now = state.engine.now();
    let decision = state
        .engine
        .admit(
            &workspace,
            Request {
                estimate,
                model,
                // The app may report the call to another instance.
                settled_anywhere: true,
                scoped,
            },
        )
        .await?;
    match decision.result {
        Ok(reservation) => {
            let answer = CheckResponse {
                allowed: true,
                reservation_id: format!("rsv_{:016x}", reservation.id),
                expires_at: reservation.expires_at.to_rfc3339(),
                probe: reservation.probe,
                remaining: LimitKind::ALL
                    .into_iter()
                    .filter_map(|kind| {
                        let remaining = decision.remaining.get(kind)?;
                        Some((kind.name().to_owned(), amount(kind.metric, remaining)))
                    })
                    .collect::<BTreeMap<_, _>>(),
            };
            Ok((ratelimit_headers(&decision.headroom, now), Json(answer)).into_response())
        }
        Err(refusal) => {
            state.metrics.refusal(&workspace, refusal.cause);
            Err(refusal_error(
                &workspace,
                &refusal,
                decision.refused_scope.as_deref(),
                &decision.headroom,
                now,
                state.engine.settings().probe_interval,
            ))
        }
    }
}

/// More tokens than any single call can use: a client bug, refused before
/// it can distort counters and history.
const MAX_TOKENS_PER_CALL: u64 = 1_000_000_000;

/// Longer than any call may take (a day, in milliseconds): a client bug,
/// refused before it can distort history.
const MAX_LATENCY_MS: u64 = 86_400_000;

/// A REST call's values for scoped limits: its end user from the header or
/// the body's `user` (its model is the call's own).
fn scope_values(
    headers: &axum::http::HeaderMap,
    user: Option<String>,
) -> Result<ScopeValues, ApiError> {
    let mut named: PerScope<Option<String>> = Default::default();
    named[ScopeKind::User.index()] = user;
    crate::edge::scope::values(headers, &named)
}

fn tier_of(service_tier: Option<&str>) -> Tier {
    service_tier.map_or_else(Tier::default, Tier::requested)
}

fn valid_model(name: &str) -> Result<Model, ApiError> {
    parse_model(name).map_err(|invalid| {
        ApiError::bad_request("invalid_value", invalid.to_string()).with_param("model")
    })
}

fn plausible_tokens(tokens: u64, param: &'static str) -> Result<u64, ApiError> {
    if tokens <= MAX_TOKENS_PER_CALL {
        Ok(tokens)
    } else {
        Err(ApiError::bad_request(
            "invalid_value",
            format!(
                "{param} of {tokens} is more than any call can use (at most {MAX_TOKENS_PER_CALL})"
            ),
        )
        .with_param(param))
    }
}

fn parse_reservation(id: &str) -> Result<u64, ApiError> {
    id.strip_prefix("rsv_")
        .filter(|hex| hex.len() == 16)
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_value",
                format!("reservation_id {id:?} is not an id returned by POST /api/quota/check (rsv_ and 16 hex digits)"),
            )
            .with_param("reservation_id")
        })
}

#[utoipa::path(post, path = "/api/quota/usage", tag = "quota",
    params(WorkspaceQuery),
    request_body = UsageRequest,
    responses(
        (status = 202, description = "Recorded; the new status", body = StatusDoc),
        (status = 400, description = "Malformed JSON or a value out of bounds (`param` names it)", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "The key lacks the scope this needs (`missing_scope`)", body = ErrorBody),
        (status = 404, description = "Unknown or expired reservation", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Wrong field types", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn usage(
    State(state): State<AppState>,
    auth: Auth,
    Query(query): Query<WorkspaceQuery>,
    request_headers: axum::http::HeaderMap,
    Json(body): Json<UsageRequest>,
) -> Result<(StatusCode, Json<StatusDoc>), ApiError> {
    let workspace = auth
        .workspace(&state.engine, query.workspace.as_deref(), Scope::Report)
        .await?;
    let tokens = body.usage.as_ref().map(crate::openai::Usage::tokens);
    if let Some(tokens) = tokens {
        for (count, param) in [
            (tokens.prompt, "usage.prompt_tokens"),
            (tokens.completion, "usage.completion_tokens"),
            (tokens.cached, "usage.prompt_tokens_details.cached_tokens"),
            (
                tokens.reasoning,
                "usage.completion_tokens_details.reasoning_tokens",
            ),
        ] {
            plausible_tokens(count, param)?;
        }
    }
    let model = body.model.as_deref().map(valid_model).transpose()?;
    let scoped = scope_values(&request_headers, body.user.clone())?;
    if let Some(latency) = body.latency_ms
        && latency > MAX_LATENCY_MS
    {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!("latency_ms of {latency} is longer than any call takes (at most {MAX_LATENCY_MS}, a day)"),
        )
        .with_param("latency_ms"));
    }
    let reservation = body
        .reservation_id
        .as_deref()
        .map(parse_reservation)
        .transpose()?;
    if let Some(code) = body.status_code
        && !(100..=599).contains(&code)
    {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!("status_code {code} is not an HTTP status"),
        )
        .with_param("status_code"));
    }
    let headers = body
        .headers
        .as_ref()
        .map(|map| RateLimitHeaders::parse(map.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
        .unwrap_or_default();
    // A bare error body is most likely a 429: the one status whose errors
    // change a workspace's state. Without either, the call succeeded.
    let status = body
        .status_code
        .unwrap_or(if body.error.is_some() { 429 } else { 200 });
    let error = body.error.unwrap_or_default();
    let report = UsageReport {
        reservation,
        model,
        tokens,
        answer: Some(UpstreamAnswer {
            status,
            error_type: error.error_type,
            error_code: error.code,
            error_message: error.message,
            headers,
            // The app called OpenAI with a key quotawatch does not know.
            billing: BillingScope::Workspace,
        }),
        latency_ms: body.latency_ms,
        tier: tier_of(body.service_tier.as_deref()),
        scoped,
    };
    let model = report.model.clone();
    let reported = state
        .engine
        .settle_to_the_end(workspace.clone(), report)
        .await?;
    state
        .metrics
        .cost(&workspace, model.as_deref(), reported.cost);
    if reported.missing_reservation {
        // The upstream's answer counted all the same; only the settlement
        // could not happen.
        return Err(
            EngineError::UnknownReservation(body.reservation_id.unwrap_or_default()).into(),
        );
    }
    let snapshot = state.engine.snapshot(&workspace)?;
    Ok((StatusCode::ACCEPTED, Json(StatusDoc::from(&snapshot))))
}

#[utoipa::path(post, path = "/api/quota/reset", tag = "quota",
    request_body = ResetRequest,
    responses(
        (status = 200, description = "Reset done; the new status is pushed to listeners", body = ResetResponse),
        (status = 400, description = "Neither or both of workspace and all", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "A workspace key", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn reset(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<ResetRequest>,
) -> Result<Json<ResetResponse>, ApiError> {
    if let Principal::Workspace { workspace, .. } = &auth.principal {
        tracing::warn!(caller = %workspace, "reset refused: a workspace key cannot reset");
    }
    auth.require_admin("resetting usage")?;
    let target = match (body.workspace.as_deref(), body.all) {
        (Some(name), None | Some(false)) => {
            let id: WorkspaceId = name
                .parse()
                .map_err(|_| ApiError::workspace_not_found(name))?;
            Some(id)
        }
        (None, Some(true)) => None,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_value",
                "send either {\"workspace\":\"ID\"} or {\"all\":true}",
            ));
        }
    };
    let reset = state
        .engine
        .reset(target.as_ref(), body.what.into())
        .await?;
    tracing::info!(workspaces = ?reset.iter().map(ToString::to_string).collect::<Vec<_>>(), what = ?body.what, "reset by admin");
    Ok(Json(ResetResponse {
        reset: reset.iter().map(ToString::to_string).collect(),
        what: body.what,
    }))
}

#[utoipa::path(get, path = "/api/quota/history", tag = "quota",
    params(HistoryQuery),
    responses(
        (status = 200, description = "Requests, tokens and errors per step", body = HistoryDoc),
        (status = 400, description = "Unsupported window or step", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "The key lacks the scope this needs (`missing_scope`)", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn history(
    State(state): State<AppState>,
    auth: Auth,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<HistoryDoc>, ApiError> {
    let workspace = auth
        .workspace(&state.engine, query.workspace.as_deref(), Scope::Read)
        .await?;
    let window_text = query.window.as_deref().unwrap_or("24h");
    let step_text = query.step.as_deref().unwrap_or("1m");
    let step = Step::parse(step_text).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_value",
            format!("step={step_text:?} is not supported; use 1m, 1h, 1d or 1mo"),
        )
        .with_param("step")
    })?;
    let window = parse_duration(window_text)
        .filter(|w| !w.is_zero())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_value",
                format!("window={window_text:?} is not a duration such as 1h, 24h, 7d or 30d"),
            )
            .with_param("window")
        })?;
    let count = step.count_in(window).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_value",
            format!(
                "window={window_text} must be a whole number of {step_text} steps and at most {} for that step",
                format_duration(step.retention())
            ),
        )
        .with_param("window")
    })?;
    let usage = history::usage(&state.engine, &state.store, &workspace, step, count).await?;
    let points = usage
        .into_iter()
        .map(|(t, totals)| HistoryPoint {
            t,
            requests: totals.requests,
            tokens: totals.tokens,
            prompt_tokens: totals.prompt_tokens,
            completion_tokens: totals.completion_tokens,
            cached_tokens: totals.cached_tokens,
            reasoning_tokens: totals.reasoning_tokens,
            errors: totals.errors,
            client_errors: totals.client_errors,
            server_errors: totals.server_errors,
            refused: totals.refused,
            usd: dollars(u64::try_from(totals.usd_nano).unwrap_or(0)),
            avg_latency_ms: (totals.requests > 0 && totals.latency_ms_sum > 0)
                .then(|| totals.latency_ms_sum as f64 / totals.requests as f64),
        })
        .collect();
    Ok(Json(HistoryDoc {
        workspace: workspace.to_string(),
        window: window_text.to_owned(),
        step: step_text.to_owned(),
        points,
    }))
}

#[utoipa::path(post, path = "/api/quota/ws-ticket", tag = "quota",
    responses(
        (status = 200, description = "A single-use ticket for the WebSocket, valid 60 s", body = TicketDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "The key lacks the scope this needs (`missing_scope`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn ws_ticket(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Json<TicketDoc>, ApiError> {
    // The ticket stands for the key (or token) itself, so that revoking
    // the key also ends what was opened with the ticket.
    Auth::of(&headers, &state.engine)
        .await?
        .require_scope(Scope::Read)?;
    let credential = Credential::of(crate::edge::auth::bearer(&headers).unwrap_or_default());
    let (ticket, expires_at) = state.tickets.issue(credential, state.engine.now()).await;
    Ok(Json(TicketDoc {
        ticket,
        expires_at: expires_at.to_rfc3339(),
    }))
}
