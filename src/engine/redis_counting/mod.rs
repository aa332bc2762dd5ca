//! The counters in Redis, shared by several instances (`crate::redis`).
//!
//! Redis decides: an admission is one script call that checks and charges
//! every limit, a settlement one that corrects the charge. Its answer
//! carries the workspace's whole counter state and Redis's clock, which are
//! loaded into the local `WorkspaceState` (through the workspace's
//! [`Mirror`]) so that status, notifications and headers come from the
//! same rules as on a single instance, timed by the same clock on every
//! instance. What the upstream says is applied locally and, when it moves a
//! block, the change is written back, so one instance's
//! `insufficient_quota` blocks the workspace on all.
//!
//! When Redis cannot be reached, [`OnStoreError`] decides: refuse
//! (`closed`), or fall back to this instance's own counters with a share
//! of each limit (`local`) or without enforcing limits (`open`). The first
//! success after an outage switches back; the ticker then adds what was
//! counted meanwhile to the stored counters, off the request path.
//!
//! Each instance raises notifications for the causes it sees, at its own
//! moment. So that a notification has one id on every instance and in
//! history, the instances agree on it in Redis (`agree`): the first to
//! raise a cause names its episode, the others take that name before they
//! publish theirs. Other instances' changes are followed through Redis's
//! change channel (`follow`).

mod agree;
mod follow;
mod mirror;

pub(super) use mirror::Mirror;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use super::slot::{Slot, record_expired};
use super::{Decision, Engine, EngineError, Reported, Touched, UsageReport, fresh_id};
use crate::domain::limits::{WorkspaceConfig, WorkspaceId};
use crate::domain::notification::describe_shared_store_unavailable;
use crate::domain::scope::{ScopeValues, Selector};
use crate::domain::window::{Tally, Usage};
use crate::domain::workspace::{Enforcement, Request, Reservation, ResetScope, Returned, Settled};
use crate::redis::{
    AdmitArgs, BlockChange, ExpiredInStore, Held, RedisCounters, Reply, ScopeCharge, SharedError,
};
use crate::sync::lock;

/// What instances sharing counters in Redis do while it is unreachable
/// (`QUOTAWATCH_ON_STORE_ERROR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreError {
    /// Each of `instances` enforces its share of every limit on its own.
    Local { instances: u32 },
    /// Refuse every request until Redis returns.
    Closed,
    /// Admit every request, counting without enforcing.
    Open,
}

impl OnStoreError {
    pub const fn name(self) -> &'static str {
        match self {
            OnStoreError::Local { .. } => "local",
            OnStoreError::Closed => "closed",
            OnStoreError::Open => "open",
        }
    }

    /// How this instance enforces limits meanwhile.
    fn enforcement(self) -> Enforcement {
        match self {
            OnStoreError::Local { instances } => Enforcement::Share(instances),
            // Nothing is admitted here then; the whole limits stay in view.
            OnStoreError::Closed => Enforcement::Share(1),
            OnStoreError::Open => Enforcement::CountOnly,
        }
    }

    /// What the notification of an outage says happens meanwhile.
    fn meanwhile(self) -> String {
        match self {
            OnStoreError::Local { instances } => format!(
                "Each instance now enforces 1/{instances} of every limit on its own (QUOTAWATCH_ON_STORE_ERROR=local), so together they stay within the limits; usage counted meanwhile is added to the shared counters when they return."
            ),
            OnStoreError::Closed => "Requests are refused with 503 until it returns (QUOTAWATCH_ON_STORE_ERROR=closed).".to_owned(),
            OnStoreError::Open => "Requests are admitted without enforcing limits and counted by each instance alone (QUOTAWATCH_ON_STORE_ERROR=open), so workspaces may exceed their limits.".to_owned(),
        }
    }
}

/// Counters in Redis, and how this instance copes while Redis is out of
/// reach.
pub struct RedisCounting {
    counters: RedisCounters,
    on_error: OnStoreError,
    /// Cut off from Redis. Changed only under `switching`, together with
    /// every workspace's enforcement, so the two always agree.
    degraded: AtomicBool,
    switching: Mutex<()>,
    /// Usage counted alone during an outage waits to be added to Redis.
    merge_pending: AtomicBool,
    /// Failed calls to Redis, for the metrics.
    errors: AtomicU64,
    /// Until when this instance holds the lease for writing workspace
    /// notifications.
    leader_until: Mutex<Option<Instant>>,
    /// Leadership was just taken: notifications an earlier leader left
    /// active must be reconciled with this instance's.
    took_over: AtomicBool,
    /// Wakes the follower to subscribe again, after an outage that may have
    /// left its connection silently dead.
    resubscribe: tokio::sync::Notify,
    /// This instance's name, for the lease and the episodes it holds.
    instance: String,
    /// When this instance last renewed its holds on episodes.
    episodes_renewed: Mutex<Instant>,
}

impl RedisCounting {
    /// The client, for what lives in Redis beside the counters (credential
    /// blocks).
    pub(in crate::engine) fn counters(&self) -> &RedisCounters {
        &self.counters
    }

    pub fn new(counters: RedisCounters, on_error: OnStoreError) -> Self {
        Self {
            counters,
            on_error,
            degraded: AtomicBool::new(false),
            switching: Mutex::new(()),
            merge_pending: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            leader_until: Mutex::new(None),
            took_over: AtomicBool::new(false),
            resubscribe: tokio::sync::Notify::new(),
            instance: format!("{:016x}", fresh_id()),
            episodes_renewed: Mutex::new(Instant::now()),
        }
    }

    pub(super) fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    pub(super) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub(super) fn leads(&self) -> bool {
        lock(&self.leader_until).is_some_and(|until| Instant::now() < until)
    }

    pub(super) fn took_over(&self) -> bool {
        self.took_over.swap(false, Ordering::AcqRel)
    }

    /// Whether the holds on episodes are due for renewal; if so, they count
    /// as renewed from now.
    fn renewal_due(&self) -> bool {
        let mut renewed = lock(&self.episodes_renewed);
        if renewed.elapsed() < agree::EPISODE_RENEWAL {
            return false;
        }
        *renewed = Instant::now();
        true
    }
}

impl Engine {
    /// Admission in one script call; while Redis cannot be reached, as
    /// `OnStoreError` says.
    pub(super) async fn admit_in_redis(
        &self,
        redis: &RedisCounting,
        workspace: &WorkspaceId,
        request: Request,
    ) -> Result<Decision, EngineError> {
        let slot = self.slot(workspace)?;
        let (limits, timezone, scopes) = {
            let cell = slot.lock();
            let config = cell.state.config();
            let scopes = scope_charges(config, request.model.as_deref(), &request.scoped);
            (config.limits, config.timezone, scopes)
        };
        let args = AdmitArgs {
            limits: &limits,
            estimate: request.estimate,
            reservation: fresh_id(),
            reservation_ttl: self.settings.reservation_ttl,
            probe_interval: self.settings.probe_interval,
            model: request.model.as_deref(),
            scopes: &scopes,
            record: request.settled_anywhere,
        };
        let answer = redis
            .counters
            .admit(workspace, timezone, self.now(), args)
            .await;
        match answer {
            Ok((decided, reply)) => {
                self.store_answered(redis);
                self.record_stored_expired(reply.expired);
                let now = reply.counters.at;
                let decision = {
                    let mut cell = slot.lock();
                    cell.load_stored(&reply.counters);
                    let admission = cell.state.conclude_admission_made_elsewhere(
                        decided,
                        &request,
                        reply.at_us,
                        now,
                        &self.settings,
                        &mut fresh_id,
                    );
                    if let (Ok(admitted), Some(charged), false) = (
                        &admission.result,
                        reply.charged_scopes,
                        request.settled_anywhere,
                    ) {
                        let cell = &mut *cell;
                        cell.mirror.hold_scopes(&cell.state, admitted.id, charged);
                    }
                    self.conclude_admission(
                        &slot,
                        cell,
                        now,
                        (request.model, &request.scoped),
                        admission,
                    )
                };
                self.agree_when_due(redis, workspace, &slot).await;
                Ok(decision)
            }
            Err(error) => {
                self.store_failed(redis, &error);
                if redis.on_error == OnStoreError::Closed {
                    return Err(EngineError::SharedStore(error.to_string()));
                }
                let usage = request.estimate;
                let decision = self.admit_here(workspace, request)?;
                if decision.result.is_ok() {
                    self.count_alone(redis, &slot, usage);
                }
                Ok(decision)
            }
        }
    }

    /// Keeps `usage`, counted here alone while Redis was out of reach, to
    /// be added to the stored counters once it is back.
    fn count_alone(&self, redis: &RedisCounting, slot: &Slot, usage: Usage) {
        slot.lock().mirror.offline += usage;
        redis.merge_pending.store(true, Ordering::Release);
    }

    /// Settlement, wherever the reservation lives: here (charged here during
    /// an outage, or held here and charged in Redis) or in Redis. An
    /// unreachable Redis leaves the estimate charged there and records the
    /// answer locally.
    pub(super) async fn settle_in_redis(
        &self,
        redis: &RedisCounting,
        workspace: &WorkspaceId,
        report: UsageReport,
    ) -> Result<Reported, EngineError> {
        let slot = self.slot(workspace)?;
        let now = self.now();
        let (timezone, charged_here, held, scopes) = {
            let mut cell = slot.lock();
            let estimate = report
                .reservation
                .and_then(|id| cell.state.reservation_estimate(id));
            let held = report
                .reservation
                .and_then(|id| cell.state.take_reservation_charged_elsewhere(id, now));
            let held_scopes = held
                .as_ref()
                .and_then(|reservation| cell.mirror.take_scopes(reservation.id));
            // A call without reservation is charged to the scoped limits it
            // falls under, as the workspace is.
            let unreserved = match report.reservation {
                None => scope_charges(cell.state.config(), report.model.as_deref(), &report.scoped),
                Some(_) => Vec::new(),
            };
            (
                cell.state.config().timezone,
                estimate,
                held.map(|held| (held, held_scopes)),
                unreserved,
            )
        };
        if let Some(estimate) = charged_here {
            return self.settle_made_offline(redis, &slot, workspace, report, estimate);
        }
        let used = report.used(&self.pricing);
        // Whether Redis charged a held reservation, to take a reset there
        // into account with its answer.
        let mut settled_held = false;
        let answer = match (report.reservation, held) {
            (_, Some((reservation, held_scopes))) => {
                let held = Held {
                    charged_us: reservation.charged_elsewhere_us.unwrap_or_default(),
                    estimate: reservation.estimate,
                    scopes: held_scopes,
                };
                let in_settlement = HeldInSettlement::new(&slot, reservation);
                match redis
                    .counters
                    .settle_held(workspace, timezone, now, held, used)
                    .await
                {
                    Ok(reply) => {
                        settled_held = true;
                        Ok((Settled::Reservation(in_settlement.settled()), reply))
                    }
                    Err(error) => {
                        // Settled here instead, as if charged here during
                        // the outage: the call still counts in history, and
                        // Redis learns of tokens beyond its estimate with
                        // the merge.
                        self.store_failed(redis, &error);
                        let mut cell = slot.lock();
                        let as_in_store = cell.mirror.as_in_store(in_settlement.settled());
                        let returned = cell.state.return_reservation(as_in_store, self.now());
                        return match returned {
                            Returned::Held { estimate } => {
                                drop(cell);
                                self.settle_made_offline(redis, &slot, workspace, report, estimate)
                            }
                            Returned::Expired(expired) => {
                                // Counted as it ended; the report then
                                // finds it gone and counts nothing more.
                                record_expired(&mut cell, vec![expired]);
                                drop(cell);
                                self.settle_here(workspace, report)
                            }
                        };
                    }
                }
            }
            (Some(id), None) => redis
                .counters
                .settle(workspace, timezone, now, id, used)
                .await
                .map(|(reservation, reply)| {
                    (
                        reservation.map_or(Settled::Missing, Settled::Reservation),
                        reply,
                    )
                }),
            (None, None) => {
                let usage = used.unwrap_or(Usage::call(0));
                redis
                    .counters
                    .count(workspace, timezone, now, usage, &scopes)
                    .await
                    .map(|reply| (Settled::Unreserved, reply))
            }
        };
        let (settled, reply) = match answer {
            Ok(answered) => answered,
            Err(error) => {
                self.store_failed(redis, &error);
                let unreserved = report
                    .reservation
                    .is_none()
                    .then(|| used.unwrap_or(Usage::call(0)));
                let reported = self.settle_here(workspace, report)?;
                if let Some(usage) = unreserved {
                    self.count_alone(redis, &slot, usage);
                }
                return Ok(reported);
            }
        };
        self.store_answered(redis);
        self.record_stored_expired(reply.expired);
        let answered_at = reply.counters.at;
        // Judged by the reset the answer knows: one made after Redis
        // settled this call, and loaded first, did not touch it.
        let settled = match settled {
            Settled::Reservation(reservation) if settled_held => Settled::Reservation(
                mirror::as_in_store(reservation, reply.counters.last_reset_us),
            ),
            settled => settled,
        };
        let (reported, change) = {
            let mut cell = slot.lock();
            cell.load_stored(&reply.counters);
            let blocks_before = cell.state.blocks();
            let counted = match &settled {
                Settled::Reservation(reservation) => used.unwrap_or(reservation.estimate),
                Settled::Unreserved | Settled::Missing => used.unwrap_or(Usage::call(0)),
            };
            let recorded = cell.state.conclude_record(
                &report.outcome(&self.pricing),
                settled,
                counted,
                answered_at,
                &self.settings,
                &mut fresh_id,
            );
            let change = BlockChange::between(blocks_before, cell.state.blocks());
            let reported =
                self.conclude_settlement(&slot, cell, answered_at, workspace, &report, recorded);
            (reported, change)
        };
        if let Some(change) = change {
            self.write_blocks(redis, &slot, workspace, change).await;
        }
        self.agree_when_due(redis, workspace, &slot).await;
        Ok(reported)
    }

    /// Settles a reservation made here during an outage. What Redis must
    /// learn (usage beyond the estimate, blocks) waits with the usage
    /// counted alone, for the merge.
    fn settle_made_offline(
        &self,
        redis: &RedisCounting,
        slot: &Slot,
        workspace: &WorkspaceId,
        report: UsageReport,
        estimate: Usage,
    ) -> Result<Reported, EngineError> {
        let beyond_estimate = report
            .used(&self.pricing)
            .map_or(Usage::default(), |used| used.saturating_sub(estimate));
        let reported = self.settle_here(workspace, report)?;
        // One that expired first kept its estimate, and no more.
        let counted = if reported.missing_reservation {
            Usage::default()
        } else {
            beyond_estimate
        };
        self.count_alone(redis, slot, counted);
        Ok(reported)
    }

    /// Writes a change of the upstream blocks to Redis, and loads its
    /// answer.
    async fn write_blocks(
        &self,
        redis: &RedisCounting,
        slot: &Slot,
        workspace: &WorkspaceId,
        change: BlockChange,
    ) {
        let timezone = slot.lock().state.config().timezone;
        match redis
            .counters
            .block(workspace, timezone, self.now(), change)
            .await
        {
            Ok(reply) => self.load_reply(redis, workspace, slot, &reply).await,
            Err(error) => self.store_failed(redis, &error),
        }
    }

    /// Brings a workspace's state up to the stored counters, so that what
    /// it shows includes what other instances counted.
    pub(super) async fn refresh_from_redis(
        &self,
        redis: &RedisCounting,
        workspace: &WorkspaceId,
    ) -> Result<(), EngineError> {
        let slot = self.slot(workspace)?;
        self.reload(redis, workspace, &slot).await;
        Ok(())
    }

    /// Loads a workspace from Redis; answers whether it could.
    async fn reload(&self, redis: &RedisCounting, workspace: &WorkspaceId, slot: &Slot) -> bool {
        let (timezone, listed) = {
            let cell = slot.lock();
            let config = cell.state.config();
            (config.timezone, listed_scope_charges(config))
        };
        match redis
            .counters
            .peek(workspace, timezone, self.now(), &listed)
            .await
        {
            Ok(reply) => {
                self.store_answered(redis);
                self.load_reply(redis, workspace, slot, &reply).await;
                true
            }
            Err(error) => {
                self.store_failed(redis, &error);
                false
            }
        }
    }

    /// Resets one workspace (or all) in Redis, then here.
    pub(super) async fn reset_in_redis(
        &self,
        redis: &RedisCounting,
        workspace: Option<&WorkspaceId>,
        scope: ResetScope,
    ) -> Result<Vec<WorkspaceId>, EngineError> {
        for (id, slot) in self.one_or_all(workspace)? {
            let timezone = slot.lock().state.config().timezone;
            let reply = redis
                .counters
                .reset(&id, timezone, self.now(), scope)
                .await
                .map_err(|error| {
                    self.store_failed(redis, &error);
                    EngineError::SharedStore(error.to_string())
                })?;
            // The reset's time, loaded, tells the reservations held here
            // that it cleared from those charged after it.
            self.load_reply(redis, &id, &slot, &reply).await;
        }
        let done = self.reset_here(workspace, scope)?;
        // The episodes the reset ended end in Redis before it answers, so
        // that a cause raised again after it is a new notification.
        for id in &done {
            if let Ok(slot) = self.slot(id) {
                self.agree_when_due(redis, id, &slot).await;
            }
        }
        Ok(done)
    }

    /// Agrees on notification ids; while cut off, tries Redis, so that
    /// shared counting resumes even when no request comes; once back, adds
    /// what was counted alone meanwhile.
    pub(super) async fn tend_redis(&self, redis: &RedisCounting) {
        let renew = !redis.degraded() && redis.renewal_due();
        self.agree_everywhere(redis, renew).await;
        if redis.degraded() {
            if let Some((id, slot)) = self.all_slots().into_iter().next() {
                self.reload(redis, &id, &slot).await;
            }
        } else if redis.merge_pending.swap(false, Ordering::AcqRel) {
            self.merge_offline(redis).await;
        }
    }

    /// Adds usage counted alone, and blocks seen alone, to Redis.
    async fn merge_offline(&self, redis: &RedisCounting) {
        for (id, slot) in self.all_slots() {
            let (offline, blocks, timezone) = {
                let mut cell = slot.lock();
                (
                    std::mem::take(&mut cell.mirror.offline),
                    std::mem::take(&mut cell.mirror.offline_blocks),
                    cell.state.config().timezone,
                )
            };
            if offline != Usage::default() {
                match redis
                    .counters
                    .count(&id, timezone, self.now(), offline, &[])
                    .await
                {
                    Ok(reply) => self.load_reply(redis, &id, &slot, &reply).await,
                    Err(error) => {
                        let mut cell = slot.lock();
                        cell.mirror.offline += offline;
                        cell.mirror.offline_blocks = cell.mirror.offline_blocks.or(blocks);
                        drop(cell);
                        redis.merge_pending.store(true, Ordering::Release);
                        self.store_failed(redis, &error);
                        return;
                    }
                }
            }
            if let Some(change) = blocks {
                self.write_blocks(redis, &slot, &id, change).await;
            }
        }
    }

    /// Loads Redis's answer and lets the status follow it; its clock is the
    /// one every instance uses.
    async fn load_reply(
        &self,
        redis: &RedisCounting,
        workspace: &WorkspaceId,
        slot: &Slot,
        reply: &Reply,
    ) {
        self.record_stored_expired(reply.expired.clone());
        let now = reply.counters.at;
        // A block, so that the lock is known to be gone before the await.
        {
            let mut cell = slot.lock();
            cell.load_stored(&reply.counters);
            let changes = cell.state.reevaluate(now, &self.settings, &mut fresh_id);
            self.conclude(slot, cell, now, changes, Touched::USAGE);
        }
        self.agree_when_due(redis, workspace, slot).await;
    }

    /// Records reservations that expired unsettled in Redis, which any call
    /// may answer, in the history of the workspace each belongs to.
    fn record_stored_expired(&self, expired: Vec<ExpiredInStore>) {
        for finished in expired {
            if let Ok(slot) = self.slot(&finished.workspace) {
                record_ended_unsettled(&slot, finished.expired);
            }
        }
    }

    /// A call to Redis failed: on the first failure of an outage, switch
    /// every workspace to the fallback and say so.
    fn store_failed(&self, redis: &RedisCounting, error: &SharedError) {
        redis.errors.fetch_add(1, Ordering::Relaxed);
        if redis.degraded() {
            return;
        }
        let _switching = lock(&redis.switching);
        if redis.degraded.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = self.now();
        let notification = describe_shared_store_unavailable(
            format!("ntf_{:016x}", fresh_id()),
            &error.to_string(),
            &redis.on_error.meanwhile(),
            now,
        );
        tracing::error!(
            %error,
            fallback = redis.on_error.name(),
            "shared counters unreachable; enforcing on this instance alone"
        );
        lock(&self.service).shared_store = Some(notification.clone());
        lock(&self.journal.pending_notifications).push(notification.clone());
        let _ = self
            .journal
            .events
            .send(super::Event::Notification(Arc::new(notification)));
        self.set_enforcement(redis.on_error.enforcement());
    }

    /// A call to Redis succeeded: after an outage, switch back to the
    /// stored counters, reload every workspace, and leave the merge of what
    /// was counted alone to the ticker.
    fn store_answered(&self, redis: &RedisCounting) {
        if !redis.degraded() {
            return;
        }
        let _switching = lock(&redis.switching);
        if !redis.degraded.swap(false, Ordering::AcqRel) {
            return;
        }
        tracing::info!("shared counters reachable again");
        self.set_enforcement(Enforcement::Whole);
        if let Some(mut notification) = lock(&self.service).shared_store.take() {
            notification.resolved_at = Some(self.now());
            lock(&self.journal.pending_notifications).push(notification.clone());
            let _ = self
                .journal
                .events
                .send(super::Event::Notification(Arc::new(notification)));
        }
        for (_, slot) in self.all_slots() {
            slot.shared_stale.store(true, Ordering::Release);
        }
        redis.merge_pending.store(true, Ordering::Release);
        redis.resubscribe.notify_one();
    }

    /// Sets every workspace's enforcement; under `switching`.
    fn set_enforcement(&self, enforcement: Enforcement) {
        let now = self.now();
        for (_, slot) in self.all_slots() {
            let mut cell = slot.lock();
            let blocks_before = cell.state.blocks();
            let changes = mirror::enforce(
                &mut cell.state,
                enforcement,
                now,
                &self.settings,
                &mut fresh_id,
            );
            let mirror = &mut cell.mirror;
            if enforcement == Enforcement::Whole {
                // Blocks this instance saw alone are written with the merge.
                mirror.offline_blocks = mirror.offline_blocks.or(BlockChange::between(
                    mirror.outage_blocks.take().unwrap_or(blocks_before),
                    blocks_before,
                ));
            } else {
                mirror.outage_blocks = Some(blocks_before);
            }
            // Always a status event: `degraded` changed.
            self.conclude(&slot, cell, now, changes, Touched::STATE.with_status());
        }
    }
}

/// The scope counters a request with `model` and `values` falls under in
/// `config`, as Redis counts them.
fn scope_charges(
    config: &WorkspaceConfig,
    model: Option<&str>,
    values: &ScopeValues,
) -> Vec<ScopeCharge> {
    let rules = config.scoped_limits.rules();
    config
        .scoped_limits
        .matching(model, values)
        .into_iter()
        .map(|scope| ScopeCharge {
            rule: scope.id,
            value: scope.key,
            limits: rules[scope.rule].limits,
        })
        .collect()
}

/// The counters of `config`'s listed rules, which the status shows.
fn listed_scope_charges(config: &WorkspaceConfig) -> Vec<ScopeCharge> {
    config
        .scoped_limits
        .rules()
        .iter()
        .filter(|rule| matches!(rule.selector, Selector::Listed(_)))
        .map(|rule| ScopeCharge {
            rule: rule.id,
            value: None,
            limits: rule.limits,
        })
        .collect()
}

/// A reservation held here, taken out to be settled in Redis. Should the
/// settlement stop before Redis answers (its caller went away), the call
/// still counts in history, with its estimate, as if the reservation had
/// expired: Redis may have applied the settlement or not, so it is not
/// settled again.
struct HeldInSettlement<'a> {
    slot: &'a Slot,
    reservation: Option<Reservation>,
}

impl<'a> HeldInSettlement<'a> {
    fn new(slot: &'a Slot, reservation: Reservation) -> Self {
        Self {
            slot,
            reservation: Some(reservation),
        }
    }

    /// Redis answered: the settlement goes on with the reservation.
    fn settled(mut self) -> Reservation {
        self.reservation
            .take()
            .expect("a reservation in settlement until settled")
    }
}

impl Drop for HeldInSettlement<'_> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            record_ended_unsettled(self.slot, reservation.expired());
        }
    }
}

/// Records in a workspace's history a reservation that ended unsettled.
fn record_ended_unsettled(slot: &Slot, expired: crate::domain::workspace::Expired) {
    record_expired(&mut slot.lock(), vec![expired]);
    slot.usage_dirty.store(true, Ordering::Release);
}
