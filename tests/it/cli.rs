//! The command line, run as a real process.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::binary::{Server, run};
use crate::support::{ADMIN_KEY, TestServer, UPSTREAM_KEY, Upstream, client, eventually};

async fn get(base: &str, path: &str, key: &str) -> (StatusCode, Value) {
    let response = client()
        .get(format!("{base}{path}"))
        .bearer_auth(key)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The server's memory is not backed by transparent huge pages: with them,
/// its allocator's spans stayed resident whole, and the resident memory
/// under load rose by two thirds.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}", dir.path().join("thp.db").display());
    let server = Server::start(dir.path(), &[("QUOTAWATCH_DATABASE_URL", db.as_str())]).await;
    let pid = server.child.id().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    // The kernel shows the flag from Linux 5.0 on.
    if let Some(line) = status.lines().find(|line| line.starts_with("THP_enabled:")) {
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    } else {
        println!("skipped: this kernel does not show THP_enabled");
    }
    assert!(server.terminate().await.success());
}

#[tokio::test]
async fn the_first_start_prints_each_key_once_and_never_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}", dir.path().join("fresh.db").display());
    let env = [("QUOTAWATCH_DATABASE_URL", db.as_str())];
    let server = Server::start(dir.path(), &env).await;
    let keys = server.printed_keys();
    assert_eq!(
        keys.len(),
        2,
        "an admin key and the default workspace's key: {:?}",
        server.printed
    );
    let (admin, workspace) = (keys[0].clone(), keys[1].clone());
    assert!(server.printed.iter().any(|l| l.contains("admin key")));
    let (status, list) = get(&server.base, "/api/workspaces", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["workspaces"][0]["id"], "default");
    assert_eq!(list["workspaces"][0]["limits"]["requests_per_minute"], 500);
    assert_eq!(list["workspaces"][0]["limits"]["requests_per_day"], 10000);
    let (status, doc) = get(&server.base, "/api/quota/status", &workspace).await;
    assert_eq!(
        (status, doc["workspace"].as_str()),
        (StatusCode::OK, Some("default"))
    );
    let first_log = server.stderr();
    assert!(server.terminate().await.success());

    let again = Server::start(dir.path(), &env).await;
    assert!(again.printed_keys().is_empty(), "{:?}", again.printed);
    assert_eq!(
        get(&again.base, "/api/workspaces", &admin).await.0,
        StatusCode::OK,
        "the generated admin key persists"
    );
    assert_eq!(
        get(&again.base, "/api/quota/status", &workspace).await.0,
        StatusCode::OK
    );
    // Deleting every workspace does not make the next start bootstrap again.
    let deleted = client()
        .delete(format!("{}/api/workspaces/default", again.base))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let second_log = again.stderr();
    assert!(again.terminate().await.success());
    let third = Server::start(dir.path(), &env).await;
    assert!(third.printed_keys().is_empty(), "{:?}", third.printed);
    let (_, list) = get(&third.base, "/api/workspaces", &admin).await;
    assert_eq!(list["workspaces"], serde_json::json!([]));
    let log = format!("{first_log}{second_log}{}", third.stderr());
    assert!(
        !log.contains(&admin) && !log.contains(&workspace),
        "keys never reach the logs"
    );
    // Only the hash is stored.
    let file = std::fs::read(dir.path().join("fresh.db")).expect("database file");
    let wal = std::fs::read(dir.path().join("fresh.db-wal")).unwrap_or_default();
    for key in [&admin, &workspace] {
        let needle = key.as_bytes();
        assert!(
            !file.windows(needle.len()).any(|w| w == needle)
                && !wal.windows(needle.len()).any(|w| w == needle)
        );
    }
    third.terminate().await;
}

/// Creates a workspace through the admin API and returns a new key for it.
async fn create_workspace(base: &str, workspace: Value) -> String {
    let http = client();
    let id = workspace["id"].as_str().expect("an id").to_owned();
    let created = http
        .post(format!("{base}/api/workspaces"))
        .bearer_auth(ADMIN_KEY)
        .json(&workspace)
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), StatusCode::CREATED);
    let key: Value = http
        .post(format!("{base}/api/workspaces/{id}/keys"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("key")
        .json()
        .await
        .expect("JSON");
    key["key"].as_str().expect("key").to_owned()
}

#[tokio::test]
async fn logs_record_transitions_and_resets_as_json_without_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}", dir.path().join("logs.db").display());
    let env = [
        ("QUOTAWATCH_DATABASE_URL", db.as_str()),
        ("QUOTA_ADMIN_RESET_KEY", ADMIN_KEY),
        ("QUOTAWATCH_LOG_FORMAT", "json"),
    ];
    let server = Server::start(dir.path(), &env).await;
    let http = client();
    let key = create_workspace(
        &server.base,
        serde_json::json!({"id": "acme", "limits": {"requests_per_minute": 1}}),
    )
    .await;
    for _ in 0..2 {
        http.post(format!("{}/api/quota/check", server.base))
            .bearer_auth(&key)
            .send()
            .await
            .expect("check");
    }
    let reset = |bearer: String| {
        let http = http.clone();
        let url = format!("{}/api/quota/reset", server.base);
        async move {
            http.post(url)
                .bearer_auth(bearer)
                .json(&serde_json::json!({"workspace": "acme"}))
                .send()
                .await
                .expect("reset")
                .status()
        }
    };
    assert_eq!(reset(key.clone()).await, StatusCode::FORBIDDEN);
    assert_eq!(
        reset("qw_not_a_key".to_owned()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(reset(ADMIN_KEY.to_owned()).await, StatusCode::OK);
    let stderr_path = server.stderr_path.clone();
    assert!(server.terminate().await.success());
    let log = std::fs::read_to_string(stderr_path).expect("log");
    let lines: Vec<Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"))
        })
        .collect();
    let find = |message: &str| {
        lines
            .iter()
            .filter(|line| {
                line["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(message))
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let transitions = find("status changed");
    let to_limited = transitions
        .iter()
        .find(|line| line["to"] == "rate_limited")
        .expect("the transition to rate_limited is logged");
    assert_eq!(
        (
            to_limited["workspace"].as_str(),
            to_limited["from"].as_str(),
            to_limited["level"].as_str()
        ),
        (Some("acme"), Some("normal"), Some("INFO"))
    );
    assert!(
        to_limited["reasons"]
            .as_str()
            .expect("reasons")
            .contains("requests_per_minute_exhausted")
    );
    assert!(
        transitions
            .iter()
            .any(|line| line["from"] == "rate_limited" && line["to"] == "normal"),
        "the reset's transition"
    );
    let resets = find("reset by admin");
    assert_eq!(resets.len(), 1);
    assert_eq!(resets[0]["what"], "All", "the log says what was reset");
    assert_eq!(
        find("reset refused").len(),
        1,
        "the workspace key's attempt"
    );
    assert!(
        !find("not authenticated").is_empty(),
        "the wrong key's attempt"
    );
    for secret in [ADMIN_KEY, key.as_str(), "qw_not_a_key"] {
        assert!(!log.contains(secret), "a key reached the log");
    }
}

#[tokio::test]
async fn proxy_logs_at_debug_level_hold_no_keys_and_no_prompts() {
    let upstream = Upstream::start(quotawatch::mock::MockOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}", dir.path().join("logs.db").display());
    let env = [
        ("QUOTAWATCH_DATABASE_URL", db.as_str()),
        ("QUOTA_ADMIN_RESET_KEY", ADMIN_KEY),
        ("QUOTAWATCH_LOG", "debug"),
        ("QUOTAWATCH_UPSTREAM_URL", upstream.url.as_str()),
        ("OPENAI_API_KEY", UPSTREAM_KEY),
    ];
    let server = Server::start(dir.path(), &env).await;
    let http = client();
    let key = create_workspace(&server.base, serde_json::json!({"id": "acme"})).await;
    let prompt = "the secret plan is 7f3a9c";
    for (scenario, stream) in [
        ("ok", false),
        ("ok", true),
        ("server_error", false),
        ("stream_break", true),
    ] {
        let response = http
            .post(format!("{}/v1/chat/completions?mock_scenario={scenario}", server.base))
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": prompt}]}))
            .send()
            .await
            .expect("request");
        let _ = response.bytes().await;
    }
    eventually(
        "the calls to be settled",
        Duration::from_secs(5),
        || async {
            let (_, status) = get(&server.base, "/api/quota/status", &key).await;
            (status["errors"]["server_error"] == 2).then_some(())
        },
    )
    .await;
    let stderr_path = server.stderr_path.clone();
    assert!(server.terminate().await.success());
    let log = std::fs::read_to_string(stderr_path).expect("log");
    assert!(
        log.contains("upstream error"),
        "the failure is logged:\n{log}"
    );
    for secret in [ADMIN_KEY, key.as_str(), UPSTREAM_KEY, prompt] {
        assert!(!log.contains(secret), "{secret:?} reached the log");
    }
    assert!(
        !log.contains('\u{1b}'),
        "no colour codes in a log that goes to a file"
    );
}

#[tokio::test]
async fn check_config_prints_the_effective_settings_with_secrets_masked() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("quotawatch.toml"),
        "default_requests_per_minute = 120\n[[workspaces]]\nid = \"acme\"\ntimezone = \"Europe/Berlin\"\n[workspaces.limits]\nrequests_per_day = 5000\n",
    )
    .expect("toml");
    std::fs::write(dir.path().join(".env"), "OPENAI_RATE_LIMIT_PER_DAY=777\n").expect(".env");
    let env = [
        ("QUOTA_ADMIN_RESET_KEY", "a-very-secret-admin-key"),
        (
            "QUOTAWATCH_DATABASE_URL",
            "postgres://app:p@ssw0rd-hunter2@db.internal/quota?password=hunter3&sslmode=require",
        ),
        (
            "QUOTAWATCH_REDIS_URL",
            "redis://:to@ken-hunter4@cache:6379/0",
        ),
    ];
    let (ok, out, err) = run(
        dir.path(),
        &env,
        &["--config", "quotawatch.toml", "check-config"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("configuration is valid"));
    for secret in ["a-very-secret-admin-key", "ssw0rd", "hunter"] {
        assert!(!out.contains(secret), "{secret:?} shown:\n{out}");
    }
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line("OPENAI_RATE_LIMIT_PER_MINUTE").contains("120")
            && line("OPENAI_RATE_LIMIT_PER_MINUTE").contains("quotawatch.toml")
    );
    assert!(
        line("OPENAI_RATE_LIMIT_PER_DAY").contains("777")
            && line("OPENAI_RATE_LIMIT_PER_DAY").contains(".env")
    );
    assert!(line("QUOTA_ADMIN_RESET_KEY").contains("********"));
    assert!(
        line("QUOTAWATCH_DATABASE_URL").contains(
            "postgres://app:********@db.internal/quota?password=********&sslmode=require"
        ),
        "{out}"
    );
    assert!(
        line("QUOTAWATCH_REDIS_URL").contains("redis://:********@cache:6379/0"),
        "{out}"
    );
    assert!(out.contains("declared workspace acme"));

    let (ok, _, err) = run(
        dir.path(),
        &[("OPENAI_RATE_LIMIT_PER_MINUTE", "fast")],
        &["check-config"],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("OPENAI_RATE_LIMIT_PER_MINUTE") && err.contains("environment"),
        "{err}"
    );
    let (ok, _, err) = run(dir.path(), &[], &["--database-url", "ftp://nope", "serve"]).await;
    assert!(!ok, "invalid settings fail start-up");
    assert!(
        err.contains("QUOTAWATCH_DATABASE_URL") && err.contains("command line"),
        "{err}"
    );
}

#[tokio::test]
async fn workspaces_declared_in_the_config_file_are_applied_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("qw.toml"),
        "[[workspaces]]\nid = \"acme\"\nname = \"Acme\"\n[workspaces.limits]\nrequests_per_minute = 7\ntokens_per_day = \"unlimited\"\n",
    )
    .expect("toml");
    let db = format!("sqlite://{}", dir.path().join("qw.db").display());
    let env = [
        ("QUOTAWATCH_DATABASE_URL", db.as_str()),
        ("QUOTA_ADMIN_RESET_KEY", ADMIN_KEY),
    ];
    let mut command = crate::support::binary::command(dir.path(), &env);
    command
        .args(["--config", "qw.toml", "check-config"])
        .stdout(std::process::Stdio::null());
    assert!(command.status().await.expect("runs").success());
    let server = {
        let mut env = env.to_vec();
        env.push(("QUOTAWATCH_LISTEN", "127.0.0.1:0"));
        // `serve` with --config: the file is read and its workspaces applied.
        let mut child = crate::support::binary::command(dir.path(), &env)
            .args(["--config", "qw.toml", "serve"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let base = loop {
            let line = lines.next_line().await.expect("read").expect("a line");
            if let Some(url) = line.strip_prefix("quotawatch listening on ") {
                break url.to_owned();
            }
        };
        (child, base)
    };
    let (_child, base) = server;
    let (status, acme) = get(&base, "/api/workspaces/acme", ADMIN_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(acme["name"], "Acme");
    assert_eq!(acme["limits"]["requests_per_minute"], 7);
    assert_eq!(acme["limits"]["tokens_per_day"], Value::Null);
    let (_, list) = get(&base, "/api/workspaces", ADMIN_KEY).await;
    assert_eq!(
        list["workspaces"].as_array().map(Vec::len),
        Some(1),
        "no default workspace when one is declared"
    );
    // The file manages what it declares: a change through the API, which
    // the next start would revert, is refused, naming the file.
    let changed = crate::support::client()
        .patch(format!("{base}/api/workspaces/acme"))
        .bearer_auth(ADMIN_KEY)
        .json(&serde_json::json!({"limits": {"requests_per_minute": 100}}))
        .send()
        .await
        .expect("request");
    assert_eq!(changed.status(), StatusCode::CONFLICT);
    let body: Value = changed.json().await.expect("JSON");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("qw.toml"), "{message}");
    let (_, acme) = get(&base, "/api/workspaces/acme", ADMIN_KEY).await;
    assert_eq!(acme["limits"]["requests_per_minute"], 7, "unchanged");
}

#[tokio::test]
async fn cli_changes_reach_a_running_server() {
    let server = TestServer::start(&[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [("QUOTAWATCH_DATABASE_URL", server.database_url.as_str())];
    let cli = |args: Vec<&str>| {
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let dir = dir.path().to_owned();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, out, err) = run(&dir, &env, &args).await;
            assert!(ok, "quotawatch {args:?} failed: {err}");
            out
        }
    };
    cli(vec![
        "workspace",
        "add",
        "team",
        "--name",
        "The Team",
        "--requests-per-minute",
        "2",
        "--tokens-per-day",
        "unlimited",
    ])
    .await;
    let created = cli(vec![
        "key",
        "create",
        "team",
        "--scope",
        "read",
        "--scope",
        "report",
        "--name",
        "team UI",
        "--expires",
        "30d",
    ])
    .await;
    let key = created
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("qw_"))
        .expect("key printed")
        .to_owned();
    let key_id = created
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .expect("key id printed")
        .to_owned();
    let doc = eventually(
        "the server to accept the CLI's key",
        Duration::from_secs(10),
        || async {
            let response = server.get("/api/quota/status", &key).await;
            (response.status == StatusCode::OK).then_some(response.body)
        },
    )
    .await;
    assert_eq!(doc["limits"]["requests_per_minute"]["limit"], 2);

    cli(vec![
        "workspace",
        "set",
        "team",
        "--requests-per-minute",
        "5",
        "--timezone",
        "Asia/Tokyo",
    ])
    .await;
    eventually("the new limit", Duration::from_secs(10), || async {
        (server.status(&key).await["limits"]["requests_per_minute"]["limit"] == 5).then_some(())
    })
    .await;
    // Every limit kind has its option, the month's included.
    cli(vec![
        "workspace",
        "set",
        "team",
        "--tokens-per-month",
        "9000",
    ])
    .await;
    eventually("the month limit", Duration::from_secs(10), || async {
        (server.status(&key).await["limits"]["tokens_per_month"]["limit"] == 9000).then_some(())
    })
    .await;
    // A budget is given and listed in dollars.
    cli(vec!["workspace", "set", "team", "--usd-per-day", "12.5"]).await;
    eventually("the budget", Duration::from_secs(10), || async {
        (server.status(&key).await["limits"]["usd_per_day"]["limit"] == 12.5).then_some(())
    })
    .await;
    let header = cli(vec!["workspace", "list"]).await;
    assert!(
        header.contains("REQ/MON") && header.contains("TOK/MON"),
        "{header}"
    );
    assert!(
        header.contains("USD/DAY") && header.contains("$12.50"),
        "{header}"
    );
    let list = cli(vec!["workspace", "list"]).await;
    let row = list
        .lines()
        .find(|l| l.starts_with("team"))
        .expect("team listed");
    assert!(
        row.contains("The Team") && row.contains("Asia/Tokyo") && row.contains('5'),
        "{row}"
    );

    // The key does what its scopes allow, and the list says so.
    let check = server.check(&key, 1).await;
    assert_eq!(check.status, StatusCode::OK, "{:?}", check.body);
    let proxy = server
        .openai(
            "/chat/completions",
            &key,
            json!({"model": "gpt-4o-mini", "messages": []}),
        )
        .await;
    assert_eq!(proxy.status(), StatusCode::FORBIDDEN);
    let listed = cli(vec!["key", "list", "team"]).await;
    let row = listed
        .lines()
        .find(|l| l.starts_with(&key_id))
        .expect("key listed");
    let in_30_days = (chrono::Utc::now() + chrono::Duration::days(30))
        .format("%Y-%m-%d")
        .to_string();
    assert!(
        row.contains("team UI") && row.contains("report,read") && row.contains(&in_30_days),
        "{listed}"
    );
    let (ok, _, err) = run(
        dir.path(),
        &env,
        &["key", "create", "team", "--expires", "30"],
    )
    .await;
    assert!(!ok && err.contains("needs a unit"), "{err}");

    // A service key made on the command line acts for the workspace a
    // request names, on the running server.
    let created = cli(vec![
        "key",
        "create",
        "--service",
        "--for",
        "team",
        "--name",
        "backend",
    ])
    .await;
    let service_key = created
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("qw_"))
        .expect("key printed")
        .to_owned();
    let doc = eventually(
        "the service key to work",
        Duration::from_secs(10),
        || async {
            let response = server
                .client
                .get(server.url("/api/quota/status"))
                .bearer_auth(&service_key)
                .header("X-Quotawatch-Workspace", "team")
                .send()
                .await
                .expect("request");
            (response.status() == StatusCode::OK).then_some(response)
        },
    )
    .await;
    let doc: Value = doc.json().await.expect("JSON");
    assert_eq!(doc["workspace"], "team");
    let services = cli(vec!["key", "list", "--service"]).await;
    assert!(
        services.contains("backend") && services.contains("service (team)"),
        "{services}"
    );

    cli(vec!["key", "revoke", &key_id]).await;
    eventually(
        "the revoked key to stop working",
        Duration::from_secs(10),
        || async {
            (server.get("/api/quota/status", &key).await.status == StatusCode::UNAUTHORIZED)
                .then_some(())
        },
    )
    .await;
    cli(vec!["workspace", "remove", "team"]).await;
    eventually(
        "the workspace to disappear",
        Duration::from_secs(10),
        || async {
            (server
                .get("/api/quota/status?workspace=team", ADMIN_KEY)
                .await
                .status
                == StatusCode::NOT_FOUND)
                .then_some(())
        },
    )
    .await;

    let (ok, _, err) = run(dir.path(), &env, &["workspace", "add", "Not Valid!"]).await;
    assert!(!ok);
    assert!(err.contains("workspace id"), "{err}");
    let (ok, _, err) = run(
        dir.path(),
        &env,
        &["workspace", "add", "x", "--requests-per-minute", "lots"],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("lots"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn the_status_command_prints_a_table_from_a_running_server() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(serde_json::json!({"id": "acme", "limits": {"requests_per_minute": 10, "requests_per_day": 100, "tokens_per_minute": null, "tokens_per_day": null}})).await;
    server.check(&key, 25).await;
    // Another workspace spends: 1,000 prompt tokens of gpt-4o-mini at
    // $0.15/M and of gpt-4o at $2.50/M.
    let beta = server.workspace(serde_json::json!({"id": "beta"})).await;
    for model in ["gpt-4o-mini", "gpt-4o"] {
        let usage = serde_json::json!({"prompt_tokens": 1000, "completion_tokens": 0});
        let reported = server
            .post(
                "/api/quota/usage",
                &beta,
                serde_json::json!({"model": model, "usage": usage}),
            )
            .await;
        assert_eq!(reported.status, StatusCode::ACCEPTED, "{:?}", reported.body);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, out, err) = run(
        dir.path(),
        &[("QUOTAWATCH_KEY", ADMIN_KEY)],
        &["status", "--url", &server.base],
    )
    .await;
    assert!(ok, "{err}");
    let header = out.lines().next().expect("header");
    assert!(
        header.starts_with("WORKSPACE") && header.contains("STATUS") && header.contains("REQ/DAY"),
        "{out}"
    );
    let acme = out
        .lines()
        .find(|l| l.starts_with("acme"))
        .expect("acme row");
    assert!(
        acme.contains("normal") && acme.contains("1/10") && acme.contains("1/100 resets in"),
        "{acme}"
    );
    // Tokens have no limit here, and are shown all the same (per minute,
    // day and month).
    assert_eq!(acme.matches("25 (no limit)").count(), 3, "{acme}");
    assert!(out.lines().any(|l| l.starts_with("default")));
    // Then what each spent, by model this month, most first.
    let spend: Vec<&str> = out
        .lines()
        .skip_while(|line| !line.is_empty())
        .skip(1)
        .collect();
    assert!(
        spend[0].starts_with("WORKSPACE") && spend[0].contains("SPENT TODAY"),
        "{out}"
    );
    let beta_spend = spend
        .iter()
        .find(|line| line.starts_with("beta"))
        .expect("beta's spend");
    let columns: Vec<&str> = beta_spend
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        columns,
        [
            "beta",
            "$0.00265",
            "$0.00265",
            "gpt-4o $0.0025, gpt-4o-mini $0.00015"
        ],
        "{out}"
    );
    assert!(
        spend
            .iter()
            .any(|line| line.starts_with("acme") && line.contains("$0.00"))
    );
    assert_eq!(spend.last(), Some(&"Prices as of 2026-12-02."), "{out}");
    let (ok, out, _) = run(
        dir.path(),
        &[("QUOTAWATCH_KEY", &key)],
        &["status", "--url", &server.base],
    )
    .await;
    assert!(ok);
    assert_eq!(
        out.lines().take_while(|line| !line.is_empty()).count(),
        2,
        "a workspace key sees one row: {out}"
    );
    let (ok, _, err) = run(
        dir.path(),
        &[("QUOTAWATCH_KEY", "qw_wrong")],
        &["status", "--url", &server.base],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn logs_at_trace_level_hold_no_passwords_keys_or_tickets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}", dir.path().join("trace.db").display());
    // Nothing listens on port 1: the Redis client fails, and says so.
    let redis = "redis://:p@ss-hunter5@127.0.0.1:1/0?password=hunter6";
    let env = [
        ("QUOTAWATCH_DATABASE_URL", db.as_str()),
        ("QUOTA_ADMIN_RESET_KEY", ADMIN_KEY),
        ("QUOTAWATCH_LOG", "trace"),
        ("QUOTAWATCH_REDIS_URL", redis),
    ];
    let server = Server::start(dir.path(), &env).await;
    let key = create_workspace(&server.base, serde_json::json!({"id": "acme"})).await;
    let http = client();
    let ticket: Value = http
        .post(format!("{}/api/quota/ws-ticket", server.base))
        .bearer_auth(&key)
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("ticket")
        .json()
        .await
        .expect("JSON");
    let ticket = ticket["ticket"].as_str().expect("a ticket").to_owned();
    let ws_base = server.base.replacen("http", "ws", 1);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{ws_base}/api/quota/ws?ticket={ticket}"))
            .await
            .expect("the ticket opens the WebSocket");
    assert!(
        futures_util::StreamExt::next(&mut ws).await.is_some(),
        "a first message"
    );
    drop(ws);
    // A key put in a query string by mistake, and a ticket nobody issued.
    let _ = http
        .get(format!(
            "{}/api/quota/status?api_key={key}&ticket=wst_hunter7hunter7",
            server.base
        ))
        .send()
        .await
        .expect("request");
    let stderr_path = server.stderr_path.clone();
    assert!(server.terminate().await.success());
    let log = std::fs::read_to_string(stderr_path).expect("log");
    assert!(
        log.contains("/api/quota/ws?ticket=********"),
        "the request URI is logged, masked:\n{log}"
    );
    for secret in [
        ADMIN_KEY,
        key.as_str(),
        ticket.as_str(),
        "hunter5",
        "hunter6",
        "hunter7",
    ] {
        assert!(!log.contains(secret), "{secret:?} reached the log");
    }
}
