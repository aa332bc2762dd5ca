//! What a workspace is allowed: its identity, its optional limits (a metric
//! over a window each) and the fraction at which it starts warning.
//! Validation lives here so that every entry point (REST, CLI, TOML) rejects
//! the same things with the same words.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use chrono_tz::Tz;

use super::notification::group_digits;
use super::price::{MAX_USD_LIMIT, dollars, format_dollars, nano_usd};

// A window's calendar period, named here beside the windows it serves.
pub use super::time::Period;

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    Requests,
    Tokens,
    /// Money spent, in whole nano-dollars (`price::NanoUsd`).
    Usd,
}

impl Metric {
    /// Every metric, in the order limits are listed.
    pub const ALL: [Metric; 3] = [Metric::Requests, Metric::Tokens, Metric::Usd];

    pub const fn name(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::Tokens => "tokens",
            Metric::Usd => "usd",
        }
    }

    /// How its counts are written where people read and write them.
    pub const fn unit(self) -> Unit {
        match self {
            Metric::Requests | Metric::Tokens => Unit::Count,
            Metric::Usd => Unit::Dollars,
        }
    }

    /// An amount of this metric as texts write it (see [`Unit::figure`]).
    pub fn figure(self, amount: u64) -> String {
        self.unit().figure(amount)
    }

    /// The least one call costs of this metric: a request is one, and a
    /// call may use no tokens and cost nothing.
    pub const fn least_a_call_costs(self) -> u64 {
        match self {
            Metric::Requests => 1,
            Metric::Tokens | Metric::Usd => 0,
        }
    }

    /// How a text says that all of this metric's limit is used ("the
    /// budget is used up").
    pub const fn all_of_it(self) -> &'static str {
        match self {
            Metric::Requests => "requests are",
            Metric::Tokens => "tokens are",
            Metric::Usd => "budget is",
        }
    }

    /// What follows a figure of this metric in a text (" tokens"); dollars
    /// carry their unit in the figure.
    pub const fn unit_suffix(self) -> &'static str {
        match self {
            Metric::Requests => " requests",
            Metric::Tokens => " tokens",
            Metric::Usd => "",
        }
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// How a metric's counts are written where people read and write them
/// (the API, the CLI, the TOML file, texts). Whatever converts between a
/// limit's counters and its public figures asks the unit, not the metric,
/// so that a new metric of a known unit converts with no code of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Whole things (requests, tokens), written as counted.
    Count,
    /// Money: counted in whole nano-dollars, written in dollars.
    Dollars,
}

impl Unit {
    /// A count from a figure as people write it: a whole number, or an
    /// amount of dollars rounded to the nearest nano-dollar (exact for up
    /// to 9 decimal places). `None` for anything else, negative included.
    pub fn from_figure(self, figure: f64) -> Option<u64> {
        match self {
            Unit::Count => (figure >= 0.0 && figure.fract() == 0.0 && figure < u64::MAX as f64)
                .then_some(figure as u64),
            Unit::Dollars => nano_usd(figure),
        }
    }

    /// A count from text as people write it (see [`Unit::from_figure`]).
    pub fn parse(self, text: &str) -> Option<u64> {
        match self {
            // Whole numbers are read as such, so that none beyond 2^53
            // loses a digit on its way through a float.
            Unit::Count => text.parse().ok(),
            Unit::Dollars => text
                .parse()
                .ok()
                .and_then(|figure| self.from_figure(figure)),
        }
    }

    /// A count as a decimal figure: the count itself, or dollars.
    pub fn decimal(self, count: u64) -> f64 {
        match self {
            Unit::Count => count as f64,
            Unit::Dollars => dollars(count),
        }
    }

    /// A count as texts write it: digits grouped ("1,234"), or dollars
    /// ("$49.98").
    pub fn figure(self, count: u64) -> String {
        match self {
            Unit::Count => group_digits(count),
            Unit::Dollars => format_dollars(count),
        }
    }

    /// What a figure of this unit must be, for error messages.
    pub const fn expected(self) -> &'static str {
        match self {
            Unit::Count => "a whole number",
            Unit::Dollars => "an amount of dollars such as 50 or 12.5",
        }
    }

    /// The highest limit in this unit, where counters kept as doubles
    /// (Redis) bound it: a higher budget would count inexactly.
    pub const fn max_limit(self) -> Option<u64> {
        match self {
            Unit::Count => None,
            Unit::Dollars => Some(MAX_USD_LIMIT),
        }
    }
}

/// The span a limit counts over: the sliding minute, or a calendar period
/// in the workspace's timezone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    Minute,
    Day,
    Month,
}

impl Window {
    /// Every window, shortest first.
    pub const ALL: [Window; 3] = [Window::Minute, Window::Day, Window::Month];

    pub const fn name(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    pub const fn index(self) -> usize {
        self as usize
    }

    /// The calendar period this window counts, or `None` for the sliding
    /// minute. A calendar window ends for everyone at once, so using it up
    /// is a quota no short wait helps; the minute frees a little every second.
    pub const fn period(self) -> Option<Period> {
        match self {
            Window::Minute => None,
            Window::Day => Some(Period::Day),
            Window::Month => Some(Period::Month),
        }
    }

    /// The window that counts `period`. The calendar windows follow the
    /// minute in [`Window::ALL`] in [`Period::ALL`]'s order, which is also
    /// the order the Redis script lays their totals and bounds out in.
    pub const fn counting(period: Period) -> Window {
        Window::ALL[period.index() + 1]
    }
}

/// One limit a workspace can have: a metric over a window, named
/// `"{metric}_per_{window}"` (`tokens_per_month`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LimitKind {
    pub metric: Metric,
    pub window: Window,
}

/// Each limit kind by its name, for code that names one.
pub const REQUESTS_PER_MINUTE: LimitKind = LimitKind::new(Metric::Requests, Window::Minute);
pub const REQUESTS_PER_DAY: LimitKind = LimitKind::new(Metric::Requests, Window::Day);
pub const REQUESTS_PER_MONTH: LimitKind = LimitKind::new(Metric::Requests, Window::Month);
pub const TOKENS_PER_MINUTE: LimitKind = LimitKind::new(Metric::Tokens, Window::Minute);
pub const TOKENS_PER_DAY: LimitKind = LimitKind::new(Metric::Tokens, Window::Day);
pub const TOKENS_PER_MONTH: LimitKind = LimitKind::new(Metric::Tokens, Window::Month);
pub const USD_PER_MINUTE: LimitKind = LimitKind::new(Metric::Usd, Window::Minute);
pub const USD_PER_DAY: LimitKind = LimitKind::new(Metric::Usd, Window::Day);
pub const USD_PER_MONTH: LimitKind = LimitKind::new(Metric::Usd, Window::Month);

impl LimitKind {
    /// How many limits a workspace can have: one per metric and window.
    pub const COUNT: usize = Metric::ALL.len() * Window::ALL.len();

    /// Every limit, metric by metric, shortest window first.
    pub const ALL: [LimitKind; LimitKind::COUNT] = {
        let mut all = [LimitKind::new(Metric::Requests, Window::Minute); LimitKind::COUNT];
        let mut i = 0;
        while i < LimitKind::COUNT {
            let metric = Metric::ALL[i / Window::ALL.len()];
            all[i] = LimitKind::new(metric, Window::ALL[i % Window::ALL.len()]);
            i += 1;
        }
        all
    };

    pub const fn new(metric: Metric, window: Window) -> Self {
        Self { metric, window }
    }

    pub fn name(self) -> &'static str {
        static NAMES: LazyLock<Vec<String>> = LazyLock::new(|| {
            LimitKind::ALL
                .iter()
                .map(|kind| format!("{}_per_{}", kind.metric.name(), kind.window.name()))
                .collect()
        });
        &NAMES[self.index()]
    }

    /// The limit's place in [`LimitKind::ALL`].
    pub const fn index(self) -> usize {
        self.metric.index() * Window::ALL.len() + self.window.index()
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A value per limit kind, indexed by [`LimitKind::index`]. A table rather
/// than a list: it holds at most one value per kind by construction, is
/// `Copy`, and finding a kind's value costs no search on the admission path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerLimit<T>(pub [T; LimitKind::COUNT]);

impl<T: Copy> PerLimit<T> {
    pub fn get(&self, kind: LimitKind) -> T {
        self.0[kind.index()]
    }

    pub fn set(&mut self, kind: LimitKind, value: T) {
        self.0[kind.index()] = value;
    }

    /// Every kind with its value.
    pub fn iter(&self) -> impl Iterator<Item = (LimitKind, T)> + '_ {
        LimitKind::ALL
            .into_iter()
            .map(|kind| (kind, self.get(kind)))
    }
}

/// The configured maximum per limit kind; `None` means unlimited.
pub type Limits = PerLimit<Option<u64>>;

impl Limits {
    /// The limits that are set, with their maximum.
    pub fn configured(&self) -> impl Iterator<Item = (LimitKind, u64)> + '_ {
        self.iter()
            .filter_map(|(kind, max)| max.map(|max| (kind, max)))
    }
}

/// The longest workspace id.
const MAX_ID_LEN: usize = 63;

/// A workspace id: `[a-z0-9][a-z0-9_-]{0,62}`.
///
/// Stored inline rather than on the heap: ids are short by definition, and
/// finding a workspace by id happens on every request, where following a
/// pointer to compare the text would cost a cache miss.
#[derive(Clone, Eq)]
pub struct WorkspaceId {
    len: u8,
    bytes: [u8; MAX_ID_LEN],
}

/// Compares the id's own bytes only: the unused rest of the array is always
/// zero, and a map lookup that read it would touch a second cache line of
/// the stored key for nothing.
impl PartialEq for WorkspaceId {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self.bytes[..usize::from(self.len)] == other.bytes[..usize::from(other.len)]
    }
}

impl WorkspaceId {
    pub fn as_str(&self) -> &str {
        // Only validated ASCII is ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::hash::Hash for WorkspaceId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for WorkspaceId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for WorkspaceId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkspaceId({:?})", self.as_str())
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WorkspaceId {
    type Err = ValidationError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let mut chars = id.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok =
            chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if first_ok && rest_ok && id.len() <= MAX_ID_LEN {
            let mut bytes = [0u8; MAX_ID_LEN];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            Ok(Self {
                len: id.len() as u8,
                bytes,
            })
        } else {
            Err(ValidationError::new(
                "id",
                format!(
                    "workspace id {id:?} is invalid: use 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
                ),
            ))
        }
    }
}

/// A rejected value, naming the field it came from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// The field at fault: a name, or a path into a list
    /// (`scoped_limits[1].models[0]`).
    pub field: std::borrow::Cow<'static, str>,
    pub message: String,
}

impl ValidationError {
    pub fn new(
        field: impl Into<std::borrow::Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub const DEFAULT_WARN_AT: f64 = 0.8;

/// How far utilisation must fall below `warn_at` before a warning clears, so
/// that usage hovering around the threshold does not flap the status.
pub const WARNING_HYSTERESIS: f64 = 0.05;

/// Everything that defines a workspace, as configured by an operator.
///
/// Laid out in declaration order (`repr(C)`), with what every admission
/// reads last, next to the workspace state's own fields that admission
/// reads (see [`WorkspaceState`](super::workspace::WorkspaceState)).
#[derive(Clone, Debug, PartialEq)]
#[repr(C)]
pub struct WorkspaceConfig {
    pub id: WorkspaceId,
    pub name: String,
    /// The environment variable holding this workspace's own upstream key;
    /// `None` for the server's. Only the proxy reads it.
    pub upstream_key_env: Option<String>,
    /// The OpenAI organization and project billed for this workspace's
    /// calls (sent as `OpenAI-Organization` / `OpenAI-Project`); `None`
    /// for the upstream key's default. Clients cannot choose them.
    pub upstream_organization: Option<String>,
    pub upstream_project: Option<String>,
    /// The shares of its day and month limits whose crossing is announced.
    pub alert_thresholds: super::threshold::AlertThresholds,
    /// Limits on part of the workspace's traffic (a model's, each end
    /// user's), on top of its own.
    pub scoped_limits: super::scope::ScopedLimits,
    pub timezone: Tz,
    pub warn_at: f64,
    pub limits: Limits,
}

impl WorkspaceConfig {
    pub fn new(id: WorkspaceId, limits: Limits) -> Self {
        Self {
            name: id.as_str().to_owned(),
            id,
            timezone: Tz::UTC,
            limits,
            warn_at: DEFAULT_WARN_AT,
            upstream_key_env: None,
            upstream_organization: None,
            upstream_project: None,
            scoped_limits: super::scope::ScopedLimits::default(),
            alert_thresholds: super::threshold::AlertThresholds::default(),
        }
    }
}

/// The prefix of the variables a workspace may name for its upstream key.
pub const UPSTREAM_KEY_PREFIX: &str = "QUOTAWATCH_UPSTREAM_KEY_";

/// The variable a workspace names for its upstream key: `OPENAI_API_KEY` or
/// `QUOTAWATCH_UPSTREAM_KEY_<NAME>` (letters, digits and `_`). Whoever edits
/// a workspace must not be able to send any other variable of the process
/// (the admin key, a database password) upstream as a bearer token.
pub fn validate_env_name(name: &str) -> Result<String, ValidationError> {
    let suffix = name.strip_prefix(UPSTREAM_KEY_PREFIX);
    let valid = name == "OPENAI_API_KEY"
        || suffix.is_some_and(|suffix| {
            !suffix.is_empty()
                && suffix.len() <= 100
                && suffix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if valid {
        Ok(name.to_owned())
    } else {
        Err(ValidationError::new(
            "upstream_key_env",
            format!(
                "{name:?} cannot hold an upstream key: name OPENAI_API_KEY or a variable {UPSTREAM_KEY_PREFIX}<NAME> (letters, digits and _)"
            ),
        ))
    }
}

/// An OpenAI organization or project id (`org-…`, `proj_…`): letters,
/// digits, `-` and `_`, at most 64, so that it is safe in a header.
pub fn validate_upstream_id(field: &'static str, id: &str) -> Result<String, ValidationError> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(id.to_owned())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "{id:?} is not an OpenAI id such as \"org-abc123\" or \"proj_abc123\" (letters, digits, - and _, at most 64)"
            ),
        ))
    }
}

pub fn parse_timezone(name: &str) -> Result<Tz, ValidationError> {
    name.parse::<Tz>().map_err(|_| {
        ValidationError::new(
            "timezone",
            format!("timezone {name:?} is not an IANA timezone name such as \"UTC\" or \"Europe/Berlin\""),
        )
    })
}

pub fn validate_warn_at(warn_at: f64) -> Result<f64, ValidationError> {
    if warn_at > WARNING_HYSTERESIS && warn_at <= 1.0 {
        Ok(warn_at)
    } else {
        Err(ValidationError::new(
            "warn_at",
            format!(
                "warn_at must be a fraction above {WARNING_HYSTERESIS} and at most 1.0, got {warn_at}"
            ),
        ))
    }
}

pub fn validate_name(name: &str) -> Result<String, ValidationError> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.chars().count() > 200 {
        Err(ValidationError::new(
            "name",
            "name must be 1-200 characters and not only spaces",
        ))
    } else {
        Ok(trimmed.to_owned())
    }
}

/// A limit of zero would refuse everything forever; an operator who wants
/// that deletes the workspace or revokes its keys instead. A limit is at
/// most its unit's [`Unit::max_limit`] (a budget at most
/// [`MAX_USD_LIMIT`]), so that what it counts stays exact where counters
/// are doubles (Redis).
pub fn validate_limit(kind: LimitKind, max: Option<u64>) -> Result<Option<u64>, ValidationError> {
    let unit = kind.metric.unit();
    match (max, unit.max_limit()) {
        (Some(0), _) => Err(ValidationError::new(
            kind.name(),
            format!("{kind} must be a positive number, or null for unlimited"),
        )),
        (Some(max), Some(highest)) if max > highest => Err(ValidationError::new(
            kind.name(),
            format!(
                "{kind} must be at most {} (a higher limit is no limit), or null for unlimited",
                unit.figure(highest)
            ),
        )),
        (other, _) => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_reads_and_writes_figures_as_people_do() {
        assert_eq!(Unit::Count.parse("1200"), Some(1200));
        assert_eq!(Unit::Count.parse("12.5"), None, "counts are whole");
        assert_eq!(Unit::Count.from_figure(-1.0), None);
        assert_eq!(Unit::Dollars.parse("12.5"), Some(12_500_000_000));
        assert_eq!(
            Unit::Dollars.from_figure(0.000000001),
            Some(1),
            "one nano-dollar"
        );
        assert_eq!(Unit::Dollars.parse("-3"), None);
        assert_eq!(Unit::Dollars.decimal(49_980_000_000), 49.98);
        assert_eq!(Unit::Count.figure(1234), "1,234");
        assert!(Unit::Dollars.figure(49_980_000_000).starts_with("$49.98"));
        assert_eq!(Unit::Count.max_limit(), None);
        assert_eq!(Unit::Dollars.max_limit(), Some(MAX_USD_LIMIT));
        let too_much = validate_limit(USD_PER_DAY, Some(MAX_USD_LIMIT + 1)).expect_err("capped");
        assert!(
            too_much.message.contains("at most $1"),
            "{}",
            too_much.message
        );
        assert_eq!(
            validate_limit(TOKENS_PER_DAY, Some(u64::MAX >> 1)),
            Ok(Some(u64::MAX >> 1))
        );
    }

    #[test]
    fn workspace_ids_follow_the_documented_pattern() {
        for good in ["a", "0", "acme", "acme-prod_2", &"a".repeat(63)] {
            let id = good
                .parse::<WorkspaceId>()
                .unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(id.as_str(), good);
        }
        let (a, b): (WorkspaceId, WorkspaceId) =
            ("ab".parse().expect("id"), "b".parse().expect("id"));
        assert!(a < b, "ordered as text");
        for bad in ["", "-a", "_a", "Acme", "a b", "a/b", "ä", &"a".repeat(64)] {
            let err = bad.parse::<WorkspaceId>().expect_err(bad);
            assert_eq!(err.field, "id");
        }
    }

    #[test]
    fn limit_names_round_trip() {
        for kind in LimitKind::ALL {
            assert_eq!(LimitKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(LimitKind::from_name("requests_per_hour"), None);
        let month = LimitKind::new(Metric::Tokens, Window::Month);
        assert_eq!(month.name(), "tokens_per_month");
        assert_eq!(LimitKind::ALL[month.index()], month);
    }

    #[test]
    fn each_period_has_the_window_that_counts_it() {
        for period in Period::ALL {
            assert_eq!(Window::counting(period).period(), Some(period));
        }
        let calendar_windows = Window::ALL
            .into_iter()
            .filter(|window| window.period().is_some())
            .count();
        assert_eq!(calendar_windows, Period::ALL.len());
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(
            validate_warn_at(1.5).expect_err("too high").field,
            "warn_at"
        );
        assert_eq!(validate_warn_at(0.0).expect_err("too low").field, "warn_at");
        assert_eq!(validate_warn_at(0.9), Ok(0.9));
        assert_eq!(
            parse_timezone("Mars/Olympus").expect_err("bad").field,
            "timezone"
        );
        assert_eq!(
            validate_limit(LimitKind::new(Metric::Tokens, Window::Day), Some(0))
                .expect_err("zero")
                .field,
            "tokens_per_day"
        );
        assert_eq!(validate_name("  ").expect_err("blank").field, "name");
    }

    #[test]
    fn a_budget_is_bounded_and_written_in_dollars() {
        let max = crate::domain::price::MAX_USD_LIMIT;
        assert_eq!(validate_limit(USD_PER_DAY, Some(max)), Ok(Some(max)));
        let refused = validate_limit(USD_PER_DAY, Some(max + 1)).expect_err("too large");
        assert_eq!(refused.field, "usd_per_day");
        assert!(refused.message.contains("$1,000,000.00"), "{refused}");
        assert_eq!(
            validate_limit(TOKENS_PER_DAY, Some(max + 1)),
            Ok(Some(max + 1)),
            "only money is bounded so"
        );
        assert_eq!(
            Metric::Usd.figure(49_980_000_000) + Metric::Usd.unit_suffix(),
            "$49.98"
        );
        assert_eq!(
            Metric::Tokens.figure(12_345) + Metric::Tokens.unit_suffix(),
            "12,345 tokens"
        );
        assert_eq!(USD_PER_MONTH.name(), "usd_per_month");
        assert_eq!(USD_PER_MINUTE.name(), "usd_per_minute");
    }
}
