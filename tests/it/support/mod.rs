//! Test support: a real quotawatch server on `127.0.0.1:0` with a fresh SQLite
//! file, an HTTP client, and a way to wait for conditions with a deadline.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use quotawatch::app::{self, Running};
use quotawatch::config::{self, Sources};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

pub mod binary;
pub mod browser;
pub mod postgres;
pub mod redis;
pub mod tls;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef";

/// The external tool a test needs, named by the variable `var`; when it is
/// unset (or empty) the test is skipped with a line saying what it needs.
pub fn test_tool(var: &str, needs: &str) -> Option<String> {
    let tool = std::env::var(var).ok().filter(|value| !value.is_empty());
    if tool.is_none() {
        println!("skipped: this test needs {var}: {needs}");
    }
    tool
}

/// Waits until `check` returns `Some`, polling, and fails the test when
/// `deadline` passes first.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `command` to its end and answers its standard output, failing the
/// test with everything it printed when it fails.
pub async fn output_of(command: &mut tokio::process::Command) -> String {
    let output = command
        .output()
        .await
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub database_url: String,
    pub default_key: Option<String>,
    env: Vec<(String, String)>,
    /// A TOML configuration file read at each start, if the test gave one.
    config_file: Option<PathBuf>,
    running: Option<Running>,
    dir: Option<tempfile::TempDir>,
}

pub fn client() -> reqwest::Client {
    quotawatch::telemetry::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

impl TestServer {
    /// A server with a fresh SQLite database and the given settings on top of
    /// the test defaults (admin key, fast flushes).
    pub async fn start(settings: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let database_url = format!("sqlite://{}", dir.path().join("quotawatch.db").display());
        Self::start_on(database_url, Some(dir), settings).await
    }

    pub async fn start_on(
        database_url: String,
        dir: Option<tempfile::TempDir>,
        settings: &[(&str, &str)],
    ) -> Self {
        let mut env: Vec<(String, String)> = vec![
            ("QUOTA_ADMIN_RESET_KEY".into(), ADMIN_KEY.into()),
            ("QUOTAWATCH_DATABASE_URL".into(), database_url.clone()),
            ("QUOTAWATCH_FLUSH_INTERVAL".into(), "100ms".into()),
        ];
        env.extend(
            settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let mut server = Self {
            base: String::new(),
            client: client(),
            database_url,
            default_key: None,
            env,
            config_file: None,
            running: None,
            dir,
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let vars: HashMap<String, String> = self.env.iter().cloned().collect();
        let upstream_vars = vars.clone();
        let lookup = move |name: &str| vars.get(name).cloned();
        let config = config::load(Sources {
            file: self.config_file.as_deref(),
            dotenv: None,
            env: &lookup,
            cli: vec![],
        })
        .expect("test configuration is valid");
        // A restart keeps the address, so that clients can reconnect.
        let address = self.base.strip_prefix("http://").unwrap_or("127.0.0.1:0");
        let listener = tokio::net::TcpListener::bind(address).await.expect("bind");
        let env: quotawatch::keys::EnvLookup =
            std::sync::Arc::new(move |name: &str| upstream_vars.get(name).cloned());
        let (running, bootstrap) = app::start(config, listener, env)
            .await
            .expect("server starts");
        self.base = format!("http://{}", running.local_addr());
        if let Some(key) = bootstrap.default_workspace_key {
            self.default_key = Some(key.expose().to_owned());
        }
        self.running = Some(running);
    }

    /// Writes `toml` as the configuration file and starts again with it.
    pub async fn restart_with_file(&mut self, toml: &str) {
        let dir = self.dir.as_ref().expect("a server with its own directory");
        let path = dir.path().join("quotawatch.toml");
        std::fs::write(&path, toml).expect("write the configuration file");
        self.config_file = Some(path);
        self.restart().await;
    }

    pub fn database_path(&self) -> PathBuf {
        PathBuf::from(self.database_url.trim_start_matches("sqlite://"))
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// Graceful shutdown (as on SIGTERM), then a fresh start on the same
    /// database and address.
    pub async fn restart(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        self.launch().await;
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn read(response: reqwest::Response) -> Response {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body, got {text:?}"))
        };
        Response {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Response {
        Self::read(
            self.client
                .get(self.url(path))
                .bearer_auth(key)
                .send()
                .await
                .expect("request"),
        )
        .await
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> Response {
        self.send_with_headers(method, path, key, &[], body).await
    }

    /// Like [`send`](Self::send), with extra request headers.
    pub async fn send_with_headers(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Response {
        let mut request = self.client.request(method, self.url(path)).bearer_auth(key);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        Self::read(request.send().await.expect("request")).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Response {
        self.send(reqwest::Method::POST, path, key, Some(body))
            .await
    }

    /// Creates a workspace as admin and returns a key for it.
    pub async fn workspace(&self, body: Value) -> String {
        let id = body["id"].as_str().expect("id").to_owned();
        let created = self.post("/api/workspaces", ADMIN_KEY, body).await;
        assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
        let key = self
            .post(&format!("/api/workspaces/{id}/keys"), ADMIN_KEY, json!({}))
            .await;
        assert_eq!(key.status, StatusCode::CREATED, "{:?}", key.body);
        key.body["key"].as_str().expect("key").to_owned()
    }

    pub async fn status(&self, key: &str) -> Value {
        let response = self.get("/api/quota/status", key).await;
        assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
        response.body
    }

    /// Every notification of the workspace, active and resolved.
    pub async fn notification_history(&self, key: &str) -> Vec<Value> {
        let history = self
            .get("/api/quota/notifications?include=history", key)
            .await;
        history.body["notifications"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The Prometheus metrics as the admin reads them.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    pub async fn check(&self, key: &str, tokens: u64) -> Response {
        self.post("/api/quota/check", key, json!({"estimated_tokens": tokens}))
            .await
    }
}

/// Sends `count` admission checks at once, spread over `servers` in turn,
/// and answers how many were admitted and how many refused.
pub async fn concurrent_checks(servers: &[&TestServer], key: &str, count: usize) -> (u32, u32) {
    let calls: Vec<_> = (0..count)
        .map(|i| {
            let server = servers[i % servers.len()];
            let request = server
                .client
                .post(server.url("/api/quota/check"))
                .bearer_auth(key)
                .json(&json!({"estimated_tokens": 5}));
            tokio::spawn(async move { request.send().await.expect("request").status() })
        })
        .collect();
    let (mut admitted, mut refused) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    (admitted, refused)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            // A test that ends without stopping its server: stop it in the
            // background rather than leak the tasks.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(running.shutdown());
            }
        }
        let _ = self.dir.take();
    }
}

/// Reads a fixture of OpenAI's wire format.
pub fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/openai/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

pub fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).expect("fixture is JSON")
}

/// The headers of a `.headers` fixture as a JSON object.
pub fn fixture_headers(name: &str) -> Value {
    let map: serde_json::Map<String, Value> = fixture(name)
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(": "))
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect();
    Value::Object(map)
}

/// The key the mock upstream expects: what quotawatch must send upstream.
pub const UPSTREAM_KEY: &str = "sk-upstream-test-key";

/// The fake OpenAI upstream on `127.0.0.1:0`.
pub struct Upstream {
    /// Base URL including `/v1`, as `QUOTAWATCH_UPSTREAM_URL` takes it.
    pub url: String,
    base: String,
    client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Upstream {
    pub async fn start(options: quotawatch::mock::MockOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(quotawatch::mock::serve(listener, options, async {
            let _ = stopped.await;
        }));
        Self {
            url: format!("{base}/v1"),
            base,
            client: client(),
            stop: Some(stop),
        }
    }

    /// A mock that demands [`UPSTREAM_KEY`].
    pub async fn strict() -> Self {
        Self::start(quotawatch::mock::MockOptions {
            require_key: Some(UPSTREAM_KEY.to_owned()),
            ..Default::default()
        })
        .await
    }

    pub async fn stats(&self) -> Value {
        self.client
            .get(format!("{}/mock/stats", self.base))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("JSON")
    }

    /// Requests the upstream received on `path` (under `/v1`).
    pub async fn hits(&self, path: &str) -> u64 {
        self.stats().await["requests"][path].as_u64().unwrap_or(0)
    }

    pub async fn last(&self) -> Value {
        self.client
            .get(format!("{}/mock/last", self.base))
            .send()
            .await
            .expect("last")
            .json()
            .await
            .expect("JSON")
    }

    /// The usage the upstream sent in its answers (see `GET /mock/usage`).
    pub async fn usage(&self) -> Value {
        self.client
            .get(format!("{}/mock/usage", self.base))
            .send()
            .await
            .expect("usage")
            .json()
            .await
            .expect("JSON")
    }

    pub async fn set_scenario(&self, scenario: &str) {
        let response = self
            .client
            .post(format!("{}/mock/scenario", self.base))
            .json(&json!({"scenario": scenario}))
            .send()
            .await
            .expect("scenario");
        assert!(
            response.status().is_success(),
            "unknown scenario {scenario}"
        );
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A server proxying to `upstream` (see [`TestServer::proxying`]) and a key
/// of a workspace created from `workspace`.
pub async fn proxied(
    upstream: &Upstream,
    settings: &[(&str, &str)],
    workspace: Value,
) -> (TestServer, String) {
    let server = TestServer::proxying(upstream, settings).await;
    let key = server.workspace(workspace).await;
    (server, key)
}

impl TestServer {
    /// A server proxying to `upstream` with [`UPSTREAM_KEY`].
    pub async fn proxying(upstream: &Upstream, settings: &[(&str, &str)]) -> Self {
        let mut all = vec![
            ("QUOTAWATCH_UPSTREAM_URL", upstream.url.as_str()),
            ("OPENAI_API_KEY", UPSTREAM_KEY),
        ];
        all.extend_from_slice(settings);
        Self::start(&all).await
    }

    /// Sends a JSON request to `/v1{path}` with `key`.
    pub async fn openai(&self, path: &str, key: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1{path}")))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("request")
    }
}
