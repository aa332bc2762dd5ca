//! The engine's operations when several instances share their counters in
//! Redis (`crate::shared`).
//!
//! The shared store decides: an admission is one script call that checks
//! and charges every limit, a settlement one that corrects the charge. Its
//! answer carries the workspace's whole counter state and Redis's clock,
//! which are loaded into the local `WorkspaceState` so that status,
//! notifications and headers come from the same rules as on a single
//! instance, timed by the same clock on every instance. What the upstream
//! says is applied locally and, when it moves a block, the change is written
//! back, so one instance's `insufficient_quota` blocks the workspace on all.
//!
//! When the store cannot be reached, `OnStoreError` decides: refuse
//! (`closed`), or fall back to the local engine with a share of each limit
//! (`local`) or without enforcing limits (`open`). The first success after
//! an outage switches back; the ticker then adds what was counted meanwhile
//! to the shared counters, off the request path.
//!
//! Each instance raises notifications for the causes it sees, at its own
//! moment. So that a notification has one id on every instance and in
//! history, the instances agree on it in the store (`agree`): the first to
//! raise a cause names its episode, the others take that name before they
//! publish theirs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{
    Decision, Engine, EngineError, Reported, Slot, Touched, UsageReport, fresh_id, record_expired,
};
use crate::domain::limits::{OnStoreError, WorkspaceId};
use crate::domain::notification::{Notification, describe_shared_store_unavailable};
use crate::domain::window::Usage;
use crate::domain::workspace::{
    Enforcement, Expired, Request, Reservation, ResetScope, Returned, Settled,
};
use crate::redis::{
    AdmitArgs, BlockChange, EpisodeStep, ExpiredInStore, Held, RedisCounters, Reply, SharedError,
};
use crate::sync::lock;

/// Counters shared with other instances, and how this instance copes while
/// they are out of reach.
pub struct SharedCounting {
    counters: RedisCounters,
    on_error: OnStoreError,
    /// Cut off from the store. Changed only under `switching`, together
    /// with every workspace's enforcement, so the two always agree.
    degraded: AtomicBool,
    switching: Mutex<()>,
    /// Usage counted alone during an outage waits to be added to the store.
    merge_pending: AtomicBool,
    /// Failed calls to the shared store, for the metrics.
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

/// How often workspaces changed by other instances are reloaded: well
/// within the second in which their clients must see the change.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// How long the notification writer's lease lasts; renewed every second.
const LEASE: Duration = Duration::from_secs(3);

/// How many workspaces are reloaded at once.
const RELOAD_CONCURRENCY: usize = 16;

/// How long this instance's hold on the episode of an active cause lasts
/// in the shared store (see `redis::EpisodeStep`), renewed every
/// `EPISODE_RENEWAL`: an instance that stops, or loses Redis, lets go of
/// its episodes within that time.
const EPISODE_HOLD: Duration = Duration::from_secs(5);
const EPISODE_RENEWAL: Duration = Duration::from_secs(1);

/// How many workspaces one call to the store agrees on at most.
const AGREEMENTS_PER_CALL: usize = 64;

impl SharedCounting {
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

    /// How limits are enforced here while the store is unreachable.
    fn fallback(&self) -> Enforcement {
        match self.on_error {
            OnStoreError::Local { instances } => Enforcement::Share(instances),
            // Nothing is admitted here then; the whole limits stay in view.
            OnStoreError::Closed => Enforcement::Share(1),
            OnStoreError::Open => Enforcement::CountOnly,
        }
    }

    fn leads(&self) -> bool {
        lock(&self.leader_until).is_some_and(|until| Instant::now() < until)
    }

    /// Whether the holds on episodes are due for renewal; if so, they count
    /// as renewed from now.
    fn renewal_due(&self) -> bool {
        let mut renewed = lock(&self.episodes_renewed);
        if renewed.elapsed() < EPISODE_RENEWAL {
            return false;
        }
        *renewed = Instant::now();
        true
    }
}

impl Engine {
    /// Shares counters with other instances from now on. Called once, before
    /// the engine serves.
    pub fn share_counters(&mut self, shared: SharedCounting) {
        self.shared = Some(Arc::new(shared));
    }

    /// Whether this instance is cut off from the counters it shares.
    pub fn degraded(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|shared| shared.degraded.load(Ordering::Acquire))
    }

    /// Failed calls to the shared store since start-up.
    pub fn shared_store_errors(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |shared| shared.errors.load(Ordering::Relaxed))
    }

    /// Whether this instance writes workspace notifications to the database.
    /// Every instance raises them for its own listeners, but with shared
    /// counters only one (the lease holder) writes them, so that history
    /// holds one per cause. Cut off from Redis, every instance writes its
    /// own rather than lose them.
    pub fn writes_workspace_notifications(&self) -> bool {
        self.shared
            .as_ref()
            .is_none_or(|shared| shared.leads() || shared.degraded.load(Ordering::Acquire))
    }

    /// True once after this instance took over writing notifications.
    pub fn took_over_notifications(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|shared| shared.took_over.swap(false, Ordering::AcqRel))
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

    /// Admission, wherever the counters live: this instance's
    /// [`admit_here`](Self::admit_here), or one call of the shared store.
    pub async fn admit(
        &self,
        workspace: &WorkspaceId,
        request: Request,
    ) -> Result<Decision, EngineError> {
        let Some(shared) = &self.shared else {
            return self.admit_here(workspace, request);
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
            record: request.settled_anywhere,
        };
        let answer = shared
            .counters
            .admit(workspace, timezone, self.now(), args)
            .await;
        match answer {
            Ok((decided, reply)) => {
                self.store_answered();
                self.record_shared_expired(reply.expired);
                let now = reply.counters.at;
                let decision = {
                    let mut cell = slot.lock();
                    cell.state.load_shared(&reply.counters);
                    let admission = cell.state.conclude_shared_admission(
                        decided,
                        &request,
                        reply.at_us,
                        now,
                        &self.settings,
                        &mut fresh_id,
                    );
                    self.conclude_admission(&slot, cell, now, request.model, admission)
                };
                self.agree_when_due(workspace, &slot).await;
                Ok(decision)
            }
            Err(error) => {
                self.store_failed(&error);
                match shared.on_error {
                    OnStoreError::Closed => Err(EngineError::SharedStore(error.to_string())),
                    OnStoreError::Local { .. } | OnStoreError::Open => {
                        self.admit_here(workspace, request)
                    }
                }
            }
        }
    }

    /// Settlement, wherever the reservation lives: here (charged here during
    /// an outage, or held here and charged in the shared store) or in the
    /// shared store. It fails only for an unknown workspace; an unreachable
    /// store leaves the estimate charged there and records the answer
    /// locally.
    pub async fn settle(
        &self,
        workspace: &WorkspaceId,
        report: UsageReport,
    ) -> Result<Reported, EngineError> {
        let Some(shared) = &self.shared else {
            return self.settle_here(workspace, report);
        };
        let slot = self.slot(workspace)?;
        let now = self.now();
        let (timezone, charged_here, held) = {
            let mut cell = slot.lock();
            let estimate = report
                .reservation
                .and_then(|id| cell.state.reservation_estimate(id));
            let held = report
                .reservation
                .and_then(|id| cell.state.take_shared_reservation(id, now));
            (cell.state.config().timezone, estimate, held)
        };
        if let Some(estimate) = charged_here {
            return self.settle_made_offline(&slot, workspace, report, estimate);
        }
        let tokens = report.tokens.map(|tokens| tokens.total());
        // When the store charged a held reservation, to take a reset there
        // into account with its answer.
        let mut held_charged_us = None;
        let answer = match (report.reservation, held) {
            (_, Some((reservation, charged_us))) => {
                let held = Held {
                    charged_us,
                    estimate: reservation.estimated_tokens,
                };
                let in_settlement = HeldInSettlement::new(&slot, reservation, charged_us);
                match shared
                    .counters
                    .settle_held(workspace, timezone, now, held, tokens)
                    .await
                {
                    Ok(reply) => {
                        held_charged_us = Some(charged_us);
                        Ok((Settled::Reservation(in_settlement.settled()), reply))
                    }
                    Err(error) => {
                        // Settled here instead, as if charged here during
                        // the outage: the call still counts in history, and
                        // the store learns of tokens beyond its estimate
                        // with the merge.
                        self.store_failed(&error);
                        let mut cell = slot.lock();
                        let returned = cell.state.return_reservation(
                            in_settlement.settled(),
                            charged_us,
                            self.now(),
                        );
                        return match returned {
                            Returned::Held { estimate } => {
                                drop(cell);
                                self.settle_made_offline(&slot, workspace, report, estimate)
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
            (Some(id), None) => shared
                .counters
                .settle(workspace, timezone, now, id, tokens)
                .await
                .map(|(reservation, reply)| {
                    (
                        reservation.map_or(Settled::Missing, Settled::Reservation),
                        reply,
                    )
                }),
            (None, None) => {
                let usage = Usage {
                    requests: 1,
                    tokens: tokens.unwrap_or(0),
                };
                shared
                    .counters
                    .count(workspace, timezone, now, usage)
                    .await
                    .map(|reply| (Settled::Unreserved, reply))
            }
        };
        let (settled, reply) = match answer {
            Ok(answered) => answered,
            Err(error) => {
                self.store_failed(&error);
                return self.settle_here(workspace, report);
            }
        };
        self.store_answered();
        self.record_shared_expired(reply.expired);
        let answered_at = reply.counters.at;
        // Judged by the reset the answer knows: one made after the store
        // settled this call, and loaded first, did not touch it.
        let settled = match (settled, held_charged_us) {
            (Settled::Reservation(reservation), Some(charged_us)) => Settled::Reservation(
                reservation.as_in_shared_store(charged_us, reply.counters.last_reset_us),
            ),
            (settled, _) => settled,
        };
        let (reported, change) = {
            let mut cell = slot.lock();
            cell.state.load_shared(&reply.counters);
            let blocks_before = cell.state.shared_blocks();
            let counted = match &settled {
                Settled::Reservation(reservation) => tokens.unwrap_or(reservation.estimated_tokens),
                Settled::Unreserved | Settled::Missing => tokens.unwrap_or(0),
            };
            let recorded = cell.state.conclude_record(
                &report.outcome(),
                settled,
                counted,
                answered_at,
                &self.settings,
                &mut fresh_id,
            );
            let change = BlockChange::between(blocks_before, cell.state.shared_blocks());
            let reported =
                self.conclude_settlement(&slot, cell, answered_at, workspace, &report, recorded);
            (reported, change)
        };
        if let Some(change) = change {
            self.write_blocks(&slot, workspace, change).await;
        }
        self.agree_when_due(workspace, &slot).await;
        Ok(reported)
    }

    /// Settles a call whose end is noticed outside async code (a response
    /// body dropped): at once with in-process counters, or in a task of its
    /// own with shared ones (at once and locally when no runtime is left to
    /// run one, at shutdown). `then` gets the result either way, so that the
    /// caller need not know where the counters live.
    pub fn settle_detached(
        self: &Arc<Self>,
        workspace: WorkspaceId,
        report: UsageReport,
        then: impl FnOnce(Result<Reported, EngineError>) + Send + 'static,
    ) {
        match (&self.shared, tokio::runtime::Handle::try_current()) {
            (Some(_), Ok(runtime)) => {
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
    /// waiting (a client that leaves): the shared store may apply a
    /// settlement after that, and the call must still count here. So work
    /// that travels to the store runs as a task of its own; without one,
    /// settling never waits, and nothing can stop it halfway.
    pub async fn to_the_end<F>(&self, work: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if self.shared.is_none() {
            return work.await;
        }
        match tokio::spawn(work).await {
            Ok(output) => output,
            // Nothing cancels it: what can end it early is a panic, passed on.
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    /// Settles a reservation made here during an outage. What the store
    /// must learn (tokens beyond the estimate, blocks) waits with the
    /// usage counted alone, for the merge.
    fn settle_made_offline(
        &self,
        slot: &Slot,
        workspace: &WorkspaceId,
        report: UsageReport,
        estimate: u64,
    ) -> Result<Reported, EngineError> {
        let beyond_estimate = report
            .tokens
            .map_or(0, |tokens| tokens.total().saturating_sub(estimate));
        let reported = self.settle_here(workspace, report)?;
        // One that expired first kept its estimate, and no more.
        if !reported.missing_reservation {
            slot.lock().offline.tokens += beyond_estimate;
        }
        if let Some(shared) = &self.shared {
            shared.merge_pending.store(true, Ordering::Release);
        }
        Ok(reported)
    }

    /// Writes a change of the upstream blocks to the store, and loads its
    /// answer.
    async fn write_blocks(&self, slot: &Slot, workspace: &WorkspaceId, change: BlockChange) {
        let Some(shared) = &self.shared else {
            return;
        };
        let timezone = slot.lock().state.config().timezone;
        match shared
            .counters
            .block(workspace, timezone, self.now(), change)
            .await
        {
            Ok(reply) => self.load_reply(workspace, slot, &reply).await,
            Err(error) => self.store_failed(&error),
        }
    }

    /// Brings a workspace's state up to the shared counters, so that what it
    /// shows includes what other instances counted.
    pub async fn refresh(&self, workspace: &WorkspaceId) -> Result<(), EngineError> {
        let slot = self.slot(workspace)?;
        self.reload(workspace, &slot).await;
        Ok(())
    }

    /// Loads a workspace from the store; answers whether it could.
    async fn reload(&self, workspace: &WorkspaceId, slot: &Slot) -> bool {
        let Some(shared) = &self.shared else {
            return true;
        };
        let timezone = slot.lock().state.config().timezone;
        match shared.counters.peek(workspace, timezone, self.now()).await {
            Ok(reply) => {
                self.store_answered();
                self.load_reply(workspace, slot, &reply).await;
                true
            }
            Err(error) => {
                self.store_failed(&error);
                false
            }
        }
    }

    /// Resets one workspace (or all) here and in the shared counters.
    pub async fn reset(
        &self,
        workspace: Option<&WorkspaceId>,
        scope: ResetScope,
    ) -> Result<Vec<WorkspaceId>, EngineError> {
        if let Some(shared) = &self.shared {
            let targets = match workspace {
                Some(id) => vec![(id.clone(), self.slot(id)?)],
                None => self.all_slots(),
            };
            for (id, slot) in targets {
                let timezone = slot.lock().state.config().timezone;
                let reply = shared
                    .counters
                    .reset(&id, timezone, self.now(), scope)
                    .await
                    .map_err(|error| {
                        self.store_failed(&error);
                        EngineError::SharedStore(error.to_string())
                    })?;
                // The reset's time, loaded, tells the reservations held here
                // that it cleared from those charged after it.
                self.load_reply(&id, &slot, &reply).await;
            }
        }
        let done = self.reset_here(workspace, scope)?;
        // The episodes the reset ended end in the store before it answers,
        // so that a cause raised again after it is a new notification.
        for id in &done {
            if let Ok(slot) = self.slot(id) {
                self.agree_when_due(id, &slot).await;
            }
        }
        Ok(done)
    }

    /// Called by the ticker: while cut off, tries the store, so that shared
    /// counting resumes even when no request comes; once back, adds what
    /// was counted alone meanwhile. Requests never wait for either.
    pub async fn tend_shared_store(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let renew = !shared.degraded.load(Ordering::Acquire) && shared.renewal_due();
        self.agree_everywhere(renew).await;
        if shared.degraded.load(Ordering::Acquire) {
            if let Some((id, slot)) = self.all_slots().into_iter().next() {
                self.reload(&id, &slot).await;
            }
        } else if shared.merge_pending.swap(false, Ordering::AcqRel) {
            self.merge_offline(shared).await;
        }
    }

    /// Adds usage counted alone, and blocks seen alone, to the store.
    async fn merge_offline(&self, shared: &SharedCounting) {
        for (id, slot) in self.all_slots() {
            let (offline, blocks, timezone) = {
                let mut cell = slot.lock();
                let offline = std::mem::take(&mut cell.offline);
                (
                    offline,
                    std::mem::take(&mut cell.offline_blocks),
                    cell.state.config().timezone,
                )
            };
            if offline != Usage::default() {
                match shared
                    .counters
                    .count(&id, timezone, self.now(), offline)
                    .await
                {
                    Ok(reply) => self.load_reply(&id, &slot, &reply).await,
                    Err(error) => {
                        let mut cell = slot.lock();
                        cell.offline += offline;
                        cell.offline_blocks = cell.offline_blocks.or(blocks);
                        drop(cell);
                        shared.merge_pending.store(true, Ordering::Release);
                        self.store_failed(&error);
                        return;
                    }
                }
            }
            if let Some(change) = blocks {
                self.write_blocks(&slot, &id, change).await;
            }
        }
    }

    /// Loads a store's answer and lets the status follow it; its clock is
    /// the one every instance uses.
    async fn load_reply(&self, workspace: &WorkspaceId, slot: &Slot, reply: &Reply) {
        self.record_shared_expired(reply.expired.clone());
        let now = reply.counters.at;
        // A block, so that the lock is known to be gone before the await.
        {
            let mut cell = slot.lock();
            let changes =
                cell.state
                    .refresh_shared(&reply.counters, now, &self.settings, &mut fresh_id);
            self.conclude(slot, cell, now, changes, Touched::USAGE);
        }
        self.agree_when_due(workspace, slot).await;
    }

    /// Agrees on notification ids for the workspace if anything waits for
    /// it (see [`agree`](Self::agree)), so that the caller's answer comes
    /// after its notifications are out under their agreed ids.
    async fn agree_when_due(&self, workspace: &WorkspaceId, slot: &Slot) {
        if slot.agreement_due.load(Ordering::Acquire) {
            self.agree(&[(workspace, slot)], false).await;
        }
    }

    /// Agrees on notification ids wherever something waits for it, and
    /// with `renew`, renews this instance's holds on every workspace's
    /// episodes: many workspaces to a call, as a renewal concerns every
    /// workspace with an active notification, every second.
    async fn agree_everywhere(&self, renew: bool) {
        let due: Vec<(WorkspaceId, Arc<Slot>)> = self
            .all_slots()
            .into_iter()
            .filter(|(_, slot)| renew || slot.agreement_due.load(Ordering::Acquire))
            .collect();
        for batch in due.chunks(AGREEMENTS_PER_CALL) {
            let workspaces: Vec<(&WorkspaceId, &Slot)> =
                batch.iter().map(|(id, slot)| (id, slot.as_ref())).collect();
            self.agree(&workspaces, renew).await;
        }
    }

    /// Takes the workspaces' episode steps to the shared store, in the
    /// order their causes took them, and gives each notification raised
    /// here the id that names its cause's episode there: the first instance
    /// to raise a cause names the episode, the others adopt its id, so every
    /// instance's listeners and the history (written by the lease holder)
    /// see one notification. A notification nobody has seen yet is renamed;
    /// it and all that was published after it wait in the outbox until
    /// then. With `renew`, the call also renews this instance's hold on the
    /// episodes of its active notifications; one held under another id than
    /// the episode's (raised while the store was out of reach) is reissued
    /// under the episode's. Should the store not answer, the ids drawn here
    /// stand, until a renewal finds the store again.
    async fn agree(&self, workspaces: &[(&WorkspaceId, &Slot)], renew: bool) {
        let Some(shared) = &self.shared else {
            return;
        };
        // One agreement per workspace at a time, so that its steps reach
        // the store in order; never a workspace's lock across the call.
        // Only this holds several turns at once, so none waits for another
        // while holding one.
        let mut turns = Vec::with_capacity(workspaces.len());
        for (_, slot) in workspaces {
            turns.push(slot.agreeing.lock().await);
        }
        let steps: Vec<Vec<EpisodeStep>> = workspaces
            .iter()
            .map(|(_, slot)| slot.lock().episode_steps(renew))
            .collect();
        let sent: Vec<(&WorkspaceId, &EpisodeStep)> = workspaces
            .iter()
            .zip(&steps)
            .flat_map(|((id, _), steps)| steps.iter().map(move |step| (*id, step)))
            .collect();
        let answer = if sent.is_empty() {
            Ok(Vec::new())
        } else {
            shared
                .counters
                .agree_episodes(&shared.instance, EPISODE_HOLD, &sent)
                .await
        };
        let agreed = match answer {
            Ok(agreed) => {
                self.store_answered();
                agreed
            }
            Err(error) => {
                self.store_failed(&error);
                vec![None; sent.len()]
            }
        };
        let mut agreed = agreed.into_iter();
        for ((_, slot), steps) in workspaces.iter().zip(&steps) {
            let answers: Vec<Option<String>> = agreed.by_ref().take(steps.len()).collect();
            self.conclude_agreement(slot, steps, answers);
        }
    }

    /// Applies what the store answered to a workspace's episode steps, and
    /// sends what no longer waits.
    fn conclude_agreement(&self, slot: &Slot, steps: &[EpisodeStep], agreed: Vec<Option<String>>) {
        let now = self.now();
        let mut cell = slot.lock();
        let mut reissued = Vec::new();
        for (step, agreed) in steps.iter().zip(agreed) {
            let EpisodeStep::Hold { candidate, .. } = step else {
                continue;
            };
            let unseen = cell.take_unagreed(candidate);
            let Some(agreed) = agreed.filter(|agreed| agreed != candidate) else {
                continue;
            };
            if unseen {
                cell.rename(candidate, &agreed);
            } else {
                reissued.extend(cell.state.reissue_notification(candidate, &agreed, now));
            }
        }
        // A reissued notification keeps its cause's episode: no steps.
        let published = self.queue(&mut cell, now, reissued, false, false);
        self.send_agreed(&mut cell);
        if cell.episodes.is_empty() && cell.unagreed.is_empty() {
            slot.agreement_due.store(false, Ordering::Release);
        }
        drop(cell);
        published.log();
    }

    /// Records reservations that expired unsettled in the shared store, which
    /// any call may answer, in the history of the workspace each belongs to.
    fn record_shared_expired(&self, expired: Vec<ExpiredInStore>) {
        for finished in expired {
            if let Ok(slot) = self.slot(&finished.workspace) {
                record_expired_in_shared_store(&slot, finished.expired, finished.charged_us);
            }
        }
    }

    /// A call to the shared store failed: on the first failure of an outage,
    /// switch every workspace to the fallback and say so.
    fn store_failed(&self, error: &SharedError) {
        let Some(shared) = &self.shared else {
            return;
        };
        shared.errors.fetch_add(1, Ordering::Relaxed);
        if shared.degraded.load(Ordering::Acquire) {
            return;
        }
        let _switching = lock(&shared.switching);
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
        lock(&self.journal.pending_notifications).push(notification.clone());
        let _ = self
            .journal
            .events
            .send(super::Event::Notification(Arc::new(notification)));
        self.set_enforcement(shared.fallback());
    }

    /// A call to the shared store succeeded: after an outage, switch back to
    /// the shared counters, reload every workspace, and leave the merge of
    /// what was counted alone to the ticker.
    fn store_answered(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        if !shared.degraded.load(Ordering::Acquire) {
            return;
        }
        let _switching = lock(&shared.switching);
        if !shared.degraded.swap(false, Ordering::AcqRel) {
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
        shared.merge_pending.store(true, Ordering::Release);
        shared.resubscribe.notify_one();
    }

    /// Sets every workspace's enforcement; under `switching`.
    fn set_enforcement(&self, enforcement: Enforcement) {
        let now = self.now();
        for (_, slot) in self.all_slots() {
            let mut cell = slot.lock();
            let blocks_before = cell.state.shared_blocks();
            let changes =
                cell.state
                    .set_enforcement(enforcement, now, &self.settings, &mut fresh_id);
            if enforcement == Enforcement::Whole {
                // Blocks this instance saw alone are written with the merge.
                cell.offline_blocks = cell.offline_blocks.or(BlockChange::between(
                    cell.outage_blocks.take().unwrap_or(blocks_before),
                    blocks_before,
                ));
            } else {
                cell.outage_blocks = Some(blocks_before);
            }
            // Always a status event: `degraded` changed.
            self.conclude(&slot, cell, now, changes, Touched::STATE.with_status());
        }
    }

    /// Follows what other instances change, for the life of the server:
    /// announcements mark workspaces stale and stale ones are reloaded every
    /// `FOLLOW_INTERVAL`, so local listeners see every instance's changes;
    /// meanwhile it keeps (or takes) the notification writer's lease.
    pub async fn follow_other_instances(self: Arc<Self>) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let mut reload = tokio::time::interval(FOLLOW_INTERVAL);
        let mut lease = tokio::time::interval(Duration::from_secs(1));
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changes = match shared.counters.changes().await {
                Ok(changes) => changes,
                Err(error) => {
                    tracing::debug!(%error, "cannot follow other instances yet");
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
                    _ = lease.tick() => self.renew_lease(&shared).await,
                    () = shared.resubscribe.notified() => break,
                }
            }
            tracing::debug!("subscribing again to other instances' changes");
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
        let stale: Vec<(WorkspaceId, Arc<Slot>)> = self
            .all_slots()
            .into_iter()
            .filter(|(_, slot)| slot.shared_stale.swap(false, Ordering::AcqRel))
            .collect();
        futures_util::stream::iter(stale)
            .for_each_concurrent(RELOAD_CONCURRENCY, |(id, slot)| async move {
                if !self.reload(&id, &slot).await {
                    slot.shared_stale.store(true, Ordering::Release);
                }
            })
            .await;
    }

    async fn renew_lease(&self, shared: &SharedCounting) {
        let asked = Instant::now();
        let held = shared
            .counters
            .hold_lease(&shared.instance, LEASE)
            .await
            .unwrap_or(false);
        // The lease runs from when it was asked for, by this clock.
        let until = held.then(|| asked + LEASE);
        let was_leader = std::mem::replace(&mut *lock(&shared.leader_until), until)
            .is_some_and(|until| asked < until);
        if held && !was_leader {
            tracing::info!("this instance now writes workspace notifications");
            shared.took_over.store(true, Ordering::Release);
        }
    }
}

/// A reservation held here, taken out to be settled in the shared store.
/// Should the settlement stop before the store answers (its caller went
/// away), the call still counts in history, with its estimate, as if the
/// reservation had expired: the store may have applied the settlement or
/// not, so it is not settled again.
struct HeldInSettlement<'a> {
    slot: &'a Slot,
    reservation: Option<Reservation>,
    charged_us: i64,
}

impl<'a> HeldInSettlement<'a> {
    fn new(slot: &'a Slot, reservation: Reservation, charged_us: i64) -> Self {
        Self {
            slot,
            reservation: Some(reservation),
            charged_us,
        }
    }

    /// The store answered: the settlement goes on with the reservation.
    fn settled(mut self) -> Reservation {
        self.reservation
            .take()
            .expect("a reservation in settlement until settled")
    }
}

impl Drop for HeldInSettlement<'_> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            record_expired_in_shared_store(self.slot, reservation.expired(), self.charged_us);
        }
    }
}

/// Records in a workspace's history a reservation the shared store charged
/// at `charged_us` that ended unsettled.
fn record_expired_in_shared_store(slot: &Slot, expired: Expired, charged_us: i64) {
    let mut cell = slot.lock();
    let finished = cell.state.expired_in_shared_store(expired, charged_us);
    record_expired(&mut cell, vec![finished]);
    slot.usage_dirty.store(true, Ordering::Release);
}
