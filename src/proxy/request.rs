//! What the proxy reads from a priced request's body, and the body it
//! forwards.
//!
//! A body sent to a priced endpoint is read as JSON whatever its
//! `Content-Type` says, and must be one valid JSON object: a body the
//! upstream might read one way while quotawatch reads it another (a lone
//! surrogate, a duplicate `stream`, nesting deeper than the parser goes, a
//! multipart wrapper) is refused before anything is charged or forwarded.
//!
//! Nothing here builds a tree of the body. The scalars the proxy needs are
//! read in one pass that skips everything else; the texts are counted in a
//! second pass by the estimator; the forwarded body is the received one,
//! with at most one value spliced in (`stream_options`), as slices of the
//! same buffer.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::estimate::{Endpoint, Estimate, Estimator, Sizing};
use crate::domain::price::Tier;
use crate::domain::scope::{PerScope, ScopeKind, Source};

/// `stream_options` larger than this are refused: quotawatch rewrites the
/// object to ask for usage, and OpenAI's has two small fields.
const MAX_STREAM_OPTIONS: usize = 4 << 10;

/// Why a body was refused; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("the body must be a JSON object")]
    NotAnObject,
    #[error("`{field}` must be {expected}")]
    Field {
        field: &'static str,
        expected: &'static str,
    },
}

impl BodyError {
    /// The request field at fault, for the error's `param`.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            BodyError::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// The fields of a request the proxy reads before forwarding it. Each is
/// kept raw and checked on its own, so that an error names its field;
/// a field given twice is an error (an upstream would take one of the two,
/// quotawatch cannot know which).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    /// Kept even when `null`, whose place the usage request then takes.
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
    #[serde(borrow, default)]
    service_tier: Option<&'a RawValue>,
    /// OpenAI's fields naming the end user, which scoped limits read (see
    /// `ScopeKind::source`).
    #[serde(borrow, default)]
    safety_identifier: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
}

impl<'a> Head<'a> {
    /// The body fields that name a scope's value, by name.
    fn named_fields(&self) -> [(&'static str, Option<&'a RawValue>); 2] {
        [
            ("safety_identifier", self.safety_identifier),
            ("user", self.user),
        ]
    }
}

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// `null` or a value of type `T`; anything else is an error naming `field`.
fn optional<T: DeserializeOwned>(
    raw: Option<&RawValue>,
    field: &'static str,
    expected: &'static str,
) -> Result<Option<T>, BodyError> {
    raw.map(|raw| serde_json::from_str::<Option<T>>(raw.get()))
        .transpose()
        .map(Option::flatten)
        .map_err(|_| BodyError::Field { field, expected })
}

/// Where `stream_options` is, and whether it already asks for usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamOptions {
    /// Absent: usage is asked for by adding the field after the `{`.
    Absent,
    /// `null`, or not an object (the byte range of its value): treated as
    /// absent, the value is replaced.
    NotAnObject { start: usize, end: usize },
    /// An object (its byte range), and whether it has `include_usage: true`.
    Object {
        start: usize,
        end: usize,
        asks_usage: bool,
    },
}

/// A priced request, read.
#[derive(Debug)]
pub struct JsonRequest {
    pub model: Option<String>,
    pub estimate: Estimate,
    /// The processing tier `service_tier` asks for, which prices the call.
    pub tier: Tier,
    /// A chat stream that did not ask for usage: quotawatch asks instead and
    /// hides the answer.
    pub inject_usage: bool,
    /// The values the body gives for scoped limits read from named fields
    /// (the end user), by `ScopeKind::index`.
    pub named: PerScope<Option<String>>,
    stream_options: StreamOptions,
}

/// The byte range of `raw` within `body`, which it was borrowed from.
fn range_in(body: &[u8], raw: &RawValue) -> (usize, usize) {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    (start, start + raw.get().len())
}

/// Reads a priced request's body: its scalars, then its estimate (which
/// walks the rest and refuses invalid text).
pub fn read(
    estimator: &Estimator,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<JsonRequest, BodyError> {
    // Checked first: a list would otherwise fill the head's fields in order.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(BodyError::NotAnObject);
    }
    let head: Head = serde_json::from_slice(body).map_err(BodyError::NotJson)?;
    let model: Option<String> = optional(head.model, "model", "a string")?;
    let stream: Option<bool> = optional(head.stream, "stream", "a boolean")?;
    let tokens = |raw, field| optional::<u64>(raw, field, "a whole number of tokens");
    let completion_limit = [
        tokens(head.max_completion_tokens, "max_completion_tokens")?,
        tokens(head.max_tokens, "max_tokens")?,
        tokens(head.max_output_tokens, "max_output_tokens")?,
    ]
    .into_iter()
    .flatten()
    .next();
    let n = optional::<u64>(head.n, "n", "a whole number")?;
    let tier = optional::<String>(head.service_tier, "service_tier", "a string")?
        .map_or_else(Tier::default, |tier| Tier::requested(&tier));
    let stream_options = match head.stream_options {
        None => StreamOptions::Absent,
        Some(raw) => {
            let (start, end) = range_in(body, raw);
            match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw.get()) {
                Ok(_) if raw.get().len() > MAX_STREAM_OPTIONS => {
                    return Err(BodyError::Field {
                        field: "stream_options",
                        expected: "an object of at most 4 KiB",
                    });
                }
                Ok(options) => StreamOptions::Object {
                    start,
                    end,
                    asks_usage: options.get("include_usage")
                        == Some(&serde_json::Value::Bool(true)),
                },
                Err(_) => StreamOptions::NotAnObject { start, end },
            }
        }
    };
    let mut named: PerScope<Option<String>> = Default::default();
    for kind in ScopeKind::ALL {
        if let Source::Named { body: fields, .. } = kind.source() {
            let given = head.named_fields();
            for field in fields {
                let raw = given
                    .iter()
                    .find(|(name, _)| name == field)
                    .and_then(|(_, raw)| *raw);
                if named[kind.index()].is_none() {
                    named[kind.index()] = optional(raw, field, "a string")?;
                }
            }
        }
    }
    let sizing = Sizing {
        model: model.as_deref(),
        completion_limit,
        n,
    };
    let estimate = estimator
        .estimate(endpoint, &sizing, body)
        .map_err(BodyError::NotJson)?;
    let asks_usage = matches!(
        stream_options,
        StreamOptions::Object {
            asks_usage: true,
            ..
        }
    );
    Ok(JsonRequest {
        model,
        estimate,
        tier,
        inject_usage: endpoint == Endpoint::ChatCompletions && stream == Some(true) && !asks_usage,
        named,
        stream_options,
    })
}

impl JsonRequest {
    /// The body to forward, as pieces of `body`: unchanged, or with usage
    /// asked for. The rest of the body goes upstream byte for byte.
    pub fn forwarded(&self, body: Bytes) -> Vec<Bytes> {
        if !self.inject_usage {
            return vec![body];
        }
        match self.stream_options {
            StreamOptions::Absent => {
                let Some(open) = body.iter().position(|b| *b == b'{') else {
                    return vec![body];
                };
                let rest = &body[open + 1..];
                // `{}` has nothing after the insertion: no comma then.
                let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
                let field: &'static [u8] = if empty {
                    br#""stream_options":{"include_usage":true}"#
                } else {
                    br#""stream_options":{"include_usage":true},"#
                };
                vec![
                    body.slice(..=open),
                    Bytes::from_static(field),
                    body.slice(open + 1..),
                ]
            }
            StreamOptions::NotAnObject { start, end } => vec![
                body.slice(..start),
                Bytes::from_static(br#"{"include_usage":true}"#),
                body.slice(end..),
            ],
            StreamOptions::Object { start, end, .. } => {
                // Small (see MAX_STREAM_OPTIONS), so re-serialised whole,
                // in the same key order.
                let mut options: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&body[start..end]).unwrap_or_default();
                options.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
                let options = serde_json::Value::Object(options).to_string();
                vec![body.slice(..start), Bytes::from(options), body.slice(end..)]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::estimate::Tokenizer;
    use serde_json::{Value, json};

    fn estimator() -> Estimator {
        Estimator::new(100, Tokenizer::Bytes)
    }

    fn read_chat(body: &str) -> Result<JsonRequest, BodyError> {
        read(&estimator(), Endpoint::ChatCompletions, body.as_bytes())
    }

    fn forwarded(body: &str) -> Value {
        let request = read_chat(body).expect("a valid request");
        let pieces = request.forwarded(Bytes::copy_from_slice(body.as_bytes()));
        serde_json::from_slice(&pieces.concat()).expect("forwarded JSON")
    }

    #[test]
    fn a_stream_gets_usage_asked_for_however_its_options_are_written() {
        for body in [
            r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
            r#"{"model":"gpt-4o","stream":true,"messages":[],"stream_options":null}"#,
            r#"{"model":"gpt-4o","stream":true,"messages":[],"stream_options":"yes"}"#,
            r#"{"model":"gpt-4o","stream":true,"messages":[],"stream_options":[1]}"#,
            r#"{"model":"gpt-4o","stream":true,"messages":[],"stream_options":{}}"#,
            r#"{"model":"gpt-4o","stream":true,"messages":[],"stream_options":{"include_usage":false}}"#,
            r#"{"stream":true}"#,
        ] {
            assert!(read_chat(body).expect("valid").inject_usage, "{body}");
            let sent = forwarded(body);
            assert_eq!(sent["stream_options"]["include_usage"], true, "{body}");
            assert_eq!(sent["stream"], true);
        }
        let kept = forwarded(
            r#"{"stream":true,"stream_options":{"include_obfuscation":false},"messages":[]}"#,
        );
        assert_eq!(
            kept["stream_options"],
            json!({"include_obfuscation": false, "include_usage": true})
        );
    }

    #[test]
    fn a_body_that_asks_for_usage_or_does_not_stream_goes_unchanged() {
        for body in [
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            r#"{"model":"gpt-4o","stream":false,"messages":[]}"#,
            r#"{"model":"gpt-4o","messages":[],"stream":null}"#,
        ] {
            let request = read_chat(body).expect("valid");
            assert!(!request.inject_usage, "{body}");
            let pieces = request.forwarded(Bytes::copy_from_slice(body.as_bytes()));
            assert_eq!(pieces.concat(), body.as_bytes());
        }
    }

    #[test]
    fn bodies_that_could_be_read_two_ways_are_refused() {
        let deep = format!("{{\"messages\":{}{}}}", "[".repeat(200), "]".repeat(200));
        for (body, what) in [
            (
                r#"{"messages":[{"role":"user","content":"\ud800"}]}"#,
                "lone surrogate",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}"#,
                "truncated",
            ),
            (
                r#"{"stream":false,"messages":[],"stream":true}"#,
                "duplicate field",
            ),
            (deep.as_str(), "recursion limit"),
            (r#"{"x":1} {"y":2}"#, "trailing"),
            ("", "empty"),
        ] {
            let error = read_chat(body).expect_err(what);
            assert!(matches!(error, BodyError::NotJson(_)), "{what}: {error}");
        }
        let multipart = "--boundary\r\nContent-Disposition: form-data\r\n\r\n{}";
        for body in [
            "[]",
            "[null,null,null]",
            "\"text\"",
            "42",
            "null",
            multipart,
        ] {
            assert!(
                matches!(read_chat(body), Err(BodyError::NotAnObject)),
                "{body}"
            );
        }
    }

    #[test]
    fn fields_of_the_wrong_type_are_named() {
        for (body, field) in [
            (r#"{"stream":"true"}"#, "stream"),
            (r#"{"model":7}"#, "model"),
            (r#"{"max_tokens":"100000"}"#, "max_tokens"),
            (r#"{"max_tokens":-1}"#, "max_tokens"),
            (r#"{"n":1.5}"#, "n"),
        ] {
            let error = read_chat(body).expect_err(body);
            assert_eq!(error.field(), Some(field), "{body}: {error}");
        }
    }

    #[test]
    fn the_end_user_is_the_first_of_its_fields_and_named_once() {
        let user = ScopeKind::User.index();
        let both = read_chat(r#"{"user":"bob","safety_identifier":"alice"}"#).expect("valid");
        assert_eq!(both.named[user].as_deref(), Some("alice"));
        let plain = read_chat(r#"{"user":"bob"}"#).expect("valid");
        assert_eq!(plain.named[user].as_deref(), Some("bob"));
        assert_eq!(read_chat("{}").expect("valid").named[user], None);
        let twice = read_chat(r#"{"user":"bob","user":"alice"}"#).expect_err("twice");
        assert!(matches!(twice, BodyError::NotJson(_)), "{twice}");
        let number = read_chat(r#"{"safety_identifier":7}"#).expect_err("a number");
        assert_eq!(number.field(), Some("safety_identifier"));
    }

    #[test]
    fn a_disguised_or_repeated_prompt_is_charged_no_less() {
        let plain = read_chat(r#"{"messages":[{"role":"user","content":"12345678"}]}"#)
            .expect("valid")
            .estimate;
        // An escaped key is the same key to every JSON reader.
        let escaped = read_chat(r#"{"mess\u0061ges":[{"role":"user","content":"12345678"}]}"#)
            .expect("valid")
            .estimate;
        assert_eq!(escaped, plain);
        // Given twice, an upstream takes one of the two: both are charged.
        let twice =
            read_chat(r#"{"messages":[{"role":"user","content":"12345678"}],"messages":[]}"#)
                .expect("valid")
                .estimate;
        assert!(twice.prompt >= plain.prompt, "{twice:?} < {plain:?}");
    }

    #[test]
    fn oversized_stream_options_are_refused() {
        let body = format!(
            r#"{{"stream":true,"stream_options":{{"pad":"{}"}}}}"#,
            "x".repeat(MAX_STREAM_OPTIONS)
        );
        let error = read_chat(&body).expect_err("too large");
        assert_eq!(error.field(), Some("stream_options"));
    }

    #[test]
    fn the_largest_numbers_make_the_largest_estimate() {
        let body = format!(r#"{{"max_tokens":{0},"n":{0},"messages":[]}}"#, u64::MAX);
        let estimate = read_chat(&body).expect("valid").estimate;
        assert_eq!(
            estimate.total(),
            u64::MAX,
            "saturated, never wrapped to little"
        );
        for field in ["max_tokens", "n"] {
            let error = read_chat(&format!(r#"{{"{field}":1e30}}"#)).expect_err(field);
            assert_eq!(error.field(), Some(field));
        }
    }

    #[test]
    fn the_estimate_counts_texts_and_the_completion_allowance() {
        let request = read_chat(
            r#"{"model":"gpt-4o","n":2,"max_tokens":10,"messages":[{"role":"user","content":"12345678"}]}"#,
        )
        .expect("valid");
        assert_eq!(request.model.as_deref(), Some("gpt-4o"));
        // Bytes tokenizer: 8 bytes are 2 tokens, plus 3 per message and 3 to prime the reply.
        assert_eq!(
            request.estimate,
            Estimate {
                prompt: 8,
                completion: 20
            }
        );
    }
}
