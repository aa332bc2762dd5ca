// @vitest-environment jsdom
import { act, cleanup, fireEvent, render, renderHook, screen } from "@testing-library/react";
import { createElement as h } from "react";
import { afterEach, describe, expect, it, vi } from "vitest";
import {
  QuotaNotification,
  QuotaToast,
  applyNotificationEvent,
  pressingNotification,
  useQuotaMonitor,
} from "../src/index.js";

globalThis.IS_REACT_ACT_ENVIRONMENT = true;

const status = (value, overrides = {}) => ({
  workspace: "acme",
  name: "Acme",
  status: value,
  reasons: [],
  limits: {},
  ...overrides,
});

const notification = (id, severity, overrides = {}) => ({
  id,
  severity,
  kind: "approaching_limit",
  title: `${severity} ${id}`,
  message: `message ${id}`,
  suggested_actions: [`act on ${id}`],
  tenant: {
    title: `tenant ${id}`,
    message: `tenant message ${id}`,
    suggested_actions: [`tenant act on ${id}`],
  },
  created_at: "2026-11-27T10:00:00.000Z",
  ...overrides,
});

/** A QuotaMonitor double: the test emits its events. */
class FakeMonitor {
  constructor(initial) {
    this.initial = initial;
    this.listeners = new Map();
    this.subscribed = 0;
    this.closed = 0;
  }

  getStatus() {
    return Promise.resolve(this.initial);
  }

  on(type, listener) {
    const set = this.listeners.get(type) ?? new Set();
    set.add(listener);
    this.listeners.set(type, set);
    return () => set.delete(listener);
  }

  subscribe() {
    this.subscribed += 1;
    return () => {};
  }

  close() {
    this.closed += 1;
  }

  emit(type, detail) {
    for (const listener of this.listeners.get(type) ?? []) listener(detail);
  }
}

afterEach(() => {
  cleanup();
  vi.useRealTimers();
});

describe("useQuotaMonitor", () => {
  it("starts from a snapshot and follows status, notifications and the connection", async () => {
    const monitor = new FakeMonitor(status("normal"));
    const { result, unmount } = renderHook(() => useQuotaMonitor({ monitor }));
    await act(async () => {});
    expect(result.current.status.status).toBe("normal");
    expect(monitor.subscribed).toBe(1);

    act(() => monitor.emit("connection", { state: "open" }));
    expect(result.current.connected).toBe(true);
    act(() => monitor.emit("status", { workspace: "acme", data: status("warning"), reason: "change" }));
    expect(result.current.status.status).toBe("warning");
    act(() =>
      monitor.emit("notification", {
        workspace: "acme",
        event: "raised",
        data: notification("n1", "warning"),
      }),
    );
    act(() =>
      monitor.emit("notification", {
        workspace: "acme",
        event: "raised",
        data: notification("n2", "critical"),
      }),
    );
    expect(result.current.notifications.map((n) => n.id)).toEqual(["n1", "n2"]);
    act(() =>
      monitor.emit("notification", {
        workspace: "acme",
        event: "resolved",
        data: notification("n1", "warning"),
      }),
    );
    expect(result.current.notifications.map((n) => n.id)).toEqual(["n2"]);

    const problem = new Error("network down");
    act(() => monitor.emit("connection", { state: "reconnecting", error: problem }));
    expect(result.current.connected).toBe(false);
    expect(result.current.error).toBe(problem);
    act(() => monitor.emit("connection", { state: "open" }));
    expect(result.current.error).toBeNull();

    unmount();
    // A shared monitor is left open for its owner; only the listeners go.
    expect(monitor.closed).toBe(0);
    expect([...monitor.listeners.values()].every((set) => set.size === 0)).toBe(true);
  });

  it("opens its own connection from a base URL and token, and closes it on unmount", async () => {
    const sockets = [];
    vi.stubGlobal(
      "WebSocket",
      class {
        constructor(url) {
          this.url = url;
          this.closed = false;
          sockets.push(this);
        }
        close() {
          this.closed = true;
        }
      },
    );
    const fetch = vi.fn(async (url) => ({
      ok: true,
      status: 200,
      json: async () => (url.endsWith("/ws-ticket") ? { ticket: "wst_1" } : status("warning")),
    }));
    vi.stubGlobal("fetch", fetch);
    try {
      const { result, unmount } = renderHook(() =>
        useQuotaMonitor({ baseUrl: "https://quota.example.com", token: "qw_key" }),
      );
      await act(async () => {});
      expect(result.current.status.status).toBe("warning");
      expect(fetch.mock.calls[0][1].headers.Authorization).toBe("Bearer qw_key");
      expect(sockets[0].url).toBe("wss://quota.example.com/api/quota/ws?ticket=wst_1");
      unmount();
      expect(sockets[0].closed).toBe(true);
    } finally {
      vi.unstubAllGlobals();
    }
  });

  it("takes tokens from getToken, opens the WebSocket at wsUrl, and keeps the connection across renders", async () => {
    const sockets = [];
    vi.stubGlobal(
      "WebSocket",
      class {
        constructor(url) {
          this.url = url;
          sockets.push(this);
        }
        close() {}
      },
    );
    const fetch = vi.fn(async (url) => ({
      ok: true,
      status: 200,
      json: async () =>
        url.endsWith("/ws-ticket") ? { ticket: `wst_${sockets.length + 1}` } : status("normal"),
    }));
    vi.stubGlobal("fetch", fetch);
    const sentTokens = () => fetch.mock.calls.map(([, init]) => init.headers.Authorization);
    try {
      // A new function on every render, as an inline arrow function is.
      const { result, rerender, unmount } = renderHook(
        ({ token }) =>
          useQuotaMonitor({
            baseUrl: "https://quota.example.com",
            wsUrl: "wss://live.example.com",
            getToken: async () => ({ token, expiresAt: "2999-01-01T00:00:00Z" }),
          }),
        { initialProps: { token: "qwt_first" } },
      );
      await act(async () => {});
      expect(result.current.status.status).toBe("normal");
      expect(sentTokens()).toEqual(["Bearer qwt_first", "Bearer qwt_first"]);
      expect(sockets[0].url).toBe("wss://live.example.com/api/quota/ws?ticket=wst_1");

      rerender({ token: "qwt_second" });
      await act(async () => {});
      expect(sockets.length).toBe(1);

      // The server closes the connection as the token expires: the next
      // ticket is asked for with a token from the latest getToken.
      act(() => sockets[0].onclose({ code: 1008, reason: "key expired" }));
      await vi.waitFor(() => expect(sockets.length).toBe(2));
      expect(sentTokens().at(-1)).toBe("Bearer qwt_second");
      expect(sockets[1].url).toBe("wss://live.example.com/api/quota/ws?ticket=wst_2");
      unmount();
    } finally {
      vi.unstubAllGlobals();
    }
  });

  it("does nothing without a base URL and token", () => {
    const { result } = renderHook(() => useQuotaMonitor({}));
    expect(result.current).toEqual({ status: null, notifications: [], connected: false, error: null });
  });
});

describe("notification helpers", () => {
  it("a snapshot replaces the list", () => {
    const next = applyNotificationEvent([notification("old", "info")], {
      event: "snapshot",
      notifications: [notification("new", "warning")],
    });
    expect(next.map((n) => n.id)).toEqual(["new"]);
  });

  it("the most severe, then the newest, is the most pressing", () => {
    const list = [
      notification("a", "warning", { created_at: "2026-11-27T12:00:00Z" }),
      notification("b", "critical", { created_at: "2026-11-27T09:00:00Z" }),
      notification("c", "critical", { created_at: "2026-11-27T11:00:00Z" }),
    ];
    expect(pressingNotification(list).id).toBe("c");
  });

  it("a threshold crossing gives way to the state it led to at the same severity", () => {
    const list = [
      notification("exhausted", "critical", {
        kind: "daily_quota_exhausted",
        created_at: "2026-11-27T11:00:00Z",
      }),
      notification("crossed", "critical", {
        kind: "threshold_crossed",
        created_at: "2026-11-27T11:00:01Z",
      }),
    ];
    expect(pressingNotification(list).id).toBe("exhausted");
    expect(pressingNotification(list.slice(1)).id).toBe("crossed");
  });
});

describe("QuotaNotification", () => {
  it("shows the most pressing notification with its suggested actions, for the operator when asked", () => {
    render(
      h(QuotaNotification, {
        status: status("quota_exceeded"),
        notifications: [
          notification("n1", "warning"),
          notification("n2", "critical", { suggested_actions: ["Add credits", "Reset"] }),
        ],
        audience: "operator",
      }),
    );
    const banner = screen.getByRole("alert");
    expect(banner.dataset.severity).toBe("critical");
    expect(banner.textContent).toContain("critical n2");
    expect(screen.getAllByRole("listitem").map((item) => item.textContent)).toEqual(["Add credits", "Reset"]);
  });

  it("shows the tenant's text by default, and other wording where the app gives it", () => {
    const notifications = [notification("n1", "critical", { kind: "upstream_quota_exhausted" })];
    const { rerender } = render(h(QuotaNotification, { status: status("quota_exceeded"), notifications }));
    const banner = screen.getByRole("alert");
    expect(banner.textContent).toContain("tenant n1");
    expect(banner.textContent).not.toContain("critical n1");
    expect(screen.getAllByRole("listitem").map((item) => item.textContent)).toEqual(["tenant act on n1"]);
    rerender(
      h(QuotaNotification, {
        status: status("quota_exceeded"),
        notifications,
        texts: { upstream_quota_exhausted: { title: "KI-Anfragen pausiert", suggestedActions: [] } },
      }),
    );
    expect(screen.getByRole("alert").textContent).toContain("KI-Anfragen pausiert");
    expect(screen.getByRole("alert").textContent).toContain("tenant message n1");
    expect(screen.queryAllByRole("listitem")).toEqual([]);
    rerender(
      h(QuotaNotification, {
        status: status("quota_exceeded"),
        notifications,
        texts: (n, audience) => ({ title: `${audience}: ${n.kind}` }),
      }),
    );
    expect(screen.getByRole("alert").textContent).toContain("tenant: upstream_quota_exhausted");
  });

  it("is hidden while the workspace is normal or nothing is active", () => {
    const { container, rerender } = render(
      h(QuotaNotification, { status: status("normal"), notifications: [notification("n1", "warning")] }),
    );
    expect(container.innerHTML).toBe("");
    rerender(h(QuotaNotification, { status: status("warning"), notifications: [] }));
    expect(container.innerHTML).toBe("");
  });
});

describe("QuotaToast", () => {
  it("toasts transitions, dismisses warnings by itself and keeps quota_exceeded", () => {
    vi.useFakeTimers();
    const { rerender } = render(h(QuotaToast, { status: status("normal"), timeoutMs: 1000 }));
    expect(screen.queryByRole("status")).toBeNull();

    rerender(
      h(QuotaToast, {
        status: status("rate_limited", { reasons: ["requests_per_minute_exhausted"] }),
        timeoutMs: 1000,
        audience: "operator",
      }),
    );
    const toast = screen.getByRole("status");
    expect(toast.textContent).toContain("Acme: rate limited");
    expect(toast.textContent).toContain("requests_per_minute_exhausted");
    act(() => vi.advanceTimersByTime(1000));
    expect(screen.queryByRole("status")).toBeNull();

    rerender(h(QuotaToast, { status: status("quota_exceeded"), timeoutMs: 1000 }));
    act(() => vi.advanceTimersByTime(10_000));
    const sticky = screen.getByRole("alert");
    expect(sticky.textContent).toContain("quota exceeded");
    fireEvent.click(screen.getByRole("button", { name: /Dismiss/ }));
    expect(screen.queryByRole("alert")).toBeNull();

    rerender(h(QuotaToast, { status: status("normal"), timeoutMs: 1000 }));
    expect(screen.getByRole("status").textContent).toContain("back to normal");
  });

  it("speaks to tenants without machine reasons, in the app's words", () => {
    const labels = { rate_limited: "bitte kurz warten", dismiss: "Schließen" };
    const { rerender } = render(h(QuotaToast, { status: status("normal"), labels }));
    rerender(
      h(QuotaToast, {
        status: status("rate_limited", { reasons: ["requests_per_minute_exhausted"] }),
        labels,
      }),
    );
    const toast = screen.getByRole("status");
    expect(toast.textContent).toContain("Acme: bitte kurz warten");
    expect(toast.textContent).not.toContain("requests_per_minute_exhausted");
    expect(screen.getByRole("button", { name: /Schließen/ })).toBeTruthy();
  });

  it("does not toast the first status it sees, or usage updates without a transition", () => {
    const { rerender } = render(h(QuotaToast, { status: status("rate_limited") }));
    rerender(h(QuotaToast, { status: status("rate_limited", { limits: { x: 1 } }) }));
    expect(screen.queryByRole("status")).toBeNull();
    expect(screen.queryByRole("alert")).toBeNull();
  });
});

describe("spend and budgets", () => {
  const spend = (today) => ({
    today: {
      usd: today,
      by_model: {
        "gpt-4o": { usd: today, prompt_tokens: 10_000_000, cached_tokens: 0, completion_tokens: 1_500_000 },
      },
    },
    this_month: { usd: 120, by_model: {} },
    prices_taken: "2026-12-02",
  });

  it("follows spend with every status, and shows a budget notification's actions with their figures", async () => {
    const monitor = new FakeMonitor(status("warning", { spend: spend(40) }));
    const { result } = renderHook(() => useQuotaMonitor({ monitor }));
    await act(async () => {});
    expect(result.current.status.spend.today.usd).toBe(40);
    act(() =>
      monitor.emit("status", {
        workspace: "acme",
        data: status("quota_exceeded", { spend: spend(50) }),
        reason: "usage",
      }),
    );
    expect(result.current.status.spend.today.usd).toBe(50);
    expect(result.current.status.spend.prices_taken).toBe("2026-12-02");

    const actions = [
      "Raise the budget: at the pace so far today's spend reaches $100.00 by its end; set usd_per_day for workspace acme to $100.00.",
      "Or move traffic to a cheaper model: gpt-4o-mini costs 6% of gpt-4o for this workload's token mix.",
    ];
    render(
      h(QuotaNotification, {
        status: result.current.status,
        notifications: [
          notification("n1", "critical", { kind: "budget_exhausted", suggested_actions: actions }),
        ],
        audience: "operator",
        texts: { budget_exhausted: { title: "Budget used up" } },
      }),
    );
    expect(screen.getByRole("alert").textContent).toContain("Budget used up");
    expect(screen.getAllByRole("listitem").map((item) => item.textContent)).toEqual(actions);
  });
});
