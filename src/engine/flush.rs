//! The background task that makes the engine durable: every flush interval
//! it writes what changed in one transaction and prunes old history.
//!
//! Failure mode: when the database does not accept writes, the batch is
//! kept and merged with the next one, the engine raises a service-wide
//! notification and `/readyz` reports the problem; enforcement goes on from
//! memory. Nothing counted is dropped until the process ends, so a `kill -9`
//! loses at most one interval (or the whole outage, if the database never
//! came back). The one exception is a row the database refuses while it
//! accepts the others (`Store::write_or_salvage`): it would fail every later
//! flush, so it is logged, counted in `quotawatch_store_rows_dropped_total`
//! and dropped, and the rest is written.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::Engine;
use crate::domain::time::Timestamp;
use crate::store::{Batch, Store};

/// How often old rollups and notifications are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// After how many flushes, when other instances count the same
/// workspaces, each workspace's spend by model is read again from history,
/// so that it counts their calls too (every minute at the default flush
/// interval): a status never reads the database, and a minute behind is
/// close enough for a figure by model (the totals are shared and exact).
const SPEND_REFRESH_FLUSHES: u32 = 60;

/// How far back spend by model is read: a month and a day covers this
/// month of every timezone.
pub const SPEND_HISTORY: Duration = Duration::from_secs(32 * 86_400);

enum Command {
    Stop(oneshot::Sender<()>),
}

/// Asks the flush task to write one last time and stop.
#[derive(Clone)]
pub struct FlushHandle {
    commands: mpsc::Sender<Command>,
}

impl FlushHandle {
    /// Writes everything pending and stops the task.
    pub async fn stop(&self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Stop(done)).await.is_ok() {
            let _ = finished.await;
        }
    }
}

struct Flusher {
    engine: Arc<Engine>,
    store: Store,
    /// Writes that failed, kept until they succeed.
    unwritten: Batch,
    /// Keys' last uses not written yet, by key id.
    key_uses: HashMap<String, Timestamp>,
}

pub fn spawn(
    engine: Arc<Engine>,
    store: Store,
    interval: Duration,
) -> (FlushHandle, JoinHandle<()>) {
    let (commands, receiver) = mpsc::channel(64);
    let flusher = Flusher {
        engine,
        store,
        unwritten: Batch::default(),
        key_uses: HashMap::new(),
    };
    let task = tokio::spawn(flusher.run(receiver, interval));
    (FlushHandle { commands }, task)
}

impl Flusher {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut next_prune = Instant::now() + Duration::from_secs(60);
        let spend_refresh = interval * SPEND_REFRESH_FLUSHES;
        let mut next_spend_refresh = Instant::now() + spend_refresh;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                command = commands.recv() => match command {
                    Some(Command::Stop(done)) => {
                        if let Err(error) = self.flush().await {
                            tracing::error!(%error, "final flush failed; unwritten changes are lost");
                        }
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        let _ = self.flush().await;
                        return;
                    }
                },
            }
            if self.engine.took_over_notifications() {
                self.reconcile_notifications().await;
            }
            // A failure is reported by `flush` itself and retried next time.
            let _ = self.flush().await;
            if self.engine.shares_workspaces() && Instant::now() >= next_spend_refresh {
                next_spend_refresh = Instant::now() + spend_refresh;
                self.refresh_spend().await;
            }
            if Instant::now() >= next_prune {
                next_prune = Instant::now() + PRUNE_EVERY;
                match self.store.prune(self.engine.now()).await {
                    Ok(deleted) => tracing::debug!(deleted, "pruned old history"),
                    Err(error) => tracing::warn!(%error, "pruning history failed"),
                }
            }
        }
    }

    /// Reads spend by model again from history: the database's rows and
    /// the writes this task still holds, with the flush held back so that
    /// every recorded call is counted once (see `Engine::load_spend`).
    async fn refresh_spend(&mut self) {
        let engine = self.engine.clone();
        let _flushing = engine.flushing().await;
        let since = engine.now().millis() - SPEND_HISTORY.as_millis() as i64;
        let mut rows = match self.store.spend_by_day(since).await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "reading spend by model failed; the figures kept stay");
                return;
            }
        };
        rows.extend(self.unwritten.rollups.iter().map(|(key, delta)| {
            (
                key.workspace.clone(),
                key.minute,
                key.model.clone(),
                delta.spend(),
            )
        }));
        engine.load_spend(rows);
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.record_key_uses().await;
        let engine = self.engine.clone();
        let flushing = engine.flushing().await;
        self.unwritten.absorb(self.engine.take_batch());
        if self.unwritten.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.unwritten);
        let notifications = !batch.notifications.is_empty();
        let salvage = self.store.write_or_salvage(batch, self.engine.now()).await;
        drop(flushing);
        if notifications {
            self.engine.note_notifications_written();
        }
        for refused in &salvage.refused {
            tracing::error!(
                workspace = %refused.row.workspace().map(ToString::to_string).unwrap_or_default(),
                row = refused.row.kind(),
                what = %refused.row.describe(),
                error = %refused.error,
                "the database refused a row; it is dropped so that the rest can be written"
            );
        }
        self.engine.count_dropped_rows(salvage.refused.len() as u64);
        self.unwritten = salvage.unwritten;
        match salvage.error {
            None => {
                self.engine.storage_recovered();
                Ok(())
            }
            Some(error) => {
                let error = error.to_string();
                tracing::warn!(%error, pending = self.unwritten.len(), "flush failed; will retry");
                self.engine.storage_failed(&error);
                Err(error)
            }
        }
    }

    /// Writes when keys were last used. Apart from the batch: a failure here
    /// only delays these times (they are kept and retried), and never holds
    /// up counters and notifications.
    async fn record_key_uses(&mut self) {
        for (id, at) in self.engine.take_key_uses() {
            let latest = self.key_uses.entry(id).or_insert(at);
            *latest = (*latest).max(at);
        }
        if self.key_uses.is_empty() {
            return;
        }
        let uses: Vec<(String, Timestamp)> = self.key_uses.drain().collect();
        if let Err(error) = self.store.touch_keys(&uses).await {
            tracing::debug!(%error, "could not record when keys were last used; will retry");
            self.key_uses.extend(uses);
        }
    }

    /// After taking over writing notifications from another instance:
    /// what that instance left active, and this one does not hold, ended
    /// without anyone writing it; it is resolved now. This instance's own
    /// active notifications are written with the next flush.
    async fn reconcile_notifications(&mut self) {
        let stored = match self.store.notifications(None, false, i64::MAX).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%error, "could not read active notifications to reconcile");
                return;
            }
        };
        let held = self.engine.active_workspace_notifications();
        let now = self.engine.now();
        for mut notification in stored {
            if notification.workspace.is_none() || held.iter().any(|n| n.id == notification.id) {
                continue;
            }
            notification.resolved_at = Some(now);
            self.unwritten
                .notifications
                .insert(notification.id.clone(), notification);
        }
        for notification in held {
            self.unwritten
                .notifications
                .insert(notification.id.clone(), notification);
        }
    }
}
