//! Managing workspaces and keys: validation, the database write, and (when a
//! server is running in this process) the engine update. The REST admin API
//! and the CLI both go through here, so they accept and reject the same
//! things.

use std::sync::Arc;

use crate::domain::limits::{
    LimitKind, PerLimit, ValidationError, WorkspaceConfig, WorkspaceId, parse_timezone,
    validate_env_name, validate_limit, validate_name, validate_upstream_id, validate_warn_at,
};
use crate::domain::scope::{RuleInput, ScopedLimits};
use crate::domain::threshold::{AlertThresholds, ThresholdsInput};
use crate::engine::{Engine, WorkspaceDefaults};
use crate::keys::{KeyGrant, PlainKey, Scopes, new_id};
use crate::store::{KeyRecord, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("workspace {0} does not exist")]
    WorkspaceNotFound(WorkspaceId),
    #[error("no active key {key_id}{}", workspace.as_ref().map_or(String::new(), |id| format!(" in workspace {id}")))]
    KeyNotFound {
        /// The workspace it was looked for in; `None` among service keys or
        /// all keys.
        workspace: Option<WorkspaceId>,
        key_id: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(message) => AdminError::Conflict(message),
            other => AdminError::Store(other),
        }
    }
}

/// A change to one setting of a workspace: keep it as it is (on creation:
/// take the default), or set it. For a setting that may be absent, setting
/// it to `None` clears it: a limit becomes unlimited, an upstream key,
/// organization or project returns to the server's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Change<T> {
    #[default]
    Keep,
    Set(T),
}

/// A value given, or not (`None`: keep).
impl<T> From<Option<T>> for Change<T> {
    fn from(given: Option<T>) -> Self {
        given.map_or(Change::Keep, Change::Set)
    }
}

/// The settable parts of a workspace. Every field is optional: on creation
/// an absent field takes its default, on update it stays as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkspaceSpec {
    pub name: Option<String>,
    pub timezone: Option<String>,
    /// `Set(None)`: unlimited.
    pub limits: PerLimit<Change<Option<u64>>>,
    pub warn_at: Option<f64>,
    /// `Set(None)` returns the workspace to the server's upstream key.
    pub upstream_key_env: Change<Option<String>>,
    /// `Set(None)` returns the workspace to the upstream key's default.
    pub upstream_organization: Change<Option<String>>,
    pub upstream_project: Change<Option<String>>,
    /// `Set` replaces the scoped limits whole (an empty list removes them).
    pub scoped_limits: Change<Vec<RuleInput>>,
    /// Replaces the alert thresholds whole (what it leaves out takes the
    /// defaults).
    pub alert_thresholds: Option<ThresholdsInput>,
}

impl WorkspaceSpec {
    /// Applies this spec on top of `base`, validating every given field.
    pub fn apply_to(&self, mut base: WorkspaceConfig) -> Result<WorkspaceConfig, ValidationError> {
        if let Some(name) = &self.name {
            base.name = validate_name(name)?;
        }
        if let Some(timezone) = &self.timezone {
            base.timezone = parse_timezone(timezone)?;
        }
        for kind in LimitKind::ALL {
            if let Change::Set(value) = self.limits.get(kind) {
                base.limits.set(kind, validate_limit(kind, value)?);
            }
        }
        if let Some(warn_at) = self.warn_at {
            base.warn_at = validate_warn_at(warn_at)?;
        }
        if let Change::Set(env) = &self.upstream_key_env {
            base.upstream_key_env = env.as_deref().map(validate_env_name).transpose()?;
        }
        if let Change::Set(organization) = &self.upstream_organization {
            base.upstream_organization = organization
                .as_deref()
                .map(|id| validate_upstream_id("upstream_organization", id))
                .transpose()?;
        }
        if let Change::Set(project) = &self.upstream_project {
            base.upstream_project = project
                .as_deref()
                .map(|id| validate_upstream_id("upstream_project", id))
                .transpose()?;
        }
        if let Change::Set(rules) = &self.scoped_limits {
            base.scoped_limits = ScopedLimits::validate(rules)?;
        }
        if let Some(thresholds) = &self.alert_thresholds {
            base.alert_thresholds = AlertThresholds::validate(thresholds)?;
        }
        Ok(base)
    }
}

pub struct Admin {
    store: Store,
    engine: Option<Arc<Engine>>,
    defaults: WorkspaceDefaults,
    /// The server's environment, where the variables workspaces name for
    /// their upstream keys must be set; `None` where it is not known (the
    /// CLI runs in a process of its own).
    upstream_keys: Option<crate::keys::EnvLookup>,
    /// Workspaces declared in the configuration file, and the file: changed
    /// anywhere else, they would be set back at the next start.
    declared: Option<(std::collections::HashSet<WorkspaceId>, std::path::PathBuf)>,
}

impl Admin {
    /// `engine` is the running server's engine, if there is one in this
    /// process; the CLI has none and relies on the server polling the
    /// catalog generation.
    pub fn new(store: Store, engine: Option<Arc<Engine>>, defaults: WorkspaceDefaults) -> Self {
        Self {
            store,
            engine,
            defaults,
            upstream_keys: None,
            declared: None,
        }
    }

    /// Refuses changes to the workspaces the configuration declares, naming
    /// its file, instead of accepting what the next start would revert.
    pub fn with_declared(mut self, config: &crate::config::Config) -> Self {
        if let Some(file) = &config.workspaces_file {
            let ids = config
                .workspaces
                .iter()
                .filter_map(|(id, _)| id.parse().ok())
                .collect();
            self.declared = Some((ids, file.clone()));
        }
        self
    }

    fn not_declared(&self, id: &WorkspaceId) -> Result<(), AdminError> {
        match &self.declared {
            Some((ids, file)) if ids.contains(id) => Err(AdminError::Conflict(format!(
                "workspace {id} is declared in {}: change it there and restart quotawatch (a change made here would be reverted at the next start)",
                file.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses workspaces that name an upstream key variable not set in
    /// `env`: such a workspace could only fail each call it proxies.
    pub fn with_upstream_keys(mut self, env: crate::keys::EnvLookup) -> Self {
        self.upstream_keys = Some(env);
        self
    }

    /// `spec` applied to `base`, with an upstream key variable it names
    /// checked against the server's environment.
    fn apply(
        &self,
        spec: &WorkspaceSpec,
        base: WorkspaceConfig,
    ) -> Result<WorkspaceConfig, AdminError> {
        let config = spec.apply_to(base)?;
        if let (Some(env), Change::Set(Some(name))) = (&self.upstream_keys, &spec.upstream_key_env)
            && env(name).is_none_or(|key| key.is_empty())
        {
            return Err(ValidationError::new(
                "upstream_key_env",
                format!("{name} is not set in quotawatch's environment: set it (and restart quotawatch) before naming it"),
            )
            .into());
        }
        Ok(config)
    }

    fn now(&self) -> crate::domain::time::Timestamp {
        match &self.engine {
            Some(engine) => engine.now(),
            None => crate::engine::Clock::now(&crate::engine::SystemClock),
        }
    }

    /// Serialises this change with catalog reloads of a running engine.
    async fn lock(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.engine {
            Some(engine) => Some(engine.catalog_lock().await),
            None => None,
        }
    }

    fn note(&self, generation: i64) {
        if let Some(engine) = &self.engine {
            engine.note_own_change(generation);
        }
    }

    pub async fn list_workspaces(&self) -> Result<Vec<WorkspaceConfig>, AdminError> {
        Ok(self.store.load_catalog().await?.workspaces)
    }

    pub async fn workspace(&self, id: &WorkspaceId) -> Result<WorkspaceConfig, AdminError> {
        self.store
            .workspace(id)
            .await?
            .ok_or_else(|| AdminError::WorkspaceNotFound(id.clone()))
    }

    pub async fn create_workspace(
        &self,
        id: &str,
        spec: &WorkspaceSpec,
    ) -> Result<WorkspaceConfig, AdminError> {
        let id: WorkspaceId = id.parse()?;
        let mut base = WorkspaceConfig::new(id, self.defaults.limits);
        base.warn_at = self.defaults.warn_at;
        let config = self.apply(spec, base)?;
        let _catalog = self.lock().await;
        let generation = self.store.insert_workspace(&config, self.now()).await?;
        self.note(generation);
        if let Some(engine) = &self.engine {
            engine.upsert_workspace(config.clone());
        }
        tracing::info!(workspace = %config.id, "workspace created");
        Ok(config)
    }

    pub async fn update_workspace(
        &self,
        id: &WorkspaceId,
        spec: &WorkspaceSpec,
    ) -> Result<WorkspaceConfig, AdminError> {
        self.not_declared(id)?;
        let _catalog = self.lock().await;
        let config = self.apply(spec, self.workspace(id).await?)?;
        let generation = self
            .store
            .update_workspace(&config, self.now())
            .await?
            .ok_or_else(|| AdminError::WorkspaceNotFound(id.clone()))?;
        self.note(generation);
        if let Some(engine) = &self.engine {
            engine.upsert_workspace(config.clone());
        }
        tracing::info!(workspace = %config.id, "workspace updated");
        Ok(config)
    }

    /// Creates the workspace, or updates it to match `spec` if it exists
    /// (used for workspaces declared in the configuration file).
    pub async fn declare_workspace(
        &self,
        id: &str,
        spec: &WorkspaceSpec,
    ) -> Result<WorkspaceConfig, AdminError> {
        let parsed: WorkspaceId = id.parse()?;
        match self.store.workspace(&parsed).await? {
            Some(existing) if spec.apply_to(existing.clone())? == existing => Ok(existing),
            Some(_) => self.update_workspace(&parsed, spec).await,
            None => self.create_workspace(id, spec).await,
        }
    }

    pub async fn delete_workspace(&self, id: &WorkspaceId) -> Result<(), AdminError> {
        self.not_declared(id)?;
        let _catalog = self.lock().await;
        let generation = self
            .store
            .delete_workspace(id)
            .await?
            .ok_or_else(|| AdminError::WorkspaceNotFound(id.clone()))?;
        self.note(generation);
        if let Some(engine) = &self.engine {
            engine.remove_workspace(id);
        }
        tracing::info!(workspace = %id, "workspace deleted");
        Ok(())
    }

    /// Creates a key for a workspace. The plaintext is returned once and
    /// never stored.
    pub async fn create_key(
        &self,
        workspace: &WorkspaceId,
        spec: &KeySpec,
    ) -> Result<(KeyRecord, PlainKey), AdminError> {
        self.workspace(workspace).await?;
        let scopes = spec.scopes.unwrap_or(Scopes::ALL);
        if scopes.is_empty() {
            return Err(ValidationError::new(
                "scopes",
                "a key needs at least one scope of proxy, report and read",
            )
            .into());
        }
        let grant = KeyGrant::Workspace {
            workspace: workspace.clone(),
            scopes,
        };
        self.insert_key(grant, spec).await
    }

    /// Creates a service key, which acts for the workspaces in `workspaces`
    /// (any, if `None`) when a request names one.
    pub async fn create_service_key(
        &self,
        workspaces: Option<Vec<WorkspaceId>>,
        spec: &KeySpec,
    ) -> Result<(KeyRecord, PlainKey), AdminError> {
        if spec.scopes.is_some() {
            return Err(ValidationError::new(
                "scopes",
                "a service key has every scope for the workspaces it serves; restrict it with workspaces",
            )
            .into());
        }
        if let Some(list) = &workspaces {
            if list.is_empty() {
                return Err(ValidationError::new(
                    "workspaces",
                    "list at least one workspace, or leave workspaces out for any",
                )
                .into());
            }
            for workspace in list {
                self.workspace(workspace).await?;
            }
        }
        self.insert_key(KeyGrant::Service { workspaces }, spec)
            .await
    }

    async fn insert_key(
        &self,
        grant: KeyGrant,
        spec: &KeySpec,
    ) -> Result<(KeyRecord, PlainKey), AdminError> {
        let name = match &spec.name {
            Some(name) => validate_key_name(name)?,
            None => String::new(),
        };
        let now = self.now();
        let expires_at = match spec.expires_in_seconds {
            Some(seconds) if !(MIN_KEY_LIFETIME_S..=MAX_KEY_LIFETIME_S).contains(&seconds) => {
                return Err(ValidationError::new(
                    "expires_in",
                    format!(
                        "a key's lifetime is {MIN_KEY_LIFETIME_S} seconds to {MAX_KEY_LIFETIME_S} seconds (ten years); leave it out for a key that does not expire"
                    ),
                )
                .into());
            }
            Some(seconds) => Some(now.plus(std::time::Duration::from_secs(seconds))),
            None => None,
        };
        let key = PlainKey::generate();
        let record = KeyRecord {
            id: new_id("key"),
            grant,
            hash: key.hash(),
            prefix: key.display_prefix(),
            name,
            created_at: now,
            expires_at,
            last_used_at: None,
            revoked_at: None,
        };
        let _catalog = self.lock().await;
        let generation = self.store.insert_key(&record).await?;
        self.note(generation);
        if let Some(engine) = &self.engine {
            engine.add_key(&record);
        }
        tracing::info!(key_id = %record.id, workspace = %record.grant.workspace().map(ToString::to_string).unwrap_or_else(|| "(service)".into()), "key created");
        Ok((record, key))
    }

    /// Revokes a key: of `workspace`, or a service key when `None`.
    pub async fn revoke_key(
        &self,
        workspace: Option<&WorkspaceId>,
        key_id: &str,
    ) -> Result<(), AdminError> {
        let not_found = || AdminError::KeyNotFound {
            workspace: workspace.cloned(),
            key_id: key_id.to_owned(),
        };
        let _catalog = self.lock().await;
        let keys = self.store.list_keys(workspace).await?;
        let record = keys
            .iter()
            .find(|key| key.id == key_id && key.revoked_at.is_none())
            .ok_or_else(not_found)?;
        let generation = self
            .store
            .revoke_key(key_id, self.now())
            .await?
            .ok_or_else(not_found)?;
        self.note(generation);
        if let Some(engine) = &self.engine {
            engine.remove_key(&record.hash);
        }
        tracing::info!(key_id, "key revoked");
        Ok(())
    }

    /// Revokes a key of any kind by its id (for the command line, where a
    /// key is named by its id alone).
    pub async fn revoke_any_key(&self, key_id: &str) -> Result<(), AdminError> {
        let record =
            self.store
                .active_key_by_id(key_id)
                .await?
                .ok_or_else(|| AdminError::KeyNotFound {
                    workspace: None,
                    key_id: key_id.to_owned(),
                })?;
        self.revoke_key(record.grant.workspace(), key_id).await
    }

    /// The keys of a workspace, or the service keys when `None`, revoked
    /// ones included, newest first.
    pub async fn list_keys(
        &self,
        workspace: Option<&WorkspaceId>,
    ) -> Result<Vec<KeyRecord>, AdminError> {
        if let Some(workspace) = workspace {
            self.workspace(workspace).await?;
        }
        Ok(self.store.list_keys(workspace).await?)
    }
}

/// The shortest and longest lifetime a key may be given.
const MIN_KEY_LIFETIME_S: u64 = 60;
const MAX_KEY_LIFETIME_S: u64 = 10 * 365 * 24 * 3600;

/// What can be chosen when a key is made; every field is optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeySpec {
    /// What the key is for, shown in lists (up to 100 characters).
    pub name: Option<String>,
    /// For a workspace key; all three when not given.
    pub scopes: Option<Scopes>,
    /// The key stops working this long after it is made.
    pub expires_in_seconds: Option<u64>,
}

fn validate_key_name(name: &str) -> Result<String, ValidationError> {
    let trimmed = name.trim();
    if trimmed.chars().count() > 100 || trimmed.chars().any(char::is_control) {
        Err(ValidationError::new(
            "name",
            "a key's name is up to 100 characters, without control characters",
        ))
    } else {
        Ok(trimmed.to_owned())
    }
}
