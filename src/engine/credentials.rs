//! Billing blocks per upstream credential (see `domain::credential`): the
//! credential each workspace is billed to, the blocks this instance knows
//! (its own, or loaded from Redis, where every instance finds them), the
//! one notification of each block, and each workspace's view of it.
//!
//! A proxied call passes its credential before it is admitted
//! (`pass_credential`: refused while blocked, or let through as the one
//! probe per interval), and its answer is folded into the credential after
//! it is settled (`observe_credential`): a billing answer blocks every
//! workspace billed to the credential at once, and the probe's success
//! lifts the block for all of them, as an admin's lift does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::counters::Counters;
use super::publish::Touched;
use super::slot::Slot;
use super::{Decision, Engine, EngineError, Event, UpstreamAccount, fresh_id};
use crate::domain::credential::{self, CredentialBlock, CredentialId, Pass, Step};
use crate::domain::limits::{WorkspaceConfig, WorkspaceId};
use crate::domain::notification::{Notification, describe_credential_quota_exhausted};
use crate::domain::time::Timestamp;
use crate::domain::upstream::UpstreamClass;
use crate::domain::workspace::BillingBlock;
use crate::redis::StoredBlock;
use crate::sync::lock;

/// How a workspace's upstream account becomes the credential its calls are
/// billed to: given by the assembly, which knows where the keys are (`None`
/// when the account has no key).
pub type CredentialResolver = Box<dyn Fn(&UpstreamAccount) -> Option<CredentialId> + Send + Sync>;

/// A proxied call, as its credential's block sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialCall {
    pub credential: CredentialId,
    /// When the call was admitted: only one admitted during a block (its
    /// probe) can show that billing was fixed.
    pub admitted_at: Timestamp,
}

/// A blocked credential as listed for operators.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockedCredential {
    pub credential: CredentialId,
    pub block: BillingBlock,
    pub notification: Notification,
    /// The workspaces billed to it, in order.
    pub workspaces: Vec<WorkspaceId>,
}

#[derive(Default)]
pub(super) struct Credentials {
    resolver: OnceLock<CredentialResolver>,
    blocked: Mutex<HashMap<CredentialId, Blocked>>,
}

struct Blocked {
    block: BillingBlock,
    /// Its one notification, active while the block lasts.
    notification: Notification,
}

/// The upstream account `config` names.
pub(super) fn account_of(config: &WorkspaceConfig) -> UpstreamAccount {
    UpstreamAccount {
        key_env: config.upstream_key_env.clone(),
        organization: config.upstream_organization.clone(),
        project: config.upstream_project.clone(),
    }
}

impl Engine {
    /// Names the credential of each upstream account with `resolver` from
    /// now on. Called once, by the assembly; without it no call is billed
    /// to a known credential (an installation that proxies nothing).
    pub fn resolve_credentials_with(&self, resolver: CredentialResolver) {
        let _ = self.credentials.resolver.set(resolver);
    }

    /// The credential `account` is billed to.
    pub(super) fn credential_of(&self, account: &UpstreamAccount) -> Option<CredentialId> {
        self.credentials
            .resolver
            .get()
            .and_then(|resolve| resolve(account))
    }

    /// The credential `workspace`'s calls are billed to.
    fn workspace_credential(&self, workspace: &WorkspaceId) -> Option<CredentialId> {
        let account = account_of(self.slot(workspace).ok()?.lock().state.config());
        self.credential_of(&account)
    }

    /// Lets a proxied call of `workspace` billed to `credential` go on
    /// (`None`: admit it as usual, perhaps as the credential's probe), or
    /// refuses it, counted like any refusal, while the credential is
    /// blocked. With Redis, the probe is taken there, so that one call per
    /// interval probes across all instances; while Redis cannot be reached,
    /// each instance probes on its own.
    pub async fn pass_credential(
        &self,
        workspace: &WorkspaceId,
        credential: &CredentialId,
    ) -> Result<Option<Decision>, EngineError> {
        let now = self.now();
        let interval = self.settings.probe_interval;
        let pass = credential::pass(
            lock(&self.credentials.blocked)
                .get_mut(credential)
                .map(|blocked| &mut blocked.block),
            now,
            interval,
        );
        let code = match pass {
            Pass::Open => return Ok(None),
            Pass::Refused(code) => code,
            Pass::Probe => {
                let Counters::Redis(redis) = &self.counters else {
                    return Ok(None);
                };
                match redis
                    .counters()
                    .take_credential_probe(credential, interval)
                    .await
                {
                    Ok(Some(wait)) => {
                        // Another instance probes: the next is due when its
                        // interval ends.
                        let mut blocked = lock(&self.credentials.blocked);
                        let Some(blocked) = blocked.get_mut(credential) else {
                            return Ok(None);
                        };
                        blocked.block.next_probe_at = now.plus(wait);
                        blocked.block.code
                    }
                    Ok(None) => return Ok(None),
                    Err(error) => {
                        tracing::debug!(%error, "probing a blocked credential without Redis");
                        return Ok(None);
                    }
                }
            }
        };
        let slot = self.slot(workspace)?;
        let mut cell = slot.lock();
        let admission = cell
            .state
            .refuse_for_credential(code, now, &self.settings, &mut fresh_id);
        Ok(Some(self.conclude_admission(
            &slot,
            cell,
            now,
            (None, &Default::default()),
            admission,
        )))
    }

    /// Folds the upstream's answer to a proxied `call` (its class, if it
    /// answered) into the call's credential: a billing answer blocks it, a
    /// probe's success lifts it, for every workspace billed to it. Applied
    /// here at once, so that the next call is refused; with Redis, written
    /// there too (in a task of its own, as a settlement noticed outside
    /// async code may call this), and what Redis keeps (the earliest start
    /// any instance wrote) applied when it answers.
    pub fn observe_credential(
        self: &Arc<Self>,
        call: &CredentialCall,
        class: Option<UpstreamClass>,
    ) {
        let Some(class) = class else {
            return;
        };
        let held = lock(&self.credentials.blocked)
            .get(&call.credential)
            .map(|blocked| blocked.block);
        let Some(step) = credential::step(held, class, call.admitted_at) else {
            return;
        };
        let now = self.now();
        let interval = self.settings.probe_interval;
        self.apply_credential_block(&call.credential, |held| match step {
            Step::Block(code) => Some(BillingBlock::answered(held, code, now, interval)),
            Step::Lift => None,
        });
        let (Counters::Redis(_), Ok(runtime)) =
            (&self.counters, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let engine = Arc::clone(self);
        let credential = call.credential.clone();
        runtime.spawn(async move {
            let Counters::Redis(redis) = &engine.counters else {
                return;
            };
            let redis = redis.counters();
            let written = match step {
                Step::Block(code) => redis
                    .block_credential(&credential, code, now, interval)
                    .await
                    .map(Some),
                Step::Lift => redis.lift_credential(&credential).await.map(|()| None),
            };
            match written {
                Ok(stored) => engine.load_credential_block(&credential, stored),
                Err(error) => {
                    tracing::warn!(%credential, %error, "cannot share a credential's billing block");
                }
            }
        });
    }

    /// Lifts the block of `credential` (an admin's decision that billing is
    /// fixed), for every workspace billed to it and, with Redis, on every
    /// instance. Answers whether it was blocked here; it is lifted here
    /// even when Redis cannot be told (the error says so), and the others
    /// lift it when their next probe succeeds.
    pub async fn lift_credential(&self, credential: &CredentialId) -> Result<bool, EngineError> {
        let mut lifted = false;
        self.apply_credential_block(credential, |held| {
            lifted = held.is_some();
            None
        });
        if let Counters::Redis(redis) = &self.counters {
            redis
                .counters()
                .lift_credential(credential)
                .await
                .map_err(|error| EngineError::SharedStore(error.to_string()))?;
        }
        Ok(lifted)
    }

    /// Lifts the blocks of the credentials the `workspaces` are billed to
    /// (every known block when `None`): lifting a workspace's blocks says
    /// that billing is fixed, which a block of its credential is about too.
    pub(super) async fn lift_credentials_of(&self, workspaces: Option<&[WorkspaceId]>) {
        let blocked: Vec<CredentialId> = {
            let blocked = lock(&self.credentials.blocked);
            blocked.keys().cloned().collect()
        };
        for credential in blocked {
            let concerned = workspaces.is_none_or(|workspaces| {
                workspaces
                    .iter()
                    .any(|id| self.workspace_credential(id).as_ref() == Some(&credential))
            });
            if concerned && let Err(error) = self.lift_credential(&credential).await {
                tracing::warn!(%credential, %error, "lifted a credential's block here only");
            }
        }
    }

    /// The blocked credentials, each with its notification and the
    /// workspaces billed to it.
    pub fn blocked_credentials(&self) -> Vec<BlockedCredential> {
        let blocked: Vec<(CredentialId, BillingBlock, Notification)> =
            lock(&self.credentials.blocked)
                .iter()
                .map(|(credential, blocked)| {
                    (
                        credential.clone(),
                        blocked.block,
                        blocked.notification.clone(),
                    )
                })
                .collect();
        let mut listed: Vec<BlockedCredential> = blocked
            .into_iter()
            .map(|(credential, block, notification)| BlockedCredential {
                workspaces: self
                    .billed_to(&credential)
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect(),
                credential,
                block,
                notification,
            })
            .collect();
        listed.sort_by(|a, b| a.credential.cmp(&b.credential));
        listed
    }

    /// The active notification of the block of the credential `workspace`
    /// is billed to, if it is blocked.
    pub(super) fn credential_notification(&self, workspace: &WorkspaceId) -> Option<Notification> {
        let credential = self.workspace_credential(workspace)?;
        lock(&self.credentials.blocked)
            .get(&credential)
            .map(|blocked| blocked.notification.clone())
    }

    /// Shows a workspace that is new, or billed to another account now,
    /// the block of its credential, or none.
    pub(super) fn show_credential_block(&self, workspace: &WorkspaceId) {
        let shown = self.workspace_credential(workspace).and_then(|credential| {
            let block = lock(&self.credentials.blocked)
                .get(&credential)
                .map(|blocked| blocked.block)?;
            Some(CredentialBlock { credential, block })
        });
        if let Ok(slot) = self.slot(workspace) {
            self.show(&slot, shown);
        }
    }

    /// Applies a credential's block as Redis stores it (`None`: lifted).
    pub(super) fn load_credential_block(
        &self,
        credential: &CredentialId,
        stored: Option<StoredBlock>,
    ) {
        let now = self.now();
        self.apply_credential_block(credential, |_| {
            stored.map(|stored| BillingBlock {
                code: stored.code,
                since: stored.since,
                next_probe_at: now.plus(stored.probe_in),
            })
        });
    }

    /// The credentials of every workspace, each once.
    pub(super) fn known_credentials(&self) -> Vec<CredentialId> {
        let mut credentials: Vec<CredentialId> = self
            .workspace_ids()
            .iter()
            .filter_map(|id| self.workspace_credential(id))
            .collect();
        credentials.sort();
        credentials.dedup();
        credentials
    }

    /// Sets the block of `credential` to what `update` makes of the one
    /// held: its notification is raised when the block starts (again under
    /// the id of an earlier start, should another instance's be kept),
    /// resolved when it ends, and every workspace billed to it is told.
    fn apply_credential_block(
        &self,
        credential: &CredentialId,
        update: impl FnOnce(Option<BillingBlock>) -> Option<BillingBlock>,
    ) {
        let now = self.now();
        let billed = self.billed_to(credential);
        let mut published = Vec::new();
        let shown = {
            let mut blocked = lock(&self.credentials.blocked);
            let held = blocked.remove(credential);
            let next = update(held.as_ref().map(|held| held.block));
            let same_start =
                |held: &Blocked| next.is_some_and(|next| next.since == held.block.since);
            let kept = match held {
                Some(held) if same_start(&held) => Some(held.notification),
                Some(mut held) => {
                    held.notification.resolved_at = Some(now);
                    published.push(held.notification);
                    None
                }
                None => None,
            };
            if let Some(block) = next {
                let notification = kept.unwrap_or_else(|| {
                    let raised = describe_credential_quota_exhausted(
                        credential,
                        block,
                        self.settings.probe_interval,
                        now,
                    );
                    published.push(raised.clone());
                    raised
                });
                blocked.insert(
                    credential.clone(),
                    Blocked {
                        block,
                        notification,
                    },
                );
            }
            // Published under the lock, so that listeners see a block's
            // notifications in the order they happened.
            for notification in &published {
                lock(&self.journal.pending_notifications).push(notification.clone());
                let _ = self.journal.events.send(Event::CredentialNotification(
                    Arc::new(notification.clone()),
                    billed.iter().map(|(id, _)| id.clone()).collect(),
                ));
            }
            next
        };
        for notification in &published {
            match notification.resolved_at {
                None => tracing::error!(
                    %credential,
                    notification = %notification.id,
                    "upstream credential blocked by billing; its workspaces are refused"
                ),
                Some(_) => {
                    tracing::info!(%credential, "upstream credential's billing block lifted")
                }
            }
        }
        let shown = shown.map(|block| CredentialBlock {
            credential: credential.clone(),
            block,
        });
        for (_, slot) in &billed {
            self.show(slot, shown.clone());
        }
    }

    /// The workspaces billed to `credential`, in order.
    fn billed_to(&self, credential: &CredentialId) -> Vec<(WorkspaceId, Arc<Slot>)> {
        let mut billed: Vec<(WorkspaceId, Arc<Slot>)> = self
            .all_slots()
            .into_iter()
            .filter(|(_, slot)| {
                // The credential is found outside the lock: it reads the
                // environment and hashes the key.
                let account = account_of(slot.lock().state.config());
                self.credential_of(&account).as_ref() == Some(credential)
            })
            .collect();
        billed.sort_by(|a, b| a.0.cmp(&b.0));
        billed
    }

    /// Tells a workspace the block of its credential, publishing its status
    /// if that changes it.
    fn show(&self, slot: &Slot, shown: Option<CredentialBlock>) {
        let mut cell = slot.lock();
        if cell.state.set_credential_block(shown) {
            let touched = Touched {
                status: true,
                state: false,
                usage: false,
            };
            self.conclude(slot, cell, self.now(), Vec::new(), touched);
        }
    }
}
