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
//! `cargo run --release --example end_users -- [--users 1000000]`

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
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--users" => users = args.next().and_then(|n| n.parse().ok()).expect("--users N"),
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
            scoped.matching(None, &ScopeValues::of(None, Some(value)))[0]
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
