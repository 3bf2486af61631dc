// The charts of one or more runs: one chart per metric key, grouped by the key's
// prefix (`train/`, `val/`, `system/`...), with the view controls (x axis, EMA
// smoothing, log scale, min/max band), zoom through the server, and live tails.
import { h } from "./dom.js";
import { api } from "./api.js";
import { MetricChart } from "./chart.js";

const VIEW_KEY = "mbox.view";
const DEFAULT_VIEW = { xMode: "step", smoothing: 0, log: false, band: true };

export function loadView() {
  try {
    const v = JSON.parse(localStorage.getItem(VIEW_KEY) || "{}");
    return { ...DEFAULT_VIEW, ...v };
  } catch {
    return { ...DEFAULT_VIEW };
  }
}

function saveView(v) {
  try {
    localStorage.setItem(VIEW_KEY, JSON.stringify(v));
  } catch {
    /* storage disabled */
  }
}

export function groupOf(key) {
  const i = key.indexOf("/");
  return i > 0 ? key.slice(0, i) : "";
}

function toLine(run, s) {
  return {
    run,
    key: s.key,
    steps: s.steps,
    wallclocks: s.wallclocks,
    values: s.values,
    min: s.min,
    max: s.max,
    bucketed: !!s.bucketed,
    total: s.total_points,
  };
}

function seriesPath(id) {
  return `/api/v1/experiments/${encodeURIComponent(id)}/series`;
}

/** Splits `keys` into at most `n` chunks, so a run's series load over a few parallel requests. */
function chunks(keys, n) {
  const size = Math.max(1, Math.ceil(keys.length / n));
  const out = [];
  for (let i = 0; i < keys.length; i += size) out.push(keys.slice(i, i + size));
  return out;
}

export class Board {
  /**
   * runs: [{id, label, color, keys, t0}]; the board owns the charts of the union of
   * their keys. `events`: [{runId, name, source, wallclock}] drawn as markers.
   */
  constructor({ runs, events = [] }) {
    this.runs = runs;
    this.events = events;
    this.view = loadView();
    this.charts = new Map(); // key -> MetricChart
    this.cells = new Map(); // key -> element
    this.groups = new Map(); // prefix -> grid element
    this.live = new Set(); // run ids polled for tails
    this.refetching = new Set();
    this.el = h("div", { class: "board" });
    this.toolbarEl = this.toolbar();
    this.groupsEl = h("div", { class: "groups" });
    this.el.append(this.toolbarEl, this.groupsEl);
    window.__mboxCharts = window.__mboxCharts || [];
    let t = null;
    this._onResize = () => {
      clearTimeout(t);
      t = setTimeout(() => this.charts.forEach((c) => c.resize()), 150);
    };
    window.addEventListener("resize", this._onResize);
  }

  toolbar() {
    const v = this.view;
    const xSel = h(
      "select",
      { name: "x-axis", "aria-label": "x axis", onchange: (e) => this.setView({ xMode: e.target.value }) },
      h("option", { value: "step", text: "Step", selected: v.xMode === "step" }),
      h("option", { value: "wallclock", text: "Wall clock", selected: v.xMode === "wallclock" }),
      h("option", { value: "relative", text: "Relative time", selected: v.xMode === "relative" }),
    );
    const smoothOut = h("output", { text: v.smoothing.toFixed(2) });
    const smooth = h("input", {
      type: "range",
      name: "smoothing",
      min: "0",
      max: "0.99",
      step: "0.01",
      value: String(v.smoothing),
      "aria-label": "EMA smoothing",
      oninput: (e) => {
        smoothOut.textContent = Number(e.target.value).toFixed(2);
        this.setView({ smoothing: Number(e.target.value) });
      },
    });
    const log = h("input", { type: "checkbox", name: "log", checked: v.log, onchange: (e) => this.setView({ log: e.target.checked }) });
    const band = h("input", { type: "checkbox", name: "band", checked: v.band, onchange: (e) => this.setView({ band: e.target.checked }) });
    return h(
      "div",
      { class: "toolbar" },
      h("label", null, "X axis ", xSel),
      h("label", null, "Smoothing ", smooth, " ", smoothOut),
      h("label", null, log, " Log scale"),
      h("label", null, band, " Min/max band"),
      h("span", { class: "hint", text: "Drag to zoom (loads detail), double-click to reset." }),
    );
  }

  setView(patch) {
    this.view = { ...this.view, ...patch };
    saveView(this.view);
    for (const c of this.charts.values()) c.setView(this.view);
  }

  get keys() {
    const all = new Set();
    for (const r of this.runs) for (const k of r.keys) all.add(k);
    return [...all].sort();
  }

  /** The cell of `key`, created in key order within its prefix's group. */
  cellFor(key) {
    let cell = this.cells.get(key);
    if (cell) return cell;
    const prefix = groupOf(key);
    let grid = this.groups.get(prefix);
    if (!grid) {
      grid = h("div", { class: "chart-grid" });
      const section = h(
        "section",
        { class: "chart-group", dataset: { group: prefix } },
        h("h3", { text: prefix ? prefix + "/" : "metrics" }),
        grid,
      );
      const after = [...this.groups.keys()].sort().find((p) => p > prefix);
      const before = after !== undefined ? this.groups.get(after).parentElement : null;
      this.groupsEl.insertBefore(section, before);
      this.groups.set(prefix, grid);
    }
    cell = h("div", { class: "chart-card", dataset: { key } }, h("div", { class: "chart-title", text: key }), h("div", { class: "plot" }));
    const next = [...this.cells.keys()].filter((k) => groupOf(k) === prefix && k > key).sort()[0];
    grid.insertBefore(cell, next !== undefined ? this.cells.get(next) : null);
    this.cells.set(key, cell);
    return cell;
  }

  /** Plot width in pixels: what the server is asked for as max_points. */
  pointsWidth() {
    for (const c of this.charts.values()) return c.pixelWidth;
    const cell = this.cells.values().next().value;
    const w = cell ? cell.clientWidth : 600;
    return Math.max(50, Math.round(w - 80));
  }

  /**
   * Lays out every key, loads every run's series (max_points = the plot width) and
   * draws the charts. Resolves when every chart has drawn.
   */
  async load() {
    const keys = this.keys;
    if (!keys.length) {
      this.groupsEl.append(h("p", { class: "empty", text: "No metrics logged yet." }));
      return;
    }
    for (const k of keys) this.cellFor(k);
    const width = this.pointsWidth();
    const byKey = new Map(keys.map((k) => [k, []]));
    const jobs = [];
    for (const run of this.runs) {
      for (const part of chunks(run.keys, 4)) {
        jobs.push(
          api(seriesPath(run.id), { keys: part, max_points: width }).then((r) => {
            for (const s of r.series) if (byKey.has(s.key)) byKey.get(s.key).push(toLine(run, s));
          }),
        );
      }
    }
    await Promise.all(jobs);
    performance.mark("mbox:series-loaded");
    for (const run of this.runs) {
      let t0 = Infinity;
      for (const lines of byKey.values()) for (const l of lines) if (l.run === run && l.wallclocks.length) t0 = Math.min(t0, l.wallclocks[0]);
      run.t0 = Number.isFinite(t0) ? t0 : run.t0;
    }
    const ready = [];
    for (const k of keys) {
      // Lines in the order of the runs, whatever order the answers came in.
      const lines = byKey.get(k).sort((a, b) => this.runs.indexOf(a.run) - this.runs.indexOf(b.run));
      ready.push(this.addChart(k, lines).ready);
    }
    performance.mark("mbox:charts-created");
    await Promise.all(ready);
    performance.mark("mbox:charts-drawn");
  }

  addChart(key, lines) {
    const chart = new MetricChart(this.cellFor(key), {
      key,
      lines,
      view: this.view,
      events: this.events,
      onZoom: (c, ranges, width) => this.zoom(c, ranges, width),
    });
    this.charts.set(key, chart);
    window.__mboxCharts.push(chart);
    return chart;
  }

  /** Fetches the selected step range of each line at the chart's resolution. */
  async zoom(chart, ranges, width) {
    const token = (chart._zoomToken = (chart._zoomToken || 0) + 1);
    chart.cell.classList.add("loading");
    try {
      const lines = await Promise.all(
        ranges.map(({ run, start, end }) =>
          api(seriesPath(run.id), { keys: [chart.key], start_step: start, end_step: end, max_points: width }).then((r) =>
            r.series.filter((s) => s.key === chart.key).map((s) => toLine(run, s)),
          ),
        ),
      );
      if (token === chart._zoomToken) chart.showZoomed(lines.flat());
    } catch (e) {
      chart.cell.dataset.error = e.message;
    } finally {
      chart.cell.classList.remove("loading");
    }
  }

  setEvents(events) {
    this.events = events;
    for (const c of this.charts.values()) c.setEvents(events);
  }

  /** New keys of a run (seen by the page's periodic refresh): their charts fill from live tails. */
  addKeys(run, keys) {
    let added = false;
    for (const k of keys) {
      if (!run.keys.includes(k)) {
        run.keys.push(k);
        added = true;
      }
      if (!this.charts.has(k)) {
        this.groupsEl.querySelector(":scope > .empty")?.remove();
        this.addChart(k, []);
      }
    }
    return added;
  }

  setLive(runId, on) {
    if (on) this.live.add(runId);
    else this.live.delete(runId);
    if (this.live.size && !this._timer) this._timer = setTimeout(() => this.tick(), 1000);
  }

  /** One live poll: each live run's tails after the last step drawn, keys grouped by that step. */
  async tick() {
    this._timer = null;
    if (!document.hidden) {
      const width = this.pointsWidth();
      const jobs = [];
      for (const run of this.runs) {
        if (!this.live.has(run.id)) continue;
        const byStart = new Map();
        for (const k of run.keys) {
          const line = this.charts.get(k)?.full.find((l) => l.run.id === run.id);
          const start = line && line.steps.length ? line.steps[line.steps.length - 1] + 1 : 0;
          if (!byStart.has(start)) byStart.set(start, []);
          byStart.get(start).push(k);
        }
        for (const [start, keys] of byStart) {
          for (const part of chunks(keys, Math.ceil(keys.length / 50))) {
            jobs.push(
              api(seriesPath(run.id), { keys: part, start_step: start, max_points: width })
                .then((r) => {
                  for (const s of r.series) {
                    if (!s.steps.length) continue;
                    const chart = this.charts.get(s.key) || this.addChart(s.key, []);
                    const n = chart.appendTail(run, s);
                    if (n > 3 * width) this.refetch(run, s.key, width);
                  }
                })
                .catch(() => {}),
            );
          }
        }
      }
      await Promise.all(jobs);
    }
    if (this.live.size) this._timer = setTimeout(() => this.tick(), 1000);
  }

  /** A live line grew past three times the plot width: reload it bucketed. */
  async refetch(run, key, width) {
    const id = run.id + "\u0000" + key;
    if (this.refetching.has(id)) return;
    this.refetching.add(id);
    try {
      const r = await api(seriesPath(run.id), { keys: [key], max_points: width });
      const chart = this.charts.get(key);
      const s = r.series.find((x) => x.key === key);
      if (chart && s) chart.setFull(chart.full.map((l) => (l.run.id === run.id ? toLine(run, s) : l)));
    } finally {
      this.refetching.delete(id);
    }
  }
}
