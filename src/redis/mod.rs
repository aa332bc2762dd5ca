//! Counters shared by several instances, in Redis.
//!
//! Every operation on a workspace's counters is one call of one Lua script
//! (`counters.lua`), which Redis runs atomically: an admission checks and
//! charges every limit at once, with Redis's own clock, so instances with
//! skewed clocks agree. Each call answers the workspace's counter state (the
//! slots only when this instance does not hold them as they are: `state`),
//! which the engine loads into its in-memory `WorkspaceState` to derive the
//! status, the notifications and the headers with the same rules it uses
//! alone. One round trip per operation at most: admissions and settlements
//! that arrive while earlier ones are on their way go together in the next
//! call (as a database groups commits), because the script's fixed costs,
//! not the network, bound how many requests one Redis can take.
//!
//! Besides the counters, Redis names the episodes of workspace causes
//! (`episodes.lua`), so that every instance gives a cause's notification
//! the id the first instance to raise it drew.
//!
//! Every call is bounded by a short timeout, and after a failure calls fail
//! at once for a moment (`RETRY_AFTER_FAILURE`) instead of each waiting out
//! the timeout again: a dead Redis must never make requests hang. The engine
//! decides what a failure means (`QUOTAWATCH_ON_STORE_ERROR`).

mod credentials;
mod function;
mod scopes;
mod state;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use rustc_hash::FxHashMap;

use crate::domain::credential::CredentialId;
use crate::domain::limits::{Limits, Metric, WorkspaceId};
use crate::domain::scope::{LoadedScope, MAX_TRACKED_PER_RULE};
use crate::domain::status::Cause;
use crate::domain::time::{Period, Timestamp};
use crate::domain::window::Usage;
use crate::domain::workspace::{
    Admitted, BillingBlock, Blocks, Expired, Model, Reservation, ResetScope,
};
use crate::sync::lock;
pub use credentials::StoredBlock;
use function::{Call, Library};
pub use scopes::ScopeCharge;
pub use state::StoredCounters;
use state::{StateCache, billing_number, counters_from, counters_script};

/// After a failed call, how long calls fail at once before one tries again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SharedError {
    #[error("the shared store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the shared store is unreachable: {0}")]
    Unreachable(String),
    #[error("the shared store answered something unexpected: {0}")]
    Protocol(String),
}

/// The script's answer to one operation.
#[derive(Debug)]
pub struct Reply {
    /// Whether the operation did what it was asked (admitted, settled).
    pub done: bool,
    pub counters: StoredCounters,
    /// Redis's clock when it answered, in microseconds: what a reservation
    /// this instance holds was charged at, to tell it from a reset in the
    /// same millisecond.
    pub at_us: i64,
    /// Reservations that expired unsettled, of any workspace; their
    /// estimates are final.
    pub expired: Vec<ExpiredInStore>,
    /// The scope counters an admission charged, as the script names them:
    /// what the settlement of a reservation this instance holds passes
    /// back ([`Held::scopes`]).
    pub charged_scopes: Option<String>,
}

/// A reservation recorded in the store that expired unsettled; its
/// `charged_elsewhere_us` is when the store charged it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpiredInStore {
    pub workspace: WorkspaceId,
    pub expired: Expired,
}

/// How one instance's rules moved a workspace's upstream blocks: only the
/// change is sent, so that it cannot undo what another instance stored
/// meanwhile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockChange {
    /// A hold until this time (holds only ever extend).
    pub hold_until: Option<Timestamp>,
    pub billing: BillingChange,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BillingChange {
    Unchanged,
    Set(BillingBlock),
    /// Lifts the block that started at `since`, if it is still the one.
    Lift {
        since: Timestamp,
    },
}

impl BlockChange {
    /// The change from `before` to `after`, if any.
    pub fn between(before: Blocks, after: Blocks) -> Option<Self> {
        // A hold that ended needs no write: it expires by itself.
        let hold_until = after
            .rate_until
            .filter(|_| after.rate_until != before.rate_until);
        let billing = match (before.billing, after.billing) {
            (None, Some(block)) => BillingChange::Set(block),
            (Some(old), Some(new)) if old != new => BillingChange::Set(new),
            (Some(old), None) => BillingChange::Lift { since: old.since },
            _ => BillingChange::Unchanged,
        };
        (hold_until.is_some() || billing != BillingChange::Unchanged).then_some(Self {
            hold_until,
            billing,
        })
    }
}

/// What one instance does about the episode of a cause of a workspace:
/// the stretch of time the cause lasts on any instance, named by one
/// notification id everywhere (see `episodes.lua`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EpisodeStep {
    /// The cause is active here under `candidate`: the episode goes on, or
    /// starts under that id if no instance holds one.
    Hold { cause: Cause, candidate: String },
    /// The cause ended here.
    Release { cause: Cause },
}

/// What an admission needs to know besides the workspace.
pub struct AdmitArgs<'a> {
    pub limits: &'a Limits,
    /// What the admission charges of each metric.
    pub estimate: Usage,
    pub reservation: u64,
    pub reservation_ttl: Duration,
    pub probe_interval: Duration,
    pub model: Option<&'a str>,
    /// The scope counters the request falls under, checked and charged
    /// with the workspace's limits, all or none.
    pub scopes: &'a [ScopeCharge],
    /// Records the reservation in Redis, for any instance to settle (the
    /// REST API's, behind a load balancer). Otherwise the caller holds it,
    /// and settles it with [`RedisCounters::settle_held`]: recording it,
    /// and finding, removing or expiring it later, would cost the script
    /// more than the admission itself.
    pub record: bool,
}

/// What another instance changed, as announced on the change channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Announcement {
    /// A workspace's counters, and the version they reached.
    Workspace(String, u64),
    /// A credential's billing block was set or lifted.
    Credential(CredentialId),
}

/// A reservation this instance holds, as the shared counters charged it.
#[derive(Clone, Debug)]
pub struct Held {
    /// Redis's clock at the charge, in microseconds ([`Reply::at_us`]).
    pub charged_us: i64,
    pub estimate: Usage,
    /// The scope counters its admission charged ([`Reply::charged_scopes`]).
    pub scopes: Option<String>,
}

/// Batch calls on their way to Redis at once; admissions and settlements
/// arriving meanwhile wait for the next call.
const CALLS_IN_FLIGHT: usize = 3;

/// The most admissions and settlements one call carries.
const MAX_BATCH: usize = 128;

pub struct RedisCounters {
    link: Arc<Link>,
    queue: mpsc::UnboundedSender<Pending>,
}

/// Values any instance may take once (WebSocket tickets), in the Redis the
/// counters use.
#[derive(Clone)]
pub struct SingleUse {
    link: Arc<Link>,
}

impl SingleUse {
    /// Stores `value` under `name` for `ttl`, for any instance to
    /// [`take`](Self::take), and deletes what was stored under `evicted`, in
    /// one round trip: a store with a bounded size that evicts an entry to
    /// make room for one evicts it here too.
    pub async fn put(
        &self,
        name: &str,
        value: &str,
        ttl: Duration,
        evicted: &[String],
    ) -> Result<(), SharedError> {
        self.link.put(name, value, ttl, evicted).await
    }

    /// Reads and deletes what [`put`](Self::put) stored under `name`, so
    /// that only one caller ever gets it.
    pub async fn take(&self, name: &str) -> Result<Option<String>, SharedError> {
        self.link.take(name).await
    }
}

/// An admission or a settlement waiting for the next call.
struct Pending {
    workspace: WorkspaceId,
    timezone: chrono_tz::Tz,
    now: Timestamp,
    work: Work,
    answer: oneshot::Sender<Result<(Outcome, Reply), SharedError>>,
}

enum Work {
    Admit {
        limits: Limits,
        estimate: Usage,
        reservation: u64,
        reservation_ttl: Duration,
        probe_interval: Duration,
        model: Option<String>,
        /// The scope counters it falls under, as the script takes them.
        scopes: Option<String>,
        record: bool,
    },
    Settle {
        reservation: u64,
        /// What the call used; `None` keeps the estimate.
        used: Option<Usage>,
    },
    SettleHeld {
        held: Held,
        /// What the call used; `None` keeps the estimate.
        used: Option<Usage>,
    },
}

enum Outcome {
    Admitted(Option<Admitted>),
    /// The reservation as it was, if it was still open.
    Settled(Option<Reservation>),
    SettledHeld,
}

/// The connection and the scripts, shared with the task that sends
/// admissions.
struct Link {
    client: redis::Client,
    manager: ConnectionManager,
    counters: Library,
    lease: Script,
    episodes: Script,
    prefix: String,
    /// Where changes to any workspace are announced.
    channel: String,
    timeout: Duration,
    failing_since: Mutex<Option<Instant>>,
    /// Expired reservations from a batch whose callers had all stopped
    /// waiting: Redis removed them already, so the next answer carries them.
    unclaimed: Mutex<Vec<ExpiredInStore>>,
    states: StateCache,
    calendars: CalendarBounds,
}

impl RedisCounters {
    /// Prepares the connection; nothing is sent until the first operation,
    /// so an instance starts even while Redis is down. Starts the task that
    /// sends admissions, so it must be called within the Tokio runtime.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, SharedError> {
        let link = Arc::new(Link::new(url, prefix, timeout)?);
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(send_batches(link.clone(), pending));
        Ok(Self { link, queue })
    }

    pub fn prefix(&self) -> &str {
        &self.link.prefix
    }

    /// Follows the announcements of changes: a workspace id and the version
    /// its counters reached (one message may carry several), or a
    /// credential whose block changed. The stream ends when the connection
    /// drops; announcements made meanwhile are lost, so the caller reloads
    /// everything after subscribing again.
    pub async fn changes(
        &self,
    ) -> Result<impl futures_util::Stream<Item = Announcement> + use<>, SharedError> {
        self.link.changes().await
    }

    /// Takes or keeps the lease that makes `instance` the one instance doing
    /// the work only one should do (writing notifications). Answers whether
    /// `instance` holds it for `ttl` from now.
    pub async fn hold_lease(&self, instance: &str, ttl: Duration) -> Result<bool, SharedError> {
        self.link.hold_lease(instance, ttl).await
    }

    /// Takes `steps` for `instance` on the episodes of workspace causes,
    /// each workspace's in order, in one call; a hold lasts `hold` unless
    /// renewed. Answers, per step, the id that names the episode for a
    /// hold, and `None` for a release.
    pub async fn agree_episodes(
        &self,
        instance: &str,
        hold: Duration,
        steps: &[(&WorkspaceId, &EpisodeStep)],
    ) -> Result<Vec<Option<String>>, SharedError> {
        self.link.agree_episodes(instance, hold, steps).await
    }

    /// A handle on single-use values in the same Redis (WebSocket
    /// tickets), which need none of the counters.
    pub fn single_use(&self) -> SingleUse {
        SingleUse {
            link: Arc::clone(&self.link),
        }
    }

    /// Admits or refuses one request, in the next call to Redis.
    pub async fn admit(
        &self,
        workspace: &WorkspaceId,
        timezone: chrono_tz::Tz,
        now: Timestamp,
        args: AdmitArgs<'_>,
    ) -> Result<(Option<Admitted>, Reply), SharedError> {
        let work = Work::Admit {
            limits: *args.limits,
            estimate: args.estimate,
            reservation: args.reservation,
            reservation_ttl: args.reservation_ttl,
            probe_interval: args.probe_interval,
            model: args.model.map(str::to_owned),
            scopes: (!args.scopes.is_empty())
                .then(|| scopes::refs_arg(&self.link.prefix, workspace, args.scopes)),
            record: args.record,
        };
        match self.queued(workspace, timezone, now, work).await? {
            (Outcome::Admitted(admitted), reply) => Ok((admitted, reply)),
            _ => Err(mismatched()),
        }
    }

    /// Settles a reservation with what the call used (`None`: keep the
    /// estimate), in the next call to Redis. Answers the reservation as it
    /// was, if it was still open.
    pub async fn settle(
        &self,
        workspace: &WorkspaceId,
        timezone: chrono_tz::Tz,
        now: Timestamp,
        reservation: u64,
        used: Option<Usage>,
    ) -> Result<(Option<Reservation>, Reply), SharedError> {
        let work = Work::Settle { reservation, used };
        match self.queued(workspace, timezone, now, work).await? {
            (Outcome::Settled(settled), reply) => Ok((settled, reply)),
            _ => Err(mismatched()),
        }
    }

    /// Settles a reservation this instance holds with what the call used
    /// (`None`: keep the estimate), in the next call to Redis. The caller
    /// answers for settling it once: it took the reservation out of its
    /// own keeping first.
    pub async fn settle_held(
        &self,
        workspace: &WorkspaceId,
        timezone: chrono_tz::Tz,
        now: Timestamp,
        held: Held,
        used: Option<Usage>,
    ) -> Result<Reply, SharedError> {
        let work = Work::SettleHeld { held, used };
        match self.queued(workspace, timezone, now, work).await? {
            (Outcome::SettledHeld, reply) => Ok(reply),
            _ => Err(mismatched()),
        }
    }

    /// Queues work for the next batch call and waits for its answer.
    async fn queued(
        &self,
        workspace: &WorkspaceId,
        timezone: chrono_tz::Tz,
        now: Timestamp,
        work: Work,
    ) -> Result<(Outcome, Reply), SharedError> {
        self.link.breaker()?;
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            workspace: workspace.clone(),
            timezone,
            now,
            work,
            answer,
        };
        let gone = || SharedError::Unreachable("the batching task stopped".to_owned());
        self.queue.send(pending).map_err(|_| gone())?;
        // Bounded from the moment the work was queued.
        match tokio::time::timeout(self.link.timeout, answered).await {
            Err(_) => Err(SharedError::Timeout(self.link.timeout)),
            Ok(Err(_)) => Err(gone()),
            Ok(Ok(result)) => result,
        }
    }

    /// Counts calls that had no reservation: they happened, so they are
    /// charged whatever the limits say, to the workspace and to the scope
    /// counters they fall under.
    pub async fn count(
        &self,
        workspace: &WorkspaceId,
        timezone: chrono_tz::Tz,
        now: Timestamp,
        usage: Usage,
        scopes: &[ScopeCharge],
    ) -> Result<Reply, SharedError> {
        let mut invocation = self.link.invocation(workspace, "count", timezone, now);
        invocation.arg(usage_arg(usage));
        if !scopes.is_empty() {
            invocation
                .arg(scopes::refs_arg(&self.link.prefix, workspace, scopes))
                .arg(MAX_TRACKED_PER_RULE);
        }
        self.link.run(workspace, invocation).await
    }

    /// The current state, changing nothing but expiring what is due, with
    /// the scope counters of `listed` (listed rules', which the status
    /// shows).
    pub async fn peek(
        &self,
        workspace: &WorkspaceId,
        timezone: chrono_tz::Tz,
        now: Timestamp,
        listed: &[ScopeCharge],
    ) -> Result<Reply, SharedError> {
        let mut invocation = self.link.invocation(workspace, "peek", timezone, now);
        if !listed.is_empty() {
            invocation.arg(scopes::refs_arg(&self.link.prefix, workspace, listed));
        }
        self.link.run(workspace, invocation).await
    }

    /// Clears counters and blocks; open reservations stay, charged nothing.
    pub async fn reset(
        &self,
        workspace: &WorkspaceId,
        timezone: chrono_tz::Tz,
        now: Timestamp,
        scope: ResetScope,
    ) -> Result<Reply, SharedError> {
        let op = match scope {
            ResetScope::All => "reset",
            ResetScope::Usage => "reset_usage",
            ResetScope::Blocks => "lift",
        };
        self.link.run_plain(workspace, op, timezone, now).await
    }

    /// Stores how this instance's rules moved the upstream blocks.
    pub async fn block(
        &self,
        workspace: &WorkspaceId,
        timezone: chrono_tz::Tz,
        now: Timestamp,
        change: BlockChange,
    ) -> Result<Reply, SharedError> {
        let (billing, since, next_probe) = match change.billing {
            BillingChange::Unchanged => (-1, 0, 0),
            BillingChange::Set(block) => (
                billing_number(Some(block.code)) as i64,
                block.since.millis(),
                block.next_probe_at.millis(),
            ),
            BillingChange::Lift { since } => (0, since.millis(), 0),
        };
        let mut invocation = self.link.invocation(workspace, "block", timezone, now);
        invocation
            .arg(change.hold_until.map_or(0, Timestamp::millis))
            .arg(billing)
            .arg(since)
            .arg(next_probe);
        self.link.run(workspace, invocation).await
    }
}

fn mismatched() -> SharedError {
    SharedError::Protocol("an answer of the wrong kind".to_owned())
}

/// Sends queued admissions and settlements to Redis for the life of the
/// counters, as many as are waiting in each call, with `CALLS_IN_FLIGHT`
/// calls at most.
async fn send_batches(link: Arc<Link>, mut pending: mpsc::UnboundedReceiver<Pending>) {
    let calls = Arc::new(tokio::sync::Semaphore::new(CALLS_IN_FLIGHT));
    loop {
        let Ok(permit) = calls.clone().acquire_owned().await else {
            return;
        };
        // A call just answered: let the requests it released queue their
        // next admissions before this batch closes, or it would leave with
        // a few and the next with the rest.
        tokio::task::yield_now().await;
        let Some(first) = pending.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let link = link.clone();
        tokio::spawn(async move {
            link.send_batch(batch).await;
            drop(permit);
        });
    }
}

impl Link {
    fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, SharedError> {
        let client = redis::Client::open(url)
            .map_err(|error| SharedError::Unreachable(error.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|error| SharedError::Unreachable(error.to_string()))?;
        Ok(Self {
            client,
            manager,
            counters: Library::new(&counters_script()),
            lease: Script::new(
                r"
                if redis.call('GET', KEYS[1]) == ARGV[1] then
                  redis.call('PEXPIRE', KEYS[1], ARGV[2])
                  return 1
                end
                if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
                return 0",
            ),
            episodes: Script::new(include_str!("episodes.lua")),
            prefix: prefix.to_owned(),
            channel: format!("{prefix}changes"),
            timeout,
            failing_since: Mutex::new(None),
            unclaimed: Mutex::new(Vec::new()),
            states: StateCache::default(),
            calendars: CalendarBounds::default(),
        })
    }

    async fn changes(
        &self,
    ) -> Result<impl futures_util::Stream<Item = Announcement> + use<>, SharedError> {
        use futures_util::StreamExt;
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), connect)
            .await
            .map_err(|_| SharedError::Timeout(self.timeout))?
            .map_err(|error| SharedError::Unreachable(error.to_string()))?;
        Ok(pubsub.into_on_message().flat_map(|message| {
            let payload: String = message.get_payload().unwrap_or_default();
            let changes: Vec<Announcement> = match payload.strip_prefix(credentials::ANNOUNCED) {
                Some(credential) => CredentialId::parse(credential)
                    .map(Announcement::Credential)
                    .into_iter()
                    .collect(),
                None => payload
                    .split(',')
                    .filter_map(|change| {
                        let (workspace, version) = change.rsplit_once(' ')?;
                        Some(Announcement::Workspace(
                            workspace.to_owned(),
                            version.parse().ok()?,
                        ))
                    })
                    .collect(),
            };
            futures_util::stream::iter(changes)
        }))
    }

    async fn hold_lease(&self, instance: &str, ttl: Duration) -> Result<bool, SharedError> {
        let mut invocation = self.lease.prepare_invoke();
        invocation
            .key(format!("{}leader", self.prefix))
            .arg(instance)
            .arg(millis(ttl));
        let mut connection = self.manager.clone();
        let held: i64 = self
            .bounded(invocation.invoke_async(&mut connection))
            .await?;
        Ok(held == 1)
    }

    async fn agree_episodes(
        &self,
        instance: &str,
        hold: Duration,
        steps: &[(&WorkspaceId, &EpisodeStep)],
    ) -> Result<Vec<Option<String>>, SharedError> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        self.breaker()?;
        let mut invocation = self.episodes.prepare_invoke();
        invocation.arg(instance).arg(millis(hold));
        for (workspace, step) in steps {
            let (cause, argument) = match step {
                EpisodeStep::Hold { cause, candidate } => (cause, format!("hold {candidate}")),
                EpisodeStep::Release { cause } => (cause, "release".to_owned()),
            };
            invocation
                .key(format!(
                    "{}episode:{}:{}",
                    self.prefix,
                    workspace.as_str(),
                    cause.key()
                ))
                .arg(argument);
        }
        let mut connection = self.manager.clone();
        let answer: Result<Vec<String>, SharedError> =
            self.bounded(invocation.invoke_async(&mut connection)).await;
        self.note(&answer);
        let ids = answer?;
        if ids.len() != steps.len() {
            return Err(SharedError::Protocol(format!(
                "{} answers to {} episode steps",
                ids.len(),
                steps.len()
            )));
        }
        Ok(ids
            .into_iter()
            .map(|id| (!id.is_empty()).then_some(id))
            .collect())
    }

    async fn put(
        &self,
        name: &str,
        value: &str,
        ttl: Duration,
        evicted: &[String],
    ) -> Result<(), SharedError> {
        let mut connection = self.manager.clone();
        let mut pipeline = redis::pipe();
        pipeline
            .cmd("SET")
            .arg(format!("{}{name}", self.prefix))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl))
            .ignore();
        if !evicted.is_empty() {
            let names: Vec<String> = evicted
                .iter()
                .map(|name| format!("{}{name}", self.prefix))
                .collect();
            pipeline.cmd("DEL").arg(names).ignore();
        }
        self.bounded(pipeline.query_async(&mut connection)).await
    }

    async fn take(&self, name: &str) -> Result<Option<String>, SharedError> {
        let mut connection = self.manager.clone();
        let mut command = redis::cmd("GETDEL");
        command.arg(format!("{}{name}", self.prefix));
        self.bounded(command.query_async(&mut connection)).await
    }

    /// Bounds a call by the timeout and names its failure.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(SharedError::Timeout(self.timeout)),
            Ok(Err(error)) if error.is_io_error() || error.is_timeout() => {
                Err(SharedError::Unreachable(error.to_string()))
            }
            Ok(Err(error)) => Err(SharedError::Protocol(error.to_string())),
            Ok(Ok(value)) => Ok(value),
        }
    }

    /// Sends a batch in one call and answers each of its parts.
    async fn send_batch(&self, mut batch: Vec<Pending>) {
        // Work whose caller stopped waiting (it timed out, or its client
        // went away) is not sent: an admission would charge a request that
        // never goes upstream, and a settlement the caller already counted
        // on its own.
        batch.retain(|pending| !pending.answer.is_closed());
        if batch.is_empty() {
            return;
        }
        match self.call_batch(&batch).await {
            Ok((answers, expired)) => {
                // The expired reservations go with one answer, so that they
                // are recorded once: the first whose caller still waits.
                let mut expired = self.with_unclaimed(expired);
                for (pending, (outcome, mut reply)) in batch.into_iter().zip(answers) {
                    reply.expired = std::mem::take(&mut expired);
                    if let Err(Ok((_, reply))) = pending.answer.send(Ok((outcome, reply))) {
                        expired = reply.expired;
                    }
                }
                lock(&self.unclaimed).extend(expired);
            }
            Err(error) => {
                for pending in batch {
                    let _ = pending.answer.send(Err(error.clone()));
                }
            }
        }
    }

    /// `expired` and those no caller took before.
    fn with_unclaimed(&self, mut expired: Vec<ExpiredInStore>) -> Vec<ExpiredInStore> {
        let mut unclaimed = lock(&self.unclaimed);
        if !unclaimed.is_empty() {
            expired.append(&mut unclaimed);
        }
        expired
    }

    async fn call_batch(&self, batch: &[Pending]) -> Result<BatchAnswer, SharedError> {
        self.breaker()?;
        // Each workspace once, in order of first appearance, with the limits
        // of its first admission: admissions moments apart see the same
        // configuration. Settlements need no limits.
        let mut workspaces: Vec<(&Pending, Option<&Limits>)> = Vec::new();
        let mut numbers = Vec::with_capacity(batch.len());
        for pending in batch {
            let limits = match &pending.work {
                Work::Admit { limits, .. } => Some(limits),
                Work::Settle { .. } | Work::SettleHeld { .. } => None,
            };
            let index = match workspaces
                .iter()
                .position(|(seen, _)| seen.workspace == pending.workspace)
            {
                Some(index) => index,
                None => {
                    workspaces.push((pending, None));
                    workspaces.len() - 1
                }
            };
            let described = &mut workspaces[index].1;
            *described = described.or(limits);
            numbers.push(index + 1);
        }
        let kinds = Kinds::of(batch);
        let mut invocation = Call::default();
        self.shared_keys(&mut invocation);
        invocation
            .arg("batch")
            .arg(&self.channel)
            .arg(workspaces.len())
            .arg(kinds.admissions)
            .arg(kinds.settlements)
            .arg(kinds.held_settlements);
        // Each workspace with the version of the slots held of it.
        let mut held = Vec::with_capacity(workspaces.len());
        for (pending, limits) in &workspaces {
            invocation.key(self.state_key(&pending.workspace));
            let slots_version = self.states.slots_version(&pending.workspace);
            held.push((&pending.workspace, slots_version));
            invocation
                .arg(pending.workspace.as_str())
                .arg(&*self.calendars.arg(pending.timezone, pending.now))
                .arg(limits.map(limits_arg).unwrap_or_default())
                .arg(slots_version);
        }
        for (pending, number) in batch.iter().zip(&numbers) {
            if let Work::Admit {
                estimate,
                reservation,
                reservation_ttl,
                probe_interval,
                model,
                record,
                ..
            } = &pending.work
            {
                invocation.arg(number);
                counts_args(&mut invocation, *estimate);
                invocation.arg(millis(*probe_interval));
                // A held reservation is one empty argument: the script never
                // names it (see `counters.lua`).
                if *record {
                    invocation.arg(format!(
                        "{reservation} {} {}",
                        millis(*reservation_ttl),
                        model.as_deref().unwrap_or_default()
                    ));
                } else {
                    invocation.arg("");
                }
            }
        }
        for (pending, number) in batch.iter().zip(&numbers) {
            if let Work::Settle { reservation, used } = &pending.work {
                invocation.arg(number).arg(reservation).arg(used_arg(*used));
            }
        }
        for (pending, number) in batch.iter().zip(&numbers) {
            if let Work::SettleHeld { held, used } = &pending.work {
                invocation.arg(number).arg(held.charged_us);
                counts_args(&mut invocation, held.estimate);
                match used {
                    Some(used) => counts_args(&mut invocation, *used),
                    None => {
                        for _ in Metric::ALL {
                            invocation.arg("-");
                        }
                    }
                }
            }
        }
        scoped_part(&mut invocation, batch);
        let mut connection = self.manager.clone();
        let answer = self
            .bounded(self.counters.invoke(&invocation, &mut connection))
            .await;
        self.note(&answer);
        parse_batch(answer?, batch, &numbers, &held, &self.states, &self.prefix)
    }

    /// An invocation of a one-workspace operation: the keys, the channel,
    /// its id and the calendar bounds around `now`.
    fn invocation(
        &self,
        workspace: &WorkspaceId,
        op: &str,
        timezone: chrono_tz::Tz,
        now: Timestamp,
    ) -> Call {
        let mut invocation = Call::default();
        self.shared_keys(&mut invocation);
        invocation
            .key(self.state_key(workspace))
            .arg(op)
            .arg(&self.channel)
            .arg(workspace.as_str())
            .arg(&*self.calendars.arg(timezone, now));
        invocation
    }

    /// The keys every call names first: the open reservations of every
    /// workspace, and their expiries.
    fn shared_keys(&self, invocation: &mut Call) {
        invocation
            .key(format!("{}reservations", self.prefix))
            .key(format!("{}reservations:expiry", self.prefix));
    }

    /// A workspace's counters.
    fn state_key(&self, workspace: &WorkspaceId) -> String {
        // The name says the layout, so that instances of an older one,
        // during an upgrade, never read this one.
        format!("{}state3:{}", self.prefix, workspace.as_str())
    }

    /// Fails at once while an earlier call failed moments ago.
    fn breaker(&self) -> Result<(), SharedError> {
        match *lock(&self.failing_since) {
            Some(since) if since.elapsed() < RETRY_AFTER_FAILURE => Err(SharedError::Unreachable(
                "an earlier call failed moments ago".to_owned(),
            )),
            _ => Ok(()),
        }
    }

    /// Remembers whether the store answered.
    fn note<T>(&self, result: &Result<T, SharedError>) {
        let mut failing_since = lock(&self.failing_since);
        match result {
            Err(SharedError::Timeout(_) | SharedError::Unreachable(_)) => {
                *failing_since = Some(Instant::now());
            }
            _ => *failing_since = None,
        }
    }

    /// Runs an operation that takes no arguments of its own.
    async fn run_plain(
        &self,
        workspace: &WorkspaceId,
        op: &str,
        timezone: chrono_tz::Tz,
        now: Timestamp,
    ) -> Result<Reply, SharedError> {
        self.run(workspace, self.invocation(workspace, op, timezone, now))
            .await
    }

    async fn run(&self, workspace: &WorkspaceId, invocation: Call) -> Result<Reply, SharedError> {
        self.breaker()?;
        let mut connection = self.manager.clone();
        let result = self
            .bounded(self.counters.invoke(&invocation, &mut connection))
            .await
            .and_then(|answer| parse_reply(answer, workspace, &self.states, &self.prefix));
        self.note(&result);
        result.map(|mut reply| {
            reply.expired = self.with_unclaimed(std::mem::take(&mut reply.expired));
            reply
        })
    }
}

/// The calendar bounds argument of each timezone, kept for the day it was
/// made in: it names only day and month starts, so it holds all day, and
/// making it takes six timezone conversions, for every workspace of every
/// call.
#[derive(Default)]
struct CalendarBounds {
    by_zone: Mutex<FxHashMap<chrono_tz::Tz, DayBounds>>,
}

/// A day's start and end, and the calendar bounds argument made in it.
type DayBounds = (Timestamp, Timestamp, Arc<str>);

impl CalendarBounds {
    fn arg(&self, timezone: chrono_tz::Tz, now: Timestamp) -> Arc<str> {
        let mut by_zone = lock(&self.by_zone);
        if let Some((start, end, text)) = by_zone.get(&timezone)
            && *start <= now
            && now < *end
        {
            return text.clone();
        }
        let text: Arc<str> = calendar_bounds_arg(timezone, now).into();
        let (start, end) = Period::Day.bounds(now, timezone);
        by_zone.insert(timezone, (start, end, text.clone()));
        text
    }
}

/// For each calendar period (day, month), the starts (ms) of the one
/// before, the current one, the next and the one after around `now` in
/// `timezone`, periods separated by `|`, in one argument. Redis picks the
/// period holding its own time, so a caller whose clock is off by a little
/// still counts into the right day and month.
fn calendar_bounds_arg(timezone: chrono_tz::Tz, now: Timestamp) -> String {
    let periods: Vec<String> = Period::ALL
        .into_iter()
        .map(|period| {
            let (current, next) = period.bounds(now, timezone);
            let (before, _) = period.bounds(Timestamp::from_millis(current.millis() - 1), timezone);
            let (_, after) = period.bounds(next, timezone);
            format!(
                "{} {} {} {}",
                before.millis(),
                current.millis(),
                next.millis(),
                after.millis()
            )
        })
        .collect();
    periods.join("|")
}

/// A workspace's limits as the script reads them: "window metric max" for
/// each limit set (see `counters.lua`).
fn limits_arg(limits: &Limits) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(64);
    for (kind, max) in limits.configured() {
        let separator = if text.is_empty() { "" } else { " " };
        let _ = write!(
            text,
            "{separator}{} {} {}",
            kind.window.index(),
            kind.metric.index(),
            clamp(max)
        );
    }
    text
}

/// Reads the answer to a one-workspace operation: {outcome, now, base,
/// changes, expired}; the base is always there.
fn parse_reply(
    value: Value,
    workspace: &WorkspaceId,
    states: &StateCache,
    prefix: &str,
) -> Result<Reply, SharedError> {
    let Value::Array(fields) = value else {
        return Err(SharedError::Protocol(format!("not an array: {value:?}")));
    };
    if !(5..=6).contains(&fields.len()) {
        return Err(SharedError::Protocol(format!(
            "{} fields instead of 5 or 6",
            fields.len()
        )));
    }
    let expired = expired_from(&fields[4]);
    let at_us = as_int(&fields[1]);
    let mut counters = states.load(
        workspace,
        -1,
        bytes(&fields[2])?,
        bytes(&fields[3])?,
        |state| counters_from(millis_of(at_us), state),
    )?;
    let scoped = scopes::scoped_answer(fields.get(5), prefix, &[workspace])?;
    counters.scopes = scoped
        .counters
        .into_iter()
        .map(|(_, scope)| scope)
        .collect();
    Ok(Reply {
        done: as_int(&fields[0]) == 1,
        counters,
        at_us,
        expired,
        charged_scopes: None,
    })
}

/// A batch's answers, in the order of its parts, and the reservations that
/// expired meanwhile, of any workspace.
type BatchAnswer = (Vec<(Outcome, Reply)>, Vec<ExpiredInStore>);

/// Reads the answer to a batch: {now, an outcome byte per admission, the
/// state of each workspace, expired reservations, five values per
/// settlement}. `numbers` gives each part's workspace (from 1) in `held`,
/// the workspaces as sent, each with the version of the slots held of it.
fn parse_batch(
    value: Value,
    batch: &[Pending],
    numbers: &[usize],
    held: &[(&WorkspaceId, i64)],
    states: &StateCache,
    prefix: &str,
) -> Result<BatchAnswer, SharedError> {
    let protocol = |what: &str| SharedError::Protocol(what.to_owned());
    let Value::Array(fields) = value else {
        return Err(protocol("the batch's answer is not an array"));
    };
    let (
        [
            now,
            Value::BulkString(outcomes),
            Value::Array(answered),
            expired,
            settled,
        ],
        scoped,
    ) = (fields.get(..5).unwrap_or_default(), fields.get(5))
    else {
        return Err(protocol(
            "the batch's answer is not {now, outcomes, states, expired, settled}",
        ));
    };
    let workspace_ids: Vec<&WorkspaceId> = held.iter().map(|(workspace, _)| *workspace).collect();
    let mut scoped = scopes::scoped_answer(scoped, prefix, &workspace_ids)?;
    let settled = flat(settled);
    let kinds = Kinds::of(batch);
    if outcomes.len() != kinds.admissions || settled.len() != 5 * kinds.settlements {
        return Err(protocol("not one answer per admission and settlement"));
    }
    let at_us = as_int(now);
    let at = millis_of(at_us);
    if 2 * held.len() != answered.len() {
        return Err(protocol("not one state per workspace"));
    }
    let mut workspaces = Vec::with_capacity(held.len());
    for ((workspace, slots_version), answered) in held.iter().zip(answered.chunks_exact(2)) {
        workspaces.push(states.load(
            workspace,
            *slots_version,
            bytes(&answered[0])?,
            bytes(&answered[1])?,
            |state| counters_from(at, state),
        )?);
    }
    let mut outcomes = outcomes.iter();
    let mut settled = settled.chunks_exact(5);
    let mut answers = Vec::with_capacity(batch.len());
    let mut admission = 0;
    for (pending, number) in batch.iter().zip(numbers) {
        let scopes: Vec<LoadedScope> = scoped
            .counters
            .iter()
            .filter(|(index, _)| index + 1 == *number)
            .map(|(_, scope)| scope.clone())
            .collect();
        let mut charged_scopes = None;
        let Some(counters) = workspaces.get(number - 1) else {
            return Err(protocol("an answer without its workspace's state"));
        };
        let (outcome, done) = match &pending.work {
            Work::Admit {
                reservation,
                reservation_ttl,
                ..
            } => {
                let outcome = outcomes.next().copied().unwrap_or(b'0');
                admission += 1;
                charged_scopes = scoped.charged.remove(&admission);
                let admitted = (outcome != b'0').then(|| Admitted {
                    id: *reservation,
                    charged_at: at,
                    expires_at: at.plus(*reservation_ttl),
                    probe: outcome == b'2',
                });
                let done = admitted.is_some();
                (Outcome::Admitted(admitted), done)
            }
            Work::Settle { reservation, .. } => {
                let record = settled.next().unwrap_or_default();
                let reservation = (record.first().map(as_int) == Some(1)).then(|| {
                    let charged_at = Timestamp::from_millis(as_int(&record[1]));
                    Reservation {
                        id: *reservation,
                        charged_at,
                        estimate: parse_usage(&text(&record[2])).unwrap_or_default(),
                        expires_at: charged_at,
                        model: model(&text(&record[4])),
                        probe: as_int(&record[3]) == 1,
                        // Settled, it is held nowhere any more.
                        charged_elsewhere_us: None,
                    }
                });
                let done = reservation.is_some();
                (Outcome::Settled(reservation), done)
            }
            Work::SettleHeld { .. } => (Outcome::SettledHeld, true),
        };
        let reply = Reply {
            done,
            counters: StoredCounters {
                scopes,
                ..counters.clone()
            },
            at_us,
            expired: Vec::new(),
            charged_scopes,
        };
        answers.push((outcome, reply));
    }
    Ok((answers, expired_from(expired)))
}

/// Adds a batch's scoped part (see `read_scoped_part` in the script) when
/// some of its work carries scoped limits: admissions with their refs and
/// held settlements with the counters their admission charged, each by
/// its number among the batch's work of its kind. Without them, the call
/// is as it was before scoped limits.
fn scoped_part(invocation: &mut Call, batch: &[Pending]) {
    let admissions = batch
        .iter()
        .filter(|pending| matches!(pending.work, Work::Admit { .. }));
    let admitted: Vec<(usize, &str)> = admissions
        .enumerate()
        .filter_map(|(number, pending)| match &pending.work {
            Work::Admit {
                scopes: Some(refs), ..
            } => Some((number + 1, refs.as_str())),
            _ => None,
        })
        .collect();
    let settlements = batch
        .iter()
        .filter(|pending| matches!(pending.work, Work::SettleHeld { .. }));
    let settled: Vec<(usize, &str)> = settlements
        .enumerate()
        .filter_map(|(number, pending)| match &pending.work {
            Work::SettleHeld {
                held:
                    Held {
                        scopes: Some(scopes),
                        ..
                    },
                ..
            } => Some((number + 1, scopes.as_str())),
            _ => None,
        })
        .collect();
    if admitted.is_empty() && settled.is_empty() {
        return;
    }
    invocation.arg(MAX_TRACKED_PER_RULE).arg(admitted.len());
    for (number, refs) in admitted {
        invocation.arg(number).arg(refs);
    }
    invocation.arg(settled.len());
    for (number, scopes) in settled {
        invocation.arg(number).arg(scopes);
    }
}

/// How many of each kind of work a batch holds, as the script takes them.
struct Kinds {
    admissions: usize,
    /// Of reservations recorded in Redis.
    settlements: usize,
    /// Of reservations this instance holds.
    held_settlements: usize,
}

impl Kinds {
    fn of(batch: &[Pending]) -> Self {
        let mut kinds = Self {
            admissions: 0,
            settlements: 0,
            held_settlements: 0,
        };
        for pending in batch {
            match pending.work {
                Work::Admit { .. } => kinds.admissions += 1,
                Work::Settle { .. } => kinds.settlements += 1,
                Work::SettleHeld { .. } => kinds.held_settlements += 1,
            }
        }
        kinds
    }
}

/// Redis's microseconds as a timestamp.
fn millis_of(micros: i64) -> Timestamp {
    Timestamp::from_millis(micros.div_euclid(1000))
}

/// Expired reservations, as the script stores them: "workspace|reservation
/// id|charged (microseconds)|estimate|probe|model[|scope counters]", the estimate as
/// [`usage_arg`] writes it. One that does not parse,
/// or whose workspace id no longer does, is dropped.
fn expired_from(value: &Value) -> Vec<ExpiredInStore> {
    flat(value)
        .iter()
        .filter_map(|member| expired_member(&text(member)))
        .collect()
}

fn expired_member(member: &str) -> Option<ExpiredInStore> {
    let mut parts = member.splitn(6, '|');
    let workspace = parts.next()?.parse().ok()?;
    let _reservation = parts.next()?;
    let charged_us: i64 = parts.next()?.parse().ok()?;
    let usage = parse_usage(parts.next()?)?;
    let _probe = parts.next()?;
    let expired = Expired {
        charged_at: millis_of(charged_us),
        usage,
        // The scope counters a scoped admission charged follow the model.
        model: model(parts.next()?.split('|').next().unwrap_or_default()),
        charged_elsewhere_us: Some(charged_us),
    };
    Some(ExpiredInStore { workspace, expired })
}

fn bytes(value: &Value) -> Result<&[u8], SharedError> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        _ => Err(SharedError::Protocol(format!(
            "a state is not a string: {value:?}"
        ))),
    }
}

fn flat(value: &Value) -> &[Value] {
    match value {
        Value::Array(values) => values,
        _ => &[],
    }
}

fn as_int(value: &Value) -> i64 {
    match value {
        Value::Int(number) => *number,
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        _ => String::new(),
    }
}

fn model(name: &str) -> Option<Model> {
    (!name.is_empty()).then(|| Model::from(name))
}

/// Lua numbers are doubles: counts beyond 2^53 would lose precision, and
/// no real limit comes near that.
fn clamp(value: u64) -> i64 {
    i64::try_from(value.min(1 << 53)).unwrap_or(i64::MAX)
}

/// Usage as the script takes and keeps it: each metric's count, in the
/// order of `Metric::ALL`, separated by spaces ("1 250"). One argument
/// whatever the metrics, so that the script's arguments follow no metric.
fn usage_arg(usage: Usage) -> String {
    let counts: Vec<String> = Metric::ALL
        .into_iter()
        .map(|metric| clamp(usage.of(metric)).to_string())
        .collect();
    counts.join(" ")
}

/// Usage as one argument per metric, in the order of `Metric::ALL`: the
/// script's hottest paths (an admission's estimate, a held reservation's
/// settlement) then parse no string.
fn counts_args(invocation: &mut Call, usage: Usage) {
    for metric in Metric::ALL {
        invocation.arg(clamp(usage.of(metric)));
    }
}

/// What a call used, as a settlement's argument: "-" keeps the estimate.
fn used_arg(used: Option<Usage>) -> String {
    used.map_or_else(|| "-".to_owned(), usage_arg)
}

/// Usage as [`usage_arg`] writes it; `None` unless it names every metric.
fn parse_usage(text: &str) -> Option<Usage> {
    let mut counts = text.split(' ');
    let mut usage = Usage::default();
    for metric in Metric::ALL {
        usage.set(metric, counts.next()?.parse().ok()?);
    }
    counts.next().is_none().then_some(usage)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::upstream::BillingCode;

    #[test]
    fn an_expiry_member_names_its_workspace_and_what_it_charged() {
        let member = expired_member("acme|7|1700000000123456|1 120 9000|0|gpt-4o-mini")
            .expect("well formed");
        assert_eq!(member.workspace.as_str(), "acme");
        let expired = member.expired;
        assert_eq!(expired.charged_elsewhere_us, Some(1_700_000_000_123_456));
        assert_eq!(
            expired.charged_at,
            Timestamp::from_millis(1_700_000_000_123)
        );
        assert_eq!(expired.usage.tokens, 120);
        assert_eq!(expired.usage.usd, 9000);
        assert_eq!(expired.model.as_deref(), Some("gpt-4o-mini"));
        let unnamed = expired_member("acme|8|1000|1 5 0|1|").expect("no model");
        assert_eq!(unnamed.expired.model, None);
        let scoped =
            expired_member("acme|9|1000|1 5 0|0|gpt-4o|qw:scope1:acme:01 0 1").expect("scoped");
        assert_eq!(scoped.expired.model.as_deref(), Some("gpt-4o"));
        assert!(expired_member("Not An Id|7|1000|1 5 0|0|").is_none());
        assert!(expired_member("acme|7|soon|1 5 0|0|").is_none());
        assert!(
            expired_member("acme|7|1000|5|0|").is_none(),
            "an estimate must name every metric"
        );
    }

    #[test]
    fn usage_is_passed_as_one_count_per_metric() {
        let usage = Usage::call(250).with(Metric::Usd, 8_850);
        assert_eq!(usage_arg(usage), "1 250 8850");
        assert_eq!(parse_usage("1 250 8850"), Some(usage));
        assert_eq!(used_arg(None), "-", "keeps the estimate");
        assert_eq!(parse_usage("1 250"), None);
        assert_eq!(parse_usage("1 2 3 4"), None);
    }

    #[test]
    fn only_what_moved_is_written_back() {
        let t = Timestamp::from_millis;
        let block = |since| BillingBlock {
            code: BillingCode::InsufficientQuota,
            since: t(since),
            next_probe_at: t(since + 60_000),
        };
        let blocks = |rate_until, billing| Blocks {
            rate_until,
            billing,
        };
        assert_eq!(
            BlockChange::between(blocks(None, None), blocks(None, None)),
            None
        );
        // A hold that ended expires by itself; one that moved is written.
        assert_eq!(
            BlockChange::between(blocks(Some(t(5)), None), blocks(None, None)),
            None
        );
        let held = BlockChange::between(
            blocks(None, Some(block(1))),
            blocks(Some(t(9)), Some(block(1))),
        );
        assert_eq!(
            held,
            Some(BlockChange {
                hold_until: Some(t(9)),
                billing: BillingChange::Unchanged
            })
        );
        // A lift names the block it lifts, so it cannot undo a newer one.
        let lifted = BlockChange::between(blocks(None, Some(block(1))), blocks(None, None));
        assert_eq!(
            lifted.map(|change| change.billing),
            Some(BillingChange::Lift { since: t(1) })
        );
        let set = BlockChange::between(blocks(None, None), blocks(None, Some(block(2))));
        assert_eq!(
            set.map(|change| change.billing),
            Some(BillingChange::Set(block(2)))
        );
    }
}
