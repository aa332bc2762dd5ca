//! Upstream credentials: the account a proxied call is billed to, which is
//! its upstream key with the organization and project it names. A billing
//! answer (`insufficient_quota`, a spend limit) is a fact about that
//! account, not about the workspace whose call happened to meet it, so the
//! block it starts belongs to the credential: every workspace billed to it
//! is refused at once, one probe from any of them goes through per
//! interval, and the probe's success lifts the block for all of them.

use std::time::Duration;

use super::time::Timestamp;
use super::upstream::{BillingCode, UpstreamClass};
use super::workspace::BillingBlock;

/// A credential's name: a fingerprint of its key, organization and
/// project. The key itself is never kept or shown; the fingerprint names
/// the same account on every instance and across restarts, and tells
/// nothing about the key. Shared rather than copied: every proxied call
/// carries the name of its credential.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialId(std::sync::Arc<str>);

/// What names a credential: this prefix and 16 lowercase hex digits.
const PREFIX: &str = "cred_";

impl CredentialId {
    /// The credential of `key` used with `organization` and `project`
    /// (`None`: the key's defaults).
    pub fn of(key: &str, organization: Option<&str>, project: Option<&str>) -> Self {
        use sha2::{Digest, Sha256};
        // Lengths first, so that no two triples hash the same text.
        let mut hasher = Sha256::new();
        for part in [Some(key), organization, project] {
            let part = part.unwrap_or_default();
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Self(format!("{PREFIX}{:016x}", u64::from_be_bytes(first)).into())
    }

    /// The credential named `text`, as [`as_str`](Self::as_str) writes it.
    pub fn parse(text: &str) -> Option<Self> {
        let digits = text.strip_prefix(PREFIX)?;
        let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        (digits.len() == 16 && digits.chars().all(hex)).then(|| Self(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CredentialId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A credential's billing block, as each workspace billed to it shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct CredentialBlock {
    pub credential: CredentialId,
    pub block: BillingBlock,
}

/// What a credential's block does with a call about to be admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Not blocked: the call is admitted as usual.
    Open,
    /// Blocked, and the call goes through as the probe: its answer tells
    /// whether billing has been fixed.
    Probe,
    /// Blocked: refused without reaching the upstream.
    Refused(BillingCode),
}

/// Decides whether a call billed to a credential with `block` may go at
/// `now`, and takes the probe for it when one is due.
pub fn pass(block: Option<&mut BillingBlock>, now: Timestamp, probe_interval: Duration) -> Pass {
    match block {
        None => Pass::Open,
        Some(block) if block.probe_due(now) => {
            block.take_probe(now, probe_interval);
            Pass::Probe
        }
        Some(block) => Pass::Refused(block.code),
    }
}

/// What the upstream's answer to a call billed to a credential does to the
/// credential's block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Billing is broken: block (or keep blocking) with this code.
    Block(BillingCode),
    /// A call admitted during the block succeeded: billing is fixed.
    Lift,
}

/// The step that the answer of `class` to a call admitted at `admitted_at`
/// takes, with the credential's block as `held`; `None` leaves it as it is.
pub fn step(
    held: Option<BillingBlock>,
    class: UpstreamClass,
    admitted_at: Timestamp,
) -> Option<Step> {
    match class {
        UpstreamClass::QuotaExhausted(code) => Some(Step::Block(code)),
        UpstreamClass::Success if held.is_some_and(|block| block.lifted_by(Some(admitted_at))) => {
            Some(Step::Lift)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(60);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_millis(1_700_000_000_000 + seconds * 1000)
    }

    #[test]
    fn a_credential_is_named_by_its_key_organization_and_project_and_never_shows_the_key() {
        let key = "sk-proj-very-secret";
        let default = CredentialId::of(key, None, None);
        assert_eq!(default, CredentialId::of(key, None, None), "stable");
        assert!(!default.as_str().contains("secret"));
        assert_eq!(CredentialId::parse(default.as_str()), Some(default.clone()));
        for other in [
            CredentialId::of("sk-other", None, None),
            CredentialId::of(key, Some("org-1"), None),
            CredentialId::of(key, None, Some("org-1")),
            CredentialId::of(key, Some("org-1"), Some("proj-1")),
        ] {
            assert_ne!(other, default);
        }
        // Moving the boundary between two parts names another credential.
        assert_ne!(
            CredentialId::of("ab", Some("c"), None),
            CredentialId::of("a", Some("bc"), None)
        );
        for wrong in [
            "cred_",
            "cred_0123456789abcdeF",
            "key_0123456789abcdef",
            "cred_0123",
        ] {
            assert_eq!(CredentialId::parse(wrong), None, "{wrong}");
        }
    }

    #[test]
    fn a_blocked_credential_lets_one_probe_through_per_interval() {
        assert_eq!(pass(None, at(0), INTERVAL), Pass::Open);
        let mut block =
            BillingBlock::answered(None, BillingCode::InsufficientQuota, at(0), INTERVAL);
        let refused = Pass::Refused(BillingCode::InsufficientQuota);
        assert_eq!(pass(Some(&mut block), at(59), INTERVAL), refused);
        assert_eq!(pass(Some(&mut block), at(60), INTERVAL), Pass::Probe);
        assert_eq!(
            pass(Some(&mut block), at(61), INTERVAL),
            refused,
            "one per interval"
        );
        assert_eq!(pass(Some(&mut block), at(120), INTERVAL), Pass::Probe);
        assert_eq!(block.since, at(0), "probing keeps the start");
    }

    #[test]
    fn a_success_admitted_during_the_block_lifts_it_and_a_billing_answer_keeps_its_start() {
        let code = BillingCode::ProjectSpendLimitExceeded;
        assert_eq!(step(None, UpstreamClass::Success, at(0)), None);
        assert_eq!(
            step(None, UpstreamClass::QuotaExhausted(code), at(0)),
            Some(Step::Block(code))
        );
        let block = BillingBlock::answered(None, code, at(10), INTERVAL);
        assert_eq!(
            step(Some(block), UpstreamClass::Success, at(9)),
            None,
            "admitted before the block: says nothing about billing now"
        );
        assert_eq!(
            step(Some(block), UpstreamClass::Success, at(70)),
            Some(Step::Lift)
        );
        assert_eq!(step(Some(block), UpstreamClass::RateLimited, at(70)), None);
        let again = BillingBlock::answered(Some(block), code, at(70), INTERVAL);
        assert_eq!((again.since, again.next_probe_at), (at(10), at(130)));
    }
}
