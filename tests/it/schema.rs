//! The REST API against its own OpenAPI document, with schemathesis: every
//! documented operation, with generated valid and invalid input, once with a
//! workspace key and once with the admin key. Needs
//! `QUOTAWATCH_TEST_SCHEMATHESIS` (the `schemathesis` executable, 4.x);
//! `.ci/run` installs it and sets it. The proxy (`/v1/*`) is OpenAI's API,
//! not described by this document, and is not tested here.

use std::time::Duration;

use crate::support::{ADMIN_KEY, TestServer, test_tool};

/// Test cases per operation and phase: enough to reach every status an
/// operation documents, few enough for both runs to finish in about a
/// minute on two cores.
const MAX_EXAMPLES: &str = "30";
/// Fixed, so that a failure in CI reproduces locally.
const SEED: &str = "20261202";
/// The most both runs may take together before the test fails.
const DEADLINE: Duration = Duration::from_secs(180);

/// What is checked: no 5xx, documented status codes, content types, headers
/// and bodies that match their schemas, schema-invalid input refused, and
/// authentication not ignored. `positive_data_acceptance` is left out: some
/// rules are not expressible in the schema (the admin key must name a
/// workspace, a reset takes either a workspace or `all`), and input that
/// breaks them is refused, as it should be, with a documented 4xx.
const CHECKS: &str = "all";
const EXCLUDED_CHECKS: &str = "positive_data_acceptance";

#[tokio::test]
async fn the_api_answers_as_its_openapi_document_says() {
    let Some(schemathesis) = test_tool(
        "QUOTAWATCH_TEST_SCHEMATHESIS",
        "the schemathesis executable (pip install 'schemathesis>=4,<5')",
    ) else {
        return;
    };
    let server = TestServer::start(&[]).await;
    let workspace_key = server
        .default_key
        .clone()
        .expect("the default workspace's key");
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = server.url("/api/openapi.json");
    let runs = async {
        let mut summaries = Vec::new();
        for (who, key) in [
            ("workspace key", workspace_key.as_str()),
            ("admin key", ADMIN_KEY),
        ] {
            let output = tokio::process::Command::new(&schemathesis)
                .current_dir(dir.path())
                .args(["run", &schema, "--header"])
                .arg(format!("Authorization: Bearer {key}"))
                .args(["--checks", CHECKS, "--exclude-checks", EXCLUDED_CHECKS])
                .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED])
                .args(["--workers", "2", "--request-timeout", "10"])
                .args([
                    "--generation-database",
                    "none",
                    "--suppress-health-check",
                    "all",
                ])
                .args(["--no-color"])
                // Only this server is tested: no proxy in between.
                .env("NO_PROXY", "127.0.0.1")
                .env_remove("HTTP_PROXY")
                .env_remove("HTTPS_PROXY")
                .env_remove("ALL_PROXY")
                .kill_on_drop(true)
                .output()
                .await
                .expect("schemathesis runs");
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success(),
                "schemathesis with the {who} found failures:\n{stdout}\n{stderr}"
            );
            let counts: Vec<&str> = stdout
                .lines()
                .filter(|line| line.contains("Selected:") || line.contains(" generated,"))
                .map(str::trim)
                .collect();
            summaries.push(format!("{who}: {}", counts.join("; ")));
        }
        summaries
    };
    let summaries = tokio::time::timeout(DEADLINE, runs)
        .await
        .expect("schemathesis finishes within its deadline");
    for summary in summaries {
        println!("schemathesis, {summary}");
    }
    server.stop().await;
}
