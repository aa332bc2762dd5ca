//! The engine: every workspace's live state in memory, the keyring, and the
//! event stream that the WebSocket and other instances listen to.
//!
//! Request path, as it runs through here:
//! 1. `authenticate` maps a presented key to a principal (hash, then a
//!    constant-time comparison; a key made elsewhere is looked up, see
//!    `catalog`);
//! 2. `admit` admits or refuses under the workspace's lock, atomically
//!    across all its limits (on this instance's counters: `admit_here`);
//! 3. `settle` settles the reservation and folds in the upstream's answer
//!    (here: `settle_here`);
//! 4. changes are published as events while the workspace's lock is still
//!    held (so listeners see them in the order they happened), logged after
//!    it is released, and the workspace is marked dirty for the next batched
//!    flush (see `flush`). With counters shared by several instances, a
//!    raised notification and what follows it wait in the workspace's
//!    outbox until its id is agreed on with the others (see `redis_counting`).
//!
//! Architecture invariants: a workspace's lock is a plain mutex held only for
//! in-memory work, never across an await or IO; the request path never waits
//! for the database; publishing never blocks (a broadcast channel drops
//! stale events for slow listeners, who then resynchronise from a snapshot),
//! which is what makes sending under the lock safe.

mod catalog;
mod counters;
mod credentials;
pub mod flush;
mod keyring;
mod publish;
mod redis_counting;
mod slot;

pub use counters::Counters;
pub use credentials::{BlockedCredential, CredentialCall, CredentialResolver};
pub use keyring::{AuthError, Credential, Denied, Principal};
pub use redis_counting::OnStoreError;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use rustc_hash::FxHashMap;
use tokio::sync::broadcast;

use crate::domain::limits::{PerLimit, WorkspaceConfig, WorkspaceId};
use crate::domain::notification::{
    Notification, describe_storage_unavailable, describe_upstream_key_missing,
};
use crate::domain::price::{PriceTable, Tier, TokenCounts};
use crate::domain::scope::ScopeValues;
use crate::domain::spend::ModelSpend;
use crate::domain::time::{Timestamp, day_bounds};
use crate::domain::upstream::{ErrorFields, RateLimitHeaders, UpstreamClass};
use crate::domain::window::Usage;
use crate::domain::workspace::{
    Admission, Admitted, Answer, BillingScope, Headroom, Model, Outcome, Recorded, Refusal,
    Request, ResetScope, Settings, Settled, Snapshot, WorkspaceState,
};
use crate::keys::KeyHash;
use crate::prices::{PriceFileError, Pricing};
use crate::store::{Batch, Catalog, RollupDelta, RollupKey, saved_to_json};
use crate::sync::{lock, read, write};
use crate::tokens::{Minter, TokenClaims, TokenSecret};
use keyring::Verdict;
use publish::Touched;
use slot::{Cell, Slot, count, record_expired};

/// Where "now" comes from; tests substitute their own.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp::from_millis(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }
}

/// What listeners are told. Snapshots are taken when the change happens.
#[derive(Clone, Debug)]
pub enum Event {
    /// The status level or its reasons changed, or an admin reset or
    /// reconfigured the workspace.
    Status(Arc<Snapshot>),
    /// Usage moved; sent at most once per publishing interval per workspace.
    Usage(Arc<Snapshot>),
    /// A notification was raised, or resolved (then `resolved_at` is set).
    Notification(Arc<Notification>),
    /// The notification of an upstream credential's billing block was
    /// raised or resolved: one, service-wide, told to the listeners of each
    /// workspace billed to the credential.
    CredentialNotification(Arc<Notification>, Vec<WorkspaceId>),
    Removed(WorkspaceId),
    /// Keys were revoked or reloaded: holders of long-lived sessions
    /// (WebSockets) must check that their key still counts.
    CredentialsChanged,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("workspace {0} does not exist")]
    UnknownWorkspace(WorkspaceId),
    #[error(
        "reservation {0} is unknown, already settled, or expired (an expired reservation keeps its estimate)"
    )]
    UnknownReservation(String),
    #[error("the shared counters are unreachable: {0}")]
    SharedStore(String),
}

/// The answer to an admission check.
#[derive(Debug)]
pub struct Decision {
    pub result: Result<Admitted, Refusal>,
    pub headroom: Headroom,
    /// What is left of each configured limit after this decision.
    pub remaining: PerLimit<Option<u64>>,
    /// How the refusal names the scoped limit that refused (`end user
    /// "alice"`, `models gpt-4o, o3*`); `None` for the workspace's own.
    pub refused_scope: Option<String>,
}

/// The upstream account a workspace's calls are billed to: the variable
/// holding its key (`None` for the server's), and the organization and
/// project to name (`None` for the key's defaults). The credential it
/// makes, whose billing block its calls share with every workspace billed
/// to it, is named by the resolver (`Engine::resolve_credentials_with`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamAccount {
    pub key_env: Option<String>,
    pub organization: Option<String>,
    pub project: Option<String>,
}

/// Token counts of a finished request, as the upstream reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub reasoning: u64,
}

impl TokenUsage {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }

    /// The tokens a call is billed for (completion tokens count their
    /// reasoning tokens already).
    pub fn counts(&self) -> TokenCounts {
        TokenCounts {
            prompt: self.prompt,
            cached: self.cached,
            completion: self.completion,
        }
    }
}

/// A finished call, reported by the app (`POST /api/quota/usage`) or by the
/// proxy.
#[derive(Clone, Debug, Default)]
pub struct UsageReport {
    pub reservation: Option<u64>,
    pub model: Option<Model>,
    /// Its values for scoped limits, which a call without reservation is
    /// charged to.
    pub scoped: ScopeValues,
    /// `None` when the call's usage is unknown (a reservation then keeps its
    /// estimate).
    pub tokens: Option<TokenUsage>,
    /// What the upstream answered; `None` when the call ended before it said
    /// anything (the client went away).
    pub answer: Option<UpstreamAnswer>,
    pub latency_ms: Option<u64>,
    /// The processing tier the call asked for, which prices its tokens.
    pub tier: Tier,
}

impl UsageReport {
    /// What the call used of each metric, if its usage is known: its
    /// tokens, and their exact cost at `pricing`'s rates, rounded up to
    /// whole nano-dollars.
    fn used(&self, pricing: &Pricing) -> Option<Usage> {
        self.tokens
            .map(|tokens| pricing.usage(self.model.as_deref(), tokens.counts(), self.tier))
    }

    fn outcome(&self, pricing: &Pricing) -> Outcome<'_> {
        Outcome {
            reservation: self.reservation,
            usage: self.used(pricing),
            answer: self.answer.as_ref().map(UpstreamAnswer::as_answer),
            scoped: Some((self.model.as_deref(), &self.scoped)),
            tokens: self.tokens.map(|tokens| tokens.counts()),
        }
    }
}

/// The upstream's answer, owned (see [`crate::domain::workspace::Answer`]).
#[derive(Clone, Debug, Default)]
pub struct UpstreamAnswer {
    /// HTTP status; [`UpstreamAnswer::MISSING`] when there was no answer.
    pub status: u16,
    pub error_type: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub headers: RateLimitHeaders,
    /// What a billing answer blocks: the workspace (a call reported through
    /// the REST API) or the credential it was made with (a proxied call).
    pub billing: BillingScope,
}

impl UpstreamAnswer {
    /// The status of a call the upstream never answered in full: it could
    /// not be reached, timed out, or broke off its body. It counts as a
    /// server error.
    pub const MISSING: u16 = 0;

    /// A call without an answer; `kind` names why, for logs and history.
    pub fn missing(kind: &str, reason: &str, headers: RateLimitHeaders) -> Self {
        Self {
            status: Self::MISSING,
            error_type: Some(kind.to_owned()),
            error_message: Some(reason.to_owned()),
            headers,
            ..Self::default()
        }
    }

    pub fn is_missing(&self) -> bool {
        self.status == Self::MISSING
    }

    fn as_answer(&self) -> Answer<'_> {
        Answer {
            status: self.status,
            error: ErrorFields {
                error_type: self.error_type.as_deref(),
                code: self.error_code.as_deref(),
                message: self.error_message.as_deref(),
            },
            headers: self.headers,
            billing: self.billing,
        }
    }
}

/// What [`Engine::settle`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reported {
    /// What the upstream's answer meant, if there was one.
    pub class: Option<UpstreamClass>,
    /// The call named a reservation that was unknown, settled or expired:
    /// nothing was charged, though the upstream's answer still counted.
    pub missing_reservation: bool,
    /// What the call finally cost, in nano-dollars, as budgets count it.
    pub cost: u64,
}

/// Defaults for workspaces created without explicit limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkspaceDefaults {
    pub limits: crate::domain::limits::Limits,
    pub warn_at: f64,
}

#[derive(Default)]
struct ServiceHealth {
    storage: Option<Notification>,
    shared_store: Option<Notification>,
    upstream_key: Option<Notification>,
}

pub struct Engine {
    settings: Settings,
    defaults: WorkspaceDefaults,
    clock: Arc<dyn Clock>,
    /// Workspace ids are chosen by admins, not by callers, so the fast
    /// non-randomised hasher is safe here.
    slots: RwLock<FxHashMap<WorkspaceId, Arc<Slot>>>,
    /// Keys and the catalog as this instance knows them.
    catalog: catalog::CatalogSync,
    /// What happened: events for listeners, writes for the flush.
    journal: Journal,
    service: Mutex<ServiceHealth>,
    /// Where the counters live, chosen once at start-up.
    counters: counters::Counters,
    /// What calls cost, for their usd counts.
    pricing: Pricing,
    /// Billing blocks per upstream credential.
    credentials: credentials::Credentials,
    /// When the ticker last ran, in milliseconds (`i64::MIN`: never).
    last_tick: AtomicI64,
}

/// What the engine tells others: events for listeners (the WebSocket hub,
/// the metrics), and what the flush writes besides workspace states.
struct Journal {
    events: broadcast::Sender<Event>,
    /// Notification versions to write, in the order they happened.
    pending_notifications: Mutex<Vec<Notification>>,
    /// Keys used since the flush last took them, by id, with the time.
    key_uses: Mutex<HashMap<String, Timestamp>>,
    /// Held by the flush from taking a batch until it is written, and by
    /// history reads, so that a read never falls between the two: rows the
    /// flush took out of memory but has not committed yet would be in
    /// neither place.
    history_gate: tokio::sync::RwLock<()>,
    /// Rows the database refused and the flush dropped, since start-up.
    rows_dropped: AtomicU64,
    /// Signalled when the flush wrote notifications, and with them the
    /// alert events their first versions enqueue, for the dispatcher.
    alert_events: tokio::sync::Notify,
}

impl Journal {
    fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            events,
            pending_notifications: Mutex::new(Vec::new()),
            key_uses: Mutex::new(HashMap::new()),
            history_gate: tokio::sync::RwLock::new(()),
            rows_dropped: AtomicU64::new(0),
            alert_events: tokio::sync::Notify::new(),
        }
    }
}

/// How many events a listener may fall behind before it is told to resync.
const EVENT_CAPACITY: usize = 1024;

fn fresh_id() -> u64 {
    rand::random()
}

impl Engine {
    pub fn new(settings: Settings, defaults: WorkspaceDefaults, clock: Arc<dyn Clock>) -> Self {
        Self {
            settings,
            defaults,
            clock,
            slots: RwLock::new(FxHashMap::default()),
            catalog: catalog::CatalogSync::new(),
            journal: Journal::new(),
            service: Mutex::new(ServiceHealth::default()),
            counters: counters::Counters::InProcess,
            pricing: Pricing::built_in(),
            credentials: credentials::Credentials::default(),
            last_tick: AtomicI64::new(i64::MIN),
        }
    }

    /// Prices calls at `pricing` from now on (the built-in prices until
    /// then). Called once, by the assembly, before the engine serves.
    pub fn price_with(&mut self, pricing: Pricing) {
        self.pricing = pricing;
    }

    /// Reads the operator's price file again (see [`PriceBook::reload`]);
    /// every workspace's budget notifications and status use the new
    /// prices from now on, as every call's cost does.
    pub fn reload_prices(&self) -> Result<Arc<PriceTable>, PriceFileError> {
        let table = self.pricing.book.reload()?;
        self.use_prices(table.clone());
        Ok(table)
    }

    fn use_prices(&self, table: Arc<PriceTable>) {
        for (_, slot) in self.all_slots() {
            slot.lock().state.use_prices(table.clone());
        }
    }

    /// Sets each workspace's spend by model of its current periods to what
    /// history holds (`(workspace, time, model, spend)`: the database's
    /// daily rows and writes the flush still holds) and what it has not
    /// taken yet: at start-up, so that a restart keeps today's and this
    /// month's spend by model, and then now and again when other instances
    /// record calls too. The caller holds the flush back meanwhile (see
    /// [`flushing`](Self::flushing)), so that no row is in neither place.
    pub fn load_spend(&self, rows: Vec<(WorkspaceId, i64, String, ModelSpend)>) {
        let mut by_workspace: HashMap<WorkspaceId, Vec<(i64, String, ModelSpend)>> = HashMap::new();
        for (workspace, at, model, spend) in rows {
            by_workspace
                .entry(workspace)
                .or_default()
                .push((at, model, spend));
        }
        for (id, slot) in self.all_slots() {
            let mut cell = slot.lock();
            let cell = &mut *cell;
            cell.state.forget_spend();
            let stored = by_workspace.remove(&id).unwrap_or_default();
            let unflushed = cell.rollups.iter().filter_map(|((minute, model), delta)| {
                Some((*minute, model.clone()?, delta.spend()))
            });
            let stored = stored
                .into_iter()
                // Calls that named no model cost nothing and are left out.
                .filter(|(_, model, _)| !model.is_empty())
                .map(|(at, model, spend)| (at, Model::from(model), spend));
            for (at, model, spend) in stored.chain(unflushed) {
                if spend.usd > 0 || spend.prompt > 0 || spend.completion > 0 {
                    cell.state
                        .note_spend(Timestamp::from_millis(at), &model, spend);
                }
            }
        }
    }

    /// What calls cost: the REST API and the proxy estimate a call's cost
    /// at admission with it, and settlements count its exact cost.
    pub fn pricing(&self) -> &Pricing {
        &self.pricing
    }

    /// Notes that `workspace` called `model`, if the prices do not know it
    /// (see `WorkspaceState::note_unpriced`): whether or not the workspace
    /// has a usd limit, its spend counts the call at the unpriced rates,
    /// and the operator is told once what to add to the price file.
    fn note_unpriced(&self, workspace: &WorkspaceId, model: Option<&Model>) {
        let Some(model) = model.filter(|model| !self.pricing.knows(model)) else {
            return;
        };
        let Ok(slot) = self.slot(workspace) else {
            return;
        };
        let now = self.now();
        let mut cell = slot.lock();
        let changes = cell.state.note_unpriced(model, now);
        if !changes.is_empty() {
            self.conclude(&slot, cell, now, changes, Touched::STATE.with_status());
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn defaults(&self) -> WorkspaceDefaults {
        self.defaults
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.journal.events.subscribe()
    }

    fn slot(&self, workspace: &WorkspaceId) -> Result<Arc<Slot>, EngineError> {
        read(&self.slots)
            .get(workspace)
            .cloned()
            .ok_or_else(|| EngineError::UnknownWorkspace(workspace.clone()))
    }

    /// The slot of `workspace`, or every slot when it is `None`.
    fn one_or_all(
        &self,
        workspace: Option<&WorkspaceId>,
    ) -> Result<Vec<(WorkspaceId, Arc<Slot>)>, EngineError> {
        match workspace {
            Some(id) => Ok(vec![(id.clone(), self.slot(id)?)]),
            None => Ok(self.all_slots()),
        }
    }

    fn all_slots(&self) -> Vec<(WorkspaceId, Arc<Slot>)> {
        read(&self.slots)
            .iter()
            .map(|(id, slot)| (id.clone(), slot.clone()))
            .collect()
    }

    pub fn workspace_ids(&self) -> Vec<WorkspaceId> {
        let mut ids: Vec<WorkspaceId> = self.all_slots().into_iter().map(|(id, _)| id).collect();
        ids.sort();
        ids
    }

    pub fn contains(&self, workspace: &WorkspaceId) -> bool {
        self.slot(workspace).is_ok()
    }

    // ----- start-up and catalog -------------------------------------------

    /// Fills the engine from the database at start-up: workspaces with their
    /// saved state and active notifications, and the keyring.
    pub fn load(
        &self,
        catalog: Catalog,
        mut states: HashMap<WorkspaceId, crate::domain::workspace::Saved>,
        notifications: Vec<Notification>,
    ) {
        let now = self.now();
        let mut active: HashMap<WorkspaceId, Vec<Notification>> = HashMap::new();
        for notification in notifications {
            if let Some(workspace) = notification.workspace.clone() {
                active.entry(workspace).or_default().push(notification);
            } else if notification.is_active() {
                // A storage problem from a previous run that never got to be
                // resolved: this run wrote to the database, so it is over.
                let mut resolved = notification;
                resolved.resolved_at = Some(now);
                lock(&self.journal.pending_notifications).push(resolved);
            }
        }
        let mut slots = FxHashMap::default();
        for config in catalog.workspaces {
            let id = config.id.clone();
            let notifications = active.remove(&id).unwrap_or_default();
            let state = match states.remove(&id) {
                Some(saved) => WorkspaceState::restore(config, saved, notifications, now),
                None => WorkspaceState::new(config, now),
            };
            slots.insert(id, Slot::new(state));
        }
        *write(&self.slots) = slots;
        self.use_prices(self.pricing.book.current());
        self.replace_keys(&catalog.keys);
        self.catalog
            .generation
            .store(catalog.generation, Ordering::SeqCst);
    }

    /// Counts the model names the database already keeps for recent days
    /// (`(workspace, day start, model)`, oldest day first) against each
    /// day's cap, so that a restart does not open a day to new names.
    pub fn remember_models(&self, models: Vec<(WorkspaceId, i64, String)>) {
        for (workspace, day, model) in models {
            let Ok(slot) = self.slot(&workspace) else {
                continue;
            };
            let mut cell = slot.lock();
            let tz = cell.state.config().timezone;
            // Stored without a model means the call named none.
            let model = (!model.is_empty()).then(|| Model::from(model));
            cell.models.name(model, Timestamp::from_millis(day), tz);
        }
    }

    pub fn set_admin_key(&self, hash: KeyHash) {
        write(&self.catalog.keyring).set_admin(hash);
    }

    /// The secret browser tokens are signed with, the same on every
    /// instance.
    pub fn set_token_secret(&self, secret: TokenSecret) {
        write(&self.catalog.keyring).set_token_secret(secret);
    }

    fn replace_keys(&self, keys: &[crate::store::KeyRecord]) {
        write(&self.catalog.keyring).replace(keys);
        let _ = self.journal.events.send(Event::CredentialsChanged);
    }

    /// Held while changing the catalog (database and engine together) or
    /// reloading it.
    pub async fn catalog_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.catalog.lock.lock().await
    }

    /// The catalog generation this engine reflects.
    pub fn known_generation(&self) -> i64 {
        self.catalog.generation.load(Ordering::SeqCst)
    }

    /// Records that a change this engine made itself moved the catalog to
    /// `generation`. If another writer changed it in between, the generation
    /// is left behind so that the next poll reloads everything.
    pub fn note_own_change(&self, generation: i64) {
        let _ = self.catalog.generation.compare_exchange(
            generation - 1,
            generation,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Brings workspaces and keys in line with the database after another
    /// writer (the CLI, another instance) changed them.
    pub fn apply_catalog(&self, catalog: Catalog) {
        let now = self.now();
        let mut wanted: HashMap<WorkspaceId, WorkspaceConfig> = catalog
            .workspaces
            .into_iter()
            .map(|config| (config.id.clone(), config))
            .collect();
        for (id, _) in self.all_slots() {
            match wanted.remove(&id) {
                Some(config) => self.upsert_workspace(config),
                None => self.remove_workspace(&id),
            }
        }
        for (_, config) in wanted {
            self.upsert_workspace(config);
        }
        self.replace_keys(&catalog.keys);
        self.catalog
            .generation
            .store(catalog.generation, Ordering::SeqCst);
        tracing::debug!(generation = catalog.generation, at = %now, "catalog reloaded");
    }

    /// Adds a workspace, or applies new settings to an existing one.
    pub fn upsert_workspace(&self, config: WorkspaceConfig) {
        let now = self.now();
        let existing = self.slot(&config.id).ok();
        match existing {
            Some(slot) => {
                let mut cell = slot.lock();
                if *cell.state.config() == config {
                    return;
                }
                let id = config.id.clone();
                let changes = cell
                    .state
                    .reconfigure(config, now, &self.settings, &mut fresh_id);
                self.conclude(&slot, cell, now, changes, Touched::STATE.with_status());
                // Its upstream account may have changed with its settings.
                self.show_credential_block(&id);
            }
            None => {
                let id = config.id.clone();
                let mut state = WorkspaceState::new(config, now);
                state.use_prices(self.pricing.book.current());
                let snapshot = Arc::new(state.snapshot(now));
                write(&self.slots).insert(id.clone(), Slot::new(state));
                let _ = self.journal.events.send(Event::Status(snapshot));
                self.show_credential_block(&id);
            }
        }
    }

    pub fn remove_workspace(&self, id: &WorkspaceId) {
        let removed = write(&self.slots).remove(id);
        if removed.is_some() {
            write(&self.catalog.keyring).remove_workspace(id);
            let _ = self.journal.events.send(Event::Removed(id.clone()));
            let _ = self.journal.events.send(Event::CredentialsChanged);
        }
    }

    pub fn add_key(&self, record: &crate::store::KeyRecord) {
        write(&self.catalog.keyring).insert(record);
    }

    pub fn remove_key(&self, hash: &KeyHash) {
        write(&self.catalog.keyring).remove(hash);
        let _ = self.journal.events.send(Event::CredentialsChanged);
    }

    /// Keys used since the last call, with when, for the flush to record.
    pub fn take_key_uses(&self) -> HashMap<String, Timestamp> {
        std::mem::take(&mut *lock(&self.journal.key_uses))
    }

    /// Mints a browser token: read-only, for `workspace`, until
    /// `expires_at`, naming the key that mints it (`None` for the admin key).
    /// `None` before start-up set the signing secret.
    pub fn mint_token(
        &self,
        workspace: &WorkspaceId,
        minting_key: Option<&str>,
        expires_at: Timestamp,
    ) -> Option<String> {
        let keyring = read(&self.catalog.keyring);
        let minter = match minting_key {
            Some(id) => Minter::Key(id.to_owned()),
            None => keyring.admin_minter()?,
        };
        let claims = TokenClaims {
            workspace: workspace.clone(),
            minter,
            expires_at,
        };
        Some(keyring.token_secret()?.mint(&claims))
    }

    // ----- the request path -------------------------------------------------

    /// Authenticates a credential among the keys this instance knows (see
    /// [`authenticate`](Self::authenticate) for keys made elsewhere).
    pub fn authenticate_known(&self, credential: &Credential) -> Result<Principal, AuthError> {
        match self.verdict(credential) {
            Verdict::Known(result) => result,
            Verdict::LookUpKey(_) | Verdict::LookUpMinter(_) => Err(AuthError::Unknown),
        }
    }

    fn verdict(&self, credential: &Credential) -> Verdict {
        let now = self.now();
        let mut used = None;
        let verdict = read(&self.catalog.keyring).verdict(credential, now, &mut |id, at| {
            used = Some((id.to_owned(), at));
        });
        if let Some((id, at)) = used {
            lock(&self.journal.key_uses).insert(id, at);
        }
        verdict
    }

    /// [`admit`](Self::admit) on this process's counters: under the
    /// workspace's lock.
    pub fn admit_here(
        &self,
        workspace: &WorkspaceId,
        request: Request,
    ) -> Result<Decision, EngineError> {
        let slot = self.slot(workspace)?;
        let now = self.now();
        let mut cell = slot.lock();
        let admission = cell
            .state
            .admit(&request, now, &self.settings, &mut fresh_id);
        Ok(self.conclude_admission(
            &slot,
            cell,
            now,
            (request.model, &request.scoped),
            admission,
        ))
    }

    /// Refuses now what would be refused whatever it costs (see
    /// `WorkspaceState::refuses_any_request`), counted like any refusal;
    /// `None` when the request must be read and admitted as usual.
    pub fn refuse_early(&self, workspace: &WorkspaceId) -> Result<Option<Decision>, EngineError> {
        let slot = self.slot(workspace)?;
        let now = self.now();
        let mut cell = slot.lock();
        if !cell.state.refuses_any_request(now) {
            return Ok(None);
        }
        // The cheapest request there is, refused for the same reason as any.
        let cheapest = Request {
            estimate: Usage::call(1),
            model: None,
            settled_anywhere: false,
            scoped: ScopeValues::default(),
        };
        let admission = cell
            .state
            .admit(&cheapest, now, &self.settings, &mut fresh_id);
        debug_assert!(admission.result.is_err(), "refused whatever it costs");
        Ok(Some(self.conclude_admission(
            &slot,
            cell,
            now,
            (None, &ScopeValues::default()),
            admission,
        )))
    }

    /// What every admission does after the decision, wherever it was made:
    /// history, the answer's headroom, how a refusal names the scoped limit
    /// that refused (from the request's `model` and `scoped` values),
    /// events.
    fn conclude_admission(
        &self,
        slot: &Slot,
        mut cell: MutexGuard<'_, Cell>,
        now: Timestamp,
        (model, scoped): (Option<Model>, &ScopeValues),
        admission: Admission,
    ) -> Decision {
        let refused_scope = admission.result.as_ref().err().and_then(|refusal| {
            let rules = &cell.state.config().scoped_limits;
            Some(rules.describe(refusal.scope?, model.as_deref(), scoped))
        });
        let touched = if admission.result.is_err() {
            let refused = RollupDelta {
                refused: 1,
                ..RollupDelta::default()
            };
            cell.record_history(now, model, refused);
            Touched::STATE
        } else {
            Touched::USAGE
        };
        record_expired(&mut cell, admission.expired);
        let (headroom, remaining) = cell.state.room();
        let decision = Decision {
            headroom,
            remaining,
            result: admission.result,
            refused_scope,
        };
        self.conclude(slot, cell, now, admission.changes, touched);
        decision
    }

    /// Records a finished call: settles its reservation (or counts it as an
    /// unreserved request) and folds in the upstream's answer. It fails only
    /// for an unknown workspace; a missing reservation is part of the result.
    pub fn settle_here(
        &self,
        workspace: &WorkspaceId,
        report: UsageReport,
    ) -> Result<Reported, EngineError> {
        let slot = self.slot(workspace)?;
        let now = self.now();
        let mut cell = slot.lock();
        let recorded = cell.state.record(
            &report.outcome(&self.pricing),
            now,
            &self.settings,
            &mut fresh_id,
        );
        Ok(self.conclude_settlement(&slot, cell, now, workspace, &report, recorded))
    }

    /// What every report does after settling, wherever that happened:
    /// history, events, logs.
    fn conclude_settlement(
        &self,
        slot: &Slot,
        mut cell: MutexGuard<'_, Cell>,
        now: Timestamp,
        workspace: &WorkspaceId,
        report: &UsageReport,
        recorded: Recorded,
    ) -> Reported {
        record_expired(&mut cell, recorded.expired);
        let class = recorded.class;
        let failed = class.is_some_and(|class| class != UpstreamClass::Success);
        let settled = match recorded.settled {
            Settled::Reservation(reservation) => Some((reservation.charged_at, reservation.model)),
            Settled::Unreserved => Some((now, None)),
            // An expired reservation was counted in history when it expired.
            Settled::Missing => None,
        };
        let missing_reservation = settled.is_none();
        let cost = if missing_reservation {
            0
        } else {
            recorded.usage.usd
        };
        if let Some((charged_at, reserved_model)) = settled {
            let breakdown = report.tokens.unwrap_or_default();
            let status = report.answer.as_ref().map_or(200, |answer| answer.status);
            let delta = RollupDelta {
                requests: 1,
                tokens: count(recorded.usage.tokens),
                prompt_tokens: count(breakdown.prompt),
                completion_tokens: count(breakdown.completion),
                cached_tokens: count(breakdown.cached),
                reasoning_tokens: count(breakdown.reasoning),
                errors: i64::from(failed),
                client_errors: i64::from((400..500).contains(&status)),
                server_errors: i64::from(status == UpstreamAnswer::MISSING || status >= 500),
                refused: 0,
                latency_ms_sum: count(report.latency_ms.unwrap_or(0)),
                usd_nano: count(recorded.usage.usd),
            };
            let model = report.model.clone().or(reserved_model);
            cell.record_history(charged_at, model, delta);
        }
        self.conclude(slot, cell, now, recorded.changes, Touched::USAGE);
        if let (true, Some(answer)) = (failed, &report.answer) {
            tracing::warn!(
                workspace = %workspace,
                status = answer.status,
                class = ?class,
                code = answer.error_code.as_deref().unwrap_or(""),
                "upstream error"
            );
        }
        Reported {
            class,
            missing_reservation,
            cost,
        }
    }

    /// Whose upstream account the workspace's calls go to.
    pub fn upstream_account(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<UpstreamAccount, EngineError> {
        let slot = self.slot(workspace)?;
        let account = credentials::account_of(slot.lock().state.config());
        Ok(account)
    }

    pub fn snapshot(&self, workspace: &WorkspaceId) -> Result<Snapshot, EngineError> {
        let slot = self.slot(workspace)?;
        let now = self.now();
        let snapshot = slot.lock().state.snapshot(now);
        Ok(snapshot)
    }

    /// Snapshots of every workspace, worst status first, then by id.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        let now = self.now();
        let mut all: Vec<Snapshot> = self
            .all_slots()
            .into_iter()
            .map(|(_, slot)| slot.lock().state.snapshot(now))
            .collect();
        all.sort_by(|a, b| {
            b.status
                .cmp(&a.status)
                .then_with(|| a.config.id.cmp(&b.config.id))
        });
        all
    }

    /// Active notifications of a workspace, service-wide ones included.
    pub fn active_notifications(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<Vec<Notification>, EngineError> {
        let slot = self.slot(workspace)?;
        let mut notifications = self.service_notifications();
        notifications.extend(self.credential_notification(workspace));
        notifications.extend(slot.lock().agreed_notifications().cloned());
        notifications.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then_with(|| b.created_at.cmp(&a.created_at))
        });
        Ok(notifications)
    }

    /// Every workspace notification active here.
    pub fn active_workspace_notifications(&self) -> Vec<Notification> {
        self.all_slots()
            .into_iter()
            .flat_map(|(_, slot)| {
                slot.lock()
                    .agreed_notifications()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn service_notifications(&self) -> Vec<Notification> {
        let service = lock(&self.service);
        service
            .storage
            .iter()
            .chain(service.shared_store.iter())
            .chain(service.upstream_key.iter())
            .cloned()
            .collect()
    }

    /// Clears counters, blocks and active notifications of one workspace (or
    /// all), and pushes the new status.
    pub fn reset_here(
        &self,
        workspace: Option<&WorkspaceId>,
        scope: ResetScope,
    ) -> Result<Vec<WorkspaceId>, EngineError> {
        let targets = self.one_or_all(workspace)?;
        let now = self.now();
        let mut done = Vec::with_capacity(targets.len());
        for (id, slot) in targets {
            let mut cell = slot.lock();
            let changes = match scope {
                ResetScope::All => cell.state.reset(now),
                ResetScope::Usage => cell.state.reset_usage(now, &self.settings, &mut fresh_id),
                ResetScope::Blocks => cell.state.lift_blocks(now, &self.settings, &mut fresh_id),
            };
            self.conclude(&slot, cell, now, changes, Touched::USAGE.with_status());
            done.push(id);
        }
        Ok(done)
    }

    // ----- time and publishing ---------------------------------------------

    /// Lets time pass for every workspace: windows slide, blocks and
    /// reservations expire, statuses follow. Only workspaces that something
    /// touched since their last tick, or whose state changes by itself by
    /// now (`WorkspaceState::next_change_at`), are ticked: an idle
    /// workspace costs a comparison.
    pub fn tick(&self) {
        let now = self.now();
        let last_tick = self.last_tick.swap(now.millis(), Ordering::AcqRel);
        let due: Vec<Arc<Slot>> = read(&self.slots)
            .values()
            .filter(|slot| slot.tick_due(now))
            .cloned()
            .collect();
        for slot in due {
            let mut cell = slot.lock_to_tick();
            // A workspace skipped at the last tick rested until then (one
            // ticked then is not moved).
            if last_tick != i64::MIN {
                let rested = Timestamp::from_millis(last_tick).min(now);
                cell.state.rested_until(rested);
            }
            let (usage_changed, expired, changes) =
                cell.state.tick(now, &self.settings, &mut fresh_id);
            let touched = Touched {
                status: false,
                state: usage_changed || !expired.is_empty() || !changes.is_empty(),
                usage: usage_changed,
            };
            record_expired(&mut cell, expired);
            let next = cell.state.next_change_at(now, &self.settings);
            slot.tick_next_at(&cell, next);
            self.conclude(&slot, cell, now, changes, touched);
        }
    }

    /// Sends a usage event for every workspace whose usage moved since the
    /// last call. Called on a fixed interval, which bounds the event rate per
    /// workspace, and only while someone listens.
    pub fn publish_usage(&self) {
        let now = self.now();
        for (_, slot) in self.all_slots() {
            if slot.usage_dirty.swap(false, Ordering::AcqRel) {
                let mut cell = slot.lock();
                let usage = Event::Usage(Arc::new(cell.state.snapshot(now)));
                // Behind what waits for agreed ids, to keep the order.
                cell.outbox.push_back(usage);
                self.send_agreed(&mut cell);
            }
        }
    }

    // ----- persistence -------------------------------------------------------

    /// Finished requests of a workspace not yet written, by minute start.
    pub fn unflushed_rollups(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<Vec<(i64, RollupDelta)>, EngineError> {
        let slot = self.slot(workspace)?;
        let cell = slot.lock();
        Ok(cell
            .rollups
            .iter()
            .map(|((minute, _), delta)| (*minute, *delta))
            .collect())
    }

    /// Notification versions of a workspace (and service-wide ones) not yet
    /// written, newest version of each.
    pub fn unflushed_notifications(&self, workspace: &WorkspaceId) -> Vec<Notification> {
        let pending = lock(&self.journal.pending_notifications);
        let mut latest: Vec<Notification> = Vec::new();
        for notification in pending.iter().rev() {
            let concerns = notification
                .workspace
                .as_ref()
                .is_none_or(|w| w == workspace);
            if concerns && latest.iter().all(|n| n.id != notification.id) {
                latest.push(notification.clone());
            }
        }
        latest
    }

    /// Held while a batch is taken and written (see `history_gate`).
    pub async fn flushing(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.journal.history_gate.write().await
    }

    /// Tells the alert dispatcher that the flush wrote notifications: they
    /// may have enqueued alert events.
    pub fn note_notifications_written(&self) {
        self.journal.alert_events.notify_one();
    }

    /// Waits until the flush wrote notifications since the last wait
    /// ended (at once if it did meanwhile).
    pub async fn notifications_written(&self) {
        self.journal.alert_events.notified().await;
    }

    /// Held while history is read from the database and from memory.
    pub async fn reading_history(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.journal.history_gate.read().await
    }

    /// Takes everything changed since the last call, for the flush to write.
    pub fn take_batch(&self) -> Batch {
        let mut batch = Batch::default();
        for (id, slot) in self.all_slots() {
            if !slot.dirty.swap(false, Ordering::AcqRel) {
                continue;
            }
            let (saved, rollups, tz) = {
                let mut cell = slot.lock();
                (
                    cell.state.save(self.saves_scopes().then(|| self.now())),
                    std::mem::take(&mut cell.rollups),
                    cell.state.config().timezone,
                )
            };
            for ((minute, model), delta) in rollups {
                let (day, _) = day_bounds(Timestamp::from_millis(minute), tz);
                let key = RollupKey {
                    workspace: id.clone(),
                    minute,
                    day: day.millis(),
                    model: model.as_deref().unwrap_or_default().to_owned(),
                };
                *batch.rollups.entry(key).or_default() += delta;
            }
            batch.states.insert(id, saved_to_json(&saved));
        }
        let writes_workspace_notifications = self.writes_workspace_notifications();
        for notification in std::mem::take(&mut *lock(&self.journal.pending_notifications)) {
            if notification.workspace.is_some() && !writes_workspace_notifications {
                continue;
            }
            batch
                .notifications
                .insert(notification.id.clone(), notification);
        }
        batch
    }

    /// quotawatch was started without an upstream key of its own: raise the
    /// service-wide notification for operators (it lasts until a restart
    /// with a key). Tenants are not shown it: an installation that only
    /// takes reports over the REST API needs no key, and a `/v1` call that
    /// does gets a 503 that says so.
    pub fn upstream_key_missing(&self) {
        let mut service = lock(&self.service);
        if service.upstream_key.is_some() {
            return;
        }
        let notification =
            describe_upstream_key_missing(format!("ntf_{:016x}", fresh_id()), self.now());
        service.upstream_key = Some(notification.clone());
        drop(service);
        let _ = self
            .journal
            .events
            .send(Event::Notification(Arc::new(notification)));
    }

    /// The database refuses writes: raise the service-wide notification once.
    pub fn storage_failed(&self, error: &str) {
        let mut service = lock(&self.service);
        if service.storage.is_some() {
            return;
        }
        let notification =
            describe_storage_unavailable(format!("ntf_{:016x}", fresh_id()), error, self.now());
        tracing::error!(
            error,
            "database writes failing; enforcing from memory and retrying"
        );
        service.storage = Some(notification.clone());
        drop(service);
        let _ = self
            .journal
            .events
            .send(Event::Notification(Arc::new(notification)));
    }

    /// Writes succeed again: resolve the notification and keep it in history.
    pub fn storage_recovered(&self) {
        let Some(mut notification) = lock(&self.service).storage.take() else {
            return;
        };
        tracing::info!("database writes succeed again");
        notification.resolved_at = Some(self.now());
        lock(&self.journal.pending_notifications).push(notification.clone());
        let _ = self
            .journal
            .events
            .send(Event::Notification(Arc::new(notification)));
    }

    /// The flush dropped rows the database refused.
    pub fn count_dropped_rows(&self, count: u64) {
        self.journal
            .rows_dropped
            .fetch_add(count, Ordering::Relaxed);
    }

    /// Rows the database refused and the flush dropped, since start-up.
    pub fn dropped_rows(&self) -> u64 {
        self.journal.rows_dropped.load(Ordering::Relaxed)
    }

    /// Why the database is not usable, if it is not.
    pub fn storage_problem(&self) -> Option<String> {
        lock(&self.service)
            .storage
            .as_ref()
            .map(|notification| notification.message.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::credential::CredentialId;
    use crate::domain::limits::{LimitKind, Limits, Metric, Window};
    use crate::domain::notification::NotificationKind;

    /// A clock that stands still.
    struct StillClock(Timestamp);

    impl Clock for StillClock {
        fn now(&self) -> Timestamp {
            self.0
        }
    }

    fn engine_with(id: &str, requests_per_minute: u64) -> (Engine, WorkspaceId) {
        let clock = Arc::new(StillClock(Timestamp::from_millis(1_800_000_000_000)));
        let engine = Engine::new(
            Settings::default(),
            WorkspaceDefaults {
                limits: Limits::default(),
                warn_at: 0.8,
            },
            clock,
        );
        let id: WorkspaceId = id.parse().expect("id");
        let mut limits = Limits::default();
        limits.set(
            LimitKind::new(Metric::Requests, Window::Minute),
            Some(requests_per_minute),
        );
        engine.upsert_workspace(WorkspaceConfig::new(id.clone(), limits));
        (engine, id)
    }

    /// A clock that moves only when the test says.
    struct SetClock(AtomicI64);

    impl Clock for SetClock {
        fn now(&self) -> Timestamp {
            Timestamp::from_millis(self.0.load(Ordering::Relaxed))
        }
    }

    #[test]
    fn the_tick_skips_a_workspace_until_something_touches_it_or_its_next_change() {
        // 2027-01-15T08:00:00Z: the day ends 16 hours later, after the
        // day's rate has been watched for its horizon of an hour.
        let start = 1_800_000_000_000;
        let clock = Arc::new(SetClock(AtomicI64::new(start)));
        let engine = Engine::new(
            Settings::default(),
            WorkspaceDefaults {
                limits: Limits::default(),
                warn_at: 0.8,
            },
            clock.clone(),
        );
        let id: WorkspaceId = "idle".parse().expect("id");
        engine.upsert_workspace(WorkspaceConfig::new(id.clone(), Limits::default()));
        let slot = engine.slot(&id).expect("slot");
        let at = |millis: i64| Timestamp::from_millis(start + millis);
        assert!(slot.tick_due(at(0)), "a new workspace is due");
        engine.tick();
        let horizon = 3_600_000;
        assert!(!slot.tick_due(at(250)));
        assert!(!slot.tick_due(at(horizon - 1)));
        assert!(
            slot.tick_due(at(horizon)),
            "its forecasts' basis changes then"
        );

        // Anything that takes its lock makes it due at once.
        clock.0.store(start + 250, Ordering::Relaxed);
        engine.snapshot(&id).expect("snapshot");
        assert!(slot.tick_due(at(250)));
        engine.tick();
        assert!(!slot.tick_due(at(500)));

        clock.0.store(start + horizon, Ordering::Relaxed);
        engine.tick();
        let month_horizon = 6 * horizon;
        assert!(!slot.tick_due(at(month_horizon - 1)));
        assert!(
            slot.tick_due(at(month_horizon)),
            "the month's basis changes then"
        );
        clock.0.store(start + month_horizon, Ordering::Relaxed);
        engine.tick();
        let day_end = 16 * horizon;
        assert!(!slot.tick_due(at(day_end - 1)));
        assert!(slot.tick_due(at(day_end)), "a new day starts then");
    }

    fn request() -> Request {
        Request {
            scoped: Default::default(),
            estimate: Usage::call(100),
            model: Some("gpt-4o-mini".into()),
            settled_anywhere: false,
        }
    }

    /// The events sent so far, without waiting.
    fn sent(events: &mut broadcast::Receiver<Event>) -> Vec<Event> {
        std::iter::from_fn(|| events.try_recv().ok()).collect()
    }

    #[test]
    fn an_admission_and_its_settlement_reach_the_flush_and_listeners() {
        let (engine, id) = engine_with("acme", 10);
        let _ = engine.take_batch();
        let mut events = engine.subscribe();
        let admitted = engine
            .admit_here(&id, request())
            .expect("known")
            .result
            .expect("admitted");
        let batch = engine.take_batch();
        assert!(batch.states.contains_key(&id), "the state is written");
        engine.publish_usage();
        assert!(
            sent(&mut events)
                .iter()
                .any(|event| matches!(event, Event::Usage(_))),
            "listeners hear that usage moved"
        );
        engine
            .settle_here(
                &id,
                UsageReport {
                    scoped: Default::default(),
                    reservation: Some(admitted.id),
                    model: None,
                    tokens: Some(TokenUsage {
                        prompt: 30,
                        completion: 12,
                        cached: 0,
                        reasoning: 0,
                    }),
                    answer: None,
                    latency_ms: Some(5),
                    tier: Tier::Standard,
                },
            )
            .expect("known");
        let history: i64 = engine
            .take_batch()
            .rollups
            .values()
            .map(|delta| delta.tokens)
            .sum();
        assert_eq!(history, 42, "the call's tokens go to history");
        assert!(engine.take_batch().is_empty(), "and only once");
    }

    #[test]
    fn a_refusal_raises_one_notification_and_the_status_follows() {
        let (engine, id) = engine_with("acme", 1);
        let mut events = engine.subscribe();
        let admitted = |engine: &Engine| {
            engine
                .admit_here(&id, request())
                .expect("known")
                .result
                .is_ok()
        };
        assert_eq!(
            [admitted(&engine), admitted(&engine), admitted(&engine)],
            [true, false, false]
        );
        let kinds: Vec<&'static str> = sent(&mut events)
            .iter()
            .filter_map(|event| match event {
                Event::Status(_) => Some("status"),
                Event::Notification(notification) => Some(notification.kind.name()),
                _ => None,
            })
            .collect();
        let raised = kinds.iter().filter(|kind| **kind == "rate_limited").count();
        assert_eq!(raised, 1, "one notification per cause: {kinds:?}");
        // The status event comes with the change set that raised it, after
        // its notifications, so a page that redraws on it has them all.
        let notification = kinds.iter().position(|kind| *kind == "rate_limited");
        let status_after = kinds.iter().rposition(|kind| *kind == "status");
        assert!(notification < status_after, "{kinds:?}");
        let written = engine
            .take_batch()
            .notifications
            .values()
            .filter(|n| n.kind == NotificationKind::RateLimited)
            .count();
        assert_eq!(written, 1, "written once");
    }

    #[test]
    fn a_reset_tells_listeners_even_when_nothing_changed() {
        let (engine, id) = engine_with("acme", 10);
        let mut events = engine.subscribe();
        engine
            .reset_here(Some(&id), ResetScope::All)
            .expect("known");
        assert!(
            sent(&mut events)
                .iter()
                .any(|event| matches!(event, Event::Status(_))),
            "a status event, so that every page shows the reset"
        );
        assert!(engine.take_batch().states.contains_key(&id));
    }

    #[test]
    fn a_billing_answer_blocks_every_workspace_on_its_credential_with_one_notification() {
        use crate::domain::upstream::BillingCode;
        use crate::domain::workspace::RefusalCause;
        use futures_util::FutureExt;

        let (engine, acme) = engine_with("acme", 10);
        let engine = Arc::new(engine);
        engine.resolve_credentials_with(Box::new(|account: &UpstreamAccount| {
            Some(CredentialId::of(
                "sk-test",
                account.organization.as_deref(),
                account.project.as_deref(),
            ))
        }));
        let beta: WorkspaceId = "beta".parse().expect("id");
        let other: WorkspaceId = "other".parse().expect("id");
        engine.upsert_workspace(WorkspaceConfig::new(beta.clone(), Limits::default()));
        let mut elsewhere = WorkspaceConfig::new(other.clone(), Limits::default());
        elsewhere.upstream_organization = Some("org-elsewhere".to_owned());
        engine.upsert_workspace(elsewhere);
        let credential_of =
            |id: &WorkspaceId| engine.credential_of(&engine.upstream_account(id).expect("known"));
        let credential = credential_of(&acme).expect("a credential");
        assert_eq!(credential_of(&beta), Some(credential.clone()));
        assert_ne!(credential_of(&other), Some(credential.clone()));
        let _ = engine.take_batch();

        let mut events = engine.subscribe();
        let call = CredentialCall {
            credential: credential.clone(),
            admitted_at: engine.now(),
        };
        let billing = Some(UpstreamClass::QuotaExhausted(
            BillingCode::InsufficientQuota,
        ));
        engine.observe_credential(&call, billing);
        // Another workspace's call meeting the same answer adds nothing.
        engine.observe_credential(&call, billing);
        let told: Vec<(Arc<Notification>, Vec<WorkspaceId>)> = sent(&mut events)
            .into_iter()
            .filter_map(|event| match event {
                Event::CredentialNotification(notification, workspaces) => {
                    Some((notification, workspaces))
                }
                _ => None,
            })
            .collect();
        assert_eq!(told.len(), 1, "one notification for the credential");
        let (notification, workspaces) = &told[0];
        assert_eq!(workspaces, &vec![acme.clone(), beta.clone()]);
        assert_eq!(notification.workspace, None);
        assert_eq!(notification.kind, NotificationKind::UpstreamQuotaExhausted);
        assert_eq!(
            notification.severity,
            crate::domain::notification::Severity::Critical
        );
        let batch = engine.take_batch();
        assert_eq!(batch.notifications.len(), 1, "written once");

        let pass = |id: &WorkspaceId, credential: &CredentialId| {
            engine
                .pass_credential(id, credential)
                .now_or_never()
                .expect("in process, nothing waits")
                .expect("known workspace")
        };
        for id in [&acme, &beta] {
            let refused = pass(id, &credential).expect("refused");
            let refusal = refused.result.expect_err("refused");
            assert_eq!(
                refusal.cause,
                RefusalCause::UpstreamQuota(BillingCode::InsufficientQuota)
            );
            assert!(!refusal.retryable);
            let snapshot = engine.snapshot(id).expect("known");
            assert_eq!(
                snapshot.status,
                crate::domain::status::Status::QuotaExceeded
            );
            assert_eq!(snapshot.reasons, vec!["upstream_insufficient_quota"]);
            let active = engine.active_notifications(id).expect("known");
            assert_eq!(active.len(), 1);
            assert_eq!(active[0].id, notification.id);
        }
        let own = credential_of(&other).expect("a credential");
        assert!(pass(&other, &own).is_none(), "another credential is open");
        assert!(
            engine
                .active_notifications(&other)
                .expect("known")
                .is_empty()
        );

        // An admin's lift resumes both and resolves the one notification.
        let lifted = engine
            .lift_credential(&credential)
            .now_or_never()
            .expect("in process, nothing waits");
        assert_eq!(lifted, Ok(true));
        for id in [&acme, &beta] {
            assert!(pass(id, &credential).is_none());
            assert_eq!(
                engine.snapshot(id).expect("known").status,
                crate::domain::status::Status::Normal
            );
        }
        let resolved: Vec<Notification> = engine.take_batch().notifications.into_values().collect();
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].id, notification.id);
        assert!(resolved[0].resolved_at.is_some());
    }
}
