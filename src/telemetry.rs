//! Logging set-up, and the one function that masks secrets in anything
//! printed. Logs go to standard error, so standard output carries only what
//! commands print for people (tables, keys shown once).
//!
//! Every log line passes through [`mask_secrets`] on its way out, whatever
//! wrote it: our own events, tower-http's request spans (which carry the
//! request URI, and so a WebSocket `?ticket=`), and the errors of sqlx, redis
//! and reqwest, which may echo the URL they were given.

use std::borrow::Cow;
use std::io::{self, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// What a secret is replaced with.
pub const MASK: &str = "********";

/// Parameter names containing one of these (in any case) hold a secret:
/// `password=`, `sslpassword=`, `api_key=`, `access_token=`, `ticket=`...
const SECRET_NAME_PARTS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "key",
    "ticket",
    "auth",
    "credential",
    "signature",
];

/// ...unless it ends with one of these: identifiers (`key_id`) and counts
/// (`max_tokens`, `keys`), which log lines need and which give nothing away.
const PUBLIC_NAME_ENDINGS: &[&str] = &["_id", "-id", "tokens", "keys"];

/// Prefixes of the keys and tickets quotawatch issues, of OpenAI's keys,
/// of webhook signing secrets (Standard Webhooks' `whsec_`) and of Slack
/// incoming webhook URLs, whose path is their credential.
const KEY_PREFIXES: &[&str] = &[
    "qwt_",
    "qw_",
    "wst_",
    "sk-",
    WEBHOOK_SECRET_PREFIX,
    SLACK_HOOK_PREFIX,
];

/// A webhook secret is standard base64, with `+`, `/` and `=` in it.
const WEBHOOK_SECRET_PREFIX: &str = crate::domain::alert::SECRET_PREFIX;

/// A Slack incoming webhook's path names its workspace, channel and secret.
const SLACK_HOOK_PREFIX: &str = "hooks.slack.com/services/";

/// Browser tokens are two parts joined by a dot.
const TOKEN_PREFIX: &str = "qwt_";

/// The shortest run after a prefix that counts as a key: shorter ones (such
/// as `qw_AbCd`, the prefix lists show to tell keys apart) are not secrets.
const KEY_MIN_CHARS: usize = 8;

/// Masks every secret in `text`:
///
/// - the password of a URL's userinfo, whatever characters it holds (the
///   last `@` of the URL ends the userinfo, as in URL parsers, so a password
///   with an `@` is masked whole): `postgres://app:********@db/quota`;
/// - the value of any `name=value` parameter whose name says it is secret
///   (`?password=`, `&token=`, `?ticket=`, `api_key=` in a connection string);
/// - `Bearer` credentials;
/// - keys, tokens and tickets by their shape (`qw_...`, `qwt_...`, `wst_...`,
///   `sk-...`).
///
/// Values end at whitespace, quotes and control characters, and parameters
/// also at `&`, `#`, `;`, `,` and a backslash (which starts an escape in JSON
/// and `{:?}` output); masking more than the secret is preferred to masking
/// less. Masked text masks to itself.
pub fn mask_secrets(text: &str) -> Cow<'_, str> {
    let userinfo = mask_userinfo(text);
    let parameters = mask_parameters(&userinfo);
    let bearer = mask_bearer(&parameters);
    let keys = mask_keys(&bearer);
    if keys == text {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(keys.into_owned())
    }
}

/// Where a value that starts at `from` ends: at text that cannot be inside
/// one token of a log line, or at one of `extra`.
fn token_end(text: &str, from: usize, extra: &[u8]) -> usize {
    text.as_bytes()[from..]
        .iter()
        .position(|&b| ends_token(b) || extra.contains(&b))
        .map_or(text.len(), |offset| from + offset)
}

fn ends_token(b: u8) -> bool {
    b.is_ascii_whitespace()
        || b.is_ascii_control()
        || matches!(b, b'"' | b'\'' | b'`' | b'<' | b'>')
}

/// Where a URL that starts at `from` ends. Unlike other tokens, a quote
/// escaped with a backslash (a URL printed with `{:?}` or inside JSON) does
/// not end it, so that a password holding a quote is masked whole.
fn url_end(text: &str, from: usize) -> usize {
    let bytes = text.as_bytes();
    (from..bytes.len())
        .find(|&at| ends_token(bytes[at]) && !(at > from && bytes[at - 1] == b'\\'))
        .unwrap_or(text.len())
}

fn mask_userinfo(text: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut copied = 0;
    let mut search = 0;
    while let Some(offset) = text[search..].find("://") {
        let authority = search + offset + 3;
        let end = url_end(text, authority);
        search = end.max(authority);
        let url = &text[authority..end];
        let Some(at) = url.rfind('@') else { continue };
        let Some(colon) = url[..at].find(':') else {
            continue;
        };
        let password = &url[colon + 1..at];
        if password.is_empty() || password == MASK {
            continue;
        }
        out.push_str(&text[copied..authority + colon + 1]);
        out.push_str(MASK);
        copied = authority + at;
    }
    finish(text, out, copied)
}

fn mask_parameters(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut copied = 0;
    let mut search = 0;
    while let Some(offset) = text[search..].find('=') {
        let equals = search + offset;
        search = equals + 1;
        let name_start = bytes[..equals]
            .iter()
            .rposition(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
            .map_or(0, |before| before + 1);
        let name = text[name_start..equals].to_ascii_lowercase();
        let secret = SECRET_NAME_PARTS.iter().any(|part| name.contains(part))
            && !PUBLIC_NAME_ENDINGS
                .iter()
                .any(|ending| name.ends_with(ending));
        if !secret {
            continue;
        }
        let value_end = token_end(text, equals + 1, b"&#;,\\");
        let value = &text[equals + 1..value_end];
        if value.is_empty() || value == MASK {
            continue;
        }
        out.push_str(&text[copied..equals + 1]);
        out.push_str(MASK);
        copied = value_end;
        search = value_end;
    }
    finish(text, out, copied)
}

fn mask_bearer(text: &str) -> Cow<'_, str> {
    const BEARER: &str = "bearer ";
    let lower = text.to_ascii_lowercase();
    let mut out = String::new();
    let mut copied = 0;
    let mut search = 0;
    while let Some(offset) = lower[search..].find(BEARER) {
        let value_start = search + offset + BEARER.len();
        let value_end = token_end(text, value_start, &[]);
        search = value_end.max(value_start);
        let value = &text[value_start..value_end];
        if value.is_empty() || value == MASK {
            continue;
        }
        out.push_str(&text[copied..value_start]);
        out.push_str(MASK);
        copied = value_end;
    }
    finish(text, out, copied)
}

fn mask_keys(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let is_key_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-');
    let mut out = String::new();
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        let prefix = KEY_PREFIXES
            .iter()
            .find(|prefix| bytes[at..].starts_with(prefix.as_bytes()));
        let starts_word = at == 0 || !is_key_char(bytes[at - 1]);
        let (Some(prefix), true) = (prefix, starts_word) else {
            at += 1;
            continue;
        };
        let body_start = at + prefix.len();
        let in_body = |b: u8| {
            is_key_char(b)
                || (*prefix == TOKEN_PREFIX && b == b'.')
                || (*prefix == WEBHOOK_SECRET_PREFIX && matches!(b, b'+' | b'/' | b'='))
                || (*prefix == SLACK_HOOK_PREFIX && b == b'/')
        };
        let body_len = bytes[body_start..]
            .iter()
            .take_while(|&&b| in_body(b))
            .count();
        if body_len >= KEY_MIN_CHARS {
            out.push_str(&text[copied..body_start]);
            out.push_str(MASK);
            copied = body_start + body_len;
        }
        at = body_start + body_len;
    }
    finish(text, out, copied)
}

/// The masked text: `text` itself when nothing was masked.
fn finish(text: &str, mut out: String, copied: usize) -> Cow<'_, str> {
    if copied == 0 && out.is_empty() {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Standard error, with secrets masked. The formatter writes each event with
/// one `write_all` of the whole line, so a secret is never split between two
/// writes.
pub struct MaskedStderr;

impl Write for MaskedStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        io::stderr()
            .lock()
            .write_all(mask_secrets(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for MaskedStderr {
    type Writer = MaskedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        MaskedStderr
    }
}

/// Installs the global subscriber; later calls (in tests) are ignored.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file, a pipe or a
    // log collector they are noise in every line.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(MaskedStderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// HTTPS clients use rustls with the ring provider; this selects it for the
/// whole process before any client is built. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn masks_url_passwords_whatever_they_hold() {
        for (given, shown) in [
            (
                "postgres://app:p@ssw0rd-SECRET@db.internal:5432/quota?password=SECRET&sslmode=require",
                "postgres://app:********@db.internal:5432/quota?password=********&sslmode=require",
            ),
            (
                "redis://:hunter2@cache:6379/0",
                "redis://:********@cache:6379/0",
            ),
            ("redis://cache:6379/0", "redis://cache:6379/0"),
            ("postgres://app@db/quota", "postgres://app@db/quota"),
            (
                "error connecting to postgres://u:a:b/c?d@h/x: refused",
                "error connecting to postgres://u:********@h/x: refused",
            ),
            (
                "postgres://db/q?sslpassword=x&application_name=qw",
                "postgres://db/q?sslpassword=********&application_name=qw",
            ),
            (
                "host=db user=app password=hunter2 dbname=quota",
                "host=db user=app password=******** dbname=quota",
            ),
        ] {
            assert_eq!(mask_secrets(given), shown, "{given}");
        }
    }

    #[test]
    fn masks_tickets_keys_and_bearer_credentials_in_log_lines() {
        for (given, shown) in [
            (
                r#"{"uri":"/api/quota/ws?ticket=wst_AbCdEfGhIjKl&workspace=acme"}"#,
                r#"{"uri":"/api/quota/ws?ticket=********&workspace=acme"}"#,
            ),
            (
                "request uri=/api/quota/status?key=anything-at-all",
                "request uri=/api/quota/status?key=********",
            ),
            (
                "authorization: Bearer adminadminadmin123",
                "authorization: Bearer ********",
            ),
            (
                "presented qw_8K00UcImc-MroIoKLHhpND-Bv8o-LP5N and sk-proj-abcdefghijkl",
                "presented qw_******** and sk-********",
            ),
            (
                "token qwt_djEKYWNtZQprZXk6a2V5XzEKMTc2NDY3.VGhlIHNpZ25hdHVyZQ end",
                "token qwt_******** end",
            ),
            (
                "secret whsec_MfKQ9r8GKYqrTwjU+D8ILPZIo2LaLaSw== channel",
                "secret whsec_******** channel",
            ),
            (
                "url=https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXX failed",
                "url=https://hooks.slack.com/services/******** failed",
            ),
            ("key prefix qw_AbCd", "key prefix qw_AbCd"),
            ("status=200 latency_ms=12", "status=200 latency_ms=12"),
            (
                "key created workspace=acme key_id=key_0a1b2c3d4e5f",
                "key created workspace=acme key_id=key_0a1b2c3d4e5f",
            ),
            ("max_tokens=100 keys=3", "max_tokens=100 keys=3"),
        ] {
            assert_eq!(mask_secrets(given), shown, "{given}");
        }
    }

    /// Passwords of any characters but those that end a token in a log line
    /// unescaped.
    fn password() -> impl Strategy<Value = String> {
        "[^\\s\"'`<>\\p{Cc}]{1,24}"
    }

    proptest! {
        #[test]
        fn any_url_password_is_masked_whole(
            scheme in "(postgres|postgresql|redis|rediss|https)",
            user in "[a-z][a-z0-9]{0,8}",
            secret in password(),
            host in "[a-z][a-z0-9.]{0,15}(:[0-9]{1,5})?",
            path in "(/[a-z0-9]{1,8}){0,2}",
            token in "[^\\s\"'`\\\\<>&#;,@\\p{Cc}]{1,24}",
        ) {
            let url = format!("{scheme}://{user}:{secret}@{host}{path}?application_name=qw&token={token}");
            let masked = mask_secrets(&url).into_owned();
            prop_assert_eq!(
                masked,
                format!("{scheme}://{user}:{MASK}@{host}{path}?application_name=qw&token={MASK}")
            );
            let line = format!("cannot connect to {url:?}: refused");
            let shown = format!(":{secret}@");
            prop_assert!(!mask_secrets(&line).contains(&shown));
        }

        #[test]
        fn masking_never_panics_and_is_idempotent(text in "\\PC{0,80}|[a-z:/@?=&_ -]{0,80}") {
            let once = mask_secrets(&text).into_owned();
            let twice = mask_secrets(&once).into_owned();
            prop_assert_eq!(twice, once);
        }

        #[test]
        fn text_without_secrets_is_left_alone(text in "[a-zA-Z0-9 .,:/()]{0,80}") {
            prop_assume!(!text.to_ascii_lowercase().contains("bearer "));
            prop_assume!(!KEY_PREFIXES.iter().any(|prefix| text.contains(prefix)));
            let masked = mask_secrets(&text).into_owned();
            prop_assert_eq!(masked, text);
        }
    }
}
