//! `/api/prices`: the model prices in force, and reading the operator's
//! price file again.

use axum::extract::State;

use super::AppState;
use super::dto::{PricesDoc, ReloadedDoc};
use crate::edge::auth::Auth;
use crate::edge::error::{ApiError, ErrorBody, Json};

#[utoipa::path(get, path = "/api/prices", tag = "prices",
    responses(
        (status = 200, description = "Every priced model, in USD per million tokens, with the day the prices were taken", body = PricesDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, _auth: Auth) -> Json<PricesDoc> {
    Json(PricesDoc::from(state.prices.current().as_ref()))
}

#[utoipa::path(post, path = "/api/prices/reload", tag = "prices",
    responses(
        (status = 200, description = "The price file was read again", body = ReloadedDoc),
        (status = 401, description = "Missing or invalid key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 422, description = "The price file cannot be used (the message names the model and field); the prices in force stay", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn reload(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<ReloadedDoc>, ApiError> {
    auth.require_admin("reading the price file again")?;
    let table = state.engine.reload_prices()?;
    Ok(Json(ReloadedDoc {
        models: table.len(),
        taken: table.taken.clone(),
    }))
}
