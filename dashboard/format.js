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

// The words limits are named with: a limit is a metric over a window,
// "{metric}_per_{window}". A new metric or window needs its word here and
// nothing else on screen.
const METRICS = ["requests", "tokens", "usd"];
const WINDOWS = ["minute", "day", "month"];

// Every limit the server knows, in the order it lists them: metric by
// metric, shortest window first.
export const LIMIT_NAMES = METRICS.flatMap((metric) =>
  WINDOWS.map((window) => `${metric}_per_${window}`),
);

// How a metric reads where its name would be lowercase-capitalised.
const METRIC_LABELS = { usd: "USD" };

/** A limit's name in words: "tokens_per_month" reads "Tokens / month". */
export function limitLabel(name) {
  const [metric, window] = name.split("_per_");
  const label =
    METRIC_LABELS[metric] ?? `${metric[0].toUpperCase()}${metric.slice(1)}`;
  return `${label} / ${window}`;
}

/** Whether a limit counts money, which the server gives in dollars. */
export function isBudget(name) {
  return name.startsWith("usd_per_");
}

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

const dollarFormat = new Intl.NumberFormat("en", {
  style: "currency",
  currency: "USD",
  maximumFractionDigits: 6,
});

/** Dollars as money: "$49.98", "$0.00042". */
export function dollars(value) {
  return value === null || value === undefined
    ? "—"
    : dollarFormat.format(value);
}

/** An amount of a limit: dollars for a budget, else a count. */
export function amount(name, value) {
  return isBudget(name) ? dollars(value) : number(value);
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

/** An instant in local time: "15:42" today, "Dec 4, 15:42" on another day. */
export function clockTime(instant, now = Date.now()) {
  return localTime(instant, now, { hour: "2-digit", minute: "2-digit" });
}

/** An instant in local time to the second: "15:42:07" today, "Dec 4,
 * 15:42:07" on another day, for logs whose entries come seconds apart. */
export function preciseTime(instant, now = Date.now()) {
  return localTime(instant, now, {
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
}

function localTime(instant, now, timeOptions) {
  const at = new Date(instant);
  const time = at.toLocaleTimeString("en-GB", timeOptions);
  if (at.toDateString() === new Date(now).toDateString()) return time;
  const day = at.toLocaleDateString("en", { month: "short", day: "numeric" });
  return `${day}, ${time}`;
}

/** A limit's forecast in words, from the server's numbers, or null when it
 * has none or does not run out before it resets. A minute "resets" only as
 * its calls age out, so its sentence names no reset. */
export function forecastText(name, limit, now = Date.now()) {
  const forecast = limit.forecast;
  if (!forecast) return null;
  const calendar = !name.endsWith("_per_minute");
  if (forecast.basis === "used_up") {
    return calendar && limit.resets_at
      ? `${name} is used up; it resets at ${clockTime(limit.resets_at, now)}`
      : `${name} is used up`;
  }
  if (!forecast.exhausts_at) return null;
  const before =
    calendar && limit.resets_at
      ? `, ${duration(Date.parse(limit.resets_at) - Date.parse(forecast.exhausts_at))} before it resets`
      : "";
  return `At this pace ${name} runs out at ${clockTime(forecast.exhausts_at, now)}${before}`;
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
  for (const name of LIMIT_NAMES) {
    const label = limitLabel(name).toLowerCase();
    if (reason === `${name}_exhausted`) return `${label} exhausted`;
    if (reason === `${name}_approaching`) return `${label} nearly used`;
  }
  // The remaining upstream reasons name OpenAI's billing code.
  if (reason.startsWith("upstream_")) {
    return `OpenAI billing quota exhausted (${reason.slice("upstream_".length)})`;
  }
  return reason.replaceAll("_", " ");
}
