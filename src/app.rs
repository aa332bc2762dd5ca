//! Assembly: opens the database, bootstraps a fresh installation, builds the
//! engine, starts the background tasks (among them the alert dispatcher)
//! and serves HTTP. This is the only
//! place that picks concrete backends and the only place tasks are spawned
//! for the life of the server; `Running::shutdown` stops them all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin::{Admin, AdminError, KeySpec, WorkspaceSpec};
use crate::alerts::{self, Alerts, DispatcherHandle};
use crate::api::{self, AppParts, AppState};
use crate::config::Config;
use crate::engine::flush::{self, FlushHandle};
use crate::engine::{Counters, Engine, SystemClock};
use crate::keys::{KeyHash, PlainKey};
use crate::prices::{PriceBook, Pricing};
use crate::redis::{RedisCounters, SharedError};
use crate::store::{Store, StoreError};
use crate::tokens::TokenSecret;

/// How often time-driven changes (windows sliding, blocks expiring) are
/// evaluated.
const TICK: Duration = Duration::from_millis(250);

const ADMIN_KEY_META: &str = "admin_key_sha256";
const TOKEN_SECRET_META: &str = "token_secret";
const BOOTSTRAPPED_META: &str = "bootstrapped";
const DEFAULT_WORKSPACE: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot apply a workspace declared in the configuration: {0}")]
    Declared(#[from] AdminError),
    #[error("cannot use Redis: {0}")]
    Redis(#[from] SharedError),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Prices(#[from] crate::prices::PriceFileError),
    #[error("cannot use the SMTP server: {0}")]
    Smtp(String),
    #[error("cannot declare an alert channel: {0}")]
    AlertChannel(String),
}

/// The listener whose every accepted connection sends each write at once
/// (TCP_NODELAY): a streamed answer is many small writes, and with Nagle's
/// algorithm each one after the first waited for the client's delayed ACK,
/// up to 40 ms per event (a proxied stream took 44 ms instead of 2.5 ms).
fn sending_at_once(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    axum::serve::ListenerExt::tap_io(listener, |connection| {
        if let Err(error) = connection.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
    })
}

/// Keys created during start-up. They exist only here, to be shown once.
#[derive(Default)]
pub struct Bootstrap {
    pub default_workspace_key: Option<PlainKey>,
    pub generated_admin_key: Option<PlainKey>,
}

/// A started server.
pub struct Running {
    addr: SocketAddr,
    stop_serving: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
    flush: FlushHandle,
    dispatcher: DispatcherHandle,
    store: Store,
    engine: Arc<Engine>,
    hub: api::ws::Hub,
}

/// The admin key's hash: the configured key's, or the stored hash of a
/// generated one. On a first start without either, a key is generated and
/// returned to be shown once; its hash is stored only when start-up is
/// otherwise complete, so a failed start never leaves a key nobody saw.
async fn admin_key(
    config: &Config,
    store: &Store,
) -> Result<(KeyHash, Option<PlainKey>), StoreError> {
    if let Some(key) = &config.admin_key {
        return Ok((KeyHash::of(key.expose()), None));
    }
    if let Some(hash) = store
        .meta(ADMIN_KEY_META)
        .await?
        .as_deref()
        .and_then(KeyHash::from_hex)
    {
        return Ok((hash, None));
    }
    let key = PlainKey::generate();
    Ok((key.hash(), Some(key)))
}

/// The secret browser tokens are signed with: made by the first instance
/// to start and read by every other, so that a token minted through one
/// works on all. Kept in the database beside the hashes of keys, which
/// protects it as it protects them.
async fn token_secret(store: &Store) -> Result<TokenSecret, StoreError> {
    let fresh = TokenSecret::generate().to_hex();
    let stored = store.meta_or_insert(TOKEN_SECRET_META, &fresh).await?;
    TokenSecret::from_hex(&stored).ok_or_else(|| {
        StoreError::Conflict(format!(
            "the database's {TOKEN_SECRET_META:?} entry in table meta is not 64 hex digits; delete it to have a new one made (browser tokens minted before then stop working)"
        ))
    })
}

/// Applies the configuration file's workspaces, and on the very first start
/// with no workspace at all creates `default` with one key. A database that
/// had workspaces once is not bootstrapped again, even if they were all
/// deleted since.
async fn bootstrap_workspaces(
    config: &Config,
    admin: &Admin,
    store: &Store,
) -> Result<Option<PlainKey>, StartError> {
    for (id, spec) in &config.workspaces {
        admin.declare_workspace(id, spec).await?;
    }
    let bootstrapped = store.meta(BOOTSTRAPPED_META).await?.is_some();
    let empty = store.load_catalog().await?.workspaces.is_empty();
    let key = if !bootstrapped && empty {
        admin
            .create_workspace(DEFAULT_WORKSPACE, &WorkspaceSpec::default())
            .await?;
        let id = DEFAULT_WORKSPACE.parse().map_err(AdminError::from)?;
        Some(admin.create_key(&id, &KeySpec::default()).await?.1)
    } else {
        None
    };
    if !bootstrapped {
        store.set_meta(BOOTSTRAPPED_META, "1").await?;
    }
    Ok(key)
}

/// Opens everything and starts serving on `listener`. `env` looks up the
/// environment variables that workspaces name for their upstream keys
/// ([`process_env`] in production).
pub async fn start(
    config: Config,
    listener: TcpListener,
    env: crate::keys::EnvLookup,
) -> Result<(Running, Bootstrap), StartError> {
    // A price file that cannot be used stops the start before anything
    // else is opened.
    let prices = Arc::new(PriceBook::open(config.prices_file.clone())?);
    let store = Store::open(&config.database_url).await?;
    let (admin_hash, generated_admin_key) = admin_key(&config, &store).await?;
    let offline_admin =
        Admin::new(store.clone(), None, config.defaults).with_upstream_keys(env.clone());
    let default_workspace_key = bootstrap_workspaces(&config, &offline_admin, &store).await?;

    let mut engine = Engine::new(config.engine, config.defaults, Arc::new(SystemClock));
    engine.price_with(Pricing {
        book: prices.clone(),
        unpriced: config.unpriced_model_rate,
    });
    // WebSocket tickets live beside the counters, in the same Redis.
    let mut single_use = None;
    if let Some(redis) = &config.redis {
        let counters = RedisCounters::new(&redis.url, &redis.prefix, redis.timeout)?;
        single_use = Some(counters.single_use());
        engine.count_in(Counters::redis(counters, redis.on_store_error));
    }
    engine.look_up_keys_in(store.clone());
    let proxy = crate::proxy::Proxy::new(&config.upstream, env.clone())
        .map_err(|error| StartError::Io(std::io::Error::other(error)))?;
    // Billing blocks are kept per upstream credential, which the keys the
    // proxy sends name.
    engine.resolve_credentials_with(proxy.credentials());
    let engine = Arc::new(engine);
    let catalog = store.load_catalog().await?;
    let states = store.load_states().await?;
    let active = store.notifications(None, false, i64::MAX).await?;
    engine.load(catalog, states, active);
    // Two days back covers the current and the previous local day of every
    // timezone, the days whose model names the engine caps.
    let recent = engine.now().millis() - 2 * 86_400_000;
    engine.remember_models(store.models_by_day(recent).await?);
    let month = engine.now().millis() - flush::SPEND_HISTORY.as_millis() as i64;
    engine.load_spend(store.spend_by_day(month).await?);
    engine.set_admin_key(admin_hash);
    engine.set_token_secret(token_secret(&store).await?);

    let (flush, flush_task) = flush::spawn(engine.clone(), store.clone(), config.flush_interval);
    let (hub, hub_task) = api::ws::Hub::spawn(engine.clone());
    let hub_handle = hub.clone();
    let ticker = tokio::spawn(tick(engine.clone()));
    let follower = tokio::spawn(engine.clone().follow_other_instances());
    let catalog_follower = tokio::spawn(engine.clone().follow_catalog(store.clone()));

    if config.upstream.api_key.is_none() {
        tracing::warn!(
            "OPENAI_API_KEY is not set: /v1 calls of workspaces without their own upstream_key_env answer 503 upstream_key_missing"
        );
        engine.upstream_key_missing();
    }
    let metrics = Arc::new(crate::metrics::Metrics::new(&config.metrics_models));
    // A declared workspace's channel needs its workspace, declared too or
    // created through the API: named here rather than left to take no events.
    if let Some((index, workspace)) =
        config
            .alert_channels
            .iter()
            .enumerate()
            .find_map(|(index, channel)| {
                channel
                    .workspace
                    .as_ref()
                    .filter(|workspace| !engine.contains(workspace))
                    .map(|workspace| (index, workspace))
            })
    {
        return Err(StartError::AlertChannel(format!(
            "alerts.channels[{index}].workspace: there is no workspace {}",
            workspace.as_str()
        )));
    }
    alerts::declare_channels(&store, &config.alert_channels, engine.now()).await?;
    let mailer = config
        .smtp
        .as_ref()
        .map(crate::mail::Mailer::new)
        .transpose()
        .map_err(StartError::Smtp)?;
    let alerts = Alerts::new(
        store.clone(),
        engine.clone(),
        metrics.clone(),
        mailer,
        config.alerts.clone(),
    );
    let (dispatcher, dispatcher_task) = alerts::spawn(alerts.clone());
    let price_reloader = tokio::spawn(reload_prices_on_hangup(engine.clone()));
    let proxy_state = crate::proxy::ProxyState::new(crate::proxy::ProxyParts {
        engine: engine.clone(),
        metrics: metrics.clone(),
        proxy,
    });
    let state = AppState::new(AppParts {
        engine: engine.clone(),
        metrics,
        alerts,
        metrics_public: config.metrics_public,
        store: store.clone(),
        admin: Admin::new(store.clone(), Some(engine.clone()), config.defaults)
            .with_upstream_keys(env.clone())
            .with_declared(&config),
        tickets: api::ws::Tickets::new(single_use),
        hub,
        ws_connections: api::ws::Connections::new(config.ws_max_connections_per_key),
        cors_origins: config.cors_origins.clone(),
        ws_ping_interval: config.ws_ping_interval,
        openapi_json: api::openapi_json(),
        prices,
    });
    let router = crate::edge::serve(
        api::router(state),
        crate::proxy::router(proxy_state),
        &config.cors_origins,
        config.max_body_bytes,
    );
    if let Some(key) = &generated_admin_key {
        store.set_meta(ADMIN_KEY_META, &key.hash().to_hex()).await?;
    }
    let addr = listener.local_addr()?;
    let (stop_serving, stopped) = oneshot::channel::<()>();
    let listener = sending_at_once(listener);
    // Each connection gets a copy of the service, whose routes it shares
    // with the others.
    let router = axum::ServiceExt::<axum::extract::Request>::into_make_service(router);
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%addr, database = ?store.backend(), "quotawatch serving");
    Ok((
        Running {
            addr,
            stop_serving,
            server,
            background: vec![
                flush_task,
                hub_task,
                ticker,
                follower,
                catalog_follower,
                price_reloader,
                dispatcher_task,
            ],
            hub: hub_handle,
            flush,
            dispatcher,
            store,
            engine,
        },
        Bootstrap {
            default_workspace_key,
            generated_admin_key,
        },
    ))
}

/// Looks up the environment variables that workspaces name for their
/// upstream keys: the process environment first, then `./.env`.
pub fn process_env() -> crate::keys::EnvLookup {
    let dotenv: std::collections::HashMap<String, String> = dotenvy::from_path_iter(".env")
        .map(|entries| entries.filter_map(Result::ok).collect())
        .unwrap_or_default();
    std::sync::Arc::new(move |name: &str| {
        std::env::var(name)
            .ok()
            .or_else(|| dotenv.get(name).cloned())
    })
}

/// Reads the operator's price file again on every SIGHUP, as daemons
/// re-read their configuration.
async fn reload_prices_on_hangup(engine: Arc<Engine>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!(
                "cannot listen for SIGHUP; prices reload only on POST /api/prices/reload"
            );
            return;
        };
        while hangups.recv().await.is_some() {
            match engine.reload_prices() {
                Ok(table) => {
                    tracing::info!(models = table.len(), taken = %table.taken, "prices read again")
                }
                Err(error) => {
                    tracing::error!(%error, "prices not read again; the ones in force stay")
                }
            }
        }
    }
    #[cfg(not(unix))]
    drop(engine);
}

async fn tick(engine: Arc<Engine>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        engine.tick();
        engine.tend_counters().await;
    }
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Stops accepting requests, lets in-flight ones finish, writes
    /// everything to the database and closes it.
    pub async fn shutdown(self) {
        let _ = self.stop_serving.send(());
        self.hub.close_all();
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "server stopped with an error"),
            Err(error) => tracing::error!(%error, "server task failed"),
        }
        self.flush.stop().await;
        self.dispatcher.stop().await;
        for task in self.background {
            task.abort();
        }
        self.store.close().await;
        tracing::info!("quotawatch stopped; everything counted is written");
    }

    /// Stops without the final flush, as a crash would; for tests of what
    /// survives one.
    pub async fn abort(self) {
        self.hub.close_all();
        for task in self.background {
            task.abort();
        }
        self.server.abort();
        self.store.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;

    #[tokio::test]
    async fn accepted_connections_send_each_write_at_once() {
        let bound = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = bound.local_addr().expect("address");
        let mut listener = sending_at_once(bound);
        let ((accepted, _), client) =
            tokio::join!(listener.accept(), tokio::net::TcpStream::connect(address));
        client.expect("connect");
        assert!(accepted.nodelay().expect("read TCP_NODELAY"));
    }
}
