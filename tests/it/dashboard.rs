//! The dashboard in a real headless Chromium, against a real quotawatch
//! proxying the mock upstream: sign-in, live gauges, a billing block with
//! its toast and suggested actions, reset, admin actions, isolation between
//! workspace keys, reconnecting, phone width and dark mode, and the Alerts
//! page with its delivery log. Screenshots go to `target/screenshots/`.

use std::time::{Duration, Instant};

use quotawatch::mock::MockOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::alerts::a_timezone_at_midday;
use crate::support::browser::{Browser, PATIENCE};
use crate::support::{ADMIN_KEY, TestServer, Upstream, eventually};

/// The requests-per-minute gauge's figures on a workspace's own page.
const RPM_GAUGE: &str = "[data-limit=requests_per_minute] [data-role=usage]";

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 20})
}

/// A proxied chat completion with `key`; `scenario` picks the mock's answer.
async fn call(server: &TestServer, key: &str, scenario: &str) -> StatusCode {
    let response = server
        .client
        .post(server.url(&format!("/v1/chat/completions?mock_scenario={scenario}")))
        .bearer_auth(key)
        .json(&chat())
        .send()
        .await
        .expect("request");
    let status = response.status();
    response.bytes().await.expect("body");
    status
}

async fn setup() -> (Upstream, TestServer, String, String) {
    let upstream = Upstream::start(MockOptions::default()).await;
    let server = TestServer::proxying(&upstream, &[]).await;
    let acme = server
        .workspace(json!({"id": "acme", "name": "Acme Corp", "limits": {"requests_per_minute": 100, "tokens_per_day": 100000}}))
        .await;
    let beta = server
        .workspace(
            json!({"id": "beta", "name": "Beta Labs", "limits": {"requests_per_minute": 50}}),
        )
        .await;
    (upstream, server, acme, beta)
}

async fn sign_in(browser: &Browser, server: &TestServer, key: &str) {
    browser
        .client
        .goto(&server.url("/"))
        .await
        .expect("open the dashboard");
    browser.type_into("#key", key).await;
    browser.click("form.sign-in button[type=submit]").await;
    browser
        .wait_text("#connection", PATIENCE, |text| text.contains("Live"))
        .await;
}

/// The lowest contrast ratio (WCAG) between the text and the background of
/// the page's text elements.
const LOWEST_CONTRAST: &str = r#"
const luminance = (color) => {
  const [r, g, b] = color.match(/[\d.]+/g).slice(0, 3).map(Number).map((v) => {
    v /= 255;
    return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const background = (element) => {
  for (; element; element = element.parentElement) {
    const color = getComputedStyle(element).backgroundColor;
    if (color !== "rgba(0, 0, 0, 0)" && color !== "transparent") return color;
  }
  return "rgb(255, 255, 255)";
};
const ratio = (a, b) => {
  const [light, dark] = [luminance(a), luminance(b)].sort((x, y) => y - x);
  return (light + 0.05) / (dark + 0.05);
};
const texts = document.querySelectorAll(
  ".badge, .card h2 a, .id, .resets, .facts dt, .facts dd, .gauge-label, .summary, .button, label, .toast p, .connection-text"
);
return Math.min(...[...texts].map((e) => ratio(getComputedStyle(e).color, background(e))));
"#;

fn card(workspace: &str) -> String {
    format!("li.card[data-workspace=\"{workspace}\"]")
}

#[tokio::test]
async fn the_dashboard_follows_usage_blocks_and_resets_live() {
    let Some(browser) = Browser::start("the_dashboard_follows_usage_blocks_and_resets_live").await
    else {
        return;
    };
    let (_upstream, server, acme, _beta) = setup().await;
    sign_in(&browser, &server, ADMIN_KEY).await;
    browser.find(&card("beta")).await;
    let usage = format!(
        "{} [data-limit=requests_per_minute] [data-role=usage]",
        card("acme")
    );
    browser
        .wait_text(&usage, PATIENCE, |text| text.starts_with("0 / 100"))
        .await;

    // A call through the proxy moves the gauge without a reload, within a
    // second of the call's end (usage is pushed twice a second).
    assert_eq!(call(&server, &acme, "ok").await, StatusCode::OK);
    let (_, took) = browser
        .wait_text(&usage, Duration::from_secs(1), |text| {
            text.starts_with("1 / 100")
        })
        .await;
    println!("the gauge moved {took:?} after the call ended");
    // Usage is shown whether or not a limit is set: beta has no token
    // limit, acme's tokens show all the same.
    browser
        .wait_text(&format!("{} .usage", card("acme")), PATIENCE, |text| {
            text.starts_with("Today: 1 requests")
        })
        .await;
    browser
        .wait_text(&format!("{} .usage", card("beta")), PATIENCE, |text| {
            text.starts_with("Today: 0 requests · 0 tokens")
        })
        .await;

    // OpenAI's billing 429 blocks the workspace: badge, toast, worst first.
    assert_eq!(
        call(&server, &acme, "insufficient_quota").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    browser
        .wait_text(&format!("{} .badge", card("acme")), PATIENCE, |text| {
            text.contains("Quota exceeded")
        })
        .await;
    let (toast, _) = browser
        .wait_text(".toast[data-workspace=acme]", PATIENCE, |text| {
            text.contains("quota exceeded")
        })
        .await;
    assert!(toast.contains("Acme Corp"), "{toast}");
    assert!(toast.contains("OpenAI billing quota exhausted"), "{toast}");
    let first = browser
        .script("return document.querySelector('li.card:not([hidden])').dataset.workspace")
        .await;
    assert_eq!(first, json!("acme"), "the blocked workspace comes first");
    let contrast = browser.script(LOWEST_CONTRAST).await;
    assert!(
        contrast.as_f64().expect("a ratio") >= 4.5,
        "contrast {contrast}"
    );

    // Filtering by name hides the others.
    browser.type_into("#workspace-filter", "beta l").await;
    browser
        .wait_text(".summary", PATIENCE, |text| text.starts_with("1 of 3"))
        .await;
    let visible = browser
        .script("return [...document.querySelectorAll('li.card:not([hidden])')].map(c => c.dataset.workspace)")
        .await;
    assert_eq!(visible, json!(["beta"]));
    // Cleared as a user does (WebDriver's clear fires no input event):
    // select all, then delete.
    browser
        .find("#workspace-filter")
        .await
        .send_keys("\u{e009}a\u{e000}\u{e003}")
        .await
        .expect("clear the filter");
    browser
        .wait_text(".summary", PATIENCE, |text| {
            text.starts_with("3 workspaces")
        })
        .await;
    browser.screenshot("overview-desktop").await;

    // The detail page explains what to do.
    browser.click(&format!("{} h2 a", card("acme"))).await;
    let (actions, _) = browser
        .wait_text(
            ".notification[data-kind=upstream_quota_exhausted] .suggested-actions",
            PATIENCE,
            |text| !text.is_empty(),
        )
        .await;
    assert!(actions.contains("billing settings"), "{actions}");
    browser.find(".chart-figure svg").await;
    browser.screenshot("detail-desktop").await;

    // Lifting the block from the UI, after a confirmation, returns it to
    // normal and keeps the counts.
    let before = server.status(&acme).await["limits"]["requests_per_minute"]["used"].clone();
    browser.click("button[data-action=lift]").await;
    browser.click("dialog[open] button[value=confirm]").await;
    browser
        .wait_text("[data-role=status] .badge", PATIENCE, |text| {
            text.contains("Normal")
        })
        .await;
    browser
        .wait_text(".toast[data-workspace=acme]", PATIENCE, |text| {
            text.contains("back to normal")
        })
        .await;
    let status: Value = server.status(&acme).await;
    assert_eq!(status["status"], "normal");
    assert_eq!(
        status["limits"]["requests_per_minute"]["used"], before,
        "lifting the block keeps the counts"
    );
    // Good news dismisses itself.
    browser.wait_gone(".toast[data-workspace=acme]").await;
    assert_eq!(
        call(&server, &acme, "ok").await,
        StatusCode::OK,
        "requests flow again"
    );
    // Resetting the usage sets the counters back to zero.
    browser.click("button.danger").await;
    browser.click("dialog[open] button[value=confirm]").await;
    browser
        .wait_text(RPM_GAUGE, PATIENCE, |text| text.starts_with("0 / 100"))
        .await;

    // The phone layout: one column, nothing wider than the screen.
    browser
        .client
        .goto(&server.url("/#/"))
        .await
        .expect("overview");
    browser.viewport(390, 844, true).await;
    browser.find(&card("acme")).await;
    let width = browser
        .script("return document.documentElement.scrollWidth")
        .await;
    assert!(
        width.as_i64().expect("a number") <= 390,
        "the page is {width}px wide"
    );
    browser.screenshot("overview-mobile").await;

    // Dark mode follows the system setting.
    browser.color_scheme("dark").await;
    let background = browser
        .script("return getComputedStyle(document.body).backgroundColor")
        .await;
    assert_eq!(background, json!("rgb(17, 19, 24)"));
    let contrast = browser.script(LOWEST_CONTRAST).await;
    assert!(
        contrast.as_f64().expect("a ratio") >= 4.5,
        "dark contrast {contrast}"
    );
    browser.screenshot("overview-mobile-dark").await;
    browser.viewport(1280, 900, false).await;
    browser.screenshot("overview-desktop-dark").await;
    browser.close().await;
    server.stop().await;
}

#[tokio::test]
async fn admins_create_workspaces_change_limits_and_manage_keys_from_the_ui() {
    let Some(browser) =
        Browser::start("admins_create_workspaces_change_limits_and_manage_keys_from_the_ui").await
    else {
        return;
    };
    let (_upstream, server, _acme, _beta) = setup().await;
    sign_in(&browser, &server, ADMIN_KEY).await;

    browser.click("main .toolbar button").await;
    browser
        .type_into("dialog[open] input[name=id]", "gamma")
        .await;
    browser
        .type_into("dialog[open] input[name=name]", "Gamma Inc")
        .await;
    browser
        .type_into("dialog[open] input[name=tokens_per_minute]", "5000")
        .await;
    browser.click("dialog[open] button[type=submit]").await;
    let (first_key, _) = browser
        .wait_text("dialog[open] code.secret-value", PATIENCE, |text| {
            text.starts_with("qw_")
        })
        .await;
    let seen = server.get("/api/quota/status", &first_key).await;
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(seen.body["workspace"], "gamma", "the key shown works");
    assert_eq!(seen.body["limits"]["tokens_per_minute"]["limit"], 5000);
    // Copy puts the key on the clipboard, or, where the browser refuses,
    // selects it for copying by hand.
    browser.click("dialog[open] .secret button").await;
    browser
        .wait_text("dialog[open] [role=status]", PATIENCE, |text| {
            text.contains("Copied") || text.contains("Selected")
        })
        .await;
    browser.click("dialog[open] .actions button").await;
    browser.wait_gone("dialog[open]").await;
    browser.find(&card("gamma")).await;

    // Change a limit.
    browser.click(&format!("{} h2 a", card("gamma"))).await;
    browser.click(".detail-head button.subtle").await;
    browser
        .type_into("dialog[open] input[name=requests_per_minute]", "7")
        .await;
    browser.click("dialog[open] button[type=submit]").await;
    browser.wait_gone("dialog[open]").await;
    browser
        .wait_text(RPM_GAUGE, PATIENCE, |text| text.contains("/ 7 "))
        .await;
    let config = server.get("/api/workspaces/gamma", ADMIN_KEY).await;
    assert_eq!(config.body["limits"]["requests_per_minute"], 7);
    assert_eq!(
        config.body["limits"]["tokens_per_minute"], 5000,
        "other limits kept"
    );

    // Revoke the first key, create another one.
    let prefix = &first_key[..7];
    browser
        .wait_text("table.keys tbody", PATIENCE, |text| text.contains(prefix))
        .await;
    browser.click("table.keys button").await;
    browser.click("dialog[open] button[value=confirm]").await;
    browser
        .wait_text("table.keys tbody", PATIENCE, |text| {
            text.contains("revoked")
        })
        .await;
    let refused = server.get("/api/quota/status", &first_key).await;
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "the revoked key is refused"
    );
    // A read-only key for a tenant's page, named, expiring in 30 days.
    browser.click(".panel .actions button").await;
    browser
        .type_into("dialog[open] input[name=name]", "tenant page")
        .await;
    browser.click("dialog[open] input[name=proxy]").await;
    browser.click("dialog[open] input[name=report]").await;
    browser
        .type_into("dialog[open] input[name=days]", "30")
        .await;
    browser.click("dialog[open] button[type=submit]").await;
    let (second_key, _) = browser
        .wait_text("dialog[open] code.secret-value", PATIENCE, |text| {
            text.starts_with("qw_")
        })
        .await;
    assert_ne!(second_key, first_key);
    assert_eq!(
        server.get("/api/quota/status", &second_key).await.status,
        StatusCode::OK
    );
    let check = server.check(&second_key, 1).await;
    assert_eq!(check.status, StatusCode::FORBIDDEN, "a read-only key");
    browser.click("dialog[open] .actions button").await;
    let (row, _) = browser
        .wait_text("table.keys tbody", PATIENCE, |text| {
            text.contains("tenant page")
        })
        .await;
    assert!(
        row.contains("read") && row.contains("active until"),
        "{row}"
    );
    browser.screenshot("keys").await;
    browser.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_workspace_key_sees_only_its_workspace() {
    let Some(browser) = Browser::start("a_workspace_key_sees_only_its_workspace").await else {
        return;
    };
    let (_upstream, server, _acme, beta) = setup().await;
    // Signed in with the keyboard alone: the key, then Enter.
    browser
        .client
        .goto(&server.url("/"))
        .await
        .expect("open the dashboard");
    browser.type_into("#key", &format!("{beta}\u{e007}")).await;
    browser
        .wait_text("#connection", PATIENCE, |text| text.contains("Live"))
        .await;
    browser.find(&card("beta")).await;
    let cards = browser
        .script("return document.querySelectorAll('li.card').length")
        .await;
    assert_eq!(cards, json!(1));
    let admin_buttons = browser
        .script("return document.querySelectorAll('main .toolbar button, button.danger').length")
        .await;
    assert_eq!(
        admin_buttons,
        json!(0),
        "no admin actions for a workspace key"
    );
    // Links work from the keyboard, and the page shows no admin actions.
    browser
        .find(&format!("{} h2 a", card("beta")))
        .await
        .send_keys("\u{e007}")
        .await
        .expect("Enter on the link");
    browser
        .wait_text("main h1", PATIENCE, |text| text == "Beta Labs")
        .await;
    assert!(browser.text(".detail-head .actions").await.is_none());
    browser
        .client
        .goto(&server.url("/#/w/acme"))
        .await
        .expect("navigate");
    browser
        .wait_text("main h1", PATIENCE, |text| text.contains("not found"))
        .await;
    let page = browser.script("return document.body.innerText").await;
    assert!(
        !page.as_str().expect("text").contains("Acme"),
        "nothing of acme shows"
    );
    browser.screenshot("workspace-key-desktop").await;

    // The Alerts page is the admin's: no navigation to it, and its address
    // shows the workspaces instead.
    let nav_hidden = browser
        .script("return document.getElementById('nav').hidden")
        .await;
    assert_eq!(nav_hidden, json!(true), "no Alerts navigation");
    browser
        .client
        .goto(&server.url("/#/alerts"))
        .await
        .expect("navigate");
    browser
        .wait_text("main h1", PATIENCE, |text| text == "Workspaces")
        .await;
    assert!(browser.text("[data-page=alerts]").await.is_none());

    // Every form control has a label, and the key never reaches the URL.
    let unlabelled = browser
        .script("return [...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels || e.labels.length === 0).length")
        .await;
    assert_eq!(unlabelled, json!(0));
    let url = browser.client.current_url().await.expect("url");
    assert!(!url.as_str().contains(&beta));
    browser.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_dashboard_reconnects_and_resyncs_after_the_server_restarts() {
    let Some(browser) =
        Browser::start("the_dashboard_reconnects_and_resyncs_after_the_server_restarts").await
    else {
        return;
    };
    let (_upstream, mut server, acme, _beta) = setup().await;
    sign_in(&browser, &server, ADMIN_KEY).await;
    browser.find(&card("acme")).await;
    browser.find("#connection[data-opened='1']").await;
    let started = Instant::now();
    server.restart().await;
    // The connection was lost and opened again: counted by the page, as the
    // "Reconnecting" it shows meanwhile can come and go between two looks.
    browser.find("#connection[data-opened='2']").await;
    browser
        .wait_text("#connection", PATIENCE, |text| text.contains("Live"))
        .await;
    println!(
        "reconnected {:?} after the restart began",
        started.elapsed()
    );
    // Live again: a call after the reconnect moves the gauge.
    assert_eq!(call(&server, &acme, "ok").await, StatusCode::OK);
    let usage = format!(
        "{} [data-limit=requests_per_minute] [data-role=usage]",
        card("acme")
    );
    browser
        .wait_text(&usage, PATIENCE, |text| text.starts_with("1 / 100"))
        .await;
    browser.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_dashboard_and_client_library_are_served_from_the_binary() {
    let server = TestServer::start(&[]).await;
    let page = server
        .client
        .get(server.url("/"))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    let header = |response: &reqwest::Response, name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_default()
    };
    assert!(header(&page, "content-type").starts_with("text/html"));
    let policy = header(&page, "content-security-policy");
    assert!(
        policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"),
        "{policy}"
    );
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");
    assert!(
        page.text()
            .await
            .expect("html")
            .contains("/dashboard/app.js")
    );

    for (path, content_type, needle) in [
        (
            "/sdk/quota-client.js",
            "text/javascript",
            "export class QuotaMonitor",
        ),
        (
            "/sdk/quota-client.d.ts",
            "application/typescript",
            "export class QuotaMonitor",
        ),
        ("/dashboard/app.js", "text/javascript", "QuotaMonitor"),
        (
            "/dashboard/style.css",
            "text/css",
            "prefers-color-scheme: dark",
        ),
    ] {
        let response = server
            .client
            .get(server.url(path))
            .send()
            .await
            .expect("asset");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(
            header(&response, "content-type").starts_with(content_type),
            "{path}"
        );
        let etag = header(&response, "etag");
        assert!(
            response.text().await.expect("text").contains(needle),
            "{path}"
        );
        // Unchanged: the browser's cached copy is confirmed, not sent again.
        let again = server
            .client
            .get(server.url(path))
            .header("if-none-match", &etag)
            .send()
            .await
            .expect("asset");
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
    }
    let missing = server.get("/dashboard/nope.js", "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error_code(), "unknown_route");
    server.stop().await;
}

/// A call of `model` reported after the fact with `prompt` prompt tokens.
async fn report(server: &TestServer, key: &str, model: &str, prompt: u64) {
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": 0});
    let reported = server
        .post(
            "/api/quota/usage",
            key,
            json!({"model": model, "usage": usage}),
        )
        .await;
    assert_eq!(reported.status, StatusCode::ACCEPTED, "{:?}", reported.body);
}

#[tokio::test]
async fn budgets_read_in_dollars_and_cost_by_model_is_charted_live() {
    let Some(browser) =
        Browser::start("budgets_read_in_dollars_and_cost_by_model_is_charted_live").await
    else {
        return;
    };
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme", "name": "Acme Corp", "limits": {"usd_per_day": 1}}))
        .await;
    // 100,000 prompt tokens of gpt-4o at $2.50/M: $0.25; of gpt-4o-mini at
    // $0.15/M: $0.015.
    report(&server, &key, "gpt-4o", 100_000).await;
    report(&server, &key, "gpt-4o-mini", 100_000).await;
    sign_in(&browser, &server, ADMIN_KEY).await;
    browser
        .client
        .goto(&server.url("/#/w/acme"))
        .await
        .expect("navigate");
    let budget = "[data-limit=usd_per_day][data-unit=usd] [data-role=usage]";
    browser
        .wait_text(budget, PATIENCE, |text| text == "$0.265 / $1.00 (27%)")
        .await;
    browser
        .wait_text("[data-role=spend]", PATIENCE, |text| {
            text == "Today $0.265 · this month $0.265 · prices of 2026-12-02"
        })
        .await;
    let models = browser
        .script("return [...document.querySelectorAll('.cost-bars li')].map(li => li.dataset.model + ' ' + li.querySelector('[data-role=cost]').textContent)")
        .await;
    assert_eq!(models, json!(["gpt-4o $0.25", "gpt-4o-mini $0.015"]));

    // A new call moves the gauge and the chart without a reload.
    report(&server, &key, "gpt-4o-mini", 2_000_000).await;
    browser
        .wait_text(budget, PATIENCE, |text| text == "$0.565 / $1.00 (56%)")
        .await;
    browser
        .wait_text(
            ".cost-bars li:first-child [data-role=cost]",
            PATIENCE,
            |text| text == "$0.315",
        )
        .await;
    let first = browser
        .script("return document.querySelector('.cost-bars li').dataset.model")
        .await;
    assert_eq!(first, json!("gpt-4o-mini"), "most spent first");
    browser.screenshot("spend-desktop").await;
    browser.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_workspace_page_shows_when_a_limit_runs_out_at_its_pace() {
    let Some(browser) =
        Browser::start("a_workspace_page_shows_when_a_limit_runs_out_at_its_pace").await
    else {
        return;
    };
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(
            json!({"id": "pace", "name": "Pace", "timezone": a_timezone_at_midday(),
            "limits": {"requests_per_minute": 100, "requests_per_day": 1, "tokens_per_day": 1000},
            "alert_thresholds": {"default": []}}),
        )
        .await;
    // Half a day's average pace uses the last token in under a minute, and
    // the day's one request is used.
    assert_eq!(server.check(&key, 999).await.status, StatusCode::OK);
    sign_in(&browser, &server, &key).await;
    browser
        .client
        .goto(&server.url("/#/w/pace"))
        .await
        .expect("open the workspace's page");
    let tokens = "[data-limit=tokens_per_day] [data-role=forecast]";
    browser
        .wait_text(tokens, PATIENCE, |text| {
            text.starts_with("At this pace tokens_per_day runs out at ")
        })
        .await;
    // The time is the browser's local time of the instant the server gave
    // (read with the sentence at once, as the next update may move it).
    let shown = browser
        .script(&format!(
            "const line = document.querySelector({tokens:?}); \
             const at = new Date(line.dataset.exhaustsAt); \
             return [line.textContent, \
                     at.toLocaleTimeString('en-GB', {{hour: '2-digit', minute: '2-digit'}})]"
        ))
        .await;
    let (sentence, time) = (
        shown[0].as_str().expect("the sentence"),
        shown[1].as_str().expect("the time"),
    );
    // (After the date, should the run-out fall on another local day.)
    assert!(
        sentence.starts_with("At this pace tokens_per_day runs out at ")
            && sentence.contains(&format!("{time}, ")),
        "{sentence} names {time}"
    );
    assert!(sentence.ends_with("before it resets"), "{sentence}");
    browser
        .wait_text(
            "[data-limit=requests_per_day] [data-role=forecast]",
            PATIENCE,
            |text| text.starts_with("requests_per_day is used up; it resets at "),
        )
        .await;
    // One request in the last 10 seconds does not run out a minute's 100.
    assert!(
        browser
            .text("[data-limit=requests_per_minute] [data-role=forecast]")
            .await
            .is_none()
    );
    browser
        .script(&format!(
            "document.querySelector({tokens:?}).scrollIntoView({{block: 'center'}})"
        ))
        .await;
    browser.screenshot("forecast").await;
    browser.close().await;
    server.stop().await;
}

#[tokio::test]
async fn admins_add_test_and_disable_alert_channels_from_the_ui() {
    let Some(browser) =
        Browser::start("admins_add_test_and_disable_alert_channels_from_the_ui").await
    else {
        return;
    };
    let receiver = crate::alerts_delivery::Receiver::start(&[]).await;
    let (_upstream, server, _acme, _beta) = setup().await;
    sign_in(&browser, &server, ADMIN_KEY).await;
    browser.click(&format!("{} h2 a", card("acme"))).await;
    browser
        .wait_text("#channels-title", PATIENCE, |text| text == "Alert channels")
        .await;
    browser
        .click("section[aria-labelledby=channels-title] .actions button")
        .await;
    browser
        .type_into("dialog[open] input[name=name]", "acme on-call")
        .await;
    browser
        .type_into("dialog[open] input[name=url]", &receiver.url)
        .await;
    browser
        .type_into(
            "dialog[open] input[name=events]",
            "threshold_crossed, forecast_exhaustion",
        )
        .await;
    browser.click("dialog[open] button[type=submit]").await;
    let (secret, _) = browser
        .wait_text("dialog[open] code.secret-value", PATIENCE, |text| {
            text.starts_with("whsec_")
        })
        .await;
    browser.click("dialog[open] .actions button").await;
    browser.wait_gone("dialog[open]").await;
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    let channel = &listed.body["channels"][0];
    assert_eq!(channel["workspace"], "acme");
    assert_eq!(
        channel["events"],
        json!(["threshold_crossed", "forecast_exhaustion"])
    );
    assert!(!listed.body.to_string().contains(&secret));
    let (row, _) = browser
        .wait_text("table.channels tbody", PATIENCE, |text| {
            text.contains("acme on-call")
        })
        .await;
    assert!(
        row.contains("this workspace") && row.contains("enabled"),
        "{row}"
    );

    browser
        .click("table.channels button[data-action=test]")
        .await;
    let message = receiver.wait_for(1).await.remove(0);
    assert!(message.body.contains("quotawatch.test.raised"));
    assert!(message.header("webhook-signature").starts_with("v1,"));
    browser
        .wait_text(".toast .title", PATIENCE, |text| {
            text.contains("Test alert delivered to acme on-call")
        })
        .await;

    browser
        .click("table.channels button[data-action=disable]")
        .await;
    browser
        .wait_text("table.channels tbody", PATIENCE, |text| {
            text.contains("disabled")
        })
        .await;
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    assert_eq!(listed.body["channels"][0]["enabled"], false);
    browser.screenshot("alert-channels").await;
    browser.close().await;
    server.stop().await;
}

#[tokio::test]
async fn admins_add_an_email_channel_with_its_recipients_from_the_ui() {
    let Some(browser) =
        Browser::start("admins_add_an_email_channel_with_its_recipients_from_the_ui").await
    else {
        return;
    };
    // The SMTP server is never reached: the channel is only added and shown.
    let server = TestServer::start(&[
        ("QUOTAWATCH_SMTP_URL", "smtp://127.0.0.1:9?tls=none"),
        ("QUOTAWATCH_SMTP_FROM", "alerts@example.com"),
    ])
    .await;
    server.workspace(json!({"id": "acme"})).await;
    sign_in(&browser, &server, ADMIN_KEY).await;
    browser.click(&format!("{} h2 a", card("acme"))).await;
    browser
        .wait_text("#channels-title", PATIENCE, |text| text == "Alert channels")
        .await;
    browser
        .click("section[aria-labelledby=channels-title] .actions button")
        .await;
    browser
        .type_into("dialog[open] input[name=name]", "acme mail")
        .await;
    browser
        .find("dialog[open] select[name=type]")
        .await
        .select_by_value("email")
        .await
        .expect("choose email");
    browser
        .type_into(
            "dialog[open] input[name=to]",
            " ops@example.com,oncall@example.org ,",
        )
        .await;
    browser.click("dialog[open] button[type=submit]").await;
    browser.wait_gone("dialog[open]").await;
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    let channel = &listed.body["channels"][0];
    assert_eq!(channel["type"], "email");
    assert_eq!(
        channel["to"],
        json!(["ops@example.com", "oncall@example.org"])
    );
    assert!(channel["url"].is_null(), "{channel}");
    let (row, _) = browser
        .wait_text("table.channels tbody", PATIENCE, |text| {
            text.contains("acme mail")
        })
        .await;
    assert!(
        row.contains("to ops@example.com, oncall@example.org"),
        "{row}"
    );
    browser.close().await;
    server.stop().await;
}

/// The channel named `name`, as the API lists it.
async fn listed_channel(server: &TestServer, name: &str) -> Value {
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    listed.body["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .find(|channel| channel["name"] == name)
        .unwrap_or_else(|| panic!("no channel {name}: {}", listed.body))
        .clone()
}

/// Adds a webhook channel from the Alerts page's form (`workspace` empty
/// for a global one) and answers the secret the page showed once.
async fn add_webhook(browser: &Browser, name: &str, workspace: &str, url: &str) -> String {
    browser.click("#add-channel").await;
    browser
        .type_into("dialog[open] input[name=name]", name)
        .await;
    browser
        .find("dialog[open] select[name=workspace]")
        .await
        .select_by_value(workspace)
        .await
        .expect("choose the scope");
    browser.type_into("dialog[open] input[name=url]", url).await;
    browser.screenshot("alerts-add-channel").await;
    browser.click("dialog[open] button[type=submit]").await;
    let (secret, _) = browser
        .wait_text("dialog[open] code.secret-value", PATIENCE, |text| {
            text.starts_with("whsec_")
        })
        .await;
    // Copied to the clipboard, or selected for copying by hand where the
    // browser allows no clipboard: either way the page says which.
    browser.click("dialog[open] .secret button").await;
    browser
        .wait_text("dialog[open] p[role=status]", PATIENCE, |text| {
            text.starts_with("Copied") || text.starts_with("Selected")
        })
        .await;
    browser.click("dialog[open] .actions button").await;
    browser.wait_gone("dialog[open]").await;
    secret
}

/// The text of every delivery row whose status is `status`, once there are
/// `count` of them.
async fn delivery_rows(browser: &Browser, status: &str, count: usize) -> Vec<String> {
    let code = format!(
        "return [...document.querySelectorAll('table.deliveries tr[data-status={status}]')].map(row => row.innerText)"
    );
    eventually(
        &format!("{count} {status} deliveries in the log"),
        PATIENCE,
        || async {
            let rows: Vec<String> =
                serde_json::from_value(browser.script(&code).await).expect("rows");
            (rows.len() == count).then_some(rows)
        },
    )
    .await
}

#[tokio::test]
async fn admins_manage_every_alert_channel_and_follow_deliveries_on_the_alerts_page() {
    let Some(browser) = Browser::start(
        "admins_manage_every_alert_channel_and_follow_deliveries_on_the_alerts_page",
    )
    .await
    else {
        return;
    };
    let receiver = crate::alerts_delivery::Receiver::start(&[]).await;
    let failing = crate::alerts_delivery::Receiver::start(&[]).await;
    failing.answer_from_now(500);
    // A long backoff keeps the failed delivery pending while the page shows it.
    let mut server = TestServer::start(&[
        ("QUOTAWATCH_ALERT_RETRY_BASE", "1h"),
        (
            "OPS_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
    ])
    .await;
    server
        .restart_with_file(&format!(
            "[[alerts.channels]]\nname = \"declared ops\"\ntype = \"webhook\"\nurl = \"{}\"\nsecret_env = \"OPS_WEBHOOK_SECRET\"\n",
            receiver.url
        ))
        .await;
    server
        .workspace(json!({"id": "acme", "name": "Acme Corp"}))
        .await;
    sign_in(&browser, &server, ADMIN_KEY).await;
    browser.click("#nav a[href=\"#/alerts\"]").await;
    browser
        .wait_text("main h1", PATIENCE, |text| text == "Alerts")
        .await;
    browser
        .wait_text("[data-page=alerts]", PATIENCE, |text| {
            text.contains("No alert has been sent yet.")
        })
        .await;
    // The channel the configuration file declares can be tested, not changed.
    let declared = listed_channel(&server, "declared ops").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (row, _) = browser
        .wait_text(&format!("tr[data-channel={declared}]"), PATIENCE, |text| {
            text.contains("configuration file")
        })
        .await;
    assert!(row.contains("read-only here"), "{row}");
    let actions = browser
        .script(&format!(
            "return [...document.querySelectorAll('tr[data-channel={declared}] button')].map(b => b.dataset.action)"
        ))
        .await;
    assert_eq!(actions, json!(["test"]));
    let current = browser
        .script("return document.querySelector('#nav [aria-current=page]').hash")
        .await;
    assert_eq!(current, json!("#/alerts"));

    // A global webhook and one for acme whose receiver fails.
    let secret = add_webhook(&browser, "ops hook", "", &receiver.url).await;
    add_webhook(&browser, "acme failing", "acme", &failing.url).await;
    let (table, _) = browser
        .wait_text("table.alert-channels tbody", PATIENCE, |text| {
            text.contains("acme failing")
        })
        .await;
    assert!(
        table.contains("ops hook webhook Global")
            && table.contains("acme failing webhook Acme Corp (acme)"),
        "{table}"
    );
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    assert!(!listed.body.to_string().contains(&secret));
    let ops = listed_channel(&server, "ops hook").await;
    let acme_failing = listed_channel(&server, "acme failing").await;
    assert_eq!(ops["workspace"], Value::Null);
    assert_eq!(acme_failing["workspace"], "acme");
    let ops = ops["id"].as_str().expect("id").to_owned();
    let acme_failing = acme_failing["id"].as_str().expect("id").to_owned();

    // A test shows its attempt, and the log its delivery with the attempt.
    browser
        .click(&format!("tr[data-channel={ops}] button[data-action=test]"))
        .await;
    browser
        .wait_text("#test-outcome", PATIENCE, |text| {
            text.starts_with("Test alert to ops hook: delivered · HTTP 200")
        })
        .await;
    assert!(
        receiver.wait_for(1).await[0]
            .body
            .contains("quotawatch.test.raised")
    );
    let delivered = delivery_rows(&browser, "delivered", 1).await;
    assert!(
        delivered[0].contains("test raised")
            && delivered[0].contains("ops hook")
            && delivered[0].contains("✓ delivered")
            && delivered[0].contains("#1 at ")
            && delivered[0].contains(": delivered · HTTP 200 · "),
        "{delivered:?}"
    );

    // A receiver answering 500: the delivery stays pending with its next
    // attempt, and its attempt shows the 500.
    browser
        .click(&format!(
            "tr[data-channel={acme_failing}] button[data-action=test]"
        ))
        .await;
    browser
        .wait_text("#test-outcome", PATIENCE, |text| {
            text.starts_with("Test alert to acme failing: failed, will retry · HTTP 500")
        })
        .await;
    let pending = delivery_rows(&browser, "pending", 1).await;
    assert!(
        pending[0].contains("acme failing")
            && pending[0].contains("↻ pending")
            && pending[0].contains("failed, will retry · HTTP 500")
            && !pending[0].contains("\t—\t"),
        "a pending delivery shows its next attempt: {pending:?}"
    );

    // Filters: by status, then by channel.
    browser
        .find("#delivery-status-filter")
        .await
        .select_by_value("pending")
        .await
        .expect("filter by status");
    delivery_rows(&browser, "delivered", 0).await;
    delivery_rows(&browser, "pending", 1).await;
    browser
        .find("#delivery-status-filter")
        .await
        .select_by_value("")
        .await
        .expect("every status");
    browser
        .find("#delivery-channel-filter")
        .await
        .select_by_value(&ops)
        .await
        .expect("filter by channel");
    delivery_rows(&browser, "pending", 0).await;
    delivery_rows(&browser, "delivered", 1).await;

    // The log follows deliveries made elsewhere by itself, newest first.
    let sent = server
        .post("/api/alerts/test", ADMIN_KEY, json!({"channel": ops}))
        .await;
    assert_eq!(sent.status, StatusCode::OK, "{:?}", sent.body);
    let (_, took) = browser
        .wait_text("table.deliveries tbody", PATIENCE, |text| {
            text.matches("✓ delivered").count() == 2
        })
        .await;
    println!("the log showed a delivery made elsewhere after {took:?}");
    let newest = browser
        .script("return document.querySelector('table.deliveries tbody tr').dataset.delivery")
        .await;
    assert_eq!(newest, sent.body["delivery_id"]);
    browser
        .find("#delivery-channel-filter")
        .await
        .select_by_value("")
        .await
        .expect("every channel");
    delivery_rows(&browser, "pending", 1).await;

    // Disable, then delete, from the keyboard's buttons.
    browser
        .click(&format!(
            "tr[data-channel={acme_failing}] button[data-action=disable]"
        ))
        .await;
    browser
        .wait_text(
            &format!("tr[data-channel={acme_failing}] [data-role=state]"),
            PATIENCE,
            |text| text.contains("disabled"),
        )
        .await;
    assert_eq!(
        listed_channel(&server, "acme failing").await["enabled"],
        false
    );
    let unlabelled = browser
        .script("return [...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels || e.labels.length === 0).length")
        .await;
    assert_eq!(unlabelled, json!(0));
    browser.screenshot("alerts-page").await;
    browser.viewport(390, 844, true).await;
    browser.screenshot("alerts-page-phone").await;
    browser.viewport(1280, 900, false).await;

    browser
        .click(&format!(
            "tr[data-channel={ops}] button[data-action=delete]"
        ))
        .await;
    browser.click("dialog[open] button[value=confirm]").await;
    browser
        .wait_text("table.alert-channels tbody", PATIENCE, |text| {
            !text.contains("ops hook")
        })
        .await;
    delivery_rows(&browser, "delivered", 0).await;
    let choices = browser
        .script("return [...document.querySelectorAll('#delivery-channel-filter option')].map(o => o.textContent)")
        .await;
    assert_eq!(
        choices,
        json!(["Every channel", "declared ops", "acme failing"])
    );
    browser.close().await;
    server.stop().await;
}
