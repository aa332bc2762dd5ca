//! Proof of cost accuracy: a mixed workload through two instances sharing
//! Redis (chat answers and streams with and without `include_usage`, the
//! Responses API plain and streamed, embeddings, legacy completions,
//! answers with cached prompt tokens, a dated snapshot, the `flex` and
//! `priority` tiers and a priority request served at the standard tier, a
//! model of an operator's price file) costs, in
//! quotawatch's status, history and metrics, exactly what an independent
//! pricing of the usage the upstream sent says: equal to the nano-dollar,
//! per model and in total. The independent pricing reads the same price
//! files with `serde_json` and nothing of quotawatch's pricing code.
//! Needs `QUOTAWATCH_TEST_REDIS_URL` and `QUOTAWATCH_TEST_DATABASE_URL`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Map, Value, json};

use crate::instances::Cluster;
use crate::support::{TestServer, UPSTREAM_KEY, Upstream, eventually};

/// A model only the operator's price file knows, priced below a
/// nano-dollar per token: each call's cost has a fraction of a nano-dollar,
/// which the charge rounds up call by call.
const OPERATORS_MODEL: &str = "acme-instruct";

const OPERATORS_PRICES: &str = r#"{
    "acme-instruct": {"input_cost_per_token": 1.5e-10, "output_cost_per_token": 3.3e-10, "mode": "completion"}
}"#;

/// Prices in whole pico-dollars per token, read from the price files as
/// they are written: the built-in table with the operator's entries laid
/// over it.
struct PriceFile(Map<String, Value>);

impl PriceFile {
    fn read() -> Self {
        let built_in = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/prices/openai-models.json"
        ))
        .expect("the built-in price file");
        let mut entries: Map<String, Value> =
            serde_json::from_str(&built_in).expect("a JSON object");
        let own: Map<String, Value> = serde_json::from_str(OPERATORS_PRICES).expect("JSON");
        entries.extend(own);
        Self(entries)
    }

    /// The entry of `model`: its own, else its dated snapshot's base name's
    /// (`gpt-4.1-mini-2025-04-14` is `gpt-4.1-mini`).
    fn entry(&self, model: &str) -> &Map<String, Value> {
        let dated = model.len() > 11
            && model[model.len() - 11..].bytes().enumerate().all(|(i, b)| {
                matches!(i, 0 | 5 | 8) == (b == b'-') && (b == b'-' || b.is_ascii_digit())
            });
        let base = if dated {
            &model[..model.len() - 11]
        } else {
            model
        };
        [model, base]
            .into_iter()
            .find_map(|name| self.0.get(name))
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("{model} has a price"))
    }

    /// The rate of `field` for `tier` (the field with `_flex` or
    /// `_priority` appended where the file has it), in pico-dollars.
    fn rate(&self, model: &str, field: &str, tier: &str) -> Option<u64> {
        let entry = self.entry(model);
        let tiered = format!("{field}_{tier}");
        let usd = entry
            .get(&tiered)
            .or_else(|| entry.get(field))?
            .as_f64()
            .expect("a number");
        Some((usd * 1e12).round() as u64)
    }

    /// What OpenAI bills for one answer's `usage` of `model` at `tier`, in
    /// nano-dollars, rounded up as a budget charges it: uncached prompt
    /// tokens at the input rate, cached ones at the cached rate, completion
    /// tokens (reasoning included) at the output rate.
    fn billed(&self, model: &str, tier: &str, usage: &Value) -> u64 {
        let count = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| usage.pointer(name).and_then(Value::as_u64))
                .unwrap_or(0)
        };
        let prompt = count(&["/prompt_tokens", "/input_tokens"]);
        let cached = count(&[
            "/prompt_tokens_details/cached_tokens",
            "/input_tokens_details/cached_tokens",
        ]);
        let completion = count(&["/completion_tokens", "/output_tokens"]);
        let input = self
            .rate(model, "input_cost_per_token", tier)
            .expect("an input rate");
        let cached_rate = self
            .rate(model, "cache_read_input_token_cost", tier)
            .unwrap_or(input);
        let output = self.rate(model, "output_cost_per_token", tier).unwrap_or(0);
        let pico = (prompt - cached) * input + cached * cached_rate + completion * output;
        pico.div_ceil(1_000)
    }
}

/// What the upstream billed, by model, in nano-dollars, and the tokens it
/// reported in all, from the usage the mock recorded sending.
async fn billed_by_upstream(
    upstream: &Upstream,
    prices: &PriceFile,
) -> (BTreeMap<String, u64>, u64) {
    let recorded = upstream.usage().await;
    let mut by_model = BTreeMap::new();
    let mut tokens = 0;
    for answer in recorded["answers"].as_array().expect("answers") {
        let model = answer["model"].as_str().expect("model");
        let tier = answer["service_tier"].as_str().expect("tier");
        let count = answer["count"].as_u64().expect("count");
        let usage = &answer["usage"];
        *by_model.entry(model.to_owned()).or_default() += count * prices.billed(model, tier, usage);
        let total = usage["total_tokens"].as_u64().expect("total_tokens");
        tokens += count * total;
    }
    (by_model, tokens)
}

/// Dollars as quotawatch shows them, in nano-dollars.
fn nano(dollars: f64) -> u64 {
    (dollars * 1e9).round() as u64
}

/// A JSON number of dollars, in nano-dollars.
fn nano_of(dollars: &Value) -> u64 {
    nano(
        dollars
            .as_f64()
            .unwrap_or_else(|| panic!("dollars, got {dollars}")),
    )
}

/// One call of the workload: the endpoint, its body, and the mock's
/// scenario.
struct Call {
    path: &'static str,
    body: Value,
    scenario: &'static str,
}

fn chat(model: &str, extra: Value) -> Value {
    let mut body =
        json!({"model": model, "messages": [{"role": "user", "content": "Hello there"}]});
    body.as_object_mut()
        .expect("object")
        .extend(extra.as_object().cloned().unwrap_or_default());
    body
}

fn workload() -> Vec<Call> {
    let call = |path, body, scenario| Call {
        path,
        body,
        scenario,
    };
    vec![
        call("/chat/completions", chat("gpt-4o-mini", json!({})), "ok"),
        // A dated snapshot with its own entry, at the priority tier.
        call(
            "/chat/completions",
            chat(
                "gpt-4o-mini-2024-07-18",
                json!({"service_tier": "priority"}),
            ),
            "ok",
        ),
        // Cached prompt tokens at the flex tier, whose cached rate is half a
        // nano-dollar a token.
        call(
            "/chat/completions",
            chat(
                "gpt-5",
                json!({"service_tier": "flex", "max_completion_tokens": 400}),
            ),
            "usage_details",
        ),
        // A tier whose entry prices only the input apart: cached and output
        // tokens at the standard rates.
        call(
            "/chat/completions",
            chat("gpt-5-nano", json!({"service_tier": "priority"})),
            "usage_details",
        ),
        call(
            "/chat/completions",
            chat(
                "gpt-4.1",
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
            "ok",
        ),
        // Priority asked for, the standard tier served (past the priority
        // ramp limit): billed at the standard rates.
        call(
            "/chat/completions",
            chat("gpt-4.1-mini", json!({"service_tier": "priority"})),
            "standard_tier",
        ),
        call(
            "/chat/completions",
            chat(
                "gpt-4.1-mini",
                json!({"service_tier": "priority", "stream": true}),
            ),
            "standard_tier",
        ),
        call(
            "/responses",
            json!({"model": "gpt-4.1-mini", "input": "Say hi", "stream": true, "service_tier": "priority"}),
            "standard_tier",
        ),
        // Streams that did not ask for usage: quotawatch asks for it.
        call(
            "/chat/completions",
            chat("gpt-4o", json!({"stream": true})),
            "ok",
        ),
        // A snapshot newer than the table, priced as its base model.
        call(
            "/chat/completions",
            chat(
                "o4-mini-2026-09-30",
                json!({"stream": true, "service_tier": "flex"}),
            ),
            "usage_details",
        ),
        call(
            "/responses",
            json!({"model": "gpt-4.1-2025-04-14", "input": "Say hi"}),
            "ok",
        ),
        call(
            "/responses",
            json!({"model": "gpt-5-mini", "input": "Say hi", "stream": true, "service_tier": "priority"}),
            "usage_details",
        ),
        call(
            "/responses",
            json!({"model": "o3", "input": "Say hi", "stream": true}),
            "ok",
        ),
        call(
            "/embeddings",
            json!({"model": "text-embedding-3-small", "input": "Hello there"}),
            "ok",
        ),
        call(
            "/completions",
            json!({"model": OPERATORS_MODEL, "prompt": "Say hi", "max_tokens": 16}),
            "ok",
        ),
    ]
}

/// Sends `call` through `server` and reads its answer to the end, as a
/// client does; answers whether the client saw a usage object.
async fn send(server: &TestServer, key: &str, call: &Call) -> bool {
    let path = format!("{}?mock_scenario={}", call.path, call.scenario);
    let response = server.openai(&path, key, call.body.clone()).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", call.body);
    let text = response.text().await.expect("the whole body");
    text.contains("\"usage\":{") || text.contains("\"usage\": {")
}

/// The cost counters of `server`'s metrics, by model, in nano-dollars.
async fn metered(server: &TestServer) -> BTreeMap<String, u64> {
    let text = server.metrics().await;
    text.lines()
        .filter_map(|line| {
            let rest =
                line.strip_prefix("quotawatch_cost_usd_total{workspace=\"accurate\",model=\"")?;
            let (model, value) = rest.split_once("\"} ")?;
            Some((model.to_owned(), nano(value.parse().ok()?)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_workload_on_two_instances_costs_what_the_upstream_billed_to_the_nano_dollar() {
    let calls = workload();
    let upstream = Upstream::strict().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let price_file = dir.path().join("prices.json");
    std::fs::write(&price_file, OPERATORS_PRICES).expect("write");
    let price_path = price_file.display().to_string();
    // Every model of the workload gets its own label in the metrics.
    let models: BTreeSet<&str> = calls
        .iter()
        .filter_map(|call| call.body["model"].as_str())
        .collect();
    let models = models.into_iter().collect::<Vec<_>>().join(",");
    let Some(cluster) = Cluster::start(
        "accuracy::mixed_workload",
        false,
        &[
            ("QUOTAWATCH_UPSTREAM_URL", upstream.url.as_str()),
            ("OPENAI_API_KEY", UPSTREAM_KEY),
            ("QUOTAWATCH_PRICES_FILE", &price_path),
            ("QUOTAWATCH_METRICS_MODELS", &models),
        ],
    )
    .await
    else {
        return;
    };
    let key = cluster
        .workspace(json!({"id": "accurate", "limits": {
            "requests_per_minute": 10_000, "requests_per_day": 100_000,
            "usd_per_day": 100, "usd_per_month": 1000}}))
        .await;

    // Every call three times, spread over both instances, all at once.
    let servers = [&cluster.a, &cluster.b];
    let sends = (0..3).flat_map(|round| {
        calls
            .iter()
            .enumerate()
            .map(move |(i, call)| (round, i, call))
    });
    let sends = sends.map(|(round, i, call)| {
        let server = servers[(i + round) % 2];
        let key = &key;
        async move { (call, send(server, key, call).await) }
    });
    for (call, saw_usage) in futures_util::future::join_all(sends).await {
        let asked = call.body.pointer("/stream_options/include_usage") == Some(&json!(true));
        let streamed = call.body["stream"] == json!(true);
        if call.path == "/chat/completions" && streamed {
            assert_eq!(
                saw_usage, asked,
                "a chat stream carries usage only when its client asked: {}",
                call.body
            );
        }
    }

    let prices = PriceFile::read();
    let (expected, tokens) = billed_by_upstream(&upstream, &prices).await;
    let answered: u64 = upstream.usage().await["answers"]
        .as_array()
        .expect("answers")
        .iter()
        .map(|answer| answer["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        answered,
        3 * calls.len() as u64,
        "every answer carried usage"
    );
    let total: u64 = expected.values().sum();
    assert_eq!(
        expected[OPERATORS_MODEL],
        3 * 2,
        "each call of 1,740 pico-dollars is charged 2 nano-dollars"
    );

    // Settlement follows the end of each body: the shared counters hold
    // every token the upstream reported once it is done.
    let status = eventually(
        "every call settled in the shared counters",
        Duration::from_secs(10),
        || async {
            let status = cluster.b.status(&key).await;
            (status["usage"]["this_month"]["tokens"] == json!(tokens)).then_some(status)
        },
    )
    .await;
    let usage = &status["usage"];
    assert_eq!(
        (
            nano_of(&usage["this_month"]["usd"]),
            nano_of(&usage["today"]["usd"]),
            nano_of(&status["limits"]["usd_per_month"]["used"]),
        ),
        (total, total, total),
        "the status's spend against {expected:?}"
    );

    let history_total = || async {
        let history = cluster
            .a
            .get("/api/quota/history?window=24h&step=1h", &key)
            .await;
        let points = history.body["points"].as_array()?.clone();
        let spent: u64 = points.iter().map(|point| nano_of(&point["usd"])).sum();
        Some(spent)
    };
    eventually("history's spend", Duration::from_secs(10), || async {
        (history_total().await? == total).then_some(())
    })
    .await;

    let mut by_model = metered(&cluster.a).await;
    for (model, cost) in metered(&cluster.b).await {
        *by_model.entry(model).or_default() += cost;
    }
    assert_eq!(by_model, expected, "spend by model in the metrics");
    cluster.finish().await;
}
