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

use serde::Deserialize;

use crate::admin::WorkspaceSpec;
use crate::domain::limits::{
    LimitKind, Limits, OnStoreError, PerLimit, WorkspaceConfig, validate_limit, validate_warn_at,
};
use crate::domain::time::{format_duration, parse_duration};
use crate::domain::workspace::Settings;
use crate::engine::WorkspaceDefaults;
use crate::telemetry::mask_secrets;

/// One setting: its key in the TOML file, its environment variable, its
/// default and what it does.
pub struct SettingDef {
    pub key: &'static str,
    pub env: &'static str,
    pub default: Option<&'static str>,
    pub secret: bool,
    pub help: &'static str,
}

/// Every setting quotawatch reads. README.md documents the same table.
#[rustfmt::skip]
pub const SETTINGS: &[SettingDef] = &[
    SettingDef { key: "listen", env: "QUOTAWATCH_LISTEN", default: Some("127.0.0.1:8000"), secret: false, help: "address and port to listen on" },
    SettingDef { key: "database_url", env: "QUOTAWATCH_DATABASE_URL", default: Some("sqlite://quotawatch.db"), secret: false, help: "sqlite://PATH (created if missing) or postgres://..." },
    SettingDef { key: "default_requests_per_minute", env: "OPENAI_RATE_LIMIT_PER_MINUTE", default: Some("500"), secret: false, help: "requests-per-minute limit of new workspaces (\"unlimited\" for none)" },
    SettingDef { key: "default_requests_per_day", env: "OPENAI_RATE_LIMIT_PER_DAY", default: Some("10000"), secret: false, help: "requests-per-day limit of new workspaces" },
    SettingDef { key: "default_tokens_per_minute", env: "QUOTAWATCH_DEFAULT_TOKENS_PER_MINUTE", default: Some("unlimited"), secret: false, help: "tokens-per-minute limit of new workspaces" },
    SettingDef { key: "default_tokens_per_day", env: "QUOTAWATCH_DEFAULT_TOKENS_PER_DAY", default: Some("unlimited"), secret: false, help: "tokens-per-day limit of new workspaces" },
    SettingDef { key: "default_warn_at", env: "QUOTAWATCH_DEFAULT_WARN_AT", default: Some("0.8"), secret: false, help: "utilisation at which new workspaces start warning" },
    SettingDef { key: "admin_key", env: "QUOTA_ADMIN_RESET_KEY", default: None, secret: true, help: "the admin key; when unset, one is generated on first start and printed once" },
    SettingDef { key: "reservation_ttl", env: "QUOTAWATCH_RESERVATION_TTL", default: Some("10m"), secret: false, help: "how long an unsettled token reservation lives" },
    SettingDef { key: "probe_interval", env: "QUOTAWATCH_PROBE_INTERVAL", default: Some("60s"), secret: false, help: "how often one request may probe the upstream during a billing block" },
    SettingDef { key: "flush_interval", env: "QUOTAWATCH_FLUSH_INTERVAL", default: Some("1s"), secret: false, help: "how often counted usage is written to the database (the most a kill -9 can lose)" },
    SettingDef { key: "max_body_bytes", env: "QUOTAWATCH_MAX_BODY_BYTES", default: Some("65536"), secret: false, help: "largest request body the /api routes accept" },
    SettingDef { key: "cors_origins", env: "QUOTAWATCH_CORS_ORIGINS", default: None, secret: false, help: "origins (scheme://host:port, comma-separated) whose pages may call the API and open the WebSocket from a browser" },
    SettingDef { key: "ws_max_connections_per_key", env: "QUOTAWATCH_WS_MAX_CONNECTIONS_PER_KEY", default: Some("16"), secret: false, help: "most WebSocket connections one key may hold open on one instance; more are refused with 429" },
    SettingDef { key: "ws_ping_interval", env: "QUOTAWATCH_WS_PING_INTERVAL", default: Some("30s"), secret: false, help: "how often the server pings WebSocket clients; silent peers are closed after two" },
    SettingDef { key: "log_format", env: "QUOTAWATCH_LOG_FORMAT", default: Some("pretty"), secret: false, help: "pretty or json" },
    SettingDef { key: "log_level", env: "QUOTAWATCH_LOG", default: Some("info"), secret: false, help: "a tracing filter such as info or quotawatch=debug" },
    SettingDef { key: "upstream_url", env: "QUOTAWATCH_UPSTREAM_URL", default: Some("https://api.openai.com/v1"), secret: false, help: "where /v1/* is forwarded (deliberately not OPENAI_BASE_URL, which apps point at quotawatch)" },
    SettingDef { key: "upstream_api_key", env: "OPENAI_API_KEY", default: None, secret: true, help: "the key sent upstream, unless a workspace names its own variable" },
    SettingDef { key: "upstream_connect_timeout", env: "QUOTAWATCH_UPSTREAM_CONNECT_TIMEOUT", default: Some("10s"), secret: false, help: "time to connect to the upstream" },
    SettingDef { key: "upstream_headers_timeout", env: "QUOTAWATCH_UPSTREAM_HEADERS_TIMEOUT", default: Some("600s"), secret: false, help: "time until the upstream's response headers" },
    SettingDef { key: "upstream_idle_timeout", env: "QUOTAWATCH_UPSTREAM_IDLE_TIMEOUT", default: Some("300s"), secret: false, help: "longest gap between chunks of a streamed response (there is no total timeout)" },
    SettingDef { key: "proxy_max_body_bytes", env: "QUOTAWATCH_PROXY_MAX_BODY_BYTES", default: Some("33554432"), secret: false, help: "largest request body /v1/* accepts" },
    SettingDef { key: "default_max_tokens", env: "QUOTAWATCH_DEFAULT_MAX_TOKENS", default: Some("1024"), secret: false, help: "completion tokens reserved when a request sets no max_tokens" },
    SettingDef { key: "tokenizer", env: "QUOTAWATCH_TOKENIZER", default: Some("tiktoken"), secret: false, help: "how prompts are counted at admission: tiktoken (exact, ~4 MiB per encoding) or bytes (4 bytes per token)" },
    SettingDef { key: "metrics_models", env: "QUOTAWATCH_METRICS_MODELS", default: Some("gpt-5,gpt-5-mini,gpt-5-nano,gpt-4.1,gpt-4.1-mini,gpt-4.1-nano,gpt-4o,gpt-4o-mini,o3,o4-mini,text-embedding-3-small,text-embedding-3-large"), secret: false, help: "models that get their own metrics label; others are counted as other" },
    SettingDef { key: "metrics_public", env: "QUOTAWATCH_METRICS_PUBLIC", default: Some("false"), secret: false, help: "serve /metrics without the admin key" },
    SettingDef { key: "redis_url", env: "QUOTAWATCH_REDIS_URL", default: None, secret: false, help: "redis://HOST:PORT/DB: share counters, blocks and live events with other instances (unset: this instance counts alone)" },
    SettingDef { key: "redis_prefix", env: "QUOTAWATCH_REDIS_PREFIX", default: Some("quotawatch:"), secret: false, help: "prefix of every Redis key and channel; instances that share limits use the same one" },
    SettingDef { key: "redis_timeout", env: "QUOTAWATCH_REDIS_TIMEOUT", default: Some("50ms"), secret: false, help: "longest wait for any Redis call before the on_store_error fallback applies" },
    SettingDef { key: "on_store_error", env: "QUOTAWATCH_ON_STORE_ERROR", default: Some("local"), secret: false, help: "while Redis is unreachable: local (each instance enforces limit/replicas), closed (refuse with 503) or open (admit, count locally)" },
    SettingDef { key: "replicas", env: "QUOTAWATCH_REPLICAS", default: Some("1"), secret: false, help: "how many instances share the limits; each enforces 1/replicas of them while Redis is unreachable" },
];

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

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(********)")
    }
}

/// A setting as it ended up, for `check-config`.
#[derive(Clone, Debug)]
pub struct Effective {
    pub env: &'static str,
    pub key: &'static str,
    pub shown: String,
    pub source: Source,
}

/// How `/v1/*` reaches the upstream.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The base URL, without a trailing slash (e.g. `https://api.openai.com/v1`).
    pub url: String,
    pub api_key: Option<Secret>,
    pub connect_timeout: Duration,
    pub headers_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_body_bytes: usize,
    pub default_max_tokens: u64,
    pub tokenizer: crate::proxy::estimate::Tokenizer,
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
    /// Counters shared with other instances, when configured.
    pub redis: Option<RedisConfig>,
    /// Workspaces declared in the TOML file, applied at start-up.
    pub workspaces: Vec<(String, WorkspaceSpec)>,
    /// The file that declares `workspaces`, which manages them from then on.
    pub workspaces_file: Option<PathBuf>,
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
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileLimit {
    /// Signed, so that a negative limit gets a plain message rather than
    /// serde's "did not match any variant".
    Count(i64),
    Word(String),
}

/// The environment variable of a setting, by which errors name it.
fn env_name(key: &str) -> &str {
    SETTINGS
        .iter()
        .find(|setting| setting.key == key)
        .map_or(key, |setting| setting.env)
}

pub fn load(sources: Sources<'_>) -> Result<Config, ConfigError> {
    let mut values: HashMap<&'static str, (String, Source)> = SETTINGS
        .iter()
        .filter_map(|s| s.default.map(|d| (s.key, (d.to_owned(), Source::Default))))
        .collect();
    let mut declared = (Vec::new(), Source::Default);

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

    build(values, declared)
}

fn build(
    values: HashMap<&'static str, (String, Source)>,
    (declared, declared_in): (Vec<FileWorkspace>, Source),
) -> Result<Config, ConfigError> {
    let get = |key: &str| {
        values
            .get(key)
            .map(|(value, source)| (value.trim(), source))
    };
    let required = |key: &str| -> (&str, &Source) { get(key).unwrap_or(("", &Source::Default)) };
    let fail = |key: &str, source: &Source, message: String| {
        ConfigError::new(env_name(key), source, message)
    };

    let duration = |key: &str| -> Result<Duration, ConfigError> {
        let (text, source) = required(key);
        if text.parse::<f64>().is_ok() {
            // Seconds for one reader, milliseconds for another: a unit it is.
            return Err(fail(
                key,
                source,
                format!("{text:?} has no unit: write it as 500ms, {text}s, 10m or 1h"),
            ));
        }
        parse_duration(text)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                fail(
                    key,
                    source,
                    format!("{text:?} is not a positive duration such as 500ms, 10s, 10m or 1h"),
                )
            })
    };
    let limit = |key: &str, kind: LimitKind| -> Result<Option<u64>, ConfigError> {
        let (text, source) = required(key);
        let value = match text {
            "" | "unlimited" | "none" => None,
            number => Some(number.parse::<u64>().map_err(|_| {
                fail(
                    key,
                    source,
                    format!("{number:?} is not a whole number (or \"unlimited\")"),
                )
            })?),
        };
        validate_limit(kind, value).map_err(|e| fail(key, source, e.message))
    };

    let (listen_text, listen_source) = required("listen");
    let listen = listen_address(listen_text).ok_or_else(|| {
        fail(
            "listen",
            listen_source,
            format!("{listen_text:?} is not an address such as 127.0.0.1:8000 or localhost:8000"),
        )
    })?;

    let (database_url, database_source) = required("database_url");
    if !(database_url.starts_with("sqlite:")
        || database_url.starts_with("postgres://")
        || database_url.starts_with("postgresql://"))
    {
        return Err(fail(
            "database_url",
            database_source,
            format!(
                "{:?} must start with sqlite:, postgres:// or postgresql://",
                mask_secrets(database_url)
            ),
        ));
    }

    let mut limits = Limits::default();
    for (key, kind) in [
        ("default_requests_per_minute", LimitKind::RequestsPerMinute),
        ("default_requests_per_day", LimitKind::RequestsPerDay),
        ("default_tokens_per_minute", LimitKind::TokensPerMinute),
        ("default_tokens_per_day", LimitKind::TokensPerDay),
    ] {
        limits.set(kind, limit(key, kind)?);
    }
    let (warn_text, warn_source) = required("default_warn_at");
    let warn_at = warn_text
        .parse::<f64>()
        .map_err(|_| {
            fail(
                "default_warn_at",
                warn_source,
                format!("{warn_text:?} is not a number"),
            )
        })
        .and_then(|w| {
            validate_warn_at(w).map_err(|e| fail("default_warn_at", warn_source, e.message))
        })?;

    let admin_key = match get("admin_key") {
        None | Some(("", _)) => None,
        Some((key, source)) if key.len() < 16 => {
            return Err(fail(
                "admin_key",
                source,
                "the admin key must be at least 16 characters".to_owned(),
            ));
        }
        Some((key, _)) => Some(Secret(key.to_owned())),
    };

    let byte_count = |key: &str| -> Result<usize, ConfigError> {
        let (text, source) = required(key);
        text.parse::<usize>()
            .ok()
            .filter(|n| *n >= 1024)
            .ok_or_else(|| {
                fail(
                    key,
                    source,
                    format!("{text:?} is not a byte count of at least 1024"),
                )
            })
    };
    let max_body_bytes = byte_count("max_body_bytes")?;

    let (url_text, url_source) = required("upstream_url");
    let upstream_url = url_text.trim_end_matches('/');
    if !(upstream_url.starts_with("http://") || upstream_url.starts_with("https://")) {
        return Err(fail(
            "upstream_url",
            url_source,
            format!(
                "{:?} is not an http:// or https:// URL",
                mask_secrets(url_text)
            ),
        ));
    }
    let (tokens_text, tokens_source) = required("default_max_tokens");
    let default_max_tokens = tokens_text.parse::<u64>().map_err(|_| {
        fail(
            "default_max_tokens",
            tokens_source,
            format!("{tokens_text:?} is not a whole number"),
        )
    })?;
    let (tokenizer_text, tokenizer_source) = required("tokenizer");
    let tokenizer = match tokenizer_text {
        "tiktoken" => crate::proxy::estimate::Tokenizer::Tiktoken,
        "bytes" => crate::proxy::estimate::Tokenizer::Bytes,
        other => {
            return Err(fail(
                "tokenizer",
                tokenizer_source,
                format!("{other:?} is neither tiktoken nor bytes"),
            ));
        }
    };
    let (public_text, public_source) = required("metrics_public");
    let metrics_public = match public_text {
        "true" | "1" | "yes" => true,
        "false" | "0" | "no" => false,
        other => {
            return Err(fail(
                "metrics_public",
                public_source,
                format!("{other:?} is neither true nor false"),
            ));
        }
    };
    let metrics_models = required("metrics_models")
        .0
        .split(',')
        .map(str::trim)
        .filter(|model| !model.is_empty())
        .map(str::to_owned)
        .collect();
    let upstream_api_key = match get("upstream_api_key") {
        None | Some(("", _)) => None,
        Some((key, _)) => Some(Secret(key.to_owned())),
    };

    let (format_text, format_source) = required("log_format");
    let log_format = match format_text {
        "pretty" => LogFormat::Pretty,
        "json" => LogFormat::Json,
        other => {
            return Err(fail(
                "log_format",
                format_source,
                format!("{other:?} is neither pretty nor json"),
            ));
        }
    };
    let (level_text, level_source) = required("log_level");
    validate_log_filter(level_text).map_err(|message| fail("log_level", level_source, message))?;

    let (connections_text, connections_source) = required("ws_max_connections_per_key");
    let ws_max_connections_per_key = connections_text
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            fail(
                "ws_max_connections_per_key",
                connections_source,
                format!("{connections_text:?} is not a whole number of at least 1"),
            )
        })?;

    let cors_origins = match get("cors_origins") {
        None => Vec::new(),
        Some((text, source)) => text
            .split(',')
            .map(str::trim)
            .map(|origin| {
                parse_origin(origin).ok_or_else(|| {
                    fail(
                        "cors_origins",
                        source,
                        format!("{origin:?} is not an origin such as http://localhost:3000 (a scheme, a host and a port if not the default; no path)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };

    let (replicas_text, replicas_source) = required("replicas");
    let instances = replicas_text
        .parse::<u32>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            fail(
                "replicas",
                replicas_source,
                format!("{replicas_text:?} is not a whole number of at least 1"),
            )
        })?;
    let (on_error_text, on_error_source) = required("on_store_error");
    let on_store_error = match on_error_text {
        "local" => OnStoreError::Local { instances },
        "closed" => OnStoreError::Closed,
        "open" => OnStoreError::Open,
        other => {
            return Err(fail(
                "on_store_error",
                on_error_source,
                format!("{other:?} is none of local, closed and open"),
            ));
        }
    };
    let redis = match get("redis_url") {
        None | Some(("", _)) => None,
        Some((url, source)) => {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(fail(
                    "redis_url",
                    source,
                    format!("{:?} is not a redis:// URL", mask_secrets(url)),
                ));
            }
            Some(RedisConfig {
                url: url.to_owned(),
                prefix: required("redis_prefix").0.to_owned(),
                timeout: duration("redis_timeout")?,
                on_store_error,
            })
        }
    };

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
            let (value, source) = values
                .get(setting.key)
                .cloned()
                .unwrap_or_else(|| (String::new(), Source::Default));
            let shown = match (setting.secret, value.is_empty()) {
                (_, true) => "(unset)".to_owned(),
                (true, false) => "******** (set)".to_owned(),
                (false, false) => mask_secrets(&value).into_owned(),
            };
            Effective {
                env: setting.env,
                key: setting.key,
                shown,
                source,
            }
        })
        .collect();

    Ok(Config {
        listen,
        database_url: database_url.to_owned(),
        defaults: WorkspaceDefaults { limits, warn_at },
        admin_key,
        engine: Settings {
            reservation_ttl: duration("reservation_ttl")?,
            probe_interval: duration("probe_interval")?,
        },
        flush_interval: duration("flush_interval")?,
        max_body_bytes,
        ws_ping_interval: duration("ws_ping_interval")?,
        ws_max_connections_per_key,
        cors_origins,
        log_format,
        log_level: level_text.to_owned(),
        upstream: UpstreamConfig {
            url: upstream_url.to_owned(),
            api_key: upstream_api_key,
            connect_timeout: duration("upstream_connect_timeout")?,
            headers_timeout: duration("upstream_headers_timeout")?,
            idle_timeout: duration("upstream_idle_timeout")?,
            max_body_bytes: byte_count("proxy_max_body_bytes")?,
            default_max_tokens,
            tokenizer,
        },
        metrics_models,
        metrics_public,
        redis,
        workspaces,
        workspaces_file: match &declared_in {
            Source::File(path) => Some(path.clone()),
            _ => None,
        },
        effective,
    })
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
    let mut limits: PerLimit<Option<Option<u64>>> = PerLimit::default();
    for (name, value) in declared.limits {
        let kind = LimitKind::from_name(&name).ok_or_else(|| {
            ConfigError::new(at(&format!("limits.{name}")), source, "unknown limit; use requests_per_minute, requests_per_day, tokens_per_minute or tokens_per_day")
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
            FileLimit::Count(n) => Some(n.unsigned_abs()),
            FileLimit::Word(word) if word == "unlimited" => None,
            FileLimit::Word(word) => {
                return Err(ConfigError::new(
                    at(&format!("limits.{name}")),
                    source,
                    format!("{word:?} is neither a number nor \"unlimited\""),
                ));
            }
        };
        limits.set(kind, Some(value));
    }
    let spec = WorkspaceSpec {
        name: declared.name,
        timezone: declared.timezone,
        limits,
        warn_at: declared.warn_at,
        upstream_key_env: declared.upstream_key_env.map(Some),
        upstream_organization: declared.upstream_organization.map(Some),
        upstream_project: declared.upstream_project.map(Some),
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
        .map_err(|e| ConfigError::new(at(e.field), source, e.message))?;
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
            Some(Some(n)) => parts.push(format!("{kind}={n}")),
            Some(None) => parts.push(format!("{kind}=unlimited")),
            None => {}
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
        if let Some(Some(value)) = value {
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
    fn defaults_match_the_documentation() {
        let config = load_with(None, None, &[], vec![]).expect("defaults are valid");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(config.database_url, "sqlite://quotawatch.db");
        assert_eq!(
            config.defaults.limits.get(LimitKind::RequestsPerMinute),
            Some(500)
        );
        assert_eq!(
            config.defaults.limits.get(LimitKind::RequestsPerDay),
            Some(10_000)
        );
        assert_eq!(config.defaults.limits.get(LimitKind::TokensPerDay), None);
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
            config.defaults.limits.get(LimitKind::RequestsPerMinute),
            Some(100),
            "file over default"
        );
        assert_eq!(
            config.defaults.limits.get(LimitKind::RequestsPerDay),
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
        assert_eq!(
            spec.limits.get(LimitKind::RequestsPerMinute),
            Some(Some(60))
        );
        assert_eq!(spec.limits.get(LimitKind::TokensPerDay), Some(None));

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
}
