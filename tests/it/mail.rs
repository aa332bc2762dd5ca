//! Email alerts delivered to a real SMTP receiver (Python's `aiosmtpd`,
//! `tests/smtp/receiver.py`): the envelope and both parts of an alert, STARTTLS
//! with a private root and a password, and which failures are worth trying
//! again; then email channels of a server whose SMTP settings point at the
//! receiver: the test email, a threshold crossing and its resolution once
//! each, 451 retried and 550 given up, and the channel API's validation.
//! Needs `QUOTAWATCH_TEST_PYTHON`, a Python with `aiosmtpd`.

use std::process::Stdio;
use std::time::Duration;

use quotawatch::domain::limits::{Limits, TOKENS_PER_DAY, WorkspaceConfig};
use quotawatch::domain::notification::{Crossing, describe_threshold};
use quotawatch::domain::time::Timestamp;
use quotawatch::mail::{
    Address, Alert, Email, ExtraRoot, MailError, Mailer, Phase, SmtpConfig, SmtpServer, compose,
    parse_recipients, parse_sender,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::alerts_delivery::{
    channel, crossing_workspace, deliveries, delivery_becomes, patch_workspace,
};
use crate::support::tls::private_root_and_server_certificate;
use crate::support::{ADMIN_KEY, TestServer, test_tool};

/// How long the receiver may take to start, and a message to arrive.
const DEADLINE: Duration = Duration::from_secs(30);

/// A running `receiver.py`, ended when dropped.
struct Receiver {
    _child: Child,
    port: u16,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Receiver {
    async fn start(python: &str, options: &[&str]) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp/receiver.py");
        let mut child = tokio::process::Command::new(python)
            .arg(script)
            .args(options)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = Self::line(&mut lines, "the receiver to listen").await;
        let port = ready
            .strip_prefix("READY ")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("not a READY line: {ready:?}"));
        Self {
            _child: child,
            port,
            lines,
        }
    }

    async fn line(lines: &mut Lines<BufReader<ChildStdout>>, what: &str) -> String {
        tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for {what}"))
            .expect("the receiver's output")
            .unwrap_or_else(|| panic!("the receiver ended before {what}"))
    }

    /// The next line of the receiver's, as JSON: a message received, as
    /// it describes it, or a refusal it answered.
    async fn message(&mut self) -> Value {
        let line = Self::line(&mut self.lines, "a message").await;
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("{line:?}: {error}"))
    }
}

fn mailer(url: &str, extra_root: Option<ExtraRoot>) -> Mailer {
    mailer_within(url, extra_root, Duration::from_secs(10))
}

fn mailer_within(url: &str, extra_root: Option<ExtraRoot>, timeout: Duration) -> Mailer {
    Mailer::new(&SmtpConfig {
        server: SmtpServer::parse(url).expect("a valid URL"),
        from: parse_sender("quotawatch <alerts@example.com>").expect("sender"),
        extra_root,
        timeout,
    })
    .expect("a mailer")
}

fn now() -> Timestamp {
    Timestamp::from_millis(chrono::Utc::now().timestamp_millis())
}

/// The alert of a crossing of 80% of a day's tokens by a workspace whose
/// name is markup.
fn crossing_email(now: Timestamp) -> (Email, Vec<String>) {
    let mut workspace = WorkspaceConfig::new("acme".parse().expect("id"), Limits::default());
    workspace.name = "<b>Acme</b> & Co".to_owned();
    let notification = describe_threshold(
        &workspace,
        TOKENS_PER_DAY,
        Crossing {
            percent: 80,
            used: 81_234,
            max: 100_000,
            period_start: Timestamp::from_millis(now.millis() - 3_600_000),
            period_end: Timestamp::from_millis(now.millis() + 7_200_000),
        },
        now,
    );
    let email = compose(
        &Alert {
            notification: &notification,
            workspace_name: &workspace.name,
            phase: Phase::Raised,
            limit: None,
            dashboard: None,
        },
        now,
    );
    (email, notification.suggested_actions)
}

fn recipients(list: &[&str]) -> Vec<Address> {
    parse_recipients(list).expect("valid recipients")
}

#[tokio::test]
async fn an_alert_arrives_with_its_numbers_and_actions_in_text_and_html() {
    let Some(python) = test_tool("QUOTAWATCH_TEST_PYTHON", "a Python with aiosmtpd") else {
        return;
    };
    let mut receiver = Receiver::start(&python, &[]).await;
    let mailer = mailer(
        &format!("smtp://127.0.0.1:{}?tls=none", receiver.port),
        None,
    );
    let (email, actions) = crossing_email(now());
    mailer
        .send(
            &recipients(&["ops@example.com", "oncall@example.org"]),
            &email,
        )
        .await
        .expect("delivered");

    let message = receiver.message().await;
    assert_eq!(message["mail_from"], "alerts@example.com");
    assert_eq!(
        message["rcpt_tos"],
        serde_json::json!(["ops@example.com", "oncall@example.org"])
    );
    assert_eq!(message["from"], "quotawatch <alerts@example.com>");
    assert_eq!(
        message["subject"],
        "[quotawatch] <b>Acme</b> & Co: 80% of tokens_per_day used"
    );
    assert_eq!(message["content_type"], "multipart/alternative");
    let text = message["parts"]["text/plain"]
        .as_str()
        .expect("a text part");
    let html = message["parts"]["text/html"]
        .as_str()
        .expect("an HTML part");
    assert!(text.contains("81,234 of 100,000 tokens (81%)"), "{text}");
    assert!(html.contains("81,234 of 100,000 tokens (81%)"), "{html}");
    assert!(text.contains("Resets: in 2h 0m"), "{text}");
    for action in &actions {
        assert!(text.contains(&format!("- {action}")), "{text}");
        assert!(
            html.contains(&format!(
                "<li>{}</li>",
                quotawatch::mail::escape_html(action)
            )),
            "{html}"
        );
    }
    assert!(text.contains("<b>Acme</b> & Co (acme)"), "{text}");
    assert!(
        html.contains("&lt;b&gt;Acme&lt;/b&gt; &amp; Co (acme)"),
        "{html}"
    );
    assert!(!html.contains("<b>Acme"), "{html}");
    assert_eq!(message["encrypted"], false);
}

#[tokio::test]
async fn starttls_with_a_private_root_and_a_password() {
    let Some(python) = test_tool("QUOTAWATCH_TEST_PYTHON", "a Python with aiosmtpd") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, chain, key) = private_root_and_server_certificate();
    let root_path = dir.path().join("root.pem");
    let chain_path = dir.path().join("server.pem");
    let key_path = dir.path().join("server.key");
    std::fs::write(&root_path, root).expect("write");
    std::fs::write(&chain_path, chain).expect("write");
    std::fs::write(&key_path, key).expect("write");
    let mut receiver = Receiver::start(
        &python,
        &[
            "--tls",
            chain_path.to_str().expect("utf-8"),
            key_path.to_str().expect("utf-8"),
            "--login",
            "alerts@example.com:p@ss word",
        ],
    )
    .await;
    let extra_root =
        quotawatch::mail::read_extra_root(root_path.to_str().expect("utf-8")).expect("a root");
    let port = receiver.port;
    let url = |password: &str| {
        format!("smtp://alerts%40example.com:{password}@localhost:{port}?tls=required")
    };
    let (email, _) = crossing_email(now());
    let to = recipients(&["ops@example.com"]);

    mailer(&url("p%40ss%20word"), Some(extra_root.clone()))
        .send(&to, &email)
        .await
        .expect("delivered over STARTTLS");
    let message = receiver.message().await;
    assert_eq!(message["encrypted"], true);
    assert_eq!(message["login"], "alerts@example.com");
    assert_eq!(message["rcpt_tos"], serde_json::json!(["ops@example.com"]));

    // A wrong password is refused for good, and so is a server whose
    // certificate nothing trusts: waiting fixes neither.
    let wrong = mailer(&url("guess"), Some(extra_root))
        .send(&to, &email)
        .await
        .expect_err("refused");
    assert!(matches!(wrong, MailError::Permanent(_)), "{wrong:?}");
    let untrusted = mailer(&url("p%40ss%20word"), None)
        .send(&to, &email)
        .await
        .expect_err("refused");
    assert!(
        matches!(untrusted, MailError::Permanent(_)),
        "{untrusted:?}"
    );
}

#[tokio::test]
async fn a_server_that_never_greets_is_given_up_on_at_the_timeout_as_transient() {
    // The connection is accepted (by the listener's backlog) and then
    // nothing is ever said, as with a relay that hangs.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("address").port();
    let (email, _) = crossing_email(now());
    let timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let error = mailer_within(&format!("smtp://127.0.0.1:{port}?tls=none"), None, timeout)
        .send(&recipients(&["ops@example.com"]), &email)
        .await
        .expect_err("no greeting");
    assert!(error.is_transient(), "{error:?}");
    assert!(started.elapsed() >= timeout, "waited for the timeout");
    drop(silent);
}

#[tokio::test]
async fn a_4xx_reply_or_no_server_is_transient_and_a_5xx_reply_permanent() {
    let Some(python) = test_tool("QUOTAWATCH_TEST_PYTHON", "a Python with aiosmtpd") else {
        return;
    };
    let (email, _) = crossing_email(now());
    let to = recipients(&["ops@example.com"]);
    for (reply, transient) in [
        ("451 4.3.0 Try again later", true),
        ("550 5.1.1 No such mailbox", false),
    ] {
        let receiver = Receiver::start(&python, &["--reply", reply]).await;
        let error = mailer(
            &format!("smtp://127.0.0.1:{}?tls=none", receiver.port),
            None,
        )
        .send(&to, &email)
        .await
        .expect_err("refused");
        assert_eq!(error.is_transient(), transient, "{reply}: {error:?}");
        assert!(error.to_string().contains(&reply[..3]), "{error}");
    }

    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    let error = mailer(&format!("smtp://127.0.0.1:{port}?tls=none"), None)
        .send(&to, &email)
        .await
        .expect_err("nothing listens");
    assert!(error.is_transient(), "{error:?}");
}

/// The settings of a server whose email goes to `receiver`, with fast
/// retries.
fn smtp_settings(receiver: &Receiver) -> Vec<(&'static str, String)> {
    vec![
        (
            "QUOTAWATCH_SMTP_URL",
            format!("smtp://127.0.0.1:{}?tls=none", receiver.port),
        ),
        (
            "QUOTAWATCH_SMTP_FROM",
            "quotawatch <alerts@example.com>".to_owned(),
        ),
        ("QUOTAWATCH_SMTP_TIMEOUT", "10s".to_owned()),
        ("QUOTAWATCH_ALERT_RETRY_BASE", "100ms".to_owned()),
        ("QUOTAWATCH_ALERT_RETRY_CAP", "200ms".to_owned()),
        (
            "QUOTAWATCH_PUBLIC_URL",
            "https://quota.example.com/".to_owned(),
        ),
    ]
}

async fn server_mailing_to(receiver: &Receiver) -> TestServer {
    let settings = smtp_settings(receiver);
    let settings: Vec<(&str, &str)> = settings
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    TestServer::start(&settings).await
}

/// The text part, its lines ended as the code writes them (SMTP ends them
/// with CRLF).
fn text_part(message: &Value) -> String {
    message["parts"]["text/plain"]
        .as_str()
        .unwrap_or_else(|| panic!("a text part: {message}"))
        .replace("\r\n", "\n")
}

#[tokio::test]
async fn an_email_channel_gets_the_test_email_then_a_crossing_and_its_resolution_once_each() {
    let Some(python) = test_tool("QUOTAWATCH_TEST_PYTHON", "a Python with aiosmtpd") else {
        return;
    };
    let mut receiver = Receiver::start(&python, &[]).await;
    let server = server_mailing_to(&receiver).await;
    let key = server.workspace(crossing_workspace("acme")).await;
    let created = channel(
        &server,
        json!({"name": "acme mail", "workspace": "acme", "type": "email",
            "to": ["ops@example.com", "oncall@example.org"], "events": ["threshold_crossed"]}),
    )
    .await;
    assert_eq!(
        created["to"],
        json!(["ops@example.com", "oncall@example.org"])
    );
    assert!(created["url"].is_null(), "{created}");
    assert_eq!(created["secret_set"], false);
    let id = created["id"].as_str().expect("id").to_owned();

    // The test email, sent at once through the same path as alerts.
    let tested = server
        .post("/api/alerts/test", ADMIN_KEY, json!({"channel": id}))
        .await;
    assert_eq!(tested.status, StatusCode::OK, "{:?}", tested.body);
    assert_eq!(tested.body["attempt"]["outcome"], "delivered");
    assert!(tested.body["attempt"]["http_status"].is_null());
    let test = receiver.message().await;
    assert_eq!(test["subject"], "[quotawatch] acme: test alert");
    assert_eq!(
        test["rcpt_tos"],
        json!(["ops@example.com", "oncall@example.org"])
    );
    assert!(
        text_part(&test).contains("email alerts for workspace acme reach you"),
        "{test}"
    );

    // A crossing of 50% of the day's 1,000 tokens: one email, with the
    // numbers, the suggested actions and the link.
    assert_eq!(server.check(&key, 600).await.status, StatusCode::OK);
    let raised = receiver.message().await;
    assert_eq!(
        raised["subject"], "[quotawatch] acme: 50% of tokens_per_day used",
        "{raised}"
    );
    let text = text_part(&raised);
    assert!(text.contains("600 of 1,000 tokens (60%)"), "{text}");
    assert!(text.contains("Suggested actions:\n- "), "{text}");
    assert!(
        text.contains("https://quota.example.com/#/w/acme"),
        "{text}"
    );
    assert!(raised["parts"]["text/html"].is_string(), "{raised}");

    // Its resolution when the admin raises the limit.
    patch_workspace(&server, "acme", json!({"limits": {"tokens_per_day": 2000}})).await;
    let resolved = receiver.message().await;
    assert_eq!(
        resolved["subject"], "[quotawatch] acme: resolved: 50% of tokens_per_day used",
        "{resolved}"
    );
    assert!(text_part(&resolved).starts_with("Resolved: "), "{resolved}");

    // Three deliveries (the test among them), each delivered at its first
    // attempt, and nothing sent twice.
    let delivered = crate::support::eventually("three delivered emails", DEADLINE, || async {
        let delivered = deliveries(&server, &format!("?channel={id}&status=delivered")).await;
        (delivered.len() == 3).then_some(delivered)
    })
    .await;
    for delivery in &delivered {
        assert_eq!(delivery["attempts"].as_array().expect("attempts").len(), 1);
    }
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(
            r#"quotawatch_alert_delivery_attempts_total{channel_type="email",outcome="delivered"} 3"#
        ),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_smtp_server_answering_451_is_tried_again_and_550_is_given_up() {
    let Some(python) = test_tool("QUOTAWATCH_TEST_PYTHON", "a Python with aiosmtpd") else {
        return;
    };
    let mut busy =
        Receiver::start(&python, &["--reply", "451 4.3.0 Try later", "--times", "1"]).await;
    let refusing = Receiver::start(&python, &["--reply", "550 5.1.1 No such mailbox"]).await;
    let mut ids = Vec::new();
    let mut servers = Vec::new();
    for receiver in [&busy, &refusing] {
        let server = server_mailing_to(receiver).await;
        let created = channel(
            &server,
            json!({"name": "mail", "type": "email", "to": ["ops@example.com"]}),
        )
        .await;
        ids.push(created["id"].as_str().expect("id").to_owned());
        servers.push(server);
    }
    let mut attempts = Vec::new();
    for (server, id) in servers.iter().zip(&ids) {
        let tested = server
            .post("/api/alerts/test", ADMIN_KEY, json!({"channel": id}))
            .await;
        assert_eq!(tested.status, StatusCode::OK, "{:?}", tested.body);
        attempts.push(tested.body["attempt"].clone());
    }
    assert_eq!(attempts[0]["outcome"], "retry", "{}", attempts[0]);
    assert!(attempts[0]["http_status"].is_null());
    assert!(
        attempts[0]["error"]
            .as_str()
            .expect("error")
            .contains("451"),
        "{}",
        attempts[0]
    );
    assert_eq!(attempts[1]["outcome"], "gave_up", "{}", attempts[1]);
    assert!(attempts[1]["http_status"].is_null());
    assert!(
        attempts[1]["error"]
            .as_str()
            .expect("error")
            .contains("550"),
        "{}",
        attempts[1]
    );

    // 451, then accepted: delivered at the second attempt.
    assert_eq!(busy.message().await["refused"], "451 4.3.0 Try later");
    let delivered = delivery_becomes(&servers[0], &ids[0], "delivered").await;
    let outcomes: Vec<&Value> = delivered["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|attempt| &attempt["outcome"])
        .collect();
    assert_eq!(outcomes, [&json!("retry"), &json!("delivered")]);
    assert_eq!(busy.message().await["subject"], "[quotawatch] test alert");

    // 550: given up at once, with no attempt to come.
    let given_up = delivery_becomes(&servers[1], &ids[1], "gave_up").await;
    assert_eq!(given_up["attempts"].as_array().expect("attempts").len(), 1);
    assert!(given_up["next_attempt_at"].is_null(), "{given_up}");
    for server in servers {
        server.stop().await;
    }
}

#[tokio::test]
async fn email_channels_name_their_bad_fields_and_need_the_smtp_server() {
    // Without the SMTP server, an email channel could never send.
    let plain = TestServer::start(&[]).await;
    let refused = plain
        .post(
            "/api/alerts/channels",
            ADMIN_KEY,
            json!({"name": "mail", "type": "email", "to": ["ops@example.com"]}),
        )
        .await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        refused.body
    );
    assert_eq!(refused.body["error"]["param"], "type");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("QUOTAWATCH_SMTP_URL"),
        "{:?}",
        refused.body
    );
    plain.stop().await;

    // A server whose SMTP server is never reached: only the API is tried.
    let server = TestServer::start(&[
        ("QUOTAWATCH_SMTP_URL", "smtp://127.0.0.1:9?tls=none"),
        ("QUOTAWATCH_SMTP_FROM", "alerts@example.com"),
    ])
    .await;
    let good = json!({"name": "mail", "type": "email", "to": ["ops@example.com"]});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let without_to = {
        let mut body = good.clone();
        body.as_object_mut().expect("object").remove("to");
        body
    };
    let many: Vec<String> = (0..21).map(|n| format!("ops{n}@example.com")).collect();
    for (body, param) in [
        (
            with("to", json!(["ops@example.com", "not an address"])),
            "to[1]",
        ),
        (
            with("to", json!(["ops@example.com", "ops@example.com"])),
            "to[1]",
        ),
        (with("to", json!([])), "to"),
        (with("to", json!(many)), "to"),
        (without_to, "to"),
        (with("url", json!("https://hooks.example.com/q")), "url"),
        (
            with("secret", json!("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
            "secret",
        ),
        (
            json!({"name": "hook", "type": "webhook", "url": "https://hooks.example.com/q",
                "to": ["ops@example.com"]}),
            "to",
        ),
        (json!({"name": "hook", "type": "slack"}), "url"),
    ] {
        let refused = server.post("/api/alerts/channels", ADMIN_KEY, body).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{param}: {:?}",
            refused.body
        );
        assert_eq!(refused.body["error"]["param"], param, "{:?}", refused.body);
    }

    let created = channel(&server, good.clone()).await;
    let path = format!(
        "/api/alerts/channels/{}",
        created["id"].as_str().expect("id")
    );
    for (body, param) in [
        (json!({"to": ["nobody"]}), "to[0]"),
        (json!({"url": "https://hooks.example.com/q"}), "url"),
    ] {
        let refused = server
            .send(Method::PATCH, &path, ADMIN_KEY, Some(body))
            .await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            refused.body
        );
        assert_eq!(refused.body["error"]["param"], param, "{:?}", refused.body);
    }
    let patched = server
        .send(
            Method::PATCH,
            &path,
            ADMIN_KEY,
            Some(json!({"to": ["oncall@example.org", "ops@example.com"]})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    assert_eq!(
        patched.body["to"],
        json!(["oncall@example.org", "ops@example.com"])
    );
    server.stop().await;
}

#[tokio::test]
async fn more_alerts_than_the_digest_threshold_go_as_one_email() {
    let Some(python) = test_tool("QUOTAWATCH_TEST_PYTHON", "a Python with aiosmtpd") else {
        return;
    };
    let mut receiver = Receiver::start(&python, &[]).await;
    let mut settings = smtp_settings(&receiver);
    settings.push(("QUOTAWATCH_ALERT_DIGEST_THRESHOLD", "2".to_owned()));
    let settings: Vec<(&str, &str)> = settings
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let server = TestServer::start(&settings).await;
    let key = server
        .workspace(json!({"id": "acme",
            "limits": {"requests_per_minute": null, "requests_per_day": null, "tokens_per_day": 1000},
            "alert_thresholds": {"default": [10, 20, 30, 40]}}))
        .await;
    let id = channel(
        &server,
        json!({"name": "mail", "type": "email", "to": ["ops@example.com"],
            "events": ["threshold_crossed"]}),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // Four crossings at once, more than two: one email lists them all.
    assert_eq!(server.check(&key, 500).await.status, StatusCode::OK);
    let digest = receiver.message().await;
    assert_eq!(digest["subject"], "[quotawatch] 4 alerts", "{digest}");
    let text = text_part(&digest);
    for percent in [10, 20, 30, 40] {
        assert!(
            text.contains(&format!(
                "- acme: {percent}% of tokens_per_day used (info, raised)"
            )),
            "{text}"
        );
    }
    let delivered = crate::support::eventually("four deliveries", DEADLINE, || async {
        let delivered = deliveries(&server, &format!("?channel={id}&status=delivered")).await;
        (delivered.len() == 4).then_some(delivered)
    })
    .await;
    let digest_id = &delivered[0]["attempts"][0]["digest_id"];
    assert!(
        digest_id.as_str().is_some_and(|id| id.starts_with("dig_")),
        "{digest_id}"
    );
    for delivery in &delivered {
        assert_eq!(&delivery["attempts"][0]["digest_id"], digest_id);
    }
    server.stop().await;
}

#[tokio::test]
async fn an_email_channel_declared_in_the_configuration_sends_its_test_email() {
    let Some(python) = test_tool("QUOTAWATCH_TEST_PYTHON", "a Python with aiosmtpd") else {
        return;
    };
    let mut receiver = Receiver::start(&python, &[]).await;
    let mut server = server_mailing_to(&receiver).await;
    server
        .restart_with_file(
            "[[alerts.channels]]\nname = \"on-call mail\"\ntype = \"email\"\nto = [\"oncall@example.com\"]\n",
        )
        .await;
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    let declared = &listed.body["channels"][0];
    assert_eq!(declared["source"], "config", "{declared}");
    assert_eq!(declared["to"], json!(["oncall@example.com"]));
    let tested = server
        .post(
            "/api/alerts/test",
            ADMIN_KEY,
            json!({"channel": declared["id"]}),
        )
        .await;
    assert_eq!(
        tested.body["attempt"]["outcome"], "delivered",
        "{:?}",
        tested.body
    );
    let message = receiver.message().await;
    assert_eq!(message["rcpt_tos"], json!(["oncall@example.com"]));
    assert_eq!(message["subject"], "[quotawatch] test alert");
    server.stop().await;
}
