// A small SVG chart: requests (and errors) as bars, tokens as a line on
// their own scale. Screen readers get a summary in the label and the
// numbers in a table below the picture.

import { h, svg } from "/dashboard/dom.js";
import { compact, number } from "/dashboard/format.js";

const WIDTH = 640;
const HEIGHT = 200;
const PAD = { top: 12, right: 44, bottom: 24, left: 44 };

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

/**
 * @param {object} options
 * @param {string} options.title what the chart shows, e.g. "Last hour, per minute"
 * @param {Array<{t:number, requests:number, tokens:number, errors:number}>} options.points
 * @param {(t:number) => string} options.tick how a bucket start reads on the axis
 */
export function usageChart({ title, points, tick }) {
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const maxRequests = niceMax(Math.max(0, ...points.map((p) => p.requests)));
  const maxTokens = niceMax(Math.max(0, ...points.map((p) => p.tokens)));
  const slot = plotWidth / Math.max(points.length, 1);
  const y = (value, max) => PAD.top + plotHeight - (value / max) * plotHeight;

  const bars = points.map((point, i) => {
    const x = PAD.left + i * slot + slot * 0.15;
    const width = Math.max(slot * 0.7, 1);
    const top = y(point.requests, maxRequests);
    const errorTop = y(point.errors, maxRequests);
    return [
      svg("rect", {
        class: "series-requests",
        x: x.toFixed(1),
        y: top.toFixed(1),
        width: width.toFixed(1),
        height: (PAD.top + plotHeight - top).toFixed(1),
      }),
      point.errors > 0
        ? svg("rect", {
            class: "series-errors",
            x: x.toFixed(1),
            y: errorTop.toFixed(1),
            width: width.toFixed(1),
            height: (PAD.top + plotHeight - errorTop).toFixed(1),
          })
        : null,
    ];
  });
  const line = points
    .map((point, i) => {
      const x = PAD.left + i * slot + slot / 2;
      return `${i === 0 ? "M" : "L"}${x.toFixed(1)},${y(point.tokens, maxTokens).toFixed(1)}`;
    })
    .join(" ");
  const labelEvery = Math.max(1, Math.ceil(points.length / 6));
  const ticks = points
    .map((point, i) =>
      i % labelEvery === 0
        ? svg(
            "text",
            {
              x: (PAD.left + i * slot + slot / 2).toFixed(1),
              y: HEIGHT - 6,
              "text-anchor": "middle",
            },
            tick(point.t),
          )
        : null,
    )
    .filter(Boolean);
  const totalRequests = points.reduce((sum, p) => sum + p.requests, 0);
  const totalTokens = points.reduce((sum, p) => sum + p.tokens, 0);
  const totalErrors = points.reduce((sum, p) => sum + p.errors, 0);
  const summary = `${title}: ${number(totalRequests)} requests, ${number(totalTokens)} tokens, ${number(totalErrors)} errors in all.`;

  const picture = svg(
    "svg",
    {
      class: "chart",
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-label": summary,
    },
    svg("line", {
      class: "axis",
      x1: PAD.left,
      y1: PAD.top + plotHeight,
      x2: WIDTH - PAD.right,
      y2: PAD.top + plotHeight,
    }),
    [0.5, 1].map((share) =>
      svg("line", {
        class: "grid",
        x1: PAD.left,
        x2: WIDTH - PAD.right,
        y1: y(maxRequests * share, maxRequests).toFixed(1),
        y2: y(maxRequests * share, maxRequests).toFixed(1),
      }),
    ),
    svg(
      "text",
      { x: PAD.left - 6, y: PAD.top + 4, "text-anchor": "end" },
      compact(maxRequests),
    ),
    svg(
      "text",
      { x: PAD.left - 6, y: PAD.top + plotHeight, "text-anchor": "end" },
      "0",
    ),
    svg(
      "text",
      { x: WIDTH - PAD.right + 6, y: PAD.top + 4 },
      compact(maxTokens),
    ),
    bars,
    points.length > 0 ? svg("path", { class: "series-tokens", d: line }) : null,
    ticks,
  );
  const table = h(
    "table",
    { class: "visually-hidden" },
    h("caption", {}, title),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", {}, "Time"),
        h("th", {}, "Requests"),
        h("th", {}, "Tokens"),
        h("th", {}, "Errors"),
      ),
    ),
    h(
      "tbody",
      {},
      points
        .filter((p) => p.requests || p.tokens || p.errors)
        .map((p) =>
          h(
            "tr",
            {},
            h("td", {}, tick(p.t)),
            h("td", {}, number(p.requests)),
            h("td", {}, number(p.tokens)),
            h("td", {}, number(p.errors)),
          ),
        ),
    ),
  );
  return h(
    "figure",
    { class: "chart-figure" },
    h("figcaption", { class: "visually-hidden" }, title),
    picture,
    h(
      "ul",
      { class: "legend" },
      h(
        "li",
        {},
        h("span", { class: "swatch-requests" }),
        `Requests (left scale, max ${compact(maxRequests)})`,
      ),
      h("li", {}, h("span", { class: "swatch-errors" }), "Errors"),
      h(
        "li",
        {},
        h("span", { class: "swatch-tokens" }),
        `Tokens (right scale, max ${compact(maxTokens)})`,
      ),
    ),
    table,
  );
}

/**
 * What each model cost, as horizontal bars, most first, with the figures
 * beside them (a bar chart of money needs no scale to be read).
 * @param {object} options
 * @param {string} options.title what the chart shows, e.g. "Cost by model, this month"
 * @param {Array<{model:string, usd:number, share:number}>} options.rows as `spendByModel` gives them
 * @param {(usd:number) => string} options.money how an amount reads
 */
export function costChart({ title, rows, money }) {
  const most = Math.max(0, ...rows.map((row) => row.usd));
  return h(
    "figure",
    { class: "chart-figure cost-chart" },
    h("figcaption", {}, title),
    h(
      "ul",
      { class: "cost-bars" },
      rows.map((row) => {
        const bar = h("span", { class: "cost-bar" });
        bar.style.width = `${most > 0 ? ((row.usd / most) * 100).toFixed(1) : 0}%`;
        return h(
          "li",
          {
            dataset: { model: row.model },
            "aria-label": `${row.model}: ${money(row.usd)}, ${Math.round(row.share * 100)}% of the spend`,
          },
          h("span", { class: "cost-model" }, row.model),
          h("span", { class: "cost-track", "aria-hidden": "true" }, bar),
          h(
            "span",
            { class: "cost-amount", dataset: { role: "cost" } },
            money(row.usd),
          ),
        );
      }),
    ),
  );
}
