//! Client conformance: the official `openai` Python package against the
//! proxy. Needs `QUOTAWATCH_TEST_PYTHON` (a Python with `openai` installed);
//! `.ci/run` installs the package and sets it.

use std::time::Duration;

use quotawatch::mock::MockOptions;
use serde_json::{Value, json};

use crate::support::{Upstream, proxied, test_tool};

#[tokio::test]
async fn the_official_python_sdk_works_through_the_proxy() {
    let Some(python) = test_tool(
        "QUOTAWATCH_TEST_PYTHON",
        "a Python with the openai package, e.g. python3",
    ) else {
        return;
    };
    let upstream = Upstream::start(MockOptions::default()).await;
    let (server, key) = proxied(
        &upstream,
        &[],
        json!({"id": "sdk", "limits": {"requests_per_day": 1000, "tokens_per_day": 1000000}}),
    )
    .await;
    let tight = server
        .workspace(json!({"id": "tight", "limits": {"requests_per_day": 1}}))
        .await;
    let billing = server.workspace(json!({"id": "billing"})).await;
    let mock_base = upstream.url.trim_end_matches("/v1").to_owned();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/openai_conformance.py"
    );
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(script)
            .env("QW_BASE_URL", server.url("/v1"))
            .env("QW_MOCK_URL", &mock_base)
            .env("QW_KEY", &key)
            .env("QW_TIGHT_KEY", &tight)
            .env("QW_BILLING_KEY", &billing)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .output(),
    )
    .await
    .expect("the SDK script finishes")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK checks failed:\n{stdout}\n{stderr}"
    );
    let summary: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("a JSON summary");
    assert_eq!(summary["ok"], true);
    // Refusals that no wait can fix end the SDK's call at once: no retries.
    assert!(
        summary["refused_after_s"].as_f64().expect("seconds") < 0.5,
        "{summary}"
    );
    assert!(
        summary["billing_after_s"].as_f64().expect("seconds") < 0.5,
        "{summary}"
    );

    // Every call was counted exactly, with its real usage.
    let status = server.status(&key).await;
    assert_eq!(status["limits"]["requests_per_day"]["used"], 5);
    assert_eq!(
        status["limits"]["tokens_per_day"]["used"],
        29 + 15 + 15 + 8 + 11
    );
    assert_eq!(server.status(&billing).await["status"], "quota_exceeded");
    assert_eq!(server.status(&tight).await["status"], "quota_exceeded");
    server.stop().await;
}
