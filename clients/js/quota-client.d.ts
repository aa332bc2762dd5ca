// Types for quota-client.js: the quotawatch status document, notifications,
// and the QuotaMonitor that follows them live.

export type Status = "normal" | "warning" | "rate_limited" | "quota_exceeded";
/** What a limit counts; `usd` limits (budgets) are in dollars. */
export type LimitMetric = "requests" | "tokens" | "usd";
/**
 * The words of each calendar period, by the window that counts it: how
 * texts and names speak of it, and its field in a status's `usage`. The
 * names below are made from these, so that a new period is one line here.
 */
export interface CalendarPeriods {
  day: { adjective: "daily"; usage: "today" };
  month: { adjective: "monthly"; usage: "this_month" };
}
/** What a limit counts over: the sliding minute or a calendar period. */
export type LimitWindow = "minute" | keyof CalendarPeriods;
/** A limit: a metric over a window, e.g. `tokens_per_month`. */
export type LimitName = `${LimitMetric}_per_${LimitWindow}`;

/** Counts of requests or tokens; dollars for a `usd` limit. */
export interface LimitState {
  limit: number;
  used: number;
  remaining: number;
  /** Used share of the limit, 0 to 1 (or more after an over-report). */
  utilization: number;
  /** When the window frees up (RFC 3339), or null when nothing is used. */
  resets_at: string | null;
}

export interface UpstreamBucket {
  limit: number | null;
  remaining: number | null;
  resets_at: string | null;
  observed_at: string;
}

export interface UpstreamError {
  at: string;
  status_code: number;
  type: string | null;
  code: string | null;
  message: string | null;
}

/** What was used over a span; `usd` is dollars spent. */
export interface UsageCounts {
  requests: number;
  tokens: number;
  usd: number;
}

/** What one model's calls cost in a period, with the tokens that cost it. */
export interface ModelSpend {
  usd: number;
  /** Prompt tokens, cached ones included. */
  prompt_tokens: number;
  cached_tokens: number;
  /** Completion tokens, reasoning included. */
  completion_tokens: number;
}

/** What a calendar period spent. */
export interface PeriodSpend {
  /** Dollars, as the period's budget counts it (calls in flight at their estimates). */
  usd: number;
  /** Finished calls by model (calls that named no model cost nothing and are left out). */
  by_model: Record<string, ModelSpend>;
}

/** What today and this month spent, in all and by model. */
export type SpendDocument = {
  [Period in keyof CalendarPeriods as CalendarPeriods[Period]["usage"]]: PeriodSpend;
} & {
  /** The day the prices in force were taken. */
  prices_taken: string;
};

export interface StatusDocument {
  workspace: string;
  name: string;
  status: Status;
  since: string;
  /** Machine-readable causes, highest first, e.g. `requests_per_day_exhausted`. */
  reasons: string[];
  /** True while this instance cannot reach the shared counters and enforces limits on its own. */
  degraded: boolean;
  /** Whether a request would be refused right now. */
  blocked: boolean;
  retry_after_seconds: number | null;
  limits: Partial<Record<LimitName, LimitState>>;
  /** What was used, whether or not limits are set. */
  usage: {
    last_minute: UsageCounts;
  } & {
    /** Since the period's start, midnight in the workspace's timezone:
     * `today`, `this_month`. */
    [Period in keyof CalendarPeriods as CalendarPeriods[Period]["usage"]]: UsageCounts;
  };
  upstream: { requests: UpstreamBucket | null; tokens: UpstreamBucket | null } | null;
  /** `credential` names the upstream credential blocked for every workspace billed to it; null for the workspace's own block. */
  billing_block: { code: string; since: string; next_probe_at: string; credential: string | null } | null;
  errors: {
    window_seconds: number;
    rate_limited: number;
    insufficient_quota: number;
    server_error: number;
    other: number;
    refused: number;
    last: UpstreamError | null;
  };
  /** Models called that the prices do not know, charged at the unpriced rates. */
  unpriced_models: string[];
  /** What today and this month spent, in all and by model. */
  spend: SpendDocument;
  updated_at: string;
}

export type Severity = "info" | "warning" | "critical";

export interface Notification {
  id: string;
  workspace: string | null;
  severity: Severity;
  kind:
    | "approaching_limit"
    | "rate_limited"
    | `${CalendarPeriods[keyof CalendarPeriods]["adjective"]}_quota_exhausted`
    | "upstream_rate_limited"
    | "upstream_quota_exhausted"
    | "upstream_errors"
    | "storage_unavailable"
    | "shared_store_unavailable"
    | "upstream_key_missing"
    | "unpriced_model"
    /** A budget (a usd limit) at its warning threshold, or used up: their
     * suggested actions name the budget to set and a cheaper model. */
    | "budget_approaching"
    | "budget_exhausted";
  /** The operator's text: what happened in full, and what to change where. */
  title: string;
  message: string;
  suggested_actions: string[];
  /** What a tenant's own users may be shown: no internal endpoints or operator URLs. */
  tenant: { title: string; message: string; suggested_actions: string[] };
  limit: LimitName | null;
  created_at: string;
  resolves_at: string | null;
  resolved_at: string | null;
}

export interface NotificationsDocument {
  workspace: string;
  status: Status;
  notifications: Notification[];
}

export interface StatusEvent {
  workspace: string;
  data: StatusDocument;
  /** `snapshot` on (re)connect and resync, `change` on a status change,
   * reset or settings change, `usage` when usage moved. */
  reason: "snapshot" | "change" | "usage";
}

export type NotificationEvent =
  | { workspace: string | null; event: "raised" | "resolved"; data: Notification }
  | { workspace: string | null; event: "snapshot"; notifications: Notification[] };

export interface RemovedEvent {
  workspace: string;
}

export interface ConnectionEvent {
  state: "connecting" | "open" | "reconnecting" | "closed";
  attempt?: number;
  delayMs?: number;
  error?: Error;
}

export interface QuotaEventMap {
  status: StatusEvent;
  notification: NotificationEvent;
  removed: RemovedEvent;
  connection: ConnectionEvent;
}

export type AnyQuotaEvent = {
  [K in keyof QuotaEventMap]: { type: K } & QuotaEventMap[K];
}[keyof QuotaEventMap];

/** What `getToken` resolves to: a token, or a token with its expiry (an
 * RFC 3339 string such as quotawatch's `expires_at`, milliseconds since
 * the epoch, or a Date). */
export type TokenGrant = string | { token: string; expiresAt?: string | number | Date | null };

export interface QuotaMonitorOptions {
  /** Where quotawatch listens, e.g. `https://quota.example.com`. */
  baseUrl: string;
  /** Where its WebSocket listens, when not at `baseUrl` (e.g. `wss://quota-ws.example.com`);
   * `/api/quota/ws` is appended, and `http(s)` means `ws(s)`. */
  wsUrl?: string;
  /** A workspace key, a browser token, or the admin key. Sent only in the
   * Authorization header. Needed unless `getToken` is given. */
  token?: string;
  /** Fetches a fresh token from your backend (which mints it with
   * `POST /api/tokens`). Called for the first token when `token` is not
   * given, before a token with a known expiry runs out (within 30 s of
   * `expiresAt`), and when quotawatch answers 401 `expired_api_key` or
   * `invalid_api_key`, after which the request is sent once more. Calls
   * that need a token at the same time share one call. A WebSocket closed
   * for an expired or revoked token is reopened with a fresh ticket from a
   * fresh token. */
  getToken?: () => Promise<TokenGrant>;
  /** With the admin key: the one workspace to follow (default: all). */
  workspace?: string;
  /** How often to ping; a connection silent for two intervals is re-opened. Default 15000. */
  heartbeatMs?: number;
  /** Reconnect delays: exponential from `initialMs` up to `maxMs`, with jitter. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Implementations to use instead of the globals (tests, older runtimes). */
  fetch?: typeof fetch;
  WebSocket?: typeof WebSocket;
}

export class QuotaApiError extends Error {
  readonly status: number;
  readonly code: string | null;
  readonly type: string | null;
}

export function backoffDelay(
  attempt: number,
  backoff: { initialMs: number; maxMs: number },
  random?: () => number,
): number;

/** What `status`'s calendar `period` spent on each model, most first; `share`
 * is the model's part of what the listed models spent (0 to 1). */
export function spendByModel(
  status: StatusDocument | null | undefined,
  period?: CalendarPeriods[keyof CalendarPeriods]["usage"],
): Array<{ model: string; usd: number; share: number }>;

export class QuotaMonitor extends EventTarget {
  constructor(options: QuotaMonitorOptions);
  readonly baseUrl: string;
  /** The WebSocket's base URL (`ws:` or `wss:`). */
  readonly wsUrl: string;
  readonly workspace: string | null;
  /** Whether the WebSocket is open right now. */
  readonly connected: boolean;
  /** One status document; for the admin key without a workspace, all of them. */
  getStatus(): Promise<StatusDocument | { workspaces: StatusDocument[] }>;
  getNotifications(options?: {
    history?: boolean;
  }): Promise<NotificationsDocument | { workspaces: NotificationsDocument[] }>;
  on<K extends keyof QuotaEventMap>(type: K, listener: (event: QuotaEventMap[K]) => void): () => void;
  /** Opens the live connection (once) and passes every event to `listener`. */
  subscribe(listener?: (event: AnyQuotaEvent) => void): () => void;
  /** Closes the connection for good. */
  close(): void;
}
