//! Authentication at the edge: `Authorization: Bearer <key>` becomes a
//! [`Principal`], and a principal plus an optional `?workspace=` becomes the
//! workspace(s) a request may act on. Keys are never logged.

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::domain::limits::WorkspaceId;
use crate::engine::{Engine, Principal};

/// The authenticated caller.
pub struct Auth(pub Principal);

/// Reads the bearer token of a request, if it sent one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Maps a presented key to a principal, or to the 401 that says what is wrong.
/// A key made through another instance since this one last reloaded its
/// catalog is found in the database (see `Engine::authenticate`).
pub async fn authenticate(engine: &Engine, presented: Option<&str>) -> Result<Principal, ApiError> {
    let Some(presented) = presented.filter(|key| !key.is_empty()) else {
        return Err(ApiError::unauthorized(
            "missing_api_key",
            "no API key: send the header Authorization: Bearer <key>",
        ));
    };
    engine.authenticate(presented).await.ok_or_else(|| {
        ApiError::unauthorized(
            "invalid_api_key",
            "the API key is not valid (it may have been revoked)",
        )
    })
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let result = authenticate(&state.engine, bearer(&parts.headers)).await;
        if let Err(error) = &result {
            tracing::info!(path = %parts.uri.path(), code = error.code, "request refused: not authenticated");
        }
        result.map(Auth)
    }
}

/// Which workspaces a request addresses.
pub enum Scope {
    One(WorkspaceId),
    All,
}

impl Auth {
    /// Resolves `?workspace=`: a workspace key may only name its own
    /// workspace (any other name answers 404, exactly like a workspace that
    /// does not exist); the admin key may name any, or none for all.
    pub fn scope(&self, engine: &Engine, requested: Option<&str>) -> Result<Scope, ApiError> {
        match (&self.0, requested) {
            (Principal::Workspace(own), None) => Ok(Scope::One(own.clone())),
            (Principal::Workspace(own), Some(name)) if name == own.as_str() => {
                Ok(Scope::One(own.clone()))
            }
            (Principal::Workspace(_), Some(name)) => Err(ApiError::workspace_not_found(name)),
            (Principal::Admin, None) => Ok(Scope::All),
            (Principal::Admin, Some(name)) => {
                let id: WorkspaceId = name
                    .parse()
                    .map_err(|_| ApiError::workspace_not_found(name))?;
                if engine.contains(&id) {
                    Ok(Scope::One(id))
                } else {
                    Err(ApiError::workspace_not_found(name))
                }
            }
        }
    }

    /// Like [`scope`](Self::scope) for operations on exactly one workspace.
    pub fn workspace(
        &self,
        engine: &Engine,
        requested: Option<&str>,
    ) -> Result<WorkspaceId, ApiError> {
        match self.scope(engine, requested)? {
            Scope::One(id) => Ok(id),
            Scope::All => Err(ApiError::bad_request(
                "workspace_required",
                "the admin key acts on one workspace here: pass ?workspace=ID",
            )
            .with_param("workspace")),
        }
    }

    pub fn require_admin(&self, action: &str) -> Result<(), ApiError> {
        match &self.0 {
            Principal::Admin => Ok(()),
            Principal::Workspace(_) => {
                Err(ApiError::forbidden(format!("{action} needs the admin key")))
            }
        }
    }
}
