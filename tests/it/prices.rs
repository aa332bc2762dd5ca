//! Model prices over the REST API: the built-in table, an operator's file
//! laid over it, and reading that file again (admin call, SIGHUP), where a
//! file that cannot be used leaves the prices in force.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::binary::{self, Server};
use crate::support::{ADMIN_KEY, TestServer, eventually};

fn rates(prices: &Value, model: &str) -> Value {
    prices["models"][model]["standard"].clone()
}

#[tokio::test]
async fn every_key_reads_the_built_in_prices_with_their_date() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let prices = server.get("/api/prices", &key).await;
    assert_eq!(prices.status, StatusCode::OK, "{:?}", prices.body);
    assert_eq!(prices.body["taken"], "2026-12-02");
    assert_eq!(
        rates(&prices.body, "gpt-4o-mini"),
        json!({"input": 0.15, "cached_input": 0.075, "output": 0.6})
    );
    assert_eq!(prices.body["models"]["gpt-4o-mini"]["mode"], "chat");
    assert_eq!(
        prices.body["models"]["gpt-5"]["other"]["flex"]["cached_input"],
        json!(0.0625),
        "half a nano-dollar per token, exactly"
    );
    assert_eq!(
        prices.body["models"]["text-embedding-3-small"]["standard"]["output"],
        json!(0.0)
    );
    let anonymous = server.get("/api/prices", "qw_not_a_key").await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test]
async fn an_operators_file_is_read_again_on_an_admin_call_and_a_broken_one_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("prices.json");
    let price = |input: &str| {
        format!(
            r#"{{"gpt-4o-mini": {{"input_cost_per_token": {input}, "output_cost_per_token": 2e-06}}}}"#
        )
    };
    std::fs::write(&file, price("1e-06")).expect("write");
    let path = file.display().to_string();
    let server = TestServer::start(&[("QUOTAWATCH_PRICES_FILE", &path)]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let read = server.get("/api/prices", &key).await;
    assert_eq!(rates(&read.body, "gpt-4o-mini")["input"], json!(1.0));
    assert!(
        read.body["taken"]
            .as_str()
            .is_some_and(|taken| taken.contains("prices.json")),
        "{:?}",
        read.body["taken"]
    );
    assert_eq!(
        rates(&read.body, "gpt-4o")["input"],
        json!(2.5),
        "the built-in prices stay beneath"
    );

    std::fs::write(&file, price("3e-06")).expect("write");
    let refused = server.post("/api/prices/reload", &key, json!({})).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "admin only");
    let reloaded = server
        .post("/api/prices/reload", ADMIN_KEY, json!({}))
        .await;
    assert_eq!(reloaded.status, StatusCode::OK, "{:?}", reloaded.body);
    let read = server.get("/api/prices", &key).await;
    assert_eq!(rates(&read.body, "gpt-4o-mini")["input"], json!(3.0));

    std::fs::write(&file, price("-1")).expect("write");
    let broken = server
        .post("/api/prices/reload", ADMIN_KEY, json!({}))
        .await;
    assert_eq!(broken.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(broken.error_code(), "invalid_price_file");
    let message = broken.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("gpt-4o-mini") && message.contains("input_cost_per_token"),
        "{message}"
    );
    let read = server.get("/api/prices", &key).await;
    assert_eq!(
        rates(&read.body, "gpt-4o-mini")["input"],
        json!(3.0),
        "the prices in force stay"
    );
    server.stop().await;
}

#[tokio::test]
async fn sighup_reads_the_price_file_again_and_a_broken_file_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("prices.json");
    std::fs::write(&file, r#"{"acme-model": {"input_cost_per_token": 1e-06}}"#).expect("write");
    let path = file.display().to_string();
    let env = [
        ("QUOTA_ADMIN_RESET_KEY", ADMIN_KEY),
        ("QUOTAWATCH_PRICES_FILE", path.as_str()),
    ];
    let mut server = Server::start(dir.path(), &env).await;
    let client = crate::support::client();
    let input_of_acme_model = || async {
        let prices: Value = client
            .get(format!("{}/api/prices", server.base))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("JSON");
        rates(&prices, "acme-model")["input"].as_f64()
    };
    assert_eq!(input_of_acme_model().await, Some(1.0));
    std::fs::write(&file, r#"{"acme-model": {"input_cost_per_token": 4e-06}}"#).expect("write");
    let pid = server.child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(sent.success());
    eventually(
        "the new price after SIGHUP",
        Duration::from_secs(10),
        || async { (input_of_acme_model().await == Some(4.0)).then_some(()) },
    )
    .await;
    assert!(
        server.child.try_wait().expect("status").is_none(),
        "still serving"
    );
    server.terminate().await;

    std::fs::write(&file, "not json").expect("write");
    let mut env = env.to_vec();
    env.push(("QUOTAWATCH_LISTEN", "127.0.0.1:0"));
    let run = binary::run(dir.path(), &env, &["serve"]);
    let (started, _, stderr) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("a start that cannot use its price file ends at once");
    assert!(!started);
    assert!(stderr.contains("price file"), "{stderr}");
}
