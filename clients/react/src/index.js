"use client";

// React pieces for showing quotawatch state inside an app:
//
//   const quota = useQuotaMonitor({ baseUrl, getToken });
//   <QuotaNotification {...quota} />
//   <QuotaToast {...quota} />
//
// Written with createElement rather than JSX, so the package needs no build
// step. Components render plain elements with `quota-*` class names and
// data attributes, for the app's own styles.

import { createElement as h, useEffect, useRef, useState } from "react";
import { QuotaMonitor } from "@quotawatch/client";

const SEVERITY_RANK = { critical: 0, warning: 1, info: 2 };

const STATUS_LABELS = {
  normal: "back to normal",
  warning: "approaching a limit",
  rate_limited: "rate limited",
  quota_exceeded: "quota exceeded",
};

/** The active notifications after `event` (raised, resolved or snapshot). */
export function applyNotificationEvent(active, event) {
  if (event.event === "snapshot") return event.notifications;
  const others = active.filter((notification) => notification.id !== event.data.id);
  return event.event === "raised" ? [...others, event.data] : others;
}

/**
 * Follows one workspace live: `{status, notifications, connected, error}`.
 * Pass `{baseUrl, token}` (a workspace key; with the admin key, also
 * `workspace`), or `{baseUrl, getToken}` to fetch short-lived browser
 * tokens from your backend (renewed when they expire), with `wsUrl` when
 * the WebSocket is at another base URL; or `{monitor}` to share a
 * QuotaMonitor you manage.
 */
export function useQuotaMonitor({
  baseUrl,
  wsUrl,
  token,
  getToken,
  workspace,
  WebSocket,
  monitor: shared,
} = {}) {
  const [state, setState] = useState({
    status: null,
    notifications: [],
    connected: false,
    error: null,
  });
  // The latest getToken, read when a token is needed: an app that passes a
  // new function on every render must not reconnect on every render.
  const latestGetToken = useRef(getToken);
  latestGetToken.current = getToken;
  const renewable = typeof getToken === "function";
  useEffect(() => {
    if (!shared && (!baseUrl || (!token && !renewable))) return undefined;
    const monitor =
      shared ??
      new QuotaMonitor({
        baseUrl,
        wsUrl,
        token,
        getToken: renewable ? () => latestGetToken.current() : undefined,
        workspace,
        WebSocket,
      });
    let mounted = true;
    const update = (change) => {
      if (mounted) setState((current) => ({ ...current, ...change(current) }));
    };
    const stops = [
      monitor.on("status", ({ data }) => update(() => ({ status: data }))),
      monitor.on("notification", (event) =>
        update((current) => ({ notifications: applyNotificationEvent(current.notifications, event) })),
      ),
      monitor.on("connection", ({ state: connection, error }) =>
        update((current) => ({
          connected: connection === "open",
          error: connection === "open" ? null : (error ?? current.error),
        })),
      ),
    ];
    monitor
      .getStatus()
      .then((status) => update((current) => ({ status: current.status ?? status })))
      .catch((error) => update(() => ({ error })));
    monitor.subscribe();
    return () => {
      mounted = false;
      for (const stop of stops) stop();
      if (!shared) monitor.close();
    };
  }, [baseUrl, wsUrl, token, renewable, workspace, WebSocket, shared]);
  return state;
}

/** The most pressing active notification: the most severe, then the newest. */
export function pressingNotification(notifications) {
  // A threshold crossing announces a moment (100% of the day's limit was
  // reached); the notification of the state it led to (the day used up)
  // says what holds now and until when, so it wins at the same severity.
  const announcement = (n) => (n.kind === "threshold_crossed" ? 1 : 0);
  return [...notifications].sort(
    (a, b) =>
      (SEVERITY_RANK[a.severity] ?? 3) - (SEVERITY_RANK[b.severity] ?? 3) ||
      announcement(a) - announcement(b) ||
      Date.parse(b.created_at) - Date.parse(a.created_at),
  )[0];
}

/**
 * The words to show of a notification: the tenant's text by default (what
 * an app's users may read), the operator's with `audience: "operator"`, and
 * over either, what `texts` gives for its kind (a map of kind to
 * `{title, message, suggestedActions}`, or a function of the notification
 * and the audience), for other wording or another language.
 */
export function notificationText(notification, { audience = "tenant", texts } = {}) {
  const base =
    audience === "operator" || !notification.tenant
      ? {
          title: notification.title,
          message: notification.message,
          suggestedActions: notification.suggested_actions ?? [],
        }
      : {
          title: notification.tenant.title,
          message: notification.tenant.message,
          suggestedActions: notification.tenant.suggested_actions ?? [],
        };
  const override = typeof texts === "function" ? texts(notification, audience) : texts?.[notification.kind];
  return { ...base, ...(override ?? {}) };
}

/**
 * A banner for the most pressing active notification, with its suggested
 * actions; renders nothing while the workspace is normal. Shows the
 * tenant's text unless `audience` is `"operator"`; `texts` overrides the
 * wording (see `notificationText`).
 */
export function QuotaNotification({ status, notifications = [], className, audience, texts }) {
  const notification = pressingNotification(notifications);
  if (!notification || !status || status.status === "normal") return null;
  const text = notificationText(notification, { audience, texts });
  return h(
    "div",
    {
      className: ["quota-notification", className].filter(Boolean).join(" "),
      role: notification.severity === "critical" ? "alert" : "status",
      "data-severity": notification.severity,
      "data-kind": notification.kind,
    },
    h("strong", { className: "quota-notification-title" }, text.title),
    h("p", { className: "quota-notification-message" }, text.message),
    text.suggestedActions.length > 0
      ? h(
          "ul",
          { className: "quota-notification-actions" },
          text.suggestedActions.map((action) => h("li", { key: action }, action)),
        )
      : null,
  );
}

let nextToastId = 0;

/**
 * Toasts on status transitions. They dismiss themselves after `timeoutMs`,
 * except `quota_exceeded`, which waits for the user: someone has to act.
 * `labels` replaces the words for each status (and `dismiss`), for other
 * wording or another language; the machine-readable reasons are shown only
 * with `audience: "operator"`.
 */
export function QuotaToast({ status, timeoutMs = 6000, className, audience = "tenant", labels = {} }) {
  const label = (name) => labels[name] ?? STATUS_LABELS[name] ?? name;
  const dismissLabel = labels.dismiss ?? "Dismiss";
  const [toasts, setToasts] = useState([]);
  const previous = useRef(null);
  const timers = useRef(new Map());

  const dismiss = (id) => {
    clearTimeout(timers.current.get(id));
    timers.current.delete(id);
    setToasts((current) => current.filter((toast) => toast.id !== id));
  };

  useEffect(() => {
    if (!status) return;
    const before = previous.current;
    previous.current = status.status;
    if (!before || before === status.status) return;
    nextToastId += 1;
    const toast = {
      id: nextToastId,
      status: status.status,
      title: `${status.name}: ${label(status.status)}`,
      reasons: audience === "operator" ? status.reasons : [],
    };
    setToasts((current) => [...current, toast]);
    if (status.status !== "quota_exceeded") {
      timers.current.set(
        toast.id,
        setTimeout(() => dismiss(toast.id), timeoutMs),
      );
    }
  }, [status, timeoutMs]);

  useEffect(() => {
    const pending = timers.current;
    return () => {
      for (const timer of pending.values()) clearTimeout(timer);
    };
  }, []);

  return h(
    "div",
    { className: ["quota-toasts", className].filter(Boolean).join(" "), "aria-live": "polite" },
    toasts.map((toast) =>
      h(
        "div",
        {
          key: toast.id,
          className: "quota-toast",
          role: toast.status === "quota_exceeded" ? "alert" : "status",
          "data-status": toast.status,
        },
        h("span", { className: "quota-toast-title" }, toast.title),
        toast.reasons.length > 0
          ? h("span", { className: "quota-toast-reasons" }, ` (${toast.reasons.join(", ")})`)
          : null,
        h(
          "button",
          {
            type: "button",
            className: "quota-toast-dismiss",
            onClick: () => dismiss(toast.id),
            "aria-label": `${dismissLabel}: ${toast.title}`,
          },
          dismissLabel,
        ),
      ),
    ),
  );
}
