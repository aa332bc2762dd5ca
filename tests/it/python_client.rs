//! The Python client (`clients/python`) against a real quotawatch: its pytest
//! suite runs with this server's address, the admin key and the mock
//! upstream's address in the environment, and the package on `PYTHONPATH`
//! (nothing is installed). Needs `QUOTAWATCH_TEST_PYTHON`, a Python with
//! pytest, httpx, fastapi and openai; `.ci/run` installs them.

use std::time::Duration;

use quotawatch::mock::MockOptions;

use crate::support::{ADMIN_KEY, TestServer, Upstream, test_tool};

#[tokio::test]
async fn the_python_client_passes_its_suite_against_a_real_server() {
    let Some(python) = test_tool(
        "QUOTAWATCH_TEST_PYTHON",
        "a Python with pytest, httpx, fastapi and openai, e.g. python3",
    ) else {
        return;
    };
    let upstream = Upstream::start(MockOptions::default()).await;
    // Pings every second, so that the client's answers to them are exercised
    // while its tests follow the WebSocket.
    let server = TestServer::proxying(&upstream, &[("QUOTAWATCH_WS_PING_INTERVAL", "1s")]).await;
    let package = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python");
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
            .current_dir(package)
            .env("PYTHONPATH", package)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("QUOTAWATCH_TEST_URL", &server.base)
            .env("QUOTAWATCH_TEST_ADMIN_KEY", ADMIN_KEY)
            .env("QUOTAWATCH_TEST_OPENAI_URL", &upstream.url)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client's tests finish within 5 minutes")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client's tests failed:\n{stdout}\n{stderr}"
    );
    // Every test ran: none was skipped or deselected on the way.
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.contains(" passed") && !summary.contains("skipped"),
        "unexpected pytest summary {summary:?}:\n{stdout}"
    );
    server.stop().await;
}
