//! Scoped keys, service keys and browser tokens: each credential does what
//! it may and nothing else, on every path, until it expires or its key is
//! revoked.

use std::time::Duration;

use quotawatch::domain::time::Timestamp;
use quotawatch::mock::MockOptions;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::instances::key_lookups;
use crate::support::postgres::TestDatabase;
use crate::support::{ADMIN_KEY, Response, TestServer, Upstream, eventually};
use crate::websocket::{close_code, connect, wait_for};

const WORKSPACE_HEADER: &str = "X-Quotawatch-Workspace";

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]})
}

/// A request with `key`, naming `workspace` in the header when given.
async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    key: &str,
    workspace: Option<&str>,
    body: Option<Value>,
) -> Response {
    let headers: Vec<(&str, &str)> = workspace
        .map(|workspace| (WORKSPACE_HEADER, workspace))
        .into_iter()
        .collect();
    server
        .send_with_headers(method, path, key, &headers, body)
        .await
}

async fn create_key(server: &TestServer, workspace: &str, body: Value) -> (String, String) {
    let created = server
        .post(
            &format!("/api/workspaces/{workspace}/keys"),
            ADMIN_KEY,
            body,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    (
        created.body["key"].as_str().expect("key").to_owned(),
        created.body["id"].as_str().expect("id").to_owned(),
    )
}

async fn service_key(server: &TestServer, body: Value) -> (String, String) {
    let created = server.post("/api/service-keys", ADMIN_KEY, body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["scopes"], json!(["service"]));
    (
        created.body["key"].as_str().expect("key").to_owned(),
        created.body["id"].as_str().expect("id").to_owned(),
    )
}

fn assert_missing_scope(response: &Response, scope: &str, what: &str) {
    assert_eq!(
        response.status,
        StatusCode::FORBIDDEN,
        "{what}: {:?}",
        response.body
    );
    assert_eq!(response.error_code(), "missing_scope", "{what}");
    let message = response.body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains(&format!("`{scope}`")), "{what}: {message}");
}

async fn used_requests(server: &TestServer, key: &str) -> u64 {
    server.status(key).await["limits"]["requests_per_day"]["used"]
        .as_u64()
        .expect("used")
}

#[tokio::test]
async fn each_scope_opens_its_own_paths_and_no_other() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let server = TestServer::proxying(&upstream, &[]).await;
    let full = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 100}}))
        .await;
    let (read, read_id) = create_key(
        &server,
        "acme",
        json!({"scopes": ["read"], "name": "tenant UI", "expires_in": 2_592_000}),
    )
    .await;
    let (report, _) = create_key(&server, "acme", json!({"scopes": ["report"]})).await;
    let (proxy, _) = create_key(&server, "acme", json!({"scopes": ["proxy"]})).await;

    // read: status, notifications, history, tickets; nothing that counts.
    for path in [
        "/api/quota/status",
        "/api/quota/notifications",
        "/api/quota/history",
    ] {
        let answer = call(&server, Method::GET, path, &read, None, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {:?}", answer.body);
    }
    let ticket = call(
        &server,
        Method::POST,
        "/api/quota/ws-ticket",
        &read,
        None,
        None,
    )
    .await;
    assert_eq!(ticket.status, StatusCode::OK);
    let check = server.check(&read, 10).await;
    assert_missing_scope(&check, "report", "a check with a read key");
    let usage = server
        .post(
            "/api/quota/usage",
            &read,
            json!({"usage": {"total_tokens": 1}}),
        )
        .await;
    assert_missing_scope(&usage, "report", "a usage report with a read key");
    let spent = server.openai("/chat/completions", &read, chat()).await;
    assert_eq!(spent.status(), StatusCode::FORBIDDEN);
    assert!(spent.text().await.expect("body").contains("`proxy`"));

    // report: checks and usage, but no reading and no OpenAI calls.
    let check = server.check(&report, 10).await;
    assert_eq!(check.status, StatusCode::OK, "{:?}", check.body);
    let status = server.get("/api/quota/status", &report).await;
    assert_missing_scope(&status, "read", "status with a report key");
    let ticket = call(
        &server,
        Method::POST,
        "/api/quota/ws-ticket",
        &report,
        None,
        None,
    )
    .await;
    assert_missing_scope(&ticket, "read", "a ticket with a report key");
    let spent = server.openai("/chat/completions", &report, chat()).await;
    assert_eq!(spent.status(), StatusCode::FORBIDDEN);

    // proxy: OpenAI calls only.
    let spent = server.openai("/chat/completions", &proxy, chat()).await;
    assert_eq!(spent.status(), StatusCode::OK);
    assert_missing_scope(
        &server.check(&proxy, 1).await,
        "report",
        "a check with a proxy key",
    );
    let status = server.get("/api/quota/status", &proxy).await;
    assert_missing_scope(&status, "read", "status with a proxy key");
    assert_eq!(
        upstream.hits("/chat/completions").await,
        1,
        "only the proxy key's call went up"
    );
    assert_eq!(
        used_requests(&server, &full).await,
        2,
        "the report key's check and the proxy call"
    );

    // The list shows every key's scopes, name, expiry and last use.
    let keys = eventually(
        "the read key's last use",
        Duration::from_secs(5),
        || async {
            let keys = server
                .get("/api/workspaces/acme/keys", ADMIN_KEY)
                .await
                .body;
            let read_key = keys["keys"]
                .as_array()?
                .iter()
                .find(|key| key["id"] == read_id.as_str())?
                .clone();
            read_key["last_used_at"].is_string().then_some(keys)
        },
    )
    .await;
    let listed = keys["keys"].as_array().expect("keys");
    assert_eq!(listed.len(), 4);
    let read_key = listed
        .iter()
        .find(|key| key["id"] == read_id.as_str())
        .expect("listed");
    assert_eq!(read_key["scopes"], json!(["read"]));
    assert_eq!(read_key["name"], "tenant UI");
    assert_eq!(read_key["workspace"], "acme");
    let expires =
        chrono::DateTime::parse_from_rfc3339(read_key["expires_at"].as_str().expect("expiry"))
            .expect("RFC 3339");
    let in_30_days = chrono::Utc::now() + chrono::Duration::days(30);
    assert!(
        (expires.to_utc() - in_30_days).num_seconds().abs() < 60,
        "{expires}"
    );
    let first = listed
        .iter()
        .find(|key| key["prefix"] == full[..7])
        .expect("the first key");
    assert_eq!(
        first["scopes"],
        json!(["proxy", "report", "read"]),
        "all three by default"
    );
    server.stop().await;
}

#[tokio::test]
async fn keys_are_made_only_with_valid_scopes_names_and_lifetimes() {
    let server = TestServer::start(&[]).await;
    server.workspace(json!({"id": "acme"})).await;
    for (body, param) in [
        (json!({"scopes": ["admin"]}), "scopes"),
        (json!({"scopes": []}), "scopes"),
        (json!({"expires_in": 5}), "expires_in"),
        (json!({"expires_in": 400_000_000_000u64}), "expires_in"),
        (json!({"name": "x".repeat(101)}), "name"),
        (json!({"name": "line\nbreak"}), "name"),
    ] {
        let answer = server
            .post("/api/workspaces/acme/keys", ADMIN_KEY, body.clone())
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{body}: {:?}",
            answer.body
        );
        assert_eq!(answer.body["error"]["param"], param, "{body}");
    }
    let unknown = server
        .post(
            "/api/workspaces/acme/keys",
            ADMIN_KEY,
            json!({"scope": ["read"]}),
        )
        .await;
    assert_eq!(
        unknown.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown fields are refused"
    );
    let service = server
        .post(
            "/api/service-keys",
            ADMIN_KEY,
            json!({"workspaces": ["nope"]}),
        )
        .await;
    assert_eq!(service.status, StatusCode::NOT_FOUND, "{:?}", service.body);
    let key = server.workspace(json!({"id": "globex"})).await;
    let not_admin = server.post("/api/service-keys", &key, json!({})).await;
    assert_eq!(not_admin.status, StatusCode::FORBIDDEN);
    server.stop().await;
}

#[tokio::test]
async fn an_expired_key_is_refused_as_expired() {
    let server = TestServer::start(&[]).await;
    server.workspace(json!({"id": "acme"})).await;
    // A key whose lifetime ended, as another instance (or a key made a
    // month ago) leaves it in the database: found by the lookup of unknown
    // keys, and refused as expired rather than unknown.
    let key = quotawatch::keys::PlainKey::generate();
    let store = quotawatch::store::Store::open(&server.database_url)
        .await
        .expect("store");
    let now = Timestamp::from_millis(chrono::Utc::now().timestamp_millis());
    store
        .insert_key(&quotawatch::store::KeyRecord {
            id: "key_expired".into(),
            grant: quotawatch::keys::KeyGrant::Workspace {
                workspace: "acme".parse().expect("id"),
                scopes: quotawatch::keys::Scopes::ALL,
            },
            hash: key.hash(),
            prefix: key.display_prefix(),
            name: "last month's".into(),
            created_at: Timestamp::from_millis(now.millis() - 3_600_000),
            expires_at: Some(Timestamp::from_millis(now.millis() - 1000)),
            last_used_at: None,
            revoked_at: None,
        })
        .await
        .expect("insert");
    let answer = server.get("/api/quota/status", key.expose()).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "expired_api_key");
    server.stop().await;
}

#[tokio::test]
async fn a_service_key_acts_for_the_workspace_a_request_names() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let server = TestServer::proxying(&upstream, &[]).await;
    let acme = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 100}}))
        .await;
    let globex = server
        .workspace(json!({"id": "globex", "limits": {"requests_per_day": 100}}))
        .await;
    let (any, _) = service_key(&server, json!({"name": "backend"})).await;
    let (only_acme, _) = service_key(&server, json!({"workspaces": ["acme"]})).await;

    // Without naming a workspace, a service key does nothing.
    for (method, path) in [
        (Method::GET, "/api/quota/status"),
        (Method::POST, "/api/quota/check"),
        (Method::POST, "/v1/chat/completions"),
    ] {
        let body = match path {
            "/api/quota/check" => Some(json!({})),
            "/v1/chat/completions" => Some(chat()),
            _ => None,
        };
        let answer = call(&server, method, path, &any, None, body).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{path}: {:?}",
            answer.body
        );
        assert_eq!(answer.error_code(), "workspace_required", "{path}");
        assert_eq!(answer.body["error"]["param"], WORKSPACE_HEADER, "{path}");
    }
    assert_eq!(upstream.hits("/chat/completions").await, 0);

    // Naming one, it checks, reports, reads and calls OpenAI for it.
    let check = call(
        &server,
        Method::POST,
        "/api/quota/check",
        &any,
        Some("acme"),
        Some(json!({})),
    )
    .await;
    assert_eq!(check.status, StatusCode::OK, "{:?}", check.body);
    let spent = call(
        &server,
        Method::POST,
        "/v1/chat/completions",
        &any,
        Some("globex"),
        Some(chat()),
    )
    .await;
    assert_eq!(spent.status, StatusCode::OK, "{:?}", spent.body);
    let seen = upstream.last().await;
    let forwarded = seen["headers"].to_string().to_ascii_lowercase();
    assert!(
        !forwarded.contains("x-quotawatch-workspace"),
        "the header stays here: {forwarded}"
    );
    assert!(
        !forwarded.contains(&any.to_ascii_lowercase()),
        "the service key stays here"
    );
    let status = call(
        &server,
        Method::GET,
        "/api/quota/status",
        &any,
        Some("acme"),
        None,
    )
    .await;
    assert_eq!(status.body["workspace"], "acme");
    assert_eq!(used_requests(&server, &acme).await, 1);
    assert_eq!(used_requests(&server, &globex).await, 1);
    // `?workspace=` names it as well; two different names are refused.
    let query = call(
        &server,
        Method::GET,
        "/api/quota/status?workspace=globex",
        &any,
        None,
        None,
    )
    .await;
    assert_eq!(query.body["workspace"], "globex");
    let both = call(
        &server,
        Method::GET,
        "/api/quota/status?workspace=globex",
        &any,
        Some("acme"),
        None,
    )
    .await;
    assert_eq!(both.status, StatusCode::BAD_REQUEST);
    assert_eq!(both.error_code(), "conflicting_workspace");

    // A workspace it does not serve, or that does not exist, is not found.
    for (key, workspace) in [(&only_acme, "globex"), (&any, "nope"), (&any, "NOT AN ID")] {
        let answer = call(
            &server,
            Method::GET,
            "/api/quota/status",
            key,
            Some(workspace),
            None,
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{workspace}: {:?}",
            answer.body
        );
        assert_eq!(answer.error_code(), "workspace_not_found");
    }
    let allowed = call(
        &server,
        Method::GET,
        "/api/quota/status",
        &only_acme,
        Some("acme"),
        None,
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK);
    // A workspace key naming another workspace in the header learns nothing.
    let other = call(
        &server,
        Method::GET,
        "/api/quota/status",
        &acme,
        Some("globex"),
        None,
    )
    .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    // A service key is no admin key.
    let admin_only = call(
        &server,
        Method::GET,
        "/api/workspaces",
        &any,
        Some("acme"),
        None,
    )
    .await;
    assert_eq!(admin_only.status, StatusCode::FORBIDDEN);
    let listed = server.get("/api/service-keys", ADMIN_KEY).await;
    let names: Vec<&str> = listed.body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|key| key["name"].as_str())
        .collect();
    assert!(names.contains(&"backend"), "{names:?}");
    server.stop().await;
}

async fn mint(server: &TestServer, key: &str, body: Value) -> Response {
    server.post("/api/tokens", key, body).await
}

#[tokio::test]
async fn a_browser_token_reads_one_workspace_and_nothing_else() {
    let upstream = Upstream::start(MockOptions::default()).await;
    let server = TestServer::proxying(&upstream, &[]).await;
    let acme = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_day": 100}}))
        .await;
    server.workspace(json!({"id": "globex"})).await;
    let (service, _) = service_key(&server, json!({"workspaces": ["acme"]})).await;

    let minted = mint(&server, &service, json!({"workspace": "acme"})).await;
    assert_eq!(minted.status, StatusCode::CREATED, "{:?}", minted.body);
    assert_eq!(minted.body["scopes"], json!(["read"]));
    assert_eq!(
        minted.body["expires_in"], 900,
        "15 minutes unless asked otherwise"
    );
    let token = minted.body["token"].as_str().expect("token").to_owned();
    assert!(token.starts_with("qwt_"));

    let status = server.get("/api/quota/status", &token).await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.body["workspace"], "acme");
    let other = server
        .get("/api/quota/status?workspace=globex", &token)
        .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert_missing_scope(
        &server.check(&token, 1).await,
        "report",
        "a check with a token",
    );
    let spent = server.openai("/chat/completions", &token, chat()).await;
    assert_eq!(spent.status(), StatusCode::FORBIDDEN);
    let reset = server
        .post("/api/quota/reset", &token, json!({"workspace": "acme"}))
        .await;
    assert_eq!(reset.status, StatusCode::FORBIDDEN);
    let again = mint(&server, &token, json!({"workspace": "acme"})).await;
    assert_eq!(
        again.status,
        StatusCode::FORBIDDEN,
        "a token mints no tokens"
    );
    assert_eq!(used_requests(&server, &acme).await, 0);
    assert_eq!(upstream.hits("/chat/completions").await, 0);

    // Who may mint, for which workspace, for how long.
    let workspace_key = mint(&server, &acme, json!({"workspace": "acme"})).await;
    assert_eq!(workspace_key.status, StatusCode::FORBIDDEN);
    assert_eq!(workspace_key.error_code(), "service_key_required");
    let not_served = mint(&server, &service, json!({"workspace": "globex"})).await;
    assert_eq!(not_served.status, StatusCode::NOT_FOUND);
    for expires_in in [0, 59, 86_401] {
        let answer = mint(
            &server,
            &service,
            json!({"workspace": "acme", "expires_in": expires_in}),
        )
        .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{expires_in}");
        assert_eq!(answer.body["error"]["param"], "expires_in");
    }
    let by_admin = mint(
        &server,
        ADMIN_KEY,
        json!({"workspace": "globex", "expires_in": 60}),
    )
    .await;
    assert_eq!(by_admin.status, StatusCode::CREATED);
    let globex_token = by_admin.body["token"].as_str().expect("token");
    assert_eq!(server.status(globex_token).await["workspace"], "globex");

    // A token changed by one character is no token.
    let mut forged = token.clone().into_bytes();
    let at = forged.len() - 3;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).expect("ascii");
    let answer = server.get("/api/quota/status", &forged).await;
    assert_eq!(answer.error_code(), "invalid_api_key");
    server.stop().await;
}

#[tokio::test]
async fn a_token_follows_live_status_and_stops_when_its_key_is_revoked() {
    let server = TestServer::start(&[]).await;
    let acme = server
        .workspace(json!({"id": "acme", "limits": {"requests_per_minute": 2}}))
        .await;
    let (service, service_id) = service_key(&server, json!({})).await;
    let minted = mint(&server, &service, json!({"workspace": "acme"})).await;
    let token = minted.body["token"].as_str().expect("token").to_owned();

    // Live status through a ticket, as the client library opens it.
    let ticket = call(
        &server,
        Method::POST,
        "/api/quota/ws-ticket",
        &token,
        None,
        None,
    )
    .await;
    let ticket = ticket.body["ticket"].as_str().expect("ticket").to_owned();
    let url = format!("{}?ticket={ticket}", crate::websocket::ws_url(&server, ""));
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("connects");
    wait_for(&mut ws, Duration::from_secs(5), |m| m["type"] == "status").await;
    server.check(&acme, 1).await;
    server.check(&acme, 1).await;
    let exhausted = wait_for(&mut ws, Duration::from_secs(5), |m| {
        m["type"] == "notification" && m["data"]["kind"] == "rate_limited"
    })
    .await;
    assert_eq!(exhausted["data"]["workspace"], "acme");
    // A socket opened with the bearer token directly works the same way.
    let mut direct = connect(&server, &token, "").await;
    wait_for(&mut direct, Duration::from_secs(5), |m| {
        m["type"] == "status"
    })
    .await;

    let revoked = server
        .send(
            Method::DELETE,
            &format!("/api/service-keys/{service_id}"),
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let answer = server.get("/api/quota/status", &token).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "invalid_api_key");
    assert_eq!(
        close_code(&mut ws).await,
        Some(1008),
        "its socket is closed"
    );
    assert_eq!(close_code(&mut direct).await, Some(1008));
    let minted = mint(&server, &service, json!({"workspace": "acme"})).await;
    assert_eq!(minted.status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test]
async fn an_expired_token_is_refused_as_expired_and_ends_its_socket() {
    let server = TestServer::start(&[("QUOTAWATCH_WS_PING_INTERVAL", "200ms")]).await;
    server.workspace(json!({"id": "acme"})).await;
    let engine = server.running().engine().clone();
    let workspace = "acme".parse().expect("id");
    let now = engine.now();
    let expired = engine
        .mint_token(&workspace, None, Timestamp::from_millis(now.millis() - 1))
        .expect("minted");
    let answer = server.get("/api/quota/status", &expired).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error_code(), "expired_api_key");
    // A socket outlives nothing: opened with a token about to expire, it is
    // closed once the token has, at the next heartbeat.
    let soon = engine
        .mint_token(
            &workspace,
            None,
            Timestamp::from_millis(now.millis() + 1500),
        )
        .expect("minted");
    let mut ws = connect(&server, &soon, "").await;
    let error = wait_for(&mut ws, Duration::from_secs(10), |m| m["type"] == "error").await;
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("expired"),
        "{error}"
    );
    assert_eq!(close_code(&mut ws).await, Some(1008));
    server.stop().await;
}

/// The migrations of the release before scoped keys, in a directory of
/// their own.
fn migrations_before_scopes() -> tempfile::TempDir {
    let earlier = tempfile::tempdir().expect("tempdir");
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for entry in std::fs::read_dir(&migrations).expect("migrations") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.as_str() < "20261202000004" {
            std::fs::copy(&path, earlier.path().join(&name)).expect("copy");
        }
    }
    earlier
}

/// Leaves the database of `pool` as the release before scoped keys left it: its schema, one
/// workspace and one key, which is returned.
async fn database_before_scopes<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> quotawatch::keys::PlainKey
where
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    <DB as sqlx::Database>::Connection: sqlx::migrate::Migrate,
{
    let earlier = migrations_before_scopes();
    sqlx::migrate::Migrator::new(earlier.path())
        .await
        .expect("migrations")
        .run(pool)
        .await
        .expect("the earlier schema");
    let key = quotawatch::keys::PlainKey::generate();
    sqlx::query("INSERT INTO workspaces (id, name, timezone, requests_per_day, warn_at, created_at, updated_at) VALUES ('acme', 'Acme', 'UTC', 100, 0.8, 0, 0)")
        .execute(pool)
        .await
        .expect("workspace");
    sqlx::query("INSERT INTO api_keys (id, workspace_id, key_hash, prefix, created_at, revoked_at) VALUES ('key_old', 'acme', $1, $2, 0, NULL)")
        .bind(key.hash().to_hex())
        .bind(key.display_prefix())
        .execute(pool)
        .await
        .expect("key");
    key
}

/// A server on the upgraded database: the old key works with every scope.
async fn the_old_key_keeps_every_scope(server: TestServer, old_key: &str) {
    assert_eq!(server.status(old_key).await["workspace"], "acme");
    let check = server.check(old_key, 1).await;
    assert_eq!(check.status, StatusCode::OK, "{:?}", check.body);
    let listed = server.get("/api/workspaces/acme/keys", ADMIN_KEY).await;
    let old = &listed.body["keys"][0];
    assert_eq!(old["id"], "key_old");
    assert_eq!(old["scopes"], json!(["proxy", "report", "read"]));
    assert_eq!(old["name"], "");
    assert!(old["expires_at"].is_null());
    server.stop().await;
}

#[tokio::test]
async fn keys_made_before_scopes_keep_all_three_after_the_upgrade_on_sqlite() {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("quotawatch.db").display());
    let options = url
        .parse::<SqliteConnectOptions>()
        .expect("url")
        .create_if_missing(true);
    let pool = SqlitePoolOptions::new()
        .connect_with(options)
        .await
        .expect("open");
    let key = database_before_scopes(&pool).await;
    pool.close().await;
    let server = TestServer::start_on(url, Some(dir), &[]).await;
    the_old_key_keeps_every_scope(server, key.expose()).await;
}

#[tokio::test]
async fn keys_made_before_scopes_keep_all_three_after_the_upgrade_on_postgres() {
    let Some(database) = TestDatabase::create("keys::upgrade").await else {
        return;
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect(&database.url)
        .await
        .expect("open");
    let key = database_before_scopes(&pool).await;
    pool.close().await;
    let server = TestServer::start_on(database.url.clone(), None, &[]).await;
    the_old_key_keeps_every_scope(server, key.expose()).await;
    database.drop_database().await;
}

#[tokio::test]
async fn naming_made_up_workspaces_costs_a_bounded_number_of_database_lookups() {
    let server = TestServer::start(&[]).await;
    let acme = server.workspace(json!({"id": "acme"})).await;
    let (service, _) = service_key(&server, json!({})).await;
    let before = key_lookups(&server).await;
    // A workspace key naming others is refused without looking anything up.
    for n in 0..50 {
        let answer = call(
            &server,
            Method::GET,
            "/api/quota/status",
            &acme,
            Some(&format!("other-{n}")),
            None,
        )
        .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(key_lookups(&server).await, before);
    // A service key for any workspace may name one made through another
    // instance a moment ago, so an unknown name is looked up: within the
    // budget, each name once.
    let started = std::time::Instant::now();
    for n in 0..300 {
        let answer = call(
            &server,
            Method::GET,
            "/api/quota/status",
            &service,
            Some(&format!("made-up-{n}")),
            None,
        )
        .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(answer.error_code(), "workspace_not_found");
    }
    let again = call(
        &server,
        Method::GET,
        "/api/quota/status",
        &service,
        Some("made-up-0"),
        None,
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    let looked_up = key_lookups(&server).await - before;
    let bound = 20 + (20.0 * started.elapsed().as_secs_f64()).ceil() as u64;
    assert!(
        looked_up <= bound && looked_up < 300,
        "{looked_up} lookups for 301 requests (bound {bound})"
    );
    server.stop().await;
}
