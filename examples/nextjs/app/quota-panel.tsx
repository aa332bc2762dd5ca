"use client";

import type { LimitName, TokenGrant } from "@quotawatch/client";
import {
  QuotaNotification,
  QuotaToast,
  useQuotaMonitor,
} from "@quotawatch/react";

// NEXT_PUBLIC_ variables are written into the page's JavaScript by
// `next build`: change them, build again.
const API_URL = process.env.NEXT_PUBLIC_API_URL;
const WS_URL = process.env.NEXT_PUBLIC_WS_URL;

const LIMIT_LABELS: Record<LimitName, string> = {
  requests_per_minute: "Requests this minute",
  requests_per_day: "Requests today",
  requests_per_month: "Requests this month",
  tokens_per_minute: "Tokens this minute",
  tokens_per_day: "Tokens today",
  tokens_per_month: "Tokens this month",
  usd_per_minute: "Spend this minute",
  usd_per_day: "Spend today",
  usd_per_month: "Spend this month",
};

/** A browser token from this app's own route, which holds the service key. */
async function getToken(): Promise<TokenGrant> {
  const answer = await fetch("/api/quota-token", {
    method: "POST",
    cache: "no-store",
  });
  if (!answer.ok) throw new Error(`no quota token: HTTP ${answer.status}`);
  return answer.json();
}

export function QuotaPanel() {
  const quota = useQuotaMonitor({ baseUrl: API_URL, wsUrl: WS_URL, getToken });
  const { status, connected, error } = quota;
  if (!API_URL) {
    return (
      <p role="alert">
        Set NEXT_PUBLIC_API_URL to quotawatch&apos;s URL and build again.
      </p>
    );
  }
  return (
    <section className="quota-panel">
      <p>
        Status:{" "}
        <strong id="quota-level" data-status={status?.status ?? "loading"}>
          {status?.status ?? "loading"}
        </strong>{" "}
        <span id="quota-connection">{connected ? "live" : "connecting"}</span>
      </p>
      {error && !connected ? <p id="quota-error">{error.message}</p> : null}
      {status ? (
        <table>
          <tbody>
            {(Object.keys(LIMIT_LABELS) as LimitName[])
              .filter((name) => status.limits[name])
              .map((name) => (
                <tr key={name} id={`usage-${name}`}>
                  <th scope="row">{LIMIT_LABELS[name]}</th>
                  <td>
                    {status.limits[name]!.used} / {status.limits[name]!.limit}
                  </td>
                </tr>
              ))}
            <tr id="usage-today">
              <th scope="row">Used today</th>
              <td>
                {status.usage.today.requests} requests,{" "}
                {status.usage.today.tokens} tokens
              </td>
            </tr>
          </tbody>
        </table>
      ) : null}
      <QuotaNotification {...quota} />
      <QuotaToast status={status} />
    </section>
  );
}
