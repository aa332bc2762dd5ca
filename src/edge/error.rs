//! Errors at the HTTP edge: every typed error from the layers below becomes a
//! status code and an OpenAI-shaped JSON body here, and only here. The JSON
//! and query extractors are wrapped so that malformed input gets the same
//! shape instead of axum's plain-text rejections.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admin::AdminError;
use crate::engine::EngineError;
use crate::history::HistoryError;
use crate::prices::PriceFileError;

/// An error answer: status, OpenAI-shaped body fields and extra headers.
/// Boxed, so that the `Result`s carrying it stay small.
#[derive(Debug)]
pub struct ApiError(Box<ErrorParts>);

#[derive(Debug)]
pub struct ErrorParts {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub headers: HeaderMap,
}

impl std::ops::Deref for ApiError {
    type Target = ErrorParts;
    fn deref(&self) -> &ErrorParts {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ErrorParts {
        &mut self.0
    }
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        error_type: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self(Box::new(ErrorParts {
            status,
            error_type,
            code,
            message: message.into(),
            param: None,
            headers: HeaderMap::new(),
        }))
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl AsRef<str>) -> Self {
        if let Ok(value) = HeaderValue::from_str(value.as_ref()) {
            self.headers.insert(name, value);
        }
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "admin_key_required",
            message,
        )
    }

    /// The same answer for a workspace that does not exist and one the
    /// caller may not see, so that existence does not leak.
    pub fn workspace_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "workspace_not_found",
            format!("workspace {id:?} does not exist"),
        )
        .with_param("workspace")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let parts = *self.0;
        let body = ErrorBody {
            error: ErrorDetail {
                message: parts.message,
                error_type: parts.error_type.to_owned(),
                param: parts.param,
                code: Some(parts.code.to_owned()),
            },
        };
        let mut response = (parts.status, axum::Json(body)).into_response();
        response.headers_mut().extend(parts.headers);
        response
    }
}

impl From<HistoryError> for ApiError {
    fn from(error: HistoryError) -> Self {
        match error {
            HistoryError::Engine(engine) => engine.into(),
            HistoryError::Store(_) => ApiError::internal(error.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match &error {
            EngineError::UnknownWorkspace(id) => ApiError::workspace_not_found(id.as_str()),
            EngineError::UnknownReservation(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "reservation_not_found",
                error.to_string(),
            )
            .with_param("reservation_id"),
            // A short outage of the shared counters: retrying soon helps.
            EngineError::SharedStore(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shared_store_unavailable",
                error.to_string(),
            )
            .with_header("x-should-retry", "true"),
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::Invalid(invalid) => {
                ApiError::bad_request("invalid_value", invalid.message).with_param(invalid.field)
            }
            AdminError::WorkspaceNotFound(id) => ApiError::workspace_not_found(id.as_str()),
            not_found @ AdminError::KeyNotFound { .. } => ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "key_not_found",
                not_found.to_string(),
            )
            .with_param("key_id"),
            AdminError::Conflict(message) => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "conflict",
                message,
            ),
            AdminError::Store(store) => {
                tracing::error!(error = %store, "database operation failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable_error",
                    "database_unavailable",
                    format!("the database could not complete the operation: {store}"),
                )
                .with_header("retry-after", "1")
            }
        }
    }
}

impl From<PriceFileError> for ApiError {
    fn from(error: PriceFileError) -> Self {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "invalid_price_file",
            error.to_string(),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let detail = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "invalid_field",
                format!("the JSON body does not have the expected fields or types: {detail}"),
            ),
            JsonRejection::JsonSyntaxError(_) => Self::bad_request(
                "invalid_json",
                format!("the body is not valid JSON: {detail}"),
            ),
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
                "send the body as JSON with the header Content-Type: application/json",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                "the request body is larger than this endpoint accepts (see QUOTAWATCH_MAX_BODY_BYTES)",
            ),
            other => Self::bad_request(
                "unreadable_body",
                format!("the body could not be read: {}", other.body_text()),
            ),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(
            "invalid_query",
            format!("the query string is invalid: {}", rejection.body_text()),
        )
    }
}

/// `axum::Json` with this API's error shape for bad input, taking only a
/// JSON object (see [`Object`]).
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(Object(value)) =
            <axum::Json<Object<T>> as FromRequest<S>>::from_request(req, state).await?;
        Ok(Json(value))
    }
}

/// A `T` read from a JSON object and nothing else. serde would also fill a
/// struct from an array, in the order of its fields (`"limits": [null]`
/// setting the first limit), which no client means and a hostile one could
/// use to slip past what a reader of the request sees.
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
            type Value = T;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(ObjectOnly(std::marker::PhantomData))
            .map(Object)
    }
}

/// For a field holding an optional struct: an object, `null` or nothing;
/// never an array (see [`Object`]).
pub fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<Object<T>>::deserialize(deserializer).map(|object| object.map(|Object(value)| value))
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(
            "invalid_path",
            format!("the URL path is invalid: {}", rejection.body_text()),
        )
    }
}

/// `axum::extract::Path` with this API's error shape for bad input.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` with this API's error shape for bad input.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// An optional JSON body: a request without a `Content-Type` is taken as
/// having none (as `curl -X POST` sends it); one with a body must be JSON.
impl<T, S> axum::extract::OptionalFromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(
        req: axum::extract::Request,
        state: &S,
    ) -> Result<Option<Self>, ApiError> {
        if !req.headers().contains_key(axum::http::header::CONTENT_TYPE) {
            return Ok(None);
        }
        <Json<T> as FromRequest<S>>::from_request(req, state)
            .await
            .map(Some)
    }
}

/// The error shape of every non-2xx answer, the same as OpenAI's.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ErrorDetail {
    /// What went wrong, for people.
    pub message: String,
    /// The error class, e.g. `invalid_request_error` or `requests`.
    #[serde(rename = "type")]
    pub error_type: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, e.g. `invalid_json` or `rate_limit_exceeded`.
    pub code: Option<String>,
}
