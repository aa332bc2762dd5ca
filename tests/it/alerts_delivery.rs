//! Alert delivery to real receivers on `127.0.0.1:0`: webhooks whose
//! signatures the `standardwebhooks` package from PyPI checks
//! (`QUOTAWATCH_TEST_PYTHON`), a threshold crossing and its resolution each
//! delivered once, retries as the receiver's answers say (5xx, 429 with
//! `retry-after`, 400), a hanging receiver that holds up neither admissions
//! nor another channel, a restart in the middle of retries, two instances on
//! Redis and PostgreSQL delivering once, Slack's Block Kit shape, and the
//! channel API's validation and secrecy.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::response::{IntoResponse, Response};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::instances::Cluster;
use crate::support::{ADMIN_KEY, TestServer, eventually, output_of, test_tool};

/// How a receiver answers one message.
#[derive(Clone, Debug)]
pub(crate) enum Reply {
    Status(u16),
    RetryAfter(&'static str),
    /// Never answers.
    Hang,
}

/// One message as a receiver got it.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Received {
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map_or("", |(_, value)| value)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

#[derive(Clone, Default)]
struct Book {
    received: Arc<Mutex<Vec<Received>>>,
    /// Answers to give, in order; `otherwise` once they run out.
    replies: Arc<Mutex<VecDeque<Reply>>>,
    otherwise: Arc<Mutex<Option<u16>>>,
}

/// An HTTP receiver on `127.0.0.1:0` that keeps what it gets.
pub(crate) struct Receiver {
    pub(crate) url: String,
    book: Book,
    server: tokio::task::JoinHandle<()>,
}

async fn receive(State(book): State<Book>, headers: HeaderMap, body: String) -> Response {
    book.received.lock().expect("lock").push(Received {
        headers: headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    value.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
        body,
    });
    let reply = book.replies.lock().expect("lock").pop_front();
    let otherwise = book.otherwise.lock().expect("lock").unwrap_or(200);
    match reply.unwrap_or(Reply::Status(otherwise)) {
        Reply::Status(200) => (AxumStatus::OK, "ok").into_response(),
        Reply::Status(status) => (
            AxumStatus::from_u16(status).expect("status"),
            format!("answered {status}"),
        )
            .into_response(),
        Reply::RetryAfter(after) => (
            AxumStatus::TOO_MANY_REQUESTS,
            [("retry-after", after)],
            "slow down",
        )
            .into_response(),
        Reply::Hang => std::future::pending().await,
    }
}

impl Receiver {
    pub(crate) async fn start(replies: &[Reply]) -> Self {
        let book = Book::default();
        book.replies
            .lock()
            .expect("lock")
            .extend(replies.iter().cloned());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(book.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver serves");
        });
        Self { url, book, server }
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.book.received.lock().expect("lock").clone()
    }

    /// Waits until it got `count` messages, and answers them.
    pub(crate) async fn wait_for(&self, count: usize) -> Vec<Received> {
        eventually(
            &format!("{count} messages at the receiver"),
            Duration::from_secs(15),
            || async {
                let received = self.received();
                (received.len() >= count).then_some(received)
            },
        )
        .await
    }

    /// What it answers once its listed replies run out.
    pub(crate) fn answer_from_now(&self, status: u16) {
        *self.book.otherwise.lock().expect("lock") = Some(status);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Creates a channel as admin and answers the creation's document.
pub(crate) async fn channel(server: &TestServer, body: Value) -> Value {
    let created = server.post("/api/alerts/channels", ADMIN_KEY, body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    created.body
}

pub(crate) async fn deliveries(server: &TestServer, query: &str) -> Vec<Value> {
    let listed = server
        .get(&format!("/api/alerts/deliveries{query}"), ADMIN_KEY)
        .await;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", listed.body);
    listed.body["deliveries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the channel's newest delivery has `status`, and answers it.
pub(crate) async fn delivery_becomes(server: &TestServer, channel: &str, status: &str) -> Value {
    eventually(
        &format!("a {status} delivery to {channel}"),
        Duration::from_secs(15),
        || async {
            deliveries(server, &format!("?channel={channel}"))
                .await
                .into_iter()
                .find(|delivery| delivery["status"] == status)
        },
    )
    .await
}

/// Checks every message with the `standardwebhooks` package's
/// `Webhook(secret).verify`, which raises on a bad signature, and a
/// tampered copy of the first, which must fail. Answers the payloads as
/// the package read them.
async fn verified_by_standardwebhooks(
    python: &str,
    secret: &str,
    messages: &[Received],
) -> Vec<Value> {
    const VERIFY: &str = r#"
import json, sys
from standardwebhooks import Webhook
given = json.load(sys.stdin)
hook = Webhook(given["secret"])
for message in given["messages"]:
    print(json.dumps(hook.verify(message["body"], message["headers"])))
tampered = dict(given["messages"][0])
tampered["body"] = tampered["body"].replace("quotawatch", "quotawatcH", 1)
try:
    hook.verify(tampered["body"], tampered["headers"])
    print("TAMPERED MESSAGE VERIFIED")
    sys.exit(1)
except Exception:
    pass
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("verify.py");
    std::fs::write(&script, VERIFY).expect("script");
    let input = json!({
        "secret": secret,
        "messages": messages.iter().map(|message| json!({
            "body": message.body,
            "headers": {
                "webhook-id": message.header("webhook-id"),
                "webhook-timestamp": message.header("webhook-timestamp"),
                "webhook-signature": message.header("webhook-signature"),
            },
        })).collect::<Vec<_>>(),
    });
    let input_file = dir.path().join("input.json");
    std::fs::write(&input_file, input.to_string()).expect("input");
    let stdout = output_of(
        tokio::process::Command::new(python)
            .arg(&script)
            .stdin(std::fs::File::open(&input_file).expect("input")),
    )
    .await;
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a verified payload"))
        .collect()
}

pub(crate) async fn patch_workspace(server: &TestServer, workspace: &str, body: Value) {
    let patched = server
        .send(
            Method::PATCH,
            &format!("/api/workspaces/{workspace}"),
            ADMIN_KEY,
            Some(body),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
}

/// A workspace whose day of 1,000 tokens announces its 50 % threshold.
pub(crate) fn crossing_workspace(id: &str) -> Value {
    json!({"id": id,
        "limits": {"requests_per_minute": null, "requests_per_day": null, "tokens_per_day": 1000},
        "alert_thresholds": {"default": [50]}})
}

#[tokio::test]
async fn a_threshold_crossing_reaches_a_signed_webhook_once_and_its_resolution_too() {
    let Some(python) = test_tool(
        "QUOTAWATCH_TEST_PYTHON",
        "a Python with the standardwebhooks package",
    ) else {
        return;
    };
    let receiver = Receiver::start(&[]).await;
    let server =
        TestServer::start(&[("QUOTAWATCH_PUBLIC_URL", "https://quota.example.com/")]).await;
    let key = server.workspace(crossing_workspace("acme")).await;
    let created = channel(
        &server,
        json!({"name": "acme ops", "workspace": "acme", "type": "webhook", "url": receiver.url,
            "events": ["threshold_crossed"]}),
    )
    .await;
    let secret = created["secret"].as_str().expect("a generated secret");
    assert!(secret.starts_with("whsec_"), "{secret}");
    let id = created["id"].as_str().expect("id");
    // The secret is shown once: never again.
    let read = server
        .get(&format!("/api/alerts/channels/{id}"), ADMIN_KEY)
        .await;
    assert_eq!(read.body["secret_set"], true);
    assert!(read.body.get("secret").is_none(), "{:?}", read.body);
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    assert!(!listed.body.to_string().contains(secret));

    assert_eq!(server.check(&key, 600).await.status, StatusCode::OK);
    let raised = receiver.wait_for(1).await;
    patch_workspace(&server, "acme", json!({"limits": {"tokens_per_day": 2000}})).await;
    let both = receiver.wait_for(2).await;
    assert_eq!(raised[0].body, both[0].body);

    let payloads = verified_by_standardwebhooks(&python, secret, &both).await;
    assert_eq!(payloads.len(), 2);
    let first = &payloads[0];
    assert_eq!(first["type"], "quotawatch.threshold_crossed.raised");
    let data = &first["data"];
    assert_eq!(data["schema_version"], 1);
    assert_eq!(data["event"], "threshold_crossed");
    assert_eq!(data["phase"], "raised");
    assert_eq!(data["severity"], "info");
    assert_eq!(data["workspace"], json!({"id": "acme", "name": "acme"}));
    assert_eq!(data["limit"]["name"], "tokens_per_day");
    assert_eq!(data["limit"]["used"], 600);
    assert_eq!(data["limit"]["max"], 1000);
    assert_eq!(data["limit"]["percent"], 60.0);
    assert!(data["limit"]["resets_at"].is_string());
    assert!(data["forecast"].is_object(), "{data}");
    assert!(
        !data["suggested_actions"]
            .as_array()
            .expect("actions")
            .is_empty()
    );
    assert_eq!(data["dashboard_url"], "https://quota.example.com/#/w/acme");
    assert_eq!(payloads[1]["type"], "quotawatch.threshold_crossed.resolved");
    assert_eq!(
        payloads[1]["data"]["notification_id"],
        data["notification_id"]
    );

    // One delivery each, delivered at the first attempt, under the id the
    // receiver saw; nothing else was sent.
    let delivered = deliveries(&server, &format!("?channel={id}&status=delivered")).await;
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    for delivery in &delivered {
        assert_eq!(delivery["attempts"].as_array().expect("attempts").len(), 1);
        assert!(
            both.iter()
                .any(|message| message.header("webhook-id") == delivery["id"]),
            "{delivery}"
        );
    }
    assert_eq!(receiver.received().len(), 2);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(
            r#"quotawatch_alert_delivery_attempts_total{channel_type="webhook",outcome="delivered"} 2"#
        ),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn retries_follow_what_the_receiver_answers() {
    let failing_once = Receiver::start(&[Reply::Status(500)]).await;
    let slowing = Receiver::start(&[Reply::RetryAfter("2")]).await;
    let refusing = Receiver::start(&[Reply::Status(400)]).await;
    let server = TestServer::start(&[
        ("QUOTAWATCH_ALERT_RETRY_BASE", "100ms"),
        ("QUOTAWATCH_ALERT_RETRY_CAP", "200ms"),
    ])
    .await;
    let mut ids = Vec::new();
    for receiver in [&failing_once, &slowing, &refusing] {
        let created = channel(
            &server,
            json!({"name": "hook", "type": "webhook", "url": receiver.url}),
        )
        .await;
        ids.push(created["id"].as_str().expect("id").to_owned());
    }
    let mut outcomes = Vec::new();
    for id in &ids {
        let tested = server
            .post("/api/alerts/test", ADMIN_KEY, json!({"channel": id}))
            .await;
        assert_eq!(tested.status, StatusCode::OK, "{:?}", tested.body);
        outcomes.push(tested.body["attempt"].clone());
    }
    assert_eq!(outcomes[0]["outcome"], "retry");
    assert_eq!(outcomes[0]["http_status"], 500);
    assert_eq!(outcomes[1]["outcome"], "retry");
    assert_eq!(outcomes[2]["outcome"], "gave_up");
    assert_eq!(outcomes[2]["http_status"], 400);

    // 500, then 200: delivered at the second attempt.
    let delivered = delivery_becomes(&server, &ids[0], "delivered").await;
    let attempts = delivered["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["outcome"], "retry");
    assert_eq!(attempts[1]["outcome"], "delivered");
    let messages = failing_once.received();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        messages[0].header("webhook-id"),
        messages[1].header("webhook-id"),
        "a retry keeps its id"
    );

    // 429 with retry-after: 2 is tried again two seconds later, not sooner.
    let pending = deliveries(&server, &format!("?channel={}", ids[1])).await;
    let first = &pending[0]["attempts"][0];
    let at = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(first[field].as_str().expect(field))
            .expect("RFC 3339")
            .timestamp_millis()
    };
    assert_eq!(at("next_attempt_at") - at("attempted_at"), 2000);
    let delivered = delivery_becomes(&server, &ids[1], "delivered").await;
    let second = &delivered["attempts"][1];
    let attempted = chrono::DateTime::parse_from_rfc3339(
        second["attempted_at"].as_str().expect("attempted_at"),
    )
    .expect("RFC 3339")
    .timestamp_millis();
    assert!(attempted >= at("next_attempt_at"), "{delivered}");

    // 400 gives up at once: one attempt, and none after it.
    let given_up = delivery_becomes(&server, &ids[2], "gave_up").await;
    assert_eq!(given_up["attempts"].as_array().expect("attempts").len(), 1);
    assert!(given_up["next_attempt_at"].is_null());
    assert_eq!(refusing.received().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_hanging_receiver_holds_up_neither_admissions_nor_another_channel() {
    let hanging = Receiver::start(&[Reply::Hang]).await;
    let working = Receiver::start(&[]).await;
    let server = TestServer::start(&[("QUOTAWATCH_ALERT_ATTEMPT_TIMEOUT", "60s")]).await;
    let key = server.workspace(crossing_workspace("acme")).await;
    let stuck = channel(
        &server,
        json!({"name": "stuck", "type": "webhook", "url": hanging.url,
            "events": ["threshold_crossed"]}),
    )
    .await;
    channel(
        &server,
        json!({"name": "fine", "type": "slack", "url": working.url,
            "events": ["threshold_crossed"]}),
    )
    .await;
    assert_eq!(server.check(&key, 600).await.status, StatusCode::OK);
    working.wait_for(1).await;
    hanging.wait_for(1).await;
    // The hanging receiver holds its message; admissions go on meanwhile.
    for _ in 0..20 {
        assert_eq!(server.check(&key, 1).await.status, StatusCode::OK);
    }
    let stuck_id = stuck["id"].as_str().expect("id");
    let held = deliveries(&server, &format!("?channel={stuck_id}")).await;
    assert_eq!(held[0]["status"], "pending");
    assert!(
        held[0]["attempts"].as_array().expect("attempts").is_empty(),
        "the attempt is still in flight: {held:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_restart_in_the_middle_of_retries_loses_nothing_and_repeats_nothing() {
    let failing = Receiver::start(&[]).await;
    failing.answer_from_now(503);
    let healthy = Receiver::start(&[]).await;
    let mut server = TestServer::start(&[
        ("QUOTAWATCH_ALERT_RETRY_BASE", "200ms"),
        ("QUOTAWATCH_ALERT_RETRY_CAP", "500ms"),
    ])
    .await;
    let key = server.workspace(crossing_workspace("acme")).await;
    let failing_id = channel(
        &server,
        json!({"name": "down", "type": "webhook", "url": failing.url,
            "events": ["threshold_crossed"]}),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    channel(
        &server,
        json!({"name": "up", "type": "webhook", "url": healthy.url,
            "events": ["threshold_crossed"]}),
    )
    .await;
    assert_eq!(server.check(&key, 600).await.status, StatusCode::OK);
    healthy.wait_for(1).await;
    failing.wait_for(2).await;

    server.restart().await;
    failing.answer_from_now(200);
    let delivered = delivery_becomes(&server, &failing_id, "delivered").await;
    let attempts = delivered["attempts"].as_array().expect("attempts");
    let (last, retried) = attempts.split_last().expect("attempts");
    assert_eq!(last["outcome"], "delivered");
    assert!(retried.len() >= 2, "{delivered}");
    for attempt in retried {
        assert_eq!(attempt["outcome"], "retry");
        assert_eq!(attempt["http_status"], 503);
    }
    // Every attempt reached the receiver, each under the same id, and none
    // was lost or made twice.
    let resent = failing.received();
    assert_eq!(resent.len(), attempts.len());
    assert!(
        resent
            .iter()
            .all(|m| m.header("webhook-id") == delivered["id"])
    );
    // The delivery acknowledged before the restart was not sent again.
    assert_eq!(healthy.received().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn two_instances_deliver_each_threshold_crossing_once() {
    let Some(cluster) = Cluster::start(
        "two_instances_deliver_each_threshold_crossing_once",
        false,
        &[],
    )
    .await
    else {
        return;
    };
    let receiver = Receiver::start(&[]).await;
    channel(
        &cluster.a,
        json!({"name": "ops", "type": "webhook", "url": receiver.url,
            "events": ["threshold_crossed"]}),
    )
    .await;
    let key = cluster
        .workspace(json!({"id": "acme",
            "limits": {"requests_per_minute": null, "requests_per_day": null, "tokens_per_day": 1000},
            "alert_thresholds": {"default": [50, 80]}}))
        .await;
    assert_eq!(cluster.a.check(&key, 300).await.status, StatusCode::OK);
    assert_eq!(cluster.b.check(&key, 300).await.status, StatusCode::OK);
    receiver.wait_for(1).await;
    // The second crossing comes after every instance wrote, fanned out and
    // could have sent the first again.
    assert_eq!(cluster.b.check(&key, 250).await.status, StatusCode::OK);
    receiver.wait_for(2).await;
    eventually("both delivered", Duration::from_secs(10), || async {
        (deliveries(&cluster.a, "?status=delivered").await.len() == 2).then_some(())
    })
    .await;
    let messages = receiver.received();
    assert_eq!(messages.len(), 2, "{messages:?}");
    let notifications: Vec<Value> = messages
        .iter()
        .map(|message| message.json()["data"]["notification_id"].clone())
        .collect();
    assert_ne!(notifications[0], notifications[1], "{messages:?}");
    cluster.finish().await;
}

#[tokio::test]
async fn slack_receives_block_kit_with_the_figures_and_a_link() {
    let receiver = Receiver::start(&[]).await;
    let server = TestServer::start(&[("QUOTAWATCH_PUBLIC_URL", "https://quota.example.com")]).await;
    let key = server.workspace(crossing_workspace("acme")).await;
    let slack_id = channel(
        &server,
        // The crossing alone: a forecast of the day's exhaustion may or
        // may not be raised beside it, as the burst's pace is sampled.
        json!({"name": "slack", "workspace": "acme", "type": "slack", "url": receiver.url,
            "resolutions": false, "events": ["threshold_crossed"]}),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // A Slack URL is a credential: the API shows its scheme and host only.
    let shown = server
        .get(&format!("/api/alerts/channels/{slack_id}"), ADMIN_KEY)
        .await;
    let origin = receiver.url[..receiver.url[7..].find('/').expect("a path") + 7].to_owned();
    assert_eq!(shown.body["url"], format!("{origin}/…"), "{:?}", shown.body);
    let witness = Receiver::start(&[]).await;
    channel(
        &server,
        json!({"name": "witness", "type": "webhook", "url": witness.url,
            "events": ["threshold_crossed"]}),
    )
    .await;
    assert_eq!(server.check(&key, 600).await.status, StatusCode::OK);
    let message = receiver.wait_for(1).await.remove(0);
    assert!(
        message.header("webhook-signature").is_empty(),
        "Slack is not signed"
    );
    let body = message.json();
    assert!(body["text"].as_str().is_some_and(|text| !text.is_empty()));
    let blocks = body["blocks"].as_array().expect("blocks");
    assert_eq!(blocks[0]["type"], "header");
    assert_eq!(blocks[0]["text"]["type"], "plain_text");
    let fields: Vec<&str> = blocks
        .iter()
        .filter_map(|block| block["fields"].as_array())
        .flatten()
        .map(|field| field["text"].as_str().expect("text"))
        .collect();
    assert!(
        fields.iter().any(|f| f.starts_with("*Status*")),
        "{fields:?}"
    );
    assert!(
        fields.iter().any(|f| f.contains("600 of 1000 (60.0%)")),
        "{fields:?}"
    );
    assert!(
        fields.iter().any(|f| f.starts_with("*Resets at*")),
        "{fields:?}"
    );
    assert!(
        blocks.iter().any(|block| block["text"]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("*Suggested actions*"))),
        "{blocks:?}"
    );
    let button = blocks
        .iter()
        .find(|block| block["type"] == "actions")
        .expect("a button");
    assert_eq!(
        button["elements"][0]["url"],
        "https://quota.example.com/#/w/acme"
    );
    // Resolutions are off for this channel: the raised limit sends it
    // nothing, while a channel taking them gets it (fanned out together).
    patch_workspace(&server, "acme", json!({"limits": {"tokens_per_day": 2000}})).await;
    witness.wait_for(2).await;
    let to_slack = deliveries(&server, &format!("?channel={slack_id}")).await;
    assert_eq!(to_slack.len(), 1, "{to_slack:?}");
    assert_eq!(to_slack[0]["phase"], "raised");
    let tested = server
        .post("/api/alerts/test", ADMIN_KEY, json!({"channel": slack_id}))
        .await;
    assert_eq!(tested.body["attempt"]["outcome"], "delivered");
    let received = receiver.received();
    assert_eq!(received.len(), 2, "the test message, and no resolution");
    assert!(received[1].body.contains("Test alert"));
    server.stop().await;
}

#[tokio::test]
async fn the_channel_api_names_bad_fields_keeps_secrets_and_is_for_admins() {
    let server = TestServer::start(&[]).await;
    let key = server.workspace(json!({"id": "acme"})).await;
    let good = json!({"name": "ops", "type": "webhook", "url": "https://hooks.example.com/q"});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    for (body, param) in [
        (with("url", json!("ftp://example.com")), "url"),
        (with("url", json!("https://")), "url"),
        (with("type", json!("pager")), "type"),
        (with("name", json!("")), "name"),
        (
            with("events", json!(["threshold_crossed", "sunrise"])),
            "events[1]",
        ),
        (with("min_severity", json!("loud")), "min_severity"),
        (with("secret", json!("hunter2")), "secret"),
        (with("workspace", json!("nobody")), "workspace"),
    ] {
        let refused = server.post("/api/alerts/channels", ADMIN_KEY, body).await;
        assert!(
            refused.status == StatusCode::BAD_REQUEST || refused.status == StatusCode::NOT_FOUND,
            "{param}: {:?}",
            refused.body
        );
        assert_eq!(refused.body["error"]["param"], param, "{:?}", refused.body);
    }
    let slack_secret = json!({"name": "s", "type": "slack", "url": "https://hooks.example.com/s",
        "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"});
    let refused = server
        .post("/api/alerts/channels", ADMIN_KEY, slack_secret)
        .await;
    assert_eq!(refused.body["error"]["param"], "secret");

    // A secret given is kept, and never answered.
    let given = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let created = channel(&server, with("secret", json!(given))).await;
    assert!(created.get("secret").is_none(), "{created}");
    assert_eq!(created["secret_set"], true);
    assert_eq!(created["source"], "api");
    let id = created["id"].as_str().expect("id");
    let path = format!("/api/alerts/channels/{id}");
    let patched = server
        .send(
            Method::PATCH,
            &path,
            ADMIN_KEY,
            Some(json!({"events": ["rate_limited"], "min_severity": "critical", "enabled": false})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    assert_eq!(patched.body["events"], json!(["rate_limited"]));
    assert_eq!(patched.body["enabled"], false);
    let bad_patch = server
        .send(
            Method::PATCH,
            &path,
            ADMIN_KEY,
            Some(json!({"url": "nope"})),
        )
        .await;
    assert_eq!(bad_patch.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_patch.body["error"]["param"], "url");
    assert!(
        !server
            .get("/api/alerts/channels", ADMIN_KEY)
            .await
            .body
            .to_string()
            .contains(given)
    );

    // A workspace key is refused everywhere, as on the other admin routes.
    for (method, path, body) in [
        (Method::GET, "/api/alerts/channels".to_owned(), None),
        (
            Method::POST,
            "/api/alerts/channels".to_owned(),
            Some(good.clone()),
        ),
        (Method::GET, path.clone(), None),
        (Method::DELETE, path.clone(), None),
        (Method::GET, "/api/alerts/deliveries".to_owned(), None),
        (
            Method::POST,
            "/api/alerts/test".to_owned(),
            Some(json!({"channel": id})),
        ),
    ] {
        let refused = server.send(method.clone(), &path, &key, body).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    for (query, param) in [
        ("?status=lost", "status"),
        ("?limit=0", "limit"),
        ("?limit=501", "limit"),
    ] {
        let refused = server
            .get(&format!("/api/alerts/deliveries{query}"), ADMIN_KEY)
            .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(refused.body["error"]["param"], param);
    }
    let unknown = server
        .post(
            "/api/alerts/test",
            ADMIN_KEY,
            json!({"channel": "ch_nothing"}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.error_code(), "channel_not_found");
    let deleted = server.send(Method::DELETE, &path, ADMIN_KEY, None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        server.get(&path, ADMIN_KEY).await.status,
        StatusCode::NOT_FOUND
    );
    // A workspace's channels go with it.
    let own = channel(&server, with("workspace", json!("acme"))).await;
    let own_path = format!("/api/alerts/channels/{}", own["id"].as_str().expect("id"));
    let removed = server
        .send(Method::DELETE, "/api/workspaces/acme", ADMIN_KEY, None)
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    assert_eq!(
        server.get(&own_path, ADMIN_KEY).await.status,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test]
async fn more_events_than_the_digest_threshold_go_as_one_digest() {
    let receiver = Receiver::start(&[]).await;
    let server = TestServer::start(&[("QUOTAWATCH_ALERT_DIGEST_THRESHOLD", "2")]).await;
    let key = server
        .workspace(json!({"id": "acme",
            "limits": {"requests_per_minute": null, "requests_per_day": null, "tokens_per_day": 1000},
            "alert_thresholds": {"default": [10, 20, 30, 40]}}))
        .await;
    let id = channel(
        &server,
        json!({"name": "ops", "type": "webhook", "url": receiver.url,
            "events": ["threshold_crossed"]}),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // Four crossings at once, more than two: one message lists them all.
    assert_eq!(server.check(&key, 500).await.status, StatusCode::OK);
    let digest = receiver.wait_for(1).await.remove(0);
    let body = digest.json();
    assert_eq!(body["type"], "quotawatch.digest");
    assert_eq!(body["data"]["count"], 4, "{body}");
    let events = body["data"]["events"].as_array().expect("events");
    assert!(
        events
            .iter()
            .all(|event| event["type"] == "quotawatch.threshold_crossed.raised")
    );
    assert!(digest.header("webhook-id").starts_with("dig_"));
    let delivered = eventually("four deliveries", Duration::from_secs(10), || async {
        let delivered = deliveries(&server, &format!("?channel={id}&status=delivered")).await;
        (delivered.len() == 4).then_some(delivered)
    })
    .await;
    for delivery in &delivered {
        assert_eq!(
            delivery["attempts"][0]["digest_id"],
            digest.header("webhook-id")
        );
    }
    assert_eq!(receiver.received().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn channels_declared_in_the_configuration_are_read_only_through_the_api() {
    let receiver = Receiver::start(&[]).await;
    let mut server = TestServer::start(&[(
        "OPS_WEBHOOK_SECRET",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )])
    .await;
    server
        .restart_with_file(&format!(
            "[[alerts.channels]]\nname = \"ops\"\ntype = \"webhook\"\nurl = \"{}\"\nsecret_env = \"OPS_WEBHOOK_SECRET\"\n",
            receiver.url
        ))
        .await;
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    let channels = listed.body["channels"].as_array().expect("channels");
    assert_eq!(channels.len(), 1, "{channels:?}");
    assert_eq!(channels[0]["source"], "config");
    assert_eq!(channels[0]["secret_set"], true);
    let id = channels[0]["id"].as_str().expect("id").to_owned();
    let path = format!("/api/alerts/channels/{id}");
    for (method, body) in [
        (Method::PATCH, Some(json!({"enabled": false}))),
        (Method::DELETE, None),
    ] {
        let refused = server.send(method, &path, ADMIN_KEY, body).await;
        assert_eq!(refused.status, StatusCode::CONFLICT);
        assert_eq!(refused.error_code(), "channel_declared");
    }
    // It sends, signed with the secret its variable holds.
    let tested = server
        .post("/api/alerts/test", ADMIN_KEY, json!({"channel": id}))
        .await;
    assert_eq!(
        tested.body["attempt"]["outcome"], "delivered",
        "{:?}",
        tested.body
    );
    assert!(
        receiver.received()[0]
            .header("webhook-signature")
            .starts_with("v1,")
    );
    // A channel the configuration no longer declares goes at the next start.
    server.restart_with_file("").await;
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    assert_eq!(listed.body["channels"], json!([]));
    server.stop().await;
}

/// A channel the configuration file declares for one workspace takes that
/// workspace's events alone; one naming a workspace that does not exist
/// stops the start with the field named, rather than waiting for events
/// that never come.
#[tokio::test]
async fn a_declared_channel_of_one_workspace_takes_its_events_alone() {
    let receiver = Receiver::start(&[]).await;
    let mut server = TestServer::start(&[]).await;
    let acme = server.workspace(crossing_workspace("acme")).await;
    let beta = server.workspace(crossing_workspace("beta")).await;
    server
        .restart_with_file(&format!(
            "[[alerts.channels]]\nname = \"acme chat\"\nworkspace = \"acme\"\ntype = \"slack\"\nurl = \"{}\"\n",
            receiver.url
        ))
        .await;
    let listed = server.get("/api/alerts/channels", ADMIN_KEY).await;
    assert_eq!(listed.body["channels"][0]["workspace"], "acme");
    assert_eq!(listed.body["channels"][0]["source"], "config");
    // Beta crosses its threshold first, then acme.
    assert_eq!(server.check(&beta, 600).await.status, StatusCode::OK);
    assert_eq!(server.check(&acme, 600).await.status, StatusCode::OK);
    receiver.wait_for(1).await;
    let message = receiver.received()[0].body.clone();
    assert!(message.contains("acme"), "{message}");
    assert!(!message.contains("beta"), "{message}");
    assert!(
        deliveries(&server, "?workspace=beta").await.is_empty(),
        "beta's events go to no channel"
    );
    server.stop().await;

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("quotawatch.toml");
    std::fs::write(
        &file,
        "[[alerts.channels]]\nname = \"ghost chat\"\nworkspace = \"ghost\"\ntype = \"slack\"\nurl = \"https://hooks.slack.com/services/T0/B0/X\"\n",
    )
    .expect("write the file");
    let database = format!("sqlite://{}", dir.path().join("q.db").display());
    let vars = [("QUOTAWATCH_DATABASE_URL", database.as_str())];
    let lookup = move |name: &str| {
        vars.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| (*value).to_owned())
    };
    let config = quotawatch::config::load(quotawatch::config::Sources {
        file: Some(&file),
        dotenv: None,
        env: &lookup,
        cli: vec![],
    })
    .expect("the file itself is valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let env: quotawatch::keys::EnvLookup = Arc::new(|_: &str| None);
    let Err(error) = quotawatch::app::start(config, listener, env).await else {
        panic!("a channel of no workspace must stop the start");
    };
    assert!(
        error
            .to_string()
            .contains("alerts.channels[0].workspace: there is no workspace ghost"),
        "{error}"
    );
}

/// Disabling a channel gives up what waited for it: nothing stays pending
/// for ever, and enabling it again does not send stale alerts.
#[tokio::test]
async fn disabling_a_channel_gives_up_its_pending_deliveries() {
    let failing = Receiver::start(&[]).await;
    failing.answer_from_now(503);
    let server = TestServer::start(&[("QUOTAWATCH_ALERT_RETRY_BASE", "1h")]).await;
    let key = server.workspace(crossing_workspace("acme")).await;
    let id = channel(
        &server,
        json!({"name": "down", "type": "webhook", "url": failing.url,
            "events": ["threshold_crossed"]}),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(server.check(&key, 600).await.status, StatusCode::OK);
    failing.wait_for(1).await;
    let query = format!("?channel={id}");
    eventually(
        "the failed attempt is recorded and retried later",
        Duration::from_secs(15),
        || async {
            deliveries(&server, &query)
                .await
                .first()
                .filter(|d| {
                    d["status"] == "pending"
                        && d["attempts"].as_array().is_some_and(|a| a.len() == 1)
                })
                .cloned()
        },
    )
    .await;
    let disabled = server
        .send(
            Method::PATCH,
            &format!("/api/alerts/channels/{id}"),
            ADMIN_KEY,
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{:?}", disabled.body);
    let after = deliveries(&server, &query).await;
    assert!(!after.is_empty());
    assert!(after.iter().all(|d| d["status"] == "gave_up"), "{after:?}");
    server.stop().await;
}
