//! Configuration: every setting, where it came from, and its validated value.
//!
//! Sources, in rising precedence: built-in defaults, the TOML file given with
//! `--config`, a `.env` file in the working directory, environment variables,
//! command-line flags. All of them are collected as text first and parsed
//! once at the end, so an invalid value fails the same way wherever it came
//! from, with a message naming the setting and its source.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::client::proxy::matcher::Matcher;
use lettre::message::Mailbox;
use serde::Deserialize;

use crate::admin::{Change, WorkspaceSpec};
use crate::alerts::{AlertSettings, DeclaredChannel};
use crate::domain::alert::{ChannelKind, Filter, RetryPolicy};
use crate::domain::limits::{
    LimitKind, Limits, PerLimit, Unit, ValidationError, WorkspaceConfig, WorkspaceId,
    validate_limit, validate_warn_at,
};
use crate::domain::limits::{
    REQUESTS_PER_DAY, REQUESTS_PER_MINUTE, REQUESTS_PER_MONTH, TOKENS_PER_DAY, TOKENS_PER_MINUTE,
    TOKENS_PER_MONTH,
};
use crate::domain::notification::Severity;
use crate::domain::price::{PicoUsd, Rates, UnpricedRates};
use crate::domain::threshold::ThresholdsInput;
use crate::domain::time::{format_duration, parse_duration};
use crate::domain::workspace::Settings;
use crate::engine::{OnStoreError, WorkspaceDefaults};
use crate::keys::Secret;
use crate::mail::{ExtraRoot, SmtpConfig, SmtpServer, parse_sender, read_extra_root};
use crate::proxy::UpstreamConfig;
use crate::proxy::estimate::Tokenizer;
use crate::telemetry::mask_secrets;

/// What every setting has, whatever its type: its key in the TOML file, its
/// environment variable, its default and what it does.
pub struct SettingDef {
    pub key: &'static str,
    pub env: &'static str,
    pub default: Option<&'static str>,
    pub secret: bool,
    pub help: &'static str,
}

/// One setting with the parser that turns its text into a `T`. Settings are
/// read by these constants (`read(&LISTEN)`), so a misspelt setting does not
/// compile.
pub struct Setting<T> {
    pub def: SettingDef,
    parse: fn(&str) -> Result<T, String>,
}

/// Declares each setting once, as a typed constant, and the table of all of
/// them (`SETTINGS`) from the same lines.
macro_rules! settings {
    ($(
        $name:ident: $ty:ty = ($key:literal, $env:literal, $default:expr, $secret:literal, $parse:expr,
            $help:literal);
    )*) => {
        $(
            pub const $name: Setting<$ty> = Setting {
                def: SettingDef { key: $key, env: $env, default: $default, secret: $secret, help: $help },
                parse: $parse,
            };
        )*
        /// Every setting quotawatch reads. README.md documents the same table.
        pub const SETTINGS: &[SettingDef] = &[$($name.def),*];
    };
}

settings! {
    LISTEN: SocketAddr = ("listen", "QUOTAWATCH_LISTEN", Some("127.0.0.1:8000"), false, parse_listen,
        "address and port to listen on");
    DATABASE_URL: String = ("database_url", "QUOTAWATCH_DATABASE_URL", Some("sqlite://quotawatch.db"), false, parse_database_url,
        "sqlite://PATH (created if missing) or postgres://...");
    DEFAULT_REQUESTS_PER_MINUTE: Option<u64> = ("default_requests_per_minute", "OPENAI_RATE_LIMIT_PER_MINUTE", Some("500"), false, |text| parse_limit(text, REQUESTS_PER_MINUTE),
        "requests-per-minute limit of new workspaces (\"unlimited\" for none)");
    DEFAULT_REQUESTS_PER_DAY: Option<u64> = ("default_requests_per_day", "OPENAI_RATE_LIMIT_PER_DAY", Some("10000"), false, |text| parse_limit(text, REQUESTS_PER_DAY),
        "requests-per-day limit of new workspaces");
    DEFAULT_TOKENS_PER_MINUTE: Option<u64> = ("default_tokens_per_minute", "QUOTAWATCH_DEFAULT_TOKENS_PER_MINUTE", Some("unlimited"), false, |text| parse_limit(text, TOKENS_PER_MINUTE),
        "tokens-per-minute limit of new workspaces");
    DEFAULT_TOKENS_PER_DAY: Option<u64> = ("default_tokens_per_day", "QUOTAWATCH_DEFAULT_TOKENS_PER_DAY", Some("unlimited"), false, |text| parse_limit(text, TOKENS_PER_DAY),
        "tokens-per-day limit of new workspaces");
    DEFAULT_REQUESTS_PER_MONTH: Option<u64> = ("default_requests_per_month", "QUOTAWATCH_DEFAULT_REQUESTS_PER_MONTH", Some("unlimited"), false, |text| parse_limit(text, REQUESTS_PER_MONTH),
        "requests-per-month limit of new workspaces (the calendar month in the workspace's timezone)");
    DEFAULT_TOKENS_PER_MONTH: Option<u64> = ("default_tokens_per_month", "QUOTAWATCH_DEFAULT_TOKENS_PER_MONTH", Some("unlimited"), false, |text| parse_limit(text, TOKENS_PER_MONTH),
        "tokens-per-month limit of new workspaces");
    DEFAULT_WARN_AT: f64 = ("default_warn_at", "QUOTAWATCH_DEFAULT_WARN_AT", Some("0.8"), false, parse_warn_at,
        "utilisation at which new workspaces start warning");
    ADMIN_KEY: Secret = ("admin_key", "QUOTA_ADMIN_RESET_KEY", None, true, parse_admin_key,
        "the admin key; when unset, one is generated on first start and printed once");
    RESERVATION_TTL: Duration = ("reservation_ttl", "QUOTAWATCH_RESERVATION_TTL", Some("10m"), false, parse_positive_duration,
        "how long an unsettled token reservation lives");
    PROBE_INTERVAL: Duration = ("probe_interval", "QUOTAWATCH_PROBE_INTERVAL", Some("60s"), false, parse_positive_duration,
        "how often one request may probe the upstream during a billing block");
    FORECAST_LEAD_TIME: Duration = ("forecast_lead_time", "QUOTAWATCH_FORECAST_LEAD_TIME", Some("2h"), false, parse_positive_duration,
        "how long before a day or month limit is forecast to run out its forecast_exhaustion notification is raised");
    FLUSH_INTERVAL: Duration = ("flush_interval", "QUOTAWATCH_FLUSH_INTERVAL", Some("1s"), false, parse_positive_duration,
        "how often counted usage is written to the database (the most a kill -9 can lose)");
    MAX_BODY_BYTES: usize = ("max_body_bytes", "QUOTAWATCH_MAX_BODY_BYTES", Some("65536"), false, parse_byte_count,
        "largest request body the /api routes accept");
    CORS_ORIGINS: Vec<String> = ("cors_origins", "QUOTAWATCH_CORS_ORIGINS", None, false, parse_origins,
        "origins (scheme://host:port, comma-separated) whose pages may call the API and open the WebSocket from a browser");
    WS_MAX_CONNECTIONS_PER_KEY: usize = ("ws_max_connections_per_key", "QUOTAWATCH_WS_MAX_CONNECTIONS_PER_KEY", Some("16"), false, parse_at_least_one,
        "most WebSocket connections one key may hold open on one instance; more are refused with 429");
    WS_PING_INTERVAL: Duration = ("ws_ping_interval", "QUOTAWATCH_WS_PING_INTERVAL", Some("30s"), false, parse_positive_duration,
        "how often the server pings WebSocket clients; silent peers are closed after two");
    LOG_FORMAT: LogFormat = ("log_format", "QUOTAWATCH_LOG_FORMAT", Some("pretty"), false, parse_log_format,
        "pretty or json");
    LOG_LEVEL: String = ("log_level", "QUOTAWATCH_LOG", Some("info"), false, parse_log_filter,
        "a tracing filter such as info or quotawatch=debug");
    UPSTREAM_URL: String = ("upstream_url", "QUOTAWATCH_UPSTREAM_URL", Some("https://api.openai.com/v1"), false, parse_upstream_url,
        "where /v1/* is forwarded (deliberately not OPENAI_BASE_URL, which apps point at quotawatch)");
    UPSTREAM_API_KEY: Secret = ("upstream_api_key", "OPENAI_API_KEY", None, true, |text| Ok(Secret::new(text)),
        "the key sent upstream, unless a workspace names its own variable");
    UPSTREAM_CONNECT_TIMEOUT: Duration = ("upstream_connect_timeout", "QUOTAWATCH_UPSTREAM_CONNECT_TIMEOUT", Some("10s"), false, parse_positive_duration,
        "time to connect to the upstream");
    UPSTREAM_CA_FILE: ExtraRoot = ("upstream_ca_file", "QUOTAWATCH_UPSTREAM_CA_FILE", None, false, read_extra_root,
        "a PEM file of root certificates to trust beside the system's for an https:// upstream or proxy (a private gateway)");
    UPSTREAM_HEADERS_TIMEOUT: Duration = ("upstream_headers_timeout", "QUOTAWATCH_UPSTREAM_HEADERS_TIMEOUT", Some("600s"), false, parse_positive_duration,
        "time until the upstream's response headers");
    UPSTREAM_IDLE_TIMEOUT: Duration = ("upstream_idle_timeout", "QUOTAWATCH_UPSTREAM_IDLE_TIMEOUT", Some("300s"), false, parse_positive_duration,
        "longest gap between chunks of a streamed response (there is no total timeout)");
    PROXY_MAX_BODY_BYTES: usize = ("proxy_max_body_bytes", "QUOTAWATCH_PROXY_MAX_BODY_BYTES", Some("33554432"), false, parse_byte_count,
        "largest request body /v1/* accepts");
    DEFAULT_MAX_TOKENS: u64 = ("default_max_tokens", "QUOTAWATCH_DEFAULT_MAX_TOKENS", Some("1024"), false, parse_whole_number,
        "completion tokens reserved when a request sets no max_tokens");
    TOKENIZER: Tokenizer = ("tokenizer", "QUOTAWATCH_TOKENIZER", Some("tiktoken"), false, parse_tokenizer,
        "how prompts are counted at admission: tiktoken (exact, ~4 MiB per encoding) or bytes (4 bytes per token)");
    METRICS_MODELS: Vec<String> = ("metrics_models", "QUOTAWATCH_METRICS_MODELS", Some("gpt-5,gpt-5-mini,gpt-5-nano,gpt-4.1,gpt-4.1-mini,gpt-4.1-nano,gpt-4o,gpt-4o-mini,o3,o4-mini,text-embedding-3-small,text-embedding-3-large"), false, parse_list,
        "models that get their own metrics label; others are counted as other");
    METRICS_PUBLIC: bool = ("metrics_public", "QUOTAWATCH_METRICS_PUBLIC", Some("false"), false, parse_bool,
        "serve /metrics without the admin key");
    PRICES_FILE: PathBuf = ("prices_file", "QUOTAWATCH_PRICES_FILE", None, false, |text| Ok(PathBuf::from(text)),
        "a price file (the model_prices_and_context_window.json format) laid over the built-in prices; read again on SIGHUP and POST /api/prices/reload");
    UNPRICED_MODEL_RATE: UnpricedRates = ("unpriced_model_rate", "QUOTAWATCH_UNPRICED_MODEL_RATE", Some("highest"), false, parse_unpriced_rate,
        "what a model missing from the prices is charged: highest (the table's highest input and output rates, so budgets err toward refusing) or INPUT,OUTPUT in USD per million tokens, such as 2.5,10");
    REDIS_URL: String = ("redis_url", "QUOTAWATCH_REDIS_URL", None, false, parse_redis_url,
        "redis://HOST:PORT/DB: share counters, blocks and live events with other instances (unset: this instance counts alone)");
    REDIS_PREFIX: String = ("redis_prefix", "QUOTAWATCH_REDIS_PREFIX", Some("quotawatch:"), false, |text| Ok(text.to_owned()),
        "prefix of every Redis key and channel; instances that share limits use the same one");
    REDIS_TIMEOUT: Duration = ("redis_timeout", "QUOTAWATCH_REDIS_TIMEOUT", Some("50ms"), false, parse_positive_duration,
        "longest wait for any Redis call before the on_store_error fallback applies");
    ON_STORE_ERROR: StoreErrorMode = ("on_store_error", "QUOTAWATCH_ON_STORE_ERROR", Some("local"), false, parse_store_error_mode,
        "while Redis is unreachable: local (each instance enforces limit/replicas), closed (refuse with 503) or open (admit, count locally)");
    REPLICAS: u32 = ("replicas", "QUOTAWATCH_REPLICAS", Some("1"), false, parse_at_least_one,
        "how many instances share the limits; each enforces 1/replicas of them while Redis is unreachable");
    SMTP_URL: SmtpServer = ("smtp_url", "QUOTAWATCH_SMTP_URL", None, false, SmtpServer::parse,
        "the SMTP server email alerts go through: smtps://USER:PASSWORD@HOST:465 (TLS), smtp://USER:PASSWORD@HOST:587 (STARTTLS, required) or smtp://HOST:25?tls=none (unencrypted, without a password)");
    SMTP_FROM: Mailbox = ("smtp_from", "QUOTAWATCH_SMTP_FROM", None, false, parse_sender,
        "the sender of email alerts, such as quotawatch <alerts@example.com>; needed with QUOTAWATCH_SMTP_URL");
    SMTP_CA_FILE: ExtraRoot = ("smtp_ca_file", "QUOTAWATCH_SMTP_CA_FILE", None, false, read_extra_root,
        "a PEM file of a root certificate to trust beside the system's for the SMTP server (a private relay)");
    SMTP_TIMEOUT: Duration = ("smtp_timeout", "QUOTAWATCH_SMTP_TIMEOUT", Some("30s"), false, parse_positive_duration,
        "longest one email delivery may take, from connecting to the server's last answer; it is then tried again later");
    PUBLIC_URL: String = ("public_url", "QUOTAWATCH_PUBLIC_URL", None, false, parse_upstream_url,
        "the dashboard's public address (https://quota.example.com), for the links alerts carry; unset: alerts carry none");
    ALERT_DIGEST_THRESHOLD: usize = ("alert_digest_threshold", "QUOTAWATCH_ALERT_DIGEST_THRESHOLD", Some("10"), false, parse_at_least_one,
        "more alert events than this due for one channel within a minute are sent as one digest message");
    ALERT_CHANNEL_RATE: f64 = ("alert_channel_rate", "QUOTAWATCH_ALERT_CHANNEL_RATE", Some("1"), false, parse_rate,
        "alert messages per second each channel is sent at most (a token bucket)");
    ALERT_ATTEMPT_TIMEOUT: Duration = ("alert_attempt_timeout", "QUOTAWATCH_ALERT_ATTEMPT_TIMEOUT", Some("10s"), false, parse_positive_duration,
        "how long one alert delivery attempt waits for its receiver");
    ALERT_RETRY_BASE: Duration = ("alert_retry_base", "QUOTAWATCH_ALERT_RETRY_BASE", Some("30s"), false, parse_positive_duration,
        "the backoff before an alert's first retry, doubled for each one after (with full jitter)");
    ALERT_RETRY_CAP: Duration = ("alert_retry_cap", "QUOTAWATCH_ALERT_RETRY_CAP", Some("1h"), false, parse_positive_duration,
        "the longest backoff between two attempts of an alert");
    ALERT_RETRY_MAX_AGE: Duration = ("alert_retry_max_age", "QUOTAWATCH_ALERT_RETRY_MAX_AGE", Some("24h"), false, parse_positive_duration,
        "how long after its first attempt an alert delivery is retried before it is given up");
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    DotEnv,
    Environment,
    CommandLine,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(path) => write!(f, "{}", path.display()),
            Source::DotEnv => f.write_str(".env"),
            Source::Environment => f.write_str("environment"),
            Source::CommandLine => f.write_str("command line"),
        }
    }
}

/// A setting that could not be used, named by its environment variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting} (from {source_name}): {message}")]
pub struct ConfigError {
    pub setting: String,
    pub source_name: String,
    pub message: String,
}

impl ConfigError {
    fn new(setting: impl Into<String>, source: &Source, message: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            source_name: source.to_string(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// A setting as it ended up, for `check-config`.
#[derive(Clone, Debug)]
pub struct Effective {
    pub env: &'static str,
    pub key: &'static str,
    pub shown: String,
    pub source: Source,
}

#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub url: String,
    pub prefix: String,
    pub timeout: Duration,
    pub on_store_error: OnStoreError,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: String,
    pub defaults: WorkspaceDefaults,
    pub admin_key: Option<Secret>,
    pub engine: Settings,
    pub flush_interval: Duration,
    pub max_body_bytes: usize,
    pub ws_ping_interval: Duration,
    pub ws_max_connections_per_key: usize,
    /// Origins whose pages may call the API and open the WebSocket.
    pub cors_origins: Vec<String>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub upstream: UpstreamConfig,
    /// Models that get their own metrics label.
    pub metrics_models: Vec<String>,
    pub metrics_public: bool,
    /// The operator's prices, laid over the built-in ones.
    pub prices_file: Option<PathBuf>,
    /// What a model missing from the prices is charged.
    pub unpriced_model_rate: UnpricedRates,
    /// Counters shared with other instances, when configured.
    pub redis: Option<RedisConfig>,
    /// The SMTP server email alerts go through, when configured.
    pub smtp: Option<SmtpConfig>,
    /// Workspaces declared in the TOML file, applied at start-up.
    pub workspaces: Vec<(String, WorkspaceSpec)>,
    /// The file that declares `workspaces`, which manages them from then on.
    pub workspaces_file: Option<PathBuf>,
    pub alerts: AlertSettings,
    /// Alert channels declared in the TOML file (`[[alerts.channels]]`).
    pub alert_channels: Vec<DeclaredChannel>,
    pub effective: Vec<Effective>,
}

/// Overrides given as command-line flags, by setting key.
pub type CliOverrides = Vec<(&'static str, String)>;

/// Where to read configuration from. `env` is the one way environment
/// variables are read, so tests can supply their own.
pub struct Sources<'a> {
    pub file: Option<&'a Path>,
    pub dotenv: Option<&'a Path>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub cli: CliOverrides,
}

impl<'a> Sources<'a> {
    /// The process's real sources: its environment and `./.env`.
    pub fn process(file: Option<&'a Path>, cli: CliOverrides) -> Self {
        Self {
            file,
            dotenv: Some(Path::new(".env")),
            env: &|name| std::env::var(name).ok(),
            cli,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWorkspace {
    id: String,
    name: Option<String>,
    timezone: Option<String>,
    warn_at: Option<f64>,
    upstream_key_env: Option<String>,
    upstream_organization: Option<String>,
    upstream_project: Option<String>,
    #[serde(default)]
    limits: HashMap<String, FileLimit>,
    alert_thresholds: Option<FileThresholds>,
}

/// A declared workspace's alert thresholds, as the API takes them (a
/// limit's list replaces the default for it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileThresholds {
    default: Option<Vec<f64>>,
    #[serde(default)]
    limits: std::collections::BTreeMap<String, Vec<f64>>,
}

/// The TOML file's `[alerts]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAlerts {
    #[serde(default)]
    channels: Vec<FileChannel>,
}

/// An alert channel declared in the TOML file (global, or one workspace's). Its URL (a Slack
/// webhook's is a secret) and its signing secret may be read from
/// environment variables it names; an email channel lists its recipients
/// instead of a URL.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileChannel {
    name: String,
    /// The workspace whose events it takes; none: a global channel.
    workspace: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    url: Option<String>,
    url_env: Option<String>,
    to: Option<Vec<String>>,
    secret_env: Option<String>,
    events: Option<Vec<String>>,
    min_severity: Option<String>,
    resolutions: Option<bool>,
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileLimit {
    /// Signed, so that a negative limit gets a plain message rather than
    /// serde's "did not match any variant".
    Count(i64),
    /// Dollars with a fraction, for usd limits.
    Amount(f64),
    Word(String),
}

pub fn load(sources: Sources<'_>) -> Result<Config, ConfigError> {
    let mut values: HashMap<&'static str, (String, Source)> = SETTINGS
        .iter()
        .filter_map(|s| s.default.map(|d| (s.key, (d.to_owned(), Source::Default))))
        .collect();
    let mut declared = (Vec::new(), Source::Default);
    let mut declared_channels = Vec::new();
    let mut channels_source = Source::Default;

    if let Some(path) = sources.file {
        let source = Source::File(path.to_owned());
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", &source, format!("cannot read the file: {e}"))
        })?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| ConfigError::new("--config", &source, format!("not valid TOML: {e}")))?;
        for (key, value) in table {
            if key == "workspaces" {
                let list: Vec<FileWorkspace> = value
                    .try_into()
                    .map_err(|e| ConfigError::new("workspaces", &source, format!("{e}")))?;
                declared = (list, source.clone());
                continue;
            }
            if key == "alerts" {
                let alerts: FileAlerts = value
                    .try_into()
                    .map_err(|e| ConfigError::new("alerts", &source, format!("{e}")))?;
                declared_channels = alerts
                    .channels
                    .into_iter()
                    .enumerate()
                    .map(|(index, channel)| file_channel(index, channel, &source, sources.env))
                    .collect::<Result<Vec<_>, _>>()?;
                channels_source = source.clone();
                continue;
            }
            let setting = SETTINGS
                .iter()
                .find(|s| s.key == key || s.env == key)
                .ok_or_else(|| {
                    let known: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
                    ConfigError::new(
                        key.clone(),
                        &source,
                        format!("unknown setting; known settings are {}", known.join(", ")),
                    )
                })?;
            let text = match value {
                toml::Value::String(text) => text,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(x) => x.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(ConfigError::new(
                        setting.env,
                        &source,
                        format!("expected a string or a number, got {}", other.type_str()),
                    ));
                }
            };
            values.insert(setting.key, (text, source.clone()));
        }
    }

    if let Some(path) = sources.dotenv.filter(|path| path.exists()) {
        let entries = dotenvy::from_path_iter(path)
            .map_err(|e| ConfigError::new(".env", &Source::DotEnv, format!("cannot read: {e}")))?;
        for entry in entries {
            let (name, value) = entry.map_err(|e| {
                ConfigError::new(".env", &Source::DotEnv, format!("cannot parse: {e}"))
            })?;
            if let Some(setting) = SETTINGS.iter().find(|s| s.env == name) {
                values.insert(setting.key, (value, Source::DotEnv));
            }
        }
    }

    for setting in SETTINGS {
        if let Some(value) = (sources.env)(setting.env) {
            values.insert(setting.key, (value, Source::Environment));
        }
    }
    // A variable set to nothing is most often a template left unfilled
    // (`OPENAI_RATE_LIMIT_PER_MINUTE=`); read as "unlimited" or as the
    // default, it would change limits silently.
    for setting in SETTINGS {
        if let Some((value, source)) = values.get(setting.key)
            && value.trim().is_empty()
        {
            let default = setting
                .default
                .map_or("none".to_owned(), |default| format!("{default:?}"));
            return Err(ConfigError::new(
                setting.env,
                source,
                format!(
                    "is set but empty: unset it for the default ({default}) or give it a value"
                ),
            ));
        }
    }
    for (key, value) in sources.cli {
        values.insert(key, (value, Source::CommandLine));
    }

    let mut config = build(values, declared, sources.env)?;
    // Refused here rather than at the first alert, which would give up on
    // every email a channel was meant to send.
    if config.smtp.is_none()
        && let Some(index) = declared_channels
            .iter()
            .position(|channel| channel.kind == ChannelKind::Email)
    {
        return Err(ConfigError::new(
            format!("alerts.channels[{index}].type"),
            &channels_source,
            format!(
                "an email channel needs the SMTP server: set {} and {}, or remove the channel",
                SMTP_URL.def.env, SMTP_FROM.def.env
            ),
        ));
    }
    config.alert_channels = declared_channels;
    Ok(config)
}

/// A declared channel, validated, with the variables it names read.
fn file_channel(
    index: usize,
    channel: FileChannel,
    source: &Source,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DeclaredChannel, ConfigError> {
    let fail = |field: &str, message: String| {
        ConfigError::new(format!("alerts.channels[{index}].{field}"), source, message)
    };
    let from_env = |field: &str, name: &str| {
        env(name)
            .filter(|value| !value.is_empty())
            .ok_or_else(|| fail(field, format!("the environment variable {name} is not set")))
    };
    crate::domain::alert::validate_name(&channel.name).map_err(|e| fail("name", e.message))?;
    let kind = ChannelKind::from_name(&channel.kind)
        .ok_or_else(|| fail("type", "is webhook, slack or email".to_owned()))?;
    // The receiver, by the rules the admin API applies
    // (`alerts::receiver_url`, `alerts::receiver_recipients`): each kind
    // takes only its own, so giving the other kind's is refused there.
    let rule =
        |error: ValidationError| fail(&error.field, mask_secrets(&error.message).into_owned());
    if let Some(list) = &channel.to
        && kind.has_url()
    {
        crate::alerts::receiver_recipients(kind, list).map_err(rule)?;
    }
    let (url, recipients) = if kind.has_url() {
        let url = match (channel.url, &channel.url_env) {
            (Some(url), None) => url,
            (None, Some(name)) => from_env("url_env", name)?,
            _ => return Err(fail("url", "give url or url_env (one of them)".to_owned())),
        };
        crate::alerts::receiver_url(kind, &url).map_err(rule)?;
        (Some(Secret::new(&url)), Vec::new())
    } else {
        if let Some(given) = channel.url.as_deref() {
            crate::alerts::receiver_url(kind, given).map_err(rule)?;
        }
        if channel.url_env.is_some() {
            crate::alerts::receiver_url(kind, "").map_err(|e| fail("url_env", e.message))?;
        }
        let list = channel.to.ok_or_else(|| {
            fail(
                "to",
                "an email channel needs its recipients: a list of addresses".to_owned(),
            )
        })?;
        let addresses = crate::alerts::receiver_recipients(kind, &list).map_err(rule)?;
        (None, addresses)
    };
    let secret = match (&channel.secret_env, kind.is_signed()) {
        (Some(name), true) => {
            let secret = from_env("secret_env", name)?;
            crate::alerts::signing_secret(kind, &secret)
                .map_err(|e| fail("secret_env", format!("{name}: {}", e.message)))?;
            Some(Secret::new(&secret))
        }
        (None, true) => {
            return Err(fail(
                "secret_env",
                "a webhook signs with a secret: name the variable that holds it (whsec_...)"
                    .to_owned(),
            ));
        }
        (Some(_), false) => {
            return Err(fail("secret_env", "only webhooks are signed".to_owned()));
        }
        (None, false) => None,
    };
    let events = match channel.events {
        Some(events) => Some(crate::domain::alert::validate_events(&events).map_err(|e| {
            ConfigError::new(
                format!("alerts.channels[{index}].{}", e.field),
                source,
                e.message,
            )
        })?),
        None => None,
    };
    let min_severity = match channel.min_severity.as_deref() {
        None => Severity::Info,
        Some(name) => Severity::from_name(name)
            .ok_or_else(|| fail("min_severity", "is info, warning or critical".to_owned()))?,
    };
    let workspace = match channel.workspace.as_deref() {
        None => None,
        Some(id) => Some(id.parse::<WorkspaceId>().map_err(|_| {
            fail(
                "workspace",
                format!("{id:?} is not a workspace id (1 to 64 of a-z, 0-9, - and _)"),
            )
        })?),
    };
    Ok(DeclaredChannel {
        name: channel.name,
        workspace,
        kind,
        url,
        recipients,
        secret,
        filter: Filter {
            events,
            min_severity,
            resolutions: channel.resolutions.unwrap_or(true),
        },
        enabled: channel.enabled.unwrap_or(true),
    })
}

fn parse_rate(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|rate| rate.is_finite() && *rate >= 0.01 && *rate <= 1000.0)
        .ok_or_else(|| format!("{text:?} is not a rate between 0.01 and 1000 per second"))
}

/// The collected text of every setting, with where it came from.
struct Values(HashMap<&'static str, (String, Source)>);

impl Values {
    fn text(&self, def: &SettingDef) -> (&str, &Source) {
        self.0
            .get(def.key)
            .map_or(("", &Source::Default), |(value, source)| {
                (value.trim(), source)
            })
    }

    /// A setting that has a default, parsed.
    fn read<T>(&self, setting: &Setting<T>) -> Result<T, ConfigError> {
        let (text, source) = self.text(&setting.def);
        (setting.parse)(text).map_err(|message| ConfigError::new(setting.def.env, source, message))
    }

    /// A setting without a default: `None` when it is unset.
    fn read_optional<T>(&self, setting: &Setting<T>) -> Result<Option<T>, ConfigError> {
        match self.text(&setting.def) {
            ("", _) => Ok(None),
            _ => self.read(setting).map(Some),
        }
    }
}

fn build(
    values: HashMap<&'static str, (String, Source)>,
    (declared, declared_in): (Vec<FileWorkspace>, Source),
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let values = Values(values);
    let mut limits = Limits::default();
    for (setting, kind) in [
        (&DEFAULT_REQUESTS_PER_MINUTE, REQUESTS_PER_MINUTE),
        (&DEFAULT_REQUESTS_PER_DAY, REQUESTS_PER_DAY),
        (&DEFAULT_TOKENS_PER_MINUTE, TOKENS_PER_MINUTE),
        (&DEFAULT_TOKENS_PER_DAY, TOKENS_PER_DAY),
        (&DEFAULT_REQUESTS_PER_MONTH, REQUESTS_PER_MONTH),
        (&DEFAULT_TOKENS_PER_MONTH, TOKENS_PER_MONTH),
    ] {
        limits.set(kind, values.read(setting)?);
    }
    let warn_at = values.read(&DEFAULT_WARN_AT)?;
    let replicas = values.read(&REPLICAS)?;
    let on_store_error = match values.read(&ON_STORE_ERROR)? {
        StoreErrorMode::Local => OnStoreError::Local {
            instances: replicas,
        },
        StoreErrorMode::Closed => OnStoreError::Closed,
        StoreErrorMode::Open => OnStoreError::Open,
    };
    let redis = match values.read_optional(&REDIS_URL)? {
        None => None,
        Some(url) => Some(RedisConfig {
            url,
            prefix: values.read(&REDIS_PREFIX)?,
            timeout: values.read(&REDIS_TIMEOUT)?,
            on_store_error,
        }),
    };
    let smtp = smtp_config(&values)?;

    let workspaces = declared
        .into_iter()
        .enumerate()
        .map(|(index, declared)| file_workspace(index, declared, &declared_in, limits, warn_at))
        .collect::<Result<Vec<_>, _>>()?;
    // Two declarations of one workspace would each be applied in turn, the
    // last silently winning.
    let mut seen = std::collections::HashSet::new();
    for (index, (id, _)) in workspaces.iter().enumerate() {
        if !seen.insert(id.as_str()) {
            return Err(ConfigError::new(
                format!("workspaces[{index}].id"),
                &declared_in,
                format!("workspace {id:?} is declared twice"),
            ));
        }
    }

    let effective = SETTINGS
        .iter()
        .map(|setting| {
            let (value, source) = values.text(setting);
            let shown = match (setting.secret, value.is_empty()) {
                (_, true) => "(unset)".to_owned(),
                (true, false) => "******** (set)".to_owned(),
                (false, false) => mask_secrets(value).into_owned(),
            };
            Effective {
                env: setting.env,
                key: setting.key,
                shown,
                source: source.clone(),
            }
        })
        .collect();

    Ok(Config {
        listen: values.read(&LISTEN)?,
        database_url: values.read(&DATABASE_URL)?,
        defaults: WorkspaceDefaults { limits, warn_at },
        admin_key: values.read_optional(&ADMIN_KEY)?,
        engine: Settings {
            reservation_ttl: values.read(&RESERVATION_TTL)?,
            probe_interval: values.read(&PROBE_INTERVAL)?,
            forecast_lead_time: values.read(&FORECAST_LEAD_TIME)?,
        },
        flush_interval: values.read(&FLUSH_INTERVAL)?,
        alerts: AlertSettings {
            public_url: values.read_optional(&PUBLIC_URL)?,
            digest_threshold: values.read(&ALERT_DIGEST_THRESHOLD)?,
            channel_rate: values.read(&ALERT_CHANNEL_RATE)?,
            attempt_timeout: values.read(&ALERT_ATTEMPT_TIMEOUT)?,
            retry: RetryPolicy {
                base: values.read(&ALERT_RETRY_BASE)?,
                cap: values.read(&ALERT_RETRY_CAP)?,
                max_age: values.read(&ALERT_RETRY_MAX_AGE)?,
            },
            poll_interval: values.read(&FLUSH_INTERVAL)?,
        },
        alert_channels: Vec::new(),
        max_body_bytes: values.read(&MAX_BODY_BYTES)?,
        ws_ping_interval: values.read(&WS_PING_INTERVAL)?,
        ws_max_connections_per_key: values.read(&WS_MAX_CONNECTIONS_PER_KEY)?,
        cors_origins: values.read_optional(&CORS_ORIGINS)?.unwrap_or_default(),
        log_format: values.read(&LOG_FORMAT)?,
        log_level: values.read(&LOG_LEVEL)?,
        upstream: UpstreamConfig {
            url: values.read(&UPSTREAM_URL)?,
            api_key: values.read_optional(&UPSTREAM_API_KEY)?,
            connect_timeout: values.read(&UPSTREAM_CONNECT_TIMEOUT)?,
            extra_root: values.read_optional(&UPSTREAM_CA_FILE)?,
            headers_timeout: values.read(&UPSTREAM_HEADERS_TIMEOUT)?,
            idle_timeout: values.read(&UPSTREAM_IDLE_TIMEOUT)?,
            max_body_bytes: values.read(&PROXY_MAX_BODY_BYTES)?,
            default_max_tokens: values.read(&DEFAULT_MAX_TOKENS)?,
            tokenizer: values.read(&TOKENIZER)?,
            proxies: std::sync::Arc::new(proxies(env)?),
        },
        metrics_models: values.read(&METRICS_MODELS)?,
        metrics_public: values.read(&METRICS_PUBLIC)?,
        prices_file: values.read_optional(&PRICES_FILE)?,
        unpriced_model_rate: values.read(&UNPRICED_MODEL_RATE)?,
        redis,
        smtp,
        workspaces,
        workspaces_file: match &declared_in {
            Source::File(path) => Some(path.clone()),
            _ => None,
        },
        effective,
    })
}

/// The proxies the environment names, read as reqwest reads them: the
/// upper-case name before the lower-case one, and none at all in a CGI
/// script's environment, where `HTTP_PROXY` may come from a request's
/// `Proxy` header. Unlike reqwest, a proxy variable whose value is not a
/// proxy URL stops the start: the matcher would skip it, and calls would
/// go past the proxy meant to carry them (straight to the upstream, or
/// through `ALL_PROXY`'s).
fn proxies(env: &dyn Fn(&str) -> Option<String>) -> Result<Matcher, ConfigError> {
    if env("REQUEST_METHOD").is_some() {
        return Ok(Matcher::builder().build());
    }
    let first = |names: [&'static str; 2]| {
        names
            .into_iter()
            .find_map(|name| env(name).map(|value| (name, value)))
    };
    let proxy = |names| match first(names) {
        Some((name, value)) if !value.trim().is_empty() && !usable_proxy(&value) => {
            Err(ConfigError::new(
                name,
                &Source::Environment,
                "not a proxy URL such as http://proxy.example:3128, with nothing around it, \
                 not even spaces (the value is not shown: a proxy URL may hold a password)",
            ))
        }
        named => Ok(named.map(|(_, value)| value).unwrap_or_default()),
    };
    Ok(Matcher::builder()
        .all(proxy(["ALL_PROXY", "all_proxy"])?)
        .http(proxy(["HTTP_PROXY", "http_proxy"])?)
        .https(proxy(["HTTPS_PROXY", "https_proxy"])?)
        .no(first(["NO_PROXY", "no_proxy"])
            .map(|(_, value)| value)
            .unwrap_or_default())
        .build())
}

/// Whether the matcher reads `value` as a proxy: asked of the matcher
/// itself, so that this check and the calls read a value alike.
fn usable_proxy(value: &str) -> bool {
    let anywhere = axum::http::Uri::from_static("http://upstream.invalid/");
    Matcher::builder()
        .all(value.to_owned())
        .build()
        .intercept(&anywhere)
        .is_some()
}

/// The SMTP settings, all or none: a sender is needed to send, and a
/// sender or a certificate without a server would be silently unused.
fn smtp_config(values: &Values) -> Result<Option<SmtpConfig>, ConfigError> {
    let from = values.read_optional(&SMTP_FROM)?;
    let extra_root = values.read_optional(&SMTP_CA_FILE)?;
    let Some(server) = values.read_optional(&SMTP_URL)? else {
        for (def, set) in [
            (&SMTP_FROM.def, from.is_some()),
            (&SMTP_CA_FILE.def, extra_root.is_some()),
        ] {
            if set {
                let (_, source) = values.text(def);
                return Err(ConfigError::new(
                    def.env,
                    source,
                    "is set without QUOTAWATCH_SMTP_URL, so no email would be sent: set both",
                ));
            }
        }
        return Ok(None);
    };
    let from = from.ok_or_else(|| {
        let (_, source) = values.text(&SMTP_URL.def);
        ConfigError::new(
            SMTP_FROM.def.env,
            source,
            "is needed with QUOTAWATCH_SMTP_URL: the address email alerts are sent from",
        )
    })?;
    Ok(Some(SmtpConfig {
        server,
        from,
        extra_root,
        timeout: values.read(&SMTP_TIMEOUT)?,
    }))
}

// ----- the parsers of settings ----------------------------------------------------------

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    listen_address(text).ok_or_else(|| {
        format!("{text:?} is not an address such as 127.0.0.1:8000 or localhost:8000")
    })
}

fn parse_database_url(text: &str) -> Result<String, String> {
    if text.starts_with("sqlite:")
        || text.starts_with("postgres://")
        || text.starts_with("postgresql://")
    {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{:?} must start with sqlite:, postgres:// or postgresql://",
            mask_secrets(text)
        ))
    }
}

fn parse_limit(text: &str, kind: LimitKind) -> Result<Option<u64>, String> {
    let value = match text {
        "" | "unlimited" | "none" => None,
        number => Some(
            number
                .parse::<u64>()
                .map_err(|_| format!("{number:?} is not a whole number (or \"unlimited\")"))?,
        ),
    };
    validate_limit(kind, value).map_err(|e| e.message)
}

fn parse_warn_at(text: &str) -> Result<f64, String> {
    let warn_at = text
        .parse::<f64>()
        .map_err(|_| format!("{text:?} is not a number"))?;
    validate_warn_at(warn_at).map_err(|e| e.message)
}

fn parse_admin_key(text: &str) -> Result<Secret, String> {
    if text.len() < 16 {
        Err("the admin key must be at least 16 characters".to_owned())
    } else {
        Ok(Secret::new(text))
    }
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    if text.parse::<f64>().is_ok() {
        // Seconds for one reader, milliseconds for another: a unit it is.
        return Err(format!(
            "{text:?} has no unit: write it as 500ms, {text}s, 10m or 1h"
        ));
    }
    parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration such as 500ms, 10s, 10m or 1h"))
}

fn parse_byte_count(text: &str) -> Result<usize, String> {
    text.parse::<usize>()
        .ok()
        .filter(|n| *n >= 1024)
        .ok_or_else(|| format!("{text:?} is not a byte count of at least 1024"))
}

fn parse_at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(
    text: &str,
) -> Result<T, String> {
    text.parse::<T>()
        .ok()
        .filter(|n| *n >= T::from(1))
        .ok_or_else(|| format!("{text:?} is not a whole number of at least 1"))
}

fn parse_whole_number(text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .map_err(|_| format!("{text:?} is not a whole number"))
}

fn parse_origins(text: &str) -> Result<Vec<String>, String> {
    text.split(',')
        .map(str::trim)
        .map(|origin| {
            parse_origin(origin).ok_or_else(|| {
                format!("{origin:?} is not an origin such as http://localhost:3000 (a scheme, a host and a port if not the default; no path)")
            })
        })
        .collect()
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "pretty" => Ok(LogFormat::Pretty),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("{other:?} is neither pretty nor json")),
    }
}

fn parse_log_filter(text: &str) -> Result<String, String> {
    validate_log_filter(text).map(|()| text.to_owned())
}

fn parse_upstream_url(text: &str) -> Result<String, String> {
    let url = text.trim_end_matches('/');
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url.to_owned())
    } else {
        Err(format!(
            "{:?} is not an http:// or https:// URL",
            mask_secrets(text)
        ))
    }
}

fn parse_tokenizer(text: &str) -> Result<Tokenizer, String> {
    match text {
        "tiktoken" => Ok(Tokenizer::Tiktoken),
        "bytes" => Ok(Tokenizer::Bytes),
        other => Err(format!("{other:?} is neither tiktoken nor bytes")),
    }
}

/// `highest`, or an input and an output rate in USD per million tokens
/// (cached prompt tokens cost the input rate), each rounded to a whole
/// pico-dollar per token.
fn parse_unpriced_rate(text: &str) -> Result<UnpricedRates, String> {
    if text == "highest" {
        return Ok(UnpricedRates::Highest);
    }
    let refused = || {
        format!(
            "{text:?} is neither highest nor INPUT,OUTPUT in USD per million tokens, such as 2.5,10"
        )
    };
    let per_token = |rate: &str| -> Result<PicoUsd, String> {
        let per_million: f64 = rate.trim().parse().map_err(|_| refused())?;
        // A thousand dollars per million tokens is beyond any model's price.
        if !(0.0..=1000.0).contains(&per_million) {
            return Err(refused());
        }
        Ok((per_million * 1_000_000.0).round() as PicoUsd)
    };
    let (input, output) = text.split_once(',').ok_or_else(refused)?;
    let input = per_token(input)?;
    Ok(UnpricedRates::Fixed(Rates {
        input,
        cached_input: input,
        output: per_token(output)?,
    }))
}

fn parse_list(text: &str) -> Result<Vec<String>, String> {
    Ok(text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect())
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(format!("{other:?} is neither true nor false")),
    }
}

fn parse_redis_url(text: &str) -> Result<String, String> {
    if text.starts_with("redis://") || text.starts_with("rediss://") {
        Ok(text.to_owned())
    } else {
        Err(format!("{:?} is not a redis:// URL", mask_secrets(text)))
    }
}

/// What to do while Redis is unreachable, before the number of replicas is
/// known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorMode {
    Local,
    Closed,
    Open,
}

fn parse_store_error_mode(text: &str) -> Result<StoreErrorMode, String> {
    match text {
        "local" => Ok(StoreErrorMode::Local),
        "closed" => Ok(StoreErrorMode::Closed),
        "open" => Ok(StoreErrorMode::Open),
        other => Err(format!("{other:?} is none of local, closed and open")),
    }
}

/// An origin as browsers send it: `http` or `https`, a host and a port
/// unless it is the scheme's default, nothing after; answered in the form
/// browsers compare (lowercase).
fn parse_origin(text: &str) -> Option<String> {
    let url = reqwest::Url::parse(text).ok()?;
    let origin = url.origin().ascii_serialization();
    (matches!(url.scheme(), "http" | "https") && origin.eq_ignore_ascii_case(text))
        .then_some(origin)
}

/// `host:port` as an address to listen on: an IP address, or a name such as
/// `localhost` that resolves to one (the first it resolves to).
fn listen_address(text: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    text.parse::<SocketAddr>()
        .ok()
        .or_else(|| text.to_socket_addrs().ok()?.next())
}

/// A log filter as `tracing` reads it, but stricter: a directive that is
/// not a level (`debug`) or `target=level` (`quotawatch=debug`) is an
/// error, where `tracing` would read `verbose` as a target and log nothing.
fn validate_log_filter(text: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |word: &str| LEVELS.contains(&word.to_ascii_lowercase().as_str());
    for directive in text.split(',').map(str::trim) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !is_level(level) {
            return Err(format!(
                "{directive:?} is not a log level ({}) or a target=level directive such as quotawatch=debug",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(text)
        .map(drop)
        .map_err(|e| format!("{text:?} is not a log filter: {e}"))
}

fn file_workspace(
    index: usize,
    declared: FileWorkspace,
    source: &Source,
    default_limits: Limits,
    default_warn_at: f64,
) -> Result<(String, WorkspaceSpec), ConfigError> {
    let at = |field: &str| format!("workspaces[{index}].{field}");
    let mut limits: PerLimit<Change<Option<u64>>> = PerLimit::default();
    for (name, value) in declared.limits {
        let kind = LimitKind::from_name(&name).ok_or_else(|| {
            let known: Vec<&str> = LimitKind::ALL.iter().map(|kind| kind.name()).collect();
            ConfigError::new(
                at(&format!("limits.{name}")),
                source,
                format!("unknown limit; use one of {}", known.join(", ")),
            )
        })?;
        let value = match value {
            FileLimit::Count(n) if n < 0 => {
                return Err(ConfigError::new(
                    at(&format!("limits.{name}")),
                    source,
                    format!(
                        "{n} is negative: a limit is a whole number of at least 1, or \"unlimited\""
                    ),
                ));
            }
            // A whole number is taken as it is where the unit counts whole
            // things, without a float that could lose digits.
            FileLimit::Count(n) if kind.metric.unit() == Unit::Count => Some(n.unsigned_abs()),
            // Otherwise a figure is in the unit people write (a budget in
            // dollars), which the counters count finer (nano-dollars).
            FileLimit::Count(n) => kind.metric.unit().from_figure(n as f64),
            FileLimit::Amount(figure) => {
                let unit = kind.metric.unit();
                Some(unit.from_figure(figure).ok_or_else(|| {
                    ConfigError::new(
                        at(&format!("limits.{name}")),
                        source,
                        format!(
                            "{figure} is not {}: {kind} is {}",
                            unit.expected(),
                            unit.expected()
                        ),
                    )
                })?)
            }
            FileLimit::Word(word) if word == "unlimited" => None,
            FileLimit::Word(word) => {
                return Err(ConfigError::new(
                    at(&format!("limits.{name}")),
                    source,
                    format!("{word:?} is neither a number nor \"unlimited\""),
                ));
            }
        };
        limits.set(kind, Change::Set(value));
    }
    let spec = WorkspaceSpec {
        name: declared.name,
        timezone: declared.timezone,
        limits,
        warn_at: declared.warn_at,
        upstream_key_env: declared.upstream_key_env.map(Some).into(),
        upstream_organization: declared.upstream_organization.map(Some).into(),
        upstream_project: declared.upstream_project.map(Some).into(),
        // Scoped limits are set through the REST API; a declared workspace
        // keeps what it has.
        scoped_limits: Change::Keep,
        alert_thresholds: declared.alert_thresholds.map(|file| ThresholdsInput {
            default: file.default,
            limits: file
                .limits
                .into_iter()
                .map(|(name, percents)| (name, Some(percents)))
                .collect(),
        }),
    };
    // Validate now, so that check-config and start-up fail before serving.
    let id = declared
        .id
        .parse()
        .map_err(|e: crate::domain::limits::ValidationError| {
            ConfigError::new(at("id"), source, e.message)
        })?;
    let mut base = WorkspaceConfig::new(id, default_limits);
    base.warn_at = default_warn_at;
    spec.apply_to(base)
        .map_err(|e| ConfigError::new(at(&e.field), source, e.message))?;
    Ok((declared.id, spec))
}

impl Config {
    /// The effective configuration as `check-config` prints it.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let width = self
            .effective
            .iter()
            .map(|e| e.env.len())
            .max()
            .unwrap_or(0);
        for setting in &self.effective {
            out.push_str(&format!(
                "{:width$}  {}  ({})\n",
                setting.env, setting.shown, setting.source
            ));
        }
        for (id, spec) in &self.workspaces {
            out.push_str(&format!(
                "declared workspace {id}: {}\n",
                describe_spec(spec)
            ));
        }
        out.push_str(&format!(
            "engine: reservation_ttl={}, probe_interval={}, flush_interval={}\n",
            format_duration(self.engine.reservation_ttl),
            format_duration(self.engine.probe_interval),
            format_duration(self.flush_interval)
        ));
        out
    }
}

fn describe_spec(spec: &WorkspaceSpec) -> String {
    let mut parts = Vec::new();
    if let Some(name) = &spec.name {
        parts.push(format!("name={name:?}"));
    }
    if let Some(tz) = &spec.timezone {
        parts.push(format!("timezone={tz}"));
    }
    for kind in LimitKind::ALL {
        match spec.limits.get(kind) {
            Change::Set(Some(n)) => parts.push(format!("{kind}={n}")),
            Change::Set(None) => parts.push(format!("{kind}=unlimited")),
            Change::Keep => {}
        }
    }
    if let Some(warn_at) = spec.warn_at {
        parts.push(format!("warn_at={warn_at}"));
    }
    for (name, value) in [
        ("upstream_key_env", &spec.upstream_key_env),
        ("upstream_organization", &spec.upstream_organization),
        ("upstream_project", &spec.upstream_project),
    ] {
        if let Change::Set(Some(value)) = value {
            parts.push(format!("{name}={value}"));
        }
    }
    if parts.is_empty() {
        "defaults".to_owned()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(
        file: Option<&str>,
        dotenv: Option<&str>,
        env: &[(&str, &str)],
        cli: CliOverrides,
    ) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file_path = dir.path().join("quotawatch.toml");
        let dotenv_path = dir.path().join(".env");
        if let Some(text) = file {
            std::fs::write(&file_path, text).expect("write toml");
        }
        if let Some(text) = dotenv {
            std::fs::write(&dotenv_path, text).expect("write .env");
        }
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| env.get(name).cloned();
        load(Sources {
            file: file.map(|_| file_path.as_path()),
            dotenv: Some(dotenv_path.as_path()),
            env: &lookup,
            cli,
        })
    }

    #[test]
    fn the_upstream_proxy_is_read_from_the_environment_as_reqwest_reads_it() {
        let openai: axum::http::Uri = "https://api.openai.com/".parse().expect("a URI");
        let proxy = |env: &[(&str, &str)]| {
            accepted(env)
                .upstream
                .proxies
                .intercept(&openai)
                .map(|proxy| proxy.uri().to_string())
        };
        assert_eq!(proxy(&[]), None);
        assert_eq!(
            proxy(&[("all_proxy", "http://all:3128")]).as_deref(),
            Some("http://all:3128/")
        );
        // The upper-case name wins, and the scheme's own variable wins
        // over ALL_PROXY.
        assert_eq!(
            proxy(&[
                ("ALL_PROXY", "http://all:3128"),
                ("https_proxy", "http://lower:3128"),
                ("HTTPS_PROXY", "http://upper:3128"),
            ])
            .as_deref(),
            Some("http://upper:3128/")
        );
        // HTTP_PROXY is for http upstreams only.
        assert_eq!(proxy(&[("HTTP_PROXY", "http://plain:3128")]), None);
        assert_eq!(
            proxy(&[
                ("HTTPS_PROXY", "http://upper:3128"),
                ("no_proxy", ".openai.com")
            ]),
            None
        );
        assert_eq!(
            proxy(&[
                ("HTTPS_PROXY", "http://upper:3128"),
                ("REQUEST_METHOD", "GET")
            ]),
            None
        );
    }

    #[test]
    fn a_proxy_variable_that_is_not_a_proxy_url_stops_the_start_without_showing_it() {
        for (name, value) in [
            ("HTTPS_PROXY", "http://user:s3cret@[proxy"),
            ("https_proxy", "ftp://proxy.example:21"),
            ("ALL_PROXY", "http:// proxy.example"),
            ("http_proxy", "not a url"),
        ] {
            let error = refusal(None, &[(name, value)]);
            assert_eq!(error.setting, name);
            assert!(error.message.contains("not a proxy URL"), "{error}");
            assert!(!error.to_string().contains(value), "{error}");
        }
        // A proxy without a scheme is an http:// one, as reqwest reads it,
        // and a variable set to nothing names no proxy.
        let openai: axum::http::Uri = "https://api.openai.com/".parse().expect("a URI");
        let proxies = accepted(&[("HTTPS_PROXY", "proxy.example:3128"), ("ALL_PROXY", " ")])
            .upstream
            .proxies;
        assert_eq!(
            proxies
                .intercept(&openai)
                .map(|proxy| proxy.uri().to_string()),
            Some("http://proxy.example:3128/".to_owned())
        );
    }

    /// The configuration from `env` alone.
    fn accepted(env: &[(&str, &str)]) -> Config {
        load_with(None, None, env, vec![]).unwrap_or_else(|error| panic!("{env:?}: {error:?}"))
    }

    /// The message of the error loading `env` (and `file`) gives.
    fn refusal(file: Option<&str>, env: &[(&str, &str)]) -> ConfigError {
        match load_with(file, None, env, vec![]) {
            Ok(_) => panic!("{env:?} {file:?} should be refused"),
            Err(error) => error,
        }
    }

    #[test]
    fn a_variable_set_to_nothing_is_an_error_naming_it() {
        for name in [
            "OPENAI_RATE_LIMIT_PER_MINUTE",
            "QUOTAWATCH_LISTEN",
            "QUOTA_ADMIN_RESET_KEY",
        ] {
            let error = refusal(None, &[(name, "")]);
            assert_eq!(error.setting, name);
            assert!(error.message.contains("empty"), "{}", error.message);
            let error = refusal(None, &[(name, "  ")]);
            assert_eq!(error.setting, name);
        }
    }

    #[test]
    fn durations_need_a_unit() {
        let error = refusal(None, &[("QUOTAWATCH_RESERVATION_TTL", "10")]);
        assert_eq!(error.setting, "QUOTAWATCH_RESERVATION_TTL");
        assert!(error.message.contains("no unit"), "{}", error.message);
        let config = accepted(&[("QUOTAWATCH_RESERVATION_TTL", "10s")]);
        assert_eq!(config.engine.reservation_ttl, Duration::from_secs(10));
    }

    #[test]
    fn localhost_is_an_address_to_listen_on() {
        let config = accepted(&[("QUOTAWATCH_LISTEN", "localhost:8123")]);
        assert!(config.listen.ip().is_loopback());
        assert_eq!(config.listen.port(), 8123);
        let error = refusal(None, &[("QUOTAWATCH_LISTEN", "8000")]);
        assert_eq!(error.setting, "QUOTAWATCH_LISTEN");
    }

    #[test]
    fn a_log_filter_that_would_log_nothing_is_refused() {
        for filter in ["verbose", "quotawatch=loud", "info,chatty"] {
            let error = refusal(None, &[("QUOTAWATCH_LOG", filter)]);
            assert_eq!(error.setting, "QUOTAWATCH_LOG", "{filter}");
        }
        for filter in ["debug", "WARN", "info,quotawatch=trace,sqlx=off"] {
            accepted(&[("QUOTAWATCH_LOG", filter)]);
        }
    }

    #[test]
    fn declared_workspaces_are_checked_plainly() {
        let negative =
            "[[workspaces]]\nid = \"acme\"\n[workspaces.limits]\nrequests_per_minute = -5\n";
        let error = refusal(Some(negative), &[]);
        assert_eq!(error.setting, "workspaces[0].limits.requests_per_minute");
        assert!(
            error.message.contains("-5 is negative"),
            "{}",
            error.message
        );
        let twice = "[[workspaces]]\nid = \"acme\"\n[[workspaces]]\nid = \"acme\"\n";
        let error = refusal(Some(twice), &[]);
        assert_eq!(error.setting, "workspaces[1].id");
        assert!(
            error.message.contains("declared twice"),
            "{}",
            error.message
        );
    }

    #[test]
    fn every_setting_has_one_key_and_one_variable_and_is_in_the_readme() {
        let readme = include_str!("../README.md");
        let mut keys = std::collections::HashSet::new();
        let mut envs = std::collections::HashSet::new();
        for setting in SETTINGS {
            assert!(keys.insert(setting.key), "{} twice", setting.key);
            assert!(envs.insert(setting.env), "{} twice", setting.env);
            assert!(
                readme.contains(&format!("| `{}` | `{}` |", setting.env, setting.key)),
                "README.md's table lacks {} ({})",
                setting.env,
                setting.key
            );
        }
    }

    #[test]
    fn defaults_match_the_documentation() {
        let config = load_with(None, None, &[], vec![]).expect("defaults are valid");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(config.database_url, "sqlite://quotawatch.db");
        assert_eq!(config.defaults.limits.get(REQUESTS_PER_MINUTE), Some(500));
        assert_eq!(config.defaults.limits.get(REQUESTS_PER_DAY), Some(10_000));
        assert_eq!(config.defaults.limits.get(TOKENS_PER_DAY), None);
        assert_eq!(config.defaults.warn_at, 0.8);
        assert_eq!(config.engine.reservation_ttl, Duration::from_secs(600));
        assert_eq!(config.engine.probe_interval, Duration::from_secs(60));
        assert_eq!(config.flush_interval, Duration::from_secs(1));
        assert!(config.admin_key.is_none());
        assert!(config.redis.is_none(), "counts alone unless Redis is named");
    }

    #[test]
    fn redis_settings_take_their_defaults_and_mask_a_password() {
        let env = [
            ("QUOTAWATCH_REDIS_URL", "redis://:hunter2@cache:6379/0"),
            ("QUOTAWATCH_REPLICAS", "3"),
        ];
        let config = load_with(None, None, &env, vec![]).expect("valid");
        let redis = config.redis.as_ref().expect("redis");
        assert_eq!(redis.prefix, "quotawatch:");
        assert_eq!(redis.timeout, Duration::from_millis(50));
        assert_eq!(redis.on_store_error, OnStoreError::Local { instances: 3 });
        let described = config.describe();
        assert!(described.contains("redis://:********@cache:6379/0"));
        assert!(!described.contains("hunter2"));
    }

    #[test]
    fn sources_apply_in_rising_precedence() {
        let file = "default_requests_per_minute = 100\ndefault_requests_per_day = 200\ndefault_warn_at = 0.5\nlisten = \"127.0.0.1:9001\"\n";
        let dotenv = "OPENAI_RATE_LIMIT_PER_DAY=300\nQUOTAWATCH_DEFAULT_WARN_AT=0.6\nQUOTAWATCH_LISTEN=127.0.0.1:9002\n";
        let env = [
            ("QUOTAWATCH_DEFAULT_WARN_AT", "0.7"),
            ("QUOTAWATCH_LISTEN", "127.0.0.1:9003"),
        ];
        let cli = vec![("listen", "127.0.0.1:9004".to_owned())];
        let config = load_with(Some(file), Some(dotenv), &env, cli).expect("valid");
        assert_eq!(
            config.defaults.limits.get(REQUESTS_PER_MINUTE),
            Some(100),
            "file over default"
        );
        assert_eq!(
            config.defaults.limits.get(REQUESTS_PER_DAY),
            Some(300),
            ".env over file"
        );
        assert_eq!(config.defaults.warn_at, 0.7, "environment over .env");
        assert_eq!(config.listen.port(), 9004, "command line over environment");
        let listen = config
            .effective
            .iter()
            .find(|e| e.key == "listen")
            .expect("listed");
        assert_eq!(listen.source, Source::CommandLine);
    }

    #[test]
    fn invalid_values_name_the_setting_and_source() {
        let error = load_with(
            None,
            None,
            &[("OPENAI_RATE_LIMIT_PER_MINUTE", "lots")],
            vec![],
        )
        .expect_err("invalid");
        assert_eq!(error.setting, "OPENAI_RATE_LIMIT_PER_MINUTE");
        assert_eq!(error.source_name, "environment");
        assert!(error.to_string().contains("\"lots\""));

        let error = load_with(None, Some("QUOTAWATCH_FLUSH_INTERVAL=soon\n"), &[], vec![])
            .expect_err("invalid");
        assert_eq!(
            (error.setting.as_str(), error.source_name.as_str()),
            ("QUOTAWATCH_FLUSH_INTERVAL", ".env")
        );

        let error = load_with(Some("colour = \"blue\"\n"), None, &[], vec![]).expect_err("unknown");
        assert_eq!(error.setting, "colour");
        assert!(error.message.contains("unknown setting"));

        let error = load_with(None, None, &[("QUOTA_ADMIN_RESET_KEY", "short")], vec![])
            .expect_err("short");
        assert_eq!(error.setting, "QUOTA_ADMIN_RESET_KEY");
        assert!(
            !error.to_string().contains("short\""),
            "the key itself is not echoed"
        );

        for (name, value) in [
            ("QUOTAWATCH_LISTEN", "localhost"),
            ("QUOTAWATCH_DATABASE_URL", "mysql://x"),
            ("QUOTAWATCH_DEFAULT_WARN_AT", "2"),
            ("QUOTAWATCH_LOG_FORMAT", "xml"),
            ("OPENAI_RATE_LIMIT_PER_DAY", "0"),
            ("QUOTAWATCH_REDIS_URL", "http://cache:6379"),
            ("QUOTAWATCH_ON_STORE_ERROR", "sometimes"),
            ("QUOTAWATCH_REPLICAS", "0"),
            ("QUOTAWATCH_WS_MAX_CONNECTIONS_PER_KEY", "0"),
        ] {
            let error = load_with(None, None, &[(name, value)], vec![]).expect_err(name);
            assert_eq!(error.setting, name);
        }
    }

    #[test]
    fn secrets_are_masked() {
        let config = load_with(
            None,
            None,
            &[
                ("QUOTA_ADMIN_RESET_KEY", "super-secret-admin-key"),
                ("QUOTAWATCH_DATABASE_URL", "postgres://app:hunter2@db/quota"),
            ],
            vec![],
        )
        .expect("valid");
        let described = config.describe();
        assert!(!described.contains("super-secret-admin-key"));
        assert!(!described.contains("hunter2"));
        assert!(described.contains("******** (set)"));
        assert!(described.contains("postgres://app:********@db/quota"));
        assert!(!format!("{config:?}").contains("super-secret-admin-key"));
    }

    #[test]
    fn smtp_settings_are_read_together_and_mask_the_password() {
        let config = accepted(&[
            (
                "QUOTAWATCH_SMTP_URL",
                "smtps://alerts:hunter2@mail.example.com",
            ),
            ("QUOTAWATCH_SMTP_FROM", "quotawatch <alerts@example.com>"),
        ]);
        let smtp = config.smtp.as_ref().expect("smtp");
        assert_eq!(smtp.server.port, 465);
        assert_eq!(smtp.from.email.to_string(), "alerts@example.com");
        assert_eq!(smtp.timeout, Duration::from_secs(30));
        assert!(smtp.extra_root.is_none());
        let described = config.describe();
        assert!(described.contains("smtps://alerts:********@mail.example.com"));
        assert!(!described.contains("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(
            accepted(&[]).smtp.is_none(),
            "no email unless a server is named"
        );
    }

    #[test]
    fn smtp_settings_that_cannot_work_name_the_setting() {
        let url = (
            "QUOTAWATCH_SMTP_URL",
            "smtp://alerts:hunter2@mail.example.com",
        );
        let from = ("QUOTAWATCH_SMTP_FROM", "alerts@example.com");
        let error = refusal(None, &[url]);
        assert_eq!(error.setting, "QUOTAWATCH_SMTP_FROM");
        let error = refusal(None, &[from]);
        assert_eq!(error.setting, "QUOTAWATCH_SMTP_FROM");
        assert!(
            error.message.contains("without QUOTAWATCH_SMTP_URL"),
            "{}",
            error.message
        );
        let error = refusal(None, &[url, ("QUOTAWATCH_SMTP_FROM", "alerts")]);
        assert_eq!(error.setting, "QUOTAWATCH_SMTP_FROM");
        let error = refusal(
            None,
            &[
                (
                    "QUOTAWATCH_SMTP_URL",
                    "smtp://alerts:hunter2@mail.example.com?tls=none",
                ),
                from,
            ],
        );
        assert_eq!(error.setting, "QUOTAWATCH_SMTP_URL");
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let error = refusal(
            None,
            &[
                url,
                from,
                ("QUOTAWATCH_SMTP_CA_FILE", "/nonexistent/ca.pem"),
            ],
        );
        assert_eq!(error.setting, "QUOTAWATCH_SMTP_CA_FILE");
        let error = refusal(None, &[url, from, ("QUOTAWATCH_SMTP_TIMEOUT", "30")]);
        assert_eq!(error.setting, "QUOTAWATCH_SMTP_TIMEOUT");
    }

    #[test]
    fn declared_workspaces_are_validated() {
        let file = r#"
[[workspaces]]
id = "acme"
name = "Acme"
timezone = "Europe/Berlin"
[workspaces.limits]
requests_per_minute = 60
tokens_per_day = "unlimited"
"#;
        let config = load_with(Some(file), None, &[], vec![]).expect("valid");
        let (id, spec) = &config.workspaces[0];
        assert_eq!(id, "acme");
        assert_eq!(spec.limits.get(REQUESTS_PER_MINUTE), Change::Set(Some(60)));
        assert_eq!(spec.limits.get(TOKENS_PER_DAY), Change::Set(None));

        let bad = "[[workspaces]]\nid = \"acme\"\ntimezone = \"Nowhere/Special\"\n";
        let error = load_with(Some(bad), None, &[], vec![]).expect_err("bad zone");
        assert_eq!(error.setting, "workspaces[0].timezone");
        let bad = "[[workspaces]]\nid = \"Acme!\"\n";
        assert_eq!(
            load_with(Some(bad), None, &[], vec![])
                .expect_err("bad id")
                .setting,
            "workspaces[0].id"
        );
    }

    #[test]
    fn a_declared_alert_channel_may_belong_to_one_workspace() {
        let file = |workspace: &str| {
            format!(
                "[[alerts.channels]]\nname = \"chat\"\n{workspace}type = \"slack\"\nurl = \"https://hooks.slack.com/services/T0/B0/X\"\n"
            )
        };
        let own =
            load_with(Some(&file("workspace = \"acme\"\n")), None, &[], vec![]).expect("valid");
        let global = load_with(Some(&file("")), None, &[], vec![]).expect("valid");
        let (own, global) = (&own.alert_channels[0], &global.alert_channels[0]);
        assert_eq!(
            own.workspace.as_ref().map(WorkspaceId::as_str),
            Some("acme")
        );
        assert_eq!(global.workspace, None);
        assert_ne!(
            own.id(),
            global.id(),
            "one name in two scopes, two channels"
        );
        let Err(error) = load_with(
            Some(&file("workspace = \"Not Valid!\"\n")),
            None,
            &[],
            vec![],
        ) else {
            panic!("an invalid workspace id is refused");
        };
        assert_eq!(error.setting, "alerts.channels[0].workspace");
    }

    #[test]
    fn declared_alert_channels_read_their_variables_and_are_checked() {
        let file = r#"
[[alerts.channels]]
name = "ops"
type = "webhook"
url = "https://hooks.example.com/ops"
secret_env = "OPS_WEBHOOK_SECRET"
events = ["threshold_crossed", "daily_quota_exhausted"]
min_severity = "warning"

[[alerts.channels]]
name = "team chat"
type = "slack"
url_env = "SLACK_HOOK"
resolutions = false
"#;
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let env = [
            ("OPS_WEBHOOK_SECRET", secret),
            (
                "SLACK_HOOK",
                "https://hooks.slack.com/services/T0/B0/XXXXXXXX",
            ),
        ];
        let config = load_with(Some(file), None, &env, vec![]).expect("valid");
        let [ops, chat] = &config.alert_channels[..] else {
            panic!("two channels: {:?}", config.alert_channels);
        };
        assert_eq!(ops.kind, ChannelKind::Webhook);
        assert_eq!(ops.secret.as_ref().map(Secret::expose), Some(secret));
        assert_eq!(ops.filter.min_severity, Severity::Warning);
        assert_eq!(
            ops.filter.events.as_deref(),
            Some(
                &[
                    "threshold_crossed".to_owned(),
                    "daily_quota_exhausted".to_owned()
                ][..]
            )
        );
        assert_eq!(
            chat.url.as_ref().map(Secret::expose),
            Some("https://hooks.slack.com/services/T0/B0/XXXXXXXX")
        );
        assert!(!chat.filter.resolutions);
        assert_ne!(ops.id(), chat.id());
        // The secret never prints.
        assert!(!format!("{config:?}").contains(secret));

        for (file, env, setting) in [
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"webhook\"\nurl = \"https://a.example\"\n",
                &[][..],
                "alerts.channels[0].secret_env",
            ),
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"webhook\"\nurl = \"https://a.example\"\nsecret_env = \"UNSET\"\n",
                &[][..],
                "alerts.channels[0].secret_env",
            ),
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"slack\"\nurl = \"ftp://a.example\"\n",
                &[][..],
                "alerts.channels[0].url",
            ),
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"pager\"\nurl = \"https://a.example\"\n",
                &[][..],
                "alerts.channels[0].type",
            ),
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"slack\"\nurl = \"https://a.example\"\nevents = [\"sunrise\"]\n",
                &[][..],
                "alerts.channels[0].events[0]",
            ),
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"webhook\"\nurl = \"https://a.example\"\nsecret_env = \"WEAK\"\n",
                &[("WEAK", "whsec_c2hvcnQ=")][..],
                "alerts.channels[0].secret_env",
            ),
        ] {
            let error = load_with(Some(file), None, env, vec![]).expect_err(file);
            assert_eq!(error.setting, setting, "{file}: {error}");
        }
    }

    #[test]
    fn declared_email_channels_need_the_smtp_server_and_name_a_bad_recipient() {
        let file = "[[alerts.channels]]\nname = \"mail\"\ntype = \"email\"\nto = [\"ops@example.com\", \"Oncall@example.com\"]\n";
        let smtp = [
            ("QUOTAWATCH_SMTP_URL", "smtp://127.0.0.1:2525?tls=none"),
            ("QUOTAWATCH_SMTP_FROM", "alerts@example.com"),
        ];
        let config = load_with(Some(file), None, &smtp, vec![]).expect("valid");
        let [mail] = &config.alert_channels[..] else {
            panic!("one channel: {:?}", config.alert_channels);
        };
        assert_eq!(mail.kind, ChannelKind::Email);
        assert!(mail.url.is_none());
        assert_eq!(mail.recipients, ["ops@example.com", "Oncall@example.com"]);

        // Without the SMTP server it would never send: refused, naming it.
        let error = load_with(Some(file), None, &[], vec![]).expect_err("no SMTP server");
        assert_eq!(error.setting, "alerts.channels[0].type");
        assert!(
            error.message.contains("QUOTAWATCH_SMTP_URL"),
            "{}",
            error.message
        );

        for (file, setting) in [
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"email\"\nto = [\"ops@example.com\", \"nobody\"]\n",
                "alerts.channels[0].to[1]",
            ),
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"email\"\n",
                "alerts.channels[0].to",
            ),
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"email\"\nto = [\"ops@example.com\"]\nurl = \"https://a.example\"\n",
                "alerts.channels[0].url",
            ),
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"slack\"\nurl = \"https://a.example\"\nto = [\"ops@example.com\"]\n",
                "alerts.channels[0].to",
            ),
            (
                "[[alerts.channels]]\nname = \"x\"\ntype = \"email\"\nto = [\"ops@example.com\"]\nsecret_env = \"S\"\n",
                "alerts.channels[0].secret_env",
            ),
        ] {
            let error = load_with(Some(file), None, &smtp, vec![]).expect_err(file);
            assert_eq!(error.setting, setting, "{file}: {error}");
        }
    }

    #[test]
    fn declared_alert_thresholds_and_the_forecast_lead_time_are_read_and_checked() {
        let file = r#"
forecast_lead_time = "90m"
[[workspaces]]
id = "acme"
[workspaces.alert_thresholds]
default = [50, 90]
limits = { usd_per_month = [25, 100], requests_per_day = [] }
"#;
        let config = load_with(Some(file), None, &[], vec![]).expect("valid");
        assert_eq!(
            config.engine.forecast_lead_time,
            Duration::from_secs(90 * 60)
        );
        let (_, spec) = &config.workspaces[0];
        let thresholds = spec.alert_thresholds.as_ref().expect("declared");
        assert_eq!(thresholds.default, Some(vec![50.0, 90.0]));
        assert_eq!(
            thresholds.limits,
            vec![
                ("requests_per_day".to_owned(), Some(vec![])),
                ("usd_per_month".to_owned(), Some(vec![25.0, 100.0])),
            ]
        );
        assert_eq!(
            accepted(&[]).engine.forecast_lead_time,
            Duration::from_secs(2 * 3600),
            "two hours by default"
        );
        let bad = "[[workspaces]]\nid = \"acme\"\n[workspaces.alert_thresholds]\nlimits = { tokens_per_minute = [50] }\n";
        let error = load_with(Some(bad), None, &[], vec![]).expect_err("the minute");
        assert_eq!(
            error.setting,
            "workspaces[0].alert_thresholds.limits.tokens_per_minute"
        );
        let bad = "[[workspaces]]\nid = \"acme\"\n[workspaces.alert_thresholds]\ndefault = [0]\n";
        let error = load_with(Some(bad), None, &[], vec![]).expect_err("zero");
        assert_eq!(error.setting, "workspaces[0].alert_thresholds.default[0]");
        let error = load_with(
            None,
            None,
            &[("QUOTAWATCH_FORECAST_LEAD_TIME", "soon")],
            vec![],
        )
        .expect_err("not a duration");
        assert_eq!(error.setting, "QUOTAWATCH_FORECAST_LEAD_TIME");
    }

    #[test]
    fn month_limits_are_read_from_every_source() {
        let file = r#"
default_tokens_per_month = 2000000
[[workspaces]]
id = "acme"
[workspaces.limits]
requests_per_month = 30000
tokens_per_month = "unlimited"
"#;
        let config = load_with(
            Some(file),
            None,
            &[("QUOTAWATCH_DEFAULT_REQUESTS_PER_MONTH", "90000")],
            vec![],
        )
        .expect("valid");
        assert_eq!(config.defaults.limits.get(REQUESTS_PER_MONTH), Some(90_000));
        assert_eq!(
            config.defaults.limits.get(TOKENS_PER_MONTH),
            Some(2_000_000)
        );
        let (_, spec) = &config.workspaces[0];
        assert_eq!(
            spec.limits.get(REQUESTS_PER_MONTH),
            Change::Set(Some(30_000))
        );
        assert_eq!(spec.limits.get(TOKENS_PER_MONTH), Change::Set(None));
        let zero = "[[workspaces]]\nid = \"acme\"\n[workspaces.limits]\ntokens_per_month = 0\n";
        let error = load_with(Some(zero), None, &[], vec![]).expect_err("zero");
        assert!(
            error.setting.contains("tokens_per_month"),
            "{}",
            error.setting
        );
        let unknown = "[[workspaces]]\nid = \"acme\"\n[workspaces.limits]\ntokens_per_week = 1\n";
        let error = load_with(Some(unknown), None, &[], vec![]).expect_err("unknown");
        assert!(error.to_string().contains("tokens_per_month"), "{error}");
    }

    #[test]
    fn unpriced_models_are_charged_the_highest_rates_or_the_operators() {
        assert_eq!(accepted(&[]).unpriced_model_rate, UnpricedRates::Highest);
        let own = accepted(&[("QUOTAWATCH_UNPRICED_MODEL_RATE", "2.5, 10")]);
        assert_eq!(
            own.unpriced_model_rate,
            UnpricedRates::Fixed(Rates {
                input: 2_500_000,
                cached_input: 2_500_000,
                output: 10_000_000,
            })
        );
        for bad in ["2.5", "cheap,1", "-1,2", "1,2000", "lowest"] {
            let error = refusal(None, &[("QUOTAWATCH_UNPRICED_MODEL_RATE", bad)]);
            assert_eq!(error.setting, "QUOTAWATCH_UNPRICED_MODEL_RATE", "{bad}");
        }
    }

    #[test]
    fn declared_budgets_are_in_dollars() {
        use crate::domain::limits::{USD_PER_DAY, USD_PER_MONTH};
        let file = r#"
[[workspaces]]
id = "acme"
[workspaces.limits]
usd_per_day = 50
usd_per_month = 1200.5
"#;
        let config = load_with(Some(file), None, &[], vec![]).expect("valid");
        let (_, spec) = &config.workspaces[0];
        assert_eq!(
            spec.limits.get(USD_PER_DAY),
            Change::Set(Some(50_000_000_000))
        );
        assert_eq!(
            spec.limits.get(USD_PER_MONTH),
            Change::Set(Some(1_200_500_000_000))
        );
        let fraction = "[[workspaces]]\nid = \"acme\"\n[workspaces.limits]\ntokens_per_day = 1.5\n";
        let error = load_with(Some(fraction), None, &[], vec![]).expect_err("a fraction");
        assert_eq!(error.setting, "workspaces[0].limits.tokens_per_day");
    }
}
