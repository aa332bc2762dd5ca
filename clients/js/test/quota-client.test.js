import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { QuotaApiError, QuotaMonitor, backoffDelay } from "../quota-client.js";

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
    const [code, body] = answer ? answer() : [404, { error: { message: "no route", code: "unknown_route" } }];
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
