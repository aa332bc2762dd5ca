//! Alert delivery: notifications' events, enqueued in the database by the
//! flush (`store::alerts`), fanned out to the channels that want them and
//! sent from there, so that what is stored is delivered once however many
//! instances raised it.
//!
//! The dispatcher runs on every instance; the database decides who sends
//! what. Each pass it (1) fans new events out as deliveries, one per
//! matching channel, keyed by event and channel; (2) claims a channel's due
//! deliveries with a lease (`claimed_until`), which one UPDATE gives to one
//! dispatcher only; (3) sends them on a task of their own per channel, under
//! the channel's rate limit, as one digest when too many come at once, each
//! attempt bounded by its timeout. A hanging receiver thus holds only its
//! own channel's task, never the request path (which never waits on any of
//! this) nor another channel. Every attempt is recorded with what follows
//! it (`domain::alert::decide`). A pass runs when there may be work: this
//! instance's flush wrote notifications, a channel's task ended, a waiting
//! delivery is due; otherwise after [`idle_wait`], for
//! events other instances wrote.
//!
//! Failure mode: a dispatcher that dies with claims lets them lapse at the
//! lease's end, and another (or it, restarted) sends them then; one
//! stopped gracefully records the attempts in flight (waiting up to 5 s for
//! their answers) and releases its claims at once. A message whose receiver
//! answered but whose attempt was not recorded before a crash is sent again
//! with the same `webhook-id`, which receivers deduplicate by: delivery is
//! at least once, and exactly once for what was acknowledged. An email
//! channel's messages go through the SMTP server instead (`email.rs`), by
//! the same path: the same claims, pace, digests and retry policy, an
//! attempt bounded by the SMTP timeout.

pub mod email;
pub mod payload;
pub mod send;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use crate::domain::alert::{
    ChannelKind, Decision, Phase, Plan, RecentEvents, RetryPolicy, TEST_EVENT, TokenBucket, decide,
};
use crate::domain::limits::{ValidationError, WorkspaceId};
use crate::domain::notification::Severity;
use crate::domain::time::Timestamp;
use crate::engine::Engine;
use crate::keys::Secret;
use crate::mail::Mailer;
use crate::metrics::Metrics;
use crate::store::{
    AttemptRecord, ChannelRecord, ChannelSource, DeliveryRecord, DeliveryStatus, EventRecord,
    Store, StoreError,
};
use payload::Context;
use send::Message;

/// How many events one pass fans out.
const BATCH: i64 = 100;

/// How many due deliveries one claim takes per channel (a digest carries
/// at most this many).
const CLAIM: i64 = 20;

/// Margin added to a claim's lease beyond the time its sends may take.
const LEASE_MARGIN: Duration = Duration::from_secs(10);
/// How long a graceful stop waits at most for the attempts in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// How many poll intervals the dispatcher waits at most between two passes
/// when nothing is due (10 s at the default interval of 1 s): events that
/// another instance wrote, and did not send itself, wait at most that long.
const IDLE_POLLS: u32 = 10;

/// The longest the dispatcher waits between two passes when nothing is due
/// (`IDLE_POLLS` poll intervals) is at most this, unless the poll interval
/// itself is longer: a long poll interval, set to pace the database, does
/// not leave other instances' events waiting ten times as long.
const IDLE_WAIT_AT_MOST: Duration = Duration::from_secs(10);

/// How long the dispatcher waits at most between two passes.
fn idle_wait(poll: Duration) -> Duration {
    (poll * IDLE_POLLS).min(IDLE_WAIT_AT_MOST.max(poll))
}

/// A channel declared in the configuration file (global, or one
/// workspace's), its variables read.
#[derive(Clone, Debug)]
pub struct DeclaredChannel {
    pub name: String,
    /// The workspace whose events it takes; `None`: a global channel.
    pub workspace: Option<WorkspaceId>,
    pub kind: ChannelKind,
    /// A webhook's or Slack's receiver (a Slack webhook's URL is its
    /// credential); `None` for an email channel.
    pub url: Option<Secret>,
    /// An email channel's recipients, checked; empty for the other kinds.
    pub recipients: Vec<String>,
    pub secret: Option<Secret>,
    pub filter: crate::domain::alert::Filter,
    pub enabled: bool,
}

impl DeclaredChannel {
    /// Its id, the same at every start: `cfg_` and a digest of its name
    /// (and of its workspace's, for a workspace's channel, so that two
    /// workspaces may each have a channel of one name).
    pub fn id(&self) -> String {
        use sha2::{Digest, Sha256};
        // A line break joins them: names and ids hold no control
        // characters, so no name makes one workspace's channel the same as
        // another's or a global one.
        let named = match &self.workspace {
            None => self.name.clone(),
            Some(workspace) => format!("{}\n{}", workspace.as_str(), self.name),
        };
        format!(
            "cfg_{}",
            hex::encode(&Sha256::digest(named.as_bytes())[..8])
        )
    }
}

/// A URL given for a channel of `kind`: checked, and only for the kinds
/// that send to one. The admin API and the configuration file take a
/// channel's receiver by these rules alike.
pub fn receiver_url(kind: ChannelKind, url: &str) -> Result<(), ValidationError> {
    if !kind.has_url() {
        return Err(ValidationError::new(
            "url",
            format!(
                "a {} channel sends to its recipients (to), not to a url",
                kind.name()
            ),
        ));
    }
    crate::domain::alert::validate_url(url)
}

/// Recipients given for a channel of `kind`: checked (the entry at fault
/// named `to[i]`), and only for email.
pub fn receiver_recipients(
    kind: ChannelKind,
    list: &[String],
) -> Result<Vec<String>, ValidationError> {
    if kind.has_url() {
        return Err(ValidationError::new(
            "to",
            format!(
                "only email channels have recipients; a {} channel sends to its url",
                kind.name()
            ),
        ));
    }
    let addresses = crate::mail::parse_recipients(list)
        .map_err(|error| ValidationError::new(error.field("to"), error.message))?;
    Ok(addresses.iter().map(ToString::to_string).collect())
}

/// A secret given for a channel of `kind`: checked, and only for webhooks.
pub fn signing_secret(kind: ChannelKind, secret: &str) -> Result<(), ValidationError> {
    if !kind.is_signed() {
        return Err(ValidationError::new(
            "secret",
            format!(
                "only webhook channels are signed; a {} channel takes no secret",
                kind.name()
            ),
        ));
    }
    crate::domain::alert::secret_bytes(secret).map(drop)
}

/// Writes the configuration file's channels (read-only through the API)
/// and deletes those it no longer declares.
pub async fn declare_channels(
    store: &Store,
    declared: &[DeclaredChannel],
    now: Timestamp,
) -> Result<(), StoreError> {
    let mut kept = Vec::with_capacity(declared.len());
    for channel in declared {
        let id = channel.id();
        let created_at = store
            .alert_channel(&id)
            .await?
            .map_or(now, |stored| stored.created_at);
        store
            .save_alert_channel(&ChannelRecord {
                id: id.clone(),
                name: channel.name.clone(),
                workspace: channel.workspace.clone(),
                kind: channel.kind,
                url: channel
                    .url
                    .as_ref()
                    .map_or_else(String::new, |url| url.expose().to_owned()),
                recipients: channel.recipients.clone(),
                secret: channel
                    .secret
                    .as_ref()
                    .map(|secret| secret.expose().to_owned()),
                filter: channel.filter.clone(),
                enabled: channel.enabled,
                source: ChannelSource::Config,
                created_at,
                updated_at: now,
            })
            .await?;
        kept.push(id);
    }
    store.retire_declared_channels(&kept).await
}

/// How alerts are delivered.
#[derive(Clone, Debug)]
pub struct AlertSettings {
    /// The dashboard's public address, for links; `None` leaves them out.
    pub public_url: Option<String>,
    /// More events than this to one channel within a minute go as one digest.
    pub digest_threshold: usize,
    /// Messages per second per channel.
    pub channel_rate: f64,
    /// The longest an attempt waits for its receiver.
    pub attempt_timeout: Duration,
    pub retry: RetryPolicy,
    /// The shortest time between two of the dispatcher's passes; the
    /// longest is [`idle_wait`] of it.
    pub poll_interval: Duration,
}

/// What sends alerts: the dispatcher's and the test endpoint's one path to
/// a receiver and to the delivery log.
pub struct Alerts {
    store: Store,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    /// The SMTP server's client, when the settings name one.
    mailer: Option<Mailer>,
    /// The dashboard's public address, parsed, for the links in emails.
    dashboard: Option<reqwest::Url>,
    settings: AlertSettings,
    /// This process's name in claims.
    claimant: String,
    /// Set when the dispatcher stops: channels' tasks send nothing more
    /// once the attempt in flight is recorded.
    stopping: AtomicBool,
}

impl Alerts {
    pub fn new(
        store: Store,
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        mailer: Option<Mailer>,
        settings: AlertSettings,
    ) -> Arc<Self> {
        let bytes: [u8; 8] = rand::random();
        Arc::new(Self {
            store,
            engine,
            metrics,
            mailer,
            dashboard: settings
                .public_url
                .as_deref()
                .and_then(|url| url.parse().ok()),
            // Redirects are not followed: a receiver that moved answers 3xx,
            // which gives up, and its channel's URL is corrected.
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            settings,
            claimant: format!("dsp_{}", hex::encode(bytes)),
            stopping: AtomicBool::new(false),
        })
    }

    /// Whether email channels can send (the SMTP server is configured).
    pub fn sends_email(&self) -> bool {
        self.mailer.is_some()
    }

    /// The longest one attempt to a channel of `kind` may take: the SMTP
    /// timeout for email, the attempt timeout for the others.
    fn attempt_timeout(&self, kind: ChannelKind) -> Duration {
        match (kind, &self.mailer) {
            (ChannelKind::Email, Some(mailer)) => mailer.timeout(),
            _ => self.settings.attempt_timeout,
        }
    }

    /// The dashboard's page of `workspace` (its overview for service-wide
    /// events), when the public URL is set.
    fn dashboard_url(&self, event: &EventRecord) -> Option<String> {
        self.dashboard
            .as_ref()
            .map(|base| crate::mail::dashboard_page(base, event.workspace.as_ref()))
    }

    /// What an event is sent with beside its stored text: the workspace's
    /// name and its limit's figures now.
    fn context(&self, event: &EventRecord) -> Context {
        let snapshot = event
            .workspace
            .as_ref()
            .and_then(|workspace| self.engine.snapshot(workspace).ok());
        let limit = snapshot.as_ref().and_then(|snapshot| {
            snapshot
                .limits
                .iter()
                .find(|(kind, _)| Some(kind.name()) == event.limit.as_deref())
                .copied()
        });
        Context {
            workspace_name: snapshot.map(|snapshot| snapshot.config.name),
            limit,
            dashboard_url: self.dashboard_url(event),
        }
    }

    /// The message that carries `claimed` to a webhook or Slack `channel`:
    /// one event, or a digest of several.
    fn message(
        &self,
        channel: &ChannelRecord,
        claimed: &[(DeliveryRecord, EventRecord)],
    ) -> Message {
        let now = self.engine.now();
        let with_context: Vec<(&EventRecord, Context)> = claimed
            .iter()
            .map(|(_, event)| (event, self.context(event)))
            .collect();
        let slack = channel.kind == ChannelKind::Slack;
        let body = match (&with_context[..], slack) {
            ([(event, context)], false) => payload::webhook(event, context, now),
            ([(event, context)], true) => payload::slack(event, context),
            (many, false) => payload::webhook_digest(many, now),
            (many, true) => {
                let overview = self
                    .dashboard
                    .as_ref()
                    .map(|base| crate::mail::dashboard_page(base, None));
                payload::slack_digest(many, overview.as_deref())
            }
        };
        Message {
            id: message_id(claimed),
            timestamp: now,
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }

    /// Sends `claimed` (claimed by this process) to `channel` in one
    /// message, and records an attempt for each delivery it carried, with
    /// what follows. Answers the attempts.
    async fn deliver(
        &self,
        channel: &ChannelRecord,
        claimed: &[(DeliveryRecord, EventRecord)],
    ) -> Vec<AttemptRecord> {
        if claimed.is_empty() {
            return Vec::new();
        }
        let sent = match channel.kind {
            ChannelKind::Email => self.mail(channel, claimed).await,
            ChannelKind::Webhook | ChannelKind::Slack => {
                let message = self.message(channel, claimed);
                send::post(
                    &self.client,
                    channel,
                    &message,
                    self.settings.attempt_timeout,
                )
                .await
            }
        };
        let now = self.engine.now();
        let digest_id = (claimed.len() > 1).then(|| message_id(claimed));
        let mut attempts = Vec::with_capacity(claimed.len());
        for (delivery, event) in claimed {
            let number = delivery.attempts.saturating_add(1);
            let first = delivery.first_attempt_at.unwrap_or(now);
            let decision = decide(
                self.settings.retry,
                &sent.answer,
                number,
                first,
                now,
                rand::random(),
            );
            let (status, next_attempt_at, error) = match decision {
                Decision::Delivered => (DeliveryStatus::Delivered, None, None),
                Decision::Retry { at } => (DeliveryStatus::Pending, Some(at), sent.error.clone()),
                Decision::GiveUp { reason } => (
                    DeliveryStatus::GaveUp,
                    None,
                    Some(match &sent.error {
                        Some(error) => format!("{}: {error}", reason.describe()),
                        None => reason.describe().to_owned(),
                    }),
                ),
            };
            let attempt = AttemptRecord {
                delivery_id: delivery.id.clone(),
                number,
                attempted_at: now,
                outcome: decision.outcome(),
                http_status: sent.http_status,
                error,
                duration_ms: u64::try_from(sent.took.as_millis()).unwrap_or(u64::MAX),
                next_attempt_at,
                digest_id: digest_id.clone(),
            };
            self.metrics
                .count_alert_attempt(channel.kind.name(), attempt.outcome);
            tracing::info!(
                channel = %channel.id,
                delivery = %delivery.id,
                event = %event.id,
                attempt = number,
                outcome = attempt.outcome,
                http_status = ?sent.http_status,
                error = attempt.error.as_deref().unwrap_or(""),
                "alert delivery attempted"
            );
            if let Err(error) = self.store.record_alert_attempt(&attempt, status).await {
                // The claim lapses and the delivery is tried again, with the
                // same id, which receivers deduplicate by.
                tracing::warn!(%error, delivery = %delivery.id, "could not record an alert attempt");
            }
            attempts.push(attempt);
        }
        attempts
    }

    /// Mails `claimed` to an email `channel` as one email.
    async fn mail(
        &self,
        channel: &ChannelRecord,
        claimed: &[(DeliveryRecord, EventRecord)],
    ) -> send::Sent {
        let Some(mailer) = &self.mailer else {
            return send::unsendable(
                "email channels need the SMTP server: set QUOTAWATCH_SMTP_URL and QUOTAWATCH_SMTP_FROM",
            );
        };
        let mut mailed = Vec::with_capacity(claimed.len());
        for (_, event) in claimed {
            let raised_at = match event.phase {
                Phase::Raised => event.occurred_at,
                Phase::Resolved => self
                    .store
                    .notification_raised_at(&event.notification_id)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(event.occurred_at),
            };
            mailed.push(email::Mailed {
                event,
                context: self.context(event),
                raised_at,
            });
        }
        match email::compose(&mailed, self.dashboard.as_ref(), self.engine.now()) {
            Ok(email) => send::mail(mailer, &channel.recipients, &email).await,
            Err(reason) => send::unsendable(&reason),
        }
    }

    /// Sends a test event to `channel` now, through the same message,
    /// sender and delivery log as any event, and answers its attempt. A
    /// test that is to be retried stays in the log for the dispatcher.
    pub async fn send_test(&self, channel: &ChannelRecord) -> Result<AttemptRecord, StoreError> {
        let now = self.engine.now();
        let bytes: [u8; 8] = rand::random();
        let notification_id = format!("test_{}", hex::encode(bytes));
        let event = EventRecord {
            id: EventRecord::id_of(&notification_id, Phase::Raised),
            notification_id,
            phase: Phase::Raised,
            workspace: channel.workspace.clone(),
            kind: TEST_EVENT.to_owned(),
            severity: Severity::Info,
            title: "Test alert from quotawatch".to_owned(),
            message: format!(
                "This is a test of the alert channel \"{}\": when it arrives, the channel works.",
                channel.name
            ),
            suggested_actions: vec!["Nothing to do: this is a test.".to_owned()],
            limit: None,
            crossing: None,
            resolves_at: None,
            occurred_at: now,
        };
        let until = now.plus(self.attempt_timeout(channel.kind) + LEASE_MARGIN);
        let delivery = self
            .store
            .insert_claimed_test_event(&event, channel, &self.claimant, until)
            .await?;
        let mut attempts = self.deliver(channel, &[(delivery, event)]).await;
        Ok(attempts.remove(0))
    }
}

/// The id of the message that carries `claimed`: its delivery's for one,
/// else a digest's, derived from the deliveries it carries (so that a retry
/// of the same digest keeps it).
fn message_id(claimed: &[(DeliveryRecord, EventRecord)]) -> String {
    match claimed {
        [(delivery, _)] => delivery.id.clone(),
        many => {
            use sha2::{Digest, Sha256};
            let mut hasher = Sha256::new();
            for (delivery, _) in many {
                hasher.update(delivery.id.as_bytes());
                hasher.update(b"\n");
            }
            format!("dig_{}", hex::encode(&hasher.finalize()[..12]))
        }
    }
}

/// A channel's pace: its rate limit and the events it was sent lately.
struct Pace {
    bucket: TokenBucket,
    recent: RecentEvents,
}

impl Pace {
    fn new(settings: &AlertSettings, now: Timestamp) -> Self {
        Self {
            bucket: TokenBucket::new(
                settings.channel_rate,
                settings.channel_rate.ceil() as u32,
                now,
            ),
            recent: RecentEvents::default(),
        }
    }

    /// Waits for the channel's next message token.
    async fn wait_for_token(&mut self, engine: &Engine) {
        loop {
            let now = engine.now();
            match self.bucket.take(now) {
                Ok(()) => return,
                Err(at) => tokio::time::sleep(now.until(at)).await,
            }
        }
    }
}

/// Sends one channel's claimed deliveries: as one digest when too many come
/// at once, else one by one, each when the rate limit allows.
async fn send_to_channel(
    alerts: Arc<Alerts>,
    channel: ChannelRecord,
    claimed: Vec<(DeliveryRecord, EventRecord)>,
    mut pace: Pace,
) -> Pace {
    let now = alerts.engine.now();
    match pace
        .recent
        .plan(now, claimed.len(), alerts.settings.digest_threshold)
    {
        Plan::Digest => {
            pace.wait_for_token(&alerts.engine).await;
            alerts.deliver(&channel, &claimed).await;
            pace.recent.record(alerts.engine.now(), claimed.len());
        }
        Plan::Each => {
            for one in claimed {
                if alerts.stopping.load(Ordering::Relaxed) {
                    break;
                }
                pace.wait_for_token(&alerts.engine).await;
                alerts.deliver(&channel, std::slice::from_ref(&one)).await;
                pace.recent.record(alerts.engine.now(), 1);
            }
        }
    }
    pace
}

enum Command {
    Stop(oneshot::Sender<()>),
}

/// Stops the dispatcher.
#[derive(Clone)]
pub struct DispatcherHandle {
    commands: mpsc::Sender<Command>,
}

impl DispatcherHandle {
    /// Stops sending and releases this process's claims, so that what it
    /// had not sent is sent at once by whoever runs next.
    pub async fn stop(&self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Stop(done)).await.is_ok() {
            let _ = finished.await;
        }
    }
}

struct Dispatcher {
    alerts: Arc<Alerts>,
    /// Each sending channel's task, which answers its pace. A set,
    /// so that the tasks end with the dispatcher however it ends.
    sending: JoinSet<Pace>,
    /// The channel each task sends to.
    busy: HashMap<tokio::task::Id, String>,
    paces: HashMap<String, Pace>,
}

pub fn spawn(alerts: Arc<Alerts>) -> (DispatcherHandle, JoinHandle<()>) {
    let (commands, receiver) = mpsc::channel(4);
    let dispatcher = Dispatcher {
        alerts,
        sending: JoinSet::new(),
        busy: HashMap::new(),
        paces: HashMap::new(),
    };
    (
        DispatcherHandle { commands },
        tokio::spawn(dispatcher.run(receiver)),
    )
}

impl Dispatcher {
    /// Passes at start-up, when this instance's flush wrote notifications,
    /// when a channel's task ends (it may have more to send), and when the
    /// first waiting delivery is due, no sooner than a poll interval after
    /// the last pass; and at the latest [`idle_wait`] after
    /// it, which bounds how long events another instance wrote wait when
    /// its own dispatcher does not send them.
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let poll = self.alerts.settings.poll_interval;
        let mut next_pass = tokio::time::Instant::now();
        loop {
            let finished = tokio::select! {
                () = tokio::time::sleep_until(next_pass) => None,
                () = self.alerts.engine.notifications_written() => None,
                finished = self.sending.join_next_with_id(), if !self.sending.is_empty() => finished,
                command = commands.recv() => {
                    self.drain().await;
                    if let Err(error) = self.alerts.store.release_alert_claims(&self.alerts.claimant).await {
                        tracing::warn!(%error, "could not release alert claims; they lapse by themselves");
                    }
                    if let Some(Command::Stop(done)) = command {
                        let _ = done.send(());
                    }
                    return;
                }
            };
            if let Some(finished) = finished {
                self.take_back(finished);
            }
            let wait = match self.pass().await {
                Ok(due) => {
                    let now = self.alerts.engine.now();
                    due.map_or(idle_wait(poll), |due| now.until(due))
                        .clamp(poll, idle_wait(poll))
                }
                Err(error) => {
                    tracing::warn!(%error, "alert dispatch failed; will retry");
                    poll
                }
            };
            next_pass = tokio::time::Instant::now() + wait;
        }
    }

    /// Lets the attempts in flight end and be recorded, for as long as one
    /// may take (at most `DRAIN`), then ends whatever still waits on a
    /// receiver: what a receiver answered before the stop is then not sent
    /// again, and a receiver that hangs does not hold the stop for long.
    async fn drain(&mut self) {
        self.alerts.stopping.store(true, Ordering::Relaxed);
        let longest = ChannelKind::ALL
            .into_iter()
            .map(|kind| self.alerts.attempt_timeout(kind))
            .max()
            .unwrap_or(DRAIN);
        let wait = longest.min(DRAIN);
        let finished = async { while self.sending.join_next().await.is_some() {} };
        if tokio::time::timeout(wait, finished).await.is_err() {
            self.sending.shutdown().await;
        }
    }

    /// Fans out new events and starts sending what is due; answers when
    /// the first delivery still waiting is due.
    async fn pass(&mut self) -> Result<Option<Timestamp>, StoreError> {
        let alerts = self.alerts.clone();
        let store = &alerts.store;
        let now = alerts.engine.now();
        self.collect_finished();
        let events = store.unfanned_alert_events(BATCH).await?;
        let due = store.channels_with_due_deliveries(now).await?;
        if !events.is_empty() || !due.is_empty() {
            let channels = store.alert_channels(None).await?;
            for event in &events {
                let matching: Vec<&ChannelRecord> = channels
                    .iter()
                    .filter(|channel| {
                        channel.enabled
                            && (channel.workspace.is_none() || channel.workspace == event.workspace)
                            && channel
                                .filter
                                .accepts(&event.kind, event.severity, event.phase)
                    })
                    .collect();
                store.fan_out_alert_event(event, &matching, now).await?;
            }
            // Fanned-out deliveries are due now: claim them in this pass.
            let due = if events.is_empty() {
                due
            } else {
                store.channels_with_due_deliveries(now).await?
            };
            for channel_id in due {
                let Some(channel) = channels.iter().find(|c| c.id == channel_id && c.enabled)
                else {
                    continue;
                };
                if self.busy.values().any(|busy| *busy == channel_id) {
                    continue;
                }
                self.start_sending(channel.clone(), now).await?;
            }
        }
        alerts
            .metrics
            .set_alerts_pending(store.pending_alert_deliveries().await?);
        store.next_alert_delivery_due().await
    }

    /// Claims `channel`'s due deliveries and sends them on a task of its
    /// own.
    async fn start_sending(
        &mut self,
        channel: ChannelRecord,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let settings = &self.alerts.settings;
        let per_message = self.alerts.attempt_timeout(channel.kind)
            + Duration::from_secs_f64(1.0 / settings.channel_rate);
        let until = now.plus(
            per_message
                .saturating_mul(CLAIM as u32)
                .saturating_add(LEASE_MARGIN),
        );
        let claimed = self
            .alerts
            .store
            .claim_alert_deliveries(&channel.id, now, &self.alerts.claimant, until, CLAIM)
            .await?;
        if claimed.is_empty() {
            return Ok(());
        }
        let pace = self
            .paces
            .remove(&channel.id)
            .unwrap_or_else(|| Pace::new(settings, now));
        let id = channel.id.clone();
        let task = self
            .sending
            .spawn(send_to_channel(self.alerts.clone(), channel, claimed, pace));
        self.busy.insert(task.id(), id);
        Ok(())
    }

    /// Takes back the pace of each channel whose task ended.
    fn collect_finished(&mut self) {
        while let Some(finished) = self.sending.try_join_next_with_id() {
            self.take_back(finished);
        }
    }

    /// Takes back the pace of a channel whose task ended.
    fn take_back(&mut self, finished: Result<(tokio::task::Id, Pace), tokio::task::JoinError>) {
        match finished {
            Ok((task, pace)) => {
                if let Some(channel) = self.busy.remove(&task) {
                    self.paces.insert(channel, pace);
                }
            }
            Err(error) => {
                // The channel's pace is lost with its task; its claims
                // lapse and it starts afresh.
                tracing::error!(%error, "an alert channel's task failed");
                self.busy.remove(&error.id());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_dispatcher_waits_ten_polls_up_to_ten_seconds_or_one_longer_poll() {
        let seconds = Duration::from_secs;
        assert_eq!(idle_wait(Duration::from_millis(100)), seconds(1));
        assert_eq!(idle_wait(seconds(1)), seconds(10));
        assert_eq!(idle_wait(seconds(5)), seconds(10));
        assert_eq!(idle_wait(seconds(60)), seconds(60));
    }
}
