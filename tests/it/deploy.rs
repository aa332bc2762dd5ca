//! What `deploy/` ships for Prometheus and Grafana: the alerting rules are
//! valid and fire when their tests say (`promtool`, needs
//! `QUOTAWATCH_TEST_PROMTOOL`), and every metric the rules and the dashboard
//! name is one the binary exports.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use quotawatch::mock::MockOptions;
use serde_json::json;

use crate::alerts_delivery::Receiver;
use crate::support::{ADMIN_KEY, Upstream, eventually, output_of, proxied, test_tool};

fn deployed(path: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    (path, text)
}

/// The `quotawatch_*` names a text mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("quotawatch_") {
        let name: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[start + name.len()..];
        names.insert(name);
    }
    names
}

/// The sample names an exposition's families give: `name_total` for a
/// counter, `name_bucket`, `_sum` and `_count` for a histogram, the name
/// itself for a gauge.
fn exported(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(declared) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = declared.split_whitespace();
        let (Some(family), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{family}{suffix}")));
    }
    names
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_name_is_exported() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[("QUOTAWATCH_METRICS_MODELS", "gpt-4o-mini")],
        json!({"id": "acme", "limits": {"requests_per_minute": 2, "usd_per_day": 100}}),
    )
    .await;
    // A family appears in the exposition once it has a sample: a success,
    // an upstream error and a refusal give the request families one, and
    // the budget its gauges.
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    for path in [
        "/chat/completions",
        "/chat/completions?mock_scenario=server_error",
        "/chat/completions",
    ] {
        server
            .openai(path, &key, chat.clone())
            .await
            .text()
            .await
            .expect("body");
    }
    // A test alert gives the delivery attempts theirs.
    let receiver = Receiver::start(&[]).await;
    let channel = server
        .post(
            "/api/alerts/channels",
            ADMIN_KEY,
            json!({"name": "ops", "type": "webhook", "url": receiver.url}),
        )
        .await;
    let sent = server
        .post(
            "/api/alerts/test",
            ADMIN_KEY,
            json!({"channel": channel.body["id"]}),
        )
        .await;
    assert_eq!(
        sent.body["attempt"]["outcome"], "delivered",
        "{:?}",
        sent.body
    );
    let exposition = eventually("every family", Duration::from_secs(5), || async {
        let text = server.metrics().await;
        (text.contains("quotawatch_refusals_total")
            && text.contains("quotawatch_tokens_total")
            && text.contains("quotawatch_alert_delivery_attempts_total"))
        .then_some(text)
    })
    .await;
    let exports = exported(&exposition);
    for file in [
        "prometheus/alerts.yml",
        "prometheus/alerts_test.yml",
        "grafana/quotawatch.json",
    ] {
        let (_, text) = deployed(file);
        let named = metric_names(&text);
        assert!(!named.is_empty(), "{file} names metrics");
        let unknown: Vec<&String> = named.difference(&exports).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the binary does not export: {unknown:?}"
        );
    }
    let (_, dashboard) = deployed("grafana/quotawatch.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|panels| panels.len() >= 8)
    );
    server.stop().await;
}

#[tokio::test]
async fn the_alerting_rules_are_valid_and_fire_as_their_tests_say() {
    let Some(promtool) = test_tool("QUOTAWATCH_TEST_PROMTOOL", "promtool (Debian's prometheus)")
    else {
        return;
    };
    let (rules, _) = deployed("prometheus/alerts.yml");
    let checked = output_of(
        tokio::process::Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(&rules),
    )
    .await;
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    let directory = rules.parent().expect("a directory");
    let tested = output_of(
        tokio::process::Command::new(&promtool)
            .current_dir(directory)
            .args(["test", "rules", "alerts_test.yml"]),
    )
    .await;
    assert!(tested.contains("SUCCESS"), "{tested}");
}
