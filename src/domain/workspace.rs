//! One workspace's live state and the operations on it: admission (atomic
//! across all limits), settlement of token reservations, upstream reports,
//! the passage of time and admin resets. Each operation takes `now`, changes
//! the state, re-evaluates the status and returns what changed.

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use std::time::Duration;

use chrono_tz::Tz;

use super::credential::CredentialBlock;
use super::forecast::{
    DEFAULT_LEAD_TIME, Forecast, Forecasts, MINUTE_HORIZON, Rates, forecast, rate_of,
};
use super::limits::{LimitKind, Limits, Metric, PerLimit, Period, WorkspaceConfig};
use super::notification::{
    Crossing, Notification, describe, describe_threshold, describe_unpriced, shared_id,
};
use super::price::{PriceTable, TokenCounts};
use super::scope::{
    EachSummary, LoadedScope, RefusedScope, ScopeBook, ScopeCounts, ScopeRef, ScopeValues, Selector,
};
use super::spend::{ModelSpend, SpendBook};
use super::status::{Cause, Change, Facts, LimitFacts, Observation, StatusTracker};
use super::threshold::{Fired, Reading};
use super::time::Timestamp;
use super::upstream::{
    BillingCode, ErrorFields, ErrorTally, LastError, Outcomes, RateLimitHeaders, UpstreamClass,
    UpstreamView, classify, error_rate_alarming,
};
use super::window::{CalendarCounter, Calendars, SlidingWindow, Tally, Usage};

/// Requests and tokens over the last 60 seconds, in one-second buckets.
pub type MinuteWindow = SlidingWindow<Usage, 60>;
/// Upstream answers over the last 60 seconds, for the error-rate alarm.
pub type OutcomeWindow = SlidingWindow<Outcomes, 60>;
/// Errors and refusals over the last hour, in one-minute buckets.
pub type ErrorHistory = SlidingWindow<ErrorTally, 60>;

/// How far back the error history in the status document reaches.
pub const ERROR_HISTORY: Duration = Duration::from_secs(3600);

pub const SECOND_MS: i64 = 1000;
pub const MINUTE_MS: i64 = 60 * SECOND_MS;

/// A model name, shared rather than copied: it travels from the request into
/// the reservation and on to history.
pub type Model = std::sync::Arc<str>;

/// Engine-wide settings that the domain needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// How long an unsettled reservation lives before its estimate becomes final.
    pub reservation_ttl: Duration,
    /// How often one request may probe the upstream while billing blocks it.
    pub probe_interval: Duration,
    /// How long before a day or month limit is forecast to run out its
    /// `forecast_exhaustion` notification is raised.
    pub forecast_lead_time: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            reservation_ttl: Duration::from_secs(600),
            probe_interval: Duration::from_secs(60),
            forecast_lead_time: DEFAULT_LEAD_TIME,
        }
    }
}

/// What an admission charged, to be settled with what the call used.
#[derive(Clone, Debug, PartialEq)]
pub struct Reservation {
    pub id: u64,
    pub charged_at: Timestamp,
    /// What was charged of each metric: one request and an estimate of
    /// the rest.
    pub estimate: Usage,
    pub expires_at: Timestamp,
    pub model: Option<Model>,
    /// Admitted as the one probe allowed through a billing block.
    pub probe: bool,
    /// Charged by counters kept elsewhere (shared with other instances), at
    /// this instant of their clock in microseconds, and held here to be
    /// settled there; `None` when it was charged here. The domain keeps the
    /// instant for whoever settles it there, which alone knows what it means.
    pub charged_elsewhere_us: Option<i64>,
}

impl Reservation {
    /// This reservation unsettled for good: its estimate is final.
    pub fn expired(self) -> Expired {
        Expired {
            charged_at: self.charged_at,
            model: self.model,
            usage: self.estimate,
            charged_elsewhere_us: self.charged_elsewhere_us,
        }
    }
}

/// What became of a reservation put back to be settled here (see
/// [`WorkspaceState::return_reservation`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Returned {
    /// Held here again, with this estimate left to settle.
    Held { estimate: Usage },
    /// Its time ran out meanwhile: it ended unsettled.
    Expired(Expired),
}

/// What an admin's reset sets back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResetScope {
    /// Counters, blocks and notifications: a fresh start.
    #[default]
    All,
    /// The counters only; blocks stay.
    Usage,
    /// The upstream's blocks only (billing, rate, rejected key); counts stay.
    Blocks,
}

/// The upstream reported a billing problem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BillingBlock {
    pub code: BillingCode,
    pub since: Timestamp,
    pub next_probe_at: Timestamp,
}

impl BillingBlock {
    /// The block after the upstream answered `code` at `now`, `held` being
    /// the block in place if any: a block already in place keeps its start
    /// (which names its notification), and the next probe is a whole
    /// interval away, since the last call (a failed probe) just found
    /// billing still broken.
    pub fn answered(
        held: Option<BillingBlock>,
        code: BillingCode,
        now: Timestamp,
        probe_interval: Duration,
    ) -> BillingBlock {
        BillingBlock {
            code,
            since: held.map_or(now, |block| block.since),
            next_probe_at: now.plus(probe_interval),
        }
    }

    /// Whether a successful call admitted at `admitted_at` ends the block.
    /// Only a call admitted during the block (its probe) tells whether
    /// billing has been fixed since; one admitted earlier, or reported
    /// without a reservation (`None`), does not.
    pub fn lifted_by(self, admitted_at: Option<Timestamp>) -> bool {
        admitted_at.is_some_and(|admitted| admitted >= self.since)
    }

    /// Whether the block lets one request through as its probe at `now`.
    pub fn probe_due(self, now: Timestamp) -> bool {
        now >= self.next_probe_at
    }

    /// Lets a request through as the probe: the next one is due an
    /// interval from now.
    pub fn take_probe(&mut self, now: Timestamp, probe_interval: Duration) {
        self.next_probe_at = now.plus(probe_interval);
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalCause {
    /// The limit has no room for the request now.
    Limit(LimitKind),
    /// The request alone needs more than the whole limit; it must shrink.
    TooLarge(LimitKind),
    UpstreamRateLimited,
    UpstreamQuota(BillingCode),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refusal {
    pub cause: RefusalCause,
    /// Usage and maximum of the limit concerned (zero for upstream causes).
    pub used: u64,
    pub max: u64,
    /// When a retry can succeed, if that is known.
    pub retry_at: Option<Timestamp>,
    /// The scoped limit that refused, if not the workspace's own.
    pub scope: Option<RefusedScope>,
    /// False when no short wait helps (a calendar limit, billing, a request larger
    /// than a limit): clients must not retry automatically.
    pub retryable: bool,
    /// The workspace's timezone, in which a calendar limit's reset is said.
    pub timezone: Tz,
}

/// What a request asks for at admission.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    /// What the request is charged at admission: one request and an
    /// estimate of each other metric.
    pub estimate: Usage,
    pub model: Option<Model>,
    /// The caller may settle it through any instance (the REST API, behind
    /// a load balancer), so counters kept elsewhere keep its reservation
    /// where every instance finds it. Otherwise the instance that admits it holds the
    /// reservation: the proxy settles every call it admits itself.
    pub settled_anywhere: bool,
    /// Its values for scoped limits (its model's, its end user's).
    pub scoped: ScopeValues,
}

/// A request admitted: what the caller needs to settle it later.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Admitted {
    pub id: u64,
    pub charged_at: Timestamp,
    pub expires_at: Timestamp,
    /// Let through a billing block as its one probe: its outcome decides
    /// whether the block lifts.
    pub probe: bool,
}

/// A reservation that expired unsettled: its estimate is now final, and the
/// request counts in history as it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Expired {
    pub charged_at: Timestamp,
    pub model: Option<Model>,
    pub usage: Usage,
    /// As in [`Reservation`]: the counters kept elsewhere that charged it
    /// decide how much of it counts.
    pub charged_elsewhere_us: Option<i64>,
}

/// Everything the status document shows for one workspace.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub config: WorkspaceConfig,
    pub status: super::status::Status,
    pub since: Timestamp,
    pub reasons: Vec<String>,
    /// Limits are enforced only in part (see [`Enforcement`]).
    pub degraded: bool,
    pub blocked: bool,
    pub retry_at: Option<Timestamp>,
    pub limits: Vec<(LimitKind, LimitFacts)>,
    /// What was used, whether or not a limit is set.
    pub usage: RecentUsage,
    pub upstream: Option<UpstreamView>,
    /// The workspace's own billing block (a billing error its app
    /// reported).
    pub billing: Option<BillingBlock>,
    /// The billing block of the upstream credential its proxied calls are
    /// billed to.
    pub credential_block: Option<CredentialBlock>,
    pub errors: ErrorTally,
    pub last_error: Option<LastError>,
    /// Models called that the price table does not know, first called
    /// first (see [`WorkspaceState::note_unpriced`]).
    pub unpriced_models: Vec<Model>,
    /// Each scoped limit, in configuration order.
    pub scoped: Vec<ScopedFacts>,
    /// What each current calendar period spent, by model.
    pub spend: SpendFacts,
    pub at: Timestamp,
}

/// Spend by model in each current calendar period, by [`Period::index`],
/// and the day the prices in force were taken.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpendFacts {
    pub calendars: [std::collections::BTreeMap<Model, ModelSpend>; Period::ALL.len()],
    pub prices_taken: String,
}

/// What the status shows of one scoped limit: a listed rule's counts, or
/// only how many values an each-rule tracks (never which).
#[derive(Clone, Debug, PartialEq)]
pub enum ScopedFacts {
    Listed(Vec<(LimitKind, LimitFacts)>),
    Each(EachSummary),
}

/// Requests and tokens counted over the sliding minute and each current
/// calendar period (in the workspace's timezone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecentUsage {
    pub last_minute: Usage,
    /// What each current calendar period used, by [`Period::index`]: one
    /// entry per period, so that a new period needs no field of its own.
    pub calendars: [Usage; Period::ALL.len()],
}

impl RecentUsage {
    /// What the current `period` used.
    pub fn calendar(&self, period: Period) -> Usage {
        self.calendars[period.index()]
    }
}

/// The persisted form of a workspace's live state; notifications are stored
/// separately.
#[derive(Clone, Debug, PartialEq)]
pub struct Saved {
    pub minute: Vec<(i64, Usage)>,
    /// The calendar counters saved; a period missing (saved by a version
    /// that did not count it) starts again on restore (see
    /// [`WorkspaceState::restore`]).
    pub calendars: Vec<CalendarCounter>,
    pub reservations: Vec<Reservation>,
    pub rate_block_until: Option<Timestamp>,
    pub billing_block: Option<BillingBlock>,
    pub upstream_view: UpstreamView,
    pub errors: Vec<(i64, ErrorTally)>,
    pub last_error: Option<LastError>,
    pub key_rejected: bool,
    pub status: super::status::Status,
    pub since: Timestamp,
    /// As in [`Snapshot::unpriced_models`].
    pub unpriced_models: Vec<Model>,
    /// The alert thresholds that fired in each limit's current period.
    pub thresholds_fired: Vec<(LimitKind, Fired)>,
    /// The scope counters that still count anything; an end user's whose
    /// windows are clear is left out.
    pub scopes: Vec<LoadedScope>,
}

/// A workspace's counts of requests and tokens, as of an instant: what
/// counters kept elsewhere (shared by several instances) answer, and what
/// a share of the usage is taken from.
#[derive(Clone, Debug, PartialEq)]
pub struct Counts {
    /// Requests and tokens by absolute second, as `MinuteWindow` counts them.
    pub minute: Vec<(i64, Usage)>,
    /// The start of each counted calendar period and what it counted, by
    /// [`Period::index`]: one entry per period, so that a new period needs
    /// no field of its own here or where counts are read and shared.
    pub calendars: [(Timestamp, Usage); Period::ALL.len()],
}

impl Counts {
    /// The start of the counted `period` and what it counted.
    pub fn calendar(&self, period: Period) -> (Timestamp, Usage) {
        self.calendars[period.index()]
    }
}

/// What the upstream blocks: requests until a time (a rate limit), and
/// everything but a probe (a billing block).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Blocks {
    pub rate_until: Option<Timestamp>,
    pub billing: Option<BillingBlock>,
}

/// How much of a workspace's limits this state enforces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Enforcement {
    /// The whole limits.
    #[default]
    Whole,
    /// `1/n` of every limit, when `n` instances each enforce their own
    /// share (while the counters they share are out of reach).
    Share(u32),
    /// None: usage is counted and shown, but no limit refuses (upstream
    /// blocks still do).
    CountOnly,
}

/// How a call ended, as far as it is known.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome<'a> {
    /// The reservation made at admission; `None` for a call that did not go
    /// through admission, which then counts as one request now.
    pub reservation: Option<u64>,
    /// What the call used; `None` keeps the reservation's estimate (or
    /// counts one request and nothing else for a call without reservation).
    pub usage: Option<Usage>,
    /// What the upstream answered; `None` when the call ended before the
    /// upstream said anything (the client went away first).
    pub answer: Option<Answer<'a>>,
    /// For a call without reservation, its model and its values for
    /// scoped limits, which choose the scoped limits it is charged to. (A
    /// model named here is also the one a reserved call's spend counts
    /// under, before the reservation's.)
    pub scoped: Option<(Option<&'a str>, &'a ScopeValues)>,
    /// What the call used by kind of token, when known: its token mix in
    /// the spend by model.
    pub tokens: Option<TokenCounts>,
}

/// The upstream's answer to one call.
#[derive(Clone, Copy, Debug, Default)]
pub struct Answer<'a> {
    /// HTTP status; 0 when there was no answer (unreachable, timed out).
    pub status: u16,
    pub error: ErrorFields<'a>,
    pub headers: RateLimitHeaders,
    /// What a billing answer blocks.
    pub billing: BillingScope,
}

/// What a billing answer (`insufficient_quota`, a spend limit) blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BillingScope {
    /// The workspace: a call its app made and reported, with a key
    /// quotawatch does not know.
    #[default]
    Workspace,
    /// The upstream credential the call was made with (a proxied call),
    /// which the engine blocks for every workspace billed to it.
    Credential,
}

impl Answer<'_> {
    pub fn success() -> Self {
        Self {
            status: 200,
            ..Self::default()
        }
    }
}

/// What became of a recorded call's reservation.
#[derive(Debug, PartialEq)]
pub enum Settled {
    /// Its reservation, now settled.
    Reservation(Reservation),
    /// The call had none: it was charged as one request now.
    Unreserved,
    /// Its reservation was unknown, already settled or expired (an expired
    /// one keeps its estimate): nothing was charged or corrected, but the
    /// upstream's answer still counted.
    Missing,
}

/// What [`WorkspaceState::record`] did.
#[derive(Debug)]
pub struct Recorded {
    pub settled: Settled,
    /// What the call finally counts for.
    pub usage: Usage,
    /// What the upstream's answer meant, if there was one.
    pub class: Option<UpstreamClass>,
    pub expired: Vec<Expired>,
    pub changes: Vec<Change>,
}

/// Fields are laid out in declaration order (`repr(C)`), so that what every
/// call reads shares as few cache lines as it can: with thousands of
/// workspaces, a workspace's state is rarely in the CPU's cache, and a call
/// costs mostly the lines it touches. The configuration, the status tracker
/// and the forecasts each keep what admission reads at their end, just
/// before the fields admission and settlement use; the rest follows them.
#[repr(C)]
pub struct WorkspaceState {
    config: WorkspaceConfig,
    tracker: StatusTracker,
    /// Each calendar limit's forecast as of the last tick, with when its
    /// period ends: what admissions evaluate the forecast alerts with, so
    /// that they compute none themselves.
    forecasts: Forecasts,
    rate_block_until: Option<Timestamp>,
    billing_block: Option<BillingBlock>,
    enforcement: Enforcement,
    key_rejected: bool,
    /// Whether the last minute's upstream answers are failing too often;
    /// follows `outcomes`, kept here so that admission need not read it.
    upstream_error_rate: bool,
    /// A loaded billing block started earlier than the one held: its
    /// notification takes the id of the earlier start at the next
    /// evaluation (see [`notification_id`](Self::notification_id)).
    billing_start_moved: bool,
    /// The counters kept elsewhere were reset since the last
    /// reevaluation (see [`note_counts_reset`](Self::note_counts_reset)).
    counts_reset: bool,
    calendars: Calendars,
    /// Reservation ids come from a CSPRNG, so the fast hasher is safe.
    reservations: FxHashMap<u64, Reservation>,
    expiry: ExpiryQueue,
    /// The scope counters each reservation charged, to settle them; only
    /// reservations that matched a scoped limit have an entry.
    scope_charges: FxHashMap<u64, Vec<ScopeRef>>,
    /// Spend by model over the current calendar periods, as history
    /// records calls (see [`note_spend`](Self::note_spend)).
    spend: SpendBook,
    /// The prices in force, which budget notifications price a cheaper
    /// model at (see [`use_prices`](Self::use_prices)).
    prices: Arc<PriceTable>,
    minute: MinuteWindow,
    outcomes: OutcomeWindow,
    errors: ErrorHistory,
    upstream_view: UpstreamView,
    last_error: Option<LastError>,
    /// Models called that the price table does not know, each noticed
    /// once (see [`note_unpriced`](Self::note_unpriced)).
    unpriced_models: Vec<Model>,
    /// The block of the upstream credential this workspace's proxied calls
    /// are billed to, as the engine (which keeps it per credential) last
    /// told: shown in the status, never saved, and raising no notification
    /// here, since the credential has the one notification of it.
    credential_block: Option<CredentialBlock>,
    /// The counters of the scoped limits.
    scopes: ScopeBook,
    /// The smoothed rates of the calendar counters, sampled at each tick.
    rates: Rates,
    /// The alert thresholds that fired in each limit's current period.
    thresholds_fired: PerLimit<Option<Fired>>,
}

/// Reservation ids in order of expiry (the TTL is the same for all), with
/// when the first one expires kept beside the queue: every call asks
/// whether a reservation is due, and the queue's buffer lies elsewhere in
/// memory, a cache line a cold call would otherwise read to hear "no".
#[derive(Debug, Default)]
struct ExpiryQueue {
    first_at: Option<Timestamp>,
    queue: VecDeque<(Timestamp, u64)>,
}

impl ExpiryQueue {
    fn from_unordered(mut entries: Vec<(Timestamp, u64)>) -> Self {
        entries.sort_unstable();
        Self {
            first_at: entries.first().map(|&(at, _)| at),
            queue: entries.into(),
        }
    }

    /// Queues a reservation that expires no earlier than those queued.
    fn push(&mut self, expires_at: Timestamp, id: u64) {
        if self.queue.is_empty() {
            self.first_at = Some(expires_at);
        }
        self.queue.push_back((expires_at, id));
    }

    /// The next reservation due by `now`, taken off the queue.
    fn pop_due(&mut self, now: Timestamp) -> Option<u64> {
        if self.first_at.is_none_or(|at| at > now) {
            return None;
        }
        let (_, id) = self.queue.pop_front()?;
        self.first_at = self.queue.front().map(|&(at, _)| at);
        Some(id)
    }

    fn first_at(&self) -> Option<Timestamp> {
        self.first_at
    }
}

/// The most unpriced models a workspace keeps and notifies about: a tenant
/// sending made-up model names must not make notifications without end.
/// Models beyond them are still charged at the unpriced rates.
pub const MAX_UNPRICED_MODELS: usize = 20;

/// What a limit reads: the counts of the workspace, or of one scope
/// counter over the workspace's calendar periods. The rules of admission
/// are written once, over this.
trait Counted {
    fn minute_total(&self) -> Usage;
    fn calendar_used(&self, period: Period) -> Usage;
    /// Seconds of the minute with usage, oldest first, with the instant
    /// each leaves it.
    fn expiring(&self) -> Box<dyn Iterator<Item = (Timestamp, Usage)> + '_>;
    fn calendars(&self) -> &Calendars;

    fn used(&self, kind: LimitKind) -> u64 {
        match kind.window.period() {
            None => self.minute_total().of(kind.metric),
            Some(period) => self.calendar_used(period).of(kind.metric),
        }
    }

    /// When a request costing `cost` of the limit's metric fits again.
    fn frees_at(&self, kind: LimitKind, cost: u64, max: u64) -> Option<Timestamp> {
        let mut used = self.used(kind);
        if fits(used, cost, max) {
            return None;
        }
        match kind.window.period() {
            Some(period) => Some(self.calendars().get(period).end),
            None => {
                let mut last = None;
                for (expires_at, bucket) in self.expiring() {
                    used = used.saturating_sub(bucket.of(kind.metric));
                    last = Some(expires_at);
                    if fits(used, cost, max) {
                        break;
                    }
                }
                last
            }
        }
    }

    /// When the limit's count is back to zero: the calendar period's end,
    /// or when the newest counted second leaves the minute window.
    fn resets_at(&self, kind: LimitKind) -> Option<Timestamp> {
        match kind.window.period() {
            Some(period) => Some(self.calendars().get(period).end),
            None => self.minute_resets_at(kind.metric),
        }
    }

    /// When the newest second of the minute that counted `metric` leaves
    /// it. This default reads every second; a sliding window answers from
    /// its newest bucket back, which is quick while the window is in use.
    fn minute_resets_at(&self, metric: Metric) -> Option<Timestamp> {
        self.expiring()
            .filter(|(_, bucket)| bucket.of(metric) > 0)
            .last()
            .map(|(expires_at, _)| expires_at)
    }

    fn limit_facts(&self, kind: LimitKind, max: u64) -> LimitFacts {
        let minimal_cost = kind.metric.least_a_call_costs();
        LimitFacts {
            max,
            used: self.used(kind),
            resets_at: self.resets_at(kind),
            frees_at: self.frees_at(kind, minimal_cost, max),
            forecast: None,
        }
    }

    /// Checks `limits` against a request costing `cost`: a request larger
    /// than a limit, or a used-up calendar limit, refuses at once (no wait
    /// helps); a full minute is handed to `keep_latest`, which keeps the
    /// refusal whose retry is latest.
    fn check(
        &self,
        limits: impl Iterator<Item = (LimitKind, u64)>,
        cost: Usage,
        scope: Option<RefusedScope>,
        timezone: Tz,
        keep_latest: &mut dyn FnMut(Refusal),
    ) -> Result<(), Refusal> {
        for (kind, max) in limits {
            let used = self.used(kind);
            let cost = cost.of(kind.metric);
            let refusal = |cause, retry_at, retryable| Refusal {
                cause,
                used,
                max,
                retry_at,
                retryable,
                timezone,
                scope,
            };
            if cost > max {
                return Err(refusal(RefusalCause::TooLarge(kind), None, false));
            }
            if fits(used, cost, max) {
                continue;
            }
            let retry_at = self.frees_at(kind, cost, max);
            match kind.window.period() {
                Some(_) => return Err(refusal(RefusalCause::Limit(kind), retry_at, false)),
                None => keep_latest(refusal(RefusalCause::Limit(kind), retry_at, true)),
            }
        }
        Ok(())
    }
}

impl Counted for WorkspaceState {
    fn minute_total(&self) -> Usage {
        self.minute.total()
    }

    fn calendar_used(&self, period: Period) -> Usage {
        self.calendars.get(period).used
    }

    fn expiring(&self) -> Box<dyn Iterator<Item = (Timestamp, Usage)> + '_> {
        Box::new(self.minute.expiring())
    }

    fn calendars(&self) -> &Calendars {
        &self.calendars
    }

    fn minute_resets_at(&self, metric: Metric) -> Option<Timestamp> {
        // Asked on every admission (for the `x-ratelimit-reset-*` headers).
        self.minute.clear_at(|bucket| bucket.of(metric) > 0)
    }
}

/// One scope counter as its limits read it at `now` (none yet counts
/// nothing).
struct ScopeView<'a> {
    counts: Option<&'a ScopeCounts>,
    calendars: &'a Calendars,
    now: Timestamp,
}

impl Counted for ScopeView<'_> {
    fn minute_total(&self) -> Usage {
        self.counts
            .map_or_else(Usage::default, |counts| counts.minute_total(self.now))
    }

    fn calendar_used(&self, period: Period) -> Usage {
        self.counts.map_or_else(Usage::default, |counts| {
            counts.calendar(period, self.calendars)
        })
    }

    fn expiring(&self) -> Box<dyn Iterator<Item = (Timestamp, Usage)> + '_> {
        match self.counts {
            Some(counts) => Box::new(counts.expiring(self.now)),
            None => Box::new(std::iter::empty()),
        }
    }

    fn calendars(&self) -> &Calendars {
        self.calendars
    }
}

/// "Fits" means the limit still has room and the request's cost fits in it;
/// a zero-token request still needs one token of room.
fn fits(used: u64, cost: u64, max: u64) -> bool {
    used.saturating_add(cost.max(1)) <= max
}

impl WorkspaceState {
    pub fn new(config: WorkspaceConfig, now: Timestamp) -> Self {
        let calendars = Calendars::new(now, config.timezone);
        Self {
            config,
            minute: MinuteWindow::new(SECOND_MS),
            calendars,
            reservations: FxHashMap::default(),
            expiry: ExpiryQueue::default(),
            rate_block_until: None,
            billing_block: None,
            upstream_view: UpstreamView::default(),
            outcomes: OutcomeWindow::new(SECOND_MS),
            errors: ErrorHistory::new(MINUTE_MS),
            last_error: None,
            key_rejected: false,
            upstream_error_rate: false,
            enforcement: Enforcement::Whole,
            tracker: StatusTracker::new(now),
            billing_start_moved: false,
            unpriced_models: Vec::new(),
            credential_block: None,
            spend: SpendBook::default(),
            prices: Arc::default(),
            scopes: ScopeBook::default(),
            scope_charges: FxHashMap::default(),
            rates: Rates::default(),
            forecasts: Forecasts::default(),
            thresholds_fired: PerLimit::default(),
            counts_reset: false,
        }
        .following_scopes()
    }

    /// Makes the scope counters follow the configured rules.
    fn following_scopes(mut self) -> Self {
        self.scopes.follow(&self.config.scoped_limits);
        self
    }

    pub fn restore(
        config: WorkspaceConfig,
        saved: Saved,
        active: Vec<Notification>,
        now: Timestamp,
    ) -> Self {
        let mut state = Self::new(config, now);
        state.minute = MinuteWindow::from_entries(SECOND_MS, &saved.minute, now);
        state.restore_calendars(saved.calendars, now);
        state.expiry = ExpiryQueue::from_unordered(
            saved
                .reservations
                .iter()
                .map(|reservation| (reservation.expires_at, reservation.id))
                .collect(),
        );
        for reservation in saved.reservations {
            state.reservations.insert(reservation.id, reservation);
        }
        state.rate_block_until = saved.rate_block_until;
        state.billing_block = saved.billing_block;
        state.upstream_view = saved.upstream_view;
        state.errors = ErrorHistory::from_entries(MINUTE_MS, &saved.errors, now);
        state.last_error = saved.last_error;
        state.key_rejected = saved.key_rejected;
        state.tracker = StatusTracker::restore(saved.status, saved.since, active);
        state.unpriced_models = saved.unpriced_models;
        for (kind, fired) in saved.thresholds_fired {
            state.thresholds_fired.set(kind, Some(fired));
        }
        // Against the calendar counters restored above, whose periods they
        // share. The reservations restored no longer know the scope
        // counters they charged: their estimates stay charged there, which
        // errs on the strict side.
        state.load_scopes(saved.scopes, now);
        state
    }

    /// The state to save. `scopes_at`, when given, saves the scope
    /// counters that still count then; counters kept elsewhere keep their
    /// own, and the ones here only mirror them.
    pub fn save(&self, scopes_at: Option<Timestamp>) -> Saved {
        Saved {
            minute: self.minute.to_entries(),
            calendars: self.calendars.0.to_vec(),
            // Not those charged elsewhere: instances share the saved state,
            // and one that restored another's would count them in history
            // again when they expire. Their calls end with this process,
            // and the counters that charged them keep their estimates.
            reservations: self
                .reservations
                .values()
                .filter(|reservation| reservation.charged_elsewhere_us.is_none())
                .cloned()
                .collect(),
            rate_block_until: self.rate_block_until,
            billing_block: self.billing_block,
            upstream_view: self.upstream_view,
            errors: self.errors.to_entries(),
            last_error: self.last_error.clone(),
            key_rejected: self.key_rejected,
            status: self.tracker.status(),
            since: self.tracker.since(),
            unpriced_models: self.unpriced_models.clone(),
            thresholds_fired: self
                .thresholds_fired
                .iter()
                .filter_map(|(kind, fired)| Some((kind, fired?)))
                .collect(),
            scopes: scopes_at.map_or_else(Vec::new, |now| self.scopes.counted(now)),
        }
    }

    pub fn config(&self) -> &WorkspaceConfig {
        &self.config
    }

    pub fn status(&self) -> super::status::Status {
        self.tracker.status()
    }

    pub fn active_notifications(&self) -> &[Notification] {
        self.tracker.active()
    }

    /// Takes the saved calendar counters, rolled to `now`. A period saved
    /// by a version that did not count it starts from the count of a saved
    /// period inside it (this month from today's): what it surely used,
    /// rather than nothing.
    fn restore_calendars(&mut self, saved: Vec<CalendarCounter>, now: Timestamp) {
        let tz = self.config.timezone;
        for period in Period::ALL {
            let fresh = CalendarCounter::new(period, now, tz);
            let counter = match saved.iter().find(|counter| counter.period == period) {
                Some(counter) => counter.clone(),
                None => CalendarCounter {
                    used: saved
                        .iter()
                        .find(|inner| fresh.start <= inner.start && inner.end <= fresh.end)
                        .map_or_else(Usage::default, |inner| inner.used),
                    ..fresh
                },
            };
            *self.calendars.get_mut(period) = counter;
        }
        self.calendars.roll(now, tz);
    }

    /// Brings everything up to `now`. Returns the reservations that expired:
    /// their estimates are now final.
    fn advance(&mut self, now: Timestamp) -> Vec<Expired> {
        self.advance_upstream(now);
        self.advance_limits(now)
    }

    /// Slides the upstream error windows. Admission leaves them alone (it
    /// changes nothing there, and touching them would cost cache misses on
    /// every request); reports and ticks bring them up to date.
    fn advance_upstream(&mut self, now: Timestamp) {
        self.outcomes.advance(now);
        self.errors.advance(now);
        self.upstream_error_rate = error_rate_alarming(self.outcomes.total());
    }

    /// Brings limit windows, blocks and reservations up to `now`.
    fn advance_limits(&mut self, now: Timestamp) -> Vec<Expired> {
        self.minute.advance(now);
        self.calendars.roll(now, self.config.timezone);
        if self.rate_block_until.is_some_and(|until| until <= now) {
            self.rate_block_until = None;
        }
        let mut expired = Vec::new();
        while let Some(id) = self.expiry.pop_due(now) {
            if let Some(reservation) = self.reservations.remove(&id) {
                self.scope_charges.remove(&id);
                expired.push(reservation.expired());
            }
        }
        expired
    }

    /// The configured limits as this instance enforces them (see
    /// [`Enforcement::Share`]).
    fn limits(&self) -> impl Iterator<Item = (LimitKind, u64)> + '_ {
        self.enforced(&self.config.limits)
    }

    /// `limits` (the workspace's, or a scoped limit's) as this instance
    /// enforces them (see [`Enforcement::Share`]).
    fn enforced<'a>(&self, limits: &'a Limits) -> impl Iterator<Item = (LimitKind, u64)> + 'a {
        let share = match self.enforcement {
            Enforcement::Share(instances) => u64::from(instances.max(1)),
            Enforcement::Whole | Enforcement::CountOnly => 1,
        };
        // A division per limit and call is worth skipping in the usual case.
        limits
            .configured()
            .map(move |(kind, max)| (kind, if share == 1 { max } else { max / share }))
    }

    /// The counter `scope` reads, as of `now`.
    fn scope_view(&self, scope: &ScopeRef, now: Timestamp) -> ScopeView<'_> {
        ScopeView {
            counts: self.scopes.get(scope),
            calendars: &self.calendars,
            now,
        }
    }

    /// Decides whether a request costing `cost` may go ahead now, without
    /// changing anything. `probe_due` says whether a billing block would let
    /// this request through as its probe.
    fn verdict(
        &self,
        cost: Usage,
        scopes: &[ScopeRef],
        now: Timestamp,
        probe_due: bool,
    ) -> Result<(), Refusal> {
        let timezone = self.config.timezone;
        let upstream = |cause, retry_at, retryable| Refusal {
            cause,
            used: 0,
            max: 0,
            retry_at,
            retryable,
            timezone,
            scope: None,
        };
        let mut retryable: Option<Refusal> = None;
        let mut keep_latest = |refusal: Refusal| {
            if retryable.is_none_or(|kept| refusal.retry_at > kept.retry_at) {
                retryable = Some(refusal);
            }
        };
        if self.enforcement != Enforcement::CountOnly {
            self.check(self.limits(), cost, None, timezone, &mut keep_latest)?;
            let rules = self.config.scoped_limits.rules();
            for scope in scopes {
                let rule = &rules[scope.rule];
                let refused = RefusedScope {
                    kind: rule.kind,
                    rule: scope.rule,
                };
                self.scope_view(scope, now).check(
                    self.enforced(&rule.limits),
                    cost,
                    Some(refused),
                    timezone,
                    &mut keep_latest,
                )?;
            }
        }
        if let Some(block) = self.billing_block
            && !probe_due
        {
            return Err(upstream(
                RefusalCause::UpstreamQuota(block.code),
                None,
                false,
            ));
        }
        if let Some(until) = self.rate_block_until.filter(|until| *until > now) {
            keep_latest(upstream(
                RefusalCause::UpstreamRateLimited,
                Some(until),
                true,
            ));
        }
        retryable.map_or(Ok(()), Err)
    }

    fn observation(&self, now: Timestamp, settings: &Settings) -> Observation {
        let mut usage = PerLimit::default();
        for (kind, max) in self.limits() {
            usage.set(kind, Some((self.used(kind), max)));
        }
        Observation {
            usage,
            forecasts: self.forecasts,
            forecast_lead: settings.forecast_lead_time,
            warn_at: self.config.warn_at,
            upstream_rate_limited: self.upstream_rate_limited(now),
            upstream_quota_exhausted: self.billing_block.is_some(),
            upstream_error_rate: self.upstream_error_rate,
            upstream_key_rejected: self.key_rejected,
        }
    }

    fn upstream_rate_limited(&self, now: Timestamp) -> bool {
        self.rate_block_until.is_some_and(|until| until > now)
    }

    /// Whether an [`evaluate`](Self::evaluate) now would find the status
    /// clear and leave it so (see [`StatusTracker::stays_clear`]): nothing
    /// the upstream said stands against the workspace, and no limit is near.
    fn stays_clear(&self, now: Timestamp, settings: &Settings) -> bool {
        !self.billing_start_moved
            && !self.upstream_rate_limited(now)
            && self.billing_block.is_none()
            && !self.upstream_error_rate
            && !self.key_rejected
            && self.tracker.stays_clear(
                self.limits().map(|(kind, max)| (self.used(kind), max)),
                self.config.warn_at,
                &self.forecasts,
                settings.forecast_lead_time,
                now,
            )
    }

    fn facts(&self, now: Timestamp, settings: &Settings) -> Facts<'_> {
        let mut limits = PerLimit::default();
        for (kind, max) in self.limits() {
            limits.set(kind, Some(self.limit_facts_now(kind, max, now)));
        }
        Facts {
            limits,
            upstream_blocked_until: self.rate_block_until,
            billing_code: self.billing_block.map(|block| block.code),
            upstream_outcomes: self.outcomes.total(),
            last_error: self.last_error.as_ref(),
            upstream: &self.upstream_view,
            probe_interval: settings.probe_interval,
            calendars: &self.calendars,
            spend: &self.spend,
            prices: &self.prices,
        }
    }

    /// Re-derives the status; notification texts are written only for
    /// causes that just appeared.
    fn evaluate(
        &mut self,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Vec<Change> {
        if self.stays_clear(now, settings) {
            return Vec::new();
        }
        let observation = self.observation(now, settings);
        let observed = self.tracker.observe(&observation, now);
        // Two instances that saw a billing block at once each started it at
        // their own time; the store keeps the earlier, and once it is
        // loaded here the notification is raised again under its id.
        let reissued = std::mem::take(&mut self.billing_start_moved)
            .then_some(Cause::UpstreamQuotaExhausted)
            .filter(|cause| self.tracker.causes().contains(*cause));
        let causes = match (observed, reissued) {
            (Some(causes), _) => causes,
            (None, Some(_)) => self.tracker.causes(),
            (None, None) => return Vec::new(),
        };
        let facts = self.facts(now, settings);
        let raised = self
            .tracker
            .appeared(causes)
            .chain(reissued.filter(|cause| causes.contains(*cause)))
            .map(|cause| {
                let id = self.notification_id(cause, fresh_id);
                describe(id, &self.config, cause, &facts, now)
            })
            .collect();
        self.tracker.transition(causes, raised, now)
    }

    /// What the minute counted over its last [`MINUTE_HORIZON`], from its
    /// one-second buckets: the seconds still in the window for longer than
    /// the rest of the minute.
    fn recent_seconds(&self, now: Timestamp) -> Usage {
        let recent_from = now.plus(Duration::from_secs(60) - MINUTE_HORIZON);
        self.minute
            .expiring()
            .filter(|(leaves_at, _)| *leaves_at > recent_from)
            .fold(Usage::default(), |sum, (_, usage)| sum + usage)
    }

    /// When the limit `kind` of `max` runs out at its recent rate.
    fn forecast_of(&self, kind: LimitKind, max: u64, now: Timestamp) -> Forecast {
        let recent = match kind.window.period() {
            None => self.recent_seconds(now),
            Some(_) => Usage::default(),
        };
        forecast(
            kind,
            self.used(kind),
            max,
            rate_of(kind, &self.rates, recent),
            self.resets_at(kind),
            now,
        )
    }

    /// The limit's facts with its forecast, as the status and notification
    /// texts show them.
    fn limit_facts_now(&self, kind: LimitKind, max: u64, now: Timestamp) -> LimitFacts {
        LimitFacts {
            forecast: Some(self.forecast_of(kind, max, now)),
            ..self.limit_facts(kind, max)
        }
    }

    /// Samples the calendar counters' rates and works out each calendar
    /// limit's forecast, for the evaluations until the next tick.
    fn refresh_forecasts(&mut self, now: Timestamp) {
        self.rates.sample(&self.calendars, now);
        let mut forecasts = PerLimit::default();
        for (kind, max) in self.limits() {
            if let Some(period) = kind.window.period() {
                let ends = self.calendars.get(period).end;
                forecasts.set(kind, Some((self.forecast_of(kind, max, now), ends)));
            }
        }
        self.forecasts = Forecasts::new(forecasts);
    }

    /// Checks every calendar limit against its alert thresholds: raises a
    /// notification for each threshold crossed for the first time in the
    /// limit's period, and resolves those of crossings that ended (a new
    /// period, a raised or removed limit). Against the whole limits, also
    /// while only a share is enforced: a share's count is no measure of
    /// the whole.
    fn check_thresholds(&mut self, now: Timestamp) -> Vec<Change> {
        let mut changes = Vec::new();
        for kind in LimitKind::ALL {
            let Some(period) = kind.window.period() else {
                continue;
            };
            let counter = self.calendars.get(period);
            let reading = self.config.limits.get(kind).map(|max| Reading {
                max,
                used: self.used(kind),
                period_start: counter.start,
            });
            let fired = self.thresholds_fired.get(kind);
            if reading.is_none() && fired.is_none() {
                continue;
            }
            let step =
                super::threshold::check(fired, reading, self.config.alert_thresholds.of(kind));
            self.thresholds_fired.set(kind, step.fired);
            if !step.ended.is_empty() {
                changes.extend(self.tracker.resolve_where(
                    |notification| {
                        notification.limit == Some(kind)
                            && notification
                                .crossing
                                .is_some_and(|crossing| step.ended.contains(crossing.percent))
                    },
                    now,
                ));
            }
            let Some(reading) = reading else {
                continue;
            };
            for percent in step.crossed.iter() {
                let crossing = Crossing {
                    percent,
                    used: reading.used,
                    max: reading.max,
                    period_start: counter.start,
                    period_end: counter.end,
                };
                let notification = describe_threshold(&self.config, kind, crossing, now);
                // Restored with the notifications, or raised by another
                // instance under the same id: not raised twice.
                let known = self
                    .tracker
                    .active()
                    .iter()
                    .any(|active| active.id == notification.id);
                if !known {
                    changes.push(self.tracker.raise(notification));
                }
            }
        }
        changes
    }

    /// Forgets which thresholds fired and resolves their notifications:
    /// the counts they measured are gone.
    fn forget_thresholds(&mut self, now: Timestamp) -> Vec<Change> {
        self.thresholds_fired = PerLimit::default();
        self.tracker
            .resolve_where(|notification| notification.crossing.is_some(), now)
    }

    /// The id of a new notification of `cause`. A billing block's is derived
    /// from the workspace and the block's start: with shared counters, the
    /// store keeps the earliest start any instance wrote and every instance
    /// loads it, so all of them (and the history, which the lease holder
    /// writes) name the block's notification alike; one that started the
    /// block on its own at the same moment takes the stored start when it
    /// loads it (`billing_start_moved`). Every other cause is observed by
    /// each instance at its own moment, with nothing in the counters that
    /// marks its start: its notification gets a fresh id here, which the
    /// engine agrees on with the other instances before anyone sees it (the
    /// first instance to raise the cause names its episode, the others
    /// adopt that name, see [`rename_notification`](Self::rename_notification)).
    fn notification_id(&self, cause: Cause, fresh_id: &mut dyn FnMut() -> u64) -> String {
        match (cause, self.billing_block) {
            (Cause::UpstreamQuotaExhausted, Some(block)) => {
                shared_id(&self.config.id, cause, block.since)
            }
            _ => format!("ntf_{:016x}", fresh_id()),
        }
    }

    /// Whether instances sharing counters derive the id of `cause`'s
    /// notification from what they share (see
    /// [`notification_id`](Self::notification_id)); the others' ids must be
    /// agreed on.
    pub fn derives_notification_id(cause: Cause) -> bool {
        cause == Cause::UpstreamQuotaExhausted
    }

    /// Gives the active notification `from`, which nobody has seen yet, the
    /// id agreed on with other instances. Answers whether it was still
    /// active.
    pub fn rename_notification(&mut self, from: &str, to: &str) -> bool {
        self.tracker.rename(from, to)
    }

    /// Replaces the active notification `from`, already seen under that id,
    /// by the same one under the id agreed on with other instances: `from`
    /// is resolved and `to` raised (as a billing block's notification is
    /// when its start moves).
    pub fn reissue_notification(&mut self, from: &str, to: &str, now: Timestamp) -> Vec<Change> {
        self.tracker.reissue(from, to, now)
    }

    /// Admits the request if every limit has room and no block applies, and
    /// then charges all limits at once; a refused request charges nothing.
    pub fn admit(
        &mut self,
        request: &Request,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Admission {
        let expired = self.advance_limits(now);
        let scopes = self.matching(request);
        let (cost, verdict) = self.judge(request, &scopes, now);
        let result = match verdict {
            Ok(()) => {
                self.minute.add(now, cost);
                self.calendars.add(cost);
                self.charge_scopes(&scopes, cost, now);
                let probe = self.billing_block.is_some();
                if let Some(block) = &mut self.billing_block {
                    block.take_probe(now, settings.probe_interval);
                }
                let admitted = Admitted {
                    id: fresh_id(),
                    charged_at: now,
                    expires_at: now.plus(settings.reservation_ttl),
                    probe,
                };
                self.hold(&admitted, request, None);
                if !scopes.is_empty() {
                    self.scope_charges.insert(admitted.id, scopes);
                }
                Ok(admitted)
            }
            Err(refusal) => {
                self.note_scope_refusal(&refusal, &scopes);
                Err(self.refused(refusal, now))
            }
        };
        Admission {
            result,
            expired,
            changes: self.evaluate(now, settings, fresh_id),
        }
    }

    /// Refuses a request because the upstream credential it would be billed
    /// to is blocked and its probe is not due (the engine decides that, per
    /// credential): the refusal a billing block of this workspace's own
    /// would give, counted alike.
    pub fn refuse_for_credential(
        &mut self,
        code: BillingCode,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Admission {
        let refusal = Refusal {
            cause: RefusalCause::UpstreamQuota(code),
            used: 0,
            max: 0,
            retry_at: None,
            retryable: false,
            timezone: self.config.timezone,
            scope: None,
        };
        Admission {
            result: Err(self.refused(refusal, now)),
            expired: self.advance_limits(now),
            changes: self.evaluate(now, settings, fresh_id),
        }
    }

    /// Tells the workspace the block of the credential it is billed to
    /// (`None` once lifted); answers whether that changed anything.
    pub fn set_credential_block(&mut self, block: Option<CredentialBlock>) -> bool {
        let changed = self.credential_block != block;
        self.credential_block = block;
        changed
    }

    /// Whether [`admit`](Self::admit) refuses any request now, whatever it
    /// costs: a billing block whose probe is not due, or a calendar limit
    /// (a day's, a month's) used up. The proxy asks this before it reads a request's body, so that a
    /// workspace that cannot be admitted costs no more than authenticating.
    pub fn refuses_any_request(&self, now: Timestamp) -> bool {
        if self
            .billing_block
            .is_some_and(|block| !block.probe_due(now))
        {
            return true;
        }
        let used_up = |(kind, max): (LimitKind, u64)| {
            kind.window.period().is_some_and(|period| {
                self.calendars.get(period).contains(now) && max > 0 && self.used(kind) >= max
            })
        };
        self.enforcement != Enforcement::CountOnly && self.limits().any(used_up)
    }

    /// Keeps the reservation of an admitted request until it is settled or
    /// expires; `charged_elsewhere_us` as in [`Reservation`].
    fn hold(&mut self, admitted: &Admitted, request: &Request, charged_elsewhere_us: Option<i64>) {
        self.expiry.push(admitted.expires_at, admitted.id);
        self.reservations.insert(
            admitted.id,
            Reservation {
                id: admitted.id,
                charged_at: admitted.charged_at,
                estimate: request.estimate,
                expires_at: admitted.expires_at,
                model: request.model.clone(),
                probe: admitted.probe,
                charged_elsewhere_us,
            },
        );
    }

    /// What `request` costs, and whether it may go ahead now with the
    /// scope counters it charges (a billing block lets it through when its
    /// probe is due).
    fn judge(
        &self,
        request: &Request,
        scopes: &[ScopeRef],
        now: Timestamp,
    ) -> (Usage, Result<(), Refusal>) {
        let cost = request.estimate;
        let probe_due = self.billing_block.is_some_and(|block| block.probe_due(now));
        (cost, self.verdict(cost, scopes, now, probe_due))
    }

    /// The scope counters `request` charges.
    fn matching(&self, request: &Request) -> Vec<ScopeRef> {
        self.config
            .scoped_limits
            .matching(request.model.as_deref(), &request.scoped)
    }

    /// Charges `usage` at `now` to each of `scopes`.
    fn charge_scopes(&mut self, scopes: &[ScopeRef], usage: Usage, now: Timestamp) {
        let rules = self.config.scoped_limits.rules();
        for scope in scopes {
            let limits = &rules[scope.rule].limits;
            self.scopes
                .charge(scope, usage, now, limits, &self.calendars);
        }
    }

    /// Counts a refusal by an each-rule against that rule, for the status.
    fn note_scope_refusal(&mut self, refusal: &Refusal, scopes: &[ScopeRef]) {
        if let Some(refused) = refusal.scope
            && let Some(scope) = scopes.iter().find(|scope| scope.rule == refused.rule)
        {
            self.scopes.note_refusal(scope);
        }
    }

    /// Counts a refusal in the error history.
    fn refused(&mut self, refusal: Refusal, now: Timestamp) -> Refusal {
        self.errors.add(now, ErrorTally::refusal());
        refusal
    }

    /// The counts as of `now`: what a share of the usage is taken from.
    pub fn counts(&self) -> Counts {
        Counts {
            minute: self.minute.to_entries(),
            calendars: Period::ALL.map(|period| {
                let counter = self.calendars.get(period);
                (counter.start, counter.used)
            }),
        }
    }

    /// Replaces the counts with `counts`, as of `at`: those of counters kept
    /// elsewhere, or a share of this state's own. A day or month other than
    /// the one holding `at` counts nothing.
    pub fn load_counts(&mut self, counts: &Counts, at: Timestamp) {
        self.minute = MinuteWindow::from_entries(SECOND_MS, &counts.minute, at);
        let timezone = self.config.timezone;
        for counter in self.calendars.iter_mut() {
            // Rolled to `at` rather than made anew: its bounds hold until
            // the period is over, and working them out takes timezone
            // conversions, on every load.
            counter.roll(at, timezone);
            let (start, used) = counts.calendar(counter.period);
            counter.used = if counter.start == start {
                used
            } else {
                Usage::default()
            };
        }
    }

    /// Replaces scope counters by `loaded`, counted elsewhere or saved, as
    /// of `at`; those of rules no longer configured are dropped.
    pub fn load_scopes(&mut self, loaded: impl IntoIterator<Item = LoadedScope>, at: Timestamp) {
        let rules = self.config.scoped_limits.rules();
        for scope in loaded {
            if let Some(rule) = rules.iter().find(|rule| rule.id == scope.rule) {
                self.scopes.load(
                    scope.rule,
                    scope.target,
                    scope.counts,
                    &rule.limits,
                    &self.calendars,
                    at,
                );
            }
        }
    }

    /// The upstream's blocks.
    pub fn blocks(&self) -> Blocks {
        Blocks {
            rate_until: self.rate_block_until,
            billing: self.billing_block,
        }
    }

    /// Replaces the upstream's blocks with `blocks`, as of `at`: those of
    /// counters kept elsewhere, where every instance writes what it sees.
    pub fn load_blocks(&mut self, blocks: Blocks, at: Timestamp) {
        self.rate_block_until = blocks.rate_until.filter(|until| *until > at);
        let start = |billing: Option<BillingBlock>| billing.map(|block| block.since);
        if let (Some(held), Some(loaded)) = (start(self.billing_block), start(blocks.billing)) {
            self.billing_start_moved |= held != loaded;
        }
        self.billing_block = blocks.billing;
    }

    /// How much of the limits is enforced.
    pub fn enforcement(&self) -> Enforcement {
        self.enforcement
    }

    /// Whether reservation `id` is held here, unsettled and unexpired.
    pub fn holds_reservation(&self, id: u64) -> bool {
        self.reservations.contains_key(&id)
    }

    /// The estimate of reservation `id`, if it was charged here rather than
    /// elsewhere.
    pub fn reservation_estimate(&self, id: u64) -> Option<Usage> {
        self.reservations
            .get(&id)
            .filter(|reservation| reservation.charged_elsewhere_us.is_none())
            .map(|reservation| reservation.estimate)
    }

    /// Takes out reservation `id` if it is held here and was charged
    /// elsewhere, to be settled there: once, as it is no longer here. One
    /// whose time is up at `now` stays, to expire: the counters that
    /// charged it keep its estimate, as a reservation charged here keeps it
    /// once expired (see `record`).
    pub fn take_reservation_charged_elsewhere(
        &mut self,
        id: u64,
        now: Timestamp,
    ) -> Option<Reservation> {
        let reservation = self.reservations.get(&id)?;
        if reservation.charged_elsewhere_us.is_none() || reservation.expires_at <= now {
            return None;
        }
        self.reservations.remove(&id)
    }

    /// Puts back a reservation [taken](Self::take_reservation_charged_elsewhere)
    /// that could not be settled where it was charged, to be settled here
    /// instead. One whose time ran out at `now`, meanwhile, is not put back
    /// but ends unsettled, keeping its estimate: the expiry it was due may
    /// have passed it by while it was out.
    pub fn return_reservation(&mut self, reservation: Reservation, now: Timestamp) -> Returned {
        if reservation.expires_at <= now {
            return Returned::Expired(reservation.expired());
        }
        let estimate = reservation.estimate;
        let here = Reservation {
            charged_elsewhere_us: None,
            ..reservation
        };
        self.reservations.insert(here.id, here);
        Returned::Held { estimate }
    }

    /// Switches how much of the limits is enforced; the status follows.
    pub fn set_enforcement(
        &mut self,
        enforcement: Enforcement,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Vec<Change> {
        self.enforcement = enforcement;
        self.evaluate(now, settings, fresh_id)
    }

    /// Tells that the counters kept elsewhere, loaded into this state,
    /// were reset (by another instance, or by this one through them): at
    /// the next reevaluation, the pace measured before and the thresholds
    /// crossed are forgotten, as this instance's own reset forgets them.
    pub fn note_counts_reset(&mut self) {
        self.counts_reset = true;
    }

    /// Lets the status follow counts and blocks loaded meanwhile.
    pub fn reevaluate(
        &mut self,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Vec<Change> {
        self.advance_upstream(now);
        let mut changes = Vec::new();
        if std::mem::take(&mut self.counts_reset) {
            self.rates.forget();
            self.forecasts = Forecasts::default();
            changes = self.forget_thresholds(now);
        }
        changes.extend(self.evaluate(now, settings, fresh_id));
        changes
    }

    /// Concludes an admission that counters kept elsewhere decided, once
    /// their counts are loaded: `decided` is the admission they charged, or
    /// `None` for a refusal, which the loaded counts explain.
    ///
    /// The reservation of an admitted request is held here, charged at
    /// `charged_us` of their clock, unless the request may be settled
    /// through any instance: then they keep it.
    pub fn conclude_admission_made_elsewhere(
        &mut self,
        decided: Option<Admitted>,
        request: &Request,
        charged_us: i64,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Admission {
        let result = match decided {
            Some(admitted) => {
                if !request.settled_anywhere {
                    self.hold(&admitted, request, Some(charged_us));
                }
                Ok(admitted)
            }
            None => {
                let refusal = self.explain_refusal(request, now);
                self.note_scope_refusal(&refusal, &self.matching(request));
                Err(self.refused(refusal, now))
            }
        };
        Admission {
            result,
            expired: Vec::new(),
            changes: self.evaluate(now, settings, fresh_id),
        }
    }

    /// Why counters kept elsewhere refused `request`, from the counts they
    /// answered with: the same verdict they reached. Should a newer state loaded
    /// meanwhile have room after all, the refusal names the fullest limit
    /// and asks for a retry in a second.
    fn explain_refusal(&self, request: &Request, now: Timestamp) -> Refusal {
        self.judge(request, &self.matching(request), now)
            .1
            .err()
            .unwrap_or_else(|| {
                let retry_at = Some(now.plus(Duration::from_secs(1)));
                let fullest = self
                    .limits()
                    .min_by_key(|&(kind, max)| max.saturating_sub(self.used(kind)));
                match fullest {
                    Some((kind, max)) => Refusal {
                        cause: RefusalCause::Limit(kind),
                        used: self.used(kind),
                        max,
                        retry_at,
                        retryable: true,
                        timezone: self.config.timezone,
                        scope: None,
                    },
                    None => Refusal {
                        cause: RefusalCause::UpstreamRateLimited,
                        used: 0,
                        max: 0,
                        retry_at,
                        retryable: true,
                        timezone: self.config.timezone,
                        scope: None,
                    },
                }
            })
    }

    /// Records how a call ended: settles its reservation (or counts it as
    /// one request now, if it had none) and folds in the upstream's answer.
    pub fn record(
        &mut self,
        outcome: &Outcome<'_>,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Recorded {
        let expired = self.advance(now);
        let used = outcome.usage.unwrap_or(Usage::call(0));
        let (settled, usage) = match outcome.reservation {
            Some(id) => match self.reservations.remove(&id) {
                Some(reservation) => {
                    let usage = outcome.usage.unwrap_or(reservation.estimate);
                    self.settle(&reservation, usage, now);
                    self.settle_scopes(&reservation, usage, now);
                    (Settled::Reservation(reservation), usage)
                }
                None => (Settled::Missing, used),
            },
            None => {
                // It happened, so it is charged even beyond the limits, to
                // the scopes it falls under too.
                self.minute.add(now, used);
                self.calendars.add(used);
                let scopes = outcome
                    .scoped
                    .map(|(model, values)| self.config.scoped_limits.matching(model, values))
                    .unwrap_or_default();
                self.charge_scopes(&scopes, used, now);
                (Settled::Unreserved, used)
            }
        };
        let mut recorded = self.conclude_record(outcome, settled, usage, now, settings, fresh_id);
        recorded.expired = expired;
        recorded
    }

    /// Concludes a call once it is settled (here, or by counters kept
    /// elsewhere as they reported, counting `usage`, with their counts
    /// loaded): folds in the upstream's answer and re-evaluates.
    pub fn conclude_record(
        &mut self,
        outcome: &Outcome<'_>,
        settled: Settled,
        usage: Usage,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Recorded {
        self.advance_upstream(now);
        let admitted_at = match &settled {
            Settled::Reservation(reservation) => Some(reservation.charged_at),
            Settled::Unreserved | Settled::Missing => None,
        };
        let class = outcome
            .answer
            .map(|answer| self.observe_upstream(&answer, admitted_at, now, settings));
        // Before the status is evaluated, so that a budget notification
        // this call raises counts the call in its figures.
        self.note_settled_spend(outcome, &settled, usage, now);
        Recorded {
            settled,
            usage,
            class,
            expired: Vec::new(),
            changes: self.evaluate(now, settings, fresh_id),
        }
    }

    /// Replaces a reservation's estimate with what the call used, metric by
    /// metric. The correction lands in the second the request was charged,
    /// as long as that second is still in the window; usage beyond the
    /// estimate is charged now.
    fn settle(&mut self, reservation: &Reservation, actual: Usage, now: Timestamp) {
        let extra = actual.saturating_sub(reservation.estimate);
        let unused = reservation.estimate.saturating_sub(actual);
        let corrected = self.minute.correct(reservation.charged_at, extra, unused);
        if !corrected && extra.any() {
            self.minute.add(now, extra);
        }
        // Each calendar period gains the extra usage, and loses the unused
        // estimate only if the request was charged in it.
        for counter in self.calendars.iter_mut() {
            counter.used += extra;
            if counter.contains(reservation.charged_at) {
                counter.used = counter.used.saturating_sub(unused);
            }
        }
    }

    /// Corrects the scope counters `reservation` charged, as
    /// [`settle`](Self::settle) corrects the workspace's.
    fn settle_scopes(&mut self, reservation: &Reservation, actual: Usage, now: Timestamp) {
        let Some(scopes) = self.scope_charges.remove(&reservation.id) else {
            return;
        };
        let extra = actual.saturating_sub(reservation.estimate);
        let unused = reservation.estimate.saturating_sub(actual);
        let rules = self.config.scoped_limits.rules();
        for scope in &scopes {
            // A rule reconfigured away since is no longer counted.
            let Some(rule) = rules.iter().find(|rule| rule.id == scope.id) else {
                continue;
            };
            self.scopes.correct(
                scope,
                reservation.charged_at,
                extra,
                unused,
                now,
                &rule.limits,
                &self.calendars,
            );
        }
    }

    /// Folds in what the upstream answered to one call admitted at
    /// `admitted_at` (if it went through admission).
    fn observe_upstream(
        &mut self,
        report: &Answer<'_>,
        admitted_at: Option<Timestamp>,
        now: Timestamp,
        settings: &Settings,
    ) -> UpstreamClass {
        if !report.headers.is_empty() {
            self.upstream_view.observe(&report.headers, now);
        }
        let class = classify(report.status, report.error);
        let failed = u64::from(class == UpstreamClass::ServerError);
        self.outcomes.add(now, Outcomes { total: 1, failed });
        self.errors.add(now, ErrorTally::of_class(class));
        self.upstream_error_rate = error_rate_alarming(self.outcomes.total());
        if class != UpstreamClass::Success {
            self.last_error = Some(LastError {
                at: now,
                status_code: report.status,
                error_type: report.error.error_type.map(str::to_owned),
                code: report.error.code.map(str::to_owned),
                message: report.error.message.map(str::to_owned),
            });
        }
        match class {
            UpstreamClass::Success => {
                self.key_rejected = false;
                if self
                    .billing_block
                    .is_some_and(|block| block.lifted_by(admitted_at))
                {
                    self.billing_block = None;
                }
            }
            UpstreamClass::RateLimited => {
                let until = now.plus(report.headers.backoff());
                self.rate_block_until = self.rate_block_until.max(Some(until));
            }
            // A proxied call's billing answer blocks its credential, which
            // the engine keeps (see `domain::credential`), not this workspace.
            UpstreamClass::QuotaExhausted(_) if report.billing == BillingScope::Credential => {}
            UpstreamClass::QuotaExhausted(code) => {
                self.billing_block = Some(BillingBlock::answered(
                    self.billing_block,
                    code,
                    now,
                    settings.probe_interval,
                ));
            }
            UpstreamClass::KeyRejected => self.key_rejected = true,
            UpstreamClass::RequestTooLarge
            | UpstreamClass::ServerError
            | UpstreamClass::ClientError => {}
        }
        class
    }

    /// Lets time pass: windows slide, blocks and reservations expire. Returns
    /// whether the counted usage changed, the expired reservations and the
    /// status changes.
    pub fn tick(
        &mut self,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> (bool, Vec<Expired>, Vec<Change>) {
        let before = (self.minute.total(), self.calendars.used());
        let expired = self.advance(now);
        self.scopes.evict(now);
        let usage_changed = before != (self.minute.total(), self.calendars.used());
        self.refresh_forecasts(now);
        let mut changes = self.evaluate(now, settings, fresh_id);
        changes.extend(self.check_thresholds(now));
        (usage_changed, expired, changes)
    }

    /// The earliest instant at which a [`tick`](Self::tick) can change
    /// anything, as of a tick at `now`: `now` itself while something
    /// changes at every tick (a cause or a warning standing, a limit near
    /// or reached, a rate above zero to smooth); else the first of a
    /// reservation's expiry, a bucket leaving the minute or the upstream's
    /// windows, an upstream block's end, a calendar period's end, a
    /// forecast's basis turning smoothed and an end user's counter to
    /// evict. Ticks before it change nothing but when the rates were last
    /// sampled (see [`rested_until`](Self::rested_until)), so a state that
    /// nothing touches need not be ticked until then.
    pub fn next_change_at(&self, now: Timestamp, settings: &Settings) -> Timestamp {
        if !self.stays_clear(now, settings) {
            return now;
        }
        let Some(rates_steady_until) = self.rates.steady_until() else {
            return now;
        };
        let calendars = self.calendars.0.iter().map(|counter| {
            if counter.contains(now) {
                counter.end
            } else {
                now
            }
        });
        let first_leaving = [
            self.minute.expiring().next().map(|(at, _)| at),
            self.outcomes.expiring().next().map(|(at, _)| at),
            self.errors.expiring().next().map(|(at, _)| at),
        ];
        first_leaving
            .into_iter()
            .chain([
                self.expiry.first_at(),
                self.rate_block_until,
                self.scopes.next_eviction_at(),
            ])
            .flatten()
            .chain(calendars)
            .fold(rates_steady_until, Timestamp::min)
            .max(now)
    }

    /// Notes that nothing touched the state from its last tick until `at`,
    /// while a tick had nothing to do (before
    /// [`next_change_at`](Self::next_change_at)): the rates count that time
    /// as the ticks skipped meanwhile would have, so that what the counters
    /// grow by afterwards is measured over the time since `at`.
    pub fn rested_until(&mut self, at: Timestamp) {
        self.rates.rested_until(at);
    }

    /// An admin reset: clears counters, upstream blocks and active
    /// notifications. Requests in flight keep their reservations, now charged
    /// nothing, so that their settlement counts their actual usage afresh.
    /// Those charged elsewhere are left as they are: the reset of the
    /// counters that charged them decides, by their clock, which it cleared
    /// (one whose admission reached them just after their reset keeps its
    /// estimate, or its settlement would charge it there twice).
    pub fn reset(&mut self, now: Timestamp) -> Vec<Change> {
        self.clear_usage(now);
        self.clear_blocks();
        // Their notifications are resolved with every other: a model still
        // unpriced is noticed again at its next call; so are the
        // thresholds' crossings, which start again from zero.
        self.unpriced_models.clear();
        self.thresholds_fired = PerLimit::default();
        self.tracker.clear(now)
    }

    /// Notes what a finished call of `model`, charged at `at`, used and
    /// cost, in the spend of the calendar periods that hold `at`: a settled
    /// call as it settles, an expired reservation's estimate and the
    /// spend history held at start-up as the engine passes them, so that
    /// the status and budget notifications see spend by model without
    /// reading the database.
    pub fn note_spend(&mut self, at: Timestamp, model: &Model, spend: ModelSpend) {
        self.spend.add(&self.calendars, at, model, spend);
    }

    /// Notes a settled call's spend (see [`note_spend`](Self::note_spend)):
    /// what it counts for, under the model it named, at the time it was
    /// charged. A reservation that was missing counted when it expired.
    fn note_settled_spend(
        &mut self,
        outcome: &Outcome<'_>,
        settled: &Settled,
        usage: Usage,
        now: Timestamp,
    ) {
        let named = outcome.scoped.and_then(|(model, _)| model);
        let (at, model) = match settled {
            // The name the reservation holds already, when it is the one
            // the settlement names (nearly always): settling allocates none.
            Settled::Reservation(reservation) => (
                reservation.charged_at,
                match (named, &reservation.model) {
                    (Some(name), Some(held)) if **held == *name => Some(held.clone()),
                    (Some(name), _) => Some(Model::from(name)),
                    (None, held) => held.clone(),
                },
            ),
            Settled::Unreserved => (now, named.map(Model::from)),
            Settled::Missing => return,
        };
        let Some(model) = model.filter(|_| usage.usd > 0 || usage.tokens > 0) else {
            return;
        };
        let tokens = outcome.tokens.unwrap_or_default();
        let spend = ModelSpend {
            prompt: tokens.prompt,
            cached: tokens.cached,
            completion: tokens.completion,
            usd: usage.usd,
        };
        self.note_spend(at, &model, spend);
    }

    /// Forgets the spend by model, to note it again from history (see
    /// [`note_spend`](Self::note_spend)).
    pub fn forget_spend(&mut self) {
        self.spend.clear();
    }

    /// Prices budget notifications' suggestions at `prices` from now on,
    /// and names their day in the status.
    pub fn use_prices(&mut self, prices: Arc<PriceTable>) {
        self.prices = prices;
    }

    /// Notes a call of `model`, which the price table does not know and
    /// which was charged at the unpriced rates. The first call of each
    /// model raises its `unpriced_model` notification, whose id every
    /// instance derives alike, so that one restored or raised elsewhere is
    /// not raised twice.
    pub fn note_unpriced(&mut self, model: &Model, now: Timestamp) -> Vec<Change> {
        if self.unpriced_models.len() >= MAX_UNPRICED_MODELS || self.unpriced_models.contains(model)
        {
            return Vec::new();
        }
        self.unpriced_models.push(model.clone());
        let notification = describe_unpriced(&self.config, model, now);
        if self
            .tracker
            .active()
            .iter()
            .any(|active| active.id == notification.id)
        {
            return Vec::new();
        }
        vec![self.tracker.raise(notification)]
    }

    /// Sets the counters to zero and keeps the blocks: the status follows
    /// from what is left.
    pub fn reset_usage(
        &mut self,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Vec<Change> {
        self.clear_usage(now);
        let mut changes = self.forget_thresholds(now);
        changes.extend(self.evaluate(now, settings, fresh_id));
        changes
    }

    /// Lifts the upstream's blocks (billing, rate, rejected key) and keeps
    /// the counters: what an admin does once billing is fixed.
    pub fn lift_blocks(
        &mut self,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Vec<Change> {
        self.clear_blocks();
        self.evaluate(now, settings, fresh_id)
    }

    /// Counters back to zero; requests in flight keep their reservations,
    /// charged nothing from now on.
    fn clear_usage(&mut self, now: Timestamp) {
        self.minute = MinuteWindow::new(SECOND_MS);
        self.calendars = Calendars::new(now, self.config.timezone);
        self.scopes.clear();
        self.scope_charges.clear();
        // The pace before a reset says nothing of the pace after it.
        self.rates.forget();
        self.forecasts = Forecasts::default();
        let charged_here = self
            .reservations
            .values_mut()
            .filter(|reservation| reservation.charged_elsewhere_us.is_none());
        for reservation in charged_here {
            reservation.charged_at = now;
            reservation.estimate = Usage::default();
        }
    }

    fn clear_blocks(&mut self) {
        self.rate_block_until = None;
        self.billing_block = None;
        self.key_rejected = false;
        self.outcomes = OutcomeWindow::new(SECOND_MS);
        self.upstream_error_rate = false;
    }

    /// Applies new settings; the status follows at once.
    pub fn reconfigure(
        &mut self,
        config: WorkspaceConfig,
        now: Timestamp,
        settings: &Settings,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Vec<Change> {
        if config.timezone != self.config.timezone {
            // Today's and this month's counts carry over; only their bounds
            // move.
            self.calendars.move_to(now, config.timezone);
        }
        self.config = config;
        self.scopes.follow(&self.config.scoped_limits);
        self.advance(now);
        self.refresh_forecasts(now);
        let mut changes = self.evaluate(now, settings, fresh_id);
        changes.extend(self.check_thresholds(now));
        changes
    }

    /// The tightest request limit and the tightest token limit (least
    /// remaining), for `x-ratelimit-*` headers, and what is left of each
    /// configured limit, in one pass over the limits: every admission
    /// answers both.
    pub fn room(&self) -> (Headroom, PerLimit<Option<u64>>) {
        let mut remaining = PerLimit::default();
        let mut tightest: [Option<(LimitKind, u64, u64)>; 2] = [None; 2];
        for (kind, max) in self.limits() {
            let left = max.saturating_sub(self.used(kind));
            remaining.set(kind, Some(left));
            let slot = match kind.metric {
                Metric::Requests => &mut tightest[0],
                Metric::Tokens => &mut tightest[1],
                Metric::Usd => continue,
            };
            // The first of equals wins, as `min_by_key` picks it.
            if slot.is_none_or(|(_, _, least)| left < least) {
                *slot = Some((kind, max, left));
            }
        }
        let [requests, tokens] = tightest.map(|found| {
            found.map(|(kind, max, remaining)| LimitHeadroom {
                kind,
                max,
                remaining,
                resets_at: self.resets_at(kind),
            })
        });
        (Headroom { requests, tokens }, remaining)
    }

    /// What the status shows of each scoped limit.
    fn scoped_facts(&self, now: Timestamp) -> Vec<ScopedFacts> {
        let rules = self.config.scoped_limits.rules();
        rules
            .iter()
            .enumerate()
            .map(|(index, rule)| match rule.selector {
                Selector::Listed(_) => {
                    let scope = ScopeRef {
                        rule: index,
                        id: rule.id,
                        key: None,
                    };
                    let view = self.scope_view(&scope, now);
                    ScopedFacts::Listed(
                        self.enforced(&rule.limits)
                            .map(|(kind, max)| (kind, view.limit_facts(kind, max)))
                            .collect(),
                    )
                }
                Selector::Each => ScopedFacts::Each(self.scopes.summary(rule.id)),
            })
            .collect()
    }

    pub fn snapshot(&self, now: Timestamp) -> Snapshot {
        let limits = self
            .limits()
            .map(|(kind, max)| (kind, self.limit_facts_now(kind, max, now)))
            .collect();
        let minimal = Usage::call(0);
        let verdict = self.verdict(minimal, &[], now, false);
        let degraded = self.enforcement != Enforcement::Whole;
        let mut reasons = self
            .tracker
            .causes()
            .reasons(self.billing_block.map(|block| block.code));
        let mut status = self.tracker.status();
        if let Some(shown) = &self.credential_block {
            // The credential's block weighs as the workspace's own would,
            // and is listed once even when both hold.
            let cause = Cause::UpstreamQuotaExhausted;
            let reason = cause.reason(Some(shown.block.code));
            if !reasons.contains(&reason) {
                reasons.push(reason);
            }
            status = status.max(cause.level());
        }
        Snapshot {
            config: self.config.clone(),
            status,
            since: self.tracker.since(),
            reasons,
            degraded,
            blocked: verdict.is_err() || self.credential_block.is_some(),
            retry_at: verdict.err().and_then(|refusal| refusal.retry_at),
            limits,
            usage: RecentUsage {
                last_minute: self.minute.total(),
                calendars: Period::ALL.map(|period| self.calendars.get(period).used_at(now)),
            },
            upstream: self.upstream_view.is_known().then_some(self.upstream_view),
            billing: self.billing_block,
            credential_block: self.credential_block.clone(),
            errors: self.errors.total(),
            last_error: self.last_error.clone(),
            unpriced_models: self.unpriced_models.clone(),
            scoped: self.scoped_facts(now),
            spend: SpendFacts {
                calendars: Period::ALL.map(|period| self.spend.period(&self.calendars, period)),
                prices_taken: self.prices.taken.clone(),
            },
            at: now,
        }
    }
}

/// One limit's room, as `x-ratelimit-*` headers report it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LimitHeadroom {
    pub kind: LimitKind,
    pub max: u64,
    pub remaining: u64,
    pub resets_at: Option<Timestamp>,
}

/// The limits closest to running out, per unit.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Headroom {
    pub requests: Option<LimitHeadroom>,
    pub tokens: Option<LimitHeadroom>,
}

/// The result of [`WorkspaceState::admit`].
#[derive(Debug)]
pub struct Admission {
    pub result: Result<Admitted, Refusal>,
    pub expired: Vec<Expired>,
    pub changes: Vec<Change>,
}
