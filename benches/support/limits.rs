//! The limits the benchmarks load workspaces with, shared by the engine's
//! benchmark and the Redis one (`examples/shared_admissions.rs`), so that
//! both measure the same workspaces. Every limit is high enough that
//! nothing is refused: they measure the admitted path, the common one.

use quotawatch::domain::limits::{
    LimitKind, Limits, Metric, REQUESTS_PER_DAY, REQUESTS_PER_MINUTE, TOKENS_PER_DAY,
    TOKENS_PER_MINUTE, USD_PER_DAY, USD_PER_MONTH,
};
use quotawatch::domain::price::NANO_USD_PER_DOLLAR;
use quotawatch::domain::scope::{RuleInput, ScopeKind, ScopedLimits};

/// The model the benchmarks call, which every limit on models selects.
pub const MODEL: &str = "gpt-4o-mini";

/// A limit of `kind` that no benchmark reaches.
fn unreachable(kind: LimitKind) -> Option<u64> {
    Some(match kind.metric {
        Metric::Usd => 1_000_000 * NANO_USD_PER_DOLLAR,
        Metric::Requests | Metric::Tokens => 1 << 50,
    })
}

/// Limits of each of `kinds`.
fn limits_of(kinds: impl IntoIterator<Item = LimitKind>) -> Limits {
    let mut limits = Limits::default();
    for kind in kinds {
        limits.set(kind, unreachable(kind));
    }
    limits
}

/// Requests and tokens per minute and per day: the four limits every
/// earlier measurement had, so that figures compare across versions.
pub fn four() -> Limits {
    limits_of([
        REQUESTS_PER_MINUTE,
        REQUESTS_PER_DAY,
        TOKENS_PER_MINUTE,
        TOKENS_PER_DAY,
    ])
}

/// The four, with budgets per day and per month.
pub fn with_budgets() -> Limits {
    let mut limits = four();
    for budget in [USD_PER_DAY, USD_PER_MONTH] {
        limits.set(budget, unreachable(budget));
    }
    limits
}

/// Three limits on models, as an operator writes them, all selecting
/// [`MODEL`]: the model by name with a request and a token rate, its
/// family by prefix with a budget, and every model apart with a day's
/// tokens.
pub fn model_rules() -> ScopedLimits {
    let rule = |listed: Option<&[&str]>, kinds: &[LimitKind]| RuleInput {
        kind: Some(ScopeKind::Model),
        listed: listed.map(|patterns| patterns.iter().map(|p| (*p).to_owned()).collect()),
        limits: limits_of(kinds.iter().copied()),
    };
    ScopedLimits::validate(&[
        rule(Some(&[MODEL]), &[REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE]),
        rule(Some(&["gpt-4o*", "o3*"]), &[USD_PER_DAY]),
        rule(None, &[TOKENS_PER_DAY]),
    ])
    .expect("valid rules")
}
