import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { QuotaApiError, QuotaMonitor, backoffDelay, spendByModel } from "../quota-client.js";

const TOKEN = "qw_workspace_key_for_tests_0000";

const status = (overrides = {}) => ({
  workspace: "acme",
  name: "Acme",
  status: "normal",
  reasons: [],
  limits: {},
  ...overrides,
});

/** A WebSocket double: records what is sent, lets the test play the server. */
class FakeWebSocket {
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeWebSocket.instances.push(this);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }

  // What the server does:
  open() {
    this.readyState = 1;
    this.onopen?.();
  }

  message(object) {
    this.onmessage?.({ data: JSON.stringify(object) });
  }

  drop(code = 1006, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

/** A fetch double answering like quotawatch, and recording every call. */
function fakeFetch(overrides = {}) {
  const calls = [];
  const answers = {
    "POST /api/quota/ws-ticket": () => [200, { ticket: `wst_${calls.length}`, expires_at: "later" }],
    "GET /api/quota/status": () => [200, status()],
    "GET /api/quota/notifications": () => [200, { workspace: "acme", status: "normal", notifications: [] }],
    ...overrides,
  };
  const fetch = vi.fn(async (url, init) => {
    const parsed = new URL(url);
    calls.push({ method: init.method, path: parsed.pathname, query: parsed.search, headers: init.headers });
    const answer = answers[`${init.method} ${parsed.pathname}`];
    const [code, body] = answer
      ? answer(init.headers.Authorization.replace(/^Bearer /, ""))
      : [404, { error: { message: "no route", code: "unknown_route" } }];
    return { ok: code < 400, status: code, json: async () => body };
  });
  return { fetch, calls };
}

function monitor(fetch, options = {}) {
  return new QuotaMonitor({
    baseUrl: "http://quota.test/",
    token: TOKEN,
    fetch,
    WebSocket: FakeWebSocket,
    heartbeatMs: 1000,
    backoff: { initialMs: 100, maxMs: 1000 },
    ...options,
  });
}

/** Lets pending promise callbacks (fetches) run. */
const settle = () => vi.advanceTimersByTimeAsync(0);

beforeEach(() => {
  FakeWebSocket.instances = [];
  vi.useFakeTimers();
});

afterEach(() => {
  vi.useRealTimers();
});

describe("REST calls", () => {
  it("send the key only in the Authorization header", async () => {
    const { fetch, calls } = fakeFetch();
    const doc = await monitor(fetch).getStatus();
    expect(doc.workspace).toBe("acme");
    expect(calls[0].headers.Authorization).toBe(`Bearer ${TOKEN}`);
    expect(calls[0].query).not.toContain(TOKEN);
  });

  it("name the workspace for the admin key, and ask for history when told", async () => {
    const { fetch, calls } = fakeFetch();
    await monitor(fetch, { workspace: "beta" }).getNotifications({ history: true });
    const query = new URLSearchParams(calls[0].query);
    expect(query.get("workspace")).toBe("beta");
    expect(query.get("include")).toBe("history");
  });

  it("turn error answers into QuotaApiError with the API's code and message", async () => {
    const { fetch } = fakeFetch({
      "GET /api/quota/status": () => [
        401,
        {
          error: { message: "the key is not valid", type: "invalid_request_error", code: "invalid_api_key" },
        },
      ],
    });
    const error = await monitor(fetch)
      .getStatus()
      .catch((problem) => problem);
    expect(error).toBeInstanceOf(QuotaApiError);
    expect(error.status).toBe(401);
    expect(error.code).toBe("invalid_api_key");
    expect(error.message).toBe("the key is not valid");
  });
});

describe("live updates", () => {
  it("say plainly that a runtime without WebSocket needs one passed in", () => {
    const { fetch } = fakeFetch();
    const quota = new QuotaMonitor({ baseUrl: "http://qw", token: TOKEN, fetch, WebSocket: null });
    expect(() => quota.subscribe()).toThrow(/needs a WebSocket implementation/);
  });

  it("connect with a ticket, never the key, and pass events on", async () => {
    const { fetch } = fakeFetch();
    const quota = monitor(fetch);
    const events = [];
    quota.subscribe((event) => events.push(event));
    await settle();
    const socket = FakeWebSocket.instances[0];
    expect(socket.url).toMatch(/^ws:\/\/quota\.test\/api\/quota\/ws\?ticket=wst_/);
    expect(socket.url).not.toContain(TOKEN);
    socket.open();
    await settle();
    expect(quota.connected).toBe(true);
    socket.message({ type: "status", workspace: "acme", data: status({ status: "warning" }) });
    socket.message({ type: "usage", workspace: "acme", data: status({ status: "warning" }) });
    socket.message({ type: "notification", workspace: "acme", event: "raised", data: { id: "ntf_1" } });
    socket.message({ type: "removed", workspace: "acme" });
    const kinds = events.map((event) => `${event.type}:${event.reason ?? event.event ?? event.state ?? ""}`);
    expect(kinds).toEqual([
      "connection:connecting",
      "connection:open",
      "notification:snapshot",
      "status:change",
      "status:usage",
      "notification:raised",
      "removed:",
    ]);
  });

  it("ping on a heartbeat and reopen a connection that stopped answering", async () => {
    const { fetch } = fakeFetch();
    const quota = monitor(fetch);
    quota.subscribe();
    await settle();
    const first = FakeWebSocket.instances[0];
    first.open();
    await vi.advanceTimersByTimeAsync(1000);
    expect(first.sent).toContainEqual({ type: "ping" });
    first.message({ type: "pong", ts: 1 });
    await vi.advanceTimersByTimeAsync(1000);
    expect(first.closedWith).toBeNull();
    // Silence for more than two intervals: the connection counts as dead.
    await vi.advanceTimersByTimeAsync(2500);
    expect(first.closedWith?.code).toBe(4000);
    expect(quota.connected).toBe(false);
    await vi.advanceTimersByTimeAsync(1000);
    expect(FakeWebSocket.instances.length).toBe(2);
  });

  it("reconnect with growing delays and resync from fresh snapshots", async () => {
    let notificationFetches = 0;
    const { fetch } = fakeFetch({
      "GET /api/quota/notifications": () => {
        notificationFetches += 1;
        return [
          200,
          { workspace: "acme", status: "normal", notifications: [{ id: `ntf_${notificationFetches}` }] },
        ];
      },
    });
    const quota = monitor(fetch);
    const delays = [];
    const snapshots = [];
    quota.on("connection", (event) => event.state === "reconnecting" && delays.push(event.delayMs));
    quota.on(
      "notification",
      (event) => event.event === "snapshot" && snapshots.push(event.notifications[0].id),
    );
    quota.subscribe();
    await settle();
    FakeWebSocket.instances[0].open();
    await settle();
    for (let attempt = 0; attempt < 3; attempt += 1) {
      FakeWebSocket.instances.at(-1).drop();
      await vi.advanceTimersByTimeAsync(1000);
    }
    expect(delays.length).toBe(3);
    expect(delays[0]).toBeGreaterThanOrEqual(50);
    expect(delays[0]).toBeLessThanOrEqual(100);
    expect(delays[2]).toBeGreaterThanOrEqual(200);
    expect(delays[2]).toBeLessThanOrEqual(400);
    FakeWebSocket.instances.at(-1).open();
    await settle();
    expect(snapshots).toEqual(["ntf_1", "ntf_2"]);
    quota.close();
  });

  it("stop for good when the key is refused or revoked", async () => {
    const { fetch } = fakeFetch({
      "POST /api/quota/ws-ticket": () => [401, { error: { message: "revoked", code: "invalid_api_key" } }],
    });
    const quota = monitor(fetch);
    const states = [];
    quota.on("connection", (event) => states.push(event.state));
    quota.subscribe();
    await vi.advanceTimersByTimeAsync(5000);
    expect(states).toEqual(["connecting", "closed"]);
    expect(FakeWebSocket.instances.length).toBe(0);

    const ok = fakeFetch();
    const second = monitor(ok.fetch);
    const closed = [];
    second.on("connection", (event) => event.state === "closed" && closed.push(event));
    second.subscribe();
    await settle();
    FakeWebSocket.instances[0].open();
    FakeWebSocket.instances[0].drop(1008, "key revoked or workspace deleted");
    await vi.advanceTimersByTimeAsync(5000);
    expect(closed[0].error.message).toContain("revoked");
    expect(FakeWebSocket.instances.length).toBe(1);
  });

  it("close() stops reconnecting", async () => {
    const { fetch } = fakeFetch();
    const quota = monitor(fetch);
    quota.subscribe();
    await settle();
    const socket = FakeWebSocket.instances[0];
    socket.open();
    quota.close();
    expect(socket.closedWith.code).toBe(1000);
    socket.drop();
    await vi.advanceTimersByTimeAsync(5000);
    expect(FakeWebSocket.instances.length).toBe(1);
  });
});

/** Answers like quotawatch to a token that has expired. */
const expired = () => [401, { error: { message: "the token expired", code: "expired_api_key" } }];

/** A getToken double handing out `qwt_1`, `qwt_2`, ... with the expiry `expiresAt(n)` gives. */
function tokenSource(expiresAt = () => undefined) {
  let issued = 0;
  return vi.fn(async () => {
    issued += 1;
    const expiry = expiresAt(issued);
    return expiry === undefined ? `qwt_${issued}` : { token: `qwt_${issued}`, expiresAt: expiry };
  });
}

/** The token each call was sent with. */
const tokensSent = (calls) => calls.map((call) => call.headers.Authorization.replace(/^Bearer /, ""));

describe("token renewal", () => {
  it("needs a token or a getToken function", () => {
    expect(() => new QuotaMonitor({ baseUrl: "http://qw" })).toThrow(/token or a getToken/);
  });

  it("fetches the first token from getToken and keeps using it", async () => {
    const { fetch, calls } = fakeFetch();
    const getToken = tokenSource();
    const quota = monitor(fetch, { token: undefined, getToken });
    await quota.getStatus();
    await quota.getNotifications();
    expect(tokensSent(calls)).toEqual(["qwt_1", "qwt_1"]);
    expect(getToken).toHaveBeenCalledTimes(1);
  });

  it("renews on a 401 for an expired token and sends the request once more", async () => {
    const { fetch, calls } = fakeFetch({
      "GET /api/quota/status": (token) => (token === TOKEN ? expired() : [200, status()]),
    });
    const getToken = tokenSource();
    const doc = await monitor(fetch, { getToken }).getStatus();
    expect(doc.workspace).toBe("acme");
    expect(tokensSent(calls)).toEqual([TOKEN, "qwt_1"]);
    expect(getToken).toHaveBeenCalledTimes(1);
  });

  it("shares one renewal among requests refused at the same time", async () => {
    const refusedUnlessFresh = (answer) => (token) => (token === "qwt_1" ? [200, answer] : expired());
    const { fetch, calls } = fakeFetch({
      "GET /api/quota/status": refusedUnlessFresh(status()),
      "GET /api/quota/notifications": refusedUnlessFresh({ workspace: "acme", notifications: [] }),
    });
    let release;
    const getToken = vi.fn(() => new Promise((resolve) => (release = resolve)));
    const quota = monitor(fetch, { getToken });
    const answers = Promise.all([quota.getStatus(), quota.getNotifications(), quota.getStatus()]);
    await settle();
    expect(getToken).toHaveBeenCalledTimes(1);
    release({ token: "qwt_1" });
    const [first, notifications, second] = await answers;
    expect([first.workspace, notifications.workspace, second.workspace]).toEqual(["acme", "acme", "acme"]);
    expect(getToken).toHaveBeenCalledTimes(1);
    expect(tokensSent(calls)).toEqual([TOKEN, TOKEN, TOKEN, "qwt_1", "qwt_1", "qwt_1"]);
  });

  it("sends a request at most twice, and renews only for an expired or unknown token", async () => {
    let refusal = [401, { error: { message: "revoked", code: "invalid_api_key" } }];
    const { fetch, calls } = fakeFetch({ "GET /api/quota/status": () => refusal });
    const getToken = tokenSource();
    const quota = monitor(fetch, { getToken });
    const refused = await quota.getStatus().catch((error) => error);
    expect(refused.code).toBe("invalid_api_key");
    expect(tokensSent(calls)).toEqual([TOKEN, "qwt_1"]);
    for (const [code, status] of [
      ["missing_api_key", 401],
      ["missing_scope", 403],
    ]) {
      refusal = [status, { error: { message: "no", code } }];
      const error = await quota.getStatus().catch((problem) => problem);
      expect(error.code).toBe(code);
    }
    expect(getToken).toHaveBeenCalledTimes(1);
    expect(calls.length).toBe(4);
  });

  it("renews shortly before the expiry that came with the token", async () => {
    const { fetch, calls } = fakeFetch();
    // The first expiry as quotawatch writes it, the second as milliseconds.
    const getToken = tokenSource((n) =>
      n === 1 ? new Date(Date.now() + 60_000).toISOString() : Date.now() + 60_000,
    );
    const quota = monitor(fetch, { token: undefined, getToken });
    await quota.getStatus();
    await vi.advanceTimersByTimeAsync(20_000);
    await quota.getStatus();
    await vi.advanceTimersByTimeAsync(15_000);
    await quota.getStatus();
    expect(tokensSent(calls)).toEqual(["qwt_1", "qwt_1", "qwt_2"]);
  });

  it("says what getToken must give when it gives something else", async () => {
    const { fetch } = fakeFetch();
    const quota = monitor(fetch, { token: undefined, getToken: async () => ({ key: "qwt_1" }) });
    const error = await quota.getStatus().catch((problem) => problem);
    expect(error.message).toMatch(/getToken must resolve to a token/);
    expect(fetch).not.toHaveBeenCalled();
  });

  it("reopens a WebSocket closed for an expired token with a ticket from a fresh token", async () => {
    const { fetch, calls } = fakeFetch();
    const getToken = tokenSource();
    const quota = monitor(fetch, { token: undefined, getToken });
    const states = [];
    quota.on("connection", (event) => states.push(event.state));
    quota.subscribe();
    await settle();
    FakeWebSocket.instances[0].open();
    await settle();
    FakeWebSocket.instances[0].drop(1008, "key expired");
    await vi.advanceTimersByTimeAsync(1000);
    expect(FakeWebSocket.instances.length).toBe(2);
    const tickets = calls.filter((call) => call.path === "/api/quota/ws-ticket");
    expect(tokensSent(tickets)).toEqual(["qwt_1", "qwt_2"]);
    expect(states).not.toContain("closed");
    quota.close();
  });
});

describe("wsUrl", () => {
  it("opens the WebSocket at its own base URL, and REST calls at baseUrl", async () => {
    for (const [wsUrl, expected] of [
      ["wss://live.quota.test/prefix/", "wss://live.quota.test/prefix/api/quota/ws?ticket=wst_"],
      ["http://127.0.0.1:8001", "ws://127.0.0.1:8001/api/quota/ws?ticket=wst_"],
    ]) {
      FakeWebSocket.instances = [];
      const { fetch, calls } = fakeFetch();
      const quota = monitor(fetch, { wsUrl });
      quota.subscribe();
      await settle();
      expect(FakeWebSocket.instances[0].url.startsWith(expected)).toBe(true);
      expect(calls[0].path).toBe("/api/quota/ws-ticket");
      expect(fetch.mock.calls[0][0]).toMatch(/^http:\/\/quota\.test\//);
      quota.close();
    }
  });
});

describe("backoffDelay", () => {
  it("grows exponentially up to the cap, with jitter in the upper half", () => {
    const backoff = { initialMs: 500, maxMs: 30_000 };
    expect(backoffDelay(1, backoff, () => 0)).toBe(250);
    expect(backoffDelay(1, backoff, () => 1)).toBe(500);
    expect(backoffDelay(4, backoff, () => 1)).toBe(4000);
    expect(backoffDelay(20, backoff, () => 1)).toBe(30_000);
    expect(backoffDelay(20, backoff, () => 0)).toBe(15_000);
  });
});

describe("spendByModel", () => {
  const spending = status({
    spend: {
      today: {
        usd: 0.5,
        by_model: {
          "gpt-4o-mini": { usd: 0.1, prompt_tokens: 1000, cached_tokens: 0, completion_tokens: 100 },
        },
      },
      this_month: {
        usd: 4,
        by_model: {
          "gpt-4o-mini": { usd: 1, prompt_tokens: 9000, cached_tokens: 1000, completion_tokens: 900 },
          "gpt-4o": { usd: 3, prompt_tokens: 5000, cached_tokens: 0, completion_tokens: 500 },
        },
      },
      prices_taken: "2026-12-02",
    },
  });

  it("lists what each model cost in the period, most first, with its share", () => {
    expect(spendByModel(spending)).toEqual([
      { model: "gpt-4o", usd: 3, share: 0.75 },
      { model: "gpt-4o-mini", usd: 1, share: 0.25 },
    ]);
    expect(spendByModel(spending, "today")).toEqual([{ model: "gpt-4o-mini", usd: 0.1, share: 1 }]);
  });

  it("is empty without spend, and arrives with every live status", async () => {
    expect(spendByModel(status())).toEqual([]);
    expect(spendByModel(null)).toEqual([]);
    const { fetch } = fakeFetch();
    const quota = monitor(fetch);
    const statuses = [];
    quota.on("status", ({ data }) => statuses.push(data));
    quota.subscribe();
    await settle();
    const socket = FakeWebSocket.instances[0];
    socket.open();
    await settle();
    socket.message({ type: "usage", workspace: "acme", data: spending });
    expect(spendByModel(statuses.at(-1), "today")[0].model).toBe("gpt-4o-mini");
    expect(statuses.at(-1).spend.prices_taken).toBe("2026-12-02");
  });
});
