// A small stacked bar chart of recent deliveries per outcome, drawn as inline SVG.
//
// Statistics are counters since the daemon started: the console keeps the last samples it
// polled for each connection and draws the difference between consecutive ones.

import { h, svg } from "./dom.js";

export const OUTCOMES = ["delivered", "retried", "failed", "expired", "filtered"];
const SAMPLES = 30;
const history = new Map(); // connection id → [{time, statistics}]

/** Remember a polled sample of a connection's statistics. */
export function record(id, statistics) {
  const samples = history.get(id) || [];
  samples.push({ time: Date.now(), statistics });
  while (samples.length > SAMPLES + 1) samples.shift();
  history.set(id, samples);
}

/** The deliveries per outcome between consecutive samples (a restart of the daemon resets
 * its counters: a negative difference counts as what the new counter says). */
function bars(id) {
  const samples = history.get(id) || [];
  const out = [];
  for (let i = 1; i < samples.length; i += 1) {
    const before = samples[i - 1].statistics;
    const now = samples[i].statistics;
    const bar = {};
    for (const outcome of OUTCOMES) {
      const diff = (now[outcome] || 0) - (before[outcome] || 0);
      bar[outcome] = diff >= 0 ? diff : now[outcome] || 0;
    }
    out.push(bar);
  }
  return out;
}

/** The chart of one connection, with a text alternative and a legend. */
export function chart(id) {
  const data = bars(id);
  const width = 300;
  const height = 60;
  const slot = width / SAMPLES;
  const top = Math.max(1, ...data.map((b) => OUTCOMES.reduce((sum, o) => sum + b[o], 0)));
  const totals = Object.fromEntries(OUTCOMES.map((o) => [o, data.reduce((s, b) => s + b[o], 0)]));
  const summary = OUTCOMES.map((o) => `${totals[o]} ${o}`).join(", ");
  const title = `Recent deliveries of the last ${data.length} refreshes: ${summary}`;
  const picture = svg(
    "svg",
    { class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": title },
    svg("title", {}, title),
    svg("line", { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, stroke: "#d1d5db", "stroke-width": 1 }),
  );
  const offset = SAMPLES - data.length;
  data.forEach((bar, i) => {
    let y = height;
    for (const outcome of OUTCOMES) {
      if (!bar[outcome]) continue;
      const tall = (bar[outcome] / top) * (height - 2);
      y -= tall;
      picture.append(
        svg("rect", { class: `out-${outcome}`, x: (offset + i) * slot + 1, y, width: Math.max(1, slot - 2), height: tall }),
      );
    }
  });
  const legend = h(
    "div.legend",
    { "aria-hidden": "true" },
    OUTCOMES.map((o) => h("span", {}, h("span.swatch", { class: `swatch out-${o}` }), `${o} ${totals[o]}`)),
  );
  return h("div.chart-box", {}, picture, legend);
}
