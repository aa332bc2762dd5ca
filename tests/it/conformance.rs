//! Admission conformance: every check runs against the in-process engine and
//! against counters shared in Redis, through the same REST API (and one
//! through the proxy, whose reservations the instance holds), so both
//! backends admit, refuse, settle and block alike. Redis checks need
//! `QUOTAWATCH_TEST_REDIS_URL`; each uses a key prefix of its own.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::redis::{clean, fresh_prefix, server_url};
use crate::support::{
    ADMIN_KEY, TestServer, UPSTREAM_KEY, Upstream, concurrent_checks, eventually, fixture_json,
};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Local,
    Redis,
}

/// A server on one backend, and what to clean up after it.
struct Setup {
    server: TestServer,
    redis: Option<(String, String)>,
}

impl Setup {
    async fn start(backend: Backend, test: &str, settings: &[(&str, &str)]) -> Option<Self> {
        let redis = match backend {
            Backend::Local => None,
            Backend::Redis => Some((server_url(test)?, fresh_prefix())),
        };
        let mut all: Vec<(&str, &str)> = settings.to_vec();
        if let Some((url, prefix)) = &redis {
            all.push(("QUOTAWATCH_REDIS_URL", url));
            all.push(("QUOTAWATCH_REDIS_PREFIX", prefix));
            // Shared test machines can be slow; outages are tested elsewhere.
            all.push(("QUOTAWATCH_REDIS_TIMEOUT", "2s"));
        }
        let server = TestServer::start(&all).await;
        Some(Self { server, redis })
    }

    async fn finish(self) {
        self.server.stop().await;
        if let Some((url, prefix)) = self.redis {
            clean(&url, &prefix).await;
        }
    }
}

/// Runs one check against each backend: the calling module's `Backend`
/// (`Local`, `Redis`), with the check's module path naming it in skip
/// messages. `tests/it/counters.rs` uses it too.
macro_rules! conformance {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn local() {
                super::$name(super::Backend::Local, module_path!()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(super::Backend::Redis, module_path!()).await;
            }
        }
    };
}
pub(crate) use conformance;

fn used(status: &Value, limit: &str) -> u64 {
    status["limits"][limit]["used"]
        .as_u64()
        .unwrap_or_else(|| panic!("{limit} in {status}"))
}

conformance!(a_minute_limit_admits_its_count_then_refuses_with_headers);
async fn a_minute_limit_admits_its_count_then_refuses_with_headers(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 5, "requests_per_day": null}}),
        )
        .await;
    for remaining in (0..5).rev() {
        let admitted = server.check(&key, 10).await;
        assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
        assert_eq!(admitted.body["remaining"]["requests_per_minute"], remaining);
        assert_eq!(
            admitted.header("x-ratelimit-remaining-requests"),
            Some(remaining.to_string().as_str())
        );
    }
    let refused = server.check(&key, 10).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["error"]["type"], "requests");
    assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("5"));
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "retry-after {retry_after}");
    assert_ne!(refused.header("x-should-retry"), Some("false"));
    let status = server.status(&key).await;
    assert_eq!(used(&status, "requests_per_minute"), 5);
    assert_eq!(status["status"], "rate_limited");
    assert_eq!(status["errors"]["refused"], 1);
    setup.finish().await;
}

conformance!(admission_is_all_or_nothing_across_limits);
async fn admission_is_all_or_nothing_across_limits(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "limits": {
            "requests_per_minute": 10, "requests_per_day": 100,
            "tokens_per_minute": 1000, "tokens_per_day": 5000}}))
        .await;
    assert_eq!(server.check(&key, 900).await.status, StatusCode::OK);
    let refused = server.check(&key, 200).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["error"]["type"], "tokens");
    assert_eq!(server.check(&key, 50).await.status, StatusCode::OK);
    let status = server.status(&key).await;
    assert_eq!(
        used(&status, "requests_per_minute"),
        2,
        "the refusal charged nothing"
    );
    assert_eq!(used(&status, "requests_per_day"), 2);
    assert_eq!(used(&status, "tokens_per_minute"), 950);
    assert_eq!(used(&status, "tokens_per_day"), 950);
    setup.finish().await;
}

conformance!(a_request_larger_than_a_limit_is_refused_for_good);
async fn a_request_larger_than_a_limit_is_refused_for_good(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"tokens_per_minute": 1000}}))
        .await;
    let refused = server.check(&key, 1500).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    let status = server.status(&key).await;
    assert_eq!(used(&status, "tokens_per_minute"), 0);
    assert_eq!(used(&status, "requests_per_minute"), 0);
    setup.finish().await;
}

conformance!(a_day_limit_refuses_without_retry_until_local_midnight);
async fn a_day_limit_refuses_without_retry_until_local_midnight(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "timezone": "Asia/Kolkata",
            "limits": {"requests_per_minute": null, "requests_per_day": 2}}))
        .await;
    for _ in 0..2 {
        assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    }
    let refused = server.check(&key, 0).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    let status = server.status(&key).await;
    assert_eq!(status["status"], "quota_exceeded");
    let resets_at = status["limits"]["requests_per_day"]["resets_at"]
        .as_str()
        .expect("resets_at");
    // Midnight in Kolkata (UTC+05:30) is 18:30 UTC.
    assert!(resets_at.contains("T18:30:00"), "{resets_at}");
    setup.finish().await;
}

conformance!(a_month_limit_refuses_without_retry_until_the_local_month_ends);
async fn a_month_limit_refuses_without_retry_until_the_local_month_ends(
    backend: Backend,
    test: &str,
) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "timezone": "Asia/Kolkata",
            "limits": {"requests_per_minute": null, "requests_per_day": null,
                "tokens_per_day": 5000, "tokens_per_month": 1000}}))
        .await;
    let admitted = server.check(&key, 600).await;
    assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    assert_eq!(admitted.body["remaining"]["tokens_per_month"], 400);
    // The month is the tightest token limit, so the headers report it.
    assert_eq!(admitted.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(admitted.header("x-ratelimit-remaining-tokens"), Some("400"));
    let refused = server.check(&key, 500).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["error"]["type"], "tokens");
    assert_eq!(refused.error_code(), "monthly_limit_exceeded");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    let status = server.status(&key).await;
    assert_eq!(used(&status, "tokens_per_month"), 600);
    assert_eq!(status["usage"]["this_month"]["tokens"], 600);
    // The month ends at midnight in Kolkata (UTC+05:30) on the first of the
    // next month: 18:30 UTC on the last day of this one.
    let resets_at = status["limits"]["tokens_per_month"]["resets_at"]
        .as_str()
        .expect("resets_at");
    let kolkata: chrono_tz::Tz = "Asia/Kolkata".parse().expect("zone");
    let now =
        quotawatch::domain::time::Timestamp::from_millis(chrono::Utc::now().timestamp_millis());
    let (_, month_end) = quotawatch::domain::time::Period::Month.bounds(now, kolkata);
    assert_eq!(resets_at, month_end.to_rfc3339());
    assert!(resets_at.contains("T18:30:00"), "{resets_at}");
    let metrics = server.metrics().await;
    for line in [
        r#"quotawatch_refusals_total{workspace="acme",limit="tokens_per_month"} 1"#,
        r#"quotawatch_limit_utilization{workspace="acme",limit="tokens_per_month"} 0.6"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // Settled for less, the month has room again.
    let report = json!({"reservation_id": admitted.body["reservation_id"],
        "usage": {"prompt_tokens": 60, "completion_tokens": 40}});
    let settled = server.post("/api/quota/usage", &key, report).await;
    assert_eq!(settled.status, StatusCode::ACCEPTED, "{:?}", settled.body);
    assert_eq!(used(&settled.body, "tokens_per_month"), 100);
    assert_eq!(server.check(&key, 500).await.status, StatusCode::OK);
    setup.finish().await;
}

conformance!(settlement_replaces_the_estimate_once);
async fn settlement_replaces_the_estimate_once(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"tokens_per_minute": 10000, "tokens_per_day": 100000}}),
        )
        .await;
    let admitted = server.check(&key, 500).await;
    assert_eq!(admitted.status, StatusCode::OK);
    let reservation = admitted.body["reservation_id"].clone();
    let report = json!({"reservation_id": reservation, "model": "gpt-4o-mini",
        "usage": {"prompt_tokens": 60, "completion_tokens": 40}});
    let settled = server.post("/api/quota/usage", &key, report.clone()).await;
    assert_eq!(settled.status, StatusCode::ACCEPTED, "{:?}", settled.body);
    assert_eq!(used(&settled.body, "tokens_per_minute"), 100);
    assert_eq!(used(&settled.body, "tokens_per_day"), 100);
    let again = server.post("/api/quota/usage", &key, report).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.error_code(), "reservation_not_found");
    let status = server.status(&key).await;
    assert_eq!(used(&status, "tokens_per_day"), 100, "settled once only");
    assert_eq!(used(&status, "requests_per_day"), 1);
    setup.finish().await;
}

conformance!(a_proxied_call_settles_its_actual_usage);
async fn a_proxied_call_settles_its_actual_usage(backend: Backend, test: &str) {
    let upstream = Upstream::strict().await;
    let proxying = [
        ("QUOTAWATCH_UPSTREAM_URL", upstream.url.as_str()),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
    ];
    let Some(setup) = Setup::start(backend, test, &proxying).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"tokens_per_minute": 100000, "tokens_per_day": 1000000}}))
        .await;
    // Estimated at its prompt plus max_tokens, more than it will use.
    let chat = json!({"model": "gpt-4o-mini", "max_tokens": 500,
        "messages": [{"role": "user", "content": "Say hello"}]});
    let response = server.openai("/chat/completions", &key, chat).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.expect("JSON");
    let actual = answer["usage"]["total_tokens"].as_u64().expect("usage");
    assert!(actual < 500);
    let status = eventually("the call to settle", Duration::from_secs(10), || async {
        let status = server.status(&key).await;
        (used(&status, "tokens_per_day") == actual).then_some(status)
    })
    .await;
    assert_eq!(used(&status, "tokens_per_minute"), actual);
    assert_eq!(used(&status, "requests_per_day"), 1);
    setup.finish().await;
}

conformance!(a_report_without_reservation_counts_even_beyond_the_limits);
async fn a_report_without_reservation_counts_even_beyond_the_limits(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 1, "requests_per_day": null}}),
        )
        .await;
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    let report = json!({"usage": {"prompt_tokens": 7, "completion_tokens": 3}});
    let counted = server.post("/api/quota/usage", &key, report).await;
    assert_eq!(counted.status, StatusCode::ACCEPTED, "{:?}", counted.body);
    let status = server.status(&key).await;
    assert_eq!(used(&status, "requests_per_minute"), 2);
    setup.finish().await;
}

conformance!(a_reset_clears_counters_and_blocks);
async fn a_reset_clears_counters_and_blocks(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 2, "requests_per_day": null}}),
        )
        .await;
    for _ in 0..2 {
        assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    }
    let billing = json!({"status_code": 429,
        "error": fixture_json("error_429_insufficient_quota.json")["error"]});
    server.post("/api/quota/usage", &key, billing).await;
    assert_eq!(
        server.check(&key, 0).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let reset = server
        .post("/api/quota/reset", ADMIN_KEY, json!({"workspace": "acme"}))
        .await;
    assert_eq!(reset.status, StatusCode::OK, "{:?}", reset.body);
    let status = server.status(&key).await;
    assert_eq!(status["status"], "normal", "{status}");
    assert_eq!(used(&status, "requests_per_minute"), 0);
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    let status = server.status(&key).await;
    assert_eq!(
        status["status"], "normal",
        "no hold after a reset: {status}"
    );
    setup.finish().await;
}

conformance!(a_reset_sets_back_what_it_is_told);
async fn a_reset_sets_back_what_it_is_told(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 100, "requests_per_day": null}}),
        )
        .await;
    let block = || async {
        let billing = json!({"status_code": 429,
            "error": fixture_json("error_429_insufficient_quota.json")["error"]});
        server.post("/api/quota/usage", &key, billing).await;
    };
    let reset = |what: &'static str| async move {
        let reset = server
            .post(
                "/api/quota/reset",
                ADMIN_KEY,
                json!({"workspace": "acme", "what": what}),
            )
            .await;
        assert_eq!(reset.status, StatusCode::OK, "{:?}", reset.body);
        assert_eq!(reset.body["what"], what);
    };
    for _ in 0..3 {
        assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    }
    block().await;
    // The usage alone: counts back to zero, the billing block stays.
    reset("usage").await;
    let status = server.status(&key).await;
    assert_eq!(used(&status, "requests_per_minute"), 0, "{status}");
    assert_eq!(
        status["billing_block"]["code"], "insufficient_quota",
        "{status}"
    );
    assert_eq!(
        server.check(&key, 0).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The block alone: requests pass again, the counts stay (the report
    // and the refusal above counted as requests, the check below too).
    reset("block").await;
    let status = server.status(&key).await;
    assert!(status["billing_block"].is_null(), "{status}");
    assert_eq!(status["status"], "normal", "{status}");
    let counted = used(&status, "requests_per_minute");
    assert_eq!(server.check(&key, 0).await.status, StatusCode::OK);
    assert_eq!(
        used(&server.status(&key).await, "requests_per_minute"),
        counted + 1,
        "lifting the block keeps the counts"
    );
    let notifications = server
        .get("/api/quota/notifications?include=history", &key)
        .await
        .body;
    let billing = notifications["notifications"]
        .as_array()
        .expect("notifications")
        .iter()
        .find(|n| n["kind"] == "upstream_quota_exhausted")
        .expect("the billing notification")
        .clone();
    assert!(
        !billing["resolved_at"].is_null(),
        "resolved when the block is lifted: {billing}"
    );
    let unknown = server
        .post(
            "/api/quota/reset",
            ADMIN_KEY,
            json!({"workspace": "acme", "what": "everything"}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
    setup.finish().await;
}

conformance!(an_exhausted_billing_quota_blocks_without_retry);
async fn an_exhausted_billing_quota_blocks_without_retry(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server.workspace(json!({"id": "acme"})).await;
    let admitted = server.check(&key, 10).await;
    let billing = json!({"reservation_id": admitted.body["reservation_id"], "status_code": 429,
        "error": fixture_json("error_429_insufficient_quota.json")["error"]});
    let reported = server.post("/api/quota/usage", &key, billing).await;
    assert_eq!(reported.body["status"], "quota_exceeded");
    let refused = server.check(&key, 0).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["error"]["type"], "insufficient_quota");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    assert_eq!(refused.header("retry-after"), None);
    let status = server.status(&key).await;
    assert_eq!(status["billing_block"]["code"], "insufficient_quota");
    setup.finish().await;
}

conformance!(a_transient_upstream_rate_limit_holds_requests_until_it_frees);
async fn a_transient_upstream_rate_limit_holds_requests_until_it_frees(
    backend: Backend,
    test: &str,
) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server.workspace(json!({"id": "acme"})).await;
    let admitted = server.check(&key, 10).await;
    let limited = json!({"reservation_id": admitted.body["reservation_id"], "status_code": 429,
        "error": fixture_json("error_429_rate_limit_requests.json")["error"],
        "headers": {"retry-after": "30"}});
    server.post("/api/quota/usage", &key, limited).await;
    let refused = server.check(&key, 0).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!(
        (28..=30).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert_eq!(server.status(&key).await["status"], "rate_limited");
    setup.finish().await;
}

conformance!(concurrent_checks_never_exceed_the_limit);
async fn concurrent_checks_never_exceed_the_limit(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 50, "requests_per_day": null}}),
        )
        .await;
    let (admitted, refused) = concurrent_checks(&[server], &key, 200).await;
    assert_eq!((admitted, refused), (50, 150));
    let status = server.status(&key).await;
    assert_eq!(used(&status, "requests_per_minute"), 50);
    assert_eq!(status["errors"]["refused"], 150);
    setup.finish().await;
}

/// What `limit` counts, in dollars: usd limits are shown in dollars.
fn dollars_used(status: &Value, limit: &str) -> f64 {
    status["limits"][limit]["used"]
        .as_f64()
        .unwrap_or_else(|| panic!("{limit} in {status}"))
}

/// A check whose cost estimate is `prompt` prompt tokens at the model's
/// input rate and `completion` tokens at its output rate.
async fn priced_check(
    server: &TestServer,
    key: &str,
    model: &str,
    prompt: u64,
    completion: u64,
) -> crate::support::Response {
    let check = json!({"model": model, "estimated_tokens": prompt + completion,
        "estimated_prompt_tokens": prompt});
    server.post("/api/quota/check", key, check).await
}

conformance!(a_budget_refuses_when_the_estimated_cost_would_cross_it);
async fn a_budget_refuses_when_the_estimated_cost_would_cross_it(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"usd_per_day": 0.01}}))
        .await;
    // 10,000 prompt tokens of gpt-4o-mini at $0.15/M: $0.0015 each.
    for _ in 0..6 {
        let admitted = priced_check(server, &key, "gpt-4o-mini", 10_000, 0).await;
        assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    }
    let last = priced_check(server, &key, "gpt-4o-mini", 0, 0).await;
    assert_eq!(last.status, StatusCode::OK, "{:?}", last.body);
    assert_eq!(last.body["remaining"]["usd_per_day"], json!(0.001));
    let refused = priced_check(server, &key, "gpt-4o-mini", 10_000, 0).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "workspace_budget_exceeded");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    let message = refused.body["error"]["message"].as_str().expect("message");
    assert!(message.contains("$0.009 of $0.01 used today"), "{message}");
    let status = server.status(&key).await;
    assert_eq!(dollars_used(&status, "usd_per_day"), 0.009);
    assert_eq!(status["limits"]["usd_per_day"]["limit"], json!(0.01));
    assert_eq!(status["usage"]["today"]["usd"], json!(0.009));
    assert_eq!(
        used(&status, "requests_per_day"),
        7,
        "the refusal charged nothing"
    );
    setup.finish().await;
}

conformance!(a_budget_is_charged_with_every_other_limit_or_not_at_all);
async fn a_budget_is_charged_with_every_other_limit_or_not_at_all(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"tokens_per_day": 5000, "usd_per_day": 0.001}}))
        .await;
    // 4,000 prompt tokens at $0.15/M: $0.0006.
    let first = priced_check(server, &key, "gpt-4o-mini", 4_000, 0).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    // 1,000 completion tokens at $0.60/M fit the tokens, not the budget.
    let over_budget = priced_check(server, &key, "gpt-4o-mini", 0, 1_000).await;
    assert_eq!(over_budget.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(over_budget.error_code(), "workspace_budget_exceeded");
    // 1,500 prompt tokens fit the budget, not the tokens.
    let over_tokens = priced_check(server, &key, "gpt-4o-mini", 1_500, 0).await;
    assert_eq!(over_tokens.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(over_tokens.error_code(), "daily_limit_exceeded");
    let status = server.status(&key).await;
    assert_eq!(used(&status, "tokens_per_day"), 4_000);
    assert_eq!(dollars_used(&status, "usd_per_day"), 0.0006);
    assert_eq!(used(&status, "requests_per_day"), 1);
    setup.finish().await;
}

conformance!(a_settlement_replaces_the_estimated_cost_with_the_exact_cost);
async fn a_settlement_replaces_the_estimated_cost_with_the_exact_cost(
    backend: Backend,
    test: &str,
) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"usd_per_day": 1}}))
        .await;
    // 1,000 prompt tokens at $0.15/M and 500 at $0.60/M: $0.00045.
    let admitted = priced_check(server, &key, "gpt-4o-mini", 1_000, 500).await;
    assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    assert_eq!(
        dollars_used(&server.status(&key).await, "usd_per_day"),
        0.00045
    );
    // 600 uncached prompt tokens, 400 cached at $0.075/M, 500 completion
    // tokens: $0.00042.
    let report = json!({"reservation_id": admitted.body["reservation_id"], "model": "gpt-4o-mini",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 400}}});
    let settled = server.post("/api/quota/usage", &key, report).await;
    assert_eq!(settled.status, StatusCode::ACCEPTED, "{:?}", settled.body);
    assert_eq!(dollars_used(&settled.body, "usd_per_day"), 0.00042);
    assert_eq!(settled.body["usage"]["this_month"]["usd"], json!(0.00042));
    setup.finish().await;
}

conformance!(a_proxied_call_is_charged_its_estimated_then_its_exact_cost);
async fn a_proxied_call_is_charged_its_estimated_then_its_exact_cost(backend: Backend, test: &str) {
    let upstream = Upstream::strict().await;
    let proxying = [
        ("QUOTAWATCH_UPSTREAM_URL", upstream.url.as_str()),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
    ];
    let Some(setup) = Setup::start(backend, test, &proxying).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "limits": {"usd_per_day": 0.0005}}))
        .await;
    // Two choices of 500 completion tokens at $0.60/M: $0.0006, more than
    // the whole budget.
    let chat = |n: u64| {
        json!({"model": "gpt-4o-mini", "max_tokens": 500, "n": n,
            "messages": [{"role": "user", "content": "Say hello"}]})
    };
    let refused = server.openai("/chat/completions", &key, chat(2)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused
            .headers()
            .get("x-should-retry")
            .map(|value| value.as_bytes()),
        Some(b"false".as_slice())
    );
    let response = server.openai("/chat/completions", &key, chat(1)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.expect("JSON");
    // The fixture's 19 prompt tokens at $0.15/M and 10 completion tokens
    // at $0.60/M: $0.00000885.
    assert_eq!(
        (
            &answer["usage"]["prompt_tokens"],
            &answer["usage"]["completion_tokens"]
        ),
        (&json!(19), &json!(10))
    );
    eventually("the call to settle", Duration::from_secs(10), || async {
        let status = server.status(&key).await;
        (dollars_used(&status, "usd_per_day") == 0.00000885).then_some(())
    })
    .await;
    setup.finish().await;
}

conformance!(an_unpriced_model_is_charged_the_fallback_and_notified_once);
async fn an_unpriced_model_is_charged_the_fallback_and_notified_once(backend: Backend, test: &str) {
    let fallback = [("QUOTAWATCH_UNPRICED_MODEL_RATE", "1,2")];
    let Some(setup) = Setup::start(backend, test, &fallback).await else {
        return;
    };
    let server = &setup.server;
    let key = server.workspace(json!({"id": "acme"})).await;
    // 1,000 prompt tokens at the fallback's $1/M, twice, without a budget.
    for _ in 0..2 {
        let admitted = priced_check(server, &key, "acme-llm-7", 1_000, 0).await;
        assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    }
    let priced = priced_check(server, &key, "gpt-4o-mini", 0, 0).await;
    assert_eq!(priced.status, StatusCode::OK, "{:?}", priced.body);
    let status = server.status(&key).await;
    assert_eq!(status["usage"]["today"]["usd"], json!(0.002));
    assert_eq!(status["unpriced_models"], json!(["acme-llm-7"]));
    let notifications = server.get("/api/quota/notifications", &key).await;
    let unpriced: Vec<&Value> = notifications.body["notifications"]
        .as_array()
        .expect("notifications")
        .iter()
        .filter(|notification| notification["kind"] == "unpriced_model")
        .collect();
    assert_eq!(unpriced.len(), 1, "one per model: {unpriced:?}");
    assert_eq!(unpriced[0]["severity"], "warning");
    assert!(
        unpriced[0]["title"]
            .as_str()
            .is_some_and(|title| title.contains("acme-llm-7")),
        "{unpriced:?}"
    );
    assert!(
        unpriced[0]["suggested_actions"][0]
            .as_str()
            .is_some_and(|action| action.contains("QUOTAWATCH_PRICES_FILE")),
        "{unpriced:?}"
    );
    setup.finish().await;
}

/// The active notifications of the workspace, by kind.
async fn active_of_kind(server: &TestServer, key: &str, kind: &str) -> Option<Value> {
    let active = server.get("/api/quota/notifications", key).await;
    active.body["notifications"]
        .as_array()?
        .iter()
        .find(|notification| notification["kind"] == kind)
        .cloned()
}

/// A call of gpt-4o reported after the fact, with its usage.
async fn report_gpt_4o(server: &TestServer, key: &str, prompt: u64, completion: u64) {
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion});
    let reported = server
        .post(
            "/api/quota/usage",
            key,
            json!({"model": "gpt-4o", "usage": usage}),
        )
        .await;
    assert_eq!(reported.status, StatusCode::ACCEPTED, "{:?}", reported.body);
}

conformance!(spend_by_model_shows_and_budget_notifications_name_a_cheaper_model);
async fn spend_by_model_shows_and_budget_notifications_name_a_cheaper_model(
    backend: Backend,
    test: &str,
) {
    let Some(mut setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let key = setup
        .server
        .workspace(json!({"id": "acme", "limits": {"usd_per_day": 1}}))
        .await;
    // 240,000 prompt tokens at $2.50/M and 20,000 completion tokens at
    // $10/M: $0.80, the warning threshold of a $1 budget.
    report_gpt_4o(&setup.server, &key, 240_000, 20_000).await;
    let server = &setup.server;
    let approaching = eventually(
        "the budget_approaching notification",
        Duration::from_secs(10),
        || active_of_kind(server, &key, "budget_approaching"),
    )
    .await;
    assert_eq!(approaching["limit"], "usd_per_day");
    assert!(
        approaching["message"]
            .as_str()
            .expect("message")
            .starts_with(
                "Workspace acme has spent $0.80 of its $1.00 budget (usd_per_day) today (80%)"
            ),
        "{approaching}"
    );
    assert_eq!(
        approaching["suggested_actions"][1],
        "Or move traffic to a cheaper model: gpt-4o-mini costs 6% of gpt-4o for this workload's token mix (gpt-4o's calls today cost $0.80; at gpt-4o-mini's rates they would have cost about $0.048)."
    );
    assert!(
        active_of_kind(server, &key, "approaching_limit")
            .await
            .is_none(),
        "one notification for the condition, not two"
    );

    let status = server.status(&key).await;
    let gpt_4o = json!({"usd": 0.8, "prompt_tokens": 240_000, "cached_tokens": 0, "completion_tokens": 20_000});
    assert_eq!(status["spend"]["today"]["usd"], json!(0.8));
    assert_eq!(
        status["spend"]["today"]["by_model"],
        json!({"gpt-4o": gpt_4o})
    );
    assert_eq!(status["spend"]["this_month"]["by_model"]["gpt-4o"], gpt_4o);
    assert_eq!(status["spend"]["prices_taken"], "2026-12-02");
    let metrics = server.metrics().await;
    for line in [
        "quotawatch_budget_usd{workspace=\"acme\",limit=\"usd_per_day\"} 1.0",
        "quotawatch_budget_spent_usd{workspace=\"acme\",limit=\"usd_per_day\"} 0.8",
        "quotawatch_limit_utilization{workspace=\"acme\",limit=\"usd_per_day\"} 0.8",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }

    // 80,000 more prompt tokens: $0.20, the whole budget.
    report_gpt_4o(server, &key, 80_000, 0).await;
    let exhausted = eventually(
        "the budget_exhausted notification",
        Duration::from_secs(10),
        || active_of_kind(server, &key, "budget_exhausted"),
    )
    .await;
    assert_eq!(exhausted["severity"], "critical");
    let message = exhausted["message"].as_str().expect("message");
    assert!(
        message.starts_with("Workspace acme has spent $1.00 of its $1.00 budget (usd_per_day) today. Requests are refused with HTTP 429 workspace_budget_exceeded"),
        "{message}"
    );
    let raise = exhausted["suggested_actions"][0].as_str().expect("action");
    assert!(
        raise.starts_with("Raise the budget: at the pace so far today's spend reaches $")
            && raise.contains("(PATCH /api/workspaces/acme with {\"limits\":{\"usd_per_day\":"),
        "{raise}"
    );
    assert!(
        exhausted["suggested_actions"][1]
            .as_str()
            .expect("action")
            .contains("gpt-4o-mini costs 6% of gpt-4o"),
        "{exhausted}"
    );
    assert!(
        active_of_kind(server, &key, "daily_quota_exhausted")
            .await
            .is_none()
    );

    // Spend by model outlives a restart: it is read back from history.
    setup.server.restart().await;
    let server = &setup.server;
    let status = server.status(&key).await;
    assert_eq!(
        status["spend"]["today"]["by_model"]["gpt-4o"]["usd"],
        json!(1.0)
    );
    assert_eq!(
        status["spend"]["this_month"]["by_model"]["gpt-4o"]["prompt_tokens"],
        320_000
    );
    setup.finish().await;
}
