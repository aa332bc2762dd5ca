//! Admissions per second through the engine with counters shared in Redis,
//! for `bench/redis.sh`.
//!
//! Loads `--workspaces` workspaces with limits nothing reaches, then keeps
//! `--concurrency` admissions in flight for `--duration`, each one the
//! engine's real path (`Engine::admit`: one script call, the answer loaded
//! into the workspace's state). Redis's own count of script calls is read
//! before and after, to show how many round trips an admission takes.
//!
//! Each admission leaves its reservation open for `--reservation-ttl`
//! (default 5 s, a chat completion's time), as the request it admits would
//! be in flight that long; it then expires, as a settlement would remove
//! it. Admissions are the proxy's: the instance holds each reservation, and
//! expires it on its ticker as the server does. With `--settled-anywhere`
//! they are the REST API's, whose reservations Redis records for any
//! instance to settle and expires itself: Redis then holds as many open
//! reservations as a real deployment at that rate. With `--settle`, each
//! admission is settled right after, as the proxy does when a call ends:
//! the numbers are then whole requests (admission and settlement), which
//! share calls too.
//!
//! Workspaces carry the four request and token limits per minute and per
//! day (`benches/support/limits.rs`, as the engine's benchmark does). With
//! `--budgets` they also carry `usd_per_day` and `usd_per_month`, and each
//! admission's estimate is priced as the proxy prices it. With
//! `--model-limits` they also carry three limits on the called model; a
//! server counting in Redis refuses such workspaces until the script counts
//! scoped limits, and so does this run (it stops with that error).
//!
//! Prints one JSON line: admissions, admissions/s, script calls per
//! admission, p50/p99 latency in ms.
//!
//! `cargo run --release --example shared_admissions -- --redis URL
//!  [--concurrency 64] [--workspaces 100] [--duration 5s] [--reservation-ttl 5s] [--settle]
//!  [--settled-anywhere] [--budgets] [--model-limits]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use quotawatch::domain::limits::{WorkspaceConfig, WorkspaceId};
use quotawatch::domain::price::{Tier, TokenCounts};
use quotawatch::domain::scope::ScopeValues;
use quotawatch::domain::window::Usage;
use quotawatch::domain::workspace::{Model, Request, Settings};
use quotawatch::engine::{
    Counters, Engine, OnStoreError, SystemClock, TokenUsage, UpstreamAnswer, UsageReport,
    WorkspaceDefaults,
};
use quotawatch::redis::RedisCounters;
use quotawatch::store::Catalog;

#[path = "../benches/support/limits.rs"]
mod limits;

struct Args {
    redis: String,
    concurrency: usize,
    workspaces: usize,
    duration: Duration,
    reservation_ttl: Duration,
    settle: bool,
    settled_anywhere: bool,
    budgets: bool,
    model_limits: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        redis: "redis://127.0.0.1:6379".to_owned(),
        concurrency: 64,
        workspaces: 100,
        duration: Duration::from_secs(5),
        reservation_ttl: Duration::from_secs(5),
        settle: false,
        settled_anywhere: false,
        budgets: false,
        model_limits: false,
    };
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--settle" => {
                parsed.settle = true;
                continue;
            }
            "--settled-anywhere" => {
                parsed.settled_anywhere = true;
                continue;
            }
            "--budgets" => {
                parsed.budgets = true;
                continue;
            }
            "--model-limits" => {
                parsed.model_limits = true;
                continue;
            }
            _ => {}
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--redis" => parsed.redis = value.clone(),
            "--concurrency" => parsed.concurrency = number()?.max(1),
            "--workspaces" => parsed.workspaces = number()?.max(1),
            "--duration" | "--reservation-ttl" => {
                let duration = quotawatch::domain::time::parse_duration(&value)
                    .ok_or_else(|| format!("{value:?} is not a duration"))?;
                if flag == "--duration" {
                    parsed.duration = duration;
                } else {
                    parsed.reservation_ttl = duration;
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(parsed)
}

impl Args {
    fn config(&self, id: WorkspaceId) -> WorkspaceConfig {
        let limits = if self.budgets {
            limits::with_budgets()
        } else {
            limits::four()
        };
        let mut config = WorkspaceConfig::new(id, limits);
        if self.model_limits {
            config.scoped_limits = limits::model_rules();
        }
        config
    }

    /// What an admission is charged: one request and 100 tokens, and with
    /// `--budgets` their cost, priced as the proxy prices an estimate.
    fn estimate(&self, engine: &Engine) -> Usage {
        let tokens = TokenCounts {
            prompt: 80,
            cached: 0,
            completion: 20,
        };
        if self.budgets {
            engine
                .pricing()
                .usage(Some(limits::MODEL), tokens, Tier::Standard)
        } else {
            Usage::call(tokens.prompt + tokens.completion)
        }
    }
}

/// Redis's count of script and function calls (`EVALSHA`, `EVAL`, `FCALL`)
/// so far.
async fn script_calls(client: &redis::Client) -> Result<u64, redis::RedisError> {
    let mut connection = client.get_multiplexed_async_connection().await?;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await?;
    Ok(stats
        .lines()
        .filter(|line| {
            ["cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_fcall:"]
                .iter()
                .any(|command| line.starts_with(command))
        })
        .filter_map(|line| {
            line.split(['=', ','])
                .nth(1)
                .and_then(|calls| calls.parse::<u64>().ok())
        })
        .sum())
}

async fn remove_keys(client: &redis::Client, prefix: &str) -> Result<(), redis::RedisError> {
    let mut connection = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await?;
    for chunk in keys.chunks(1000) {
        // UNLINK: the reservations hash of a long run is large, and DEL would
        // free it while Redis waits.
        let _: () = redis::cmd("UNLINK")
            .arg(chunk)
            .query_async(&mut connection)
            .await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let prefix = format!("qwbench:{:08x}:", rand::random::<u32>());
    let counters = RedisCounters::new(&args.redis, &prefix, Duration::from_secs(2))?;
    let mut engine = Engine::new(
        Settings {
            reservation_ttl: args.reservation_ttl,
            ..Settings::default()
        },
        WorkspaceDefaults {
            limits: limits::four(),
            warn_at: 0.8,
        },
        Arc::new(SystemClock),
    );
    engine.count_in(Counters::redis(counters, OnStoreError::Closed));
    let ids: Vec<WorkspaceId> = (0..args.workspaces)
        .map(|i| format!("bench{i:05}").parse().expect("valid id"))
        .collect();
    engine.load(
        Catalog {
            generation: 1,
            workspaces: ids.iter().map(|id| args.config(id.clone())).collect(),
            keys: vec![],
        },
        Default::default(),
        vec![],
    );
    let engine = Arc::new(engine);
    let ids = Arc::new(ids);
    let estimate = args.estimate(&engine);
    // The model is named where a limit needs it: a budget to price the
    // call, a limit on models to select it.
    let model: Option<Model> = (args.budgets || args.model_limits).then(|| limits::MODEL.into());
    // Warm up: the script is loaded once and connections are open.
    engine.admit(&ids[0], Request::default()).await?;

    let client = redis::Client::open(args.redis.as_str())?;
    let calls_before = script_calls(&client).await?;
    let started = Instant::now();
    let deadline = started + args.duration;
    // The server's ticker, which expires the reservations held here.
    let ticker = tokio::spawn({
        let engine = engine.clone();
        async move {
            let mut interval = tokio::time::interval(Duration::from_millis(250));
            loop {
                interval.tick().await;
                engine.tick();
            }
        }
    });
    let workers: Vec<_> = (0..args.concurrency)
        .map(|worker| {
            let engine = engine.clone();
            let ids = ids.clone();
            let model = model.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut next = worker;
                while Instant::now() < deadline {
                    let id = &ids[next % ids.len()];
                    next += args.concurrency;
                    let sent = Instant::now();
                    let decision = engine
                        .admit(
                            id,
                            Request {
                                scoped: ScopeValues::default(),
                                estimate,
                                model: model.clone(),
                                settled_anywhere: args.settled_anywhere,
                            },
                        )
                        .await;
                    let admitted = decision
                        .ok()
                        .and_then(|decision| decision.result.ok())
                        .expect("admitted");
                    if args.settle {
                        let report = UsageReport {
                            reservation: Some(admitted.id),
                            model: model.clone(),
                            tokens: Some(TokenUsage {
                                prompt: 60,
                                completion: 20,
                                ..TokenUsage::default()
                            }),
                            answer: Some(UpstreamAnswer {
                                status: 200,
                                error_type: None,
                                error_code: None,
                                error_message: None,
                                headers: Default::default(),
                                billing: Default::default(),
                            }),
                            latency_ms: None,
                            ..UsageReport::default()
                        };
                        engine.settle(id, report).await.expect("settled");
                    }
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await?);
    }
    let elapsed = started.elapsed();
    ticker.abort();
    let calls = script_calls(&client).await? - calls_before;
    remove_keys(&client, &prefix).await?;

    latencies.sort();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies
            .get(index)
            .map_or(0.0, |latency| latency.as_secs_f64() * 1000.0)
    };
    let admissions = latencies.len();
    println!(
        "{{\"admissions\":{admissions},\"per_second\":{:.0},\"script_calls_per_admission\":{:.3},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}}",
        admissions as f64 / elapsed.as_secs_f64(),
        calls as f64 / admissions.max(1) as f64,
        percentile(0.5),
        percentile(0.99),
    );
    Ok(())
}
