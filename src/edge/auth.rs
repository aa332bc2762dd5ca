//! Authentication at the edge: `Authorization: Bearer <key or token>`
//! becomes a [`Principal`], and a principal plus the workspace a request
//! names (`?workspace=` or the `X-Quotawatch-Workspace` header) and the
//! scope it needs becomes the workspace(s) it may act on. Keys are never
//! logged.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};

use super::error::ApiError;
use crate::domain::limits::WorkspaceId;
use crate::engine::{AuthError, Denied, Engine, Principal};
use crate::keys::Scope;

/// The header with which a service key (or any key) names the workspace
/// a request is for; the same as `?workspace=`.
pub const WORKSPACE_HEADER: &str = "x-quotawatch-workspace";

/// The authenticated caller, with the workspace its request named in the
/// header, if any.
pub struct Auth {
    pub principal: Principal,
    named: Option<String>,
}

/// Reads the bearer token of a request, if it sent one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Maps a presented key or token to a principal, or to the 401 that says
/// what is wrong. A key made through another instance since this one last
/// reloaded its catalog is found in the database (see
/// `Engine::authenticate`).
pub async fn authenticate(engine: &Engine, presented: Option<&str>) -> Result<Principal, ApiError> {
    let Some(presented) = presented.filter(|key| !key.is_empty()) else {
        return Err(ApiError::unauthorized(
            "missing_api_key",
            "no API key: send the header Authorization: Bearer <key>",
        ));
    };
    engine
        .authenticate(presented)
        .await
        .map_err(credential_refused)
}

/// The 401 for a key or token that does not authenticate.
pub fn credential_refused(error: AuthError) -> ApiError {
    match error {
        AuthError::Unknown => ApiError::unauthorized(
            "invalid_api_key",
            "the API key is not valid (it may have been revoked)",
        ),
        AuthError::Expired => ApiError::unauthorized(
            "expired_api_key",
            "the API key or token has expired; use a new one",
        ),
    }
}

impl<S> FromRequestParts<S> for Auth
where
    Arc<Engine>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let engine = Arc::<Engine>::from_ref(state);
        Auth::of(&parts.headers, &engine)
            .await
            .inspect_err(|error| {
                tracing::info!(path = %parts.uri.path(), code = error.code, "request refused: not authenticated");
            })
    }
}

/// Which workspaces a request addresses.
pub enum Target {
    One(WorkspaceId),
    All,
}

impl Auth {
    /// Authenticates the request's bearer credential and reads the header
    /// naming its workspace.
    pub async fn of(headers: &HeaderMap, engine: &Engine) -> Result<Self, ApiError> {
        let named = match headers.get(WORKSPACE_HEADER) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| {
                        ApiError::bad_request(
                            "invalid_value",
                            "the X-Quotawatch-Workspace header is not a workspace id",
                        )
                        .with_param("X-Quotawatch-Workspace")
                    })?
                    .to_owned(),
            ),
        };
        let principal = authenticate(engine, bearer(headers)).await?;
        Ok(Self { principal, named })
    }

    pub fn new(principal: Principal) -> Self {
        Self {
            principal,
            named: None,
        }
    }

    /// Resolves the workspace the request names (`?workspace=`, passed as
    /// `requested`, or the header) for an operation that needs `scope`:
    /// a workspace key acts on its own workspace only (naming any other
    /// answers 404, exactly like a workspace that does not exist) and only
    /// with its scopes (403 naming the missing one); a service key on a
    /// workspace it serves, which it must name; the admin key on any, or
    /// with none named on all.
    pub async fn target(
        &self,
        engine: &Engine,
        requested: Option<&str>,
        scope: Scope,
    ) -> Result<Target, ApiError> {
        let named = match (requested, self.named.as_deref()) {
            (Some(query), Some(header)) if query != header => {
                return Err(ApiError::bad_request(
                    "conflicting_workspace",
                    format!(
                        "?workspace={query} and the X-Quotawatch-Workspace header ({header}) name different workspaces"
                    ),
                )
                .with_param("workspace"));
            }
            (query, header) => query.or(header),
        };
        let id = match (named, &self.principal) {
            (None, Principal::Admin) => return Ok(Target::All),
            (None, Principal::Workspace { workspace, .. }) => workspace.clone(),
            (None, Principal::Service { .. }) => {
                return Err(ApiError::bad_request(
                    "workspace_required",
                    "a service key acts for a workspace the request names: send the header X-Quotawatch-Workspace: ID",
                )
                .with_param("X-Quotawatch-Workspace"));
            }
            (Some(name), _) => name
                .parse()
                .map_err(|_| ApiError::workspace_not_found(name))?,
        };
        match self.principal.may(scope, &id) {
            Ok(()) if engine.knows_workspace(&id).await => Ok(Target::One(id)),
            Ok(()) | Err(Denied::OtherWorkspace) => Err(ApiError::workspace_not_found(id.as_str())),
            Err(Denied::MissingScope(scope)) => Err(missing_scope(scope)),
        }
    }

    /// Like [`target`](Self::target) for operations on exactly one workspace.
    pub async fn workspace(
        &self,
        engine: &Engine,
        requested: Option<&str>,
        scope: Scope,
    ) -> Result<WorkspaceId, ApiError> {
        match self.target(engine, requested, scope).await? {
            Target::One(id) => Ok(id),
            Target::All => Err(ApiError::bad_request(
                "workspace_required",
                "the admin key acts on one workspace here: pass ?workspace=ID",
            )
            .with_param("workspace")),
        }
    }

    /// Refuses a workspace key (or token) without `scope`; other
    /// principals are checked when they name a workspace.
    pub fn require_scope(&self, scope: Scope) -> Result<(), ApiError> {
        match &self.principal {
            Principal::Workspace { scopes, .. } if !scopes.contains(scope) => {
                Err(missing_scope(scope))
            }
            _ => Ok(()),
        }
    }

    pub fn require_admin(&self, action: &str) -> Result<(), ApiError> {
        match &self.principal {
            Principal::Admin => Ok(()),
            Principal::Workspace { .. } | Principal::Service { .. } => {
                Err(ApiError::forbidden(format!("{action} needs the admin key")))
            }
        }
    }
}

/// The 403 for a key without the scope an operation needs.
fn missing_scope(scope: Scope) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "permission_error",
        "missing_scope",
        format!(
            "this key lacks the scope `{}` that this operation needs; create a key with it",
            scope.as_str()
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::HeaderValue;

    use super::*;
    use crate::domain::limits::{Limits, WorkspaceConfig};
    use crate::domain::workspace::Settings;
    use crate::engine::{SystemClock, WorkspaceDefaults};
    use crate::keys::Scopes;

    fn engine() -> Engine {
        let engine = Engine::new(
            Settings::default(),
            WorkspaceDefaults {
                limits: Limits::default(),
                warn_at: 0.8,
            },
            Arc::new(SystemClock),
        );
        for id in ["acme", "beta"] {
            engine.upsert_workspace(WorkspaceConfig::new(
                id.parse().expect("id"),
                Limits::default(),
            ));
        }
        engine
    }

    fn auth(principal: Principal, header: Option<&str>) -> Auth {
        Auth {
            principal,
            named: header.map(str::to_owned),
        }
    }

    fn reader(workspace: &str) -> Principal {
        Principal::Workspace {
            workspace: workspace.parse().expect("id"),
            scopes: Scopes::READ,
        }
    }

    fn service(workspaces: Option<&[&str]>) -> Principal {
        Principal::Service {
            key_id: "key_service".into(),
            workspaces: workspaces
                .map(|list| list.iter().map(|id| id.parse().expect("id")).collect()),
        }
    }

    async fn target(auth: &Auth, requested: Option<&str>, scope: Scope) -> Result<String, String> {
        match auth.target(&engine(), requested, scope).await {
            Ok(Target::One(id)) => Ok(id.to_string()),
            Ok(Target::All) => Ok("*".to_owned()),
            Err(error) => Err(error.code.to_owned()),
        }
    }

    #[tokio::test]
    async fn a_workspace_key_acts_on_its_own_workspace_within_its_scopes() {
        let key = auth(reader("acme"), None);
        assert_eq!(target(&key, None, Scope::Read).await, Ok("acme".into()));
        assert_eq!(
            target(&key, Some("acme"), Scope::Read).await,
            Ok("acme".into())
        );
        assert_eq!(
            target(&key, Some("beta"), Scope::Read).await,
            Err("workspace_not_found".into()),
            "another workspace is answered like one that does not exist"
        );
        assert_eq!(
            target(&key, None, Scope::Report).await,
            Err("missing_scope".into())
        );
        let header = auth(reader("acme"), Some("beta"));
        assert_eq!(
            target(&header, None, Scope::Read).await,
            Err("workspace_not_found".into())
        );
    }

    #[tokio::test]
    async fn a_service_key_must_name_a_workspace_it_serves() {
        let any = auth(service(None), None);
        assert_eq!(
            target(&any, None, Scope::Proxy).await,
            Err("workspace_required".into())
        );
        assert_eq!(
            target(&any, Some("beta"), Scope::Proxy).await,
            Ok("beta".into())
        );
        let named = auth(service(Some(&["acme"])), Some("acme"));
        assert_eq!(target(&named, None, Scope::Report).await, Ok("acme".into()));
        let elsewhere = auth(service(Some(&["acme"])), Some("beta"));
        assert_eq!(
            target(&elsewhere, None, Scope::Read).await,
            Err("workspace_not_found".into())
        );
        let missing = auth(service(None), Some("gone"));
        assert_eq!(
            target(&missing, None, Scope::Read).await,
            Err("workspace_not_found".into())
        );
        assert_eq!(
            target(&named, Some("beta"), Scope::Read).await,
            Err("conflicting_workspace".into()),
            "the query and the header must agree"
        );
    }

    #[tokio::test]
    async fn the_admin_key_acts_on_all_or_on_the_one_it_names() {
        let admin = auth(Principal::Admin, None);
        assert_eq!(target(&admin, None, Scope::Read).await, Ok("*".into()));
        assert_eq!(
            target(&admin, Some("beta"), Scope::Read).await,
            Ok("beta".into())
        );
        assert_eq!(
            target(&admin, Some("Not An Id"), Scope::Read).await,
            Err("workspace_not_found".into())
        );
    }

    #[tokio::test]
    async fn the_header_must_be_readable_text() {
        let mut headers = HeaderMap::new();
        headers.insert(
            WORKSPACE_HEADER,
            HeaderValue::from_bytes(b"acme\xff").expect("bytes"),
        );
        let error = Auth::of(&headers, &engine()).await.err().expect("refused");
        assert_eq!(error.code, "invalid_value");
        assert_eq!(error.param.as_deref(), Some("X-Quotawatch-Workspace"));
    }
}
