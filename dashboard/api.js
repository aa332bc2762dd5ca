// The REST calls the dashboard makes beyond what QuotaMonitor covers: the
// workspace catalog, keys, history, reset, alert channels and deliveries. Errors carry the API's own
// message, which names the problem.

import { QuotaApiError } from "/sdk/quota-client.js";

export class Api {
  #token;

  constructor(token) {
    this.#token = token;
  }

  async request(method, path, body) {
    const headers = {
      Authorization: `Bearer ${this.#token}`,
      Accept: "application/json",
    };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const answer =
      response.status === 204 ? null : await response.json().catch(() => null);
    if (!response.ok) throw new QuotaApiError(response.status, answer);
    return answer;
  }

  workspaces() {
    return this.request("GET", "/api/workspaces");
  }

  workspace(id) {
    return this.request("GET", `/api/workspaces/${encodeURIComponent(id)}`);
  }

  createWorkspace(settings) {
    return this.request("POST", "/api/workspaces", settings);
  }

  updateWorkspace(id, changes) {
    return this.request(
      "PATCH",
      `/api/workspaces/${encodeURIComponent(id)}`,
      changes,
    );
  }

  keys(id) {
    return this.request(
      "GET",
      `/api/workspaces/${encodeURIComponent(id)}/keys`,
    );
  }

  /** `options`: `{name, scopes, expires_in}` (seconds), all optional. */
  createKey(id, options = {}) {
    return this.request(
      "POST",
      `/api/workspaces/${encodeURIComponent(id)}/keys`,
      options,
    );
  }

  revokeKey(id, keyId) {
    return this.request(
      "DELETE",
      `/api/workspaces/${encodeURIComponent(id)}/keys/${encodeURIComponent(keyId)}`,
    );
  }

  /** `what`: "block" (lift the upstream's blocks, keep the counts), "usage"
   * or "all". */
  reset(id, what = "all") {
    return this.request("POST", "/api/quota/reset", { workspace: id, what });
  }

  history(id, window, step) {
    const query = new URLSearchParams({ workspace: id, window, step });
    return this.request("GET", `/api/quota/history?${query}`);
  }

  notifications(id) {
    const query = new URLSearchParams({ workspace: id, include: "history" });
    return this.request("GET", `/api/quota/notifications?${query}`);
  }

  /** A workspace's alert channels and the global ones. */
  channels(workspace) {
    const query = new URLSearchParams({ workspace });
    return this.request("GET", `/api/alerts/channels?${query}`);
  }

  createChannel(channel) {
    return this.request("POST", "/api/alerts/channels", channel);
  }

  updateChannel(id, changes) {
    return this.request(
      "PATCH",
      `/api/alerts/channels/${encodeURIComponent(id)}`,
      changes,
    );
  }

  deleteChannel(id) {
    return this.request(
      "DELETE",
      `/api/alerts/channels/${encodeURIComponent(id)}`,
    );
  }

  /** Every channel: the global ones and every workspace's. */
  allChannels() {
    return this.request("GET", "/api/alerts/channels");
  }

  /** The delivery log, newest first; `filters`: `{channel, status, limit}`,
   * each optional. */
  deliveries(filters = {}) {
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(filters)) {
      if (value !== undefined && value !== "") query.set(name, value);
    }
    return this.request("GET", `/api/alerts/deliveries?${query}`);
  }

  /** Sends a test event; answers the attempt. */
  testChannel(id) {
    return this.request("POST", "/api/alerts/test", { channel: id });
  }
}
