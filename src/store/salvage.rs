//! Writing a batch that the database refused: the row (or rows) at fault are
//! found and dropped, and the rest is written, so that one bad row cannot
//! stop every later flush.
//!
//! A batch fails as a whole for two kinds of reasons. The database may be
//! unusable (down, unreachable, out of disk, its file removed): then every
//! row must be kept and retried later. Or the database may refuse one row
//! (a constraint, a value it cannot store): then retrying keeps failing, and
//! the batch never lands. The two are told apart by asking the database to
//! accept another write: a row is judged at fault only when it fails alone
//! while the database accepts a write just before, and fails again.

use super::{Batch, RollupDelta, RollupKey, Store, StoreError};
use crate::domain::limits::WorkspaceId;
use crate::domain::notification::Notification;
use crate::domain::time::Timestamp;

/// One write of a batch.
#[derive(Clone, Debug)]
pub enum Row {
    State(WorkspaceId, String),
    Notification(Notification),
    Rollup(RollupKey, RollupDelta),
}

impl Row {
    pub fn kind(&self) -> &'static str {
        match self {
            Row::State(..) => "state",
            Row::Notification(_) => "notification",
            Row::Rollup(..) => "rollup",
        }
    }

    /// The workspace the row belongs to; `None` for service-wide
    /// notifications.
    pub fn workspace(&self) -> Option<&WorkspaceId> {
        match self {
            Row::State(workspace, _) => Some(workspace),
            Row::Notification(notification) => notification.workspace.as_ref(),
            Row::Rollup(key, _) => Some(&key.workspace),
        }
    }

    /// What tells the row from the others of its workspace, for logs: short
    /// whatever the row holds.
    pub fn describe(&self) -> String {
        const SHOWN: usize = 100;
        match self {
            Row::State(_, state) => format!("saved state of {} bytes", state.len()),
            Row::Notification(notification) => {
                format!(
                    "notification {} ({})",
                    notification.id,
                    notification.kind.name()
                )
            }
            Row::Rollup(key, _) => {
                let model: String = key.model.chars().take(SHOWN).collect();
                let cut = if model.len() < key.model.len() {
                    format!("… ({} bytes)", key.model.len())
                } else {
                    String::new()
                };
                format!("history of minute {} for model {model:?}{cut}", key.minute)
            }
        }
    }
}

impl Batch {
    pub fn into_rows(self) -> Vec<Row> {
        let states = self
            .states
            .into_iter()
            .map(|(workspace, state)| Row::State(workspace, state));
        let notifications = self.notifications.into_values().map(Row::Notification);
        let rollups = self
            .rollups
            .into_iter()
            .map(|(key, delta)| Row::Rollup(key, delta));
        states.chain(notifications).chain(rollups).collect()
    }

    pub fn from_rows(rows: impl IntoIterator<Item = Row>) -> Batch {
        let mut batch = Batch::default();
        for row in rows {
            match row {
                Row::State(workspace, state) => {
                    batch.states.insert(workspace, state);
                }
                Row::Notification(notification) => {
                    batch
                        .notifications
                        .insert(notification.id.clone(), notification);
                }
                Row::Rollup(key, delta) => *batch.rollups.entry(key).or_default() += delta,
            }
        }
        batch
    }
}

/// A row the database refused while it accepted other writes.
#[derive(Debug)]
pub struct Refused {
    pub row: Row,
    pub error: StoreError,
}

/// What [`Store::write_or_salvage`] did with a batch.
#[derive(Debug, Default)]
pub struct Salvage {
    /// Rows the database refused, dropped so that the rest could be written.
    pub refused: Vec<Refused>,
    /// What could not be written because the database does not accept
    /// writes now; to be retried.
    pub unwritten: Batch,
    /// Why the database does not accept writes; `None` when everything but
    /// the refused rows was written.
    pub error: Option<StoreError>,
}

/// Whether an error is the database's answer to the statement itself,
/// rather than a failure to reach it.
fn is_answer(error: &StoreError) -> bool {
    matches!(error, StoreError::Database(sqlx::Error::Database(_)))
}

impl Store {
    /// Writes `batch` as [`Store::write_batch`] does; when it fails while
    /// the database accepts other writes, splits it in halves until the rows
    /// at fault are alone, writes the rest, and returns those rows. When the
    /// database does not accept writes, nothing is dropped: what was not
    /// written comes back in [`Salvage::unwritten`].
    pub async fn write_or_salvage(&self, batch: Batch, now: Timestamp) -> Salvage {
        let error = match self.write_batch(&batch, now).await {
            Ok(()) => return Salvage::default(),
            Err(error) => error,
        };
        if self.probe(now).await.is_err() {
            return Salvage {
                refused: Vec::new(),
                unwritten: batch,
                error: Some(error),
            };
        }
        let mut refused = Vec::new();
        // Parts that failed, each to be split (or judged, when one row).
        let mut failed = vec![batch.into_rows()];
        while let Some(mut rows) = failed.pop() {
            if rows.len() > 1 {
                let second = rows.split_off(rows.len() / 2);
                for half in [rows, second] {
                    let part = Batch::from_rows(half.iter().cloned());
                    if self.write_batch(&part, now).await.is_err() {
                        failed.push(half);
                    }
                }
                continue;
            }
            let Some(row) = rows.pop() else { continue };
            let alone = Batch::from_rows([row.clone()]);
            // Whether the write failed, and whether the row is at fault.
            let outcome = match self.probe(now).await {
                Ok(()) => self
                    .write_batch(&alone, now)
                    .await
                    .map_err(|error| (is_answer(&error), error)),
                Err(error) => Err((false, error)),
            };
            match outcome {
                Ok(()) => {}
                Err((true, error)) => refused.push(Refused { row, error }),
                Err((false, error)) => {
                    // The database stopped accepting writes meanwhile: keep
                    // this row and every part not yet written.
                    failed.push(vec![row]);
                    return Salvage {
                        refused,
                        unwritten: Batch::from_rows(failed.into_iter().flatten()),
                        error: Some(error),
                    };
                }
            }
        }
        Salvage {
            refused,
            unwritten: Batch::default(),
            error: None,
        }
    }
}
