//! The engine's operations when several instances share their counters in
//! Redis (`crate::shared`).
//!
//! The shared store decides: an admission is one script call that checks
//! and charges every limit, a settlement one that corrects the charge. Its
//! answer carries the workspace's whole counter state, which is loaded into
//! the local `WorkspaceState` so that status, notifications and headers come
//! from the same rules as on a single instance. What the upstream says is
//! applied locally and, when it moves a block, written back, so one
//! instance's `insufficient_quota` blocks the workspace on all.
//!
//! When the store cannot be reached, `OnStoreError` decides: refuse
//! (`closed`), or fall back to the local engine with a share of each limit
//! (`local`) or without enforcing limits (`open`). The first success after
//! an outage switches back and adds what was admitted meanwhile to the
//! shared counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;

use super::{
    Decision, Engine, EngineError, Reported, Slot, UsageReport, fresh_id, lock, record_expired,
};
use crate::domain::limits::{OnStoreError, WorkspaceId};
use crate::domain::notification::{Notification, describe_shared_store_unavailable};
use crate::domain::window::Usage;
use crate::domain::workspace::{Enforcement, Request, Settled};
use crate::shared::{AdmitArgs, RedisCounters, SharedError};

/// Counters shared with other instances, and how this instance copes while
/// they are out of reach.
pub struct SharedCounting {
    counters: RedisCounters,
    on_error: OnStoreError,
    degraded: AtomicBool,
    /// Failed calls to the shared store, for the metrics.
    errors: AtomicU64,
    /// Serialises the switch back after an outage.
    recovery: tokio::sync::Mutex<()>,
    /// This instance holds the lease for writing workspace notifications.
    leader: AtomicBool,
    /// Leadership was just taken: notifications an earlier leader left
    /// active must be reconciled with this instance's.
    took_over: AtomicBool,
}

/// How often workspaces changed by other instances are reloaded: well
/// within the second in which their clients must see the change.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// How long the notification writer's lease lasts; renewed every second.
const LEASE: Duration = Duration::from_secs(3);

/// How many workspaces are reloaded at once.
const RELOAD_CONCURRENCY: usize = 16;

impl SharedCounting {
    pub fn new(counters: RedisCounters, on_error: OnStoreError) -> Self {
        Self {
            counters,
            on_error,
            degraded: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            recovery: tokio::sync::Mutex::new(()),
            leader: AtomicBool::new(false),
            took_over: AtomicBool::new(false),
        }
    }

    pub fn counters(&self) -> &RedisCounters {
        &self.counters
    }

    /// How limits are enforced here while the store is unreachable.
    fn fallback(&self) -> Enforcement {
        match self.on_error {
            OnStoreError::Local { instances } => Enforcement::Share(instances),
            // Nothing is admitted here then; the whole limits stay in view.
            OnStoreError::Closed => Enforcement::Share(1),
            OnStoreError::Open => Enforcement::CountOnly,
        }
    }
}

impl Engine {
    /// Shares counters with other instances from now on. Called once, before
    /// the engine serves.
    pub fn share_counters(&mut self, shared: SharedCounting) {
        self.shared = Some(Arc::new(shared));
    }

    pub fn shared_counting(&self) -> Option<&Arc<SharedCounting>> {
        self.shared.as_ref()
    }

    /// Whether this instance is cut off from the counters it shares.
    pub fn degraded(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|shared| shared.degraded.load(Ordering::Acquire))
    }

    /// Whether this instance writes workspace notifications to the database.
    /// Every instance raises them for its own listeners, but with shared
    /// counters only one (the lease holder) writes them, so that history
    /// holds one per cause. Cut off from Redis, every instance writes its
    /// own rather than lose them.
    pub fn writes_workspace_notifications(&self) -> bool {
        self.shared.as_ref().is_none_or(|shared| {
            shared.leader.load(Ordering::Acquire) || shared.degraded.load(Ordering::Acquire)
        })
    }

    /// True once after this instance took over writing notifications.
    pub fn took_over_notifications(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|shared| shared.took_over.swap(false, Ordering::AcqRel))
    }

    /// Ids of every workspace notification active here.
    pub fn active_notification_ids(&self) -> std::collections::HashSet<String> {
        self.all_slots()
            .into_iter()
            .flat_map(|(_, slot)| {
                let cell = slot.lock();
                cell.state
                    .active_notifications()
                    .iter()
                    .map(|notification| notification.id.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Queues every active workspace notification for writing, as a new
    /// writer must.
    pub fn requeue_active_notifications(&self) {
        let active: Vec<Notification> = self
            .all_slots()
            .into_iter()
            .flat_map(|(_, slot)| slot.lock().state.active_notifications().to_vec())
            .collect();
        lock(&self.pending_notifications).extend(active);
    }

    /// Follows what other instances change, for the life of the server:
    /// announcements mark workspaces stale and stale ones are reloaded every
    /// `FOLLOW_INTERVAL`, so local listeners see every instance's changes;
    /// meanwhile it keeps (or takes) the notification writer's lease.
    pub async fn follow_other_instances(self: Arc<Self>) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let instance = format!("{:016x}", fresh_id());
        let mut reload = tokio::time::interval(FOLLOW_INTERVAL);
        let mut lease = tokio::time::interval(Duration::from_secs(1));
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changes = match shared.counters.changes().await {
                Ok(changes) => changes,
                Err(error) => {
                    tracing::debug!(%error, "cannot follow other instances yet");
                    shared.leader.store(false, Ordering::Release);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // Announcements made while not subscribed are lost: reload all.
            for (_, slot) in self.all_slots() {
                slot.shared_stale.store(true, Ordering::Release);
            }
            let mut changes = std::pin::pin!(changes);
            loop {
                tokio::select! {
                    change = changes.next() => match change {
                        Some((workspace, version)) => self.note_change(&workspace, version),
                        None => break,
                    },
                    _ = reload.tick() => self.reload_stale().await,
                    _ = lease.tick() => self.renew_lease(&shared, &instance).await,
                }
            }
            tracing::debug!("lost the subscription to other instances' changes");
        }
    }

    fn note_change(&self, workspace: &str, version: u64) {
        let Some(slot) = workspace
            .parse::<WorkspaceId>()
            .ok()
            .and_then(|id| self.slot(&id).ok())
        else {
            return;
        };
        if slot.lock().state.shared_version() < version {
            slot.shared_stale.store(true, Ordering::Release);
        }
    }

    async fn reload_stale(&self) {
        let stale: Vec<WorkspaceId> = self
            .all_slots()
            .into_iter()
            .filter(|(_, slot)| slot.shared_stale.swap(false, Ordering::AcqRel))
            .map(|(id, _)| id)
            .collect();
        futures_util::stream::iter(stale)
            .for_each_concurrent(RELOAD_CONCURRENCY, |id| async move {
                // A workspace removed meanwhile has nothing left to reload.
                let _ = self.refresh(&id).await;
            })
            .await;
    }

    async fn renew_lease(&self, shared: &SharedCounting, instance: &str) {
        let held = shared
            .counters
            .hold_lease(instance, LEASE)
            .await
            .unwrap_or(false);
        let was_leader = shared.leader.swap(held, Ordering::AcqRel);
        if held && !was_leader {
            tracing::info!("this instance now writes workspace notifications");
            shared.took_over.store(true, Ordering::Release);
        }
    }

    /// Failed calls to the shared store since start-up.
    pub fn shared_store_errors(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |shared| shared.errors.load(Ordering::Relaxed))
    }

    /// Admission, wherever the counters live: the local engine's
    /// [`check`](Self::check), or one call of the shared store.
    pub async fn admit(
        &self,
        workspace: &WorkspaceId,
        request: Request,
    ) -> Result<Decision, EngineError> {
        let Some(shared) = &self.shared else {
            return self.check(workspace, request);
        };
        let slot = self.slot(workspace)?;
        let (limits, timezone) = {
            let cell = slot.lock();
            (cell.state.config().limits, cell.state.config().timezone)
        };
        let args = AdmitArgs {
            limits: &limits,
            tokens: request.estimated_tokens,
            reservation: fresh_id(),
            reservation_ttl: self.settings.reservation_ttl,
            probe_interval: self.settings.probe_interval,
            model: request.model.as_deref(),
        };
        let answer = shared
            .counters
            .admit(workspace, timezone, self.now(), args)
            .await;
        match answer {
            Ok((decided, reply)) => {
                self.store_answered().await;
                let now = self.now();
                let mut cell = slot.lock();
                cell.state.load_shared(&reply.counters);
                let mut admission = cell.state.conclude_shared_admission(
                    decided,
                    &request,
                    now,
                    &self.settings,
                    &mut fresh_id,
                );
                admission.expired = reply.expired;
                Ok(self.conclude_check(&slot, cell, now, request.model, admission))
            }
            Err(error) => {
                self.store_failed(&error);
                match shared.on_error {
                    OnStoreError::Closed => Err(EngineError::SharedStore(error.to_string())),
                    OnStoreError::Local { .. } | OnStoreError::Open => {
                        self.check(workspace, request)
                    }
                }
            }
        }
    }

    /// Settlement, wherever the reservation lives: here (made locally, also
    /// during an outage) or in the shared store. It fails only for an
    /// unknown workspace; an unreachable store leaves the estimate charged
    /// there and records the answer locally.
    pub async fn settle(
        &self,
        workspace: &WorkspaceId,
        report: UsageReport,
    ) -> Result<Reported, EngineError> {
        let Some(shared) = &self.shared else {
            return self.report(workspace, report);
        };
        let slot = self.slot(workspace)?;
        let (timezone, reserved_here) = {
            let cell = slot.lock();
            let reserved_here = report
                .reservation
                .is_some_and(|id| cell.state.has_reservation(id));
            (cell.state.config().timezone, reserved_here)
        };
        if reserved_here {
            return self.report(workspace, report);
        }
        let tokens = report.tokens.map(|tokens| tokens.total());
        let answer = match report.reservation {
            Some(id) => shared
                .counters
                .settle(workspace, timezone, self.now(), id, tokens)
                .await
                .map(|(reservation, reply)| {
                    (
                        reservation.map_or(Settled::Missing, Settled::Reservation),
                        reply,
                    )
                }),
            None => {
                let usage = Usage {
                    requests: 1,
                    tokens: tokens.unwrap_or(0),
                };
                shared
                    .counters
                    .count(workspace, timezone, self.now(), usage)
                    .await
                    .map(|reply| (Settled::Unreserved, reply))
            }
        };
        let (settled, reply) = match answer {
            Ok(answered) => answered,
            Err(error) => {
                self.store_failed(&error);
                return self.report(workspace, report);
            }
        };
        self.store_answered().await;
        let now = self.now();
        let (reported, moved_blocks) = {
            let mut cell = slot.lock();
            cell.state.load_shared(&reply.counters);
            let blocks_before = cell.state.shared_blocks();
            let counted = match &settled {
                Settled::Reservation(reservation) => tokens.unwrap_or(reservation.estimated_tokens),
                Settled::Unreserved | Settled::Missing => tokens.unwrap_or(0),
            };
            let mut recorded = cell.state.conclude_record(
                &report.outcome(),
                settled,
                counted,
                now,
                &self.settings,
                &mut fresh_id,
            );
            recorded.expired = reply.expired;
            let blocks_after = cell.state.shared_blocks();
            let reported = self.conclude_report(&slot, cell, now, workspace, &report, recorded);
            (
                reported,
                (blocks_after != blocks_before).then_some(blocks_after),
            )
        };
        if let Some((hold_until, billing)) = moved_blocks {
            match shared
                .counters
                .block(workspace, timezone, now, hold_until, billing)
                .await
            {
                Ok(reply) => self.load_reply(&slot, &reply),
                Err(error) => self.store_failed(&error),
            }
        }
        Ok(reported)
    }

    /// Brings a workspace's state up to the shared counters, so that what it
    /// shows includes what other instances counted.
    pub async fn refresh(&self, workspace: &WorkspaceId) -> Result<(), EngineError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let slot = self.slot(workspace)?;
        let timezone = slot.lock().state.config().timezone;
        match shared.counters.peek(workspace, timezone, self.now()).await {
            Ok(reply) => {
                self.store_answered().await;
                self.load_reply(&slot, &reply);
            }
            Err(error) => self.store_failed(&error),
        }
        Ok(())
    }

    /// Resets one workspace (or all) here and in the shared counters.
    pub async fn reset_everywhere(
        &self,
        workspace: Option<&WorkspaceId>,
    ) -> Result<Vec<WorkspaceId>, EngineError> {
        if let Some(shared) = &self.shared {
            let targets = match workspace {
                Some(id) => vec![(id.clone(), self.slot(id)?)],
                None => self.all_slots(),
            };
            for (id, slot) in targets {
                let timezone = slot.lock().state.config().timezone;
                shared
                    .counters
                    .reset(&id, timezone, self.now())
                    .await
                    .map_err(|error| {
                        self.store_failed(&error);
                        EngineError::SharedStore(error.to_string())
                    })?;
            }
        }
        self.reset(workspace)
    }

    /// While cut off, tries the store once per call (the ticker calls this),
    /// so that shared counting resumes even when no request comes.
    pub async fn probe_shared_store(&self) {
        if !self.degraded() {
            return;
        }
        if let Some((id, _)) = self.all_slots().into_iter().next() {
            let _ = self.refresh(&id).await;
        }
    }

    /// Loads a reply that changed nothing this instance asked for, and lets
    /// the status follow it.
    fn load_reply(&self, slot: &Slot, reply: &crate::shared::Reply) {
        let now = self.now();
        let mut cell = slot.lock();
        let changes =
            cell.state
                .refresh_shared(&reply.counters, now, &self.settings, &mut fresh_id);
        record_expired(&mut cell, reply.expired.clone());
        let published = self.publish(&cell.state, now, changes, false);
        drop(cell);
        slot.usage_dirty.store(true, Ordering::Release);
        slot.dirty.store(true, Ordering::Release);
        published.log();
    }

    /// A call to the shared store failed: on the first failure of an outage,
    /// switch every workspace to the fallback and say so.
    fn store_failed(&self, error: &SharedError) {
        let Some(shared) = &self.shared else {
            return;
        };
        shared.errors.fetch_add(1, Ordering::Relaxed);
        if shared.degraded.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = self.now();
        let notification = describe_shared_store_unavailable(
            format!("ntf_{:016x}", fresh_id()),
            &error.to_string(),
            shared.on_error,
            now,
        );
        tracing::error!(
            %error,
            fallback = shared.on_error.name(),
            "shared counters unreachable; enforcing on this instance alone"
        );
        lock(&self.service).shared_store = Some(notification.clone());
        lock(&self.pending_notifications).push(notification.clone());
        let _ = self
            .events
            .send(super::Event::Notification(Arc::new(notification)));
        self.set_enforcement(shared.fallback());
    }

    /// A call to the shared store succeeded: after an outage, switch back to
    /// the shared counters and add to them what was admitted meanwhile.
    async fn store_answered(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        if !shared.degraded.load(Ordering::Acquire) {
            return;
        }
        let _recovering = shared.recovery.lock().await;
        if !shared.degraded.swap(false, Ordering::AcqRel) {
            return;
        }
        tracing::info!("shared counters reachable again");
        self.set_enforcement(Enforcement::Whole);
        if let Some(mut notification) = lock(&self.service).shared_store.take() {
            notification.resolved_at = Some(self.now());
            lock(&self.pending_notifications).push(notification.clone());
            let _ = self
                .events
                .send(super::Event::Notification(Arc::new(notification)));
        }
        for (id, slot) in self.all_slots() {
            let (offline, timezone) = {
                let mut cell = slot.lock();
                (
                    std::mem::take(&mut cell.offline),
                    cell.state.config().timezone,
                )
            };
            if offline == Usage::default() {
                continue;
            }
            let merged = shared
                .counters
                .count(&id, timezone, self.now(), offline)
                .await;
            match merged {
                Ok(reply) => self.load_reply(&slot, &reply),
                Err(error) => {
                    slot.lock().offline += offline;
                    self.store_failed(&error);
                    return;
                }
            }
        }
    }

    fn set_enforcement(&self, enforcement: Enforcement) {
        let now = self.now();
        for (_, slot) in self.all_slots() {
            let mut cell = slot.lock();
            let changes =
                cell.state
                    .set_enforcement(enforcement, now, &self.settings, &mut fresh_id);
            // Always a status event: `degraded` changed.
            let published = self.publish(&cell.state, now, changes, true);
            drop(cell);
            slot.dirty.store(true, Ordering::Release);
            published.log();
        }
    }
}
