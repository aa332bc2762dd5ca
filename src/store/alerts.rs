//! Alert delivery's tables: channels, the outbox of events (filled by
//! `Store::write_batch` in the flush's transaction), deliveries with the
//! claim that keeps two dispatchers from sending one at once, and attempts.
//! One query text per operation, for both databases, as in `mod.rs`.

use super::{Pool, Result, Store, crossing_from_json};
use crate::domain::alert::{ChannelKind, Filter, Phase};
use crate::domain::limits::WorkspaceId;
use crate::domain::notification::{Crossing, Notification, Severity};
use crate::domain::time::Timestamp;

/// Who made a channel: the API (and the dashboard), or the TOML file,
/// whose channels the API only reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelSource {
    Api,
    Config,
}

impl ChannelSource {
    pub const fn name(self) -> &'static str {
        match self {
            ChannelSource::Api => "api",
            ChannelSource::Config => "config",
        }
    }
}

/// A channel as stored, secret included: only the dispatcher reads that.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelRecord {
    pub id: String,
    pub name: String,
    /// `None` for a global channel.
    pub workspace: Option<WorkspaceId>,
    pub kind: ChannelKind,
    /// The receiver of a webhook or Slack channel; empty for an email
    /// channel, which has `recipients` instead.
    pub url: String,
    /// An email channel's addresses, checked when the channel was written;
    /// empty for the other kinds.
    pub recipients: Vec<String>,
    pub secret: Option<String>,
    pub filter: Filter,
    pub enabled: bool,
    pub source: ChannelSource,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One event of the outbox: a notification raised or resolved, as it read
/// then.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    pub id: String,
    pub notification_id: String,
    pub phase: Phase,
    pub workspace: Option<WorkspaceId>,
    /// The notification kind's name (`test` for a test send).
    pub kind: String,
    pub severity: Severity,
    pub title: String,
    pub message: String,
    pub suggested_actions: Vec<String>,
    pub limit: Option<String>,
    pub crossing: Option<Crossing>,
    pub resolves_at: Option<Timestamp>,
    pub occurred_at: Timestamp,
}

impl EventRecord {
    /// The event id of a notification's phase, the same on every instance.
    pub fn id_of(notification_id: &str, phase: Phase) -> String {
        format!("{notification_id}:{}", phase.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    GaveUp,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 3] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Delivered,
        DeliveryStatus::GaveUp,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::GaveUp => "gave_up",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.name() == name)
    }
}

/// One event for one channel.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryRecord {
    pub id: String,
    pub event_id: String,
    pub channel_id: String,
    pub workspace: Option<WorkspaceId>,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_at: Timestamp,
    pub first_attempt_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl DeliveryRecord {
    /// The delivery id of an event for a channel, the same on every
    /// instance: a receiver sees it as `webhook-id` on every retry.
    pub fn id_of(event_id: &str, channel_id: &str) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{event_id}\n{channel_id}"));
        format!("msg_{}", hex::encode(&digest[..12]))
    }
}

/// One attempt of a delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptRecord {
    pub delivery_id: String,
    pub number: u32,
    pub attempted_at: Timestamp,
    /// `delivered`, `retry` or `gave_up`.
    pub outcome: &'static str,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
    pub next_attempt_at: Option<Timestamp>,
    pub digest_id: Option<String>,
}

/// A delivery as listed: with its event's kind, phase and notification,
/// and its attempts, first first.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryView {
    pub delivery: DeliveryRecord,
    pub kind: String,
    pub phase: Phase,
    pub notification_id: String,
    pub attempts: Vec<AttemptRecord>,
}

/// What the list of deliveries is narrowed to.
#[derive(Clone, Debug, Default)]
pub struct DeliveryQuery {
    pub channel: Option<String>,
    pub workspace: Option<WorkspaceId>,
    pub status: Option<DeliveryStatus>,
    pub limit: i64,
}

/// The longest error text kept with an attempt, in characters.
pub const MAX_ATTEMPT_ERROR: usize = 500;

/// How long finished deliveries and their attempts are kept.
const DELIVERY_RETENTION_MS: i64 = 30 * 86_400_000;

type ChannelRow = (
    String,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
    String,
    i64,
    i64,
    Option<String>,
);

macro_rules! channel_columns {
    () => {
        "id, name, workspace_id, kind, url, secret, events, min_severity, resolutions, enabled, source, created_at, updated_at, recipients"
    };
}

type EventRow = (
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    i64,
);

macro_rules! event_columns {
    () => {
        "id, notification_id, phase, workspace_id, kind, severity, title, message, suggested_actions, limit_name, threshold, resolves_at, occurred_at"
    };
}

type DeliveryRow = (
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    i64,
    Option<i64>,
    i64,
    i64,
);

macro_rules! delivery_columns {
    ($prefix:literal) => {
        concat!(
            $prefix,
            "id, ",
            $prefix,
            "event_id, ",
            $prefix,
            "channel_id, ",
            $prefix,
            "workspace_id, ",
            $prefix,
            "status, ",
            $prefix,
            "attempts, ",
            $prefix,
            "next_attempt_at, ",
            $prefix,
            "first_attempt_at, ",
            $prefix,
            "created_at, ",
            $prefix,
            "updated_at"
        )
    };
}

type AttemptRow = (
    String,
    i64,
    i64,
    String,
    Option<i64>,
    Option<String>,
    i64,
    Option<i64>,
    Option<String>,
);

fn channel_from_row(row: ChannelRow) -> Option<ChannelRecord> {
    let (
        id,
        name,
        workspace,
        kind,
        url,
        secret,
        events,
        min_severity,
        resolutions,
        enabled,
        source,
        created_at,
        updated_at,
        recipients,
    ) = row;
    Some(ChannelRecord {
        id,
        name,
        workspace: match workspace {
            Some(workspace) => Some(workspace.parse().ok()?),
            None => None,
        },
        kind: ChannelKind::from_name(&kind)?,
        url,
        recipients: match recipients {
            Some(recipients) => serde_json::from_str(&recipients).ok()?,
            None => Vec::new(),
        },
        secret,
        filter: Filter {
            events: match events {
                Some(events) => Some(serde_json::from_str(&events).ok()?),
                None => None,
            },
            min_severity: Severity::from_name(&min_severity)?,
            resolutions: resolutions != 0,
        },
        enabled: enabled != 0,
        source: if source == ChannelSource::Config.name() {
            ChannelSource::Config
        } else {
            ChannelSource::Api
        },
        created_at: Timestamp::from_millis(created_at),
        updated_at: Timestamp::from_millis(updated_at),
    })
}

fn event_from_row(row: EventRow) -> Option<EventRecord> {
    let (
        id,
        notification_id,
        phase,
        workspace,
        kind,
        severity,
        title,
        message,
        actions,
        limit,
        threshold,
        resolves_at,
        occurred_at,
    ) = row;
    Some(EventRecord {
        id,
        notification_id,
        phase: Phase::from_name(&phase)?,
        workspace: match workspace {
            Some(workspace) => Some(workspace.parse().ok()?),
            None => None,
        },
        kind,
        severity: Severity::from_name(&severity)?,
        title,
        message,
        suggested_actions: serde_json::from_str(&actions).unwrap_or_default(),
        limit,
        crossing: threshold.as_deref().and_then(crossing_from_json),
        resolves_at: resolves_at.map(Timestamp::from_millis),
        occurred_at: Timestamp::from_millis(occurred_at),
    })
}

fn delivery_from_row(row: DeliveryRow) -> Option<DeliveryRecord> {
    let (
        id,
        event_id,
        channel_id,
        workspace,
        status,
        attempts,
        next_attempt_at,
        first_attempt_at,
        created_at,
        updated_at,
    ) = row;
    Some(DeliveryRecord {
        id,
        event_id,
        channel_id,
        workspace: match workspace {
            Some(workspace) => Some(workspace.parse().ok()?),
            None => None,
        },
        status: DeliveryStatus::from_name(&status)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        next_attempt_at: Timestamp::from_millis(next_attempt_at),
        first_attempt_at: first_attempt_at.map(Timestamp::from_millis),
        created_at: Timestamp::from_millis(created_at),
        updated_at: Timestamp::from_millis(updated_at),
    })
}

fn attempt_from_row(row: AttemptRow) -> Option<AttemptRecord> {
    let (
        delivery_id,
        number,
        attempted_at,
        outcome,
        http_status,
        error,
        duration_ms,
        next_attempt_at,
        digest_id,
    ) = row;
    Some(AttemptRecord {
        delivery_id,
        number: u32::try_from(number).ok()?,
        attempted_at: Timestamp::from_millis(attempted_at),
        outcome: ["delivered", "retry", "gave_up"]
            .into_iter()
            .find(|known| *known == outcome)?,
        http_status: http_status.and_then(|status| u16::try_from(status).ok()),
        error,
        duration_ms: u64::try_from(duration_ms).unwrap_or(0),
        next_attempt_at: next_attempt_at.map(Timestamp::from_millis),
        digest_id,
    })
}

/// The outbox's part of a flush, run in its transaction for each
/// notification before the notification itself is written (binds: event
/// id, notification id, phase, workspace, kind, severity, title, message,
/// suggested actions, limit, threshold, resolves_at, occurred_at). A
/// notification's `raised` event is enqueued when this write is its first,
/// its `resolved` event when this write first resolves it. Both are keyed
/// by notification and phase, so neither a second writer nor a rewrite
/// enqueues one twice, and the checks against the stored notification keep
/// a rewrite from enqueueing again after the outbox was pruned. A
/// workspace deleted meanwhile enqueues nothing, as its notification is
/// not written either.
pub(super) const ENQUEUE_EVENT: &str = concat!(
    "INSERT INTO alert_events (",
    event_columns!(),
    ") SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13",
    " WHERE ($4 IS NULL OR EXISTS (SELECT 1 FROM workspaces WHERE id = $4))",
    " AND NOT EXISTS (SELECT 1 FROM notifications WHERE id = $2 AND ($3 = 'raised' OR resolved_at IS NOT NULL))",
    " ON CONFLICT (notification_id, phase) DO NOTHING"
);

/// The events a write of `notification` may enqueue: its raising, and its
/// resolution once it has one, each with its id and when it happened.
pub(super) fn event_phases(notification: &Notification) -> Vec<(String, Phase, Timestamp)> {
    let mut phases = vec![(
        EventRecord::id_of(&notification.id, Phase::Raised),
        Phase::Raised,
        notification.created_at,
    )];
    if let Some(resolved_at) = notification.resolved_at {
        phases.push((
            EventRecord::id_of(&notification.id, Phase::Resolved),
            Phase::Resolved,
            resolved_at,
        ));
    }
    phases
}

impl Store {
    /// Every channel, or those of one workspace and the global ones.
    pub async fn alert_channels(
        &self,
        workspace: Option<&WorkspaceId>,
    ) -> Result<Vec<ChannelRecord>> {
        let rows: Vec<ChannelRow> = on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                channel_columns!(),
                " FROM alert_channels WHERE ($1 IS NULL OR workspace_id = $1 OR workspace_id IS NULL) ORDER BY created_at, id"
            ))
            .bind(workspace.map(WorkspaceId::as_str))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().filter_map(channel_from_row).collect())
    }

    pub async fn alert_channel(&self, id: &str) -> Result<Option<ChannelRecord>> {
        let row: Option<ChannelRow> = on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                channel_columns!(),
                " FROM alert_channels WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await
        })?;
        Ok(row.and_then(channel_from_row))
    }

    /// Writes a channel: a new one, or every field of an existing one (a
    /// declared channel is written again at each start).
    pub async fn save_alert_channel(&self, channel: &ChannelRecord) -> Result<()> {
        let events = channel
            .filter
            .events
            .as_ref()
            .map(|events| serde_json::to_string(events).unwrap_or_default());
        let recipients = (!channel.recipients.is_empty())
            .then(|| serde_json::to_string(&channel.recipients).unwrap_or_default());
        on_pool!(self, |pool| {
            sqlx::query(concat!(
                "INSERT INTO alert_channels (",
                channel_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ON CONFLICT (id) DO UPDATE SET name = excluded.name, workspace_id = excluded.workspace_id, kind = excluded.kind, url = excluded.url, secret = excluded.secret, events = excluded.events, min_severity = excluded.min_severity, resolutions = excluded.resolutions, enabled = excluded.enabled, source = excluded.source, updated_at = excluded.updated_at, recipients = excluded.recipients"
            ))
            .bind(&channel.id)
            .bind(&channel.name)
            .bind(channel.workspace.as_ref().map(WorkspaceId::as_str))
            .bind(channel.kind.name())
            .bind(&channel.url)
            .bind(channel.secret.as_deref())
            .bind(events.as_deref())
            .bind(channel.filter.min_severity.name())
            .bind(i64::from(channel.filter.resolutions))
            .bind(i64::from(channel.enabled))
            .bind(channel.source.name())
            .bind(channel.created_at.millis())
            .bind(channel.updated_at.millis())
            .bind(recipients.as_deref())
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        if !channel.enabled {
            // A disabled channel sends nothing: what waited for it is
            // given up, so that it neither counts as pending for ever nor
            // goes out stale once the channel is enabled again. A delivery
            // claimed meanwhile ends with its attempt.
            on_pool!(self, |pool| {
                sqlx::query(
                    "UPDATE alert_deliveries SET status = 'gave_up', updated_at = $2 WHERE channel_id = $1 AND status = 'pending' AND (claimed_until IS NULL OR claimed_until < $2)",
                )
                .bind(&channel.id)
                .bind(channel.updated_at.millis())
                .execute(pool)
                .await
                .map(|_| ())
            })?;
        }
        Ok(())
    }

    /// When the notification `id` was raised, if it is stored: a
    /// resolution's event carries only when it ended.
    pub async fn notification_raised_at(&self, id: &str) -> Result<Option<Timestamp>> {
        let row: Option<(i64,)> = on_pool!(self, |pool| {
            sqlx::query_as("SELECT created_at FROM notifications WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
        })?;
        Ok(row.map(|(at,)| Timestamp::from_millis(at)))
    }

    /// Deletes a channel with its deliveries and their attempts; `false`
    /// when there was none.
    pub async fn delete_alert_channel(&self, id: &str) -> Result<bool> {
        let deleted = on_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                sqlx::query("DELETE FROM alert_attempts WHERE delivery_id IN (SELECT id FROM alert_deliveries WHERE channel_id = $1)")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM alert_deliveries WHERE channel_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                let deleted = sqlx::query("DELETE FROM alert_channels WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok::<u64, sqlx::Error>(deleted)
            }
            .await
        })?;
        Ok(deleted > 0)
    }

    /// Deletes the declared channels that the configuration no longer
    /// declares.
    pub async fn retire_declared_channels(&self, kept: &[String]) -> Result<()> {
        for channel in self.alert_channels(None).await? {
            if channel.source == ChannelSource::Config && !kept.contains(&channel.id) {
                self.delete_alert_channel(&channel.id).await?;
            }
        }
        Ok(())
    }

    /// Events not fanned out to channels yet, oldest first.
    pub async fn unfanned_alert_events(&self, limit: i64) -> Result<Vec<EventRecord>> {
        let rows: Vec<EventRow> = on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                event_columns!(),
                " FROM alert_events WHERE fanned_out = 0 ORDER BY occurred_at, id LIMIT $1"
            ))
            .bind(limit)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().filter_map(event_from_row).collect())
    }

    /// Creates an event's deliveries to `channels`, due at `now`, and marks
    /// it fanned out, in one transaction. Deliveries are keyed by event and
    /// channel, so two dispatchers fanning one event out make them once.
    pub async fn fan_out_alert_event(
        &self,
        event: &EventRecord,
        channels: &[&ChannelRecord],
        now: Timestamp,
    ) -> Result<()> {
        on_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                for channel in channels {
                    sqlx::query(concat!(
                        "INSERT INTO alert_deliveries (",
                        delivery_columns!(""),
                        ") VALUES ($1, $2, $3, $4, 'pending', 0, $5, NULL, $5, $5) ON CONFLICT (event_id, channel_id) DO NOTHING"
                    ))
                    .bind(DeliveryRecord::id_of(&event.id, &channel.id))
                    .bind(&event.id)
                    .bind(&channel.id)
                    .bind(event.workspace.as_ref().map(WorkspaceId::as_str))
                    .bind(now.millis())
                    .execute(&mut *tx)
                    .await?;
                }
                sqlx::query("UPDATE alert_events SET fanned_out = 1 WHERE id = $1")
                    .bind(&event.id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            }
            .await
        })?;
        Ok(())
    }

    /// Writes a test event with its one delivery, already claimed by
    /// `claimant` until `until`, so that only its sender sends it.
    pub async fn insert_claimed_test_event(
        &self,
        event: &EventRecord,
        channel: &ChannelRecord,
        claimant: &str,
        until: Timestamp,
    ) -> Result<DeliveryRecord> {
        let delivery = DeliveryRecord {
            id: DeliveryRecord::id_of(&event.id, &channel.id),
            event_id: event.id.clone(),
            channel_id: channel.id.clone(),
            workspace: channel.workspace.clone(),
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_at: event.occurred_at,
            first_attempt_at: None,
            created_at: event.occurred_at,
            updated_at: event.occurred_at,
        };
        on_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                sqlx::query(concat!(
                    "INSERT INTO alert_events (",
                    event_columns!(),
                    ", fanned_out) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, NULL, $10, 1)"
                ))
                .bind(&event.id)
                .bind(&event.notification_id)
                .bind(event.phase.name())
                .bind(event.workspace.as_ref().map(WorkspaceId::as_str))
                .bind(&event.kind)
                .bind(event.severity.name())
                .bind(&event.title)
                .bind(&event.message)
                .bind(serde_json::to_string(&event.suggested_actions).unwrap_or_default())
                .bind(event.occurred_at.millis())
                .execute(&mut *tx)
                .await?;
                sqlx::query(concat!(
                    "INSERT INTO alert_deliveries (",
                    delivery_columns!(""),
                    ", claimed_until, claimed_by) VALUES ($1, $2, $3, $4, 'pending', 0, $5, NULL, $5, $5, $6, $7)"
                ))
                .bind(&delivery.id)
                .bind(&delivery.event_id)
                .bind(&delivery.channel_id)
                .bind(delivery.workspace.as_ref().map(WorkspaceId::as_str))
                .bind(event.occurred_at.millis())
                .bind(until.millis())
                .bind(claimant)
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            }
            .await
        })?;
        Ok(delivery)
    }

    /// The channels with deliveries due at `now` that nobody holds.
    pub async fn channels_with_due_deliveries(&self, now: Timestamp) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT DISTINCT channel_id FROM alert_deliveries WHERE status = 'pending' AND next_attempt_at <= $1 AND (claimed_until IS NULL OR claimed_until < $1) LIMIT 1000",
            )
            .bind(now.millis())
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Claims up to `limit` of `channel`'s due deliveries for `claimant`
    /// until `until`, and answers them with their events, oldest first.
    /// The claim is one UPDATE whose conditions are checked again on each
    /// row it changes, so of two dispatchers claiming at once only one gets
    /// a delivery; a claim whose dispatcher stopped without releasing it
    /// lapses at `until`.
    pub async fn claim_alert_deliveries(
        &self,
        channel: &str,
        now: Timestamp,
        claimant: &str,
        until: Timestamp,
        limit: i64,
    ) -> Result<Vec<(DeliveryRecord, EventRecord)>> {
        on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE alert_deliveries SET claimed_until = $3, claimed_by = $4 WHERE channel_id = $1 AND status = 'pending' AND next_attempt_at <= $2 AND (claimed_until IS NULL OR claimed_until < $2) AND id IN (SELECT id FROM alert_deliveries WHERE channel_id = $1 AND status = 'pending' AND next_attempt_at <= $2 AND (claimed_until IS NULL OR claimed_until < $2) ORDER BY next_attempt_at, id LIMIT $5)",
            )
            .bind(channel)
            .bind(now.millis())
            .bind(until.millis())
            .bind(claimant)
            .bind(limit)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        let rows: Vec<DeliveryRow> = on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                delivery_columns!(""),
                " FROM alert_deliveries WHERE channel_id = $1 AND claimed_by = $2 AND claimed_until = $3 AND status = 'pending' ORDER BY created_at, id"
            ))
            .bind(channel)
            .bind(claimant)
            .bind(until.millis())
            .fetch_all(pool)
            .await
        })?;
        let mut claimed = Vec::with_capacity(rows.len());
        for delivery in rows.into_iter().filter_map(delivery_from_row) {
            let event: Option<EventRow> = on_pool!(self, |pool| {
                sqlx::query_as(concat!(
                    "SELECT ",
                    event_columns!(),
                    " FROM alert_events WHERE id = $1"
                ))
                .bind(&delivery.event_id)
                .fetch_optional(pool)
                .await
            })?;
            if let Some(event) = event.and_then(event_from_row) {
                claimed.push((delivery, event));
            }
        }
        // In the order things happened: deliveries fanned out in one pass
        // share their creation time, and a cause raised and resolved
        // within one flush must not reach its receiver resolved first.
        claimed.sort_by_key(|(delivery, event)| {
            (
                event.occurred_at.millis(),
                event.phase == Phase::Resolved,
                delivery.created_at.millis(),
            )
        });
        Ok(claimed)
    }

    /// Records an attempt and what follows it: the delivery's new status,
    /// its next attempt, and the claim released. Only a pending delivery
    /// whose attempts are all older moves: should a claim have lapsed while
    /// its attempt was under way and another dispatcher sent the message
    /// too, the later record neither undoes a delivery nor counts twice.
    pub async fn record_alert_attempt(
        &self,
        attempt: &AttemptRecord,
        status: DeliveryStatus,
    ) -> Result<()> {
        let error: Option<String> = attempt
            .error
            .as_deref()
            .map(|error| error.chars().take(MAX_ATTEMPT_ERROR).collect());
        on_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "INSERT INTO alert_attempts (delivery_id, number, attempted_at, outcome, http_status, error, duration_ms, next_attempt_at, digest_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (delivery_id, number) DO NOTHING",
                )
                .bind(&attempt.delivery_id)
                .bind(i64::from(attempt.number))
                .bind(attempt.attempted_at.millis())
                .bind(attempt.outcome)
                .bind(attempt.http_status.map(i64::from))
                .bind(error.as_deref())
                .bind(i64::try_from(attempt.duration_ms).unwrap_or(i64::MAX))
                .bind(attempt.next_attempt_at.map(Timestamp::millis))
                .bind(attempt.digest_id.as_deref())
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE alert_deliveries SET status = $2, attempts = $3, next_attempt_at = COALESCE($4, next_attempt_at), first_attempt_at = COALESCE(first_attempt_at, $5), claimed_until = NULL, claimed_by = NULL, updated_at = $5 WHERE id = $1 AND status = 'pending' AND attempts < $3",
                )
                .bind(&attempt.delivery_id)
                .bind(status.name())
                .bind(i64::from(attempt.number))
                .bind(attempt.next_attempt_at.map(Timestamp::millis))
                .bind(attempt.attempted_at.millis())
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            }
            .await
        })?;
        Ok(())
    }

    /// Lets go of every claim `claimant` holds, so that another dispatcher
    /// (or this one, started again) sends those deliveries at once.
    pub async fn release_alert_claims(&self, claimant: &str) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE alert_deliveries SET claimed_until = NULL, claimed_by = NULL WHERE claimed_by = $1",
            )
            .bind(claimant)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        Ok(())
    }

    /// When the first delivery waiting to be sent can be claimed: its next
    /// attempt, or the end of its claim if that is later (a dispatcher that
    /// stopped without releasing it).
    pub async fn next_alert_delivery_due(&self) -> Result<Option<Timestamp>> {
        let (due,): (Option<i64>,) = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT MIN(CASE WHEN claimed_until > next_attempt_at THEN claimed_until ELSE next_attempt_at END) FROM alert_deliveries WHERE status = 'pending'",
            )
            .fetch_one(pool)
            .await
        })?;
        Ok(due.map(Timestamp::from_millis))
    }

    /// How many deliveries wait to be sent.
    pub async fn pending_alert_deliveries(&self) -> Result<i64> {
        let (count,): (i64,) = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM alert_deliveries WHERE status = 'pending'",
            )
            .fetch_one(pool)
            .await
        })?;
        Ok(count)
    }

    /// Deliveries, newest first, with their attempts.
    pub async fn alert_deliveries(&self, query: &DeliveryQuery) -> Result<Vec<DeliveryView>> {
        type Row = (
            String,
            String,
            String,
            Option<String>,
            String,
            i64,
            i64,
            Option<i64>,
            i64,
            i64,
            String,
            String,
            String,
        );
        let rows: Vec<Row> = on_pool!(self, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                delivery_columns!("d."),
                ", e.kind, e.phase, e.notification_id FROM alert_deliveries d JOIN alert_events e ON e.id = d.event_id WHERE ($1 IS NULL OR d.channel_id = $1) AND ($2 IS NULL OR d.workspace_id = $2) AND ($3 IS NULL OR d.status = $3) ORDER BY d.created_at DESC, d.id DESC LIMIT $4"
            ))
            .bind(query.channel.as_deref())
            .bind(query.workspace.as_ref().map(WorkspaceId::as_str))
            .bind(query.status.map(DeliveryStatus::name))
            .bind(query.limit)
            .fetch_all(pool)
            .await
        })?;
        let mut views = Vec::with_capacity(rows.len());
        for row in rows {
            let (a, b, c, d, e, f, g, h, i, j, kind, phase, notification_id) = row;
            let Some(delivery) = delivery_from_row((a, b, c, d, e, f, g, h, i, j)) else {
                continue;
            };
            let attempts: Vec<AttemptRow> = on_pool!(self, |pool| {
                sqlx::query_as(
                    "SELECT delivery_id, number, attempted_at, outcome, http_status, error, duration_ms, next_attempt_at, digest_id FROM alert_attempts WHERE delivery_id = $1 ORDER BY number",
                )
                .bind(&delivery.id)
                .fetch_all(pool)
                .await
            })?;
            views.push(DeliveryView {
                delivery,
                kind,
                phase: Phase::from_name(&phase).unwrap_or(Phase::Raised),
                notification_id,
                attempts: attempts.into_iter().filter_map(attempt_from_row).collect(),
            });
        }
        Ok(views)
    }

    /// Deletes finished deliveries (and their attempts) older than their
    /// retention, and the events nothing refers to any more. An event
    /// pruned is not enqueued again by a later rewrite of its notification
    /// (see `ENQUEUE_EVENT`).
    pub(super) async fn prune_alerts(&self, now: Timestamp) -> Result<u64> {
        let cutoff = now.millis() - DELIVERY_RETENTION_MS;
        let mut deleted = 0;
        for statement in [
            "DELETE FROM alert_attempts WHERE delivery_id IN (SELECT id FROM alert_deliveries WHERE status <> 'pending' AND updated_at < $1)",
            "DELETE FROM alert_deliveries WHERE status <> 'pending' AND updated_at < $1",
            "DELETE FROM alert_events WHERE fanned_out = 1 AND occurred_at < $1 AND NOT EXISTS (SELECT 1 FROM alert_deliveries WHERE event_id = alert_events.id)",
        ] {
            deleted += on_pool!(self, |pool| sqlx::query(statement)
                .bind(cutoff)
                .execute(pool)
                .await
                .map(|done| done.rows_affected()))?;
        }
        Ok(deleted)
    }
}
