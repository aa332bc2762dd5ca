// The dashboard's pages: the overview of every workspace and the detail of
// one. Both render from the app's state and update in place when a status
// document arrives, so that focus and scroll stay where they were.

import { spendByModel } from "/sdk/quota-client.js";
import { channelAction, channelDialog } from "/dashboard/alerts.js";
import { costChart, usageChart } from "/dashboard/chart.js";
import { confirmDialog, formDialog, secretDialog } from "/dashboard/dialogs.js";
import { fill, h } from "/dashboard/dom.js";
import {
  LIMIT_NAMES,
  STATUS_RANK,
  amount,
  compact,
  dateTime,
  dollars,
  forecastText,
  isBudget,
  limitLabel,
  number,
  percent,
  reasonText,
  resetsIn,
  statusLabel,
  statusSymbol,
  timeAgo,
} from "/dashboard/format.js";

export function badge(status) {
  return h(
    "span",
    { class: "badge", dataset: { status } },
    h("span", { "aria-hidden": "true" }, statusSymbol(status)),
    statusLabel(status),
  );
}

/** What was used in each current calendar period (today, this month) and
 * over the last minute, limits or not. */
export function usageLine(usage) {
  if (!usage) return null;
  const counts = ({ requests, tokens, usd }) =>
    `${number(requests)} requests · ${number(tokens)} tokens · ${dollars(usd)}`;
  // The periods are named by their fields ("this_month" reads "this
  // month"), in the server's order, so that a new one shows by itself.
  const { last_minute, ...calendars } = usage;
  const line = [...Object.entries(calendars), ["last_minute", last_minute]]
    .map(([name, used]) => `${name.replaceAll("_", " ")}: ${counts(used)}`)
    .join("; ");
  return h("p", { class: "usage" }, line[0].toUpperCase() + line.slice(1));
}

/** Used / limit for each configured limit, as labelled bars; with
 * `forecasts`, each with the server's forecast of when it runs out. */
export function gauges(limits, { forecasts = false } = {}) {
  const names = LIMIT_NAMES.filter((name) => limits[name]);
  if (names.length === 0)
    return h("p", { class: "empty" }, "No limits: everything is admitted.");
  return h(
    "ul",
    { class: "gauges" },
    names.map((name) => {
      const limit = limits[name];
      const share = Math.min(limit.utilization, 1);
      const level =
        limit.utilization >= 1
          ? "full"
          : limit.utilization >= 0.8
            ? "warn"
            : "ok";
      const fill = h("span");
      fill.style.width = `${(share * 100).toFixed(1)}%`;
      const label = `${limitLabel(name)}: ${amount(name, limit.used)} of ${amount(name, limit.limit)} used`;
      return h(
        "li",
        // Budgets are money: their figures read in dollars.
        { dataset: { limit: name, unit: isBudget(name) ? "usd" : "count" } },
        h(
          "div",
          { class: "gauge-label" },
          h("span", { class: "name" }, limitLabel(name)),
          h(
            "span",
            { class: "numbers", dataset: { role: "usage" } },
            `${amount(name, limit.used)} / ${amount(name, limit.limit)} (${percent(limit.utilization)})`,
          ),
        ),
        h(
          "div",
          {
            class: "bar",
            role: "meter",
            "aria-label": label,
            "aria-valuemin": 0,
            "aria-valuemax": limit.limit,
            "aria-valuenow": Math.min(limit.used, limit.limit),
            dataset: { level },
          },
          fill,
        ),
        limit.resets_at
          ? h(
              "span",
              { class: "resets", dataset: { resetsAt: limit.resets_at } },
              resetsIn(limit.resets_at),
            )
          : h("span", { class: "resets" }, "nothing used in this window"),
        forecasts && forecastLine(name, limit),
      );
    }),
  );
}

function forecastLine(name, limit) {
  const text = forecastText(name, limit);
  return (
    text &&
    h(
      "p",
      {
        class: "forecast",
        dataset: {
          role: "forecast",
          basis: limit.forecast.basis,
          exhaustsAt: limit.forecast.exhausts_at,
        },
      },
      text,
    )
  );
}

function upstreamText(upstream) {
  if (!upstream) return "not known yet";
  const parts = [];
  for (const [bucket, label] of [
    ["requests", "requests"],
    ["tokens", "tokens"],
  ]) {
    const state = upstream[bucket];
    if (state && state.remaining !== null && state.limit !== null) {
      parts.push(
        `${compact(state.remaining)} / ${compact(state.limit)} ${label} left`,
      );
    }
  }
  return parts.length > 0 ? parts.join(", ") : "not known yet";
}

function errorCount(errors) {
  return (
    errors.rate_limited +
    errors.insufficient_quota +
    errors.server_error +
    errors.other
  );
}

// ----- overview -------------------------------------------------------------------------------

export class Overview {
  constructor(app) {
    this.app = app;
    this.cards = new Map();
    this.list = h("ul", { class: "cards", "aria-label": "Workspaces" });
    this.summary = h("p", { class: "summary", role: "status" });
    const filterId = "workspace-filter";
    this.filter = h("input", {
      id: filterId,
      type: "search",
      value: app.filter,
      placeholder: "Name or id",
      autocomplete: "off",
      oninput: () => {
        app.filter = this.filter.value;
        this.arrange();
      },
    });
    this.element = h(
      "section",
      { "aria-labelledby": "overview-title" },
      h(
        "div",
        { class: "toolbar" },
        h("h1", { id: "overview-title" }, "Workspaces"),
        h(
          "div",
          { class: "field" },
          h("label", { for: filterId }, "Filter workspaces"),
          this.filter,
        ),
        app.isAdmin
          ? h(
              "button",
              {
                type: "button",
                class: "button",
                onclick: () => this.createWorkspace(),
              },
              "New workspace",
            )
          : null,
      ),
      this.summary,
      this.list,
    );
    for (const id of app.statuses.keys()) this.update(id);
    this.arrange();
  }

  /** Re-renders the card of `id` from the latest status document. */
  update(id) {
    const doc = this.app.statuses.get(id);
    if (!doc) {
      this.cards.get(id)?.remove();
      this.cards.delete(id);
      this.arrange();
      return;
    }
    let card = this.cards.get(id);
    const orderChanged =
      !card ||
      card.dataset.status !== doc.status ||
      card.dataset.name !== doc.name;
    if (!card) {
      card = h("li", { class: "panel card", dataset: { workspace: id } });
      this.cards.set(id, card);
    }
    card.dataset.status = doc.status;
    card.dataset.name = doc.name;
    const errors = errorCount(doc.errors);
    fill(
      card,
      h(
        "div",
        { class: "card-head" },
        h(
          "div",
          {},
          h(
            "h2",
            {},
            h("a", { href: `#/w/${encodeURIComponent(id)}` }, doc.name),
          ),
          h("p", { class: "id" }, id),
        ),
        badge(doc.status),
      ),
      doc.reasons.length > 0
        ? h("p", { class: "reasons" }, doc.reasons.map(reasonText).join("; "))
        : null,
      gauges(doc.limits),
      usageLine(doc.usage),
      h(
        "dl",
        { class: "facts" },
        h(
          "div",
          {},
          h("dt", {}, "OpenAI headroom"),
          h("dd", {}, upstreamText(doc.upstream)),
        ),
        h(
          "div",
          {},
          h("dt", {}, "Errors, last hour"),
          h(
            "dd",
            { dataset: { role: "errors" } },
            `${number(errors)}${doc.errors.refused ? ` (+${number(doc.errors.refused)} refused)` : ""}`,
          ),
        ),
      ),
    );
    if (orderChanged) this.arrange();
  }

  /** Sorts worst status first (then by name), applies the filter, and
   * moves only the cards whose place changed, so focus is kept. */
  arrange() {
    const needle = this.app.filter.trim().toLowerCase();
    const docs = [...this.app.statuses.values()].sort(
      (a, b) =>
        STATUS_RANK[a.status] - STATUS_RANK[b.status] ||
        a.name.localeCompare(b.name),
    );
    let shown = 0;
    let previous = null;
    for (const doc of docs) {
      const card = this.cards.get(doc.workspace);
      if (!card) continue;
      const visible =
        !needle ||
        doc.name.toLowerCase().includes(needle) ||
        doc.workspace.includes(needle);
      card.hidden = !visible;
      shown += visible ? 1 : 0;
      const expected = previous
        ? previous.nextElementSibling
        : this.list.firstElementChild;
      if (expected !== card) {
        if (previous) previous.after(card);
        else this.list.prepend(card);
      }
      previous = card;
    }
    const total = docs.length;
    const blocked = docs.filter((doc) => doc.blocked).length;
    this.summary.textContent =
      `${shown === total ? `${total}` : `${shown} of ${total}`} workspace${total === 1 ? "" : "s"}` +
      (blocked ? `, ${blocked} blocked` : "");
  }

  createWorkspace() {
    const app = this.app;
    formDialog({
      title: "New workspace",
      submitLabel: "Create workspace",
      fields: [
        {
          name: "id",
          label: "Id",
          required: true,
          pattern: "[a-z0-9][a-z0-9_-]{0,62}",
          hint: "Lower-case letters, digits, - and _; up to 63 characters.",
        },
        { name: "name", label: "Display name", hint: "Defaults to the id." },
        ...quotaFields(
          { timezone: "UTC", limits: {}, warnAt: 0.8 },
          {
            emptyMeans: "Empty: the server's default.",
            timezoneRequired: false,
          },
        ),
      ],
      onSubmit: async (values) => {
        const settings = { id: values.id, limits: {} };
        if (values.name) settings.name = values.name;
        if (values.timezone) settings.timezone = values.timezone;
        if (values.warn_at) settings.warn_at = Number(values.warn_at);
        for (const name of LIMIT_NAMES) {
          if (values[name] !== "") settings.limits[name] = Number(values[name]);
        }
        await app.api.createWorkspace(settings);
        await app.refreshCatalog();
        const key = await app.api.createKey(values.id);
        secretDialog({
          title: `Workspace ${values.id} created`,
          text: "Its first API key, shown once. Store it now; only its hash is kept.",
          secret: key.key,
        });
      },
    });
  }
}

/** The fields a workspace's quota is set with: timezone, limits, warning share. */
function quotaFields(
  { timezone, limits, warnAt },
  { emptyMeans, timezoneRequired },
) {
  return [
    {
      name: "timezone",
      label: "Timezone",
      value: timezone,
      required: timezoneRequired,
      hint: "IANA name; days and months are counted in it.",
    },
    ...LIMIT_NAMES.map((name) => ({
      name,
      label: limitLabel(name),
      type: "number",
      // Budgets are dollars, with cents and smaller fractions.
      min: isBudget(name) ? 0 : 1,
      step: isBudget(name) ? "any" : 1,
      value: limits[name] ?? "",
      placeholder: "unlimited",
      hint: emptyMeans,
    })),
    {
      name: "warn_at",
      label: "Warn at",
      type: "number",
      min: 0,
      max: 1,
      step: 0.01,
      value: String(warnAt),
      hint: "Share of a limit that raises a warning.",
    },
  ];
}

// ----- detail ---------------------------------------------------------------------------------

/** What a workspace key may be allowed to do, as the key form offers it. */
const KEY_SCOPES = [
  { scope: "proxy", label: "proxy: call OpenAI through /v1" },
  { scope: "report", label: "report: checks and usage reports" },
  { scope: "read", label: "read: status, notifications, live updates" },
];

function keyState(key) {
  if (key.revoked_at) return `revoked ${dateTime(key.revoked_at)}`;
  if (key.expires_at && Date.parse(key.expires_at) <= Date.now()) {
    return `expired ${dateTime(key.expires_at)}`;
  }
  if (key.expires_at) return `active until ${dateTime(key.expires_at)}`;
  return "active";
}

const MINUTE = 60_000;
const minuteTick = (t) =>
  new Date(t).toLocaleTimeString("en", { hour: "2-digit", minute: "2-digit" });
const dayTick = (t) =>
  new Date(t).toLocaleDateString("en", { month: "short", day: "numeric" });

export class Detail {
  constructor(app, id) {
    this.app = app;
    this.id = id;
    this.head = h("div");
    this.limitsPanel = h("section", {
      class: "panel",
      "aria-labelledby": "limits-title",
    });
    this.notificationsPanel = h("section", {
      class: "panel",
      "aria-labelledby": "notifications-title",
    });
    this.upstreamPanel = h("section", {
      class: "panel",
      "aria-labelledby": "upstream-title",
    });
    this.spendPanel = h("section", {
      class: "panel",
      "aria-labelledby": "spend-title",
    });
    this.hourChart = h("div", {}, h("p", { class: "empty" }, "Loading…"));
    this.dayChart = h("div", {}, h("p", { class: "empty" }, "Loading…"));
    this.keysPanel = app.isAdmin
      ? h("section", { class: "panel", "aria-labelledby": "keys-title" })
      : null;
    this.channelsPanel = app.isAdmin
      ? h("section", { class: "panel", "aria-labelledby": "channels-title" })
      : null;
    this.timers = [];
    this.element = h(
      "section",
      {},
      h("a", { class: "back", href: "#/" }, "← All workspaces"),
      this.head,
      h(
        "div",
        { class: "detail-grid" },
        this.notificationsPanel,
        this.limitsPanel,
        this.spendPanel,
        h(
          "section",
          { class: "panel", "aria-labelledby": "hour-title" },
          h("h2", { id: "hour-title" }, "Last hour, per minute"),
          this.hourChart,
        ),
        h(
          "section",
          { class: "panel", "aria-labelledby": "days-title" },
          h("h2", { id: "days-title" }, "Last 30 days, per day"),
          this.dayChart,
        ),
        this.upstreamPanel,
        this.keysPanel,
        this.channelsPanel,
      ),
    );
    this.update();
    this.renderNotifications();
    this.loadHistory();
    this.loadKeys();
    this.loadChannels();
    // The minute chart moves on by itself even when nothing happens.
    this.timers.push(setInterval(() => this.loadHistory("hour"), MINUTE));
  }

  close() {
    for (const timer of this.timers) clearInterval(timer);
    clearTimeout(this.historyTimer);
  }

  get doc() {
    return this.app.statuses.get(this.id);
  }

  /** A new status document arrived for this workspace. */
  update() {
    const doc = this.doc;
    if (!doc) {
      fill(
        this.head,
        h("h1", {}, "Workspace not found"),
        h("p", {}, `There is no workspace “${this.id}” that this key can see.`),
      );
      this.limitsPanel.hidden = true;
      this.notificationsPanel.hidden = true;
      this.upstreamPanel.hidden = true;
      this.spendPanel.hidden = true;
      if (this.keysPanel) this.keysPanel.hidden = true;
      if (this.channelsPanel) this.channelsPanel.hidden = true;
      return;
    }
    this.renderHead(doc);
    this.renderLimits(doc);
    this.renderSpend(doc);
    this.renderUpstream(doc);
    this.scheduleHistory();
  }

  renderHead(doc) {
    const app = this.app;
    fill(
      this.head,
      h(
        "div",
        { class: "detail-head" },
        h(
          "div",
          {},
          h("h1", {}, doc.name),
          h("p", { class: "id" }, doc.workspace),
          h(
            "p",
            { class: "status-line", dataset: { role: "status" } },
            badge(doc.status),
            h("span", { class: "resets" }, ` since ${timeAgo(doc.since)}`),
          ),
        ),
        app.isAdmin
          ? h(
              "div",
              { class: "actions" },
              doc.billing_block
                ? h(
                    "button",
                    {
                      type: "button",
                      class: "button",
                      dataset: { action: "lift" },
                      onclick: () => this.liftBlock(),
                    },
                    "Lift block",
                  )
                : null,
              h(
                "button",
                {
                  type: "button",
                  class: "button danger",
                  onclick: () => this.reset(),
                },
                "Reset usage",
              ),
              h(
                "button",
                {
                  type: "button",
                  class: "button subtle",
                  onclick: () => this.edit(),
                },
                "Edit settings",
              ),
            )
          : null,
      ),
      doc.reasons.length > 0
        ? h(
            "p",
            { class: "reasons" },
            `Why: ${doc.reasons.map(reasonText).join("; ")}.`,
          )
        : null,
      doc.blocked
        ? h(
            "p",
            { class: "reasons" },
            doc.retry_after_seconds !== null
              ? `Requests are refused for about ${Math.ceil(doc.retry_after_seconds)} s more.`
              : "Requests are refused until the cause is fixed.",
          )
        : null,
    );
  }

  renderLimits(doc) {
    const config = this.app.configs.get(doc.workspace);
    const rows = LIMIT_NAMES.map((name) =>
      h(
        "tr",
        {},
        h("th", { scope: "row" }, limitLabel(name)),
        h(
          "td",
          { class: "num" },
          doc.limits[name] ? amount(name, doc.limits[name].limit) : "unlimited",
        ),
      ),
    );
    this.limitsPanel.hidden = false;
    fill(
      this.limitsPanel,
      h("h2", { id: "limits-title" }, "Usage and limits"),
      gauges(doc.limits, { forecasts: true }),
      usageLine(doc.usage),
      h(
        "details",
        {},
        h("summary", {}, "Settings"),
        h(
          "table",
          {},
          h(
            "tbody",
            {},
            rows,
            config
              ? [
                  h(
                    "tr",
                    {},
                    h("th", { scope: "row" }, "Warn at"),
                    h("td", { class: "num" }, percent(config.warn_at)),
                  ),
                  h(
                    "tr",
                    {},
                    h("th", { scope: "row" }, "Timezone"),
                    h("td", { class: "num" }, config.timezone),
                  ),
                ]
              : null,
          ),
        ),
      ),
    );
  }

  /** What today and this month spent, and this month's cost by model. */
  renderSpend(doc) {
    const spend = doc.spend;
    this.spendPanel.hidden = !spend;
    if (!spend) return;
    const rows = spendByModel(doc, "this_month");
    fill(
      this.spendPanel,
      h("h2", { id: "spend-title" }, "Spend"),
      h(
        "p",
        { class: "spend-totals", dataset: { role: "spend" } },
        `Today ${dollars(spend.today.usd)} · this month ${dollars(spend.this_month.usd)} · prices of ${spend.prices_taken}`,
      ),
      rows.length > 0
        ? costChart({
            title: "Cost by model, this month",
            rows,
            money: dollars,
          })
        : h("p", { class: "empty" }, "No priced calls this month yet."),
    );
  }

  renderNotifications() {
    const active = this.app.notifications.get(this.id) ?? [];
    this.notificationsPanel.hidden = false;
    // Notifications need room to be read; an empty list does not.
    this.notificationsPanel.classList.toggle("wide", active.length > 0);
    fill(
      this.notificationsPanel,
      h("h2", { id: "notifications-title" }, "Active notifications"),
      active.length === 0
        ? h("p", { class: "empty" }, "None: all is well.")
        : h(
            "ul",
            { class: "notifications" },
            active.map((notification) =>
              h(
                "li",
                {
                  class: "notification",
                  dataset: {
                    severity: notification.severity,
                    kind: notification.kind,
                  },
                },
                h("p", { class: "severity" }, notification.severity),
                h("h3", {}, notification.title),
                h("p", {}, notification.message),
                notification.suggested_actions.length > 0
                  ? [
                      h("p", {}, h("strong", {}, "What to do")),
                      h(
                        "ol",
                        { class: "suggested-actions" },
                        notification.suggested_actions.map((action) =>
                          h("li", {}, action),
                        ),
                      ),
                    ]
                  : null,
                h(
                  "p",
                  { class: "resets" },
                  `Since ${dateTime(notification.created_at)}`,
                  notification.resolves_at
                    ? `; resolves ${dateTime(notification.resolves_at)}`
                    : "",
                ),
              ),
            ),
          ),
    );
  }

  renderUpstream(doc) {
    const errors = doc.errors;
    const upstreamRows = ["requests", "tokens"].map((bucket) => {
      const state = doc.upstream?.[bucket];
      return h(
        "tr",
        {},
        h(
          "th",
          { scope: "row" },
          bucket === "requests" ? "Requests" : "Tokens",
        ),
        h(
          "td",
          { class: "num" },
          state ? `${number(state.remaining)} / ${number(state.limit)}` : "—",
        ),
        h("td", {}, state?.resets_at ? resetsIn(state.resets_at) : "—"),
      );
    });
    const last = errors.last;
    this.upstreamPanel.hidden = false;
    fill(
      this.upstreamPanel,
      h("h2", { id: "upstream-title" }, "OpenAI"),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          {},
          h(
            "caption",
            { class: "visually-hidden" },
            "What OpenAI last reported as remaining",
          ),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", {}, "Headroom"),
              h("th", { class: "num" }, "Remaining / limit"),
              h("th", {}, "Resets"),
            ),
          ),
          h("tbody", {}, upstreamRows),
        ),
      ),
      doc.billing_block
        ? h(
            "p",
            {},
            `Billing block (${doc.billing_block.code}) since ${dateTime(doc.billing_block.since)}; next probe ${dateTime(doc.billing_block.next_probe_at)}.`,
          )
        : null,
      h("h3", {}, "Errors in the last hour"),
      h(
        "table",
        { class: "errors" },
        h(
          "tbody",
          {},
          [
            ["Rate limited (429)", errors.rate_limited],
            ["Billing quota (429)", errors.insufficient_quota],
            ["Server errors and timeouts", errors.server_error],
            ["Other errors", errors.other],
            ["Refused by quotawatch", errors.refused],
          ].map(([label, count]) =>
            h(
              "tr",
              {},
              h("th", { scope: "row" }, label),
              h("td", { class: "num" }, number(count)),
            ),
          ),
        ),
      ),
      last
        ? h(
            "div",
            { class: "last-error" },
            h("h3", {}, "Most recent upstream error"),
            h(
              "p",
              {},
              `${dateTime(last.at)}: HTTP ${last.status_code}`,
              last.code ? ` (${last.code})` : "",
              last.type && last.type !== last.code ? `, ${last.type}` : "",
            ),
            last.message ? h("p", {}, h("code", {}, last.message)) : null,
          )
        : h("p", { class: "empty" }, "No upstream errors recorded."),
    );
  }

  /** Refetches the minute chart soon after usage moved (at most every 2 s). */
  scheduleHistory() {
    if (this.historyTimer) return;
    this.historyTimer = setTimeout(() => {
      this.historyTimer = null;
      this.loadHistory("hour");
    }, 2000);
  }

  async loadHistory(which = "both") {
    const api = this.app.api;
    const load = async (target, window, step, title, tick) => {
      try {
        const history = await api.history(this.id, window, step);
        fill(target, usageChart({ title, points: history.points, tick }));
      } catch (error) {
        fill(
          target,
          h(
            "p",
            { class: "form-error" },
            `History unavailable: ${error.message}`,
          ),
        );
      }
    };
    const jobs = [];
    if (which !== "days")
      jobs.push(
        load(this.hourChart, "1h", "1m", "Last hour, per minute", minuteTick),
      );
    if (which !== "hour")
      jobs.push(
        load(this.dayChart, "30d", "1d", "Last 30 days, per day", dayTick),
      );
    await Promise.all(jobs);
  }

  async loadKeys() {
    if (!this.keysPanel || !this.doc) return;
    let keys;
    try {
      keys = (await this.app.api.keys(this.id)).keys;
    } catch (error) {
      fill(
        this.keysPanel,
        h("h2", { id: "keys-title" }, "API keys"),
        h("p", { class: "form-error" }, error.message),
      );
      return;
    }
    fill(
      this.keysPanel,
      h("h2", { id: "keys-title" }, "API keys"),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "keys" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", {}, "Key"),
              h("th", {}, "May"),
              h("th", {}, "Created"),
              h("th", {}, "Last used"),
              h("th", {}, "State"),
              h("th", {}, h("span", { class: "visually-hidden" }, "Actions")),
            ),
          ),
          h(
            "tbody",
            {},
            keys.map((key) =>
              h(
                "tr",
                { dataset: { key: key.id } },
                h(
                  "td",
                  {},
                  h("code", {}, `${key.prefix}…`),
                  key.name ? ` ${key.name}` : null,
                ),
                h("td", { class: "scopes" }, key.scopes.join(", ")),
                h("td", {}, dateTime(key.created_at)),
                h(
                  "td",
                  {},
                  key.last_used_at ? dateTime(key.last_used_at) : "never",
                ),
                h("td", {}, keyState(key)),
                h(
                  "td",
                  {},
                  key.revoked_at
                    ? null
                    : h(
                        "button",
                        {
                          type: "button",
                          class: "button subtle",
                          "aria-label": `Revoke key ${key.prefix}…`,
                          onclick: () => this.revoke(key),
                        },
                        "Revoke",
                      ),
                ),
              ),
            ),
          ),
        ),
      ),
      h(
        "div",
        { class: "actions" },
        h(
          "button",
          { type: "button", class: "button", onclick: () => this.createKey() },
          "Create key",
        ),
      ),
    );
  }

  reset() {
    return this.resetAfterConfirming("all", {
      title: `Reset ${this.doc.name}?`,
      text: "This clears the workspace's counters, any block (including an upstream billing block) and its active notifications.",
      confirmLabel: "Reset usage",
      danger: true,
    });
  }

  liftBlock() {
    return this.resetAfterConfirming("block", {
      title: `Lift the block of ${this.doc.name}?`,
      text: "Requests go upstream again at once; the counters stay as they are. Do this once billing is fixed.",
      confirmLabel: "Lift block",
      danger: false,
    });
  }

  async resetAfterConfirming(what, dialog) {
    const confirmed = await confirmDialog(dialog);
    if (!confirmed) return;
    try {
      await this.app.api.reset(this.id, what);
    } catch (error) {
      this.app.toasts.show({
        workspace: this.id,
        status: "error",
        title: "Reset failed",
        text: error.message,
        sticky: true,
      });
    }
  }

  edit() {
    const config = this.app.configs.get(this.id);
    if (!config) return;
    formDialog({
      title: `Settings of ${config.name}`,
      submitLabel: "Save",
      fields: [
        {
          name: "name",
          label: "Display name",
          value: config.name,
          required: true,
        },
        ...quotaFields(
          {
            timezone: config.timezone,
            limits: config.limits,
            warnAt: config.warn_at,
          },
          { emptyMeans: "Empty: unlimited.", timezoneRequired: true },
        ),
      ],
      onSubmit: async (values) => {
        const limits = Object.fromEntries(
          LIMIT_NAMES.map((name) => [
            name,
            values[name] === "" ? null : Number(values[name]),
          ]),
        );
        await this.app.api.updateWorkspace(this.id, {
          name: values.name,
          timezone: values.timezone,
          warn_at: Number(values.warn_at),
          limits,
        });
        await this.app.refreshCatalog();
        this.update();
      },
    });
  }

  createKey() {
    formDialog({
      title: `New key for ${this.doc.name}`,
      submitLabel: "Create key",
      fields: [
        {
          name: "name",
          label: "Name",
          hint: "What the key is for, e.g. “tenant page”. Optional.",
        },
        ...KEY_SCOPES.map(({ scope, label }) => ({
          name: scope,
          label,
          type: "checkbox",
          value: true,
        })),
        {
          name: "days",
          label: "Expires after (days)",
          type: "number",
          min: 1,
          max: 3650,
          step: 1,
          hint: "Empty: never.",
        },
      ],
      onSubmit: async (values) => {
        const scopes = KEY_SCOPES.map(({ scope }) => scope).filter(
          (scope) => values[scope],
        );
        if (scopes.length === 0) {
          throw new Error("Choose at least one thing the key may do.");
        }
        const key = await this.app.api.createKey(this.id, {
          name: values.name || undefined,
          scopes,
          expires_in: values.days ? Number(values.days) * 86400 : undefined,
        });
        await this.loadKeys();
        // Shown once the form has closed.
        setTimeout(() =>
          secretDialog({
            title: "New API key",
            text: `A key for ${this.id} that may ${scopes.join(", ")}, shown once. Store it now; only its hash is kept.`,
            secret: key.key,
          }),
        );
      },
    });
  }

  async revoke(key) {
    const confirmed = await confirmDialog({
      title: `Revoke key ${key.prefix}…?`,
      text: "Apps using it are refused from now on, and its live connections close.",
      confirmLabel: "Revoke",
      danger: true,
    });
    if (!confirmed) return;
    try {
      await this.app.api.revokeKey(this.id, key.id);
    } catch (error) {
      this.app.toasts.show({
        workspace: this.id,
        status: "error",
        title: "Key not revoked",
        text: error.message,
        sticky: true,
      });
    }
    await this.loadKeys();
  }

  async loadChannels() {
    if (!this.channelsPanel || !this.doc) return;
    const title = h("h2", { id: "channels-title" }, "Alert channels");
    let channels;
    try {
      channels = (await this.app.api.channels(this.id)).channels;
    } catch (error) {
      fill(
        this.channelsPanel,
        title,
        h("p", { class: "form-error" }, error.message),
      );
      return;
    }
    fill(
      this.channelsPanel,
      title,
      channels.length === 0
        ? h(
            "p",
            { class: "empty" },
            "No channel sends this workspace's alerts anywhere yet.",
          )
        : h(
            "div",
            { class: "table-wrap" },
            h(
              "table",
              { class: "channels" },
              h(
                "thead",
                {},
                h(
                  "tr",
                  {},
                  h("th", {}, "Channel"),
                  h("th", {}, "Sends"),
                  h("th", {}, "State"),
                  h(
                    "th",
                    {},
                    h("span", { class: "visually-hidden" }, "Actions"),
                  ),
                ),
              ),
              h(
                "tbody",
                {},
                channels.map((channel) => this.channelRow(channel)),
              ),
            ),
          ),
      h(
        "div",
        { class: "actions" },
        h(
          "button",
          {
            type: "button",
            class: "button",
            onclick: () => this.createChannel(),
          },
          "Add channel",
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
      h(
        "td",
        {},
        channel.name,
        " ",
        h("span", { class: "hint" }, channel.type),
        channel.to === null
          ? null
          : h("p", { class: "hint" }, `to ${channel.to.join(", ")}`),
        h(
          "p",
          { class: "hint" },
          channel.workspace === null ? "every workspace" : "this workspace",
        ),
      ),
      h(
        "td",
        {},
        channel.events === null ? "every event" : channel.events.join(", "),
        h(
          "p",
          { class: "hint" },
          `from ${channel.min_severity}${channel.resolutions ? ", with resolutions" : ""}`,
        ),
      ),
      h(
        "td",
        {},
        channel.enabled ? "enabled" : "disabled",
        declared
          ? h("p", { class: "hint" }, "set in the configuration file")
          : null,
      ),
      h(
        "td",
        {},
        action("Test", () => this.testChannel(channel)),
        declared
          ? null
          : action(channel.enabled ? "Disable" : "Enable", () =>
              this.changeChannel(channel, { enabled: !channel.enabled }),
            ),
        declared ? null : action("Delete", () => this.deleteChannel(channel)),
      ),
    );
  }

  createChannel() {
    channelDialog(this.app, {
      title: `New alert channel for ${this.doc.name}`,
      workspace: this.id,
      onCreated: () => this.loadChannels(),
    });
  }

  async testChannel(channel) {
    try {
      const { attempt } = await this.app.api.testChannel(channel.id);
      const delivered = attempt.outcome === "delivered";
      this.app.toasts.show({
        workspace: this.id,
        status: delivered ? "normal" : "error",
        title: delivered
          ? `Test alert delivered to ${channel.name}`
          : `Test alert to ${channel.name}: ${attempt.outcome.replace("_", " ")}`,
        text: delivered
          ? null
          : (attempt.error ??
            (attempt.http_status ? `HTTP ${attempt.http_status}` : null)),
        sticky: !delivered,
      });
    } catch (error) {
      this.app.toasts.show({
        workspace: this.id,
        status: "error",
        title: "Test alert not sent",
        text: error.message,
        sticky: true,
      });
    }
  }

  changeChannel(channel, changes) {
    return this.changeChannelBy(() =>
      this.app.api.updateChannel(channel.id, changes),
    );
  }

  async deleteChannel(channel) {
    const confirmed = await confirmDialog({
      title: `Delete the channel ${channel.name}?`,
      text: "Alerts are no longer sent there, and its delivery log goes with it.",
      confirmLabel: "Delete",
      danger: true,
    });
    if (!confirmed) return;
    await this.changeChannelBy(() => this.app.api.deleteChannel(channel.id));
  }

  async changeChannelBy(change) {
    try {
      await change();
    } catch (error) {
      this.app.toasts.show({
        workspace: this.id,
        status: "error",
        title: "Channel not changed",
        text: error.message,
        sticky: true,
      });
    }
    await this.loadChannels();
  }
}
