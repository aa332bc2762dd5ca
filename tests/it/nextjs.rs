//! The Next.js example (`examples/nextjs`) as its README runs it: built with
//! `next build` against a running quotawatch, started with `next start` on
//! another origin, and opened in Chromium. Its route handler mints browser
//! tokens with a service key; the page follows the workspace live. Needs
//! `QUOTAWATCH_TEST_NPM` (npm, with `node` beside it, and the npm registry)
//! and `QUOTAWATCH_TEST_CHROMEDRIVER`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::support::browser::{Browser, PATIENCE};
use crate::support::{ADMIN_KEY, TestServer, client, output_of, test_tool};

const TEST: &str = "the_nextjs_example_follows_its_workspace_live_in_chromium";

/// How long `next start` may take to answer; it usually needs a second.
const START_PATIENCE: Duration = Duration::from_secs(60);

/// What a developer's own run of the example leaves beside its sources.
const NOT_SOURCES: [&str; 2] = ["node_modules", ".next"];

/// Copies the directory `from` to `to`, without installed packages or build
/// outputs.
fn copy_sources(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a directory");
    for entry in std::fs::read_dir(from).expect("read a directory") {
        let entry = entry.expect("a directory entry");
        let name = entry.file_name();
        if NOT_SOURCES.iter().any(|skipped| name == *skipped) {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().expect("a file type").is_dir() {
            copy_sources(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// The example and the local packages it depends on, copied into `into`
/// with the repository's layout (it names them by relative path), so that
/// installing and building leave the repository as it was. The example's
/// directory.
fn copy_example(into: &Path) -> PathBuf {
    let repository = Path::new(env!("CARGO_MANIFEST_DIR"));
    for part in ["examples/nextjs", "clients/js", "clients/react"] {
        copy_sources(&repository.join(part), &into.join(part));
    }
    into.join("examples/nextjs")
}

/// `next` of the example's own installation, run by `node` in `app` with
/// telemetry off.
fn next(app: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("node");
    command
        .arg("node_modules/next/dist/bin/next")
        .args(args)
        .current_dir(app)
        .env("NEXT_TELEMETRY_DISABLED", "1");
    command
}

/// `next start` of the built example; killed when dropped, also when the
/// test fails on its way.
struct NextServer {
    _child: Child,
    origin: String,
}

impl NextServer {
    /// Starts the built example on `origin`'s port with the server-side
    /// `env`, and waits until it answers.
    async fn start(app: &Path, origin: &str, env: &[(&str, &str)]) -> Self {
        let port = origin.rsplit(':').next().expect("a port");
        let log_path = app.join("next-start.log");
        let log = std::fs::File::create(&log_path).expect("a log file");
        let mut child = next(app, &["start", "-H", "127.0.0.1", "-p", port])
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("next start");
        let http = client();
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(exit) = child.try_wait().expect("the process's state") {
                panic!("next start exited with {exit}:\n{}", log());
            }
            let answered = http.get(format!("{origin}/")).send().await;
            if answered.is_ok_and(|response| response.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "next start did not answer within {START_PATIENCE:?}:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            _child: child,
            origin: origin.to_owned(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin)
    }
}

/// A port nothing listens on right now, for `next start`, which takes a
/// number rather than a socket.
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    probe.local_addr().expect("address").port()
}

#[tokio::test]
async fn the_nextjs_example_follows_its_workspace_live_in_chromium() {
    let (Some(npm), Some(_)) = (
        test_tool(
            "QUOTAWATCH_TEST_NPM",
            "the npm executable, and the npm registry",
        ),
        test_tool("QUOTAWATCH_TEST_CHROMEDRIVER", "the path to chromedriver"),
    ) else {
        return;
    };
    let origin = format!("http://127.0.0.1:{}", free_port());
    let server = TestServer::start(&[("QUOTAWATCH_CORS_ORIGINS", &origin)]).await;
    let workspace_key = server
        .workspace(json!({"id": "acme", "name": "Acme", "limits": {"requests_per_day": 3}}))
        .await;
    let service = server
        .post(
            "/api/service-keys",
            ADMIN_KEY,
            json!({"name": "nextjs-example", "workspaces": ["acme"]}),
        )
        .await;
    assert_eq!(service.status, StatusCode::CREATED, "{}", service.body);
    let service_key = service.body["key"].as_str().expect("a service key");

    // NEXT_PUBLIC_ variables are written into the page by the build, so it
    // is built for this server.
    let dir = tempfile::tempdir().expect("tempdir");
    let app = copy_example(dir.path());
    let started = Instant::now();
    output_of(
        Command::new(&npm)
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&app),
    )
    .await;
    let installed = started.elapsed();
    let ws_url = server.base.replacen("http", "ws", 1);
    output_of(next(&app, &["build"]).envs([
        ("NEXT_PUBLIC_API_URL", server.base.as_str()),
        ("NEXT_PUBLIC_WS_URL", ws_url.as_str()),
    ]))
    .await;
    println!(
        "{TEST}: npm ci took {installed:?}, next build {:?}",
        started.elapsed() - installed
    );
    let next_server = NextServer::start(
        &app,
        &origin,
        &[
            ("QUOTAWATCH_URL", server.base.as_str()),
            ("QUOTAWATCH_SERVICE_KEY", service_key),
            ("QUOTAWATCH_WORKSPACE", "acme"),
        ],
    )
    .await;

    // What the route handler gives a browser: a read-only token for the
    // workspace, with its expiry, and never the service key.
    let minted: Value = client()
        .post(next_server.url("/api/quota-token"))
        .send()
        .await
        .expect("the token route")
        .json()
        .await
        .expect("JSON");
    let token = minted["token"].as_str().expect("a token");
    assert!(token.starts_with("qwt_"), "{minted}");
    assert!(minted["expiresAt"].is_string(), "{minted}");
    let reporting = server.check(token, 0).await;
    assert_eq!(
        reporting.status,
        StatusCode::FORBIDDEN,
        "{}",
        reporting.body
    );

    let browser = Browser::start(TEST).await.expect("chromedriver is set");
    browser
        .client
        .goto(&next_server.url("/"))
        .await
        .expect("open the example");
    browser
        .wait_text("#quota-level", PATIENCE, |text| text == "normal")
        .await;
    browser
        .wait_text("#quota-connection", PATIENCE, |text| text == "live")
        .await;
    browser
        .wait_text("#usage-requests_per_day td", PATIENCE, |text| {
            text == "0 / 3"
        })
        .await;

    // The backend reports usage with the workspace key until the day's
    // requests are used up; the open page shows it without reloading.
    for _ in 0..3 {
        let checked = server.check(&workspace_key, 0).await;
        assert_eq!(checked.status, StatusCode::OK, "{}", checked.body);
    }
    browser
        .wait_text("#quota-level", PATIENCE, |text| text == "quota_exceeded")
        .await;
    browser
        .wait_text("#usage-requests_per_day td", PATIENCE, |text| {
            text == "3 / 3"
        })
        .await;
    let active = server.get("/api/quota/notifications", &workspace_key).await;
    let exhausted = active.body["notifications"]
        .as_array()
        .and_then(|list| {
            list.iter()
                .find(|notification| notification["kind"] == "daily_quota_exhausted")
        })
        .unwrap_or_else(|| panic!("a notification of the used-up day: {}", active.body));
    let tenant_title = exhausted["tenant"]["title"].as_str().expect("a title");
    browser
        .wait_text(".quota-notification-title", PATIENCE, |text| {
            text == tenant_title
        })
        .await;
    browser
        .wait_text(".quota-toast-title", PATIENCE, |text| {
            text == "Acme: quota exceeded"
        })
        .await;
    browser.screenshot("nextjs-example").await;
    browser.close().await;
    drop(next_server);
    server.stop().await;
}
