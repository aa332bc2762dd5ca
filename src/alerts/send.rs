//! Sending one message to one channel: the body for its kind, the
//! Standard Webhooks signature for a webhook, the POST with the attempt's
//! timeout (or an email through the SMTP server, within its timeout), and
//! the receiver's answer as `domain::alert` reads it.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::domain::alert::{Answer, ChannelKind, secret_bytes};
use crate::domain::time::Timestamp;
use crate::mail::{Email, MailError, Mailer, parse_recipients};
use crate::store::ChannelRecord;

/// The most of a receiver's answer read, for the error text of a refusal.
const MOST_ANSWER_READ: usize = 512;

/// One message, ready to send: the id receivers deduplicate by (the
/// delivery's, or the digest's), when it was made, and its JSON body.
pub struct Message {
    pub id: String,
    pub timestamp: Timestamp,
    pub body: Vec<u8>,
}

/// What came of one attempt.
pub struct Sent {
    pub answer: Answer,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub took: Duration,
}

/// The Standard Webhooks signature of `message` under `secret` (a
/// `whsec_` secret): `v1,` and the base64 HMAC-SHA256 of
/// `{id}.{timestamp in seconds}.{body}` keyed with the secret's bytes.
pub fn signature(secret: &str, message: &Message) -> Option<String> {
    let key = secret_bytes(secret).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(message.id.as_bytes());
    mac.update(b".");
    mac.update(seconds(message.timestamp).as_bytes());
    mac.update(b".");
    mac.update(&message.body);
    Some(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

fn seconds(at: Timestamp) -> String {
    at.millis().div_euclid(1000).to_string()
}

/// Posts `message` to `channel`, answering within `timeout` whatever the
/// receiver does.
pub async fn post(
    client: &reqwest::Client,
    channel: &ChannelRecord,
    message: &Message,
    timeout: Duration,
) -> Sent {
    let started = Instant::now();
    let mut request = client
        .post(&channel.url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            reqwest::header::USER_AGENT,
            concat!("quotawatch/", env!("CARGO_PKG_VERSION")),
        );
    match channel.kind {
        ChannelKind::Webhook => {
            request = request
                .header("webhook-id", &message.id)
                .header("webhook-timestamp", seconds(message.timestamp));
            let Some(signature) = channel
                .secret
                .as_deref()
                .and_then(|secret| signature(secret, message))
            else {
                return Sent {
                    answer: Answer::Status {
                        status: 400,
                        retry_after: None,
                    },
                    http_status: None,
                    error: Some("the channel's secret cannot sign: set a whsec_ secret".to_owned()),
                    took: started.elapsed(),
                };
            };
            request = request.header("webhook-signature", signature);
        }
        ChannelKind::Slack | ChannelKind::Email => {}
    }
    let result = tokio::time::timeout(timeout, async {
        let response = request.body(message.body.clone()).send().await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let text = if response.status().is_success() {
            String::new()
        } else {
            read_some(response).await
        };
        Ok::<_, reqwest::Error>((status, retry_after, text))
    })
    .await;
    let took = started.elapsed();
    match result {
        Ok(Ok((status, retry_after, text))) => Sent {
            answer: Answer::Status {
                status,
                retry_after,
            },
            http_status: Some(status),
            error: (!text.is_empty()).then_some(text),
            took,
        },
        Ok(Err(error)) if error.is_timeout() => timed_out(timeout, took),
        Ok(Err(error)) => Sent {
            answer: Answer::Failed,
            http_status: None,
            error: Some(crate::telemetry::mask_secrets(&describe(error)).into_owned()),
            took,
        },
        Err(_) => timed_out(timeout, took),
    }
}

/// Mails `email` to `recipients` (an email channel's, checked again here).
/// A failure worth trying again (no connection, a timeout, a 4xx reply) is
/// retried as a receiver that could not be reached; any other is a refusal.
pub async fn mail(mailer: &Mailer, recipients: &[String], email: &Email) -> Sent {
    let started = Instant::now();
    let result = match parse_recipients(recipients) {
        Ok(to) => mailer.send(&to, email).await,
        Err(error) => Err(MailError::Permanent(format!(
            "the channel's recipients cannot be used: {error}"
        ))),
    };
    let (answer, error) = match result {
        Ok(()) => (Answer::Accepted, None),
        Err(error) => (
            if error.is_transient() {
                Answer::Failed
            } else {
                Answer::Refused
            },
            Some(crate::telemetry::mask_secrets(&error.to_string()).into_owned()),
        ),
    };
    Sent {
        answer,
        http_status: None,
        error,
        took: started.elapsed(),
    }
}

/// The attempt of a message that could not be sent at all, for `reason`:
/// given up, as a refusal is.
pub fn unsendable(reason: &str) -> Sent {
    Sent {
        answer: Answer::Refused,
        http_status: None,
        error: Some(reason.to_owned()),
        took: Duration::ZERO,
    }
}

fn timed_out(timeout: Duration, took: Duration) -> Sent {
    Sent {
        answer: Answer::Timeout,
        http_status: None,
        error: Some(format!(
            "no answer within {}",
            crate::domain::time::format_duration(timeout)
        )),
        took,
    }
}

/// An error with its causes, which say what actually failed (refused,
/// reset, DNS), without the receiver's URL: a Slack (or Slack-like) URL is
/// a credential, and what this says is stored, answered and logged.
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The start of a refusal's body, as text.
async fn read_some(mut response: reqwest::Response) -> String {
    let mut read = Vec::new();
    while read.len() < MOST_ANSWER_READ {
        match response.chunk().await {
            Ok(Some(chunk)) => read.extend_from_slice(&chunk),
            _ => break,
        }
    }
    read.truncate(MOST_ANSWER_READ);
    String::from_utf8_lossy(&read)
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's test vectors.
    #[test]
    fn signs_as_standard_webhooks_does() {
        let message = Message {
            id: "msg_p5jXN8AQM9LWM0D4loKWxJek".to_owned(),
            timestamp: Timestamp::from_millis(1_614_265_330_000),
            body: br#"{"test": 2432232314}"#.to_vec(),
        };
        assert_eq!(
            signature("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &message).as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }
}
