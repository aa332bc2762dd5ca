//! The cost of admission plus settlement, with 10,000 workspaces loaded.
//!
//! `cargo bench --bench engine` prints nanoseconds per operation, each for
//! two kinds of workspace ([`Limited`]): `Four`, the request and token
//! limits per minute and per day that every earlier measurement had, and
//! `BudgetsAndModels`, the same with budgets per day and per month and
//! three limits on models, so that one run shows what money limits cost
//! beside them:
//! - `domain_admit_settle`: the pure core alone (one workspace's state);
//! - `engine_check_report_hot`: the same on one busy workspace, whose state
//!   stays in the CPU cache;
//! - `engine_check`: admission alone through the engine, cycling over all
//!   workspaces;
//! - `engine_check_report`: the engine's request path (lookup, lock,
//!   admission, headroom for headers, settlement with usage priced, rollup),
//!   cycling over all workspaces so caches do not flatter it;
//! - `engine_check_report_threads`: the same from several threads at once.
//!
//! Each admission's estimate is priced as the proxy prices it (a call is
//! charged its cost whether or not its workspace has a budget), and each
//! settlement names the model, so both kinds pay for pricing alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quotawatch::domain::limits::{WorkspaceConfig, WorkspaceId};
use quotawatch::domain::price::{Tier, TokenCounts};
use quotawatch::domain::scope::ScopeValues;
use quotawatch::domain::time::Timestamp;
use quotawatch::domain::workspace::{Answer, Model, Outcome, Request, Settings, WorkspaceState};
use quotawatch::engine::{
    Engine, SystemClock, TokenUsage, UpstreamAnswer, UsageReport, WorkspaceDefaults,
};
use quotawatch::store::Catalog;

#[path = "support/limits.rs"]
mod limits;

use limits::MODEL;

const WORKSPACES: usize = 10_000;

fn main() {
    divan::main();
}

/// Which limits every workspace carries (see `support/limits.rs`).
#[derive(Clone, Copy, Debug)]
enum Limited {
    /// Requests and tokens per minute and per day.
    Four,
    /// The four, `usd_per_day` and `usd_per_month`, and three limits on
    /// models that the benchmark's model falls under.
    BudgetsAndModels,
}

const KINDS: [Limited; 2] = [Limited::Four, Limited::BudgetsAndModels];

impl Limited {
    fn config(self, id: WorkspaceId) -> WorkspaceConfig {
        let mut config = match self {
            Limited::Four => WorkspaceConfig::new(id, limits::four()),
            Limited::BudgetsAndModels => {
                let mut config = WorkspaceConfig::new(id, limits::with_budgets());
                config.scoped_limits = limits::model_rules();
                config
            }
        };
        config.timezone = "Europe/Berlin".parse().expect("zone");
        config
    }
}

fn loaded_engine(limited: Limited) -> (Arc<Engine>, Vec<WorkspaceId>) {
    let defaults = WorkspaceDefaults {
        limits: limits::four(),
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
        workspaces: ids.iter().map(|id| limited.config(id.clone())).collect(),
        keys: vec![],
    };
    engine.load(catalog, Default::default(), vec![]);
    (engine, ids)
}

/// An admission of the benchmark's model, its estimate priced as the
/// proxy prices it: 1,000 prompt tokens and 200 of completion allowance.
fn request(engine: &Engine, model: &Model) -> Request {
    Request {
        estimate: engine.pricing().usage(
            Some(model),
            TokenCounts {
                prompt: 1000,
                cached: 0,
                completion: 200,
            },
            Tier::Standard,
        ),
        model: Some(model.clone()),
        scoped: ScopeValues::default(),
        ..Request::default()
    }
}

fn one_round(engine: &Engine, id: &WorkspaceId, model: &Model) {
    let decision = engine
        .admit_here(id, request(engine, model))
        .expect("known workspace");
    let reservation = decision.result.expect("admitted");
    engine
        .settle_here(
            id,
            UsageReport {
                reservation: Some(reservation.id),
                model: Some(model.clone()),
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

#[divan::bench(args = KINDS)]
fn domain_admit_settle(bencher: divan::Bencher, limited: Limited) {
    let config = limited.config("acme".parse().expect("id"));
    let settings = Settings::default();
    let start = 1_780_000_000_000i64;
    let mut state = WorkspaceState::new(config, Timestamp::from_millis(start));
    let model: Model = MODEL.into();
    let engine = Engine::new(
        Settings::default(),
        WorkspaceDefaults {
            limits: limits::four(),
            warn_at: 0.8,
        },
        Arc::new(SystemClock),
    );
    let admission = request(&engine, &model);
    let counts = TokenCounts {
        prompt: 800,
        cached: 0,
        completion: 150,
    };
    let used = engine.pricing().usage(Some(&model), counts, Tier::Standard);
    let mut next = 0u64;
    let mut now = start;
    bencher.bench_local(|| {
        now += 1;
        let at = Timestamp::from_millis(now);
        let mut fresh = || {
            next += 1;
            next
        };
        let admitted = state.admit(&admission, at, &settings, &mut fresh);
        let outcome = Outcome {
            scoped: None,
            reservation: Some(admitted.result.expect("admitted").id),
            usage: Some(used),
            answer: Some(Answer::success()),
            tokens: Some(counts),
        };
        state.record(&outcome, at, &settings, &mut fresh)
    });
}

#[divan::bench(args = KINDS)]
fn engine_check_report(bencher: divan::Bencher, limited: Limited) {
    let (engine, ids) = loaded_engine(limited);
    let model: Model = MODEL.into();
    let mut i = 0usize;
    bencher.bench_local(|| {
        i = (i + 7919) % ids.len();
        one_round(&engine, &ids[i], &model);
    });
}

/// Admission and settlement on one busy workspace among the 10,000: its
/// state stays in the CPU cache, as a busy tenant's does.
#[divan::bench(args = KINDS)]
fn engine_check_report_hot(bencher: divan::Bencher, limited: Limited) {
    let (engine, ids) = loaded_engine(limited);
    let model: Model = MODEL.into();
    bencher.bench_local(|| one_round(&engine, &ids[4242], &model));
}

/// Admission alone, cycling over all workspaces (reservations are left to
/// expire).
#[divan::bench(args = KINDS)]
fn engine_check(bencher: divan::Bencher, limited: Limited) {
    let (engine, ids) = loaded_engine(limited);
    let model: Model = MODEL.into();
    let mut i = 0usize;
    bencher.bench_local(|| {
        i = (i + 7919) % ids.len();
        engine
            .admit_here(&ids[i], request(&engine, &model))
            .expect("known workspace")
    });
}

#[divan::bench(threads = [2, 4], args = KINDS)]
fn engine_check_report_threads(bencher: divan::Bencher, limited: Limited) {
    let (engine, ids) = loaded_engine(limited);
    let model: Model = MODEL.into();
    let cursor = AtomicUsize::new(0);
    bencher.bench(|| {
        let i = cursor.fetch_add(7919, Ordering::Relaxed) % ids.len();
        one_round(&engine, &ids[i], &model);
    });
}
