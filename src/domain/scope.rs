//! Scoped limits: limits a workspace sets on part of its traffic, on top of
//! its own. A rule of a [`ScopeKind`] selects requests by a value each
//! request carries (its model, its end user) and holds the same [`Limits`]
//! a workspace has, so every metric and window applies to it. A listed
//! rule (`"models": ["gpt-4o", "o3*"]`) counts every request it matches in
//! one counter; an each-rule (`"users": "each"`) counts every value apart.
//!
//! Everything that handles kinds goes over [`ScopeKind::ALL`] and its
//! words, so that a further kind is a variant here and nothing else in
//! the rules.

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};

use super::limits::{Limits, ValidationError, validate_limit};
use super::time::{Period, Timestamp};
use super::window::{Calendars, Tally, Usage};
use super::workspace::{MINUTE_MS, SECOND_MS};

/// What a scoped limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    /// The request's model, by name or prefix pattern.
    Model,
    /// The end user the tenant names for the request.
    User,
}

/// Where a request's value for a kind comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The model the request names.
    Model,
    /// A header the tenant's backend sets, else the first of some body
    /// fields; `param` names it in errors, whose code is `code`.
    Named {
        header: &'static str,
        body: &'static [&'static str],
        param: &'static str,
        code: &'static str,
    },
}

impl ScopeKind {
    pub const COUNT: usize = 2;
    pub const ALL: [ScopeKind; ScopeKind::COUNT] = [ScopeKind::Model, ScopeKind::User];

    /// The kind's name in texts, error codes and labels.
    pub const fn name(self) -> &'static str {
        match self {
            ScopeKind::Model => "model",
            ScopeKind::User => "user",
        }
    }

    /// How texts name a value of this kind.
    pub const fn title(self) -> &'static str {
        match self {
            ScopeKind::Model => "model",
            ScopeKind::User => "end user",
        }
    }

    /// The JSON field of a rule that selects by this kind.
    pub const fn field(self) -> &'static str {
        match self {
            ScopeKind::Model => "models",
            ScopeKind::User => "users",
        }
    }

    pub const fn source(self) -> Source {
        match self {
            ScopeKind::Model => Source::Model,
            ScopeKind::User => Source::Named {
                header: "x-quotawatch-user",
                body: &["safety_identifier", "user"],
                param: "user",
                code: "invalid_user",
            },
        }
    }

    /// Whether rules of this kind may list values. A listed value is
    /// matched against the request's value in clear, which only a model
    /// has: end-user ids are hashed before they reach the engine.
    pub const fn listable(self) -> bool {
        matches!(self.source(), Source::Model)
    }

    /// The error code of a refusal by a rule of this kind.
    pub fn code(self) -> String {
        format!("{}_limit_exceeded", self.name())
    }

    /// The error code of a refusal by a used-up calendar limit in dollars
    /// (a budget) of a rule of this kind, as a workspace's is
    /// `workspace_budget_exceeded`.
    pub fn budget_code(self) -> String {
        format!("{}_budget_exceeded", self.name())
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// A value of each kind, by [`ScopeKind::index`].
pub type PerScope<T> = [T; ScopeKind::COUNT];

/// The most rules a workspace may have, and patterns in one rule and in
/// all: admission compares a request with each of them.
pub const MAX_RULES: usize = 16;
pub const MAX_PATTERNS_PER_RULE: usize = 32;
pub const MAX_PATTERNS: usize = 64;

/// The longest end-user id accepted, in bytes: longer ids are hashes or
/// emails, which fit.
pub const MAX_VALUE_BYTES: usize = 256;

/// How much of a value a refusal's message quotes back to the caller.
const SHOWN_CHARS: usize = 64;

/// The most values an each-rule tracks apart in one workspace; values
/// beyond it share one counter, which is stricter, never looser.
pub const MAX_TRACKED_PER_RULE: usize = 1_000_000;

/// A model pattern: a name, or a prefix followed by `*`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelPattern {
    text: Box<str>,
    prefix: bool,
}

impl ModelPattern {
    /// Reads a pattern: model-name characters (as `parse_model` accepts)
    /// with at most one `*`, at the end. A lone `*` matches every model.
    pub fn parse(field: String, text: &str) -> Result<Self, ValidationError> {
        let (stem, prefix) = match text.strip_suffix('*') {
            Some(stem) => (stem, true),
            None => (text, false),
        };
        let well_formed = (prefix || !stem.is_empty()) && super::model::parse_model(stem).is_ok()
            || (prefix && stem.is_empty());
        if !well_formed {
            return Err(ValidationError::new(
                field,
                format!(
                    "{text:?} is not a model pattern: a model name (ASCII letters, digits and . _ - : / @, at most {} characters), optionally ending in one * to match every name it starts",
                    super::model::MAX_MODEL_NAME
                ),
            ));
        }
        Ok(Self {
            text: stem.into(),
            prefix,
        })
    }

    pub fn matches(&self, model: &str) -> bool {
        if self.prefix {
            model.starts_with(&*self.text)
        } else {
            model == &*self.text
        }
    }
}

impl std::fmt::Display for ModelPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.text, if self.prefix { "*" } else { "" })
    }
}

/// Which requests a rule counts, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// Those matching any pattern, in one counter.
    Listed(Vec<ModelPattern>),
    /// Every request, in a counter per value.
    Each,
}

/// A rule's identity across reconfigurations: a fingerprint of its kind
/// and selector (patterns sorted), so that changing its limits keeps what
/// it counted, and changing what it selects starts afresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

impl RuleId {
    /// The id as a number, for counters kept elsewhere and saved states
    /// to name the rule by.
    pub fn to_bits(self) -> u64 {
        self.0
    }

    pub fn from_bits(bits: u64) -> Self {
        Self(bits)
    }
}

/// A value's fingerprint as text (32 hex digits), for the names of
/// counters kept or saved elsewhere.
pub fn fingerprint_text(fingerprint: &[u8; 16]) -> String {
    fingerprint
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Reads a fingerprint written by [`fingerprint_text`].
pub fn parse_fingerprint(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 {
        return None;
    }
    let mut fingerprint = [0u8; 16];
    for (at, byte) in fingerprint.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * at..2 * at + 2)?, 16).ok()?;
    }
    Some(fingerprint)
}

/// Which counter of a rule: a listed rule's one, a value's own, or the
/// one values beyond the cap share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScopeTarget {
    Listed,
    Own([u8; 16]),
    Overflow,
}

/// One scope counter as counted elsewhere (by counters shared between
/// instances) or saved: which it is, and its counts.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedScope {
    pub rule: RuleId,
    pub target: ScopeTarget,
    pub counts: ScopeCounts,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScopeRule {
    pub kind: ScopeKind,
    pub selector: Selector,
    pub limits: Limits,
    pub id: RuleId,
}

impl ScopeRule {
    fn new(kind: ScopeKind, selector: Selector, limits: Limits) -> Self {
        let canonical = match &selector {
            Selector::Each => format!("{}=each", kind.name()),
            Selector::Listed(patterns) => {
                let mut sorted: Vec<String> = patterns.iter().map(ToString::to_string).collect();
                sorted.sort();
                format!("{}={}", kind.name(), sorted.join(","))
            }
        };
        let digest = Sha256::digest(canonical.as_bytes());
        let id = RuleId(u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")));
        Self {
            kind,
            selector,
            limits,
            id,
        }
    }

    /// How the rule names what it selects in texts: `models gpt-4o, o3*`
    /// or `each user`.
    pub fn describe(&self) -> String {
        match &self.selector {
            Selector::Each => format!("each {}", self.kind.name()),
            Selector::Listed(patterns) => {
                let listed: Vec<String> = patterns.iter().map(ToString::to_string).collect();
                format!("{} {}", self.kind.field(), listed.join(", "))
            }
        }
    }
}

/// A rule as written, before validation: its kind, the patterns it lists
/// (`None` for `each`) and its limits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuleInput {
    pub kind: Option<ScopeKind>,
    pub listed: Option<Vec<String>>,
    pub limits: Limits,
}

/// A workspace's validated rules, cheap to clone with its configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScopedLimits(Arc<[ScopeRule]>);

impl ScopedLimits {
    pub fn rules(&self) -> &[ScopeRule] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Validates rules as written. Errors name the field at fault, as
    /// `scoped_limits[2].models[0]`.
    pub fn validate(inputs: &[RuleInput]) -> Result<Self, ValidationError> {
        if inputs.len() > MAX_RULES {
            return Err(ValidationError::new(
                "scoped_limits",
                format!("at most {MAX_RULES} scoped limits are accepted"),
            ));
        }
        let mut rules: Vec<ScopeRule> = Vec::with_capacity(inputs.len());
        let mut patterns_in_all = 0;
        for (index, input) in inputs.iter().enumerate() {
            let at = format!("scoped_limits[{index}]");
            let rule = validate_rule(&at, input)?;
            if let Selector::Listed(patterns) = &rule.selector {
                patterns_in_all += patterns.len();
                if patterns_in_all > MAX_PATTERNS {
                    return Err(ValidationError::new(
                        at,
                        format!(
                            "at most {MAX_PATTERNS} patterns are accepted in all scoped limits together"
                        ),
                    ));
                }
            }
            let each_twice = rule.selector == Selector::Each
                && rules
                    .iter()
                    .any(|other| other.kind == rule.kind && other.selector == Selector::Each);
            if each_twice || rules.iter().any(|other| other.id == rule.id) {
                return Err(ValidationError::new(
                    at,
                    format!(
                        "another scoped limit selects the same {}: put their limits in one",
                        rule.kind.field()
                    ),
                ));
            }
            rules.push(rule);
        }
        Ok(Self(rules.into()))
    }

    /// How a refusal names the counter that refused: the patterns of a
    /// listed rule (`models gpt-4o, o3*`), or the value of an each-rule as
    /// its caller sent it (`end user "alice"`).
    pub fn describe(
        &self,
        refused: RefusedScope,
        model: Option<&str>,
        values: &ScopeValues,
    ) -> String {
        let Some(rule) = self.0.get(refused.rule) else {
            return refused.kind.title().to_owned();
        };
        match rule.selector {
            Selector::Listed(_) => rule.describe(),
            Selector::Each => format!("{} {:?}", rule.kind.title(), values.shown(rule.kind, model)),
        }
    }

    /// The rules `values` fall under, with the counter each charges, in
    /// rule order.
    pub fn matching(&self, model: Option<&str>, values: &ScopeValues) -> Vec<ScopeRef> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(index, rule)| {
                let key = match &rule.selector {
                    Selector::Listed(patterns) => {
                        let model = model?;
                        patterns.iter().any(|p| p.matches(model)).then_some(None)?
                    }
                    Selector::Each => Some(values.key(rule.kind, model)),
                };
                Some(ScopeRef {
                    rule: index,
                    id: rule.id,
                    key,
                })
            })
            .collect()
    }
}

fn validate_rule(at: &str, input: &RuleInput) -> Result<ScopeRule, ValidationError> {
    let Some(kind) = input.kind else {
        let fields: Vec<&str> = ScopeKind::ALL.iter().map(|kind| kind.field()).collect();
        return Err(ValidationError::new(
            at.to_owned(),
            format!(
                "a scoped limit names exactly one of {} and its limits",
                fields.join(", ")
            ),
        ));
    };
    let field = format!("{at}.{}", kind.field());
    let selector = match &input.listed {
        None => Selector::Each,
        Some(_) if !kind.listable() => {
            return Err(ValidationError::new(
                field,
                format!(
                    "{} takes only \"each\": a limit applies to each {} separately",
                    kind.field(),
                    kind.name()
                ),
            ));
        }
        Some(listed) => {
            if listed.is_empty() || listed.len() > MAX_PATTERNS_PER_RULE {
                return Err(ValidationError::new(
                    field,
                    format!("list 1 to {MAX_PATTERNS_PER_RULE} patterns, or \"each\""),
                ));
            }
            let mut patterns: Vec<ModelPattern> = Vec::with_capacity(listed.len());
            for (index, text) in listed.iter().enumerate() {
                let pattern = ModelPattern::parse(format!("{field}[{index}]"), text)?;
                if patterns.contains(&pattern) {
                    return Err(ValidationError::new(
                        format!("{field}[{index}]"),
                        format!("{text:?} is listed twice"),
                    ));
                }
                patterns.push(pattern);
            }
            Selector::Listed(patterns)
        }
    };
    let mut limits = Limits::default();
    for (kind, max) in input.limits.iter() {
        let max = validate_limit(kind, max)
            .map_err(|error| ValidationError::new(format!("{at}.limits.{kind}"), error.message))?;
        limits.set(kind, max);
    }
    if limits.configured().next().is_none() {
        return Err(ValidationError::new(
            format!("{at}.limits"),
            "a scoped limit sets at least one limit",
        ));
    }
    Ok(ScopeRule::new(kind, selector, limits))
}

/// A request's value of one kind: a fingerprint to count it by, and a
/// short form to name it in the refusal its caller reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeValue {
    key: [u8; 16],
    shown: Arc<str>,
}

impl ScopeValue {
    /// Reads an end-user id as sent: 1 to [`MAX_VALUE_BYTES`] bytes of
    /// UTF-8 without control characters, taken as it is (no trimming or
    /// case folding: different bytes are different users). Only its
    /// SHA-256 fingerprint is counted by.
    pub fn parse(kind: ScopeKind, text: &str) -> Result<Self, String> {
        if text.is_empty() || text.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "the {} id must be 1 to {MAX_VALUE_BYTES} bytes long",
                kind.name()
            ));
        }
        if text.chars().any(char::is_control) {
            return Err(format!(
                "the {} id must not contain control characters",
                kind.name()
            ));
        }
        Ok(Self::of(text))
    }

    /// The value of a model name, valid already (`parse_model`).
    pub fn model(name: &str) -> Self {
        Self::of(name)
    }

    fn of(text: &str) -> Self {
        let digest = Sha256::digest(text.as_bytes());
        Self {
            key: digest[..16].try_into().expect("16 bytes"),
            shown: text.chars().take(SHOWN_CHARS).collect::<String>().into(),
        }
    }

    /// The value of requests that name none: they share one counter, so
    /// that leaving the value out does not escape the rule. Its text has a
    /// control character, which no value sent may have.
    fn unnamed() -> Self {
        Self {
            shown: "(unnamed)".into(),
            ..Self::of("\0unnamed")
        }
    }

    pub fn key(&self) -> [u8; 16] {
        self.key
    }

    /// The value as its caller sent it, cut to 64 characters: for the
    /// caller's own refusal, never for logs.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// A request's value of each kind that has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeValues(PerScope<Option<ScopeValue>>);

impl ScopeValues {
    pub fn get(&self, kind: ScopeKind) -> Option<&ScopeValue> {
        self.0[kind.index()].as_ref()
    }

    pub fn set(&mut self, kind: ScopeKind, value: Option<ScopeValue>) {
        self.0[kind.index()] = value;
    }

    /// The key `kind`'s value is counted under; the shared unnamed one
    /// when the request has none. A model's comes from the request's
    /// `model`, fingerprinted here, only for the rules that count each model
    /// apart: a request to a workspace without such a rule pays nothing for
    /// it.
    fn key(&self, kind: ScopeKind, model: Option<&str>) -> [u8; 16] {
        let value = match kind.source() {
            Source::Model => model.map(ScopeValue::model),
            Source::Named { .. } => self.get(kind).cloned(),
        };
        value.map_or_else(|| ScopeValue::unnamed().key, |value| value.key)
    }

    /// How a refusal names the value of `kind` (a model's from the
    /// request's `model`).
    pub fn shown(&self, kind: ScopeKind, model: Option<&str>) -> String {
        let shown = match kind.source() {
            Source::Model => model.map(|name| name.chars().take(SHOWN_CHARS).collect()),
            Source::Named { .. } => self.get(kind).map(|value| value.shown.to_string()),
        };
        shown.unwrap_or_else(|| ScopeValue::unnamed().shown.to_string())
    }

    /// The values of a request naming `user`. A model's value is read from
    /// the request's `model` where a rule needs it (see
    /// [`key`](Self::key)).
    pub fn of(user: Option<ScopeValue>) -> Self {
        let mut values = Self::default();
        values.set(ScopeKind::User, user);
        values
    }
}

/// One counter a request charges: the rule's, or (for an each-rule) its
/// value's. `rule` is the rule's place in the configuration when matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopeRef {
    pub rule: usize,
    pub id: RuleId,
    pub key: Option<[u8; 16]>,
}

/// What one scope counter counted: the seconds of the last minute that
/// had usage, and each calendar period's count with the period's start.
/// The periods' bounds are the workspace's (same timezone), so a counter
/// keeps only starts: a start other than the current one counts nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScopeCounts {
    /// Absent while nothing was counted in the last minute, or the rule
    /// has no minute limit.
    /// Boxed so that a counter without one costs a pointer, not a
    /// queue's 32 bytes: there may be a million counters.
    #[allow(clippy::box_collection)]
    minute: Option<Box<VecDeque<(i64, Usage)>>>,
    calendars: [(Timestamp, Usage); Period::ALL.len()],
    /// When everything this counter limits is back to zero.
    keep_until: Timestamp,
}

fn second_of(at: Timestamp) -> i64 {
    at.millis().div_euclid(SECOND_MS)
}

/// The seconds inside the minute ending at `now`, as `SlidingWindow` keeps
/// them: the current second and the 59 before it.
fn in_minute(second: i64, now: Timestamp) -> bool {
    second > second_of(now) - MINUTE_MS / SECOND_MS && second <= second_of(now)
}

impl ScopeCounts {
    /// Counts from their parts: each calendar period's start and count
    /// (by [`Period::index`]) and the seconds of the minute with usage,
    /// oldest first. When the counter may go is worked out when it is
    /// loaded, from its rule's limits.
    pub fn from_parts(
        calendars: [(Timestamp, Usage); Period::ALL.len()],
        minute: Vec<(i64, Usage)>,
    ) -> Self {
        Self {
            minute: (!minute.is_empty()).then(|| Box::new(minute.into())),
            calendars,
            keep_until: Timestamp::from_millis(0),
        }
    }

    /// Each calendar period's start and count, by [`Period::index`].
    pub fn calendar_parts(&self) -> &[(Timestamp, Usage); Period::ALL.len()] {
        &self.calendars
    }

    /// The seconds of the minute with usage, oldest first.
    pub fn minute_parts(&self) -> impl Iterator<Item = (i64, Usage)> + '_ {
        self.minute
            .iter()
            .flat_map(|seconds| seconds.iter().copied())
    }

    /// Whether the counts are clear at `now` for `limits`.
    fn clear(&self, limits: &Limits, calendars: &Calendars, now: Timestamp) -> bool {
        self.clear_at(limits, calendars) <= now
    }

    /// What the minute ending at `now` counted.
    pub fn minute_total(&self, now: Timestamp) -> Usage {
        self.minute
            .iter()
            .flat_map(|seconds| seconds.iter())
            .filter(|(s, _)| in_minute(*s, now))
            .fold(Usage::default(), |total, (_, usage)| total + *usage)
    }

    /// What the current `period` counted.
    pub fn calendar(&self, period: Period, calendars: &Calendars) -> Usage {
        let (start, used) = self.calendars[period.index()];
        if start == calendars.get(period).start {
            used
        } else {
            Usage::default()
        }
    }

    /// Seconds of the minute ending at `now` with usage, oldest first, with
    /// the instant each leaves it.
    pub fn expiring(&self, now: Timestamp) -> impl Iterator<Item = (Timestamp, Usage)> + '_ {
        self.minute
            .iter()
            .flat_map(|seconds| seconds.iter())
            .filter(move |(s, _)| in_minute(*s, now))
            .map(|&(second, usage)| {
                (
                    Timestamp::from_millis(second * SECOND_MS + MINUTE_MS),
                    usage,
                )
            })
    }

    /// Adds `usage` at `now`.
    fn add(&mut self, usage: Usage, now: Timestamp, limits: &Limits, calendars: &Calendars) {
        self.roll(calendars);
        for (_, used) in &mut self.calendars {
            *used += usage;
        }
        self.add_minute(usage, now, limits);
        self.keep_until = self.keep_until.max(self.clear_at(limits, calendars));
    }

    /// Replaces an estimate charged at `charged_at` by what was used: the
    /// correction lands in the second charged while it is in the minute
    /// (else extra usage is charged now), each current period gains the
    /// extra usage and loses the unused part if it was charged in it.
    fn correct(
        &mut self,
        charged_at: Timestamp,
        extra: Usage,
        unused: Usage,
        now: Timestamp,
        limits: &Limits,
        calendars: &Calendars,
    ) {
        self.roll(calendars);
        for (period, (_, used)) in Period::ALL.iter().zip(&mut self.calendars) {
            *used += extra;
            if calendars.get(*period).contains(charged_at) {
                *used = used.saturating_sub(unused);
            }
        }
        let charged = second_of(charged_at);
        let bucket = self.minute.as_mut().and_then(|seconds| {
            seconds
                .iter_mut()
                .find(|(s, _)| *s == charged && in_minute(*s, now))
        });
        match bucket {
            Some((_, counted)) => *counted = counted.saturating_sub(unused) + extra,
            None if extra.any() => self.add_minute(extra, now, limits),
            None => {}
        }
        self.keep_until = self.keep_until.max(self.clear_at(limits, calendars));
    }

    /// Adds `usage` to the second holding `now`, dropping seconds that
    /// left the minute. The minute is kept only if `limits` has a minute
    /// limit, as nothing else reads it.
    fn add_minute(&mut self, usage: Usage, now: Timestamp, limits: &Limits) {
        if limits
            .configured()
            .any(|(kind, _)| kind.window.period().is_none())
        {
            // Room for one second at first: most users call less than once
            // a second, and a queue grows by four at its first push.
            let seconds = self
                .minute
                .get_or_insert_with(|| Box::new(VecDeque::with_capacity(1)));
            seconds.retain(|(s, _)| in_minute(*s, now));
            match seconds.back_mut() {
                Some((second, counted)) if *second == second_of(now) => *counted += usage,
                _ => seconds.push_back((second_of(now), usage)),
            }
        }
    }

    /// Moves each period's count to the current period, dropping what a
    /// past one counted.
    fn roll(&mut self, calendars: &Calendars) {
        for (period, (start, used)) in Period::ALL.iter().zip(&mut self.calendars) {
            let current = calendars.get(*period).start;
            if *start != current {
                *start = current;
                *used = Usage::default();
            }
        }
    }

    /// When every count `limits` reads is back to zero: the end of the
    /// longest period limited with a count, or when the newest counted
    /// second leaves the minute.
    fn clear_at(&self, limits: &Limits, calendars: &Calendars) -> Timestamp {
        let newest_second = self
            .minute
            .as_ref()
            .and_then(|seconds| seconds.back())
            .map_or(Timestamp::from_millis(0), |(second, _)| {
                Timestamp::from_millis(second * SECOND_MS + MINUTE_MS)
            });
        limits
            .configured()
            .filter_map(|(kind, _)| kind.window.period())
            .filter(|period| self.calendars[period.index()].1.any())
            .map(|period| calendars.get(period).end)
            .fold(newest_second, Timestamp::max)
    }
}

/// The counters of an each-rule: one per value, evicted once their
/// windows are clear, and one shared by values beyond the cap.
#[derive(Debug, Default)]
struct EachCounters {
    /// Keys are SHA-256 output, so the fast hasher is safe.
    map: FxHashMap<[u8; 16], ScopeCounts>,
    /// Keys by the instant their counter may go, pushed again when it
    /// grows; roughly in order, as every value of a rule has the same
    /// limits, and an entry out of order only waits longer.
    expiry: VecDeque<(Timestamp, [u8; 16])>,
    overflow: ScopeCounts,
    /// Requests this rule refused, for the status.
    refused: u64,
}

/// Where a rule's counters live.
#[derive(Debug)]
enum RuleCounters {
    Listed(ScopeCounts),
    Each(Box<EachCounters>),
}

/// The counters of a workspace's scoped limits, kept with its state and
/// under its lock, so that an admission charges them with the workspace's
/// limits, all or nothing, without a second lock.
#[derive(Debug)]
pub struct ScopeBook {
    rules: Vec<(RuleId, RuleCounters)>,
    cap: usize,
}

impl Default for ScopeBook {
    fn default() -> Self {
        Self::with_cap(MAX_TRACKED_PER_RULE)
    }
}

/// The most counters one tick evicts per workspace, so that a tick stays
/// short when many users' days end at once; the rest go at the next.
const EVICTIONS_PER_TICK: usize = 10_000;

/// What an each-rule tracks, for the status: never which values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EachSummary {
    pub tracked: usize,
    /// Whether values beyond the cap share a counter.
    pub overflow: bool,
    pub refused: u64,
}

impl ScopeBook {
    pub fn with_cap(cap: usize) -> Self {
        Self {
            rules: Vec::new(),
            cap,
        }
    }

    /// Keeps the counters of rules that `scoped` still has (by
    /// [`RuleId`]), drops the others, and adds fresh ones for new rules.
    pub fn follow(&mut self, scoped: &ScopedLimits) {
        let mut old = std::mem::take(&mut self.rules);
        self.rules = scoped
            .rules()
            .iter()
            .map(|rule| {
                let kept = old
                    .iter()
                    .position(|(id, _)| *id == rule.id)
                    .map(|at| old.swap_remove(at).1);
                let counters = kept.unwrap_or_else(|| match rule.selector {
                    Selector::Listed(_) => RuleCounters::Listed(ScopeCounts::default()),
                    Selector::Each => RuleCounters::Each(Box::default()),
                });
                (rule.id, counters)
            })
            .collect();
    }

    /// Sets every counter back to zero.
    pub fn clear(&mut self) {
        for (_, counters) in &mut self.rules {
            *counters = match counters {
                RuleCounters::Listed(_) => RuleCounters::Listed(ScopeCounts::default()),
                RuleCounters::Each(_) => RuleCounters::Each(Box::default()),
            };
        }
    }

    fn counters(&self, scope: &ScopeRef) -> Option<&RuleCounters> {
        self.rules
            .iter()
            .find(|(id, _)| *id == scope.id)
            .map(|(_, counters)| counters)
    }

    /// The counter `scope` reads: its own, the overflow one past the cap,
    /// or none yet (which counts nothing).
    pub fn get(&self, scope: &ScopeRef) -> Option<&ScopeCounts> {
        match (self.counters(scope)?, scope.key) {
            (RuleCounters::Listed(counts), _) => Some(counts),
            (RuleCounters::Each(each), Some(key)) => each
                .map
                .get(&key)
                .or_else(|| (each.map.len() >= self.cap).then_some(&each.overflow)),
            (RuleCounters::Each(_), None) => None,
        }
    }

    /// Charges `usage` at `now` to the counter of `scope`, limited by
    /// `limits`, creating it if needed.
    pub fn charge(
        &mut self,
        scope: &ScopeRef,
        usage: Usage,
        now: Timestamp,
        limits: &Limits,
        calendars: &Calendars,
    ) {
        self.update(scope, |counts| counts.add(usage, now, limits, calendars));
    }

    /// Settles what was charged to `scope` at `charged_at` (see
    /// [`ScopeCounts::correct`]). A counter evicted meanwhile is made
    /// anew and gets only the extra usage.
    #[allow(clippy::too_many_arguments)]
    pub fn correct(
        &mut self,
        scope: &ScopeRef,
        charged_at: Timestamp,
        extra: Usage,
        unused: Usage,
        now: Timestamp,
        limits: &Limits,
        calendars: &Calendars,
    ) {
        self.update(scope, |counts| {
            counts.correct(charged_at, extra, unused, now, limits, calendars);
        });
    }

    /// Applies `change` to the counter of `scope` (creating it, or the
    /// overflow one past the cap), and queues the counter's eviction when
    /// its life grows.
    fn update(&mut self, scope: &ScopeRef, change: impl FnOnce(&mut ScopeCounts)) {
        let cap = self.cap;
        let Some((_, counters)) = self.rules.iter_mut().find(|(id, _)| *id == scope.id) else {
            return;
        };
        match (counters, scope.key) {
            (RuleCounters::Listed(counts), _) => change(counts),
            (RuleCounters::Each(each), Some(key)) => {
                if each.map.len() >= cap && !each.map.contains_key(&key) {
                    change(&mut each.overflow);
                    return;
                }
                let counts = each.map.entry(key).or_default();
                let before = counts.keep_until;
                change(counts);
                let after = counts.keep_until;
                if after > before {
                    each.expiry.push_back((after, key));
                }
            }
            (RuleCounters::Each(_), None) => {}
        }
    }

    /// Replaces the counter `target` of rule `rule` by `counts`, counted
    /// elsewhere or saved, with `limits` (the rule's) deciding how long it
    /// is kept. A value's counter that is clear at `now` is not made.
    pub fn load(
        &mut self,
        rule: RuleId,
        target: ScopeTarget,
        counts: ScopeCounts,
        limits: &Limits,
        calendars: &Calendars,
        now: Timestamp,
    ) {
        let Some((_, counters)) = self.rules.iter_mut().find(|(id, _)| *id == rule) else {
            return;
        };
        let keep_until = counts.clear_at(limits, calendars);
        let loaded = ScopeCounts {
            keep_until,
            ..counts
        };
        match (counters, target) {
            (RuleCounters::Listed(kept), ScopeTarget::Listed) => *kept = loaded,
            (RuleCounters::Each(each), ScopeTarget::Overflow) => each.overflow = loaded,
            (RuleCounters::Each(each), ScopeTarget::Own(key)) => {
                if loaded.clear(limits, calendars, now) {
                    each.map.remove(&key);
                    return;
                }
                let before = each.map.get(&key).map(|counts| counts.keep_until);
                if before.is_none() && each.map.len() >= self.cap {
                    return;
                }
                each.map.insert(key, loaded);
                if before.is_none_or(|before| keep_until > before) {
                    each.expiry.push_back((keep_until, key));
                }
            }
            _ => {}
        }
    }

    /// Every counter that counts anything at `now`, as [`load`](Self::load)
    /// takes them back.
    pub fn counted(&self, now: Timestamp) -> Vec<LoadedScope> {
        let mut counted = Vec::new();
        for (rule, counters) in &self.rules {
            let mut keep = |target, counts: &ScopeCounts| {
                if counts.keep_until > now {
                    counted.push(LoadedScope {
                        rule: *rule,
                        target,
                        counts: counts.clone(),
                    });
                }
            };
            match counters {
                RuleCounters::Listed(counts) => keep(ScopeTarget::Listed, counts),
                RuleCounters::Each(each) => {
                    keep(ScopeTarget::Overflow, &each.overflow);
                    for (key, counts) in &each.map {
                        keep(ScopeTarget::Own(*key), counts);
                    }
                }
            }
        }
        counted
    }

    /// Counts a refusal by an each-rule, for the status.
    pub fn note_refusal(&mut self, scope: &ScopeRef) {
        if let Some((_, RuleCounters::Each(each))) =
            self.rules.iter_mut().find(|(id, _)| *id == scope.id)
        {
            each.refused = each.refused.saturating_add(1);
        }
    }

    /// Drops the counters of values whose windows are clear at `now`, at
    /// most [`EVICTIONS_PER_TICK`] per rule, and gives memory back once
    /// most are gone.
    pub fn evict(&mut self, now: Timestamp) {
        for (_, counters) in &mut self.rules {
            let RuleCounters::Each(each) = counters else {
                continue;
            };
            for _ in 0..EVICTIONS_PER_TICK {
                match each.expiry.front() {
                    Some(&(due, key)) if due <= now => {
                        each.expiry.pop_front();
                        if each
                            .map
                            .get(&key)
                            .is_some_and(|counts| counts.keep_until <= now)
                        {
                            each.map.remove(&key);
                        }
                    }
                    _ => break,
                }
            }
            if each.map.len() * 4 < each.map.capacity() {
                each.map.shrink_to(each.map.len() * 2);
            }
            if each.expiry.len() * 4 < each.expiry.capacity() {
                each.expiry.shrink_to(each.expiry.len() * 2);
            }
        }
    }

    /// When [`evict`](Self::evict) has something to do next: the first
    /// instant an end user's counter is due to leave, if any is tracked.
    pub fn next_eviction_at(&self) -> Option<Timestamp> {
        self.rules
            .iter()
            .filter_map(|(_, counters)| match counters {
                RuleCounters::Each(each) => each.expiry.front().map(|&(due, _)| due),
                RuleCounters::Listed(_) => None,
            })
            .min()
    }

    /// What the each-rule `id` tracks.
    pub fn summary(&self, id: RuleId) -> EachSummary {
        match self.rules.iter().find(|(rule, _)| *rule == id) {
            Some((_, RuleCounters::Each(each))) => EachSummary {
                tracked: each.map.len(),
                overflow: each.overflow.keep_until > Timestamp::from_millis(0),
                refused: each.refused,
            },
            _ => EachSummary::default(),
        }
    }
}

/// Which limit of a scope refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusedScope {
    pub kind: ScopeKind,
    /// The rule's place in the configuration.
    pub rule: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::limits::{REQUESTS_PER_DAY, REQUESTS_PER_MINUTE, TOKENS_PER_DAY};

    fn limits(pairs: &[(crate::domain::limits::LimitKind, u64)]) -> Limits {
        let mut limits = Limits::default();
        for &(kind, max) in pairs {
            limits.set(kind, Some(max));
        }
        limits
    }

    fn models(listed: &[&str]) -> RuleInput {
        RuleInput {
            kind: Some(ScopeKind::Model),
            listed: Some(listed.iter().map(|p| p.to_string()).collect()),
            limits: limits(&[(REQUESTS_PER_MINUTE, 10)]),
        }
    }

    fn each_user() -> RuleInput {
        RuleInput {
            kind: Some(ScopeKind::User),
            listed: None,
            limits: limits(&[(REQUESTS_PER_MINUTE, 2), (TOKENS_PER_DAY, 100)]),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_millis(1_777_888_000_000 + seconds * 1000)
    }

    #[test]
    fn patterns_are_names_or_prefixes() {
        for good in ["gpt-4o", "o3*", "*", "ft:gpt-4o-mini:acme:x:1"] {
            ModelPattern::parse("p".into(), good).expect(good);
        }
        for bad in ["o*3", "**", "a b", "", &"a".repeat(101), "gpt-4o\n"] {
            let error =
                ModelPattern::parse("scoped_limits[0].models[1]".into(), bad).expect_err(bad);
            assert_eq!(error.field, "scoped_limits[0].models[1]");
        }
        let prefix = ModelPattern::parse("p".into(), "o3*").expect("prefix");
        assert!(prefix.matches("o3") && prefix.matches("o3-mini"));
        assert!(
            !prefix.matches("o1") && !prefix.matches("O3"),
            "case-sensitive"
        );
        let exact = ModelPattern::parse("p".into(), "gpt-4o").expect("name");
        assert!(exact.matches("gpt-4o") && !exact.matches("gpt-4o-mini"));
    }

    #[test]
    fn validation_names_the_field_at_fault() {
        let field = |inputs: &[RuleInput]| {
            ScopedLimits::validate(inputs)
                .expect_err("refused")
                .field
                .into_owned()
        };
        assert_eq!(
            field(&[each_user(), models(&["a", "b", "a"])]),
            "scoped_limits[1].models[2]"
        );
        assert_eq!(field(&[models(&[])]), "scoped_limits[0].models");
        assert_eq!(field(&[each_user(), each_user()]), "scoped_limits[1]");
        assert_eq!(
            field(&[models(&["x", "y"]), models(&["y", "x"])]),
            "scoped_limits[1]"
        );
        assert_eq!(field(&vec![models(&["x"]); MAX_RULES + 1]), "scoped_limits");
        let many: Vec<String> = (0..=MAX_PATTERNS_PER_RULE)
            .map(|i| format!("m{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(field(&[models(&many)]), "scoped_limits[0].models");
        let listed_users = RuleInput {
            listed: Some(vec!["alice".into()]),
            ..each_user()
        };
        assert_eq!(field(&[listed_users]), "scoped_limits[0].users");
        let without_limits = RuleInput {
            limits: Limits::default(),
            ..each_user()
        };
        assert_eq!(field(&[without_limits]), "scoped_limits[0].limits");
        let zero = RuleInput {
            limits: limits(&[(REQUESTS_PER_DAY, 0)]),
            ..each_user()
        };
        assert_eq!(field(&[zero]), "scoped_limits[0].limits.requests_per_day");
        let no_kind = RuleInput {
            kind: None,
            ..each_user()
        };
        assert_eq!(field(&[no_kind]), "scoped_limits[0]");
    }

    #[test]
    fn a_rule_keeps_its_id_whatever_the_order_of_its_patterns() {
        let one = ScopedLimits::validate(&[models(&["a", "b*"])]).expect("valid");
        let two = ScopedLimits::validate(&[models(&["b*", "a"])]).expect("valid");
        assert_eq!(one.rules()[0].id, two.rules()[0].id);
        let other = ScopedLimits::validate(&[models(&["a"])]).expect("valid");
        assert_ne!(one.rules()[0].id, other.rules()[0].id);
    }

    #[test]
    fn end_user_ids_are_bounded_and_plain() {
        let user = ScopeKind::User;
        assert!(ScopeValue::parse(user, "").is_err());
        assert!(ScopeValue::parse(user, &"x".repeat(MAX_VALUE_BYTES + 1)).is_err());
        assert!(ScopeValue::parse(user, "bell\u{7}").is_err());
        assert!(ScopeValue::parse(user, "c1\u{85}").is_err());
        let long = ScopeValue::parse(user, &"é".repeat(128)).expect("256 bytes");
        assert_eq!(long.shown().chars().count(), SHOWN_CHARS);
        let alice = ScopeValue::parse(user, "Alice").expect("valid");
        assert_ne!(
            alice.key(),
            ScopeValue::parse(user, "alice").expect("valid").key()
        );
        assert_ne!(alice.key(), ScopeValue::unnamed().key());
    }

    #[test]
    fn matching_takes_every_rule_a_request_falls_under() {
        let scoped = ScopedLimits::validate(&[
            models(&["gpt-4o"]),
            models(&["gpt-4o*", "o3*"]),
            each_user(),
        ])
        .expect("valid");
        let alice = ScopeValue::parse(ScopeKind::User, "alice").expect("valid");
        let values = ScopeValues::of(Some(alice.clone()));
        let matched = scoped.matching(Some("gpt-4o"), &values);
        let rules: Vec<usize> = matched.iter().map(|scope| scope.rule).collect();
        assert_eq!(rules, vec![0, 1, 2]);
        assert_eq!(matched[2].key, Some(alice.key()));
        let o3 = scoped.matching(Some("o3-mini"), &ScopeValues::default());
        let rules: Vec<usize> = o3.iter().map(|scope| scope.rule).collect();
        assert_eq!(rules, vec![1, 2]);
        assert_eq!(
            o3[1].key,
            Some(ScopeValue::unnamed().key()),
            "no user: the unnamed one"
        );
        assert_eq!(scoped.matching(None, &ScopeValues::default()).len(), 1);
    }

    fn book_with(rule: RuleInput, cap: usize) -> (ScopedLimits, ScopeBook) {
        let scoped = ScopedLimits::validate(&[rule]).expect("valid");
        let mut book = ScopeBook::with_cap(cap);
        book.follow(&scoped);
        (scoped, book)
    }

    fn user(scoped: &ScopedLimits, name: &str) -> ScopeRef {
        let value = ScopeValue::parse(ScopeKind::User, name).expect("valid");
        scoped.matching(None, &ScopeValues::of(Some(value)))[0]
    }

    #[test]
    fn a_counter_leaves_once_its_windows_are_clear_and_not_before() {
        let minute_only = RuleInput {
            limits: limits(&[(REQUESTS_PER_MINUTE, 5)]),
            ..each_user()
        };
        let (scoped, mut book) = book_with(minute_only, 10);
        let calendars = Calendars::new(at(0), chrono_tz::Tz::UTC);
        let limits = scoped.rules()[0].limits;
        let alice = user(&scoped, "alice");
        book.charge(&alice, Usage::call(1), at(0), &limits, &calendars);
        book.charge(&alice, Usage::call(1), at(30), &limits, &calendars);
        book.evict(at(89));
        assert_eq!(
            book.summary(scoped.rules()[0].id).tracked,
            1,
            "second 30 still counts"
        );
        assert_eq!(
            book.get(&alice).expect("kept").minute_total(at(89)),
            Usage::call(1)
        );
        book.evict(at(90));
        assert_eq!(book.summary(scoped.rules()[0].id).tracked, 0);
        assert!(book.get(&alice).is_none());
    }

    #[test]
    fn a_day_count_keeps_its_counter_until_the_day_ends() {
        let (scoped, mut book) = book_with(each_user(), 10);
        let tz = chrono_tz::Tz::UTC;
        let calendars = Calendars::new(at(0), tz);
        let limits = scoped.rules()[0].limits;
        let bob = user(&scoped, "bob");
        book.charge(&bob, Usage::call(7), at(0), &limits, &calendars);
        let end = calendars.get(Period::Day).end;
        book.evict(Timestamp::from_millis(end.millis() - 1));
        assert_eq!(
            book.get(&bob)
                .expect("kept")
                .calendar(Period::Day, &calendars),
            Usage::call(7)
        );
        book.evict(end);
        assert!(book.get(&bob).is_none(), "gone with its day");
    }

    #[test]
    fn values_beyond_the_cap_share_one_counter() {
        let (scoped, mut book) = book_with(each_user(), 2);
        let calendars = Calendars::new(at(0), chrono_tz::Tz::UTC);
        let limits = scoped.rules()[0].limits;
        for name in ["a", "b", "c", "d"] {
            book.charge(
                &user(&scoped, name),
                Usage::call(1),
                at(0),
                &limits,
                &calendars,
            );
        }
        let summary = book.summary(scoped.rules()[0].id);
        assert_eq!((summary.tracked, summary.overflow), (2, true));
        let shared = book.get(&user(&scoped, "d")).expect("overflow");
        assert_eq!(
            shared.minute_total(at(0)),
            Usage::call(1) + Usage::call(1),
            "c and d together"
        );
        assert_eq!(
            book.get(&user(&scoped, "a"))
                .expect("own")
                .minute_total(at(0)),
            Usage::call(1)
        );
    }

    #[test]
    fn counters_loaded_replace_their_own_and_only_those_counting_are_kept() {
        let (scoped, mut book) = book_with(each_user(), 1);
        let calendars = Calendars::new(at(0), chrono_tz::Tz::UTC);
        let rule = &scoped.rules()[0];
        let alice = user(&scoped, "alice");
        let key = alice.key.expect("a user's key");
        let day = calendars.get(Period::Day).start;
        let counted = |requests| {
            ScopeCounts::from_parts(
                [(day, Usage::call(requests)); Period::ALL.len()],
                vec![(at(0).millis() / 1000, Usage::call(requests))],
            )
        };
        book.load(
            rule.id,
            ScopeTarget::Own(key),
            counted(3),
            &rule.limits,
            &calendars,
            at(1),
        );
        let loaded = book.get(&alice).expect("loaded");
        assert_eq!(loaded.calendar(Period::Day, &calendars), Usage::call(3));
        // Past the cap (1), another user's counter is not made, and the
        // overflow one is loaded as such.
        let bob = user(&scoped, "bob");
        let bob_key = bob.key.expect("key");
        book.load(
            rule.id,
            ScopeTarget::Own(bob_key),
            counted(1),
            &rule.limits,
            &calendars,
            at(1),
        );
        assert_eq!(book.summary(rule.id).tracked, 1);
        book.load(
            rule.id,
            ScopeTarget::Overflow,
            counted(5),
            &rule.limits,
            &calendars,
            at(1),
        );
        assert_eq!(
            book.get(&bob)
                .expect("overflow")
                .calendar(Period::Day, &calendars),
            Usage::call(5)
        );
        // A clear counter loaded removes the user's.
        book.load(
            rule.id,
            ScopeTarget::Own(key),
            ScopeCounts::default(),
            &rule.limits,
            &calendars,
            at(1),
        );
        assert!(book.get(&alice).is_none());
        assert_eq!(book.summary(rule.id).tracked, 0);
        // What counts is listed for saving; once the day is over, nothing.
        book.load(
            rule.id,
            ScopeTarget::Own(key),
            counted(2),
            &rule.limits,
            &calendars,
            at(1),
        );
        let targets: Vec<ScopeTarget> = book
            .counted(at(2))
            .iter()
            .map(|scope| scope.target)
            .collect();
        assert_eq!(targets, vec![ScopeTarget::Overflow, ScopeTarget::Own(key)]);
        assert!(book.counted(calendars.get(Period::Day).end).is_empty());
    }

    #[test]
    fn a_correction_lands_in_the_second_charged_or_now() {
        let (scoped, mut book) = book_with(each_user(), 10);
        let calendars = Calendars::new(at(0), chrono_tz::Tz::UTC);
        let limits = scoped.rules()[0].limits;
        let alice = user(&scoped, "alice");
        book.charge(&alice, Usage::call(50), at(0), &limits, &calendars);
        book.correct(
            &alice,
            at(0),
            Usage::default(),
            Usage::tokens(40),
            at(10),
            &limits,
            &calendars,
        );
        let counts = book.get(&alice).expect("kept");
        assert_eq!(counts.minute_total(at(10)), Usage::call(10));
        assert_eq!(counts.calendar(Period::Day, &calendars), Usage::call(10));
        book.correct(
            &alice,
            at(0),
            Usage::tokens(5),
            Usage::default(),
            at(70),
            &limits,
            &calendars,
        );
        let counts = book.get(&alice).expect("kept");
        assert_eq!(
            counts.minute_total(at(70)),
            Usage::tokens(5),
            "second 0 left: extra now"
        );
        assert_eq!(counts.calendar(Period::Day, &calendars).tokens, 15);
    }
}
