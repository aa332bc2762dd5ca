//! Email alerts delivered to a real SMTP receiver (Python's `aiosmtpd`,
//! `tests/smtp/receiver.py`): the envelope and both parts of an alert, STARTTLS
//! with a private root and a password, and which failures are worth trying
//! again. Needs `QUOTAWATCH_TEST_PYTHON`, a Python with `aiosmtpd`.

use std::process::Stdio;
use std::time::Duration;

use quotawatch::domain::limits::{Limits, TOKENS_PER_DAY, WorkspaceConfig};
use quotawatch::domain::notification::{Crossing, describe_threshold};
use quotawatch::domain::time::Timestamp;
use quotawatch::mail::{
    Address, Alert, Email, ExtraRoot, MailError, Mailer, Phase, SmtpConfig, SmtpServer, compose,
    parse_recipients, parse_sender,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::support::test_tool;

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

    /// The next message received, as the receiver describes it.
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

/// A private root, and the certificate chain and key of a server named
/// `localhost` that it signed, all as PEM.
fn private_root_and_server_certificate() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut root_params = CertificateParams::new(Vec::new()).expect("params");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = CertifiedIssuer::self_signed(root_params, KeyPair::generate().expect("key"))
        .expect("a root");
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &root)
        .expect("a server certificate");
    (root.pem(), server.pem(), server_key.serialize_pem())
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
