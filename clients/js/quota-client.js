// quota-client.js — a browser (and Node 22+) client for quotawatch.
//
// It reads a workspace's status and notifications over the REST API and
// follows them live over the WebSocket, the way the dashboard does:
//
//   const monitor = new QuotaMonitor({ baseUrl: "https://quota.example.com", token });
//   monitor.on("status", ({ workspace, data }) => render(workspace, data));
//   monitor.subscribe();
//
// The key is sent only in the Authorization header: the WebSocket is opened
// with a single-use ticket, so the key never appears in a URL. Instead of a
// fixed key, the app may pass `getToken`, a function that fetches a
// short-lived browser token from its own backend: it is called for the
// first token, before the token expires, and when the server answers 401
// (the request is then sent once more with the new token). The
// connection is kept alive with pings, re-opened with exponential back-off
// and jitter when it drops, and resynchronised from fresh snapshots after
// every reconnect, since messages may have been missed while it was down.
//
// Events (`monitor.on(type, listener)` or `addEventListener(type, e => e.detail)`):
// - `status`: `{workspace, data, reason}` with the full status document;
//   `reason` is `snapshot` (on connect and resync), `change` (status,
//   reset or settings) or `usage` (usage moved; at most twice a second).
// - `notification`: `{workspace, event, data}` with `event` `raised` or
//   `resolved`, or `{workspace, event: "snapshot", notifications}` after
//   every (re)connect, listing the active ones.
// - `removed`: `{workspace}` when a workspace is deleted.
// - `connection`: `{state, attempt?, delayMs?, error?}` with `state`
//   `connecting`, `open`, `reconnecting` or `closed`.

const DEFAULT_HEARTBEAT_MS = 15_000;
const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 30_000 };
// A token that expires within this time is renewed before it is used, so
// that a request does not set out with a token that lapses on its way.
const RENEW_BEFORE_EXPIRY_MS = 30_000;
// The 401 codes a new token can cure: an expired token, or one revoked
// with the service key that minted it.
const RENEWABLE_CODES = new Set(["expired_api_key", "invalid_api_key"]);

/** An error answer of the quotawatch API, with its status and error code. */
export class QuotaApiError extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : {};
    super(error.message || `quotawatch answered HTTP ${status}`);
    this.name = "QuotaApiError";
    this.status = status;
    this.code = error.code || null;
    this.type = error.type || null;
  }
}

/** The delay before reconnect attempt `attempt` (1, 2, ...): exponential,
 * capped, with full jitter so that many clients do not reconnect at once. */
export function backoffDelay(attempt, { initialMs, maxMs }, random = Math.random) {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/** What a status document's calendar `period` (`"today"`, `"this_month"`)
 * spent on each model, most first: `[{model, usd, share}]`, `share` being
 * the model's part of what the models listed spent (0 to 1). Empty when
 * nothing was spent or the document has no `spend`. */
export function spendByModel(status, period = "this_month") {
  const byModel = status?.spend?.[period]?.by_model ?? {};
  const rows = Object.entries(byModel).map(([model, spent]) => ({ model, usd: spent.usd }));
  const total = rows.reduce((sum, row) => sum + row.usd, 0);
  return rows
    .map((row) => ({ ...row, share: total > 0 ? row.usd / total : 0 }))
    .sort((a, b) => b.usd - a.usd || a.model.localeCompare(b.model));
}

/** `url` (http, https, ws or wss) as the base of a WebSocket URL, without a
 * trailing slash. */
function webSocketBase(url) {
  const parsed = new URL(url);
  if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  return parsed.toString().replace(/\/+$/, "");
}

export class QuotaMonitor extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.baseUrl where quotawatch listens, e.g. `https://quota.example.com`
   * @param {string} [options.wsUrl] where its WebSocket listens, when not at `baseUrl`
   * @param {string} [options.token] a workspace key, a browser token, or the admin key
   * @param {() => Promise<string | {token: string, expiresAt?: string | number | Date}>} [options.getToken]
   *   fetches a fresh token from the app's backend, with its expiry when known
   * @param {string} [options.workspace] with the admin key: the one workspace to follow
   */
  constructor({
    baseUrl,
    wsUrl,
    token,
    getToken,
    workspace,
    heartbeatMs = DEFAULT_HEARTBEAT_MS,
    backoff = DEFAULT_BACKOFF,
    fetch: fetchImpl = globalThis.fetch?.bind(globalThis),
    WebSocket: WebSocketImpl = globalThis.WebSocket,
  }) {
    super();
    if (!baseUrl) throw new TypeError("QuotaMonitor needs a baseUrl");
    if (!token && typeof getToken !== "function") {
      throw new TypeError("QuotaMonitor needs a token or a getToken function");
    }
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.wsUrl = webSocketBase(wsUrl || this.baseUrl);
    this.workspace = workspace || null;
    this.heartbeatMs = heartbeatMs;
    this.backoff = { ...DEFAULT_BACKOFF, ...backoff };
    this.connected = false;
    // The key stays in a private field, out of reach of serialisation and logging.
    this.#token = token || null;
    this.#getToken = getToken || null;
    this.#fetch = fetchImpl;
    this.#WebSocket = WebSocketImpl;
  }

  #token;
  #tokenExpiresAt = null;
  #getToken;
  #renewal = null;
  #fetch;
  #WebSocket;
  #socket = null;
  #wanted = false;
  #attempt = 0;
  #reconnectTimer = null;
  #heartbeatTimer = null;
  #lastHeard = 0;
  #listeners = new Set();

  /** GET /api/quota/status: one status document, or for the admin key
   * without a workspace, `{workspaces: [...]}`. */
  getStatus() {
    return this.#get("/api/quota/status");
  }

  /** GET /api/quota/notifications: `{workspace, status, notifications}`
   * (for the admin key without a workspace, `{workspaces: [...]}` of
   * those); `{history: true}` includes resolved ones. */
  getNotifications({ history = false } = {}) {
    return this.#get("/api/quota/notifications", history ? { include: "history" } : {});
  }

  /** Listens to one event type; returns a function that stops listening. */
  on(type, listener) {
    const handler = (event) => listener(event.detail);
    this.addEventListener(type, handler);
    return () => this.removeEventListener(type, handler);
  }

  /** Follows live updates; `listener`, if given, receives every event as
   * `{type, ...detail}`. Opens the connection on first use. Returns a
   * function that stops this listener (the connection stays until close()). */
  subscribe(listener) {
    if (typeof this.#WebSocket !== "function") {
      // Node.js before 22 has no WebSocket of its own.
      throw new TypeError(
        "QuotaMonitor needs a WebSocket implementation to follow live updates: " +
          "this runtime has none, so pass one, e.g. " +
          'new QuotaMonitor({ baseUrl, token, WebSocket: (await import("ws")).WebSocket })',
      );
    }
    if (listener) this.#listeners.add(listener);
    if (!this.#wanted) {
      this.#wanted = true;
      this.#connect();
    }
    return () => this.#listeners.delete(listener);
  }

  /** Closes the connection for good and stops reconnecting. */
  close() {
    this.#wanted = false;
    clearTimeout(this.#reconnectTimer);
    this.#stopHeartbeat();
    const socket = this.#socket;
    this.#socket = null;
    if (socket) socket.close(1000, "closed by the client");
    this.connected = false;
    this.#emit("connection", { state: "closed" });
  }

  async #get(path, query = {}) {
    const params = new URLSearchParams(query);
    if (this.workspace) params.set("workspace", this.workspace);
    const search = params.toString();
    return this.#request("GET", search ? `${path}?${search}` : path);
  }

  async #request(method, path) {
    const token = await this.#usableToken();
    try {
      return await this.#send(method, path, token);
    } catch (error) {
      if (!this.#getToken || !(error instanceof QuotaApiError) || error.status !== 401) throw error;
      if (!RENEWABLE_CODES.has(error.code)) throw error;
      // Once: a token refused right after it was fetched will not get better.
      return this.#send(method, path, await this.#renew(token));
    }
  }

  async #send(method, path, token) {
    const response = await this.#fetch(`${this.baseUrl}${path}`, {
      method,
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new QuotaApiError(response.status, body);
    return body;
  }

  /** The token to send now: the current one, unless there is none yet or
   * it is about to expire and can be renewed. */
  async #usableToken() {
    if (this.#renewal) return this.#renewal;
    const expiring =
      this.#tokenExpiresAt !== null && this.#tokenExpiresAt - Date.now() < RENEW_BEFORE_EXPIRY_MS;
    if (this.#token && !(expiring && this.#getToken)) return this.#token;
    return this.#renew(this.#token);
  }

  /** A token other than `stale`: the one a renewal in progress brings, the
   * one another caller already brought, or a fresh one from `getToken`.
   * Requests refused at the same time thus share one call to the backend. */
  #renew(stale) {
    if (this.#renewal) return this.#renewal;
    if (this.#token && this.#token !== stale) return Promise.resolve(this.#token);
    this.#renewal = this.#fetchToken().finally(() => {
      this.#renewal = null;
    });
    return this.#renewal;
  }

  async #fetchToken() {
    const answer = await this.#getToken();
    const token = typeof answer === "string" ? answer : answer?.token;
    if (typeof token !== "string" || token === "") {
      throw new TypeError("getToken must resolve to a token, or to {token, expiresAt}");
    }
    const expiresAt = typeof answer === "object" ? new Date(answer.expiresAt ?? NaN).getTime() : NaN;
    this.#token = token;
    // Without a readable expiry the token is used until it is refused.
    this.#tokenExpiresAt = Number.isFinite(expiresAt) ? expiresAt : null;
    return token;
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
    for (const listener of this.#listeners) {
      try {
        listener({ type, ...detail });
      } catch (error) {
        // One listener's mistake must not stop the others or the connection.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  async #connect() {
    if (!this.#wanted) return;
    this.#emit("connection", { state: "connecting", attempt: this.#attempt });
    let ticket;
    try {
      ticket = (await this.#request("POST", "/api/quota/ws-ticket")).ticket;
    } catch (error) {
      if (error instanceof QuotaApiError && (error.status === 401 || error.status === 403)) {
        // A wrong or revoked key will not get better by retrying.
        this.#wanted = false;
        this.#emit("connection", { state: "closed", error });
        return;
      }
      this.#scheduleReconnect(error);
      return;
    }
    if (!this.#wanted) return;
    const url = new URL(`${this.wsUrl}/api/quota/ws`);
    url.searchParams.set("ticket", ticket);
    if (this.workspace) url.searchParams.set("workspace", this.workspace);
    const socket = new this.#WebSocket(url.toString());
    this.#socket = socket;
    socket.onopen = () => this.#opened(socket);
    socket.onmessage = (message) => this.#received(socket, message.data);
    socket.onclose = (event) => this.#closed(socket, event);
    // An error is always followed by a close, which does the reconnecting.
    socket.onerror = () => {};
  }

  #opened(socket) {
    if (socket !== this.#socket) return;
    this.#attempt = 0;
    this.connected = true;
    this.#lastHeard = Date.now();
    this.#startHeartbeat(socket);
    this.#emit("connection", { state: "open" });
    this.#resync();
  }

  /** After every (re)connect: the server sends each followed workspace's
   * status at once; the active notifications are fetched here, since
   * raised or resolved ones may have been missed. */
  async #resync() {
    try {
      const answer = await this.getNotifications();
      // The admin key without a workspace gets every workspace's list.
      for (const doc of answer.workspaces ?? [answer]) {
        this.#emit("notification", {
          workspace: doc.workspace,
          event: "snapshot",
          notifications: doc.notifications,
        });
      }
    } catch {
      // The next reconnect tries again; live messages keep flowing meanwhile.
    }
  }

  #received(socket, text) {
    if (socket !== this.#socket) return;
    this.#lastHeard = Date.now();
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    switch (message.type) {
      case "status":
        this.#emit("status", {
          workspace: message.workspace,
          data: message.data,
          reason: message.resync ? "snapshot" : "change",
        });
        if (message.resync) this.#resync();
        break;
      case "usage":
        this.#emit("status", { workspace: message.workspace, data: message.data, reason: "usage" });
        break;
      case "notification":
        this.#emit("notification", {
          workspace: message.workspace,
          event: message.event,
          data: message.data,
        });
        break;
      case "removed":
        this.#emit("removed", { workspace: message.workspace });
        break;
      default:
        // pong, subscribed, error: hearing anything is enough for the heartbeat.
        break;
    }
  }

  #closed(socket, event) {
    if (socket !== this.#socket) return;
    this.#socket = null;
    this.#stopHeartbeat();
    this.connected = false;
    // 1008 (policy violation): the key was revoked or expired, or the
    // workspace deleted. A fixed key will not get better; a renewable one
    // is renewed before the next ticket is asked for.
    if (event && event.code === 1008 && this.#getToken) {
      // Counted as expired, the token is renewed before its next use.
      this.#tokenExpiresAt = 0;
      this.#scheduleReconnect(new Error(event.reason || "refused"));
      return;
    }
    if (event && event.code === 1008) {
      this.#wanted = false;
      this.#emit("connection", { state: "closed", error: new Error(event.reason || "refused") });
      return;
    }
    this.#scheduleReconnect();
  }

  #scheduleReconnect(error) {
    if (!this.#wanted) return;
    this.#attempt += 1;
    const delayMs = backoffDelay(this.#attempt, this.backoff);
    this.#emit("connection", { state: "reconnecting", attempt: this.#attempt, delayMs, error });
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = setTimeout(() => this.#connect(), delayMs);
  }

  #startHeartbeat(socket) {
    this.#stopHeartbeat();
    this.#heartbeatTimer = setInterval(() => {
      if (Date.now() - this.#lastHeard > 2 * this.heartbeatMs) {
        // Nothing heard for two intervals: the connection is dead even if
        // the browser has not noticed yet.
        this.#socket = null;
        this.#stopHeartbeat();
        this.connected = false;
        socket.close(4000, "no answer to pings");
        this.#scheduleReconnect(new Error("no answer to pings"));
        return;
      }
      if (socket.readyState === 1) socket.send(JSON.stringify({ type: "ping" }));
    }, this.heartbeatMs);
  }

  #stopHeartbeat() {
    clearInterval(this.#heartbeatTimer);
    this.#heartbeatTimer = null;
  }
}
