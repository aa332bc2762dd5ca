//! What this instance keeps of a workspace whose counters live in Redis,
//! beside its `WorkspaceState`, and the rules that tie the two: which
//! version of the stored counters was loaded, when they were last reset
//! (which decides what a reservation charged before counts), and what was
//! counted and seen alone while Redis was out of reach.
//!
//! The domain knows none of this: it only loads counts and blocks, holds
//! reservations charged elsewhere, and enforces a share of its limits when
//! told to.

use rustc_hash::FxHashMap;

use crate::domain::status::Change;
use crate::domain::time::Timestamp;
use crate::domain::window::{Tally, Usage};
use crate::domain::workspace::{
    Blocks, Counts, Enforcement, Expired, Reservation, Settings, WorkspaceState,
};
use crate::redis::{BlockChange, StoredCounters};

#[derive(Debug, Default)]
pub(in crate::engine) struct Mirror {
    /// The version of the stored counters last loaded (0: none).
    version: u64,
    /// When the stored counters were last reset (microseconds of Redis's
    /// clock), as last loaded.
    last_reset_us: Option<i64>,
    /// Usage admitted here while Redis was unreachable, to be added to the
    /// stored counters when it returns.
    pub(in crate::engine) offline: Usage,
    /// The upstream blocks when Redis became unreachable, to tell at its
    /// return what this instance saw alone.
    pub(in crate::engine) outage_blocks: Option<Blocks>,
    /// Blocks seen alone during an outage, to be written with the merge.
    pub(in crate::engine) offline_blocks: Option<BlockChange>,
    /// The scope counters Redis charged for each reservation held here
    /// that charged any, as its settlement names them back.
    held_scopes: FxHashMap<u64, String>,
    /// How many entries `held_scopes` kept at its last pruning.
    held_scopes_kept: usize,
}

impl Mirror {
    /// Loads `stored` into `state`, unless a newer version was loaded
    /// already (answers arrive out of order), or this instance enforces a
    /// share of the limits on its own: cut off from Redis, a late answer
    /// must not replace its share with the whole. Returns whether it did.
    pub(in crate::engine) fn load(
        &mut self,
        state: &mut WorkspaceState,
        stored: &StoredCounters,
    ) -> bool {
        if state.enforcement() != Enforcement::Whole {
            return false;
        }
        // Scope counters carry no version: each answer holds those its call
        // read or changed, as of that call, and an older one replaces a
        // newer only until the next call that names them.
        state.load_scopes(stored.scopes.iter().cloned(), stored.at);
        if stored.version < self.version {
            return false;
        }
        // A reset seen since the last load (not the one found at the
        // first, which the saved state already reflects).
        if self.version > 0 && stored.last_reset_us != self.last_reset_us {
            state.note_counts_reset();
        }
        self.version = stored.version;
        self.last_reset_us = stored.last_reset_us;
        state.load_counts(&stored.counts, stored.at);
        state.load_blocks(stored.blocks, stored.at);
        true
    }

    /// Keeps the scope counters Redis charged for reservation `id`, held
    /// here, for its settlement; forgets those of reservations `state`
    /// no longer holds (expired meanwhile) once they could be half the
    /// entries, so that the look costs each admission a constant.
    pub(in crate::engine) fn hold_scopes(
        &mut self,
        state: &WorkspaceState,
        id: u64,
        scopes: String,
    ) {
        if self.held_scopes.len() >= 2 * self.held_scopes_kept.max(8) {
            self.held_scopes
                .retain(|held, _| state.holds_reservation(*held));
            self.held_scopes_kept = self.held_scopes.len();
        }
        self.held_scopes.insert(id, scopes);
    }

    /// The scope counters reservation `id` charged, taken for its
    /// settlement.
    pub(in crate::engine) fn take_scopes(&mut self, id: u64) -> Option<String> {
        self.held_scopes.remove(&id)
    }

    /// The version of the stored counters last loaded (0: none).
    pub(in crate::engine) fn version(&self) -> u64 {
        self.version
    }

    /// A reservation that ended unsettled, as history counts it: one Redis
    /// charged before its last reset counts nothing from the reset on, as a
    /// reservation charged here would (see `WorkspaceState::reset`). One
    /// charged here is counted as it is.
    pub(in crate::engine) fn as_counted(&self, expired: Expired) -> Expired {
        let reset = expired
            .charged_elsewhere_us
            .and_then(|charged_us| reset_since(charged_us, self.last_reset_us));
        match reset {
            Some(reset) => Expired {
                charged_at: reset,
                usage: Usage::default(),
                ..expired
            },
            None => expired,
        }
    }

    /// A reservation held here as Redis settles it, as of the reset the
    /// loaded counters know.
    pub(in crate::engine) fn as_in_store(&self, reservation: Reservation) -> Reservation {
        as_in_store(reservation, self.last_reset_us)
    }
}

/// A reservation held here, charged in Redis, as Redis settles it when its
/// last reset is `last_reset_us`: one charged before that reset had its
/// estimate cleared then, as the reservations held here have (see
/// `WorkspaceState::reset`), and counts from the reset on.
pub(in crate::engine) fn as_in_store(
    reservation: Reservation,
    last_reset_us: Option<i64>,
) -> Reservation {
    let reset = reservation
        .charged_elsewhere_us
        .and_then(|charged_us| reset_since(charged_us, last_reset_us));
    match reset {
        Some(reset) => Reservation {
            charged_at: reset,
            estimate: Usage::default(),
            ..reservation
        },
        None => reservation,
    }
}

/// When Redis was last reset (`last_reset_us`), if that came after a
/// charge at `charged_us`. Both are its clock's microseconds, which tell a
/// reset from a charge in the same millisecond.
fn reset_since(charged_us: i64, last_reset_us: Option<i64>) -> Option<Timestamp> {
    last_reset_us
        .filter(|reset_us| charged_us < *reset_us)
        .map(|reset_us| Timestamp::from_millis(reset_us.div_euclid(1000)))
}

/// Switches how much of its limits `state` enforces, as the fallback
/// decides. Entering a share of `n` starts from `1/n` of the usage counted
/// so far, so that the `n` instances together stay within the whole;
/// returning to the whole keeps the counts until stored ones are loaded.
pub(in crate::engine) fn enforce(
    state: &mut WorkspaceState,
    enforcement: Enforcement,
    now: Timestamp,
    settings: &Settings,
    fresh_id: &mut dyn FnMut() -> u64,
) -> Vec<Change> {
    if let (Enforcement::Whole, Enforcement::Share(instances)) = (state.enforcement(), enforcement)
    {
        state.load_counts(&share_of(&state.counts(), instances), now);
    }
    state.set_enforcement(enforcement, now, settings, fresh_id)
}

/// `1/instances` of `counts`. Shares round up, so that together they never
/// fall short of the whole; the minute's buckets are scaled on their
/// running sum, so that many small buckets do not round away to nothing.
fn share_of(counts: &Counts, instances: u32) -> Counts {
    let instances = u64::from(instances.max(1));
    let share = |usage: Usage| Usage::from_fn(|metric| usage.of(metric).div_ceil(instances));
    let mut running = Usage::default();
    let mut scaled_so_far = Usage::default();
    let minute = counts
        .minute
        .iter()
        .map(|&(second, usage)| {
            running += usage;
            let scaled = share(running);
            let bucket = scaled.saturating_sub(scaled_so_far);
            scaled_so_far = scaled;
            (second, bucket)
        })
        .collect();
    Counts {
        minute,
        calendars: counts.calendars.map(|(start, used)| (start, share(used))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::limits::{LimitKind, Limits, Metric, Window, WorkspaceConfig};
    use crate::domain::time::Period;
    use crate::domain::workspace::{Admitted, Request, Returned};

    const NOW: Timestamp = Timestamp::from_millis(1_778_000_000_000);

    fn workspace(kind: LimitKind, max: u64) -> WorkspaceState {
        let mut limits = Limits::default();
        limits.set(kind, Some(max));
        WorkspaceState::new(
            WorkspaceConfig::new("acme".parse().expect("id"), limits),
            NOW,
        )
    }

    /// Stored counters of `version` at `at` with `requests` this second and
    /// today, reset last at `last_reset_us`.
    fn stored(
        version: u64,
        at: Timestamp,
        requests: u64,
        last_reset_us: Option<i64>,
    ) -> StoredCounters {
        StoredCounters {
            version,
            at,
            counts: Counts {
                minute: vec![(at.millis() / 1000, Usage::requests(requests))],
                calendars: Period::ALL.map(|period| {
                    let (start, _) = period.bounds(at, chrono_tz::UTC);
                    (start, Usage::requests(requests))
                }),
            },
            blocks: Blocks::default(),
            last_reset_us,
            scopes: Vec::new(),
        }
    }

    fn used(state: &WorkspaceState) -> u64 {
        state.snapshot(NOW).usage.last_minute.requests
    }

    /// Holds reservation `id` of 40 tokens, charged in Redis at `charged_us`.
    fn admit_in_redis(state: &mut WorkspaceState, id: u64, charged_us: i64) {
        let admitted = Admitted {
            id,
            charged_at: NOW,
            expires_at: NOW.plus(Settings::default().reservation_ttl),
            probe: false,
        };
        let request = Request {
            scoped: Default::default(),
            estimate: Usage::call(40),
            model: None,
            settled_anywhere: false,
        };
        let admission = state.conclude_admission_made_elsewhere(
            Some(admitted),
            &request,
            charged_us,
            NOW,
            &Settings::default(),
            &mut || 99,
        );
        assert!(admission.result.is_ok());
    }

    #[test]
    fn stored_counters_load_unless_older_than_what_is_loaded_or_while_alone() {
        let mut state = workspace(LimitKind::new(Metric::Requests, Window::Minute), 10);
        let mut mirror = Mirror::default();
        assert!(mirror.load(&mut state, &stored(5, NOW, 7, None)));
        assert!(
            !mirror.load(&mut state, &stored(4, NOW, 1, None)),
            "an older answer"
        );
        assert_eq!((used(&state), mirror.version()), (7, 5));
        // Enforcing a share alone, a late answer must not bring the whole.
        enforce(
            &mut state,
            Enforcement::Share(2),
            NOW,
            &Settings::default(),
            &mut || 1,
        );
        assert!(!mirror.load(&mut state, &stored(6, NOW, 9, None)));
        assert_eq!(used(&state), 4, "7 / 2, rounded up");
    }

    #[test]
    fn a_share_starts_from_a_share_of_the_usage_rounded_up() {
        // Three requests in three different seconds: 3 / 2 rounds up to 2,
        // not down to nothing second by second.
        let mut counts = Counts {
            minute: vec![
                (100, Usage::requests(1)),
                (101, Usage::requests(1)),
                (102, Usage::requests(1)),
            ],
            calendars: [(NOW, Usage::requests(3)); Period::ALL.len()],
        };
        counts.calendars[Period::Month.index()] = (NOW, Usage::requests(5));
        let share = share_of(&counts, 2);
        let minute: u64 = share.minute.iter().map(|(_, usage)| usage.requests).sum();
        assert_eq!(
            (
                minute,
                share.calendar(Period::Day).1.requests,
                share.calendar(Period::Month).1.requests
            ),
            (2, 2, 3)
        );
    }

    #[test]
    fn a_reservation_charged_before_a_reset_ends_counting_nothing() {
        let reset = NOW;
        // Microseconds tell the reset from charges in the same millisecond.
        let reset_us = reset.millis() * 1000 + 500;
        let mut state = workspace(LimitKind::new(Metric::Requests, Window::Minute), 10);
        let mut mirror = Mirror::default();
        mirror.load(&mut state, &stored(1, NOW, 0, Some(reset_us)));
        let expired = |charged_us| Expired {
            charged_at: reset,
            model: None,
            usage: Usage::call(40),
            charged_elsewhere_us: Some(charged_us),
        };
        let before = mirror.as_counted(expired(reset_us - 100));
        assert_eq!((before.charged_at, before.usage.tokens), (reset, 0));
        assert_eq!(
            mirror.as_counted(expired(reset_us + 100)),
            expired(reset_us + 100)
        );
        // Settled, it is charged as Redis settles it: from the reset on,
        // with nothing of its estimate left to keep. The reset is the one
        // Redis's answer knows, not a later one loaded first.
        let charged_before_us = (reset.millis() - 1000) * 1000;
        let reservation = |charged_us| Reservation {
            id: 1,
            charged_at: Timestamp::from_millis(reset.millis() - 1000),
            estimate: Usage::call(40),
            expires_at: reset.plus(Duration::from_secs(600)),
            model: None,
            probe: false,
            charged_elsewhere_us: Some(charged_us),
        };
        let settled = as_in_store(reservation(charged_before_us), Some(reset_us));
        assert_eq!((settled.charged_at, settled.estimate.tokens), (reset, 0));
        assert_eq!(
            as_in_store(reservation(reset_us + 1), Some(reset_us)),
            reservation(reset_us + 1)
        );
        assert_eq!(
            as_in_store(reservation(charged_before_us), None),
            reservation(charged_before_us),
            "settled before any reset"
        );
    }

    #[test]
    fn a_reset_leaves_the_reservations_redis_charged_to_its_own_reset() {
        let mut state = workspace(LimitKind::new(Metric::Tokens, Window::Minute), 10_000);
        let mut mirror = Mirror::default();
        mirror.load(&mut state, &stored(1, NOW, 0, None));
        let charged_us = NOW.millis() * 1000 + 250;
        admit_in_redis(&mut state, 1, charged_us);
        // Redis's reset came just before this admission reached it: the
        // local reset that follows must not clear what Redis charged.
        mirror.load(&mut state, &stored(2, NOW, 0, Some(charged_us - 1)));
        state.reset(NOW);
        let held = state
            .take_reservation_charged_elsewhere(1, NOW)
            .expect("held");
        assert_eq!(mirror.as_in_store(held.clone()).estimate.tokens, 40);
        // A later reset in Redis clears it, as it was charged before.
        mirror.load(&mut state, &stored(3, NOW, 0, Some(charged_us + 1)));
        let returned = state.return_reservation(mirror.as_in_store(held), NOW);
        assert_eq!(
            returned,
            Returned::Held {
                estimate: Usage::default()
            }
        );
    }
}
