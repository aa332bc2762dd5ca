//! Publishing what an operation on a workspace changed: events for
//! listeners and notification versions for the flush, in the order the
//! changes happened, held back in the workspace's outbox while their
//! notification ids are being agreed on with other instances.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use super::slot::{Cell, Slot};
use super::{Engine, Event};
use crate::domain::limits::WorkspaceId;
use crate::domain::notification::{NotificationKind, Severity};
use crate::domain::status::{Change, Status};
use crate::domain::time::Timestamp;
use crate::sync::lock;

impl Engine {
    /// The end of every operation on a workspace's state. Publishes what it
    /// changed while the lock is still held, so that events and stored
    /// notification versions keep the order in which the changes happened
    /// (sending never blocks): notification versions for the flush, and
    /// events for listeners (a status event when the status changed, or
    /// always when `touched.status`). With counters shared with other
    /// instances, a raised notification and what follows it wait in the
    /// workspace's outbox until its id is agreed on (see
    /// `redis_counting::agree`). Then releases the lock, marks the workspace
    /// for the flush and the usage publisher as `touched` says, and logs.
    pub(super) fn conclude(
        &self,
        slot: &Slot,
        mut cell: MutexGuard<'_, Cell>,
        now: Timestamp,
        changes: Vec<Change>,
        touched: Touched,
    ) {
        let published = self.queue(
            &mut cell,
            now,
            changes,
            touched.status,
            self.agrees_on_ids(),
        );
        if !cell.episodes.is_empty() {
            slot.agreement_due.store(true, Ordering::Release);
        }
        self.send_agreed(&mut cell);
        drop(cell);
        if touched.state {
            slot.dirty.store(true, Ordering::Release);
        }
        if touched.usage {
            slot.usage_dirty.store(true, Ordering::Release);
        }
        published.log();
    }

    /// Queues what `changes` publish in the workspace's outbox, with the
    /// episode steps of their notifications when `agreeing`.
    pub(super) fn queue(
        &self,
        cell: &mut Cell,
        now: Timestamp,
        changes: Vec<Change>,
        always_status: bool,
        agreeing: bool,
    ) -> Published {
        let mut published = Published {
            workspace: None,
            transition: None,
            notifications: Vec::new(),
        };
        let mut status_changed = always_status;
        for change in changes {
            match change {
                Change::Status { from, to } => {
                    status_changed = true;
                    if from != to {
                        published.transition = Some((from, to, Vec::new()));
                    }
                }
                Change::Raised(notification) | Change::Resolved(notification) => {
                    published.notifications.push((
                        notification.kind,
                        notification.severity,
                        notification.resolved_at.is_some(),
                    ));
                    if agreeing {
                        cell.note_episode(&notification);
                    }
                    cell.outbox
                        .push_back(Event::Notification(Arc::new(notification)));
                }
            }
        }
        if status_changed {
            let snapshot = Arc::new(cell.state.snapshot(now));
            if let Some((_, _, reasons)) = &mut published.transition {
                reasons.clone_from(&snapshot.reasons);
            }
            cell.outbox.push_back(Event::Status(snapshot));
        }
        if published.transition.is_some() || !published.notifications.is_empty() {
            published.workspace = Some(cell.state.config().id.clone());
        }
        published
    }

    /// Sends what the workspace's outbox holds, in order, up to the first
    /// notification whose id is not agreed on yet; notifications go to the
    /// database too.
    pub(super) fn send_agreed(&self, cell: &mut Cell) {
        while let Some(event) = cell.outbox.front() {
            if let Event::Notification(notification) = event {
                if cell.unagreed.contains(&notification.id) {
                    return;
                }
                lock(&self.journal.pending_notifications).push(notification.as_ref().clone());
            }
            if let Some(event) = cell.outbox.pop_front() {
                let _ = self.journal.events.send(event);
            }
        }
    }
}

/// What an operation touched besides its changes (see `Engine::conclude`).
#[derive(Clone, Copy)]
pub(super) struct Touched {
    /// A status event goes out even if the status did not change (a reset,
    /// new settings, a change of mode).
    pub(super) status: bool,
    /// The saved state changed: the flush writes it.
    pub(super) state: bool,
    /// Usage moved: listeners get a usage event.
    pub(super) usage: bool,
}

impl Touched {
    /// The state changed, and usage with it.
    pub(super) const USAGE: Touched = Touched {
        status: false,
        state: true,
        usage: true,
    };
    /// The state changed.
    pub(super) const STATE: Touched = Touched {
        status: false,
        state: true,
        usage: false,
    };

    /// And a status event goes out whatever changed.
    pub(super) const fn with_status(self) -> Touched {
        Touched {
            status: true,
            ..self
        }
    }
}

/// What an operation changed, to be logged outside the workspace's lock.
#[must_use]
pub(super) struct Published {
    /// Named only when there is something to log: the id is read from a
    /// part of the state that an admission far from every limit does not
    /// otherwise touch.
    workspace: Option<WorkspaceId>,
    transition: Option<(Status, Status, Vec<String>)>,
    notifications: Vec<(NotificationKind, Severity, bool)>,
}

impl Published {
    pub(super) fn log(self) {
        let Some(workspace) = &self.workspace else {
            return;
        };
        if let Some((from, to, reasons)) = &self.transition {
            tracing::info!(
                workspace = %workspace,
                from = from.name(),
                to = to.name(),
                reasons = ?reasons,
                "status changed"
            );
        }
        for (kind, severity, resolved) in self.notifications {
            tracing::info!(
                workspace = %workspace,
                kind = kind.name(),
                severity = severity.name(),
                "notification {}",
                if resolved { "resolved" } else { "raised" }
            );
        }
    }
}
