//! `/api/workspaces`: the admin API for workspaces (their keys are in
//! `keys`).

use axum::extract::State;
use axum::http::StatusCode;

use super::AppState;
use super::dto::*;
use crate::admin::AdminError;
use crate::domain::limits::WorkspaceId;
use crate::edge::auth::Auth;
use crate::edge::error::{ApiError, Json, Path};
use crate::keys::Scope;

pub(super) fn parse_id(id: &str) -> Result<WorkspaceId, ApiError> {
    id.parse().map_err(|_| ApiError::workspace_not_found(id))
}

#[utoipa::path(post, path = "/api/workspaces", tag = "workspaces",
    request_body(content = WorkspaceInput, description = "The new workspace; `id` is required"),
    responses(
        (status = 201, description = "Created", body = WorkspaceDoc),
        (status = 400, description = "Invalid value (the field is named in `param`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 409, description = "The id is taken", body = ErrorBody),
        (status = 422, description = "Wrong field types or unknown fields", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<WorkspaceInput>,
) -> Result<(StatusCode, Json<WorkspaceDoc>), ApiError> {
    auth.require_admin("creating a workspace")?;
    let Some(id) = body.id.as_deref() else {
        return Err(
            ApiError::bad_request("invalid_value", "a new workspace needs an id").with_param("id"),
        );
    };
    let config = state
        .admin
        .create_workspace(id, &body.to_spec().map_err(AdminError::Invalid)?)
        .await?;
    Ok((StatusCode::CREATED, Json(WorkspaceDoc::from(&config))))
}

#[utoipa::path(get, path = "/api/workspaces", tag = "workspaces",
    responses(
        (status = 200, description = "All workspaces", body = WorkspaceListDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<WorkspaceListDoc>, ApiError> {
    auth.require_admin("listing workspaces")?;
    let workspaces = state.admin.list_workspaces().await?;
    Ok(Json(WorkspaceListDoc {
        workspaces: workspaces.iter().map(WorkspaceDoc::from).collect(),
    }))
}

#[utoipa::path(get, path = "/api/workspaces/{id}", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id")),
    responses(
        (status = 200, description = "The workspace", body = WorkspaceDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<WorkspaceDoc>, ApiError> {
    // A workspace key may read its own workspace's settings.
    let id = auth
        .workspace(&state.engine, Some(&id), Scope::Read)
        .await?;
    let config = state.admin.workspace(&id).await?;
    Ok(Json(WorkspaceDoc::from(&config)))
}

#[utoipa::path(patch, path = "/api/workspaces/{id}", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id")),
    request_body(content = WorkspaceInput, description = "Any subset of the settings"),
    responses(
        (status = 200, description = "Updated", body = WorkspaceDoc),
        (status = 400, description = "Invalid value", body = ErrorBody),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
        (status = 422, description = "Wrong field types or unknown fields", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<WorkspaceInput>,
) -> Result<Json<WorkspaceDoc>, ApiError> {
    auth.require_admin("changing a workspace")?;
    let id = parse_id(&id)?;
    if let Some(body_id) = &body.id
        && body_id != id.as_str()
    {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!(
                "the body's id {body_id:?} differs from the path's {id:?}; ids cannot be changed"
            ),
        )
        .with_param("id"));
    }
    let config = state
        .admin
        .update_workspace(&id, &body.to_spec().map_err(AdminError::Invalid)?)
        .await?;
    Ok(Json(WorkspaceDoc::from(&config)))
}

#[utoipa::path(delete, path = "/api/workspaces/{id}", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id")),
    responses(
        (status = 204, description = "Deleted with its keys, state and history"),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "Unknown workspace", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require_admin("deleting a workspace")?;
    state.admin.delete_workspace(&parse_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}
