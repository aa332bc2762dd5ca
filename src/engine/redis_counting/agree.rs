//! Agreeing with the other instances on notification ids: the first
//! instance to raise a cause names its episode in Redis (`episodes.lua`),
//! the others adopt that name before anyone sees theirs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::RedisCounting;
use crate::domain::limits::WorkspaceId;
use crate::engine::Engine;
use crate::engine::slot::Slot;
use crate::redis::EpisodeStep;

/// How long this instance's hold on the episode of an active cause lasts
/// in Redis (see `redis::EpisodeStep`), renewed every `EPISODE_RENEWAL`:
/// an instance that stops, or loses Redis, lets go of its episodes within
/// that time.
const EPISODE_HOLD: Duration = Duration::from_secs(5);
pub(super) const EPISODE_RENEWAL: Duration = Duration::from_secs(1);

/// How many workspaces one call to Redis agrees on at most.
const AGREEMENTS_PER_CALL: usize = 64;

impl Engine {
    /// Agrees on notification ids for the workspace if anything waits for
    /// it (see [`agree`](Self::agree)), so that the caller's answer comes
    /// after its notifications are out under their agreed ids.
    pub(super) async fn agree_when_due(
        &self,
        redis: &RedisCounting,
        workspace: &WorkspaceId,
        slot: &Slot,
    ) {
        if slot.agreement_due.load(Ordering::Acquire) {
            self.agree(redis, &[(workspace, slot)], false).await;
        }
    }

    /// Agrees on notification ids wherever something waits for it, and
    /// with `renew`, renews this instance's holds on every workspace's
    /// episodes: many workspaces to a call, as a renewal concerns every
    /// workspace with an active notification, every second.
    pub(super) async fn agree_everywhere(&self, redis: &RedisCounting, renew: bool) {
        let due: Vec<(WorkspaceId, Arc<Slot>)> = self
            .all_slots()
            .into_iter()
            .filter(|(_, slot)| renew || slot.agreement_due.load(Ordering::Acquire))
            .collect();
        for batch in due.chunks(AGREEMENTS_PER_CALL) {
            let workspaces: Vec<(&WorkspaceId, &Slot)> =
                batch.iter().map(|(id, slot)| (id, slot.as_ref())).collect();
            self.agree(redis, &workspaces, renew).await;
        }
    }

    /// Takes the workspaces' episode steps to Redis, in the
    /// order their causes took them, and gives each notification raised
    /// here the id that names its cause's episode there: the first instance
    /// to raise a cause names the episode, the others adopt its id, so every
    /// instance's listeners and the history (written by the lease holder)
    /// see one notification. A notification nobody has seen yet is renamed;
    /// it and all that was published after it wait in the outbox until
    /// then. With `renew`, the call also renews this instance's hold on the
    /// episodes of its active notifications; one held under another id than
    /// the episode's (raised while Redis was out of reach) is reissued
    /// under the episode's. Should Redis not answer, the ids drawn here
    /// stand, until a renewal finds Redis again.
    async fn agree(
        &self,
        redis: &RedisCounting,
        workspaces: &[(&WorkspaceId, &Slot)],
        renew: bool,
    ) {
        // One agreement per workspace at a time, so that its steps reach
        // Redis in order; never a workspace's lock across the call.
        // Only this holds several turns at once, so none waits for another
        // while holding one.
        let mut turns = Vec::with_capacity(workspaces.len());
        for (_, slot) in workspaces {
            turns.push(slot.agreeing.lock().await);
        }
        let steps: Vec<Vec<EpisodeStep>> = workspaces
            .iter()
            .map(|(_, slot)| slot.lock().episode_steps(renew))
            .collect();
        let sent: Vec<(&WorkspaceId, &EpisodeStep)> = workspaces
            .iter()
            .zip(&steps)
            .flat_map(|((id, _), steps)| steps.iter().map(move |step| (*id, step)))
            .collect();
        let answer = if sent.is_empty() {
            Ok(Vec::new())
        } else {
            redis
                .counters
                .agree_episodes(&redis.instance, EPISODE_HOLD, &sent)
                .await
        };
        let agreed = match answer {
            Ok(agreed) => {
                self.store_answered(redis);
                agreed
            }
            Err(error) => {
                self.store_failed(redis, &error);
                vec![None; sent.len()]
            }
        };
        let mut agreed = agreed.into_iter();
        for ((_, slot), steps) in workspaces.iter().zip(&steps) {
            let answers: Vec<Option<String>> = agreed.by_ref().take(steps.len()).collect();
            self.conclude_agreement(slot, steps, answers);
        }
    }

    /// Applies what Redis answered to a workspace's episode steps, and
    /// sends what no longer waits.
    fn conclude_agreement(&self, slot: &Slot, steps: &[EpisodeStep], agreed: Vec<Option<String>>) {
        let now = self.now();
        let mut cell = slot.lock();
        let mut reissued = Vec::new();
        for (step, agreed) in steps.iter().zip(agreed) {
            let EpisodeStep::Hold { candidate, .. } = step else {
                continue;
            };
            let unseen = cell.take_unagreed(candidate);
            let Some(agreed) = agreed.filter(|agreed| agreed != candidate) else {
                continue;
            };
            if unseen {
                cell.rename(candidate, &agreed);
            } else {
                reissued.extend(cell.state.reissue_notification(candidate, &agreed, now));
            }
        }
        // A reissued notification keeps its cause's episode: no steps.
        let published = self.queue(&mut cell, now, reissued, false, false);
        self.send_agreed(&mut cell);
        if cell.episodes.is_empty() && cell.unagreed.is_empty() {
            slot.agreement_due.store(false, Ordering::Release);
        }
        drop(cell);
        published.log();
    }
}
