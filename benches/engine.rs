//! The cost of admission plus settlement, with 10,000 workspaces loaded.
//!
//! `cargo bench --bench engine` prints nanoseconds per operation:
//! - `domain_admit_settle`: the pure core alone (one workspace's state);
//! - `engine_check_report_hot`: the same on one busy workspace, whose state
//!   stays in the CPU cache;
//! - `engine_check`: admission alone through the engine, cycling over all
//!   workspaces;
//! - `engine_check_report`: the engine's request path (lookup, lock,
//!   admission, headroom for headers, settlement with usage, rollup), cycling
//!   over all workspaces so caches do not flatter it;
//! - `engine_check_report_threads`: the same from several threads at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quotawatch::domain::limits::{
    Limits, REQUESTS_PER_DAY, REQUESTS_PER_MINUTE, TOKENS_PER_DAY, TOKENS_PER_MINUTE,
    WorkspaceConfig, WorkspaceId,
};
use quotawatch::domain::time::Timestamp;
use quotawatch::domain::window::Usage;
use quotawatch::domain::workspace::{Answer, Model, Outcome, Request, Settings, WorkspaceState};
use quotawatch::engine::{
    Engine, SystemClock, TokenUsage, UpstreamAnswer, UsageReport, WorkspaceDefaults,
};
use quotawatch::store::Catalog;

const WORKSPACES: usize = 10_000;

fn main() {
    divan::main();
}

/// Limits high enough that nothing is refused: the benchmark measures the
/// admitted path, which is the common one. Today's four (requests and tokens
/// over the sliding minute and the day), as every earlier measurement had, so
/// that figures compare across versions.
fn limits() -> Limits {
    let mut limits = Limits::default();
    for kind in [
        REQUESTS_PER_MINUTE,
        REQUESTS_PER_DAY,
        TOKENS_PER_MINUTE,
        TOKENS_PER_DAY,
    ] {
        limits.set(kind, Some(u64::MAX / 4));
    }
    limits
}

fn loaded_engine() -> (Arc<Engine>, Vec<WorkspaceId>) {
    let defaults = WorkspaceDefaults {
        limits: limits(),
        warn_at: 0.8,
    };
    let engine = Arc::new(Engine::new(
        Settings::default(),
        defaults,
        Arc::new(SystemClock),
    ));
    let ids: Vec<WorkspaceId> = (0..WORKSPACES)
        .map(|i| format!("ws{i:05}").parse().expect("id"))
        .collect();
    let catalog = Catalog {
        generation: 1,
        workspaces: ids
            .iter()
            .map(|id| {
                let mut config = WorkspaceConfig::new(id.clone(), limits());
                config.timezone = "Europe/Berlin".parse().expect("zone");
                config
            })
            .collect(),
        keys: vec![],
    };
    engine.load(catalog, Default::default(), vec![]);
    (engine, ids)
}

fn one_round(engine: &Engine, id: &WorkspaceId, model: &Model) {
    let decision = engine
        .admit_here(
            id,
            Request {
                estimate: Usage::call(1200),
                model: Some(model.clone()),
                ..Request::default()
            },
        )
        .expect("known workspace");
    let reservation = decision.result.expect("admitted");
    engine
        .settle_here(
            id,
            UsageReport {
                reservation: Some(reservation.id),
                tokens: Some(TokenUsage {
                    prompt: 800,
                    completion: 150,
                    cached: 0,
                    reasoning: 0,
                }),
                answer: Some(UpstreamAnswer {
                    status: 200,
                    ..UpstreamAnswer::default()
                }),
                ..UsageReport::default()
            },
        )
        .expect("settled");
}

#[divan::bench]
fn domain_admit_settle(bencher: divan::Bencher) {
    let config = WorkspaceConfig::new("acme".parse().expect("id"), limits());
    let settings = Settings::default();
    let start = 1_780_000_000_000i64;
    let mut state = WorkspaceState::new(config, Timestamp::from_millis(start));
    let mut next = 0u64;
    let mut now = start;
    bencher.bench_local(|| {
        now += 1;
        let at = Timestamp::from_millis(now);
        let mut fresh = || {
            next += 1;
            next
        };
        let request = Request {
            estimate: Usage::call(1200),
            model: None,
            ..Request::default()
        };
        let admission = state.admit(&request, at, &settings, &mut fresh);
        let outcome = Outcome {
            scoped: Default::default(),
            reservation: Some(admission.result.expect("admitted").id),
            usage: Some(Usage::call(950)),
            answer: Some(Answer::success()),
            tokens: None,
        };
        state.record(&outcome, at, &settings, &mut fresh)
    });
}

#[divan::bench]
fn engine_check_report(bencher: divan::Bencher) {
    let (engine, ids) = loaded_engine();
    let model: Model = "gpt-4o-mini".into();
    let mut i = 0usize;
    bencher.bench_local(|| {
        i = (i + 7919) % ids.len();
        one_round(&engine, &ids[i], &model);
    });
}

/// Admission and settlement on one busy workspace among the 10,000: its
/// state stays in the CPU cache, as a busy tenant's does.
#[divan::bench]
fn engine_check_report_hot(bencher: divan::Bencher) {
    let (engine, ids) = loaded_engine();
    let model: Model = "gpt-4o-mini".into();
    bencher.bench_local(|| one_round(&engine, &ids[4242], &model));
}

/// Admission alone, cycling over all workspaces (reservations are left to
/// expire).
#[divan::bench]
fn engine_check(bencher: divan::Bencher) {
    let (engine, ids) = loaded_engine();
    let model: Model = "gpt-4o-mini".into();
    let mut i = 0usize;
    bencher.bench_local(|| {
        i = (i + 7919) % ids.len();
        engine
            .admit_here(
                &ids[i],
                Request {
                    estimate: Usage::call(1200),
                    model: Some(model.clone()),
                    ..Request::default()
                },
            )
            .expect("known workspace")
    });
}

#[divan::bench(threads = [2, 4])]
fn engine_check_report_threads(bencher: divan::Bencher) {
    let (engine, ids) = loaded_engine();
    let model: Model = "gpt-4o-mini".into();
    let cursor = AtomicUsize::new(0);
    bencher.bench(|| {
        let i = cursor.fetch_add(7919, Ordering::Relaxed) % ids.len();
        one_round(&engine, &ids[i], &model);
    });
}
