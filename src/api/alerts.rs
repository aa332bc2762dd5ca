//! `/api/alerts`: the admin API of alert channels, their delivery log and
//! test sends. Channels declared in the TOML file are listed here but
//! changed only there.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::dto::{
    AttemptDoc, ChannelCreatedDoc, ChannelDoc, ChannelInput, ChannelListDoc, ChannelPatch,
    DeliveryDoc, DeliveryListDoc, TestDoc, TestInput,
};
use crate::admin::{AdminError, Change};
use crate::domain::alert::{self, ChannelKind, Filter};
use crate::domain::limits::{ValidationError, WorkspaceId};
use crate::domain::notification::Severity;
use crate::edge::auth::Auth;
use crate::edge::error::{ApiError, ErrorBody, Json, Path, Query};
use crate::store::{ChannelRecord, ChannelSource, DeliveryQuery, DeliveryStatus, StoreError};

/// The most deliveries one listing answers, and how many it answers
/// unless told.
const MOST_LISTED: i64 = 500;
const LISTED_BY_DEFAULT: i64 = 50;

fn invalid(error: ValidationError) -> ApiError {
    AdminError::Invalid(error).into()
}

fn store_failed(error: StoreError) -> ApiError {
    AdminError::Store(error).into()
}

fn channel_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "channel_not_found",
        format!(
            "alert channel {:?} does not exist",
            id.chars().take(64).collect::<String>()
        ),
    )
    .with_param("channel")
}

/// A fresh webhook secret: `whsec_` and the base64 of 32 random bytes.
fn generate_secret() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    format!(
        "{}{}",
        alert::SECRET_PREFIX,
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn severity(name: &str) -> Result<Severity, ApiError> {
    Severity::from_name(name).ok_or_else(|| {
        invalid(ValidationError::new(
            "min_severity",
            "min_severity is info, warning or critical",
        ))
    })
}

fn events(events: Option<Vec<String>>) -> Result<Option<Vec<String>>, ApiError> {
    events
        .map(|events| alert::validate_events(&events))
        .transpose()
        .map_err(invalid)
}

/// A secret given for a channel of `kind` (see `alerts::signing_secret`).
fn given_secret(kind: ChannelKind, secret: &str) -> Result<String, ApiError> {
    crate::alerts::signing_secret(kind, secret).map_err(invalid)?;
    Ok(secret.to_owned())
}

/// A URL given for a channel of `kind` (see `alerts::receiver_url`).
fn given_url(kind: ChannelKind, url: String) -> Result<String, ApiError> {
    crate::alerts::receiver_url(kind, &url).map_err(invalid)?;
    Ok(url)
}

/// Recipients given for a channel of `kind` (see
/// `alerts::receiver_recipients`).
fn given_recipients(kind: ChannelKind, list: &[String]) -> Result<Vec<String>, ApiError> {
    crate::alerts::receiver_recipients(kind, list).map_err(invalid)
}

async fn stored_channel(state: &AppState, id: &str) -> Result<ChannelRecord, ApiError> {
    state
        .store
        .alert_channel(id)
        .await
        .map_err(store_failed)?
        .ok_or_else(|| channel_not_found(id))
}

#[utoipa::path(post, path = "/api/alerts/channels", tag = "alerts",
    request_body(content = ChannelInput, description = "The new channel"),
    responses(
        (status = 201, description = "Created; a generated secret is in `secret`, shown this once", body = ChannelCreatedDoc),
        (status = 400, description = "Invalid value (the field is named in `param`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 422, description = "Wrong field types or unknown fields", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create_channel(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<ChannelInput>,
) -> Result<(StatusCode, Json<ChannelCreatedDoc>), ApiError> {
    auth.require_admin("creating an alert channel")?;
    alert::validate_name(&body.name).map_err(invalid)?;
    let kind = ChannelKind::from_name(&body.kind).ok_or_else(|| {
        invalid(ValidationError::new(
            "type",
            "type is webhook, slack or email",
        ))
    })?;
    if kind == ChannelKind::Email && !state.alerts.sends_email() {
        return Err(invalid(ValidationError::new(
            "type",
            "email channels need an SMTP server: set QUOTAWATCH_SMTP_URL and QUOTAWATCH_SMTP_FROM, and restart",
        )));
    }
    let url = body.url.map(|url| given_url(kind, url)).transpose()?;
    let recipients = body
        .to
        .map(|list| given_recipients(kind, &list))
        .transpose()?;
    let (url, recipients) = match (kind.has_url(), url, recipients) {
        (true, Some(url), _) => (url, Vec::new()),
        (false, _, Some(recipients)) => (String::new(), recipients),
        (true, None, _) => {
            return Err(invalid(ValidationError::new(
                "url",
                format!("a {} channel needs the receiver's url", kind.name()),
            )));
        }
        (false, _, None) => {
            return Err(invalid(ValidationError::new(
                "to",
                "an email channel needs its recipients: a list of addresses",
            )));
        }
    };
    let workspace = match body.workspace.as_deref() {
        None => None,
        Some(id) => {
            let id: WorkspaceId = id.parse().map_err(|_| ApiError::workspace_not_found(id))?;
            state.admin.workspace(&id).await?;
            Some(id)
        }
    };
    let (secret, generated) = match (body.secret.as_deref(), kind.is_signed()) {
        (Some(secret), _) => (Some(given_secret(kind, secret)?), None),
        (None, true) => {
            let secret = generate_secret();
            (Some(secret.clone()), Some(secret))
        }
        (None, false) => (None, None),
    };
    let now = state.engine.now();
    let bytes: [u8; 8] = rand::random();
    let channel = ChannelRecord {
        id: format!("ch_{}", hex::encode(bytes)),
        name: body.name,
        workspace,
        kind,
        url,
        recipients,
        secret,
        filter: Filter {
            events: events(body.events)?,
            min_severity: body
                .min_severity
                .as_deref()
                .map_or(Ok(Severity::Info), severity)?,
            resolutions: body.resolutions.unwrap_or(true),
        },
        enabled: body.enabled.unwrap_or(true),
        source: ChannelSource::Api,
        created_at: now,
        updated_at: now,
    };
    state
        .store
        .save_alert_channel(&channel)
        .await
        .map_err(store_failed)?;
    tracing::info!(channel = %channel.id, kind = kind.name(), "alert channel created");
    Ok((
        StatusCode::CREATED,
        Json(ChannelCreatedDoc {
            channel: ChannelDoc::from(&channel),
            secret: generated,
        }),
    ))
}

#[derive(Deserialize, IntoParams, Debug)]
#[into_params(parameter_in = Query)]
pub struct ChannelsQuery {
    /// Only this workspace's channels and the global ones.
    pub workspace: Option<String>,
}

#[utoipa::path(get, path = "/api/alerts/channels", tag = "alerts",
    params(ChannelsQuery),
    responses(
        (status = 200, description = "The channels, oldest first", body = ChannelListDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_channels(
    State(state): State<AppState>,
    auth: Auth,
    Query(query): Query<ChannelsQuery>,
) -> Result<Json<ChannelListDoc>, ApiError> {
    auth.require_admin("listing alert channels")?;
    let workspace: Option<WorkspaceId> = match query.workspace.as_deref() {
        None => None,
        Some(id) => Some(id.parse().map_err(|_| ApiError::workspace_not_found(id))?),
    };
    let channels = state
        .store
        .alert_channels(workspace.as_ref())
        .await
        .map_err(store_failed)?;
    Ok(Json(ChannelListDoc {
        channels: channels.iter().map(ChannelDoc::from).collect(),
    }))
}

#[utoipa::path(get, path = "/api/alerts/channels/{id}", tag = "alerts",
    params(("id" = String, Path, description = "The channel's id")),
    responses(
        (status = 200, description = "The channel", body = ChannelDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown channel", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_channel(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ChannelDoc>, ApiError> {
    auth.require_admin("reading an alert channel")?;
    Ok(Json(ChannelDoc::from(&stored_channel(&state, &id).await?)))
}

/// A declared channel is the configuration file's to change.
fn writable(channel: &ChannelRecord) -> Result<(), ApiError> {
    if channel.source == ChannelSource::Config {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "channel_declared",
            "this channel is declared in the configuration file ([[alerts.channels]]); change it there",
        )
        .with_param("channel"));
    }
    Ok(())
}

#[utoipa::path(patch, path = "/api/alerts/channels/{id}", tag = "alerts",
    params(("id" = String, Path, description = "The channel's id")),
    request_body(content = ChannelPatch, description = "Any subset of the channel's settings"),
    responses(
        (status = 200, description = "Changed", body = ChannelDoc),
        (status = 400, description = "Invalid value (the field is named in `param`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown channel", body = ErrorBody),
        (status = 409, description = "Declared in the configuration file", body = ErrorBody),
        (status = 422, description = "Wrong field types or unknown fields", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn update_channel(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<ChannelPatch>,
) -> Result<Json<ChannelDoc>, ApiError> {
    auth.require_admin("changing an alert channel")?;
    let mut channel = stored_channel(&state, &id).await?;
    writable(&channel)?;
    if let Some(name) = body.name {
        alert::validate_name(&name).map_err(invalid)?;
        channel.name = name;
    }
    if let Some(url) = body.url {
        channel.url = given_url(channel.kind, url)?;
    }
    if let Some(list) = body.to {
        channel.recipients = given_recipients(channel.kind, &list)?;
    }
    if let Some(secret) = body.secret {
        channel.secret = Some(given_secret(channel.kind, &secret)?);
    }
    if let Change::Set(list) = body.events {
        channel.filter.events = events(list)?;
    }
    if let Some(name) = body.min_severity {
        channel.filter.min_severity = severity(&name)?;
    }
    if let Some(resolutions) = body.resolutions {
        channel.filter.resolutions = resolutions;
    }
    if let Some(enabled) = body.enabled {
        channel.enabled = enabled;
    }
    channel.updated_at = state.engine.now();
    state
        .store
        .save_alert_channel(&channel)
        .await
        .map_err(store_failed)?;
    Ok(Json(ChannelDoc::from(&channel)))
}

#[utoipa::path(delete, path = "/api/alerts/channels/{id}", tag = "alerts",
    params(("id" = String, Path, description = "The channel's id")),
    responses(
        (status = 204, description = "Deleted with its deliveries"),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown channel", body = ErrorBody),
        (status = 409, description = "Declared in the configuration file", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete_channel(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require_admin("deleting an alert channel")?;
    let channel = stored_channel(&state, &id).await?;
    writable(&channel)?;
    state
        .store
        .delete_alert_channel(&channel.id)
        .await
        .map_err(store_failed)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams, Debug)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Only this channel's.
    pub channel: Option<String>,
    /// Only this workspace's.
    pub workspace: Option<String>,
    /// `pending`, `delivered` or `gave_up`.
    pub status: Option<String>,
    /// 1 to 500; default 50.
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/alerts/deliveries", tag = "alerts",
    params(DeliveriesQuery),
    responses(
        (status = 200, description = "Deliveries, newest first, each with its attempts", body = DeliveryListDoc),
        (status = 400, description = "Invalid value (the parameter is named in `param`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn deliveries(
    State(state): State<AppState>,
    auth: Auth,
    Query(query): Query<DeliveriesQuery>,
) -> Result<Json<DeliveryListDoc>, ApiError> {
    auth.require_admin("listing alert deliveries")?;
    let status = match query.status.as_deref() {
        None => None,
        Some(name) => Some(DeliveryStatus::from_name(name).ok_or_else(|| {
            invalid(ValidationError::new(
                "status",
                "status is pending, delivered or gave_up",
            ))
        })?),
    };
    let limit = query.limit.unwrap_or(LISTED_BY_DEFAULT);
    if !(1..=MOST_LISTED).contains(&limit) {
        return Err(invalid(ValidationError::new(
            "limit",
            format!("limit is 1 to {MOST_LISTED}"),
        )));
    }
    let workspace = match query.workspace.as_deref() {
        None => None,
        Some(id) => Some(id.parse().map_err(|_| ApiError::workspace_not_found(id))?),
    };
    let views = state
        .store
        .alert_deliveries(&DeliveryQuery {
            channel: query.channel,
            workspace,
            status,
            limit,
        })
        .await
        .map_err(store_failed)?;
    Ok(Json(DeliveryListDoc {
        deliveries: views.iter().map(DeliveryDoc::from).collect(),
    }))
}

#[utoipa::path(post, path = "/api/alerts/test", tag = "alerts",
    request_body(content = TestInput, description = "The channel to send a test event to"),
    responses(
        (status = 200, description = "Sent; `attempt.outcome` says how the receiver answered (a `retry` is retried like any delivery)", body = TestDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown channel", body = ErrorBody),
        (status = 422, description = "Wrong field types or unknown fields", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn test(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<TestInput>,
) -> Result<Json<TestDoc>, ApiError> {
    auth.require_admin("sending a test alert")?;
    let channel = stored_channel(&state, &body.channel).await?;
    let attempt = state
        .alerts
        .send_test(&channel)
        .await
        .map_err(store_failed)?;
    Ok(Json(TestDoc {
        delivery_id: attempt.delivery_id.clone(),
        attempt: AttemptDoc::from(&attempt),
    }))
}
