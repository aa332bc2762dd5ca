//! A workspace's state as the script stores and answers it (see
//! `counters.lua`): little-endian doubles, a header (with a total per window
//! and metric, and the bounds of each calendar period) and the minute's
//! one-second slots. Each instance holds the last state it read of each
//! workspace, so that an answer need not carry the slots again while they
//! have not changed: they change about once a second, the header with every
//! admission.

use std::sync::Mutex;

use rustc_hash::FxHashMap;

use super::SharedError;
use crate::domain::limits::{Metric, Window, WorkspaceId};
use crate::domain::time::{Period, Timestamp};
use crate::domain::upstream::BillingCode;
use crate::domain::window::Usage;
use crate::domain::workspace::{BillingBlock, Blocks, Counts};
use crate::sync::lock;

/// The header's fields, by index (see `counters.lua`, whose indices count
/// from one).
const VERSION: usize = 0;
const HOLD: usize = 1;
const BILLING: usize = 2;
const BILLING_SINCE: usize = 3;
const NEXT_PROBE: usize = 4;
const LAST_RESET: usize = 5;
const SLOTS_VERSION: usize = 7;
const NEWEST_SECOND: usize = 8;
/// The newest second's count of each metric.
const NEWEST: usize = NEWEST_SECOND + 1;
/// The total of each window and metric, window by window.
const TOTALS: usize = NEWEST + METRICS;
/// Each calendar period's start and end.
const BOUNDS: usize = TOTALS + Window::ALL.len() * METRICS;

const METRICS: usize = Metric::ALL.len();

/// The header's index of the total of `metric` over `window`.
const fn total(window: Window, metric: Metric) -> usize {
    TOTALS + window.index() * METRICS + metric.index()
}

/// The header's index of the start of the calendar period `period`; its
/// end follows.
const fn period_start(period: Period) -> usize {
    BOUNDS + 2 * period.index()
}

/// One workspace's counters and upstream blocks as the script stores them,
/// as of Redis's clock. Redis decides admissions and applies settlements;
/// each instance loads these into its `WorkspaceState`, to derive the
/// status, the notifications and the headers from the same rules it would
/// use alone.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCounters {
    /// Raised by every change in Redis; a loaded state never goes back to
    /// an older version, since answers can arrive out of order.
    pub version: u64,
    /// Redis's clock when it answered.
    pub at: Timestamp,
    pub counts: Counts,
    pub blocks: Blocks,
    /// The last admin reset, in microseconds of Redis's clock (which tells
    /// it from an admission in the same millisecond), if any: reservations
    /// charged before it count nothing.
    pub last_reset_us: Option<i64>,
    /// The workspace's scope counters the call read or changed.
    pub scopes: Vec<crate::domain::scope::LoadedScope>,
}

/// The last state read of each workspace.
#[derive(Default)]
pub(super) struct StateCache {
    states: Mutex<FxHashMap<WorkspaceId, Vec<f64>>>,
}

impl StateCache {
    /// The version of the slots held for `workspace`, for the script to
    /// compare with its own: -1 when none is held.
    pub(super) fn slots_version(&self, workspace: &WorkspaceId) -> i64 {
        lock(&self.states)
            .get(workspace)
            .map_or(-1, |state| state[SLOTS_VERSION] as i64)
    }

    /// A workspace's state from an answer to a call that said it held the
    /// slots of version `known`: the `base` the answer carries, or else the
    /// state held, with the answer's `changes` applied. Kept when it is newer
    /// than the state held. Answers what `read` makes of it, read where it
    /// lies: an answer is applied to the state held in place, as copying
    /// the whole state (a few kilobytes) twice per admission cost more than
    /// reading it.
    pub(super) fn load<R>(
        &self,
        workspace: &WorkspaceId,
        known: i64,
        base: &[u8],
        changes: &[u8],
        read: impl FnOnce(&[f64]) -> R,
    ) -> Result<R, SharedError> {
        let mut states = lock(&self.states);
        if !base.is_empty() {
            let mut state = unpack_state(base)?;
            apply_changes(&mut state, changes)?;
            let answer = read(&state);
            match states.get_mut(workspace) {
                Some(held) if held[VERSION] >= state[VERSION] => {}
                Some(held) => *held = state,
                None => {
                    states.insert(workspace.clone(), state);
                }
            }
            return Ok(answer);
        }
        let Some(held) = states.get_mut(workspace) else {
            return Err(SharedError::Protocol(
                "changes to a state this instance does not hold".to_owned(),
            ));
        };
        // The slots held changed since the call left: an answer to a later
        // call came back first, so the state held is newer than this
        // answer's.
        if held[SLOTS_VERSION] as i64 != known {
            return Ok(read(held));
        }
        if changed_version(changes).is_some_and(|version| version > held[VERSION]) {
            apply_changes(held, changes)?;
            return Ok(read(held));
        }
        // An answer older than the state held, over the same slots: read
        // as it was, the newer state kept.
        let mut state = held.clone();
        apply_changes(&mut state, changes)?;
        Ok(read(&state))
    }
}

/// Usage from a count per metric, in `Metric::ALL`'s order.
fn usage_of(counts: &[f64]) -> Usage {
    Usage::from_fn(|metric| counts[metric.index()] as u64)
}

/// The line of `counters.lua` that the numbers of metrics and windows are
/// written into.
const COUNTS_MARKER: &str = "local METRICS, WINDOWS = @METRICS@, @WINDOWS@";

/// The counters library as Redis runs it: with the numbers of metrics and
/// windows, which lay its state out, taken from `Metric::ALL` and
/// `Window::ALL`, so that the script and this module read the same layout.
pub(super) fn counters_script() -> String {
    include_str!("counters.lua").replacen(
        COUNTS_MARKER,
        &format!(
            "local METRICS, WINDOWS = {}, {}",
            Metric::ALL.len(),
            Window::ALL.len()
        ),
        1,
    )
}

/// A workspace's counters from its state, as of the store's clock `at`.
pub(super) fn counters_from(at: Timestamp, state: &[f64]) -> StoredCounters {
    // The header holds the newest second's counts; its slot may be older.
    let newest = state[NEWEST_SECOND];
    let newest_slot = newest as usize % MINUTE_SLOTS;
    let now_second = at.millis().div_euclid(1000);
    let minute = state[STATE_HEADER..]
        .chunks_exact(SLOT_FIELDS)
        .enumerate()
        .map(|(index, slot)| {
            if index == newest_slot {
                (newest, &state[NEWEST..NEWEST + METRICS])
            } else {
                (slot[0], &slot[1..])
            }
        })
        .filter(|(second, counts)| {
            *second as i64 > now_second - 60 && counts.iter().any(|count| *count > 0.0)
        })
        .map(|(second, counts)| (second as i64, usage_of(counts)))
        .collect();
    let millis = |index: usize| Timestamp::from_millis(state[index] as i64);
    let used = |period: Period| {
        usage_of(&state[total(Window::counting(period), Metric::ALL[0])..][..METRICS])
    };
    let billing = billing_code(state[BILLING]).map(|code| BillingBlock {
        code,
        since: millis(BILLING_SINCE),
        next_probe_at: millis(NEXT_PROBE),
    });
    StoredCounters {
        version: state[VERSION] as u64,
        at,
        counts: Counts {
            minute,
            calendars: Period::ALL.map(|period| (millis(period_start(period)), used(period))),
        },
        blocks: Blocks {
            rate_until: Some(millis(HOLD)).filter(|until| *until > at),
            billing,
        },
        last_reset_us: (state[LAST_RESET] > 0.0).then_some(state[LAST_RESET] as i64),
        scopes: Vec::new(),
    }
}

/// A billing code as the script stores it: its place in
/// [`BillingCode::ALL`] plus one, zero for none.
pub(super) fn billing_number(code: Option<BillingCode>) -> usize {
    code.and_then(|code| BillingCode::ALL.iter().position(|known| *known == code))
        .map_or(0, |index| index + 1)
}

fn billing_code(number: f64) -> Option<BillingCode> {
    (number as usize)
        .checked_sub(1)
        .and_then(|index| BillingCode::ALL.get(index).copied())
}

/// The numbers before the minute's slots in a workspace's state (see
/// `counters.lua` for each).
const STATE_HEADER: usize = BOUNDS + 2 * Period::ALL.len();

/// A slot's numbers: its second and a count per metric.
const SLOT_FIELDS: usize = 1 + METRICS;

/// How many numbers the script packs into a workspace's state.
const STATE_FIELDS: usize = STATE_HEADER + SLOT_FIELDS * MINUTE_SLOTS;

/// The minute's one-second slots.
const MINUTE_SLOTS: usize = 60;

/// The state as the script packs it: little-endian doubles, which hold
/// every count below 2^53 exactly.
fn unpack_state(packed: &[u8]) -> Result<Vec<f64>, SharedError> {
    if packed.len() != STATE_FIELDS * 8 {
        return Err(SharedError::Protocol(format!(
            "a state of {} bytes instead of {}",
            packed.len(),
            STATE_FIELDS * 8
        )));
    }
    Ok(doubles(packed).collect())
}

/// Applies what a call changed to the state it read: nothing, or the new
/// header followed by each slot written as {index, second, a count per
/// metric}. Malformed changes are refused before anything is written, so
/// that the state held stays whole.
fn apply_changes(state: &mut [f64], changes: &[u8]) -> Result<(), SharedError> {
    if changes.is_empty() {
        return Ok(());
    }
    const HEADER_BYTES: usize = 8 * STATE_HEADER;
    const SLOT_CHANGE_BYTES: usize = 8 * (1 + SLOT_FIELDS);
    let malformed = || SharedError::Protocol(format!("changes of {} bytes", changes.len()));
    if changes.len() < HEADER_BYTES
        || !(changes.len() - HEADER_BYTES).is_multiple_of(SLOT_CHANGE_BYTES)
    {
        return Err(malformed());
    }
    let (header, slots) = changes.split_at(HEADER_BYTES);
    let slot_index = |slot: &[u8]| doubles(slot).next().unwrap_or_default() as usize;
    if slots
        .chunks_exact(SLOT_CHANGE_BYTES)
        .any(|slot| slot_index(slot) >= MINUTE_SLOTS)
    {
        return Err(malformed());
    }
    for (number, changed) in state[..STATE_HEADER].iter_mut().zip(doubles(header)) {
        *number = changed;
    }
    for slot in slots.chunks_exact(SLOT_CHANGE_BYTES) {
        let at = STATE_HEADER + SLOT_FIELDS * slot_index(slot);
        for (number, changed) in state[at..at + SLOT_FIELDS]
            .iter_mut()
            .zip(doubles(slot).skip(1))
        {
            *number = changed;
        }
    }
    Ok(())
}

/// The version of the state that `changes` (see [`apply_changes`]) bring.
fn changed_version(changes: &[u8]) -> Option<f64> {
    doubles(changes).nth(VERSION)
}

fn doubles(bytes: &[u8]) -> impl Iterator<Item = f64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|bytes| f64::from_le_bytes(bytes.try_into().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_codes_survive_the_trip_through_a_number() {
        assert_eq!(billing_number(None), 0);
        assert_eq!(billing_code(0.0), None);
        for code in BillingCode::ALL {
            let number = billing_number(Some(code));
            assert_eq!(billing_code(number as f64), Some(code));
        }
    }

    #[test]
    fn changes_replace_the_header_and_the_slots_written() {
        let mut state = vec![0.0; STATE_FIELDS];
        let header: Vec<f64> = (1..=STATE_HEADER).map(|n| n as f64).collect();
        let mut changes: Vec<f64> = header.clone();
        changes.extend([59.0, 1_000.0, 2.0, 300.0, 4_000.0]);
        let bytes: Vec<u8> = changes.iter().flat_map(|n| n.to_le_bytes()).collect();
        apply_changes(&mut state, &bytes).expect("well formed");
        assert_eq!(state[..STATE_HEADER], header[..]);
        assert_eq!(state[STATE_FIELDS - 4..], [1_000.0, 2.0, 300.0, 4_000.0]);
        let untouched = &state[STATE_HEADER..STATE_FIELDS - 4];
        assert!(untouched.iter().all(|n| *n == 0.0));
        // No changes leave the state as read; torn or out-of-range ones fail.
        apply_changes(&mut state, &[]).expect("nothing changed");
        assert!(apply_changes(&mut state, &bytes[..bytes.len() - 8]).is_err());
        let mut outside = changes.clone();
        outside[STATE_HEADER] = 60.0;
        let outside: Vec<u8> = outside.iter().flat_map(|n| n.to_le_bytes()).collect();
        assert!(apply_changes(&mut state, &outside).is_err());
    }

    #[test]
    fn a_state_of_the_wrong_size_is_a_protocol_error() {
        assert!(matches!(
            unpack_state(&[0; 16]),
            Err(SharedError::Protocol(_))
        ));
        let empty = unpack_state(&[0; STATE_FIELDS * 8]).expect("zeros");
        assert!(empty.iter().all(|number| *number == 0.0));
    }

    fn packed(numbers: &[f64]) -> Vec<u8> {
        numbers.iter().flat_map(|n| n.to_le_bytes()).collect()
    }

    /// A header of `version` whose slots last changed at `slots_version`.
    fn header(version: f64, slots_version: f64) -> Vec<f64> {
        let mut header = vec![0.0; STATE_HEADER];
        header[VERSION] = version;
        header[SLOTS_VERSION] = slots_version;
        header
    }

    #[test]
    fn an_answer_without_a_base_changes_the_state_held() {
        let cache = StateCache::default();
        let workspace: WorkspaceId = "acme".parse().expect("id");
        assert_eq!(cache.slots_version(&workspace), -1, "nothing held");
        let mut base = vec![0.0; STATE_FIELDS];
        base[..STATE_HEADER].copy_from_slice(&header(10.0, 10.0));
        base[STATE_HEADER + 4..STATE_HEADER + 8].copy_from_slice(&[61.0, 1.0, 5.0, 50.0]);
        cache
            .load(&workspace, -1, &packed(&base), &[], <[f64]>::to_vec)
            .expect("a whole state");
        assert_eq!(cache.slots_version(&workspace), 10);
        // The next answer carries the header and one slot written.
        let mut changes = header(12.0, 12.0);
        changes.extend([2.0, 62.0, 1.0, 7.0, 70.0]);
        let state = cache
            .load(&workspace, 10, &[], &packed(&changes), <[f64]>::to_vec)
            .expect("changes to the state held");
        assert_eq!(
            state[STATE_HEADER + 4..STATE_HEADER + 12],
            [61.0, 1.0, 5.0, 50.0, 62.0, 1.0, 7.0, 70.0]
        );
        assert_eq!(cache.slots_version(&workspace), 12);
        // An answer to a call sent before that one, which came back later,
        // finds newer slots held: the newer state stands.
        let late = cache
            .load(
                &workspace,
                10,
                &[],
                &packed(&header(11.0, 10.0)),
                <[f64]>::to_vec,
            )
            .expect("a late answer");
        assert_eq!(late[VERSION], 12.0);
        // An older whole state does not replace a newer one.
        cache
            .load(&workspace, -1, &packed(&base), &[], <[f64]>::to_vec)
            .expect("an older state");
        assert_eq!(cache.slots_version(&workspace), 12);
        // Changes to a state never held cannot be applied.
        let stranger: WorkspaceId = "other".parse().expect("id");
        assert!(matches!(
            cache.load(&stranger, 10, &[], &packed(&changes), <[f64]>::to_vec),
            Err(SharedError::Protocol(_))
        ));
    }

    #[test]
    fn the_newest_second_counts_from_the_header() {
        let mut state = vec![0.0; STATE_FIELDS];
        state[..STATE_HEADER].copy_from_slice(&header(1.0, 1.0));
        // Second 1_000 is the newest: its slot holds an older second, 940.
        state[NEWEST_SECOND] = 1_000.0;
        state[NEWEST] = 3.0;
        state[NEWEST + 1] = 30.0;
        let slot = STATE_HEADER + SLOT_FIELDS * (1_000 % MINUTE_SLOTS);
        state[slot..slot + 3].copy_from_slice(&[940.0, 9.0, 90.0]);
        let before = STATE_HEADER + SLOT_FIELDS * (999 % MINUTE_SLOTS);
        state[before..before + 3].copy_from_slice(&[999.0, 1.0, 10.0]);
        let counters = counters_from(Timestamp::from_millis(1_000_500), &state);
        assert_eq!(
            counters.counts.minute,
            vec![
                (
                    999,
                    Usage {
                        requests: 1,
                        tokens: 10,
                        ..Usage::default()
                    }
                ),
                (
                    1_000,
                    Usage {
                        requests: 3,
                        tokens: 30,
                        ..Usage::default()
                    }
                )
            ]
        );
    }

    #[test]
    fn the_script_lays_out_the_same_metrics_and_windows() {
        let script = counters_script();
        assert!(include_str!("counters.lua").contains(COUNTS_MARKER));
        let declared = format!(
            "local METRICS, WINDOWS = {}, {}",
            Metric::ALL.len(),
            Window::ALL.len()
        );
        assert!(script.contains(&declared), "{declared}");
        // The function's name is the library's to write in.
        let numbers = script.replace(super::super::function::FUNCTION_MARKER, "");
        assert!(!numbers.contains('@'), "every number written in");
    }

    #[test]
    fn each_calendar_period_counts_from_its_own_total_and_bounds() {
        let mut state = vec![0.0; STATE_FIELDS];
        state[..STATE_HEADER].copy_from_slice(&header(3.0, 3.0));
        let day = Timestamp::from_millis(1_780_000_000_000);
        let month = Timestamp::from_millis(1_779_000_000_000);
        state[period_start(Period::Day)] = day.millis() as f64;
        state[period_start(Period::Month)] = month.millis() as f64;
        state[total(Window::Day, Metric::Requests)] = 2.0;
        state[total(Window::Day, Metric::Tokens)] = 20.0;
        state[total(Window::Month, Metric::Requests)] = 9.0;
        state[total(Window::Month, Metric::Tokens)] = 90.0;
        let counters = counters_from(Timestamp::from_millis(1_780_000_500_000), &state);
        assert_eq!(
            counters.counts.calendar(Period::Day),
            (
                day,
                Usage {
                    requests: 2,
                    tokens: 20,
                    ..Usage::default()
                }
            )
        );
        assert_eq!(
            counters.counts.calendar(Period::Month),
            (
                month,
                Usage {
                    requests: 9,
                    tokens: 90,
                    ..Usage::default()
                }
            )
        );
    }
}
