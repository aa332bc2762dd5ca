//! The dashboard (`/`, `/dashboard/*`) and the browser client library
//! (`/sdk/quota-client.js` with its TypeScript declarations), compiled into
//! the binary so that serving them needs nothing at run time.
//!
//! Files are answered with an `ETag` and `cache-control: no-cache`: browsers
//! revalidate on every load and get a 304 while the binary is unchanged, so
//! an upgrade is never hidden behind a stale cache. Every file carries a
//! Content-Security-Policy that allows only this origin's own scripts,
//! styles and connections: the dashboard holds keys, so injected markup must
//! not be able to run anything.

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::edge::error::ApiError;

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $file:literal, $content_type:expr) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $file)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("/", "dashboard/index.html", "text/html; charset=utf-8"),
    asset!(
        "/dashboard/style.css",
        "dashboard/style.css",
        "text/css; charset=utf-8"
    ),
    asset!("/dashboard/app.js", "dashboard/app.js", JS),
    asset!("/dashboard/alerts.js", "dashboard/alerts.js", JS),
    asset!("/dashboard/api.js", "dashboard/api.js", JS),
    asset!("/dashboard/chart.js", "dashboard/chart.js", JS),
    asset!("/dashboard/dialogs.js", "dashboard/dialogs.js", JS),
    asset!("/dashboard/dom.js", "dashboard/dom.js", JS),
    asset!("/dashboard/format.js", "dashboard/format.js", JS),
    asset!("/dashboard/toasts.js", "dashboard/toasts.js", JS),
    asset!("/dashboard/views.js", "dashboard/views.js", JS),
    asset!("/sdk/quota-client.js", "clients/js/quota-client.js", JS),
    asset!(
        "/sdk/quota-client.d.ts",
        "clients/js/quota-client.d.ts",
        "application/typescript; charset=utf-8"
    ),
];

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// Each asset's ETag: a digest of its bytes, computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|asset| {
                let digest = Sha256::digest(asset.body);
                format!("\"{}\"", hex::encode(&digest[..12]))
            })
            .collect()
    })
}

/// `GET /`, `/dashboard/{file}`, `/sdk/{file}`.
pub async fn serve(uri: Uri, request_headers: HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|asset| asset.path == uri.path()) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_route",
            format!("no file {}", uri.path()),
        )
        .into_response();
    };
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let fresh = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|candidate| candidate.trim() == etag);
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, value);
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
