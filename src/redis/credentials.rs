//! Billing blocks of upstream credentials (see `domain::credential`), kept
//! apart from the counters' script: one key per credential holds its block
//! (`{prefix}credential:{fingerprint}`, "code start-in-milliseconds"), and
//! a second one with a time to live marks the probe interval running
//! (`...:probe`). Each operation is one atomic transaction of plain
//! commands, so that instances agree on the block's start (the first
//! written stays) and on the one probe per interval (whoever sets the
//! probe key first), and announces itself on the change channel for the
//! other instances to reload the credential at once.

use std::time::Duration;

use super::{Link, RedisCounters, SharedError, millis};
use crate::domain::credential::CredentialId;
use crate::domain::time::Timestamp;
use crate::domain::upstream::BillingCode;

/// What an announcement on the change channel names when it concerns a
/// credential rather than a workspace.
pub(super) const ANNOUNCED: &str = "credential:";

/// A credential's block as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredBlock {
    pub code: BillingCode,
    pub since: Timestamp,
    /// How long until the next probe may go.
    pub probe_in: Duration,
}

impl RedisCounters {
    /// Blocks `credential` with `code` as of `since`, unless a block is
    /// stored already (whose start stays), and puts the next probe an
    /// `interval` away; answers the block as stored.
    pub async fn block_credential(
        &self,
        credential: &CredentialId,
        code: BillingCode,
        since: Timestamp,
        interval: Duration,
    ) -> Result<StoredBlock, SharedError> {
        let link = &self.link;
        let (key, probe) = link.credential_keys(credential);
        let mut pipeline = redis::pipe();
        pipeline
            .atomic()
            .cmd("SET")
            .arg(&key)
            .arg(format!("{} {}", code.code(), since.millis()))
            .arg("NX")
            .ignore()
            .cmd("SET")
            .arg(&probe)
            .arg(1)
            .arg("PX")
            .arg(millis(interval).max(1))
            .ignore()
            .cmd("GET")
            .arg(&key);
        link.announce(&mut pipeline, credential);
        let (stored, _): (Option<String>, i64) = link.transact(&pipeline).await?;
        stored
            .as_deref()
            .and_then(|stored| parse(stored, interval))
            .ok_or_else(|| SharedError::Protocol(format!("credential block {stored:?}")))
    }

    /// Takes the probe of a blocked credential for this instance, if no
    /// instance took one within the interval: `None` when taken, otherwise
    /// how long until the next may go.
    pub async fn take_credential_probe(
        &self,
        credential: &CredentialId,
        interval: Duration,
    ) -> Result<Option<Duration>, SharedError> {
        let (_, probe) = self.link.credential_keys(credential);
        let mut pipeline = redis::pipe();
        pipeline
            .atomic()
            .cmd("SET")
            .arg(&probe)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(millis(interval).max(1))
            .cmd("PTTL")
            .arg(&probe);
        let (taken, left): (Option<String>, i64) = self.link.transact(&pipeline).await?;
        Ok(taken.is_none().then(|| wait(left)))
    }

    /// Lifts the block of `credential` for every instance.
    pub async fn lift_credential(&self, credential: &CredentialId) -> Result<(), SharedError> {
        let (key, probe) = self.link.credential_keys(credential);
        let mut pipeline = redis::pipe();
        pipeline.atomic().cmd("DEL").arg(&key).arg(&probe).ignore();
        self.link.announce(&mut pipeline, credential);
        let (_,): (i64,) = self.link.transact(&pipeline).await?;
        Ok(())
    }

    /// The block of `credential` as stored, if it is blocked.
    pub async fn credential_block(
        &self,
        credential: &CredentialId,
        interval: Duration,
    ) -> Result<Option<StoredBlock>, SharedError> {
        let (key, probe) = self.link.credential_keys(credential);
        let mut pipeline = redis::pipe();
        pipeline
            .atomic()
            .cmd("GET")
            .arg(&key)
            .cmd("PTTL")
            .arg(&probe);
        let (stored, left): (Option<String>, i64) = self.link.transact(&pipeline).await?;
        Ok(stored
            .as_deref()
            .and_then(|stored| parse(stored, interval))
            .map(|block| StoredBlock {
                probe_in: wait(left),
                ..block
            }))
    }
}

impl Link {
    /// The keys of a credential's block and of its probe interval.
    fn credential_keys(&self, credential: &CredentialId) -> (String, String) {
        let key = format!("{}credential:{credential}", self.prefix);
        let probe = format!("{key}:probe");
        (key, probe)
    }

    /// Adds the announcement of a change to `credential` to `pipeline`.
    fn announce(&self, pipeline: &mut redis::Pipeline, credential: &CredentialId) {
        pipeline
            .cmd("PUBLISH")
            .arg(&self.channel)
            .arg(format!("{ANNOUNCED}{credential}"));
    }

    /// Runs `pipeline` as one transaction, bounded like every call.
    async fn transact<T: redis::FromRedisValue>(
        &self,
        pipeline: &redis::Pipeline,
    ) -> Result<T, SharedError> {
        self.breaker()?;
        let mut connection = self.manager.clone();
        let result = self.bounded(pipeline.query_async(&mut connection)).await;
        self.note(&result);
        result
    }
}

/// A stored block; its probe is due an `interval` after its start until
/// the probe key says otherwise.
fn parse(stored: &str, interval: Duration) -> Option<StoredBlock> {
    let (code, since) = stored.split_once(' ')?;
    Some(StoredBlock {
        code: BillingCode::from_code(code)?,
        since: Timestamp::from_millis(since.parse().ok()?),
        probe_in: interval,
    })
}

/// How long a probe key has left, from its `PTTL` (negative when it is
/// gone: the probe is due now).
fn wait(left_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(left_ms).unwrap_or(0))
}
