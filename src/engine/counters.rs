//! Where the counters live, chosen once at start-up, and the one path of
//! each operation on them: `admit`, `settle`, `reset`, `refresh`. Callers
//! (the REST API, the proxy, the admin service) use these and never learn
//! which counters answered.
//!
//! In this process, an operation runs under the workspace's lock on its
//! `WorkspaceState` (`admit_here`, `settle_here`, `reset_here`). In Redis
//! (`redis_counting`), one script call decides and its answer is loaded
//! into the same state, so that status, notifications and headers come from
//! the same rules; that implementation owns its fallback for when Redis
//! cannot be reached.

use std::sync::Arc;

use super::redis_counting::{OnStoreError, RedisCounting};
use super::{Decision, Engine, EngineError, Reported, UsageReport};
use crate::domain::limits::{WorkspaceConfig, WorkspaceId};
use crate::domain::workspace::{Request, ResetScope};
use crate::redis::RedisCounters;

/// Where a workspace's counters live.
pub enum Counters {
    /// In this process: one instance alone.
    InProcess,
    /// In Redis, shared by every instance that names the same server.
    Redis(Arc<RedisCounting>),
}

impl Counters {
    /// Counters in Redis, through `client`; `on_error` says what to do
    /// while it cannot be reached.
    pub fn redis(client: RedisCounters, on_error: OnStoreError) -> Self {
        Counters::Redis(Arc::new(RedisCounting::new(client, on_error)))
    }

    /// Cut off from counters shared with other instances: limits are
    /// enforced by this instance alone, as its fallback says.
    fn degraded(&self) -> bool {
        match self {
            Counters::InProcess => false,
            Counters::Redis(redis) => redis.degraded(),
        }
    }
}

impl Engine {
    /// Whether these counters enforce `workspace`'s scoped limits. Those in
    /// Redis do not yet, so a workspace with scoped limits is refused
    /// there (by the admin API and at start-up) rather than counted
    /// without them.
    pub fn counts_scoped_limits(&self, workspace: &WorkspaceConfig) -> bool {
        matches!(self.counters, Counters::InProcess) || workspace.scoped_limits.is_empty()
    }

    /// Whether other instances count this instance's workspaces too (the
    /// counters live in Redis), so that what they record reaches this
    /// instance only through the database.
    pub fn shares_workspaces(&self) -> bool {
        matches!(self.counters, Counters::Redis(_))
    }

    /// Keeps the counters in `counters` from now on. Called once, by the
    /// assembly, before the engine serves.
    pub fn count_in(&mut self, counters: Counters) {
        self.counters = counters;
    }

    /// Admission: reserves one request and the estimate of every other
    /// metric against every limit of the workspace, or refuses without
    /// charging anything.
    pub async fn admit(
        &self,
        workspace: &WorkspaceId,
        request: Request,
    ) -> Result<Decision, EngineError> {
        self.note_unpriced(workspace, request.model.as_ref());
        match &self.counters {
            Counters::InProcess => self.admit_here(workspace, request),
            Counters::Redis(redis) => self.admit_in_redis(redis, workspace, request).await,
        }
    }

    /// Settlement: settles the call's reservation (or counts it as one
    /// request, if it had none) and folds in the upstream's answer. It
    /// fails only for an unknown workspace; a missing reservation is part
    /// of the result.
    pub async fn settle(
        &self,
        workspace: &WorkspaceId,
        report: UsageReport,
    ) -> Result<Reported, EngineError> {
        self.note_unpriced(workspace, report.model.as_ref());
        match &self.counters {
            Counters::InProcess => self.settle_here(workspace, report),
            Counters::Redis(redis) => self.settle_in_redis(redis, workspace, report).await,
        }
    }

    /// Resets one workspace (or all) wherever its counters live. Lifting
    /// its blocks (or all it has) lifts the block of the credential it is
    /// billed to as well, for every workspace billed to it: an admin lifts
    /// a billing block once billing is fixed, which concerns the account.
    pub async fn reset(
        &self,
        workspace: Option<&WorkspaceId>,
        scope: ResetScope,
    ) -> Result<Vec<WorkspaceId>, EngineError> {
        let done = match &self.counters {
            Counters::InProcess => self.reset_here(workspace, scope),
            Counters::Redis(redis) => self.reset_in_redis(redis, workspace, scope).await,
        }?;
        if scope != ResetScope::Usage {
            self.lift_credentials_of(workspace.map(std::slice::from_ref))
                .await;
        }
        Ok(done)
    }

    /// Brings a workspace's state up to its counters, so that what it shows
    /// includes what other instances counted.
    pub async fn refresh(&self, workspace: &WorkspaceId) -> Result<(), EngineError> {
        match &self.counters {
            Counters::InProcess => self.slot(workspace).map(drop),
            Counters::Redis(redis) => self.refresh_from_redis(redis, workspace).await,
        }
    }

    /// Settles a call whose end is noticed outside async code (a response
    /// body dropped): at once with in-process counters, or in a task of its
    /// own with Redis (at once and locally when no runtime is left to run
    /// one, at shutdown). `then` gets the result either way.
    pub fn settle_detached(
        self: &Arc<Self>,
        workspace: WorkspaceId,
        report: UsageReport,
        then: impl FnOnce(Result<Reported, EngineError>) + Send + 'static,
    ) {
        match (&self.counters, tokio::runtime::Handle::try_current()) {
            (Counters::Redis(_), Ok(runtime)) => {
                let engine = Arc::clone(self);
                runtime.spawn(async move { then(engine.settle(&workspace, report).await) });
            }
            _ => then(self.settle_here(&workspace, report)),
        }
    }

    /// [`settle`](Self::settle), carried to its end even if its caller
    /// stops waiting (see [`to_the_end`](Self::to_the_end)).
    pub async fn settle_to_the_end(
        self: &Arc<Self>,
        workspace: WorkspaceId,
        report: UsageReport,
    ) -> Result<Reported, EngineError> {
        let engine = Arc::clone(self);
        self.to_the_end(async move { engine.settle(&workspace, report).await })
            .await
    }

    /// Runs `work` that settles calls to its end even if its caller stops
    /// waiting (a client that leaves): Redis may apply a settlement after
    /// that, and the call must still count here. So work that travels to
    /// Redis runs as a task of its own; in this process, settling never
    /// waits, and nothing can stop it halfway.
    pub async fn to_the_end<F>(&self, work: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if let Counters::InProcess = self.counters {
            return work.await;
        }
        match tokio::spawn(work).await {
            Ok(output) => output,
            // Nothing cancels it: what can end it early is a panic, passed on.
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    /// Called by the ticker: with Redis, agrees on notification ids, tries
    /// Redis again while cut off from it, and adds what was counted alone
    /// once it is back. Requests never wait for any of it.
    pub async fn tend_counters(&self) {
        if let Counters::Redis(redis) = &self.counters {
            self.tend_redis(redis).await;
        }
    }

    /// Follows what other instances change, for the life of the server
    /// (with Redis; returns at once otherwise).
    pub async fn follow_other_instances(self: Arc<Self>) {
        if let Counters::Redis(redis) = &self.counters {
            let redis = Arc::clone(redis);
            self.follow_redis(&redis).await;
        }
    }

    /// Whether this instance is cut off from the counters it shares.
    pub fn degraded(&self) -> bool {
        self.counters.degraded()
    }

    /// Failed calls to Redis since start-up.
    pub fn shared_store_errors(&self) -> u64 {
        match &self.counters {
            Counters::InProcess => 0,
            Counters::Redis(redis) => redis.errors(),
        }
    }

    /// Whether this instance writes workspace notifications to the database.
    /// Every instance raises them for its own listeners, but with Redis only
    /// one (the lease holder) writes them, so that history holds one per
    /// cause. Cut off from Redis, every instance writes its own rather than
    /// lose them.
    pub fn writes_workspace_notifications(&self) -> bool {
        match &self.counters {
            Counters::InProcess => true,
            Counters::Redis(redis) => redis.leads() || redis.degraded(),
        }
    }

    /// True once after this instance took over writing notifications.
    pub fn took_over_notifications(&self) -> bool {
        match &self.counters {
            Counters::InProcess => false,
            Counters::Redis(redis) => redis.took_over(),
        }
    }

    /// Whether notification ids are agreed on with other instances: while
    /// Redis, which they share, answers.
    pub(super) fn agrees_on_ids(&self) -> bool {
        matches!(self.counters, Counters::Redis(_)) && !self.degraded()
    }
}
