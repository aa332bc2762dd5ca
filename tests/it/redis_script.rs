//! The Redis script's own rules, called through `RedisCounters` directly:
//! every key expires by itself, billing blocks last beyond the day, a late
//! lift cannot undo a newer block, unsettled reservations expire into the
//! history of their own workspace whichever call finds them (with their
//! model, however it is named), a reset
//! charges requests in flight only what they use from then on, each second
//! of the minute keeps its own count, a reservation settled twice at once
//! is settled once, one the instance holds is never recorded and settles by
//! what it charged, a flood of WebSocket tickets leaves no more in Redis
//! than the instance keeps, the first instance to raise a cause names its
//! episode for all until the last lets go, and a credential's billing block
//! keeps the first start any instance wrote and lets one instance probe per
//! interval. Needs `QUOTAWATCH_TEST_REDIS_URL`.

use std::time::Duration;

use quotawatch::domain::limits::{LimitKind, Limits, Metric, Window, WorkspaceId};
use quotawatch::domain::status::Cause;
use quotawatch::domain::time::{Period, Timestamp};
use quotawatch::domain::upstream::BillingCode;
use quotawatch::domain::window::Usage;
use quotawatch::domain::workspace::{BillingBlock, ResetScope};
use quotawatch::redis::{
    AdmitArgs, BillingChange, BlockChange, EpisodeStep, Held, RedisCounters, Reply,
};

use crate::support::eventually;
use crate::support::redis::{clean, fresh_prefix, keys, server_url};

struct Store {
    counters: RedisCounters,
    url: String,
    prefix: String,
    workspace: WorkspaceId,
}

impl Store {
    fn open(test: &str) -> Option<Self> {
        let url = server_url(test)?;
        let prefix = fresh_prefix();
        let counters =
            RedisCounters::new(&url, &prefix, Duration::from_secs(2)).expect("Redis URL");
        Some(Self {
            counters,
            url,
            prefix,
            workspace: "acme".parse().expect("id"),
        })
    }

    fn now() -> Timestamp {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock");
        Timestamp::from_millis(since_epoch.as_millis() as i64)
    }

    /// Admits `tokens` into `workspace` with reservation `id`, recorded
    /// for any instance to settle.
    async fn admit(&self, workspace: &WorkspaceId, id: u64, tokens: u64, ttl: Duration) -> Reply {
        self.admit_model(workspace, id, tokens, ttl, true, "gpt-4o-mini")
            .await
    }

    async fn admit_model(
        &self,
        workspace: &WorkspaceId,
        id: u64,
        tokens: u64,
        ttl: Duration,
        record: bool,
        model: &str,
    ) -> Reply {
        let limits = Limits::default();
        let args = AdmitArgs {
            limits: &limits,
            estimate: Usage::call(tokens),
            reservation: id,
            reservation_ttl: ttl,
            probe_interval: Duration::from_secs(60),
            model: Some(model),
            scopes: &[],
            record,
        };
        let (admitted, reply) = self
            .counters
            .admit(workspace, chrono_tz::UTC, Self::now(), args)
            .await
            .expect("admit");
        assert!(admitted.is_some(), "admitted");
        reply
    }

    /// The workspace's counters as they are, changing nothing.
    async fn peek(&self) -> Reply {
        self.counters
            .peek(&self.workspace, chrono_tz::UTC, Self::now(), &[])
            .await
            .expect("peek")
    }

    async fn block(&self, billing: BillingChange) -> Option<BillingBlock> {
        let change = BlockChange {
            hold_until: None,
            billing,
        };
        let reply = self
            .counters
            .block(&self.workspace, chrono_tz::UTC, Self::now(), change)
            .await
            .expect("block");
        reply.counters.blocks.billing
    }

    /// Milliseconds until each of the workspace's keys expires.
    async fn lifetimes(&self) -> Vec<(String, i64)> {
        let (mut connection, keys) = keys(&self.url, &format!("{}*", self.prefix)).await;
        let mut lifetimes = Vec::new();
        for key in keys {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .expect("PTTL");
            lifetimes.push((key, ttl));
        }
        lifetimes.sort();
        lifetimes
    }

    async fn finish(self) {
        clean(&self.url, &self.prefix).await;
    }
}

fn billing(since: Timestamp) -> BillingBlock {
    BillingBlock {
        code: BillingCode::CreditBalanceExhausted,
        since,
        next_probe_at: Timestamp::from_millis(since.millis() + 60_000),
    }
}

#[tokio::test]
async fn every_key_expires_by_itself_and_a_billing_block_outlives_the_day() {
    let Some(store) = Store::open("redis_script::expiry") else {
        return;
    };
    let mut limits = Limits::default();
    limits.set(LimitKind::new(Metric::Requests, Window::Minute), Some(10));
    let args = AdmitArgs {
        limits: &limits,
        estimate: Usage::call(5),
        reservation: 7,
        reservation_ttl: Duration::from_secs(600),
        probe_interval: Duration::from_secs(60),
        model: Some("gpt-4o-mini"),
        scopes: &[],
        record: true,
    };
    let (admitted, _) = store
        .counters
        .admit(&store.workspace, chrono_tz::UTC, Store::now(), args)
        .await
        .expect("admit");
    assert!(admitted.is_some());
    let lifetimes = store.lifetimes().await;
    assert_eq!(
        lifetimes.len(),
        3,
        "state, reservations, expiry: {lifetimes:?}"
    );
    let day = 86_400_000;
    for (key, ttl) in &lifetimes {
        assert!(*ttl > 0 && *ttl <= 2 * day, "{key} lives {ttl} ms");
    }

    store.block(BillingChange::Set(billing(Store::now()))).await;
    let state = store
        .lifetimes()
        .await
        .into_iter()
        .find(|(key, _)| key.contains("state3:"))
        .expect("state key");
    assert!(state.1 > 29 * day, "a billing block lives {} ms", state.1);
    store.finish().await;
}

/// The counters are a function library in Redis, which a restarted Redis
/// (or `FUNCTION FLUSH`) no longer holds: the next call loads it again and
/// is answered, and the counts kept in keys are still there.
#[tokio::test]
async fn a_redis_that_lost_the_counters_library_is_given_it_again_by_the_next_call() {
    let Some(store) = Store::open("redis_script::library_lost") else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let first = store.admit(&store.workspace, 1, 100, ttl).await;
    assert!(first.done, "admitted");
    let (mut connection, _) = keys(&store.url, "none").await;
    let libraries: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("quotawatch_*")
        .query_async(&mut connection)
        .await
        .expect("FUNCTION LIST");
    let names: Vec<String> = library_names(&libraries);
    assert!(!names.is_empty(), "the first call loaded the library");
    for name in &names {
        // Another test's call may have loaded it again meanwhile: deleted
        // or not, it is gone for a moment, which is what this test needs.
        let _: redis::RedisResult<()> = redis::cmd("FUNCTION")
            .arg("DELETE")
            .arg(name)
            .query_async(&mut connection)
            .await;
    }
    let second = store.admit(&store.workspace, 2, 100, ttl).await;
    assert!(second.done, "admitted once the library was loaded again");
    assert_eq!(
        second.counters.counts.calendars[Period::Day.index()].1,
        Usage::call(100) + Usage::call(100),
        "the counts outlived the library"
    );
    store.finish().await;
}

/// The names of the libraries a `FUNCTION LIST` answer describes.
fn library_names(answer: &redis::Value) -> Vec<String> {
    let redis::Value::Array(libraries) = answer else {
        return Vec::new();
    };
    libraries
        .iter()
        .filter_map(|library| {
            let fields: Vec<&redis::Value> = match library {
                redis::Value::Array(fields) => fields.iter().collect(),
                redis::Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => return None,
            };
            fields.chunks_exact(2).find_map(|pair| match pair {
                [
                    redis::Value::BulkString(key),
                    redis::Value::BulkString(name),
                ] if key == b"library_name" => String::from_utf8(name.clone()).ok(),
                _ => None,
            })
        })
        .collect()
}

#[tokio::test]
async fn a_late_lift_does_not_undo_a_newer_billing_block() {
    let Some(store) = Store::open("redis_script::late_lift") else {
        return;
    };
    let first = Store::now();
    let newer = Timestamp::from_millis(first.millis() + 5_000);
    store.block(BillingChange::Set(billing(first))).await;
    // Another instance's probe succeeded and lifted the first block, then a
    // new one began.
    assert_eq!(
        store.block(BillingChange::Lift { since: first }).await,
        None
    );
    store.block(BillingChange::Set(billing(newer))).await;
    // An instance that still saw the first block lifts it late: no effect.
    let after_late_lift = store.block(BillingChange::Lift { since: first }).await;
    assert_eq!(after_late_lift.map(|block| block.since), Some(newer));
    assert_eq!(
        store.block(BillingChange::Lift { since: newer }).await,
        None
    );
    store.finish().await;
}

#[tokio::test]
async fn an_unsettled_reservation_expires_into_its_own_workspace_whoever_finds_it() {
    let Some(store) = Store::open("redis_script::reservation_expiry") else {
        return;
    };
    let other: WorkspaceId = "other".parse().expect("id");
    store
        .admit(&store.workspace, 7, 120, Duration::from_millis(1))
        .await;
    // A call about another workspace finds it expired, and names its owner.
    let expired = eventually(
        "the reservation to expire",
        Duration::from_secs(5),
        || async {
            let reply = store.admit(&other, 8, 1, Duration::from_secs(600)).await;
            (!reply.expired.is_empty()).then_some(reply.expired)
        },
    )
    .await;
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0].workspace, store.workspace);
    let finished = &expired[0].expired;
    assert_eq!(finished.usage.tokens, 120, "the estimate is final");
    assert_eq!(finished.model.as_deref(), Some("gpt-4o-mini"));
    // It is found once, and can no longer be settled.
    let (settled, reply) = store
        .counters
        .settle(
            &store.workspace,
            chrono_tz::UTC,
            Store::now(),
            7,
            Some(Usage::call(10)),
        )
        .await
        .expect("settle");
    assert!(settled.is_none(), "an expired reservation is not settled");
    assert!(reply.expired.is_empty(), "{:?}", reply.expired);
    assert_eq!(
        reply.counters.counts.calendar(Period::Day).1.tokens,
        120,
        "its estimate stays charged"
    );
    store.finish().await;
}

#[tokio::test]
async fn a_recorded_reservation_keeps_a_model_named_with_spaces() {
    let Some(store) = Store::open("redis_script::model_with_spaces") else {
        return;
    };
    // The script takes a recorded reservation as one argument whose last
    // part is the model: a name with spaces is read whole.
    let named = "a model  named with spaces ";
    store
        .admit_model(
            &store.workspace,
            7,
            30,
            Duration::from_millis(1),
            true,
            named,
        )
        .await;
    let expired = eventually(
        "the reservation to expire",
        Duration::from_secs(5),
        || async {
            let reply = store.peek().await;
            (!reply.expired.is_empty()).then_some(reply.expired)
        },
    )
    .await;
    assert_eq!(expired.len(), 1, "{expired:?}");
    let finished = &expired[0].expired;
    assert_eq!(finished.usage.tokens, 30);
    assert_eq!(finished.model.as_deref(), Some(named));
    store.finish().await;
}

#[tokio::test]
async fn a_request_in_flight_over_a_reset_is_charged_what_it_used_since() {
    let Some(store) = Store::open("redis_script::settle_after_reset") else {
        return;
    };
    for id in [7, 8] {
        store
            .admit(&store.workspace, id, 100, Duration::from_secs(600))
            .await;
    }
    let reset = store
        .counters
        .reset(
            &store.workspace,
            chrono_tz::UTC,
            Store::now(),
            ResetScope::All,
        )
        .await
        .expect("reset");
    assert_eq!(reset.counters.counts.calendar(Period::Day).1.tokens, 0);
    let (settled, reply) = store
        .counters
        .settle(
            &store.workspace,
            chrono_tz::UTC,
            Store::now(),
            7,
            Some(Usage::call(30)),
        )
        .await
        .expect("settle");
    let settled = settled.expect("the reservation outlives the reset");
    assert_eq!(
        settled.estimate.tokens, 0,
        "nothing of it counts since the reset"
    );
    assert_eq!(reply.counters.counts.calendar(Period::Day).1.tokens, 30);
    let minute: u64 = reply
        .counters
        .counts
        .minute
        .iter()
        .map(|(_, usage)| usage.tokens)
        .sum();
    assert_eq!(minute, 30);
    // Settled without a count, it keeps its estimate: nothing, since the
    // reset charged nothing of it.
    let (settled, reply) = store
        .counters
        .settle(&store.workspace, chrono_tz::UTC, Store::now(), 8, None)
        .await
        .expect("settle");
    assert_eq!(settled.map(|settled| settled.estimate.tokens), Some(0));
    assert_eq!(reply.counters.counts.calendar(Period::Day).1.tokens, 30);
    assert!(reply.counters.last_reset_us.is_some(), "the reset is known");
    store.finish().await;
}

#[tokio::test]
async fn each_second_keeps_its_own_count_in_the_minute() {
    let Some(store) = Store::open("redis_script::seconds") else {
        return;
    };
    let second = |reply: &Reply| reply.counters.at.millis().div_euclid(1000);
    let first = store
        .admit(&store.workspace, 1, 10, Duration::from_secs(600))
        .await;
    eventually(
        "Redis's clock to reach the next second",
        Duration::from_secs(3),
        || async { (second(&store.peek().await) > second(&first)).then_some(()) },
    )
    .await;
    let next = store
        .admit(&store.workspace, 2, 5, Duration::from_secs(600))
        .await;
    let mut minute = next.counters.counts.minute.clone();
    minute.sort_by_key(|(at, _)| *at);
    let counts: Vec<(i64, u64, u64)> = minute
        .iter()
        .map(|(at, usage)| (*at, usage.requests, usage.tokens))
        .collect();
    assert_eq!(
        counts,
        vec![(second(&first), 1, 10), (second(&next), 1, 5)],
        "an earlier second moves to its slot when a newer one comes"
    );
    store.finish().await;
}

#[tokio::test]
async fn a_reservation_settled_twice_at_once_is_settled_once() {
    let Some(store) = Store::open("redis_script::settled_twice") else {
        return;
    };
    store
        .admit(&store.workspace, 7, 100, Duration::from_secs(600))
        .await;
    let settle = || {
        store.counters.settle(
            &store.workspace,
            chrono_tz::UTC,
            Store::now(),
            7,
            Some(Usage::call(40)),
        )
    };
    // Sent together, they share one call or follow each other.
    let (first, second) = tokio::join!(settle(), settle());
    let (first, second) = (first.expect("settle"), second.expect("settle"));
    let settled = [&first, &second]
        .iter()
        .filter(|(reservation, _)| reservation.is_some())
        .count();
    assert_eq!(settled, 1, "{first:?} {second:?}");
    let day = [
        first.1.counters.counts.calendar(Period::Day).1,
        second.1.counters.counts.calendar(Period::Day).1,
    ]
    .into_iter()
    .map(|used| used.tokens)
    .min();
    assert_eq!(day, Some(40), "the estimate is replaced once");
    store.finish().await;
}

#[tokio::test]
async fn a_held_reservation_is_never_recorded_and_settles_by_what_it_charged() {
    let Some(store) = Store::open("redis_script::held") else {
        return;
    };
    let held = async |id| {
        let reply = store
            .admit_model(
                &store.workspace,
                id,
                100,
                Duration::from_secs(600),
                false,
                "gpt-4o-mini",
            )
            .await;
        Held {
            charged_us: reply.at_us,
            estimate: Usage::call(100),
            scopes: None,
        }
    };
    let settle = async |held, tokens| {
        store
            .counters
            .settle_held(&store.workspace, chrono_tz::UTC, Store::now(), held, tokens)
            .await
            .expect("settle")
            .counters
    };
    let first = held(1).await;
    let keys: Vec<String> = store
        .lifetimes()
        .await
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert!(
        keys.iter().all(|key| !key.contains("reservations")),
        "nothing recorded: {keys:?}"
    );
    let counters = settle(first, Some(Usage::call(40))).await;
    assert_eq!(
        counters.counts.calendar(Period::Day).1.tokens,
        40,
        "the estimate is replaced"
    );
    let minute: u64 = counters
        .counts
        .minute
        .iter()
        .map(|(_, usage)| usage.tokens)
        .sum();
    assert_eq!(minute, 40);
    // Over a reset it counts what it used since, as a recorded one does.
    let in_flight = held(2).await;
    store
        .counters
        .reset(
            &store.workspace,
            chrono_tz::UTC,
            Store::now(),
            ResetScope::All,
        )
        .await
        .expect("reset");
    assert_eq!(
        settle(in_flight, Some(Usage::call(30)))
            .await
            .counts
            .calendar(Period::Day)
            .1
            .tokens,
        30
    );
    let after_reset = held(3).await;
    assert_eq!(
        settle(after_reset, None)
            .await
            .counts
            .calendar(Period::Day)
            .1
            .tokens,
        130,
        "kept, its estimate stays charged"
    );
    store.finish().await;
}

#[tokio::test]
async fn a_flood_of_tickets_leaves_redis_bounded_too() {
    use quotawatch::api::ws::{MAX_LIVE_TICKETS, Tickets};
    let Some(store) = Store::open("a_flood_of_tickets_leaves_redis_bounded_too") else {
        return;
    };
    let counters =
        RedisCounters::new(&store.url, &store.prefix, Duration::from_secs(2)).expect("Redis URL");
    let tickets = Tickets::new(Some(counters.single_use()));
    let now = Store::now();
    let credential = quotawatch::engine::Credential::of("qw_a_flooding_key");
    let (first, _) = tickets.issue(credential.clone(), now).await;
    let mut last = String::new();
    for _ in 0..MAX_LIVE_TICKETS + 100 {
        last = tickets.issue(credential.clone(), now).await.0;
    }
    let (_, stored) = keys(&store.url, &format!("{}ticket:*", store.prefix)).await;
    assert_eq!(
        stored.len(),
        MAX_LIVE_TICKETS,
        "Redis holds no more tickets than the instance"
    );
    assert_eq!(
        tickets.redeem(&first, now).await,
        None,
        "the oldest went from Redis too"
    );
    assert_eq!(tickets.redeem(&last, now).await, Some(credential));
    clean(&store.url, &store.prefix).await;
}

/// Takes `steps` on the episodes of the store's workspace as `instance`.
async fn episodes(store: &Store, instance: &str, steps: &[EpisodeStep]) -> Vec<Option<String>> {
    episodes_held_for(store, instance, Duration::from_secs(5), steps).await
}

async fn episodes_held_for(
    store: &Store,
    instance: &str,
    hold: Duration,
    steps: &[EpisodeStep],
) -> Vec<Option<String>> {
    let steps: Vec<(&WorkspaceId, &EpisodeStep)> =
        steps.iter().map(|step| (&store.workspace, step)).collect();
    store
        .counters
        .agree_episodes(instance, hold, &steps)
        .await
        .expect("the episodes answer")
}

#[tokio::test]
async fn the_first_instance_to_raise_a_cause_names_it_until_the_last_one_lets_go() {
    let Some(store) = Store::open("the_first_instance_to_raise_a_cause_names_it") else {
        return;
    };
    let cause = Cause::Approaching(LimitKind::new(Metric::Requests, Window::Minute));
    let hold = |candidate: &str| EpisodeStep::Hold {
        cause,
        candidate: candidate.to_owned(),
    };
    let release = EpisodeStep::Release { cause };
    let named = |id: &str| vec![Some(id.to_owned())];

    // Both instances raise the cause at once: whichever reaches Redis
    // first names the episode, and the other is told that name.
    let (on_a, on_b) = ([hold("ntf_a")], [hold("ntf_b")]);
    let (a, b) = tokio::join!(episodes(&store, "a", &on_a), episodes(&store, "b", &on_b));
    assert_eq!(a, b);
    assert!(a == named("ntf_a") || a == named("ntf_b"), "{a:?}");
    let episode = a[0].clone().expect("named");
    // Another cause is another episode.
    let exhausted = EpisodeStep::Hold {
        cause: Cause::LimitExhausted(LimitKind::new(Metric::Requests, Window::Minute)),
        candidate: "ntf_c".to_owned(),
    };
    assert_eq!(episodes(&store, "b", &[exhausted]).await, named("ntf_c"));
    // A sees the cause end and come back while B still holds it: the
    // episode goes on, under its name.
    assert_eq!(
        episodes(&store, "a", &[release.clone(), hold("ntf_a2")]).await,
        vec![None, Some(episode.clone())]
    );
    // Once both saw it end, it comes back as a new episode.
    episodes(&store, "a", std::slice::from_ref(&release)).await;
    episodes(&store, "b", std::slice::from_ref(&release)).await;
    assert_eq!(
        episodes(&store, "b", &[hold("ntf_b2")]).await,
        named("ntf_b2")
    );

    // An instance that stops without letting go holds the episode until
    // its hold runs out; then the cause is a new episode.
    let brief = Duration::from_millis(200);
    episodes_held_for(&store, "b", brief, &[hold("ntf_b2")]).await;
    eventually("B's hold to run out", Duration::from_secs(5), || async {
        // Asked by a new instance each time, which lets go at once.
        let instance = format!("probe{}", rand::random::<u32>());
        let steps = [hold("ntf_new"), release.clone()];
        (episodes(&store, &instance, &steps).await[0] == Some("ntf_new".to_owned())).then_some(())
    })
    .await;
    store.finish().await;
}

#[tokio::test]
async fn a_month_limit_is_data_the_script_counts_in_the_workspaces_month() {
    let Some(store) = Store::open("redis_script::month") else {
        return;
    };
    let timezone: chrono_tz::Tz = "Pacific/Auckland".parse().expect("zone");
    let mut limits = Limits::default();
    limits.set(LimitKind::new(Metric::Tokens, Window::Month), Some(1000));
    let admit = |reservation, tokens| AdmitArgs {
        limits: &limits,
        estimate: Usage::call(tokens),
        reservation,
        reservation_ttl: Duration::from_secs(600),
        probe_interval: Duration::from_secs(60),
        model: None,
        scopes: &[],
        record: true,
    };
    let (admitted, reply) = store
        .counters
        .admit(&store.workspace, timezone, Store::now(), admit(1, 600))
        .await
        .expect("admit");
    assert!(admitted.is_some());
    let (month_start, month_end) = Period::Month.bounds(Store::now(), timezone);
    assert_eq!(reply.counters.counts.calendar(Period::Month).0, month_start);
    assert_eq!(reply.counters.counts.calendar(Period::Month).1.tokens, 600);
    assert_eq!(reply.counters.counts.calendar(Period::Day).1.tokens, 600);
    // The month limit has room for 400 more, the estimate of 500 does not fit.
    let (refused, reply) = store
        .counters
        .admit(&store.workspace, timezone, Store::now(), admit(2, 500))
        .await
        .expect("admit");
    assert!(refused.is_none(), "the month limit refuses");
    assert_eq!(
        reply.counters.counts.calendar(Period::Month).1.tokens,
        600,
        "a refusal charges nothing"
    );
    // Settled for less, the month gets the unused tokens back.
    let (_, reply) = store
        .counters
        .settle(
            &store.workspace,
            timezone,
            Store::now(),
            1,
            Some(Usage::call(100)),
        )
        .await
        .expect("settle");
    assert_eq!(reply.counters.counts.calendar(Period::Month).1.tokens, 100);
    let (admitted, _) = store
        .counters
        .admit(&store.workspace, timezone, Store::now(), admit(3, 500))
        .await
        .expect("admit");
    assert!(admitted.is_some(), "room again");
    // A workspace with a month limit keeps its counters until the month ends.
    let state = store
        .lifetimes()
        .await
        .into_iter()
        .find(|(key, _)| key.contains("state3:"))
        .expect("state key");
    let month_left = month_end.millis() - Store::now().millis();
    assert!(
        state.1 >= month_left,
        "lives {} ms, the month {month_left} ms",
        state.1
    );
    let reset = store
        .counters
        .reset(&store.workspace, timezone, Store::now(), ResetScope::Usage)
        .await
        .expect("reset");
    assert_eq!(
        reset.counters.counts.calendar(Period::Month).1,
        Usage::default()
    );
    assert_eq!(
        reset.counters.counts.calendar(Period::Month).0,
        month_start,
        "the month stays"
    );
    store.finish().await;
}

#[tokio::test]
async fn a_credentials_block_keeps_its_first_start_and_one_probe_per_interval() {
    use quotawatch::domain::credential::CredentialId;

    let Some(store) = Store::open("redis_script::credential") else {
        return;
    };
    // A second instance's client on the same Redis.
    let other =
        RedisCounters::new(&store.url, &store.prefix, Duration::from_secs(2)).expect("Redis URL");
    let credential = CredentialId::of("sk-test", None, None);
    let interval = Duration::from_secs(60);
    assert_eq!(
        store.counters.credential_block(&credential, interval).await,
        Ok(None)
    );

    let first = Timestamp::from_millis(1_800_000_000_000);
    let stored = store
        .counters
        .block_credential(&credential, BillingCode::InsufficientQuota, first, interval)
        .await
        .expect("blocked");
    assert_eq!(
        (stored.code, stored.since),
        (BillingCode::InsufficientQuota, first)
    );
    // The other instance met the answer a moment later: the first start
    // stays, which names the block's one notification everywhere.
    let later = other
        .block_credential(
            &credential,
            BillingCode::ProjectSpendLimitExceeded,
            first.plus(Duration::from_millis(5)),
            interval,
        )
        .await
        .expect("blocked");
    assert_eq!(later.since, first);
    let loaded = store
        .counters
        .credential_block(&credential, interval)
        .await
        .expect("read")
        .expect("blocked");
    assert_eq!(loaded.since, first);
    assert!(loaded.probe_in > Duration::ZERO && loaded.probe_in <= interval);

    // Within the interval nobody probes; after it, one instance only.
    let short = Duration::from_millis(200);
    let waiting = store
        .counters
        .take_credential_probe(&credential, short)
        .await
        .expect("asked");
    assert!(waiting.is_some_and(|wait| wait > short), "{waiting:?}");
    store
        .counters
        .lift_credential(&credential)
        .await
        .expect("lifted");
    assert_eq!(
        store.counters.credential_block(&credential, interval).await,
        Ok(None)
    );
    assert_eq!(
        store
            .counters
            .take_credential_probe(&credential, short)
            .await,
        Ok(None),
        "the first to ask probes"
    );
    let second = other
        .take_credential_probe(&credential, short)
        .await
        .expect("asked");
    assert!(second.is_some(), "one probe per interval across instances");
    eventually("the interval to end", Duration::from_secs(5), || async {
        other
            .take_credential_probe(&credential, short)
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await;
    store.finish().await;
}
