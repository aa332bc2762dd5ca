//! What both HTTP sides share, below them: the REST API (`api`) and the
//! proxy (`proxy`) authenticate (`auth`), answer errors (`error`) and
//! refusals (`refusal`) the same way, and neither imports the other. `serve`
//! puts their routes together under the layers every route gets: the body
//! limit, tracing, the draining of unread bodies (`drain`) and CORS.

pub mod auth;
mod drain;
pub mod error;
pub mod refusal;
pub mod scope;

use std::convert::Infallible;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::response::Response;
use tower::Service;

use error::ApiError;

/// The API's and the proxy's routes as one service.
pub fn serve(
    api: Router,
    proxy: Router,
    cors_origins: &[String],
    max_body_bytes: usize,
) -> impl Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone + Send + 'static
{
    // `with_state` makes every route's service once, here, rather than on
    // each request.
    let routes: Router = api
        .merge(proxy)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(());
    // The layers wrap the routes once, from the outside, as one concrete
    // service. Added with `Router::layer`, each would wrap every route in a
    // boxed service of its own, and every request would copy each box.
    tower::ServiceBuilder::new()
        .option_layer(cors_layer(cors_origins))
        .layer(drain::KeepConnectionUsable::layer())
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .service(routes)
}

/// Headers a page on another origin may read from answers beside the
/// workspace's `x-ratelimit-*` headroom (`refusal::RATELIMIT_HEADERS`):
/// what says whether and when to retry.
const EXPOSED_HEADERS: [&str; 4] = [
    "retry-after",
    "x-should-retry",
    "x-request-id",
    "x-quotawatch-overhead-ms",
];

/// CORS for the listed origins (exact matches); none when none are listed,
/// so that browsers keep pages of other origins out as they do by default.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer, ExposeHeaders};
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            // Keys travel in `Authorization`, which a wildcard does not
            // cover: the headers a preflight asks for are allowed by name.
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(ExposeHeaders::list(
                refusal::RATELIMIT_HEADERS
                    .iter()
                    .flatten()
                    .map(|header| header.ours.clone())
                    .chain(EXPOSED_HEADERS.map(HeaderName::from_static)),
            ))
            .max_age(std::time::Duration::from_secs(600)),
    )
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_route",
        format!(
            "no route {}; see GET /api/openapi.json for the API",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!(
            "{method} is not allowed on {}; see GET /api/openapi.json for the API",
            uri.path()
        ),
    )
}
