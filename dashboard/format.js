// How numbers, times and statuses read on screen.

export const STATUS_LABELS = {
  normal: "Normal",
  warning: "Warning",
  rate_limited: "Rate limited",
  quota_exceeded: "Quota exceeded",
};

// A symbol beside the word, so that status never depends on colour alone.
const STATUS_SYMBOLS = {
  normal: "✓",
  warning: "!",
  rate_limited: "⏸",
  quota_exceeded: "✕",
};

/** Worst first, for sorting. */
export const STATUS_RANK = {
  quota_exceeded: 0,
  rate_limited: 1,
  warning: 2,
  normal: 3,
};

// Every limit the server knows, in the order it lists them: a metric over
// a window. A new limit needs its label here and nothing else on screen.
export const LIMIT_LABELS = {
  requests_per_minute: "Requests / minute",
  requests_per_day: "Requests / day",
  requests_per_month: "Requests / month",
  tokens_per_minute: "Tokens / minute",
  tokens_per_day: "Tokens / day",
  tokens_per_month: "Tokens / month",
};

export const LIMIT_NAMES = Object.keys(LIMIT_LABELS);

export function statusLabel(status) {
  return STATUS_LABELS[status] ?? status;
}

export function statusSymbol(status) {
  return STATUS_SYMBOLS[status] ?? "?";
}

const numberFormat = new Intl.NumberFormat("en");
const compactFormat = new Intl.NumberFormat("en", {
  notation: "compact",
  maximumFractionDigits: 1,
});

export function number(value) {
  return value === null || value === undefined
    ? "—"
    : numberFormat.format(value);
}

export function compact(value) {
  return value === null || value === undefined
    ? "—"
    : compactFormat.format(value);
}

export function percent(fraction) {
  return `${Math.round(Math.min(fraction, 9.99) * 100)}%`;
}

/** "3h 12m", "45s": the two largest units of a duration in milliseconds. */
export function duration(ms) {
  if (!(ms > 0)) return "now";
  const seconds = Math.ceil(ms / 1000);
  const units = [
    ["d", 86_400],
    ["h", 3_600],
    ["m", 60],
    ["s", 1],
  ];
  const parts = [];
  let rest = seconds;
  for (const [unit, size] of units) {
    if (rest >= size || (parts.length === 0 && size === 1)) {
      parts.push(`${Math.floor(rest / size)}${unit}`);
      rest %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.join(" ");
}

/** "resets in 3h 12m" for an RFC 3339 instant, or null. */
export function resetsIn(instant, now = Date.now()) {
  if (!instant) return null;
  return `resets in ${duration(Date.parse(instant) - now)}`;
}

export function dateTime(instant) {
  if (!instant) return "—";
  return new Date(instant).toLocaleString("en", {
    dateStyle: "medium",
    timeStyle: "short",
  });
}

export function timeAgo(instant, now = Date.now()) {
  if (!instant) return "—";
  return `${duration(now - Date.parse(instant))} ago`;
}

const REASONS = {
  upstream_rate_limited: "OpenAI rate limit hit",
  upstream_error_rate: "many failing upstream calls",
  upstream_key_rejected: "OpenAI rejected the upstream key",
};

/** A machine reason (`requests_per_day_exhausted`) in words. */
export function reasonText(reason) {
  if (REASONS[reason]) return REASONS[reason];
  for (const [name, label] of Object.entries(LIMIT_LABELS)) {
    if (reason === `${name}_exhausted`)
      return `${label.toLowerCase()} exhausted`;
    if (reason === `${name}_approaching`)
      return `${label.toLowerCase()} nearly used`;
  }
  // The remaining upstream reasons name OpenAI's billing code.
  if (reason.startsWith("upstream_")) {
    return `OpenAI billing quota exhausted (${reason.slice("upstream_".length)})`;
  }
  return reason.replaceAll("_", " ");
}
