//! The JavaScript packages as a user installs them: `npm pack` of
//! `clients/js` and `clients/react`, installed together into a fresh
//! project, used from Node.js against a running quotawatch, with a key and
//! with browser tokens from `getToken`. Needs
//! `QUOTAWATCH_TEST_NPM` (the `npm` executable; `node` beside it) and the
//! npm registry for React and `ws`.

use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{ADMIN_KEY, TestServer, output_of, test_tool};

/// Runs `program` in `dir`, failing the test with its output when it fails.
async fn run(program: &str, args: &[&str], dir: &Path) -> String {
    output_of(
        tokio::process::Command::new(program)
            .args(args)
            .current_dir(dir),
    )
    .await
}

/// `npm pack` of one package of `clients/`, into `into`; the tarball's path.
async fn pack(npm: &str, package: &str, into: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(package);
    let destination = into.to_str().expect("a UTF-8 path");
    let printed = run(npm, &["pack", "--pack-destination", destination], &source).await;
    let name = printed.lines().last().expect("the tarball's name").trim();
    into.join(name)
}

const SMOKE: &str = r#"
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { QuotaMonitor } from "@quotawatch/client";
import { useQuotaMonitor, QuotaNotification, QuotaToast } from "@quotawatch/react";
import { WebSocket } from "ws";

const [baseUrl, token, browserToken, browserTokenExpiresAt] = process.argv.slice(2);
const reactEntry = createRequire(import.meta.url).resolve("@quotawatch/react");
const firstLine = readFileSync(reactEntry, "utf8").split("\n")[0];

let plainError = null;
try {
  new QuotaMonitor({ baseUrl, token, WebSocket: globalThis.WebSocket ?? null }).subscribe();
} catch (error) {
  plainError = error.message;
}

const monitor = new QuotaMonitor({ baseUrl, token, WebSocket });
const status = await monitor.getStatus();
const live = await new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error("no live status within 10 s")), 10_000);
  monitor.subscribe((event) => {
    if (event.type === "status") {
      clearTimeout(timer);
      resolve(event);
    }
  });
});
monitor.close();

// A browser token whose first answer from the backend quotawatch refuses:
// the library asks getToken again and sends the request once more.
let tokenCalls = 0;
const renewing = new QuotaMonitor({
  baseUrl,
  WebSocket,
  getToken: async () => {
    tokenCalls += 1;
    return tokenCalls === 1
      ? "qwt_refused"
      : { token: browserToken, expiresAt: browserTokenExpiresAt };
  },
});
const renewed = await renewing.getStatus();

console.log(JSON.stringify({
  status: status.status,
  live: live.workspace,
  react: [useQuotaMonitor, QuotaNotification, QuotaToast].every((f) => typeof f === "function"),
  firstLine,
  node: process.versions.node,
  plainError,
  renewed: renewed.status,
  tokenCalls,
}));
"#;

#[tokio::test]
async fn the_packed_clients_install_together_and_work_on_node() {
    let Some(npm) = test_tool(
        "QUOTAWATCH_TEST_NPM",
        "the npm executable, and the npm registry",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let client = pack(&npm, "js", dir.path()).await;
    let react = pack(&npm, "react", dir.path()).await;
    let app = dir.path().join("app");
    std::fs::create_dir(&app).expect("app dir");
    std::fs::write(
        app.join("package.json"),
        json!({"name": "fresh-app", "private": true, "type": "module"}).to_string(),
    )
    .expect("package.json");
    run(
        &npm,
        &[
            "install",
            "--no-audit",
            "--no-fund",
            client.to_str().expect("path"),
            react.to_str().expect("path"),
            "react@19",
            "react-dom@19",
            "ws@8",
        ],
        &app,
    )
    .await;
    std::fs::write(app.join("smoke.mjs"), SMOKE).expect("smoke.mjs");

    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let minted = server
        .post("/api/tokens", ADMIN_KEY, json!({"workspace": "acme"}))
        .await;
    assert_eq!(minted.status, StatusCode::CREATED, "{}", minted.body);
    let browser_token = minted.body["token"].as_str().expect("a token");
    let expires_at = minted.body["expires_at"].as_str().expect("an expiry");
    let printed = run(
        "node",
        &["smoke.mjs", &server.base, &key, browser_token, expires_at],
        &app,
    )
    .await;
    let result: Value = serde_json::from_str(printed.trim()).expect("the smoke test's JSON");
    assert_eq!(result["status"], "normal", "{result}");
    assert_eq!(result["live"], "acme", "{result}");
    assert_eq!(result["react"], true, "{result}");
    assert_eq!(result["firstLine"], "\"use client\";", "{result}");
    assert_eq!(result["renewed"], "normal", "{result}");
    assert_eq!(result["tokenCalls"], 2, "{result}");
    // Node.js 20 has no WebSocket of its own: the library says what to do.
    let node_major: u32 = result["node"]
        .as_str()
        .and_then(|version| version.split('.').next()?.parse().ok())
        .expect("a Node.js version");
    if node_major < 22 {
        let message = result["plainError"]
            .as_str()
            .expect("an error on Node.js 20");
        assert!(
            message.contains("needs a WebSocket implementation"),
            "{message}"
        );
    }
    server.stop().await;
}
