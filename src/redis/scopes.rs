//! Scoped limits' counters in Redis (see `open_scope` in `counters.lua`):
//! how a call names the counters an admission checks and charges, and
//! their states as the script answers them.

use redis::Value;
use rustc_hash::FxHashMap;

use super::{SharedError, as_int, flat, limits_arg, text};
use crate::domain::limits::{Limits, Metric, WorkspaceId};
use crate::domain::scope::{
    LoadedScope, RuleId, ScopeCounts, ScopeTarget, fingerprint_text, parse_fingerprint,
};
use crate::domain::time::{Period, Timestamp};
use crate::domain::window::Usage;

/// One scope counter an admission (or a call without one) charges: its
/// rule, the value's fingerprint for an each-rule, and the rule's limits.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeCharge {
    pub rule: RuleId,
    pub value: Option<[u8; 16]>,
    pub limits: Limits,
}

/// The key of a rule's counter (a listed rule's), and the start of its
/// values' counters' keys (an each-rule's). The name says the layout, as a
/// workspace's state's does.
fn rule_key(prefix: &str, workspace: &WorkspaceId, rule: RuleId) -> String {
    format!(
        "{}{:016x}",
        workspace_scopes(prefix, workspace),
        rule.to_bits()
    )
}

/// What every key of a workspace's scope counters starts with.
fn workspace_scopes(prefix: &str, workspace: &WorkspaceId) -> String {
    format!("{prefix}scope1:{}:", workspace.as_str())
}

/// The refs the script takes for `charges`: "L <key> <limits>" or
/// "E <rule key> <fingerprint> <limits>", separated by ';'.
pub(super) fn refs_arg(prefix: &str, workspace: &WorkspaceId, charges: &[ScopeCharge]) -> String {
    let refs: Vec<String> = charges
        .iter()
        .map(|charge| {
            let key = rule_key(prefix, workspace, charge.rule);
            let limits = limits_arg(&charge.limits);
            match charge.value {
                None => format!("L {key} {limits}"),
                Some(value) => format!("E {key} {} {limits}", fingerprint_text(&value)),
            }
        })
        .collect();
    refs.join(";")
}

/// Which rule and counter a key names, for a workspace whose keys start
/// with `start`.
fn counter_of(key: &str, start: &str) -> Option<(RuleId, ScopeTarget)> {
    let rest = key.strip_prefix(start)?;
    let (rule, which) = match rest.split_once(':') {
        Some((rule, which)) => (rule, Some(which)),
        None => (rest, None),
    };
    let rule = RuleId::from_bits(u64::from_str_radix(rule, 16).ok()?);
    let target = match which {
        None => ScopeTarget::Listed,
        Some("overflow") => ScopeTarget::Overflow,
        Some(fingerprint) => ScopeTarget::Own(parse_fingerprint(fingerprint)?),
    };
    Some((rule, target))
}

/// A counter's state as stored (see `open_scope`): the reset and expiry
/// it was written with, each calendar period's start and counts, then the
/// seconds of the minute. Empty: it expired, counting nothing.
fn counts_of(state: &[u8]) -> Result<ScopeCounts, SharedError> {
    let metrics = Metric::ALL.len();
    let head = 2 + Period::ALL.len() * (1 + metrics);
    let values: Vec<f64> = state
        .chunks_exact(8)
        .map(|bytes| f64::from_le_bytes(bytes.try_into().expect("8 bytes")))
        .collect();
    let usage = |counts: &[f64]| Usage::from_fn(|metric| counts[metric.index()] as u64);
    if values.is_empty() {
        return Ok(ScopeCounts::default());
    }
    if !state.len().is_multiple_of(8)
        || values.len() < head
        || !(values.len() - head).is_multiple_of(1 + metrics)
    {
        return Err(SharedError::Protocol(format!(
            "a scope counter of {} bytes",
            state.len()
        )));
    }
    let calendars = std::array::from_fn(|index| {
        let at = 2 + index * (1 + metrics);
        (
            Timestamp::from_millis(values[at] as i64),
            usage(&values[at + 1..at + 1 + metrics]),
        )
    });
    let minute = values[head..]
        .chunks_exact(1 + metrics)
        .map(|second| (second[0] as i64, usage(&second[1..])))
        .collect();
    Ok(ScopeCounts::from_parts(calendars, minute))
}

/// What a call answered of scope counters: the counters each admission
/// charged, by its number among the call's admissions (as the script
/// takes them back at settlement), and the counters' states.
#[derive(Default)]
pub(super) struct ScopedAnswer {
    pub(super) charged: FxHashMap<usize, String>,
    /// Each counter with the index of its workspace in those given.
    pub(super) counters: Vec<(usize, LoadedScope)>,
}

/// Reads a call's sixth field (see `scoped_answer` in the script), if it
/// has one, for `workspaces`, whose keys start with `prefix`.
pub(super) fn scoped_answer(
    value: Option<&Value>,
    prefix: &str,
    workspaces: &[&WorkspaceId],
) -> Result<ScopedAnswer, SharedError> {
    let Some(value) = value else {
        return Ok(ScopedAnswer::default());
    };
    let [charged, counters] = flat(value) else {
        return Err(SharedError::Protocol(
            "scoped limits' answer is not {charged, counters}".to_owned(),
        ));
    };
    let charged = flat(charged)
        .chunks_exact(2)
        .map(|pair| {
            (
                usize::try_from(as_int(&pair[0])).unwrap_or(0),
                text(&pair[1]),
            )
        })
        .collect();
    let starts: Vec<String> = workspaces
        .iter()
        .map(|workspace| workspace_scopes(prefix, workspace))
        .collect();
    let mut loaded = Vec::new();
    for pair in flat(counters).chunks_exact(2) {
        let key = text(&pair[0]);
        let found = starts
            .iter()
            .enumerate()
            .find_map(|(index, start)| Some((index, counter_of(&key, start)?)));
        let Some((index, (rule, target))) = found else {
            continue;
        };
        let counts = counts_of(super::bytes(&pair[1])?)?;
        loaded.push((
            index,
            LoadedScope {
                rule,
                target,
                counts,
            },
        ));
    }
    Ok(ScopedAnswer {
        charged,
        counters: loaded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_its_rule_and_counter() {
        let workspace: WorkspaceId = "acme".parse().expect("id");
        let rule = RuleId::from_bits(0xfeed);
        let key = rule_key("qw:", &workspace, rule);
        let start = workspace_scopes("qw:", &workspace);
        assert_eq!(counter_of(&key, &start), Some((rule, ScopeTarget::Listed)));
        let value = [7u8; 16];
        assert_eq!(
            counter_of(&format!("{key}:{}", fingerprint_text(&value)), &start),
            Some((rule, ScopeTarget::Own(value)))
        );
        assert_eq!(
            counter_of(&format!("{key}:overflow"), &start),
            Some((rule, ScopeTarget::Overflow))
        );
        assert_eq!(counter_of(&format!("{key}:tracked"), &start), None);
        let other: WorkspaceId = "acme2".parse().expect("id");
        assert_eq!(counter_of(&key, &workspace_scopes("qw:", &other)), None);
    }

    #[test]
    fn refs_name_each_counter_with_its_limits() {
        let workspace: WorkspaceId = "acme".parse().expect("id");
        let mut limits = Limits::default();
        limits.set(crate::domain::limits::REQUESTS_PER_MINUTE, Some(2));
        let charges = [
            ScopeCharge {
                rule: RuleId::from_bits(1),
                value: None,
                limits,
            },
            ScopeCharge {
                rule: RuleId::from_bits(2),
                value: Some([0xab; 16]),
                limits,
            },
        ];
        assert_eq!(
            refs_arg("qw:", &workspace, &charges),
            format!(
                "L qw:scope1:acme:0000000000000001 0 0 2;E qw:scope1:acme:0000000000000002 {} 0 0 2",
                "ab".repeat(16)
            )
        );
    }
}
