// Ingest health: GET /api/v1/health polled; counters become rates, drawn as small
// charts beside the gauges (buffered bytes, queue and WAL depth, spool).
import { h, replace, fmtNum, fmtInt, fmtBytes, fmtDuration, axisSize } from "./dom.js";
import { api } from "./api.js";

const uPlot = window.uPlot;
const POLL_MS = 2000;
const KEEP = 300; // samples: ten minutes

// [label, field, kind]: "rate" charts a counter's per-second rate, "gauge" its value.
const CHARTS = [
  ["Points accepted / s", "points_accepted_total", "rate", fmtNum],
  ["Events accepted / s", "events_accepted_total", "rate", fmtNum],
  ["Points rejected / s", "points_rejected_total", "rate", fmtNum],
  ["WAL appends / s", "wal_appends_total", "rate", fmtNum],
  ["Files published / s", "files_published_total", "rate", fmtNum],
  ["Bytes published / s", "published_bytes_total", "rate", fmtBytes],
  ["Compactions / s", "compactions_total", "rate", fmtNum],
  ["Buffered bytes", "buffered_bytes", "gauge", fmtBytes],
  ["Queue depth (batches)", "queue_depth", "gauge", fmtNum],
  ["WAL bytes", "wal_bytes", "gauge", fmtBytes],
  ["Spool bytes", "spool_bytes", "gauge", fmtBytes],
];

function cards(s, rates) {
  const has = (f) => typeof s[f] === "number";
  const card = (label, value, sub, field) =>
    h("div", { class: "card", dataset: { field } }, h("div", { class: "label", text: label }), h("div", { class: "value", text: value }), sub ? h("div", { class: "sub", text: sub }) : null);
  const budget = s.memory_budget_bytes ? ` of ${fmtBytes(s.memory_budget_bytes)}` : "";
  return [
    card("Version", s.version || "—", null, "version"),
    card("Uptime", fmtDuration(s.uptime_s), null, "uptime_s"),
    card("Points accepted", fmtInt(s.points_accepted_total), rates.points_accepted_total != null ? `${fmtNum(rates.points_accepted_total)} / s` : null, "points_accepted_total"),
    card("Events accepted", fmtInt(s.events_accepted_total), rates.events_accepted_total != null ? `${fmtNum(rates.events_accepted_total)} / s` : null, "events_accepted_total"),
    card("Points rejected", fmtInt(s.points_rejected_total), null, "points_rejected_total"),
    card("Buffered", fmtBytes(s.buffered_bytes), budget ? budget.trim() : null, "buffered_bytes"),
    card("Queue depth", has("queue_depth") ? fmtInt(s.queue_depth) + " batches" : "—", null, "queue_depth"),
    card("WAL", has("wal_bytes") ? fmtBytes(s.wal_bytes) : "—", `${fmtInt(s.wal_appends_total)} appends`, "wal_bytes"),
    card("Spool", fmtBytes(s.spool_bytes), `${fmtInt(s.spool_files)} files`, "spool_bytes"),
    card("Files published", fmtInt(s.files_published_total), fmtBytes(s.published_bytes_total), "files_published_total"),
    card("Compactions", fmtInt(s.compactions_total), `${fmtInt(s.compacted_files_total)} files merged`, "compactions_total"),
  ];
}

export async function healthPage(main) {
  document.title = "Health · mboxd";
  const cardsEl = h("div", { class: "cards" });
  const grid = h("div", { class: "health-grid" });
  replace(main, h("h1", { text: "Ingest health" }), cardsEl, h("h2", { text: "Over time" }), grid);

  const times = [];
  const values = new Map(CHARTS.map(([, f]) => [f, []]));
  let prev = null;
  const charts = CHARTS.map(([label, field, kind, fmt]) => {
    const cell = h("div", { class: "chart-card small", dataset: { key: field } }, h("div", { class: "chart-title", text: label }), h("div", { class: "plot" }));
    grid.append(cell);
    return { label, field, kind, fmt, cell, u: null };
  });

  const sample = (s) => {
    const t = Date.now() / 1000;
    const rates = {};
    for (const { field, kind } of charts) {
      let v = typeof s[field] === "number" ? s[field] : null;
      if (kind === "rate") {
        const dt = prev ? s.uptime_s - prev.uptime_s : 0;
        v = prev && dt > 0 && v !== null && prev[field] !== undefined && v >= prev[field] ? (v - prev[field]) / dt : null;
        rates[field] = v;
      }
      values.get(field).push(v);
    }
    times.push(t);
    if (times.length > KEEP) {
      times.shift();
      for (const arr of values.values()) arr.shift();
    }
    prev = s;
    replace(cardsEl, cards(s, rates));
  };

  const draw = () => {
    const drawn = [];
    for (const c of charts) {
      const data = [times.slice(), values.get(c.field).slice()];
      if (!c.u) {
        const plot = c.cell.querySelector(".plot");
        drawn.push(new Promise((resolve) => {
          c.u = new uPlot(
            {
              width: Math.max(200, plot.clientWidth || 300),
              height: 120,
              legend: { show: false },
              cursor: { drag: { x: false, y: false } },
              scales: { x: { time: true, range: (u, min, max) => [Math.min(min ?? max, (max ?? 0) - 60), max ?? 0] }, y: { range: (u, min, max) => [Math.min(0, min ?? 0), Math.max(1, max ?? 1) * 1.1] } },
              axes: [{ size: 30 }, { size: axisSize, values: (u, splits) => splits.map((v) => c.fmt(v)) }],
              series: [{}, { label: c.label, stroke: "#1f77b4", fill: "rgba(31,119,180,0.12)", width: 1.5, spanGaps: false, points: { show: false } }],
              hooks: { ready: [() => resolve()] },
            },
            data,
            plot,
          );
        }));
      } else c.u.setData(data);
      c.cell.dataset.samples = String(data[0].length);
    }
    return Promise.all(drawn);
  };

  sample(await api("/api/v1/health"));
  await draw();

  const poll = async () => {
    try {
      sample(await api("/api/v1/health"));
      draw();
    } catch {
      /* the next poll tries again */
    }
    setTimeout(poll, POLL_MS);
  };
  setTimeout(poll, POLL_MS);
  window.addEventListener("resize", () => {
    for (const c of charts) if (c.u) c.u.setSize({ width: Math.max(200, c.cell.querySelector(".plot").clientWidth), height: 120 });
  });
}
