//! `/api/credentials`: the upstream credentials blocked by billing, for
//! operators, and lifting such a block for every workspace billed to the
//! credential at once.

use axum::extract::State;

use super::AppState;
use super::dto::{CredentialDoc, CredentialListDoc, LiftedDoc};
use crate::domain::credential::CredentialId;
use crate::edge::auth::Auth;
use crate::edge::error::{ApiError, ErrorBody, Json, Path};

#[utoipa::path(get, path = "/api/credentials", tag = "credentials",
    responses(
        (status = 200, description = "Every upstream credential blocked by billing, with its notification and the workspaces billed to it", body = CredentialListDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<CredentialListDoc>, ApiError> {
    auth.require_admin("listing upstream credentials")?;
    Ok(Json(CredentialListDoc {
        credentials: state
            .engine
            .blocked_credentials()
            .iter()
            .map(CredentialDoc::from)
            .collect(),
    }))
}

#[utoipa::path(post, path = "/api/credentials/{credential}/lift", tag = "credentials",
    params(("credential" = String, Path, description = "The credential's fingerprint, as listed (`cred_` and 16 hex digits)")),
    responses(
        (status = 200, description = "Lifted for every workspace billed to the credential, on every instance; `lifted` says whether it was blocked", body = LiftedDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 503, description = "Lifted on this instance only: the shared counters cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn lift(
    State(state): State<AppState>,
    auth: Auth,
    Path(credential): Path<String>,
) -> Result<Json<LiftedDoc>, ApiError> {
    auth.require_admin("lifting a credential's billing block")?;
    let credential = CredentialId::parse(&credential).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_credential",
            "a credential is named cred_ and 16 lowercase hex digits, as GET /api/credentials lists it",
        )
        .with_param("credential")
    })?;
    let lifted = state.engine.lift_credential(&credential).await?;
    Ok(Json(LiftedDoc {
        credential: credential.to_string(),
        lifted,
    }))
}
