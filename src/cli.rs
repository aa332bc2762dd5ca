//! The command line: `serve`, `check-config`, workspace and key management on
//! the database, and `status` against a running server.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::admin::{Admin, KeySpec, WorkspaceSpec};
use crate::api::dto::usage_name;
use crate::config::{self, CliOverrides, Config, Sources};
use crate::domain::limits::{LimitKind, PerLimit, Unit, WorkspaceId};
use crate::domain::price::{format_dollars, nano_usd};
use crate::domain::time::{Timestamp, humanize_duration};
use crate::keys::{KeyGrant, Scope, UnknownScope};
use crate::store::{KeyRecord, Store};

#[derive(Parser, Debug)]
#[command(
    name = "quotawatch",
    version,
    about = "Watches and enforces OpenAI API quotas for many workspaces."
)]
pub struct Cli {
    /// A TOML file with settings and declared workspaces.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Overrides QUOTAWATCH_DATABASE_URL.
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Overrides QUOTAWATCH_LOG_FORMAT (pretty or json).
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve {
        /// Overrides QUOTAWATCH_LISTEN.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Validate the configuration and print it, secrets masked.
    CheckConfig,
    /// Manage workspaces in the database.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Manage API keys in the database.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print every workspace's status from a running server. The key comes
    /// from QUOTAWATCH_KEY, or is asked for.
    Status {
        /// The server's base URL (default: from QUOTAWATCH_LISTEN).
        #[arg(long)]
        url: Option<String>,
    },
    /// A fake OpenAI upstream for tests, demos and benchmarks (never for
    /// production): answers /v1/* from recorded OpenAI responses.
    MockUpstream(MockArgs),
}

#[derive(Args, Debug)]
struct MockArgs {
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    /// Wait before the response headers, e.g. 20ms.
    #[arg(long, value_parser = parse_duration_arg, default_value = "0s")]
    latency: Duration,
    /// Wait between streamed events, e.g. 10ms.
    #[arg(long, value_parser = parse_duration_arg, default_value = "0s")]
    chunk_delay: Duration,
    /// The answer to requests that name none with ?mock_scenario=NAME:
    /// ok, timeout, stream_break, stream_stall, stream_error, or an error
    /// such as insufficient_quota or rate_limit_requests (see README).
    #[arg(long, default_value = "ok")]
    scenario: String,
    /// The share of requests (0 to 1) answered with --error-scenario.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    #[arg(long, default_value = "server_error")]
    error_scenario: String,
    /// Answer 401 unless requests carry this key.
    #[arg(long)]
    require_key: Option<String>,
}

fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    crate::domain::time::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration such as 20ms or 1s"))
}

#[derive(Subcommand, Debug)]
enum WorkspaceCommand {
    /// Create a workspace.
    Add {
        id: String,
        #[command(flatten)]
        settings: WorkspaceArgs,
    },
    /// List workspaces.
    List,
    /// Change a workspace's settings.
    Set {
        id: String,
        #[command(flatten)]
        settings: WorkspaceArgs,
    },
    /// Delete a workspace with its keys, state and history.
    Remove { id: String },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create a key for a workspace (or, with --service, a service key) and
    /// print it once.
    Create {
        /// The key's workspace; leave out with --service.
        #[arg(required_unless_present = "service", conflicts_with = "service")]
        workspace: Option<String>,
        /// What the key may do: proxy, report, read (repeat, or separate
        /// with commas); all three when not given.
        #[arg(long = "scope", value_delimiter = ',', value_parser = parse_scope_arg)]
        scopes: Vec<Scope>,
        /// What the key is for, shown in lists.
        #[arg(long)]
        name: Option<String>,
        /// How long the key works, e.g. 30d or 12h; forever when not given.
        #[arg(long, value_parser = parse_lifetime_arg)]
        expires: Option<Duration>,
        /// A service key: acts for any workspace a request names (or only
        /// those given with --for), with every scope there.
        #[arg(long)]
        service: bool,
        /// With --service: a workspace the key may act for (repeat, or
        /// separate with commas).
        #[arg(long = "for", value_delimiter = ',', requires = "service")]
        serves: Vec<String>,
    },
    /// List a workspace's keys, or the service keys with --service.
    List {
        #[arg(required_unless_present = "service", conflicts_with = "service")]
        workspace: Option<String>,
        #[arg(long)]
        service: bool,
    },
    /// Revoke a key (a workspace key or a service key) by its id.
    Revoke { key_id: String },
}

fn parse_scope_arg(text: &str) -> Result<Scope, String> {
    text.parse()
        .map_err(|error: UnknownScope| error.to_string())
}

/// A key's lifetime needs a unit: a bare number could mean seconds or days.
fn parse_lifetime_arg(text: &str) -> Result<Duration, String> {
    if text.trim().parse::<f64>().is_ok() {
        return Err(format!("{text:?} needs a unit, such as 30d or 12h"));
    }
    parse_duration_arg(text)
}

#[derive(Args, Debug, Default)]
struct WorkspaceArgs {
    #[arg(long)]
    name: Option<String>,
    /// An IANA timezone, e.g. Europe/Berlin.
    #[arg(long)]
    timezone: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    #[arg(long)]
    warn_at: Option<f64>,
    /// The environment variable holding this workspace's own OpenAI key, or
    /// "none" for the server's OPENAI_API_KEY.
    #[arg(long, value_name = "NAME")]
    upstream_key_env: Option<String>,
    /// The OpenAI organization billed for this workspace's calls (org-...),
    /// or "none" for the upstream key's default.
    #[arg(long, value_name = "ID")]
    upstream_organization: Option<String>,
    /// The OpenAI project billed for this workspace's calls (proj_...), or
    /// "none" for the upstream key's default.
    #[arg(long, value_name = "ID")]
    upstream_project: Option<String>,
}

/// A setting given on the command line, where "none" clears it.
fn unless_none(value: String) -> Option<String> {
    (value != "none").then_some(value)
}

/// A limit given on the command line: a number, or `None` for "unlimited".
#[derive(Clone, Copy, Debug)]
struct LimitArg(Option<u64>);

/// One option per limit kind (`--tokens-per-month`), built from
/// [`LimitKind::ALL`] so that every kind has one.
#[derive(Debug, Default)]
struct LimitArgs(PerLimit<Option<LimitArg>>);

impl clap::FromArgMatches for LimitArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut limits = PerLimit::default();
        for kind in LimitKind::ALL {
            limits.set(kind, matches.get_one::<LimitArg>(kind.name()).copied());
        }
        Ok(Self(limits))
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for LimitArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        static FLAGS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
            LimitKind::ALL
                .iter()
                .map(|kind| kind.name().replace('_', "-"))
                .collect()
        });
        LimitKind::ALL.into_iter().fold(command, |command, kind| {
            command.arg(
                clap::Arg::new(kind.name())
                    .long(FLAGS[kind.index()].as_str())
                    .value_name("N")
                    .value_parser(move |text: &str| parse_limit(text, kind))
                    .help(format!(
                        "The {kind} limit: {}, or \"unlimited\"",
                        kind.metric.unit().expected()
                    )),
            )
        })
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

/// A limit in its public unit: a whole number of requests or tokens, or
/// dollars for a usd limit, which counts nano-dollars.
fn parse_limit(text: &str, kind: LimitKind) -> Result<LimitArg, String> {
    if matches!(text, "unlimited" | "none") {
        return Ok(LimitArg(None));
    }
    let unit = kind.metric.unit();
    unit.parse(text)
        .map(|value| LimitArg(Some(value)))
        .ok_or_else(|| format!("{text:?} is neither {} nor \"unlimited\"", unit.expected()))
}

impl WorkspaceArgs {
    fn into_spec(self) -> WorkspaceSpec {
        WorkspaceSpec {
            name: self.name,
            timezone: self.timezone,
            limits: PerLimit(
                self.limits
                    .0
                    .0
                    .map(|limit| limit.map(|LimitArg(value)| value).into()),
            ),
            warn_at: self.warn_at,
            upstream_key_env: self.upstream_key_env.map(unless_none).into(),
            upstream_organization: self.upstream_organization.map(unless_none).into(),
            upstream_project: self.upstream_project.map(unless_none).into(),
            // Scoped limits are set through the REST API; the CLI keeps them.
            scoped_limits: crate::admin::Change::Keep,
        }
    }
}

type Failure = Box<dyn std::error::Error>;

impl Cli {
    fn overrides(&self) -> CliOverrides {
        let mut overrides = Vec::new();
        if let Some(url) = &self.database_url {
            overrides.push((config::DATABASE_URL.def.key, url.clone()));
        }
        if let Some(format) = &self.log_format {
            overrides.push((config::LOG_FORMAT.def.key, format.clone()));
        }
        if let Command::Serve {
            listen: Some(listen),
        } = &self.command
        {
            overrides.push((config::LISTEN.def.key, listen.clone()));
        }
        overrides
    }

    pub fn load_config(&self) -> Result<Config, config::ConfigError> {
        config::load(Sources::process(self.config.as_deref(), self.overrides()))
    }
}

/// Runs the parsed command line; the error is what to print before exiting
/// with status 1.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::MockUpstream(args) = cli.command {
        return mock_upstream(args).await;
    }
    let config = cli.load_config()?;
    crate::telemetry::init(config.log_format, &config.log_level);
    match cli.command {
        Command::Serve { .. } => serve(config).await,
        Command::CheckConfig => {
            print!("{}", config.describe());
            println!("configuration is valid");
            Ok(())
        }
        Command::Workspace(command) => workspace(config, command).await,
        Command::Key(command) => key(config, command).await,
        Command::Status { url } => status(&config, url).await,
        Command::MockUpstream(_) => Ok(()),
    }
}

async fn mock_upstream(args: MockArgs) -> Result<(), Failure> {
    for scenario in [&args.scenario, &args.error_scenario] {
        if !crate::mock::scenarios().contains(&scenario.as_str()) {
            return Err(format!(
                "unknown scenario {scenario:?}; known: {}",
                crate::mock::scenarios().join(", ")
            )
            .into());
        }
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    println!(
        "mock OpenAI upstream listening on http://{}/v1",
        listener.local_addr()?
    );
    let options = crate::mock::MockOptions {
        latency: args.latency,
        chunk_delay: args.chunk_delay,
        scenario: args.scenario,
        error_rate: args.error_rate.clamp(0.0, 1.0),
        error_scenario: args.error_scenario,
        require_key: args.require_key,
    };
    crate::mock::serve(listener, options, shutdown_signal()).await?;
    Ok(())
}

async fn serve(config: Config) -> Result<(), Failure> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} (QUOTAWATCH_LISTEN): {e}",
                config.listen
            )
        })?;
    let (running, bootstrap) =
        crate::app::start(config, listener, crate::app::process_env()).await?;
    let mut out = std::io::stdout().lock();
    if let Some(key) = &bootstrap.generated_admin_key {
        writeln!(
            out,
            "Generated admin key (shown once; set QUOTA_ADMIN_RESET_KEY to choose your own):"
        )?;
        writeln!(out, "  {}", key.expose())?;
    }
    if let Some(key) = &bootstrap.default_workspace_key {
        writeln!(
            out,
            "Created workspace \"default\" with this API key (shown once; store it now):"
        )?;
        writeln!(out, "  {}", key.expose())?;
    }
    writeln!(
        out,
        "quotawatch listening on http://{}",
        running.local_addr()
    )?;
    out.flush()?;
    drop(out);
    drop(bootstrap);
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

async fn offline_admin(config: &Config) -> Result<Admin, Failure> {
    let store = Store::open(&config.database_url).await?;
    Ok(Admin::new(store, None, config.defaults).with_declared(config))
}

/// A limit as configured, in its public unit: a count, or dollars.
fn limit_cell(kind: LimitKind, value: Option<u64>) -> String {
    match (value, kind.metric.unit()) {
        (None, _) => "unlimited".to_owned(),
        (Some(count), Unit::Count) => count.to_string(),
        (Some(count), unit) => unit.figure(count),
    }
}

async fn workspace(config: Config, command: WorkspaceCommand) -> Result<(), Failure> {
    let admin = offline_admin(&config).await?;
    match command {
        WorkspaceCommand::Add { id, settings } => {
            let created = admin.create_workspace(&id, &settings.into_spec()).await?;
            println!("created workspace {}", created.id);
        }
        WorkspaceCommand::Set { id, settings } => {
            let id: WorkspaceId = id.parse()?;
            let updated = admin.update_workspace(&id, &settings.into_spec()).await?;
            println!("updated workspace {}", updated.id);
        }
        WorkspaceCommand::Remove { id } => {
            admin.delete_workspace(&id.parse()?).await?;
            println!("removed workspace {id}");
        }
        WorkspaceCommand::List => {
            let mut rows = vec![vec![
                "ID".to_owned(),
                "NAME".to_owned(),
                "TIMEZONE".to_owned(),
            ]];
            rows[0].extend(LimitKind::ALL.map(limit_heading));
            rows[0].push("WARN_AT".to_owned());
            for ws in admin.list_workspaces().await? {
                let mut row = vec![
                    ws.id.to_string(),
                    ws.name.clone(),
                    ws.timezone.name().to_owned(),
                ];
                row.extend(
                    LimitKind::ALL
                        .iter()
                        .map(|kind| limit_cell(*kind, ws.limits.get(*kind))),
                );
                row.push(ws.warn_at.to_string());
                rows.push(row);
            }
            print!("{}", table(&rows));
        }
    }
    Ok(())
}

async fn key(config: Config, command: KeyCommand) -> Result<(), Failure> {
    let admin = offline_admin(&config).await?;
    match command {
        KeyCommand::Create {
            workspace,
            scopes,
            name,
            expires,
            service,
            serves,
        } => {
            let spec = KeySpec {
                name,
                scopes: (!scopes.is_empty()).then(|| scopes.into_iter().collect()),
                expires_in_seconds: expires.map(|lifetime| lifetime.as_secs()),
            };
            let (record, key) = match workspace {
                Some(workspace) if !service => admin.create_key(&workspace.parse()?, &spec).await?,
                _ => {
                    let serves = (!serves.is_empty())
                        .then(|| serves.iter().map(|id| id.parse()).collect::<Result<_, _>>())
                        .transpose()?;
                    admin.create_service_key(serves, &spec).await?
                }
            };
            let holder = match record.grant.workspace() {
                Some(workspace) => format!("for workspace {workspace}"),
                None => "(a service key)".to_owned(),
            };
            println!(
                "created key {} {holder} (shown once; store it now):",
                record.id
            );
            println!("  {}", key.expose());
        }
        KeyCommand::List { workspace, service } => {
            let workspace = match workspace {
                Some(id) if !service => Some(id.parse()?),
                _ => None,
            };
            let keys = admin.list_keys(workspace.as_ref()).await?;
            print!("{}", key_table(&keys));
        }
        KeyCommand::Revoke { key_id } => {
            admin.revoke_any_key(&key_id).await?;
            println!("revoked key {key_id}");
        }
    }
    Ok(())
}

/// Keys as a table: what each may do, until when, and its last use.
fn key_table(keys: &[KeyRecord]) -> String {
    let time = |at: Option<Timestamp>| at.map_or_else(|| "-".to_owned(), |at| at.to_rfc3339());
    let mut rows = vec![
        [
            "ID",
            "PREFIX",
            "NAME",
            "SCOPES",
            "EXPIRES",
            "LAST USED",
            "REVOKED",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for key in keys {
        let scopes = match &key.grant {
            KeyGrant::Workspace { scopes, .. } => scopes.to_list(),
            KeyGrant::Service { workspaces: None } => "service (any workspace)".to_owned(),
            KeyGrant::Service {
                workspaces: Some(list),
            } => format!(
                "service ({})",
                list.iter()
                    .map(WorkspaceId::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        rows.push(vec![
            key.id.clone(),
            key.prefix.clone(),
            if key.name.is_empty() {
                "-".to_owned()
            } else {
                key.name.clone()
            },
            scopes,
            time(key.expires_at),
            time(key.last_used_at),
            time(key.revoked_at),
        ]);
    }
    table(&rows)
}

/// Lays out rows as left-aligned columns.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A limit's column heading: `REQ/MIN`, `TOK/MON`.
fn limit_heading(kind: LimitKind) -> String {
    let short = |name: &str| name[..3].to_uppercase();
    format!(
        "{}/{}",
        short(kind.metric.name()),
        short(kind.window.name())
    )
}

fn status_rows(docs: &[serde_json::Value], now: Timestamp) -> Vec<Vec<String>> {
    let mut rows = vec![vec!["WORKSPACE".to_owned(), "STATUS".to_owned()]];
    rows[0].extend(LimitKind::ALL.map(limit_heading));
    for doc in docs {
        let mut row = vec![
            doc["workspace"].as_str().unwrap_or("?").to_owned(),
            doc["status"].as_str().unwrap_or("?").to_owned(),
        ];
        for kind in LimitKind::ALL {
            let limit = &doc["limits"][kind.name()];
            // Counts, or dollars for usd limits, as the server wrote them.
            let cell = match (limit["used"].as_number(), limit["limit"].as_number()) {
                (Some(used), Some(max)) => {
                    let resets = limit["resets_at"]
                        .as_str()
                        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
                        .map(|at| {
                            let at = Timestamp::from_millis(at.timestamp_millis());
                            format!(" resets in {}", humanize_duration(now.until(at)))
                        })
                        .unwrap_or_default();
                    format!("{used}/{max}{resets}")
                }
                // No limit: what was used all the same.
                _ => doc["usage"][usage_name(kind.window)][kind.metric.name()]
                    .as_number()
                    .map_or_else(|| "-".to_owned(), |used| format!("{used} (no limit)")),
            };
            row.push(cell);
        }
        rows.push(row);
    }
    rows
}

/// An amount of dollars as the server wrote it, as texts write money.
fn money(value: &serde_json::Value) -> String {
    value
        .as_f64()
        .and_then(nano_usd)
        .map_or_else(|| "-".to_owned(), format_dollars)
}

/// What each workspace spent today and this month, and on which models
/// this month (most first), from the status documents' `spend`.
fn spend_rows(docs: &[serde_json::Value]) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "WORKSPACE".to_owned(),
        "SPENT TODAY".to_owned(),
        "SPENT THIS MONTH".to_owned(),
        "BY MODEL THIS MONTH".to_owned(),
    ]];
    for doc in docs {
        let spend = &doc["spend"];
        let mut by_model: Vec<(&String, f64)> = spend["this_month"]["by_model"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(model, spent)| (model, spent["usd"].as_f64().unwrap_or(0.0)))
            .collect();
        by_model.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let models: Vec<String> = by_model
            .into_iter()
            .map(|(model, usd)| format!("{model} {}", money(&usd.into())))
            .collect();
        rows.push(vec![
            doc["workspace"].as_str().unwrap_or("?").to_owned(),
            money(&spend["today"]["usd"]),
            money(&spend["this_month"]["usd"]),
            if models.is_empty() {
                "-".to_owned()
            } else {
                models.join(", ")
            },
        ]);
    }
    rows
}

async fn status(config: &Config, url: Option<String>) -> Result<(), Failure> {
    let key = match std::env::var("QUOTAWATCH_KEY") {
        Ok(key) if !key.is_empty() => key,
        _ => rpassword::prompt_password("API key (admin or workspace): ")?,
    };
    let base = url.unwrap_or_else(|| {
        let mut addr = config.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    });
    crate::telemetry::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let response = client
        .get(format!("{}/api/quota/status", base.trim_end_matches('/')))
        .bearer_auth(key.trim())
        .send()
        .await
        .map_err(|e| format!("cannot reach quotawatch at {base}: {e}"))?;
    let code = response.status();
    let body: serde_json::Value = response.json().await?;
    if !code.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("unknown error");
        return Err(format!("{base} answered {code}: {message}").into());
    }
    let docs = match body.get("workspaces").and_then(|w| w.as_array()) {
        Some(list) => list.clone(),
        None => vec![body],
    };
    let now = Timestamp::from_millis(chrono::Utc::now().timestamp_millis());
    print!("{}", table(&status_rows(&docs, now)));
    println!();
    print!("{}", table(&spend_rows(&docs)));
    if let Some(taken) = docs
        .first()
        .and_then(|doc| doc["spend"]["prices_taken"].as_str())
    {
        println!("Prices as of {taken}.");
    }
    Ok(())
}
