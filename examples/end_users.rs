//! What per-user scoped limits cost in memory, in this process: the
//! counters of a per-user rule (a minute and a day limit) charged once for
//! each of `--users` distinct end users, as admissions charge them, and the
//! resident set read before, while every user is in its minute, and after
//! the ticker's eviction once their windows are clear.
//!
//! Prints one JSON line: users, bytes per tracked user, users tracked and
//! bytes per user left after eviction. Reservations (which any admission
//! holds while its call runs, scoped or not) are left out: they are the
//! same with or without scoped limits.
//!
//! With `--redis URL`, the same rule is counted in that Redis instead,
//! each user admitted once through the script as an instance admits them
//! (in batches, keys under a prefix of their own, deleted afterwards): it
//! prints the growth of Redis's `used_memory` per user, and the keys and
//! time to live a user's counter has.
//!
//! `cargo run --release --example end_users -- [--users 1000000] [--redis redis://127.0.0.1:6379]`

use quotawatch::domain::limits::{Limits, REQUESTS_PER_MINUTE, TOKENS_PER_DAY};
use quotawatch::domain::scope::{
    RuleInput, ScopeBook, ScopeKind, ScopeValue, ScopeValues, ScopedLimits,
};
use quotawatch::domain::time::{Period, Timestamp};
use quotawatch::domain::window::{Calendars, Usage};

/// The resident set of this process, in bytes (Linux).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|pages| pages.parse().ok())
        .expect("resident pages");
    pages * 4096
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut users: u64 = 1_000_000;
    let mut redis_url = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--users" => users = args.next().and_then(|n| n.parse().ok()).expect("--users N"),
            "--redis" => redis_url = Some(args.next().expect("--redis URL")),
            other => panic!("unknown argument {other}"),
        }
    }
    let mut limits = Limits::default();
    limits.set(REQUESTS_PER_MINUTE, Some(10));
    limits.set(TOKENS_PER_DAY, Some(100_000));
    let scoped = ScopedLimits::validate(&[RuleInput {
        kind: Some(ScopeKind::User),
        listed: None,
        limits,
    }])
    .expect("valid rule");
    let rule = scoped.rules()[0].id;
    if let Some(url) = redis_url {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(in_redis(&url, users, &scoped));
        return;
    }
    // Noon UTC, so that the day does not end while users are charged.
    let start = Timestamp::from_millis(1_777_896_000_000);
    let calendars = Calendars::new(start, chrono_tz::Tz::UTC);
    let mut book = ScopeBook::default();
    book.follow(&scoped);
    // The values are made before measuring, as the edge makes them before
    // the engine sees them; only their keys are kept, as matching keeps them.
    let scopes: Vec<_> = (0..users)
        .map(|user| {
            let value = ScopeValue::parse(ScopeKind::User, &format!("user-{user}")).expect("id");
            scoped.matching(None, &ScopeValues::of(Some(value)))[0]
        })
        .collect();
    let before = resident_bytes();
    for (n, scope) in scopes.iter().enumerate() {
        // A thousand users a second: every one is still in its minute.
        let now = Timestamp::from_millis(start.millis() + n as i64 / 1000);
        book.charge(scope, Usage::call(10), now, &limits, &calendars);
    }
    let charged = resident_bytes();
    let tracked = book.summary(rule).tracked;
    // Every user's windows are clear once the day is over; the ticker
    // evicts 10,000 a tick.
    let day_end = calendars.get(Period::Day).end;
    let mut ticks = 0;
    while book.summary(rule).tracked > 0 {
        book.evict(Timestamp::from_millis(day_end.millis() + ticks * 250));
        ticks += 1;
    }
    let evicted = resident_bytes();
    let per_user = |bytes: u64| bytes.saturating_sub(before) as f64 / users as f64;
    println!(
        "{{\"users\":{users},\"tracked\":{tracked},\"bytes_per_user\":{:.0},\"ticks_to_evict\":{ticks},\"tracked_after_eviction\":{},\"bytes_per_user_after_eviction\":{:.0}}}",
        per_user(charged),
        book.summary(rule).tracked,
        per_user(evicted),
    );
    drop(scopes);
}

/// Redis's `used_memory`, in bytes.
async fn used_memory(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(connection)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|bytes| bytes.trim().parse().ok())
        .expect("used_memory")
}

/// Admits each of `users` once under the per-user rule of `scoped`, with
/// the counters in the Redis at `url`, and prints what Redis holds per
/// user.
async fn in_redis(url: &str, users: u64, scoped: &ScopedLimits) {
    use futures_util::StreamExt;
    use quotawatch::domain::limits::WorkspaceId;
    use quotawatch::redis::{AdmitArgs, RedisCounters, ScopeCharge};
    let prefix = format!("qw-end-users-{}:", std::process::id());
    let counters =
        RedisCounters::new(url, &prefix, std::time::Duration::from_secs(5)).expect("Redis URL");
    let client = redis::Client::open(url).expect("Redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let workspace: WorkspaceId = "acme".parse().expect("id");
    let rule = &scoped.rules()[0];
    let workspace_limits = Limits::default();
    let admit = |user: u64| {
        let (counters, workspace) = (&counters, &workspace);
        let value = ScopeValue::parse(ScopeKind::User, &format!("user-{user}")).expect("id");
        let charge = ScopeCharge {
            rule: rule.id,
            value: scoped.matching(None, &ScopeValues::of(Some(value)))[0].key,
            limits: rule.limits,
        };
        let workspace_limits = &workspace_limits;
        async move {
            let scopes = [charge];
            let args = AdmitArgs {
                limits: workspace_limits,
                estimate: Usage::call(10),
                reservation: user,
                reservation_ttl: std::time::Duration::from_secs(600),
                probe_interval: std::time::Duration::from_secs(60),
                model: None,
                scopes: &scopes,
                record: false,
            };
            let now = Timestamp::from_millis(chrono::Utc::now().timestamp_millis());
            let (admitted, _) = counters
                .admit(workspace, chrono_tz::Tz::UTC, now, args)
                .await
                .expect("admitted in Redis");
            assert!(admitted.is_some(), "every user has room");
        }
    };
    // One admission first, so that the workspace's own state is there
    // before measuring.
    admit(users).await;
    let before = used_memory(&mut connection).await;
    futures_util::stream::iter(0..users)
        .map(admit)
        .buffer_unordered(512)
        .collect::<Vec<()>>()
        .await;
    let after = used_memory(&mut connection).await;
    // SCAN rather than KEYS, which blocks a shared Redis.
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}scope1:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut connection)
            .await
            .expect("SCAN");
        keys.extend(found);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let user_key = keys
        .iter()
        .find(|key| key.rsplit(':').next().is_some_and(|last| last.len() == 32))
        .expect("a user's counter");
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(user_key)
        .query_async(&mut connection)
        .await
        .expect("PTTL");
    println!(
        "{{\"users\":{users},\"redis_bytes_per_user\":{:.0},\"keys\":{},\"user_key_bytes\":{},\"user_key_ttl_ms\":{ttl_ms}}}",
        after.saturating_sub(before) as f64 / users as f64,
        keys.len(),
        user_key.len(),
    );
    for chunk in keys.chunks(10_000) {
        let _: () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut connection)
            .await
            .expect("DEL");
    }
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}state3:acme"))
        .query_async(&mut connection)
        .await
        .expect("DEL");
}
