//! One workspace in memory: its state behind a lock (`Cell`) and the flags
//! read without it (`Slot`): whether the flush must write it, whether usage
//! moved, whether another instance changed it, and the agreement on its
//! notification ids.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::FxHashMap;

use super::Event;
use super::redis_counting::Mirror;
use crate::domain::model::DailyModels;
use crate::domain::notification::Notification;
use crate::domain::time::Timestamp;
use crate::domain::workspace::{Expired, Model, WorkspaceState};
use crate::redis::EpisodeStep;
use crate::store::RollupDelta;
use crate::sync::lock;

/// A workspace's state and what goes with it, behind the slot's lock.
///
/// Laid out in declaration order (`repr(C)`), like [`Slot`]: what every
/// call reads comes first, on the cache lines of the lock itself.
#[repr(C)]
pub(super) struct Cell {
    /// The steps the workspace's causes took since the last agreement,
    /// in order, for the shared store (see [`EpisodeStep`]).
    pub(super) episodes: Vec<EpisodeStep>,
    /// What was published, in order, waiting to be sent until the
    /// notifications it names carry the ids agreed on with the other
    /// instances (see `redis_counting::agree`); empty otherwise.
    pub(super) outbox: VecDeque<Event>,
    /// Finished requests not yet flushed, by (minute start, model).
    pub(super) rollups: FxHashMap<(i64, Option<Model>), RollupDelta>,
    /// The model names history keeps for the workspace's days, so that
    /// neither `rollups` nor the database grows with every name a client
    /// makes up.
    pub(super) models: DailyModels,
    pub(super) state: WorkspaceState,
    /// What is kept beside the state when the counters live in Redis.
    pub(super) mirror: Mirror,
    /// Ids drawn here for raised notifications whose agreed ids are not
    /// known yet: nobody sees these notifications before they are.
    pub(super) unagreed: Vec<String>,
}

/// A workspace as the engine holds it.
///
/// Laid out in declaration order (`repr(C)`): the flags every call writes
/// come first, beside the reference count and the lock, so that a call on a
/// workspace whose state is not in the CPU's cache touches one cache line
/// for all three.
#[repr(C)]
pub(super) struct Slot {
    /// The state changed since the last flush.
    pub(super) dirty: AtomicBool,
    /// Usage changed since the last usage event.
    pub(super) usage_dirty: AtomicBool,
    /// Another instance changed the shared counters since they were last
    /// loaded here.
    pub(super) shared_stale: AtomicBool,
    /// Episode steps or unagreed ids are waiting (set and cleared under the
    /// cell's lock), so that the request path asks only when they are.
    pub(super) agreement_due: AtomicBool,
    /// When the ticker must tick the workspace next, in milliseconds: the
    /// state's next change as of its last tick, or at once (`i64::MIN`)
    /// once anything else took the lock. Written only under the lock, so
    /// that the last writer is the last one to have seen the state.
    tick_due_at: AtomicI64,
    pub(super) cell: Mutex<Cell>,
    /// Held while agreeing on notification ids with the other instances,
    /// so that a workspace's episode steps reach the store in order.
    pub(super) agreeing: tokio::sync::Mutex<()>,
}

impl Slot {
    pub(super) fn new(state: WorkspaceState) -> Arc<Self> {
        Arc::new(Self {
            cell: Mutex::new(Cell {
                state,
                rollups: FxHashMap::default(),
                models: DailyModels::default(),
                mirror: Mirror::default(),
                outbox: VecDeque::new(),
                episodes: Vec::new(),
                unagreed: Vec::new(),
            }),
            dirty: AtomicBool::new(true),
            usage_dirty: AtomicBool::new(false),
            shared_stale: AtomicBool::new(false),
            agreeing: tokio::sync::Mutex::new(()),
            agreement_due: AtomicBool::new(false),
            tick_due_at: AtomicI64::new(i64::MIN),
        })
    }

    /// The cell, for anything but the ticker: whatever it does may change
    /// what a tick would, so the workspace is due for the next tick.
    pub(super) fn lock(&self) -> MutexGuard<'_, Cell> {
        let cell = lock(&self.cell);
        self.tick_due_at.store(i64::MIN, Ordering::Release);
        cell
    }

    /// The cell, for the ticker, which says when the next tick is due with
    /// [`tick_next_at`](Self::tick_next_at).
    pub(super) fn lock_to_tick(&self) -> MutexGuard<'_, Cell> {
        lock(&self.cell)
    }

    /// Whether the ticker must tick the workspace at `now`.
    pub(super) fn tick_due(&self, now: Timestamp) -> bool {
        self.tick_due_at.load(Ordering::Acquire) <= now.millis()
    }

    /// Sets when the ticker must tick the workspace next; `cell`, the
    /// ticker's guard, proves the lock is held.
    pub(super) fn tick_next_at(&self, _cell: &MutexGuard<'_, Cell>, at: Timestamp) {
        self.tick_due_at.store(at.millis(), Ordering::Release);
    }
}

impl Cell {
    /// The active notifications listeners may see: those whose ids are
    /// agreed on.
    pub(super) fn agreed_notifications(&self) -> impl Iterator<Item = &Notification> {
        self.state
            .active_notifications()
            .iter()
            .filter(|notification| !self.unagreed.contains(&notification.id))
    }

    /// Loads counters stored in Redis (see [`Mirror::load`]).
    pub(super) fn load_stored(&mut self, stored: &crate::redis::StoredCounters) -> bool {
        self.mirror.load(&mut self.state, stored)
    }

    /// Queues the step a raised or resolved notification takes in its
    /// cause's episode, unless its id is derived from shared facts.
    pub(super) fn note_episode(&mut self, notification: &Notification) {
        let Some(cause) = notification
            .cause
            .filter(|cause| !WorkspaceState::derives_notification_id(*cause))
        else {
            return;
        };
        if notification.is_active() {
            self.unagreed.push(notification.id.clone());
            self.episodes.push(EpisodeStep::Hold {
                cause,
                candidate: notification.id.clone(),
            });
        } else {
            self.episodes.push(EpisodeStep::Release { cause });
        }
    }

    /// The episode steps to take in the shared store: those taken since
    /// the last agreement, in order, and with `renew`, a hold on the
    /// episode of every active notification whose id is agreed on.
    pub(super) fn episode_steps(&mut self, renew: bool) -> Vec<EpisodeStep> {
        let mut steps = std::mem::take(&mut self.episodes);
        if renew {
            let held: Vec<EpisodeStep> = self
                .agreed_notifications()
                .filter_map(|notification| {
                    let cause = notification.cause?;
                    (!WorkspaceState::derives_notification_id(cause)).then(|| EpisodeStep::Hold {
                        cause,
                        candidate: notification.id.clone(),
                    })
                })
                .collect();
            steps.extend(held);
        }
        steps
    }

    /// Counts `id` as agreed on; answers whether it was waiting for that
    /// (and so was seen by nobody yet).
    pub(super) fn take_unagreed(&mut self, id: &str) -> bool {
        let waiting = self.unagreed.len();
        self.unagreed.retain(|unagreed| unagreed != id);
        self.unagreed.len() != waiting
    }

    /// Gives a notification nobody saw yet its agreed id, in the state and
    /// in what waits to be published about it.
    pub(super) fn rename(&mut self, from: &str, to: &str) {
        self.state.rename_notification(from, to);
        for event in &mut self.outbox {
            if let Event::Notification(notification) = event
                && notification.id == from
            {
                to.clone_into(&mut Arc::make_mut(notification).id);
            }
        }
    }

    /// Records `delta` for a call of `model` finished (or refused) at
    /// `at` in history: in its minute, under the name its day keeps for
    /// the model.
    pub(super) fn record_history(
        &mut self,
        at: Timestamp,
        model: Option<Model>,
        delta: RollupDelta,
    ) {
        let model = self.models.name(model, at, self.state.config().timezone);
        *self.rollups.entry((minute_of(at), model)).or_default() += delta;
    }
}

fn minute_of(at: Timestamp) -> i64 {
    at.millis() - at.millis().rem_euclid(60_000)
}

/// A count as stored, where counts are signed.
pub(super) fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Expired reservations are finished requests whose estimate became final
/// (as far as the counters that charged them count it).
pub(super) fn record_expired(cell: &mut Cell, expired: Vec<Expired>) {
    for finished in expired {
        let finished = cell.mirror.as_counted(finished);
        let delta = RollupDelta {
            requests: 1,
            tokens: count(finished.usage.tokens),
            usd_nano: count(finished.usage.usd),
            ..RollupDelta::default()
        };
        // Its estimate is final: it counts in the spend by model as in
        // history, without a token mix (what it would have used is unknown).
        if let Some(model) = &finished.model
            && finished.usage.usd > 0
        {
            cell.state
                .note_spend(finished.charged_at, model, delta.spend());
        }
        cell.record_history(finished.charged_at, finished.model, delta);
    }
}
