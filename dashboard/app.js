// The quotawatch dashboard: sign-in, state, routing and the live connection.
//
// State is a map of status documents (one per workspace the key can see),
// kept current by QuotaMonitor from /sdk/quota-client.js: a snapshot on
// every (re)connect, then changes and usage as they happen. Pages render
// from that state; nothing here decides about quotas.

import { QuotaApiError, QuotaMonitor } from "/sdk/quota-client.js";
import { AlertsPage } from "/dashboard/alerts.js";
import { Api } from "/dashboard/api.js";
import { fill, h } from "/dashboard/dom.js";
import { duration, resetsIn } from "/dashboard/format.js";
import { Toasts } from "/dashboard/toasts.js";
import { Detail, Overview } from "/dashboard/views.js";

// sessionStorage: the key lives as long as the tab, and never in a URL.
const KEY_STORAGE = "quotawatch.key";

class App {
  constructor() {
    this.main = document.getElementById("main");
    this.connection = document.getElementById("connection");
    this.who = document.getElementById("who");
    this.nav = document.getElementById("nav");
    this.signOutButton = document.getElementById("sign-out");
    this.toasts = new Toasts(document.getElementById("toasts"));
    this.statuses = new Map();
    this.configs = new Map();
    this.notifications = new Map();
    this.filter = "";
    this.page = null;
    this.monitor = null;
    this.signOutButton.addEventListener("click", () => this.signOut());
    window.addEventListener("hashchange", () => this.route());
    // Relative times ("resets in 3h 12m") tick without a re-render.
    setInterval(() => {
      for (const element of document.querySelectorAll("[data-resets-at]")) {
        element.textContent = resetsIn(element.dataset.resetsAt);
      }
    }, 1000);
  }

  async start() {
    const token = sessionStorage.getItem(KEY_STORAGE);
    if (!token) {
      this.showSignIn();
      return;
    }
    try {
      await this.signIn(token);
    } catch (error) {
      sessionStorage.removeItem(KEY_STORAGE);
      this.showSignIn(
        error instanceof QuotaApiError && error.status === 401
          ? "Your key is no longer valid."
          : error.message,
      );
    }
  }

  showSignIn(problem) {
    this.closePage();
    this.who.hidden = true;
    this.nav.hidden = true;
    this.signOutButton.hidden = true;
    this.setConnection({ state: "closed" }, "Signed out");
    const error = h(
      "p",
      { class: "form-error", role: "alert", hidden: !problem },
      problem ?? "",
    );
    const input = h("input", {
      id: "key",
      name: "key",
      type: "password",
      required: true,
      autocomplete: "off",
      spellcheck: "false",
      "aria-describedby": "key-hint",
    });
    const submit = h("button", { type: "submit", class: "button" }, "Sign in");
    const form = h(
      "form",
      { class: "panel sign-in", "aria-labelledby": "sign-in-title" },
      h("h1", { id: "sign-in-title" }, "Sign in to quotawatch"),
      h(
        "div",
        { class: "field" },
        h("label", { for: "key" }, "API key"),
        input,
        h(
          "p",
          { class: "hint", id: "key-hint" },
          "The admin key shows every workspace; a workspace key shows its own. The key stays in this tab only.",
        ),
      ),
      error,
      submit,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      submit.disabled = true;
      error.hidden = true;
      try {
        await this.signIn(input.value.trim());
        sessionStorage.setItem(KEY_STORAGE, input.value.trim());
      } catch (problem) {
        error.textContent =
          problem instanceof QuotaApiError && problem.status === 401
            ? "That key is not valid: check it and try again."
            : `Could not sign in: ${problem.message}`;
        error.hidden = false;
        input.focus();
      } finally {
        submit.disabled = false;
      }
    });
    fill(this.main, form);
    input.focus();
  }

  async signIn(token) {
    const monitor = new QuotaMonitor({
      baseUrl: window.location.origin,
      token,
    });
    const status = await monitor.getStatus();
    this.monitor = monitor;
    this.api = new Api(token);
    this.isAdmin = Array.isArray(status.workspaces);
    this.statuses.clear();
    this.notifications.clear();
    this.configs.clear();
    for (const doc of this.isAdmin ? status.workspaces : [status])
      this.statuses.set(doc.workspace, doc);
    if (this.isAdmin) await this.refreshCatalog();
    this.who.textContent = this.isAdmin
      ? "Admin"
      : `Workspace ${status.workspace}`;
    this.who.hidden = false;
    // The pages beyond the workspaces are the admin's.
    this.nav.hidden = !this.isAdmin;
    this.signOutButton.hidden = false;
    monitor.on("status", (event) => this.onStatus(event));
    monitor.on("notification", (event) => this.onNotification(event));
    monitor.on("removed", ({ workspace }) => this.onRemoved(workspace));
    monitor.on("connection", (event) => this.onConnection(event));
    monitor.subscribe();
    this.route();
  }

  signOut() {
    this.monitor?.close();
    this.monitor = null;
    this.api = null;
    sessionStorage.removeItem(KEY_STORAGE);
    this.statuses.clear();
    this.toasts.clear();
    window.location.hash = "";
    this.showSignIn();
  }

  /** Reloads workspace settings (admin only): names, limits, timezones. */
  async refreshCatalog() {
    if (!this.isAdmin) return;
    const { workspaces } = await this.api.workspaces();
    this.configs = new Map(workspaces.map((config) => [config.id, config]));
  }

  onStatus({ workspace, data, reason }) {
    const previous = this.statuses.get(workspace);
    this.statuses.set(workspace, data);
    // A snapshot after reconnecting can also reveal a transition that
    // happened while the connection was down.
    if (previous && previous.status !== data.status)
      this.toasts.transition(previous.status, data);
    if (!this.configs.has(workspace) && this.isAdmin && reason !== "usage") {
      this.refreshCatalog().catch(() => {});
    }
    this.page?.update(workspace);
  }

  onNotification({ workspace, event, data, notifications }) {
    if (!workspace) return;
    if (event === "snapshot") {
      this.notifications.set(workspace, notifications);
    } else {
      const active = (this.notifications.get(workspace) ?? []).filter(
        (item) => item.id !== data.id,
      );
      if (event === "raised") active.push(data);
      this.notifications.set(workspace, active);
    }
    this.page?.notificationsChanged?.(workspace);
  }

  onRemoved(workspace) {
    this.statuses.delete(workspace);
    this.configs.delete(workspace);
    this.notifications.delete(workspace);
    this.page?.update(workspace);
  }

  onConnection(event) {
    if (event.state === "open") {
      // How many times the live connection opened, for whoever watches the
      // page: a state shown for a moment is easily missed, a count is not.
      const opened = Number(this.connection.dataset.opened ?? 0) + 1;
      this.connection.dataset.opened = String(opened);
    }
    if (event.state === "open" && this.wasDisconnected) {
      // Settings may have changed while the connection was down.
      this.refreshCatalog().catch(() => {});
    }
    this.wasDisconnected = event.state !== "open";
    if (event.state === "closed" && event.error) {
      // The key was revoked (or the workspace deleted): nothing more to show.
      this.signOut();
      this.showSignIn(
        "The connection was closed: the key was revoked or its workspace deleted.",
      );
      return;
    }
    this.setConnection(event);
  }

  setConnection(event, text) {
    const labels = {
      open: "Live",
      connecting: "Connecting…",
      reconnecting: `Reconnecting${event.delayMs ? ` in ${duration(event.delayMs)}` : ""}…`,
      closed: "Not connected",
    };
    this.connection.dataset.state = event.state;
    this.connection.querySelector(".connection-text").textContent =
      text ?? labels[event.state];
  }

  closePage() {
    this.page?.close?.();
    this.page = null;
  }

  route() {
    if (!this.monitor) return;
    this.closePage();
    const match = window.location.hash.match(/^#\/w\/(.+)$/);
    if (match) {
      const id = decodeURIComponent(match[1]);
      const detail = new Detail(this, id);
      this.page = {
        element: detail.element,
        update: (workspace) => workspace === id && detail.update(),
        notificationsChanged: (workspace) =>
          workspace === id && detail.renderNotifications(),
        close: () => detail.close(),
      };
      document.title = `${id} · quotawatch`;
    } else if (window.location.hash === "#/alerts" && this.isAdmin) {
      const alerts = new AlertsPage(this);
      this.page = {
        element: alerts.element,
        // Status documents change nothing on this page.
        update: () => {},
        close: () => alerts.close(),
      };
      document.title = "Alerts · quotawatch";
    } else {
      const overview = new Overview(this);
      this.page = {
        element: overview.element,
        update: (workspace) => overview.update(workspace),
      };
      document.title = "quotawatch";
    }
    // The navigation marks the page shown: Alerts, or Workspaces for the rest.
    const shown = this.page.element.matches("[data-page=alerts]")
      ? "#/alerts"
      : "#/";
    for (const link of this.nav.querySelectorAll("a")) {
      if (link.hash === shown) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    fill(this.main, this.page.element);
    this.main.focus({ preventScroll: true });
  }
}

new App().start();
