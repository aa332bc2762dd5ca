//! Keys: the admin API for workspace keys and service keys, and browser
//! tokens minted by a service key (or the admin key) for a tenant's page.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;

use super::AppState;
use super::dto::*;
use super::workspaces::parse_id;
use crate::admin::KeySpec;
use crate::domain::limits::WorkspaceId;
use crate::edge::auth::Auth;
use crate::edge::error::{ApiError, Json, Path};
use crate::engine::Principal;
use crate::keys::{PlainKey, Scope, Scopes};
use crate::store::KeyRecord;

/// How long a browser token lasts unless the minter says otherwise, and the
/// bounds it may choose within: long enough for a page, short enough that a
/// leaked token is soon worthless.
const DEFAULT_TOKEN_SECONDS: u64 = 900;
const TOKEN_SECONDS: std::ops::RangeInclusive<u64> = 60..=86_400;

fn created(record: &KeyRecord, key: &PlainKey) -> (StatusCode, Json<CreatedKeyDoc>) {
    (
        StatusCode::CREATED,
        Json(CreatedKeyDoc {
            key: key.expose().to_owned(),
            doc: KeyDoc::from(record),
        }),
    )
}

fn parse_scopes(names: &[String]) -> Result<Scopes, ApiError> {
    names
        .iter()
        .map(|name| name.parse::<Scope>())
        .collect::<Result<Scopes, _>>()
        .map_err(|error| {
            ApiError::bad_request("invalid_value", error.to_string()).with_param("scopes")
        })
}

#[utoipa::path(post, path = "/api/workspaces/{id}/keys", tag = "keys",
    params(("id" = String, Path, description = "Workspace id")),
    request_body(content = Option<KeyInput>, description = "Optional: name, scopes, expiry"),
    responses(
        (status = 201, description = "Created; the key is shown this once", body = CreatedKeyDoc),
        (status = 400, description = "Invalid value (the field is named in `param`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
        (status = 422, description = "Wrong field types or unknown fields", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Option<Json<KeyInput>>,
) -> Result<(StatusCode, Json<CreatedKeyDoc>), ApiError> {
    auth.require_admin("creating a key")?;
    let input = body.map(|Json(body)| body).unwrap_or_default();
    let spec = KeySpec {
        name: input.name,
        scopes: input.scopes.as_deref().map(parse_scopes).transpose()?,
        expires_in_seconds: input.expires_in,
    };
    let (record, key) = state.admin.create_key(&parse_id(&id)?, &spec).await?;
    Ok(created(&record, &key))
}

#[utoipa::path(get, path = "/api/workspaces/{id}/keys", tag = "keys",
    params(("id" = String, Path, description = "Workspace id")),
    responses(
        (status = 200, description = "The workspace's keys (never the keys themselves)", body = KeyListDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<KeyListDoc>, ApiError> {
    auth.require_admin("listing keys")?;
    let keys = state.admin.list_keys(Some(&parse_id(&id)?)).await?;
    Ok(Json(KeyListDoc {
        keys: keys.iter().map(KeyDoc::from).collect(),
    }))
}

#[utoipa::path(delete, path = "/api/workspaces/{id}/keys/{key_id}", tag = "keys",
    params(
        ("id" = String, Path, description = "Workspace id"),
        ("key_id" = String, Path, description = "Key id, as returned at creation"),
    ),
    responses(
        (status = 204, description = "Revoked; the key stops working at once"),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown workspace or key", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn revoke_key(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    auth.require_admin("revoking a key")?;
    state
        .admin
        .revoke_key(Some(&parse_id(&id)?), &key_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/service-keys", tag = "keys",
    request_body(content = Option<ServiceKeyInput>, description = "Optional: name, workspaces, expiry"),
    responses(
        (status = 201, description = "Created; the key is shown this once", body = CreatedKeyDoc),
        (status = 400, description = "Invalid value (the field is named in `param`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "A listed workspace does not exist", body = ErrorBody),
        (status = 422, description = "Wrong field types or unknown fields", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create_service_key(
    State(state): State<AppState>,
    auth: Auth,
    body: Option<Json<ServiceKeyInput>>,
) -> Result<(StatusCode, Json<CreatedKeyDoc>), ApiError> {
    auth.require_admin("creating a service key")?;
    let input = body.map(|Json(body)| body).unwrap_or_default();
    let workspaces = input
        .workspaces
        .map(|names| {
            names
                .iter()
                .map(|name| parse_id(name))
                .collect::<Result<Vec<WorkspaceId>, _>>()
        })
        .transpose()?;
    let spec = KeySpec {
        name: input.name,
        scopes: None,
        expires_in_seconds: input.expires_in,
    };
    let (record, key) = state.admin.create_service_key(workspaces, &spec).await?;
    Ok(created(&record, &key))
}

#[utoipa::path(get, path = "/api/service-keys", tag = "keys",
    responses(
        (status = 200, description = "The service keys (never the keys themselves)", body = KeyListDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_service_keys(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<KeyListDoc>, ApiError> {
    auth.require_admin("listing service keys")?;
    let keys = state.admin.list_keys(None).await?;
    Ok(Json(KeyListDoc {
        keys: keys.iter().map(KeyDoc::from).collect(),
    }))
}

#[utoipa::path(delete, path = "/api/service-keys/{key_id}", tag = "keys",
    params(("key_id" = String, Path, description = "Key id, as returned at creation")),
    responses(
        (status = 204, description = "Revoked; the key and the browser tokens it minted stop working at once"),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown key", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn revoke_service_key(
    State(state): State<AppState>,
    auth: Auth,
    Path(key_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require_admin("revoking a service key")?;
    state.admin.revoke_key(None, &key_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/tokens", tag = "keys",
    request_body = TokenInput,
    responses(
        (status = 201, description = "A read-only token for the workspace", body = TokenDoc),
        (status = 400, description = "Invalid value (the field is named in `param`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Neither a service key nor the admin key", body = ErrorBody),
        (status = 404, description = "Unknown workspace, or one the service key does not serve", body = ErrorBody),
        (status = 422, description = "Wrong field types or unknown fields", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn mint_token(
    State(state): State<AppState>,
    auth: Auth,
    Json(input): Json<TokenInput>,
) -> Result<(StatusCode, Json<TokenDoc>), ApiError> {
    let minting_key = match &auth.principal {
        Principal::Admin => None,
        Principal::Service { key_id, .. } => Some(key_id.clone()),
        Principal::Workspace { .. } => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "service_key_required",
                "browser tokens are minted with a service key or the admin key, by the app's backend",
            ));
        }
    };
    let expires_in = input.expires_in.unwrap_or(DEFAULT_TOKEN_SECONDS);
    if !TOKEN_SECONDS.contains(&expires_in) {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!(
                "expires_in is {} to {} seconds",
                TOKEN_SECONDS.start(),
                TOKEN_SECONDS.end()
            ),
        )
        .with_param("expires_in"));
    }
    let workspace = auth
        .workspace(&state.engine, Some(&input.workspace), Scope::Read)
        .await?;
    let expires_at = state.engine.now().plus(Duration::from_secs(expires_in));
    let token = state
        .engine
        .mint_token(&workspace, minting_key.as_deref(), expires_at)
        .ok_or_else(|| ApiError::internal("the token signing secret is not loaded"))?;
    tracing::info!(workspace = %workspace, expires_in, "browser token minted");
    Ok((
        StatusCode::CREATED,
        Json(TokenDoc {
            token,
            workspace: workspace.to_string(),
            scopes: vec![Scope::Read.as_str().to_owned()],
            expires_at: expires_at.to_rfc3339(),
            expires_in,
        }),
    ))
}
