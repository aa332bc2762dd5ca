//! The catalog (workspaces and keys) as other writers change it: another
//! instance or the CLI. Two paths keep this instance in line:
//!
//! - the follower polls the catalog generation every [`POLL_INTERVAL`] and
//!   reloads everything when it moved, so that a revoked key or a deleted
//!   workspace stops working here within that interval (plus one reload);
//! - a presented key this instance does not know is looked up in the
//!   database before it is refused, so that a key created elsewhere works
//!   here at the very next request, and its workspace is loaded as the
//!   follower would load it. Unknown keys are remembered for a while
//!   ([`NegativeCache`]) and lookups are rationed ([`LookupBudget`]), so
//!   that a flood of made-up keys cannot flood the database; beyond the
//!   ration an unknown key is refused as before, and the follower still
//!   brings a new key within its interval.
//!
//! Both take `Engine::catalog_lock`, like the admin operations, so a lookup
//! never applies a key that a reload running at the same time removed: a
//! revocation wins whichever runs first.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::keyring::Verdict;
use super::{AuthError, Credential, Engine, Principal};
use crate::domain::limits::WorkspaceId;
use crate::keys::KeyHash;
use crate::store::{GenerationWatch, Store};
use crate::sync::lock;

/// How often the catalog generation is read: a revocation made through
/// another instance holds here well within a second.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How many unknown keys are remembered, and for how long. Made-up keys are
/// all different, so this stops repeats; [`LookupBudget`] stops the rest.
const NEGATIVE_ENTRIES: usize = 4096;
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// How many database lookups of unknown keys may start per second (and at
/// once, after a quiet second). New keys are rare; a burst beyond this is
/// someone guessing.
const LOOKUPS_PER_SECOND: u32 = 20;

/// How long a request with an unknown key waits for its lookup (the catalog
/// lock, then the database) before it is refused; a key refused this way
/// still arrives with the next reload.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The catalog (workspaces and keys) as this instance follows it.
pub(super) struct CatalogSync {
    pub(super) keyring: std::sync::RwLock<super::keyring::Keyring>,
    /// The catalog generation this instance reflects (-1 before the first
    /// load).
    pub(super) generation: std::sync::atomic::AtomicI64,
    /// Serialises catalog changes made here with reloads of the catalog, so
    /// that a reload never applies a state older than a change already made.
    pub(super) lock: tokio::sync::Mutex<()>,
    /// Where keys this instance does not know are looked up, when it serves.
    pub(super) lookup: Option<KeyLookup>,
}

impl CatalogSync {
    pub(super) fn new() -> Self {
        Self {
            keyring: std::sync::RwLock::new(super::keyring::Keyring::default()),
            generation: std::sync::atomic::AtomicI64::new(-1),
            lock: tokio::sync::Mutex::new(()),
            lookup: None,
        }
    }
}

/// What a lookup looks for: a key by its hash, a token's minting key by its
/// id, or a workspace a service key names.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Wanted {
    Key(KeyHash),
    Minter(String),
    Workspace(WorkspaceId),
}

/// What this instance needs to find keys made elsewhere.
pub(super) struct KeyLookup {
    store: Store,
    unknown: std::sync::Mutex<NegativeCache>,
    budget: std::sync::Mutex<LookupBudget>,
    /// Database lookups made, for the metrics.
    lookups: AtomicU64,
}

impl KeyLookup {
    fn new(store: Store) -> Self {
        Self {
            store,
            unknown: std::sync::Mutex::new(NegativeCache::new(NEGATIVE_ENTRIES, NEGATIVE_TTL)),
            budget: std::sync::Mutex::new(LookupBudget::new(LOOKUPS_PER_SECOND)),
            lookups: AtomicU64::new(0),
        }
    }
}

/// Keys the database did not know, each for a limited time, at
/// most a fixed number of them: the oldest go first, in O(1).
struct NegativeCache {
    capacity: usize,
    ttl: Duration,
    until: HashMap<Wanted, Instant>,
    /// Insertion order, which is also expiry order since every entry lives
    /// the same time.
    order: VecDeque<(Instant, Wanted)>,
}

impl NegativeCache {
    fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity,
            ttl,
            until: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn contains(&mut self, wanted: &Wanted, now: Instant) -> bool {
        self.expire(now);
        self.until.contains_key(wanted)
    }

    fn insert(&mut self, wanted: Wanted, now: Instant) {
        self.expire(now);
        if self.until.contains_key(&wanted) {
            return;
        }
        while self.until.len() >= self.capacity {
            let Some((_, oldest)) = self.order.pop_front() else {
                break;
            };
            self.until.remove(&oldest);
        }
        let until = now + self.ttl;
        self.until.insert(wanted.clone(), until);
        self.order.push_back((until, wanted));
    }

    fn expire(&mut self, now: Instant) {
        while let Some((until, _)) = self.order.front() {
            if *until > now {
                break;
            }
            if let Some((_, wanted)) = self.order.pop_front() {
                self.until.remove(&wanted);
            }
        }
    }
}

/// A token bucket: `per_second` lookups a second, and as many at once after a
/// quiet second.
struct LookupBudget {
    per_second: u32,
    tokens: f64,
    refilled_at: Option<Instant>,
}

impl LookupBudget {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            tokens: f64::from(per_second),
            refilled_at: None,
        }
    }

    /// Takes one lookup from the budget, if there is one left.
    fn take(&mut self, now: Instant) -> bool {
        let capacity = f64::from(self.per_second);
        if let Some(at) = self.refilled_at {
            let earned = now.saturating_duration_since(at).as_secs_f64() * capacity;
            self.tokens = (self.tokens + earned).min(capacity);
        }
        self.refilled_at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Engine {
    /// Finds keys this instance does not know in `store` before refusing
    /// them. Called once, before the engine serves.
    pub fn look_up_keys_in(&mut self, store: Store) {
        self.catalog.lookup = Some(KeyLookup::new(store));
    }

    /// Database lookups of unknown keys since start-up.
    pub fn key_lookups(&self) -> u64 {
        self.catalog
            .lookup
            .as_ref()
            .map_or(0, |lookup| lookup.lookups.load(Ordering::Relaxed))
    }

    /// Maps a presented key or token to whom it speaks for, looking in the
    /// database for a key this instance does not know yet.
    pub async fn authenticate(&self, presented: &str) -> Result<Principal, AuthError> {
        self.find_principal(&Credential::of(presented)).await
    }

    /// Like [`authenticate`](Self::authenticate), for a credential kept
    /// from earlier (a WebSocket ticket's).
    pub async fn find_principal(&self, credential: &Credential) -> Result<Principal, AuthError> {
        let wanted = match self.verdict(credential) {
            Verdict::Known(result) => return result,
            Verdict::LookUpKey(hash) => Wanted::Key(hash),
            Verdict::LookUpMinter(id) => Wanted::Minter(id),
        };
        let known_meanwhile = || matches!(self.verdict(credential), Verdict::Known(_));
        if self.look_up(wanted, known_meanwhile).await {
            self.authenticate_known(credential)
        } else {
            Err(AuthError::Unknown)
        }
    }

    /// Whether the workspace exists, looking in the database for one made
    /// through another instance since this one last reloaded its catalog
    /// (a service key may name it at once), within the same bounds as keys.
    pub async fn knows_workspace(&self, id: &WorkspaceId) -> bool {
        self.contains(id)
            || self
                .look_up(Wanted::Workspace(id.clone()), || self.contains(id))
                .await
    }

    /// The slow path of authentication: looks `wanted` up in the database
    /// under the catalog lock, within the budget, and loads it; whether it
    /// was found. `known_meanwhile` tells whether another request loaded it
    /// while this one waited for the lock.
    async fn look_up(&self, wanted: Wanted, known_meanwhile: impl Fn() -> bool) -> bool {
        let Some(lookup) = self.catalog.lookup.as_ref() else {
            return false;
        };
        if lock(&lookup.unknown).contains(&wanted, Instant::now()) {
            return false;
        }
        let attempt = async {
            let _catalog = self.catalog_lock().await;
            if known_meanwhile() {
                return true;
            }
            let now = Instant::now();
            if lock(&lookup.unknown).contains(&wanted, now) || !lock(&lookup.budget).take(now) {
                return false;
            }
            lookup.lookups.fetch_add(1, Ordering::Relaxed);
            match self.load_from(&lookup.store, &wanted).await {
                Ok(true) => true,
                Ok(false) => {
                    lock(&lookup.unknown).insert(wanted, Instant::now());
                    false
                }
                Err(error) => {
                    tracing::warn!(%error, "could not look up an unknown key or workspace");
                    false
                }
            }
        };
        tokio::time::timeout(LOOKUP_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| {
                tracing::warn!("looking up an unknown key or workspace took too long; refused");
                false
            })
    }

    /// Loads an active key from the database, with its workspace if this
    /// instance does not have it yet (or a workspace alone); under the
    /// catalog lock. Whether it was found.
    async fn load_from(
        &self,
        store: &Store,
        wanted: &Wanted,
    ) -> Result<bool, crate::store::StoreError> {
        let record = match wanted {
            Wanted::Key(hash) => store.active_key(hash).await?,
            Wanted::Minter(id) => store.active_key_by_id(id).await?,
            Wanted::Workspace(id) => return self.load_workspace(store, id).await,
        };
        let Some(record) = record else {
            return Ok(false);
        };
        if let Some(workspace) = record.grant.workspace()
            && !self.contains(workspace)
            && !self.load_workspace(store, workspace).await?
        {
            return Ok(false);
        }
        tracing::debug!(key_id = %record.id, "key made elsewhere loaded");
        self.add_key(&record);
        Ok(true)
    }

    /// Loads a workspace from the database, as a reload would; whether it
    /// exists.
    async fn load_workspace(
        &self,
        store: &Store,
        id: &WorkspaceId,
    ) -> Result<bool, crate::store::StoreError> {
        let Some(config) = store.workspace(id).await? else {
            return Ok(false);
        };
        self.upsert_workspace(config);
        Ok(true)
    }

    /// Reloads workspaces and keys whenever someone else changed them, for
    /// the life of the server.
    pub async fn follow_catalog(self: Arc<Self>, store: Store) {
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut generations = store.generation_watch();
        loop {
            poll.tick().await;
            self.reload_catalog(&store, &mut generations).await;
        }
    }

    /// Reloads workspaces and keys if the catalog generation moved.
    async fn reload_catalog(&self, store: &Store, generations: &mut GenerationWatch) {
        let _catalog = self.catalog_lock().await;
        let generation = match generations.read().await {
            Ok(generation) => generation,
            Err(error) => {
                tracing::debug!(%error, "could not read the catalog generation");
                return;
            }
        };
        if generation == self.known_generation() {
            return;
        }
        match store.load_catalog().await {
            Ok(catalog) => self.apply_catalog(catalog),
            Err(error) => tracing::warn!(%error, "could not reload workspaces and keys"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> Wanted {
        Wanted::Key(KeyHash::of(&format!("qw_unknown_{n}")))
    }

    #[test]
    fn the_negative_cache_forgets_after_its_time() {
        let start = Instant::now();
        let mut cache = NegativeCache::new(10, Duration::from_secs(5));
        cache.insert(hash(1), start);
        assert!(cache.contains(&hash(1), start + Duration::from_secs(4)));
        assert!(!cache.contains(&hash(1), start + Duration::from_secs(5)));
        assert!(cache.until.is_empty() && cache.order.is_empty());
    }

    #[test]
    fn the_negative_cache_keeps_at_most_its_capacity_dropping_the_oldest() {
        let start = Instant::now();
        let mut cache = NegativeCache::new(3, Duration::from_secs(5));
        for n in 0..10 {
            cache.insert(hash(n), start + Duration::from_millis(u64::from(n)));
        }
        let now = start + Duration::from_millis(10);
        assert_eq!((cache.until.len(), cache.order.len()), (3, 3));
        assert!(!cache.contains(&hash(6), now));
        assert!((7..10).all(|n| cache.contains(&hash(n), now)));
    }

    #[test]
    fn the_budget_allows_its_rate_and_no_more() {
        let start = Instant::now();
        let mut budget = LookupBudget::new(20);
        let burst = (0..100).filter(|_| budget.take(start)).count();
        assert_eq!(burst, 20);
        let half_second = start + Duration::from_millis(500);
        let later = (0..100).filter(|_| budget.take(half_second)).count();
        assert_eq!(later, 10);
        let after_a_quiet_minute = start + Duration::from_secs(60);
        let refilled = (0..100)
            .filter(|_| budget.take(after_a_quiet_minute))
            .count();
        assert_eq!(refilled, 20);
    }
}
