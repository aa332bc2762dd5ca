//! Following what other instances change in Redis: announcements on its
//! change channel mark workspaces stale, and stale ones are reloaded, or
//! name a credential whose billing block is loaded at once; and the lease
//! that names the one instance writing notifications.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::RedisCounting;
use crate::domain::credential::CredentialId;
use crate::domain::limits::WorkspaceId;
use crate::engine::Engine;
use crate::engine::slot::Slot;
use crate::redis::Announcement;
use crate::sync::lock;

/// How often workspaces changed by other instances are reloaded: well
/// within the second in which their clients must see the change.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// How long the notification writer's lease lasts; renewed every second.
const LEASE: Duration = Duration::from_secs(3);

/// How many workspaces are reloaded at once.
const RELOAD_CONCURRENCY: usize = 16;

impl Engine {
    /// Follows what other instances change, for the life of the server:
    /// announcements mark workspaces stale and stale ones are reloaded every
    /// `FOLLOW_INTERVAL`, so local listeners see every instance's changes;
    /// meanwhile it keeps (or takes) the notification writer's lease.
    pub(in crate::engine) async fn follow_redis(&self, redis: &RedisCounting) {
        let mut reload = tokio::time::interval(FOLLOW_INTERVAL);
        let mut lease = tokio::time::interval(Duration::from_secs(1));
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changes = match redis.counters.changes().await {
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
            for credential in self.known_credentials() {
                self.reload_credential(redis, &credential).await;
            }
            let mut changes = std::pin::pin!(changes);
            loop {
                tokio::select! {
                    change = changes.next() => match change {
                        Some(Announcement::Workspace(workspace, version)) => {
                            self.note_change(&workspace, version);
                        }
                        Some(Announcement::Credential(credential)) => {
                            self.reload_credential(redis, &credential).await;
                        }
                        None => break,
                    },
                    _ = reload.tick() => self.reload_stale(redis).await,
                    _ = lease.tick() => self.renew_lease(redis).await,
                    () = redis.resubscribe.notified() => break,
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
        if slot.lock().mirror.version() < version {
            slot.shared_stale.store(true, Ordering::Release);
        }
    }

    /// Loads the billing block of `credential` as Redis keeps it.
    async fn reload_credential(&self, redis: &RedisCounting, credential: &CredentialId) {
        let interval = self.settings().probe_interval;
        match redis.counters.credential_block(credential, interval).await {
            Ok(stored) => self.load_credential_block(credential, stored),
            Err(error) => tracing::debug!(%credential, %error, "cannot load a credential's block"),
        }
    }

    async fn reload_stale(&self, redis: &RedisCounting) {
        let stale: Vec<(WorkspaceId, Arc<Slot>)> = self
            .all_slots()
            .into_iter()
            .filter(|(_, slot)| slot.shared_stale.swap(false, Ordering::AcqRel))
            .collect();
        futures_util::stream::iter(stale)
            .for_each_concurrent(RELOAD_CONCURRENCY, |(id, slot)| async move {
                if !self.reload(redis, &id, &slot).await {
                    slot.shared_stale.store(true, Ordering::Release);
                }
            })
            .await;
    }

    async fn renew_lease(&self, redis: &RedisCounting) {
        let asked = Instant::now();
        let held = redis
            .counters
            .hold_lease(&redis.instance, LEASE)
            .await
            .unwrap_or(false);
        // The lease runs from when it was asked for, by this clock.
        let until = held.then(|| asked + LEASE);
        let was_leader = std::mem::replace(&mut *lock(&redis.leader_until), until)
            .is_some_and(|until| asked < until);
        if held && !was_leader {
            tracing::info!("this instance now writes workspace notifications");
            redis.took_over.store(true, Ordering::Release);
        }
    }
}
