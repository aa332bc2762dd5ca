//! The REST API: routes and JSON shapes for `/api/*`, the WebSocket, the
//! dashboard's files, metrics and the health endpoints. Authentication,
//! errors and refusals are `edge`'s, shared with the proxy.
//!
//! Architecture invariant: handlers stay thin. They authenticate, convert
//! JSON to engine types and back, and call the engine or the admin service;
//! rules about quotas live in `domain`, never here.

pub mod alerts;
mod assets;
pub mod credentials;
pub mod dto;
pub mod keys;
pub mod prices;
pub mod quota;
pub mod workspaces;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admin::Admin;
use crate::edge::auth;
use crate::edge::error::{ApiError, Json};
use crate::engine::Engine;
use crate::store::Store;

/// Everything handlers need, cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

pub struct AppParts {
    pub engine: Arc<Engine>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Sends alerts' test events through the dispatcher's path.
    pub alerts: Arc<crate::alerts::Alerts>,
    pub metrics_public: bool,
    pub store: Store,
    pub admin: Admin,
    pub tickets: ws::Tickets,
    pub hub: ws::Hub,
    pub ws_connections: Arc<ws::Connections>,
    /// Origins whose pages may use the API from a browser (CORS), and open
    /// the WebSocket; the server's own origin always may.
    pub cors_origins: Vec<String>,
    pub ws_ping_interval: Duration,
    pub openapi_json: String,
    /// The prices in force.
    pub prices: Arc<crate::prices::PriceBook>,
}

impl std::ops::Deref for AppState {
    type Target = AppParts;
    fn deref(&self) -> &AppParts {
        &self.0
    }
}

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

/// What `edge::auth::Auth` authenticates with.
impl axum::extract::FromRef<AppState> for Arc<Engine> {
    fn from_ref(state: &AppState) -> Self {
        state.engine.clone()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "quotawatch",
        description = "Watches and enforces OpenAI API quotas per workspace. Every error has OpenAI's shape: {\"error\":{\"message\",\"type\",\"param\",\"code\"}}."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "quota", description = "Status, checks, usage reports and live updates"),
        (name = "workspaces", description = "Admin: workspaces"),
        (name = "keys", description = "Workspace keys and service keys (admin), and browser tokens (service key or admin)"),
        (name = "credentials", description = "Admin: upstream credentials blocked by billing"),
        (name = "alerts", description = "Admin: alert channels (webhooks, Slack), their deliveries and test sends"),
        (name = "prices", description = "Model prices (any key) and reading the price file again (admin)"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A workspace key or service key (qw_...), a browser token (qwt_...), or the admin key. A service key names its workspace with the header X-Quotawatch-Workspace."))
                    .build(),
            ),
        );
    }
}

/// The `/api` routes with their OpenAPI description.
fn documented_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(quota::status))
        .routes(routes!(quota::notifications))
        .routes(routes!(quota::check))
        .routes(routes!(quota::usage))
        .routes(routes!(quota::reset))
        .routes(routes!(quota::history))
        .routes(routes!(quota::ws_ticket))
        .routes(routes!(ws::connect))
        .routes(routes!(workspaces::create, workspaces::list))
        .routes(routes!(
            workspaces::get,
            workspaces::update,
            workspaces::delete
        ))
        .routes(routes!(keys::create_key, keys::list_keys))
        .routes(routes!(keys::revoke_key))
        .routes(routes!(keys::create_service_key, keys::list_service_keys))
        .routes(routes!(keys::revoke_service_key))
        .routes(routes!(keys::mint_token))
        .routes(routes!(credentials::list))
        .routes(routes!(credentials::lift))
        .routes(routes!(alerts::create_channel, alerts::list_channels))
        .routes(routes!(
            alerts::get_channel,
            alerts::update_channel,
            alerts::delete_channel
        ))
        .routes(routes!(alerts::deliveries))
        .routes(routes!(alerts::test))
        .routes(routes!(prices::list))
        .routes(routes!(prices::reload))
        .routes(routes!(openapi))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// The OpenAPI document of every `/api` route, as JSON.
pub fn openapi_json() -> String {
    let (_, mut api) = documented_routes().split_for_parts();
    document_rejections(&mut api);
    api.to_pretty_json().unwrap_or_default()
}

/// The answers of the extractors themselves (`error::Json`, `error::Query`,
/// paths), which every operation that uses them can give whatever its handler
/// does: documented here once, so that no operation's list can miss one.
fn document_rejections(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    const BODY_REJECTIONS: &[(&str, &str)] = &[
        ("400", "The body is not valid JSON"),
        ("413", "The body is larger than QUOTAWATCH_MAX_BODY_BYTES"),
        (
            "415",
            "The body is not sent with Content-Type: application/json",
        ),
        ("422", "The body's fields are missing or of the wrong type"),
    ];
    const PARAMETER_REJECTIONS: &[(&str, &str)] =
        &[("400", "A query or path parameter cannot be read")];
    for item in api.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let mut rejections = Vec::new();
            if operation.request_body.is_some() {
                rejections.extend_from_slice(BODY_REJECTIONS);
            }
            if operation.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                rejections.extend_from_slice(PARAMETER_REJECTIONS);
            }
            for (status, description) in rejections {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| {
                        ResponseBuilder::new()
                            .description(description)
                            .content(
                                "application/json",
                                ContentBuilder::new()
                                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                                    .build(),
                            )
                            .into()
                    });
            }
        }
    }
}

/// The API's routes with their state; `edge::serve` adds the proxy's and
/// what every route shares.
pub fn router(state: AppState) -> Router {
    let (routes, _) = documented_routes().split_for_parts();
    routes
        .route("/metrics", axum::routing::get(metrics))
        .route("/", axum::routing::get(assets::serve))
        .route("/dashboard/{file}", axum::routing::get(assets::serve))
        .route("/sdk/{file}", axum::routing::get(assets::serve))
        .with_state(state)
}

#[utoipa::path(get, path = "/api/openapi.json", tag = "health",
    responses((status = 200, description = "This OpenAPI 3.1 document")))]
pub async fn openapi(State(state): State<AppState>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        state.openapi_json.clone(),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus metrics, for the admin key unless
/// `QUOTAWATCH_METRICS_PUBLIC` is set.
async fn metrics(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if !state.metrics_public {
        let principal = auth::authenticate(&state.engine, auth::bearer(&headers)).await?;
        if principal != crate::engine::Principal::Admin {
            return Err(ApiError::forbidden(
                "metrics need the admin key (or QUOTAWATCH_METRICS_PUBLIC=true)",
            ));
        }
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state.engine),
    )
        .into_response())
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    /// Why the service is not ready, when it is not.
    pub reason: Option<String>,
}

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        reason: None,
    })
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "The database answers and accepts writes", body = Health),
        (status = 503, description = "Not ready; `reason` says why", body = Health),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let problem = match state.store.probe(state.engine.now()).await {
        Err(error) => Some(format!("the database does not accept writes: {error}")),
        Ok(()) => state.engine.storage_problem(),
    };
    match problem {
        None => (
            StatusCode::OK,
            Json(Health {
                status: "ready",
                reason: None,
            }),
        ),
        // The reason is public and may quote a database or Redis error,
        // which can carry a URL with its password.
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "not_ready",
                reason: Some(crate::telemetry::mask_secrets(&reason).into_owned()),
            }),
        ),
    }
}
