import type { ReactElement } from "react";
import type { Notification, NotificationEvent, QuotaMonitor, StatusDocument } from "@quotawatch/client";

export interface QuotaMonitorOptions {
  /** Where quotawatch listens, e.g. `https://quota.example.com`. */
  baseUrl?: string;
  /** A workspace key (or the admin key with `workspace`). */
  token?: string;
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

export function QuotaNotification(props: {
  status: StatusDocument | null;
  notifications?: Notification[];
  className?: string;
}): ReactElement | null;

export function QuotaToast(props: {
  status: StatusDocument | null;
  /** How long a toast stays (not for `quota_exceeded`, which waits). Default 6000. */
  timeoutMs?: number;
  className?: string;
}): ReactElement;
