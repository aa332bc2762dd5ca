//! The live WebSocket, `GET /api/quota/ws`.
//!
//! A hub task turns engine events into JSON once and rebroadcasts them; each
//! connection filters what its subscription wants. Every connection reads from
//! a bounded broadcast queue: when it falls behind (a slow network, a stuck
//! browser tab), older messages are dropped for it alone and it receives a
//! fresh snapshot instead, so neither the engine nor other clients ever wait
//! for it. A peer that stops answering pings, or cannot take a message for
//! [`SEND_TIMEOUT`], is disconnected.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio::time::Instant;
use utoipa::IntoParams;

use super::AppState;
use super::dto::{ClientMessage, NotificationDoc, ServerMessage, StatusDoc, SubscribeTarget};
use crate::domain::limits::WorkspaceId;
use crate::domain::notification::Notification;
use crate::domain::time::Timestamp;
use crate::edge::auth::{Auth, Target, credential_refused};
use crate::edge::error::{ApiError, Query};
use crate::engine::{AuthError, Credential, Engine, Event, Principal};
use crate::keys::{KeyHash, Scope};
use crate::redis::SingleUse;
use crate::sync::lock;

/// How long a ticket stays valid.
const TICKET_TTL: Duration = Duration::from_secs(60);
/// How long one message may take to send before the peer counts as stuck.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How many messages a connection may fall behind before it is resynced.
const HUB_CAPACITY: usize = 4096;
/// How often usage movements are sent: at most twice a second per workspace.
const USAGE_INTERVAL: Duration = Duration::from_millis(500);
/// The largest message (and frame) a client may send. Clients only send
/// pings and subscriptions, a few hundred bytes; a larger message closes the
/// connection with 1009 (message too big) before it is buffered whole.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// How many tickets may be live at once on this instance. Beyond it the
/// oldest go: a client redeems its ticket within moments of getting it, so
/// only a flood of issues, not a real client, loses one.
pub const MAX_LIVE_TICKETS: usize = 10_000;

/// Single-use tickets that let a browser open the WebSocket without putting
/// a key in the URL. With several instances behind a load balancer, the
/// ticket and the socket may reach different instances, so tickets are also
/// kept in Redis, where redeeming one takes it for good (and which expires
/// them by itself).
///
/// At most [`MAX_LIVE_TICKETS`] are kept here, and of those this instance
/// issued, in Redis. They all live for the same [`TICKET_TTL`], so the order
/// of issue is the order of expiry: a queue in that order gives the expired
/// and the oldest from its front, in constant time per ticket issued. The
/// oldest dropped to make room leave Redis in the call that stores the new
/// one.
#[derive(Default)]
pub struct Tickets {
    live: Mutex<LiveTickets>,
    shared: Option<SingleUse>,
}

#[derive(Default)]
struct LiveTickets {
    by_ticket: HashMap<String, Issued>,
    /// Every ticket in `by_ticket`, oldest first, with its expiry; also
    /// those redeemed since, until they reach the front.
    by_age: VecDeque<(Timestamp, String)>,
}

impl LiveTickets {
    /// Drops the expired tickets, and the oldest while there is no room for
    /// one more. Answers the Redis names of those dropped before their time
    /// that Redis also holds (Redis expires the others by itself).
    fn make_room(&mut self, now: Timestamp) -> Vec<String> {
        let mut evicted = Vec::new();
        while let Some(&(expires_at, _)) = self.by_age.front() {
            let expired = expires_at <= now;
            if !expired && self.by_age.len() < MAX_LIVE_TICKETS {
                break;
            }
            let Some((_, ticket)) = self.by_age.pop_front() else {
                break;
            };
            let dropped = self.by_ticket.remove(&ticket);
            if !expired && dropped.is_some_and(|issued| issued.shared) {
                evicted.push(ticket_name(&ticket));
            }
        }
        evicted
    }
}

struct Issued {
    credential: Credential,
    expires_at: Timestamp,
    /// Also stored in Redis: redeeming it there decides single use.
    shared: bool,
}

impl Tickets {
    pub fn new(shared: Option<SingleUse>) -> Self {
        Self {
            live: Mutex::default(),
            shared,
        }
    }

    /// Issues a ticket standing for `credential`.
    pub async fn issue(&self, credential: Credential, now: Timestamp) -> (String, Timestamp) {
        let bytes: [u8; 24] = rand::random();
        let ticket = format!(
            "wst_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        let expires_at = now.plus(TICKET_TTL);
        // Room is made first, so that the tickets dropped here leave Redis
        // in the same call that stores the new one.
        let evicted = lock(&self.live).make_room(now);
        let shared = match &self.shared {
            Some(shared) => shared
                .put(
                    &ticket_name(&ticket),
                    &credential.to_stored(),
                    TICKET_TTL,
                    &evicted,
                )
                .await
                .is_ok(),
            None => false,
        };
        let mut live = lock(&self.live);
        let entry = Issued {
            credential,
            expires_at,
            shared,
        };
        live.by_ticket.insert(ticket.clone(), entry);
        live.by_age.push_back((expires_at, ticket.clone()));
        (ticket, expires_at)
    }

    /// Redeems a ticket for the credential it stands for; it cannot be used
    /// again, on this instance or another.
    pub async fn redeem(&self, ticket: &str, now: Timestamp) -> Option<Credential> {
        let local = lock(&self.live)
            .by_ticket
            .remove(ticket)
            .filter(|issued| issued.expires_at > now);
        let Some(shared) = &self.shared else {
            return local.map(|issued| issued.credential);
        };
        match shared.take(&ticket_name(ticket)).await {
            // Redis expires tickets by itself.
            Ok(Some(stored)) => Credential::from_stored(&stored),
            // Used elsewhere, or never stored there.
            Ok(None) => local
                .filter(|issued| !issued.shared)
                .map(|issued| issued.credential),
            // Redis unreachable: this instance's own tickets still work.
            Err(_) => local.map(|issued| issued.credential),
        }
    }
}

fn ticket_name(ticket: &str) -> String {
    format!("ticket:{ticket}")
}

/// The open connections of each key on this instance, capped, so that one
/// key cannot hold the server's sockets and tasks.
pub struct Connections {
    max_per_key: usize,
    open: Mutex<HashMap<KeyHash, usize>>,
}

/// One connection's place under its key's cap, given back when dropped.
pub struct ConnectionSlot {
    connections: Arc<Connections>,
    credential: KeyHash,
}

impl Connections {
    pub fn new(max_per_key: usize) -> Arc<Self> {
        Arc::new(Self {
            max_per_key,
            open: Mutex::default(),
        })
    }

    /// A slot for one more connection of `credential`, unless it has all it
    /// may have.
    pub fn acquire(self: &Arc<Self>, credential: KeyHash) -> Result<ConnectionSlot, ApiError> {
        let mut open = lock(&self.open);
        let count = open.entry(credential).or_default();
        if *count >= self.max_per_key {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "too_many_connections",
                format!(
                    "this key already has {} open WebSocket connections, the most allowed \
                     (QUOTAWATCH_WS_MAX_CONNECTIONS_PER_KEY); close one first",
                    self.max_per_key
                ),
            ));
        }
        *count += 1;
        Ok(ConnectionSlot {
            connections: self.clone(),
            credential,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.connections.open);
        if let Some(count) = open.get_mut(&self.credential) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.credential);
            }
        }
    }
}

/// A message ready to send, and whom it concerns (`None`: everybody).
#[derive(Clone, Debug)]
pub enum Wire {
    Message {
        workspace: Option<WorkspaceId>,
        /// Only for connections of the admin key.
        operators_only: bool,
        text: Utf8Bytes,
    },
    /// The hub itself fell behind: every connection resynchronises.
    Resync,
    /// Keys changed: every connection checks that its key still counts.
    Recheck,
}

/// Fans engine events out to WebSocket connections, serialised once.
#[derive(Clone)]
pub struct Hub {
    sender: broadcast::Sender<Wire>,
    /// Set when the server shuts down. A watch rather than a broadcast
    /// message, so that a client that fell behind cannot miss it.
    closing: tokio::sync::watch::Sender<bool>,
    /// Signalled when someone subscribes, so that the usage updates, which
    /// stop while nobody listens, start again.
    subscribed: Arc<tokio::sync::Notify>,
}

fn to_text(message: &ServerMessage<'_>) -> Utf8Bytes {
    serde_json::to_string(message).unwrap_or_default().into()
}

/// What listeners are sent of `event`: one message, or, for a credential's
/// notification, one for the listeners of each workspace billed to it.
fn event_wires(event: &Event) -> Vec<Wire> {
    match event {
        Event::Status(snapshot) | Event::Usage(snapshot) => {
            let doc = StatusDoc::from(snapshot.as_ref());
            let workspace = snapshot.config.id.as_str();
            let message = match event {
                Event::Usage(_) => ServerMessage::Usage {
                    workspace,
                    data: &doc,
                },
                _ => ServerMessage::Status {
                    workspace,
                    data: &doc,
                    resync: false,
                },
            };
            vec![Wire::Message {
                workspace: Some(snapshot.config.id.clone()),
                operators_only: false,
                text: to_text(&message),
            }]
        }
        Event::Notification(notification) => {
            vec![notification_wire(
                notification,
                notification.workspace.as_ref(),
            )]
        }
        Event::CredentialNotification(notification, workspaces) => workspaces
            .iter()
            .map(|workspace| notification_wire(notification, Some(workspace)))
            .collect(),
        Event::Removed(id) => vec![Wire::Message {
            workspace: Some(id.clone()),
            operators_only: false,
            text: to_text(&ServerMessage::Removed {
                workspace: id.as_str(),
            }),
        }],
        Event::CredentialsChanged => vec![Wire::Recheck],
    }
}

/// A notification's message, for the listeners of `workspace` (`None`:
/// everybody).
fn notification_wire(notification: &Notification, workspace: Option<&WorkspaceId>) -> Wire {
    let doc = NotificationDoc::from(notification);
    let message = ServerMessage::Notification {
        workspace: workspace.map(WorkspaceId::as_str),
        event: if notification.is_active() {
            "raised"
        } else {
            "resolved"
        },
        data: &doc,
    };
    Wire::Message {
        workspace: workspace.cloned(),
        operators_only: notification.kind.for_operators_only(),
        text: to_text(&message),
    }
}

impl Hub {
    /// Starts the hub. It also drives the usage updates, and only while
    /// someone is connected: nobody pays for snapshots nobody reads.
    pub fn spawn(engine: Arc<Engine>) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, _) = broadcast::channel(HUB_CAPACITY);
        let hub = Self {
            sender,
            closing: tokio::sync::watch::Sender::new(false),
            subscribed: Arc::new(tokio::sync::Notify::new()),
        };
        let mut events = engine.subscribe();
        let out = hub.sender.clone();
        let subscribed = hub.subscribed.clone();
        let task = tokio::spawn(async move {
            let mut usage = tokio::time::interval(USAGE_INTERVAL);
            usage.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // The interval stops while nobody listens: an idle server
                // is not woken twice a second for nothing.
                let listened = out.receiver_count() > 0;
                let wires = tokio::select! {
                    event = events.recv() => match event {
                        Ok(event) => event_wires(&event),
                        Err(broadcast::error::RecvError::Lagged(_)) => vec![Wire::Resync],
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = usage.tick(), if listened => {
                        if out.receiver_count() > 0 {
                            engine.publish_usage();
                        }
                        continue;
                    }
                    () = subscribed.notified(), if !listened => continue,
                };
                for wire in wires {
                    let _ = out.send(wire);
                }
            }
        });
        (hub, task)
    }

    fn subscribe(&self) -> broadcast::Receiver<Wire> {
        let receiver = self.sender.subscribe();
        self.subscribed.notify_one();
        receiver
    }

    /// Closes every connection (1001, going away): the server is stopping,
    /// and upgraded connections outlive the HTTP server's graceful shutdown.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }
}

/// Which workspaces a connection follows.
enum Subscription {
    All,
    Some(HashSet<WorkspaceId>),
}

impl Subscription {
    fn wants(&self, workspace: Option<&WorkspaceId>) -> bool {
        match (self, workspace) {
            (_, None) | (Subscription::All, _) => true,
            (Subscription::Some(set), Some(id)) => set.contains(id),
        }
    }

    fn workspaces(&self, engine: &Engine) -> Vec<WorkspaceId> {
        match self {
            Subscription::All => engine.workspace_ids(),
            Subscription::Some(set) => {
                let mut ids: Vec<WorkspaceId> = set.iter().cloned().collect();
                ids.sort();
                ids
            }
        }
    }
}

#[derive(Deserialize, IntoParams, Debug)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    /// A ticket from `POST /api/quota/ws-ticket`, for clients that cannot
    /// set headers (browsers).
    pub ticket: Option<String>,
    /// Admin only: follow one workspace instead of all.
    pub workspace: Option<String>,
}

/// `WebSocketUpgrade`, answering a plain HTTP request with this API's error
/// shape.
pub struct Upgrade(WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(Upgrade)
            .map_err(|rejection| {
                ApiError::bad_request(
                    "websocket_required",
                    format!("this endpoint speaks WebSocket: {}", rejection.body_text()),
                )
            })
    }
}

/// Browsers send `Origin` with every WebSocket handshake and, unlike for
/// `fetch`, apply no CORS rule to it: the server must. A page may connect
/// from the server's own origin (the dashboard) or a listed one; clients
/// that are not browsers send no `Origin` and are not concerned.
fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("").to_ascii_lowercase();
    let own = headers
        .get(axum::http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .is_some_and(|host| {
            let host = host.to_ascii_lowercase();
            origin == format!("http://{host}") || origin == format!("https://{host}")
        });
    if own || allowed.contains(&origin) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "pages of the origin {origin:?} may not open quotawatch's WebSocket; an operator can list it in QUOTAWATCH_CORS_ORIGINS"
        )))
    }
}

#[utoipa::path(get, path = "/api/quota/ws", tag = "quota",
    params(WsQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol (see README for messages)"),
        (status = 400, description = "Not a WebSocket request", body = super::dto::ErrorBody),
        (status = 401, description = "Missing or invalid key or ticket", body = super::dto::ErrorBody),
        (status = 403, description = "The key lacks the `read` scope", body = super::dto::ErrorBody),
        (status = 404, description = "Unknown workspace", body = super::dto::ErrorBody),
        (status = 429, description = "The key has as many open connections as allowed", body = super::dto::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn connect(
    State(state): State<AppState>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    upgrade: Result<Upgrade, ApiError>,
) -> Result<Response, ApiError> {
    // A page of another origin is kept out as the browser keeps it out of
    // the REST API (before a ticket is spent).
    check_origin(&headers, &state.cors_origins)?;
    // Authentication first: an unauthenticated caller learns nothing else.
    let (auth, credential) = match query.ticket.as_deref() {
        Some(ticket) => {
            let redeemed = state.tickets.redeem(ticket, state.engine.now()).await;
            let credential = redeemed.ok_or_else(|| {
                ApiError::unauthorized(
                    "invalid_ticket",
                    "the ticket is unknown, used or expired; get a new one from POST /api/quota/ws-ticket",
                )
            })?;
            let principal = state
                .engine
                .find_principal(&credential)
                .await
                .map_err(credential_refused)?;
            (Auth::new(principal), credential)
        }
        None => {
            let auth = Auth::of(&headers, &state.engine).await?;
            let presented = crate::edge::auth::bearer(&headers).unwrap_or_default();
            (auth, Credential::of(presented))
        }
    };
    let subscription = match auth
        .target(&state.engine, query.workspace.as_deref(), Scope::Read)
        .await?
    {
        Target::One(id) => Subscription::Some(HashSet::from([id])),
        Target::All => Subscription::All,
    };
    let Upgrade(upgrade) = upgrade?;
    let slot = state.ws_connections.acquire(credential.hash())?;
    let upgrade = upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES);
    Ok(upgrade.on_upgrade(move |socket| async move {
        Connection {
            state,
            principal: auth.principal,
            credential,
            subscription,
        }
        .run(socket)
        .await;
        drop(slot);
    }))
}

/// Whether a message about `workspace` (`None`: service-wide) goes to a
/// connection of `principal` following `subscription`: one it follows, and
/// a message for operators only to the admin key.
fn delivers(
    principal: &Principal,
    subscription: &Subscription,
    workspace: Option<&WorkspaceId>,
    operators_only: bool,
) -> bool {
    (!operators_only || *principal == Principal::Admin) && subscription.wants(workspace)
}

struct Connection {
    state: AppState,
    principal: Principal,
    /// The key or token the connection was opened with, checked again
    /// whenever keys change and at every ping (a token expires).
    credential: Credential,
    subscription: Subscription,
}

/// The connection ended (the peer left, stalled, or broke the protocol).
struct Gone;

impl Connection {
    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        // Subscribe before the first snapshot so that no change between the
        // two is missed.
        let mut wire = self.state.hub.subscribe();
        let mut closing = self.state.hub.closing.subscribe();
        let interval = self.state.ws_ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        let mut last_heard = Instant::now();
        if self.send_snapshots(&mut sink, false).await.is_err() {
            return;
        }
        loop {
            let step = tokio::select! {
                inbound = stream.next() => match inbound {
                    Some(Ok(message)) => {
                        last_heard = Instant::now();
                        self.handle(message, &mut sink).await
                    }
                    Some(Err(error)) => {
                        if is_too_big(error) {
                            let _ = send(&mut sink, too_big()).await;
                        }
                        Err(Gone)
                    }
                    None => Err(Gone),
                },
                outbound = wire.recv() => match outbound {
                    Ok(Wire::Message { workspace, operators_only, text }) => {
                        if delivers(&self.principal, &self.subscription, workspace.as_ref(), operators_only) {
                            send(&mut sink, Message::Text(text)).await
                        } else {
                            Ok(())
                        }
                    }
                    Ok(Wire::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.send_snapshots(&mut sink, true).await
                    }
                    Ok(Wire::Recheck) => self.recheck(&mut sink).await,
                    Err(broadcast::error::RecvError::Closed) => Err(Gone),
                },
                // The flag only ever turns on, so any change means closing.
                _ = closing.changed() => {
                    // 1001, going away: clients reconnect, to this server
                    // once it is back or to another replica.
                    let close = axum::extract::ws::CloseFrame {
                        code: axum::extract::ws::close_code::AWAY,
                        reason: "quotawatch is shutting down".into(),
                    };
                    let _ = send(&mut sink, Message::Close(Some(close))).await;
                    Err(Gone)
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > interval * 2 {
                        tracing::debug!("closing a WebSocket peer that stopped answering pings");
                        let _ = send(&mut sink, Message::Close(None)).await;
                        Err(Gone)
                    } else {
                        match self.recheck(&mut sink).await {
                            Ok(()) => send(&mut sink, Message::Ping(Default::default())).await,
                            gone => gone,
                        }
                    }
                }
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn handle(
        &mut self,
        message: Message,
        sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    ) -> Result<(), Gone> {
        let text = match message {
            Message::Text(text) => text,
            Message::Close(_) => return Err(Gone),
            _ => return Ok(()),
        };
        match serde_json::from_str::<ClientMessage>(&text) {
            Ok(ClientMessage::Ping) => {
                let ts = self.state.engine.now().millis();
                send(sink, Message::Text(to_text(&ServerMessage::Pong { ts }))).await
            }
            Ok(ClientMessage::Subscribe { workspaces }) => self.subscribe(workspaces, sink).await,
            Err(error) => {
                let message = format!(
                    "unknown message ({error}); send {{\"type\":\"ping\"}} or {{\"type\":\"subscribe\",\"workspaces\":[...]}}"
                );
                send(
                    sink,
                    Message::Text(to_text(&ServerMessage::Error { message: &message })),
                )
                .await
            }
        }
    }

    async fn subscribe(
        &mut self,
        target: SubscribeTarget,
        sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    ) -> Result<(), Gone> {
        let error = |message: &str| Message::Text(to_text(&ServerMessage::Error { message }));
        if self.principal != Principal::Admin {
            return send(sink, error("only the admin key can change subscriptions")).await;
        }
        let subscription = match target {
            SubscribeTarget::All(star) if star == "*" => Subscription::All,
            SubscribeTarget::All(other) => {
                return send(
                    sink,
                    error(&format!(
                        "{other:?} is neither \"*\" nor a list of workspace ids"
                    )),
                )
                .await;
            }
            SubscribeTarget::Some(names) => {
                let mut set = HashSet::new();
                for name in names {
                    match name.parse::<WorkspaceId>() {
                        Ok(id) if self.state.engine.contains(&id) => {
                            set.insert(id);
                        }
                        _ => {
                            return send(
                                sink,
                                error(&format!("workspace {name:?} does not exist")),
                            )
                            .await;
                        }
                    }
                }
                Subscription::Some(set)
            }
        };
        self.subscription = subscription;
        let ids = self.subscription.workspaces(&self.state.engine);
        let names: Vec<&str> = ids.iter().map(WorkspaceId::as_str).collect();
        send(
            sink,
            Message::Text(to_text(&ServerMessage::Subscribed { workspaces: names })),
        )
        .await?;
        self.send_snapshots(sink, false).await
    }

    /// Ends the connection if its key was revoked (or its workspace deleted).
    async fn recheck(
        &mut self,
        sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    ) -> Result<(), Gone> {
        let message = match self.state.engine.authenticate_known(&self.credential) {
            Ok(principal) if principal == self.principal && self.workspace_exists() => {
                return Ok(());
            }
            Err(AuthError::Expired) => {
                "this connection's key or token expired; reconnect with a new one"
            }
            Ok(_) | Err(AuthError::Unknown) => {
                "this connection's key was revoked or its workspace deleted"
            }
        };
        let _ = send(
            sink,
            Message::Text(to_text(&ServerMessage::Error { message })),
        )
        .await;
        // 1008, policy violation: tells clients that reconnecting with the
        // same key is pointless.
        let close = axum::extract::ws::CloseFrame {
            code: axum::extract::ws::close_code::POLICY,
            reason: "credential no longer valid".into(),
        };
        let _ = send(sink, Message::Close(Some(close))).await;
        Err(Gone)
    }

    /// Whether the workspace of a workspace principal still exists (a
    /// browser token outlives its workspace's deletion).
    fn workspace_exists(&self) -> bool {
        match &self.principal {
            Principal::Workspace { workspace, .. } => self.state.engine.contains(workspace),
            Principal::Admin | Principal::Service { .. } => true,
        }
    }

    /// Sends the current status of every followed workspace.
    async fn send_snapshots(
        &self,
        sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
        resync: bool,
    ) -> Result<(), Gone> {
        for id in self.subscription.workspaces(&self.state.engine) {
            let Ok(snapshot) = self.state.engine.snapshot(&id) else {
                continue;
            };
            let doc = StatusDoc::from(&snapshot);
            let message = ServerMessage::Status {
                workspace: id.as_str(),
                data: &doc,
                resync,
            };
            send(sink, Message::Text(to_text(&message))).await?;
        }
        Ok(())
    }
}

/// 1009, message too big: tells the client why, so that it does not retry
/// the same message.
fn too_big() -> Message {
    Message::Close(Some(axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::SIZE,
        reason: format!("messages are limited to {MAX_MESSAGE_BYTES} bytes").into(),
    }))
}

/// Whether a read failed because the peer sent more than
/// [`MAX_MESSAGE_BYTES`].
fn is_too_big(error: axum::Error) -> bool {
    matches!(
        error.into_inner().downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}

async fn send(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    message: Message,
) -> Result<(), Gone> {
    match tokio::time::timeout(SEND_TIMEOUT, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Gone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_messages_reach_the_admin_key_alone() {
        let acme: WorkspaceId = "acme".parse().expect("id");
        let tenant = Principal::Workspace {
            workspace: acme.clone(),
            scopes: crate::keys::Scopes::READ,
        };
        let own = Subscription::Some(HashSet::from([acme.clone()]));
        assert!(delivers(&tenant, &own, Some(&acme), false));
        assert!(delivers(&tenant, &own, None, false), "service-wide news");
        assert!(!delivers(&tenant, &own, None, true), "operators' news");
        assert!(delivers(&Principal::Admin, &Subscription::All, None, true));
        let beta: WorkspaceId = "beta".parse().expect("id");
        assert!(!delivers(&tenant, &own, Some(&beta), false));
    }

    #[tokio::test]
    async fn tickets_are_single_use_and_expire() {
        let tickets = Tickets::default();
        let now = Timestamp::from_millis(1_000_000);
        let credential = Credential::Key(KeyHash::of("qw_some_key"));
        let (ticket, expires_at) = tickets.issue(credential.clone(), now).await;
        assert_eq!(expires_at, now.plus(TICKET_TTL));
        assert_eq!(tickets.redeem(&ticket, now).await, Some(credential.clone()));
        assert_eq!(tickets.redeem(&ticket, now).await, None, "single use");

        let (ticket, _) = tickets.issue(credential.clone(), now).await;
        assert_eq!(
            tickets.redeem(&ticket, now.plus(TICKET_TTL)).await,
            None,
            "expired"
        );
        assert_eq!(tickets.redeem("wst_made_up", now).await, None);
    }

    #[tokio::test]
    async fn a_flood_of_tickets_keeps_the_store_bounded_and_the_newest_valid() {
        let tickets = Tickets::default();
        let now = Timestamp::from_millis(1_000_000);
        let credential = Credential::Key(KeyHash::of("qw_some_key"));
        let (first, _) = tickets.issue(credential.clone(), now).await;
        let mut last = String::new();
        for _ in 0..MAX_LIVE_TICKETS + 500 {
            last = tickets.issue(credential.clone(), now).await.0;
            let live = lock(&tickets.live);
            assert!(live.by_age.len() <= MAX_LIVE_TICKETS);
            assert!(live.by_ticket.len() <= live.by_age.len());
        }
        assert_eq!(tickets.redeem(&first, now).await, None, "the oldest went");
        assert_eq!(tickets.redeem(&last, now).await, Some(credential.clone()));

        // Once they expire, the next issue drops them all.
        let later = now.plus(TICKET_TTL);
        let (fresh, _) = tickets.issue(credential.clone(), later).await;
        assert_eq!(lock(&tickets.live).by_ticket.len(), 1);
        assert_eq!(
            tickets.redeem(&fresh, later).await,
            Some(credential.clone())
        );
    }
}
