// The Alerts page (admin key only): every alert channel, global and per
// workspace, to add, test, enable, disable and delete, and the delivery log
// with each delivery's attempts, fetched again every few seconds while the
// page is open. It shows what the API answers and decides nothing: a
// channel the configuration file declares has no change buttons because the
// API lists it with `source: "config"` (and answers 409 to changes).

import { confirmDialog, formDialog, secretDialog } from "/dashboard/dialogs.js";
import { fill, h } from "/dashboard/dom.js";
import { preciseTime } from "/dashboard/format.js";

// How often the delivery log is fetched again while the page is open.
const REFRESH_MS = 5000;
// How many deliveries the log shows, newest first (the API allows 500).
const LOG_SIZE = 100;

// A delivery's status as a symbol and a word, so that it never depends on
// colour alone.
const DELIVERY_STATUSES = {
  pending: { symbol: "↻", label: "pending" },
  delivered: { symbol: "✓", label: "delivered" },
  gave_up: { symbol: "✕", label: "gave up" },
};

// What an attempt came to, in words.
const OUTCOMES = {
  delivered: "delivered",
  retry: "failed, will retry",
  gave_up: "failed, gave up",
};

const CHANNEL_TYPES = [
  { value: "webhook", label: "Webhook" },
  { value: "slack", label: "Slack" },
  { value: "email", label: "Email" },
];

const SEVERITIES = ["info", "warning", "critical"].map((severity) => ({
  value: severity,
  label: severity,
}));

function deliveryStatus(status) {
  const known = DELIVERY_STATUSES[status] ?? { symbol: "?", label: status };
  return h(
    "span",
    { class: "delivery-status", dataset: { status } },
    h("span", { "aria-hidden": "true" }, known.symbol),
    ` ${known.label}`,
  );
}

/** One attempt in words: "delivered · HTTP 200 · 41 ms". */
function attemptText(attempt) {
  return [
    OUTCOMES[attempt.outcome] ?? attempt.outcome,
    attempt.http_status === null ? null : `HTTP ${attempt.http_status}`,
    `${attempt.duration_ms} ms`,
    attempt.error,
    attempt.digest_id ? `in digest ${attempt.digest_id}` : null,
  ]
    .filter((part) => part !== null)
    .join(" · ");
}

function select(id, options, onchange) {
  return h(
    "select",
    { id, onchange },
    options.map(({ value, label }) => h("option", { value }, label)),
  );
}

export class AlertsPage {
  constructor(app) {
    this.app = app;
    this.channels = [];
    this.deliveries = null;
    // Answers to log requests can cross; only the latest request's is shown.
    this.logRequest = 0;
    this.channelsError = h("p", {
      class: "form-error",
      role: "alert",
      hidden: true,
    });
    this.channelsTable = h("div", {}, h("p", { class: "empty" }, "Loading…"));
    this.testOutcome = h("p", {
      class: "test-outcome",
      id: "test-outcome",
      role: "status",
    });
    this.statusFilter = select(
      "delivery-status-filter",
      [
        { value: "", label: "Any status" },
        ...Object.entries(DELIVERY_STATUSES).map(([value, { label }]) => ({
          value,
          label,
        })),
      ],
      () => this.loadLog(),
    );
    this.channelFilter = select(
      "delivery-channel-filter",
      [{ value: "", label: "Every channel" }],
      () => this.loadLog(),
    );
    this.logError = h("p", {
      class: "form-error",
      role: "alert",
      hidden: true,
    });
    this.logUpdated = h("p", { class: "hint", id: "log-updated" });
    this.logTable = h("div", {}, h("p", { class: "empty" }, "Loading…"));
    this.element = h(
      "section",
      { "aria-labelledby": "alerts-title", dataset: { page: "alerts" } },
      h("div", { class: "toolbar" }, h("h1", { id: "alerts-title" }, "Alerts")),
      h(
        "section",
        { class: "panel", "aria-labelledby": "alert-channels-title" },
        h("h2", { id: "alert-channels-title" }, "Channels"),
        this.channelsError,
        this.channelsTable,
        h(
          "div",
          { class: "actions channel-actions" },
          h(
            "button",
            {
              type: "button",
              class: "button",
              id: "add-channel",
              onclick: () => this.createChannel(),
            },
            "Add channel",
          ),
        ),
        this.testOutcome,
      ),
      h(
        "section",
        { class: "panel", "aria-labelledby": "deliveries-title" },
        h("h2", { id: "deliveries-title" }, "Delivery log"),
        h(
          "div",
          { class: "toolbar log-filters" },
          h(
            "div",
            { class: "field" },
            h("label", { for: "delivery-status-filter" }, "Status"),
            this.statusFilter,
          ),
          h(
            "div",
            { class: "field" },
            h("label", { for: "delivery-channel-filter" }, "Channel"),
            this.channelFilter,
          ),
          h(
            "button",
            {
              type: "button",
              class: "button subtle",
              id: "refresh-log",
              onclick: () => this.loadLog(),
            },
            "Refresh",
          ),
        ),
        this.logUpdated,
        this.logError,
        this.logTable,
      ),
    );
    this.loadChannels();
    this.loadLog();
    this.timer = setInterval(() => this.loadLog(), REFRESH_MS);
  }

  close() {
    clearInterval(this.timer);
  }

  /** "Acme Corp (acme)" for a workspace's channel, "Global" for the others. */
  scopeText(channel) {
    if (channel.workspace === null) return "Global";
    const config = this.app.configs.get(channel.workspace);
    return config && config.name !== channel.workspace
      ? `${config.name} (${channel.workspace})`
      : channel.workspace;
  }

  channelName(id) {
    return this.channels.find((channel) => channel.id === id)?.name ?? id;
  }

  async loadChannels() {
    try {
      this.channels = (await this.app.api.allChannels()).channels;
      this.channelsError.hidden = true;
    } catch (error) {
      this.channelsError.textContent = `Channels unavailable: ${error.message}`;
      this.channelsError.hidden = false;
      return;
    }
    this.renderChannels();
    this.renderChannelFilter();
    this.renderLog();
  }

  renderChannels() {
    if (this.channels.length === 0) {
      fill(
        this.channelsTable,
        h("p", { class: "empty" }, "No channel sends alerts anywhere yet."),
      );
      return;
    }
    fill(
      this.channelsTable,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "alert-channels" },
          h("caption", { class: "visually-hidden" }, "Alert channels"),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Name", "Type", "Scope", "Sends", "State", "Source"].map(
                (title) => h("th", { scope: "col" }, title),
              ),
              h(
                "th",
                { scope: "col" },
                h("span", { class: "visually-hidden" }, "Actions"),
              ),
            ),
          ),
          h(
            "tbody",
            {},
            this.channels.map((channel) => this.channelRow(channel)),
          ),
        ),
      ),
    );
  }

  channelRow(channel) {
    const declared = channel.source === "config";
    const action = (label, onclick) => channelAction(channel, label, onclick);
    return h(
      "tr",
      { dataset: { channel: channel.id } },
      h("th", { scope: "row" }, channel.name),
      h("td", {}, channel.type),
      h("td", {}, this.scopeText(channel)),
      h(
        "td",
        {},
        channel.events === null ? "every event" : channel.events.join(", "),
        h(
          "p",
          { class: "hint" },
          `from ${channel.min_severity}, ${channel.resolutions ? "with resolutions" : "without resolutions"}`,
        ),
      ),
      h(
        "td",
        { dataset: { role: "state" } },
        h("span", { "aria-hidden": "true" }, channel.enabled ? "✓ " : "– "),
        channel.enabled ? "enabled" : "disabled",
      ),
      h(
        "td",
        {},
        declared ? "configuration file" : "API",
        declared ? h("p", { class: "hint" }, "read-only here") : null,
      ),
      h(
        "td",
        { class: "row-actions" },
        action("Test", () => this.testChannel(channel)),
        declared
          ? null
          : action(channel.enabled ? "Disable" : "Enable", () =>
              this.changeChannel(() =>
                this.app.api.updateChannel(channel.id, {
                  enabled: !channel.enabled,
                }),
              ),
            ),
        declared ? null : action("Delete", () => this.deleteChannel(channel)),
      ),
    );
  }

  /** The channel filter's choices follow the channels; a deleted channel's
   * choice goes, and the filter with it. */
  renderChannelFilter() {
    const chosen = this.channelFilter.value;
    const kept = this.channels.some((channel) => channel.id === chosen);
    fill(
      this.channelFilter,
      h("option", { value: "" }, "Every channel"),
      this.channels.map((channel) =>
        h(
          "option",
          { value: channel.id, selected: kept && channel.id === chosen },
          channel.name,
        ),
      ),
    );
    if (chosen !== "" && !kept) this.loadLog();
  }

  createChannel() {
    const workspaces = [...this.app.configs.values()].sort((a, b) =>
      a.name.localeCompare(b.name),
    );
    channelDialog(this.app, {
      title: "New alert channel",
      scopes: [
        { value: "", label: "Global" },
        ...workspaces.map((config) => ({
          value: config.id,
          label: `${config.name} (${config.id})`,
        })),
      ],
      onCreated: () => this.loadChannels(),
    });
  }

  async testChannel(channel) {
    this.testOutcome.dataset.outcome = "sending";
    this.testOutcome.textContent = `Sending a test alert to ${channel.name}…`;
    try {
      const { attempt } = await this.app.api.testChannel(channel.id);
      this.testOutcome.dataset.outcome = attempt.outcome;
      this.testOutcome.textContent = `Test alert to ${channel.name}: ${attemptText(attempt)}.`;
    } catch (error) {
      this.testOutcome.dataset.outcome = "error";
      this.testOutcome.textContent = `Test alert to ${channel.name} not sent: ${error.message}`;
    }
    await this.loadLog();
  }

  async deleteChannel(channel) {
    const confirmed = await confirmDialog({
      title: `Delete the channel ${channel.name}?`,
      text: "Alerts are no longer sent there, and its delivery log goes with it.",
      confirmLabel: "Delete",
      danger: true,
    });
    if (!confirmed) return;
    await this.changeChannel(() => this.app.api.deleteChannel(channel.id));
  }

  async changeChannel(change) {
    try {
      await change();
    } catch (error) {
      this.channelsError.textContent = `Channel not changed: ${error.message}`;
      this.channelsError.hidden = false;
      return;
    }
    // A deleted channel's deliveries go with it.
    await Promise.all([this.loadChannels(), this.loadLog()]);
  }

  async loadLog() {
    this.logRequest += 1;
    const request = this.logRequest;
    let deliveries;
    try {
      deliveries = (
        await this.app.api.deliveries({
          status: this.statusFilter.value,
          channel: this.channelFilter.value,
          limit: LOG_SIZE,
        })
      ).deliveries;
    } catch (error) {
      if (request !== this.logRequest) return;
      this.logError.textContent = `Delivery log unavailable: ${error.message}`;
      this.logError.hidden = false;
      return;
    }
    if (request !== this.logRequest) return;
    this.logError.hidden = true;
    this.deliveries = deliveries;
    this.logUpdated.textContent = `Updated at ${preciseTime(Date.now())}; refreshed every ${REFRESH_MS / 1000} seconds.`;
    this.renderLog();
  }

  renderLog() {
    if (this.deliveries === null) return;
    if (this.deliveries.length === 0) {
      const filtered =
        this.statusFilter.value !== "" || this.channelFilter.value !== "";
      fill(
        this.logTable,
        h(
          "p",
          { class: "empty" },
          filtered
            ? "No delivery matches these filters."
            : "No alert has been sent yet.",
        ),
      );
      return;
    }
    fill(
      this.logTable,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "deliveries" },
          h(
            "caption",
            { class: "visually-hidden" },
            "Alert deliveries, newest first",
          ),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Event", "Channel", "Status", "Next attempt", "Attempts"].map(
                (title) => h("th", { scope: "col" }, title),
              ),
            ),
          ),
          h(
            "tbody",
            {},
            this.deliveries.map((delivery) => this.deliveryRow(delivery)),
          ),
        ),
      ),
    );
  }

  deliveryRow(delivery) {
    return h(
      "tr",
      { dataset: { delivery: delivery.id, status: delivery.status } },
      h(
        "td",
        {},
        `${delivery.event} ${delivery.phase}`,
        h(
          "p",
          { class: "hint" },
          `${delivery.workspace ?? "service-wide"}, ${preciseTime(delivery.created_at)}`,
        ),
      ),
      h("td", {}, this.channelName(delivery.channel)),
      h("td", {}, deliveryStatus(delivery.status)),
      h(
        "td",
        {},
        delivery.next_attempt_at ? preciseTime(delivery.next_attempt_at) : "—",
      ),
      h(
        "td",
        {},
        delivery.attempts.length === 0
          ? h("span", { class: "hint" }, "none yet")
          : h(
              "ol",
              { class: "attempts" },
              delivery.attempts.map((attempt) =>
                h(
                  "li",
                  { dataset: { outcome: attempt.outcome } },
                  `#${attempt.number} at ${preciseTime(attempt.attempted_at)}: ${attemptText(attempt)}`,
                ),
              ),
            ),
      ),
    );
  }
}

/**
 * A button of a channel's row (test, enable, disable, delete), named for
 * screen readers with the channel it acts on; the Alerts page and a
 * workspace's page share it.
 */
export function channelAction(channel, label, onclick) {
  return h(
    "button",
    {
      type: "button",
      class: "button subtle",
      "aria-label": `${label} ${channel.name}`,
      dataset: { action: label.toLowerCase() },
      onclick,
    },
    label,
  );
}

/**
 * The form that adds an alert channel, on the Alerts page (with `scopes` to
 * choose from: global or a workspace) and on a workspace's page (with its
 * `workspace` fixed): one form, so that both offer the same kinds and send
 * the same document. Each kind sends only its own receiver (a URL, or an
 * email channel's recipients), which the server requires and checks; a
 * webhook's generated secret is shown once the form has closed.
 */
export function channelDialog(app, { title, scopes, workspace, onCreated }) {
  const scope = scopes
    ? [
        {
          name: "workspace",
          label: "Scope",
          value: "",
          hint: "Global: every workspace's events and the service-wide ones.",
          options: scopes,
        },
      ]
    : [];
  formDialog({
    title,
    submitLabel: "Add channel",
    fields: [
      { name: "name", label: "Name", required: true },
      ...scope,
      {
        name: "type",
        label: "Type",
        value: "webhook",
        required: true,
        hint: "A webhook is signed (Standard Webhooks); Slack takes an incoming webhook URL; email goes to the recipients.",
        options: CHANNEL_TYPES,
      },
      {
        name: "url",
        label: "URL",
        type: "url",
        hint: "The receiver of a webhook or Slack channel.",
      },
      {
        name: "to",
        label: "Recipients",
        hint: "An email channel's addresses, comma-separated.",
      },
      {
        name: "events",
        label: "Events",
        hint: "Notification kinds, comma-separated, such as threshold_crossed, forecast_exhaustion. Empty: every event.",
      },
      {
        name: "min_severity",
        label: "Least severity",
        value: "info",
        required: true,
        options: SEVERITIES,
      },
      {
        name: "resolutions",
        label: "Also send resolutions",
        type: "checkbox",
        value: true,
      },
    ],
    onSubmit: async (values) => {
      const list = (text) =>
        text
          .split(",")
          .map((item) => item.trim())
          .filter((item) => item !== "");
      const events = list(values.events);
      const email = values.type === "email";
      const created = await app.api.createChannel({
        name: values.name,
        workspace:
          workspace ?? (values.workspace === "" ? null : values.workspace),
        type: values.type,
        url: email ? undefined : values.url,
        to: email ? list(values.to) : undefined,
        events: events.length === 0 ? undefined : events,
        min_severity: values.min_severity,
        resolutions: values.resolutions,
      });
      await onCreated();
      if (created.secret) {
        setTimeout(() =>
          secretDialog({
            title: "Webhook signing secret",
            text: "The receiver checks each message's signature with this secret (see README: verifying a webhook). It is shown once.",
            secret: created.secret,
          }),
        );
      }
    },
  });
}
