import type { ReactElement } from "react";
import type {
  Notification,
  NotificationEvent,
  QuotaMonitor,
  StatusDocument,
  TokenGrant,
} from "@quotawatch/client";

export interface QuotaMonitorOptions {
  /** Where quotawatch listens, e.g. `https://quota.example.com`. */
  baseUrl?: string;
  /** Where its WebSocket listens, when not at `baseUrl`. */
  wsUrl?: string;
  /** A workspace key (or the admin key with `workspace`). */
  token?: string;
  /** Fetches a short-lived browser token from your backend, instead of or beside `token`;
   * called again when the token expires or is refused (see `@quotawatch/client`). A new
   * function on every render is fine: the latest one is called. */
  getToken?: () => Promise<TokenGrant>;
  /** With the admin key: the workspace to follow. */
  workspace?: string;
  /** A QuotaMonitor to share instead of opening a connection of its own. */
  monitor?: QuotaMonitor;
}

export interface QuotaState {
  /** The workspace's status document, once known. */
  status: StatusDocument | null;
  /** Its active notifications. */
  notifications: Notification[];
  /** Whether live updates are flowing. */
  connected: boolean;
  /** The last problem, cleared when the connection is open again. */
  error: Error | null;
}

export function useQuotaMonitor(options: QuotaMonitorOptions): QuotaState;

export function applyNotificationEvent(active: Notification[], event: NotificationEvent): Notification[];

export function pressingNotification(notifications: Notification[]): Notification | undefined;

/** Which of a notification's texts to show: the tenant's (default) or the operator's. */
export type Audience = "tenant" | "operator";

/** Words to show instead of a notification's own, by kind or by a function. */
export type NotificationTexts =
  | Partial<Record<Notification["kind"], Partial<NotificationText>>>
  | ((notification: Notification, audience: Audience) => Partial<NotificationText> | undefined);

export interface NotificationText {
  title: string;
  message: string;
  suggestedActions: string[];
}

export function notificationText(
  notification: Notification,
  options?: { audience?: Audience; texts?: NotificationTexts },
): NotificationText;

export function QuotaNotification(props: {
  status: StatusDocument | null;
  notifications?: Notification[];
  className?: string;
  /** Default `"tenant"`: the text an app's users may read. */
  audience?: Audience;
  texts?: NotificationTexts;
}): ReactElement | null;

export function QuotaToast(props: {
  status: StatusDocument | null;
  /** How long a toast stays (not for `quota_exceeded`, which waits). Default 6000. */
  timeoutMs?: number;
  className?: string;
  /** Default `"tenant"`; `"operator"` also shows the machine-readable reasons. */
  audience?: Audience;
  /** Words for each status (`normal`, `warning`, `rate_limited`, `quota_exceeded`) and `dismiss`. */
  labels?: Partial<Record<StatusDocument["status"] | "dismiss", string>>;
}): ReactElement;
