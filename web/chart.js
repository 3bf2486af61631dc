// One metric key's chart, drawn by uPlot: one line per run, a min/max band where
// the server bucketed the series, event markers, drag-select zoom that asks the
// server for the selected step range, double-click to reset.
import { h, fmtNum, fmtTick, axisSize, fmtTime, fmtDuration } from "./dom.js";

const uPlot = window.uPlot;

export const PALETTE = [
  "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
  "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
];

export function rgba(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${a})`;
}

/** Debiased exponential moving average (as TensorBoard smooths); non-finite values pass through as null. */
export function ema(values, w) {
  if (!(w > 0)) return values;
  const out = new Array(values.length);
  let last = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || v === undefined || !Number.isFinite(v)) {
      out[i] = null;
      continue;
    }
    last = last * w + (1 - w) * v;
    n++;
    out[i] = last / (1 - Math.pow(w, n));
  }
  return out;
}

/** The x value of each point of `line` in the view's x mode. */
function xsOf(line, xMode) {
  if (xMode === "wallclock") return line.wallclocks.map((w) => w / 1000);
  if (xMode === "relative") {
    const t0 = line.run.t0 ?? line.wallclocks[0] ?? 0;
    return line.wallclocks.map((w) => (w - t0) / 1000);
  }
  return line.steps;
}

function ascending(xs) {
  for (let i = 1; i < xs.length; i++) if (xs[i] < xs[i - 1]) return false;
  return true;
}

function permute(arr, order) {
  return arr ? order.map((i) => arr[i]) : arr;
}

const positive = (v) => (v !== null && v > 0 ? v : null);

/** The first index whose value is >= v in an ascending array. */
function lowerBound(arr, v) {
  let lo = 0;
  let hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (arr[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * A line: {run: {id, label, color, t0}, key, steps, wallclocks, values, min, max,
 * bucketed, total}. The view: {xMode: "step"|"wallclock"|"relative", smoothing: 0..1,
 * log: bool, band: bool}.
 */
export class MetricChart {
  constructor(cell, { key, lines, view, events = [], onZoom, onReset }) {
    this.cell = cell;
    this.key = key;
    this.full = lines; // the whole range, kept up to date by live tails
    this.shown = lines; // what is drawn: `full`, or the zoomed range
    this.zoom = null; // {x0, x1} while zoomed
    this.view = view;
    this.events = events;
    this.onZoom = onZoom;
    this.onReset = onReset;
    this.u = null;
    this.plotEl = cell.querySelector(".plot") || cell.appendChild(h("div", { class: "plot" }));
    this.markerEl = null;
    this.ready = new Promise((resolve) => (this._resolveReady = resolve));
    this.create();
  }

  get width() {
    return Math.max(200, Math.floor(this.plotEl.clientWidth || this.cell.clientWidth || 400));
  }

  /** Pixels of the plot area: the max_points to ask the server for. */
  get pixelWidth() {
    const w = this.u ? Math.round(this.u.bbox.width / (window.devicePixelRatio || 1)) : 0;
    return Math.max(50, w || this.width - 60);
  }

  buildData() {
    const { xMode, smoothing, log, band } = this.view;
    const tables = [];
    const series = [{}];
    const bands = [];
    const bandIdx = [];
    let col = 1;
    for (const line of this.shown) {
      let x = xsOf(line, xMode);
      let y = line.values;
      let mn = line.min;
      let mx = line.max;
      if (!ascending(x)) {
        const order = x.map((_, i) => i).sort((a, b) => x[a] - x[b]);
        x = permute(x, order);
        y = permute(y, order);
        mn = permute(mn, order);
        mx = permute(mx, order);
      }
      y = ema(y, smoothing);
      if (log) y = y.map(positive);
      const color = line.run.color;
      const t = [x, y];
      series.push({
        label: line.run.label,
        stroke: color,
        width: 1.5,
        spanGaps: false,
        points: { show: false },
        value: (u, v) => fmtNum(v),
      });
      const lineCol = col++;
      if (band && line.bucketed && mn && mx) {
        t.push(log ? mn.map(positive) : mn, log ? mx.map(positive) : mx);
        const s = { stroke: rgba(color, 0), width: 0, points: { show: false }, spanGaps: false, value: (u, v) => fmtNum(v) };
        series.push({ ...s, label: line.run.label + " min" }, { ...s, label: line.run.label + " max" });
        bands.push({ series: [col + 1, col], fill: rgba(color, 0.18) });
        bandIdx.push(col, col + 1);
        col += 2;
      }
      void lineCol;
      tables.push(t);
    }
    let data;
    if (tables.length === 0) data = [[]];
    else if (tables.length === 1) data = tables[0];
    else data = uPlot.join(tables);
    return { data, series, bands, bandIdx };
  }

  options(built) {
    const { xMode, log } = this.view;
    const xValue =
      xMode === "wallclock"
        ? (u, v) => (v == null ? "--" : fmtTime(v * 1000))
        : xMode === "relative"
          ? (u, v) => (v == null ? "--" : fmtDuration(v))
          : (u, v) => (v == null ? "--" : fmtNum(v));
    built.series[0] = { label: { step: "step", wallclock: "time", relative: "elapsed" }[xMode], value: xValue };
    const self = this;
    return {
      width: this.width,
      height: 210,
      series: built.series,
      bands: built.bands,
      scales: {
        x: { time: xMode === "wallclock" },
        y: log ? { distr: 3, log: 10 } : {},
      },
      axes: [
        xMode === "relative" ? { values: (u, splits) => splits.map(fmtDuration) } : {},
        { size: axisSize, values: (u, splits) => splits.map(fmtTick) },
      ],
      legend: { live: true },
      cursor: {
        drag: { x: true, y: false, setScale: false },
        bind: {
          dblclick: () => () => {
            self.resetZoom();
            return null;
          },
        },
      },
      hooks: {
        setSelect: [(u) => self.selected(u)],
        draw: [() => self.placeMarkers()],
        ready: [() => self._resolveReady(performance.now())],
      },
    };
  }

  create() {
    const built = this.buildData();
    if (this.u) this.u.destroy();
    this.u = new uPlot(this.options(built), built.data, this.plotEl);
    // Keep the legend to one row per run: the band's min and max series stay out of it.
    const rows = this.u.root.querySelectorAll(".u-legend .u-series");
    for (const i of built.bandIdx) if (rows[i]) rows[i].style.display = "none";
    this.markerEl = h("div", { class: "markers" });
    this.u.over.appendChild(this.markerEl);
    this.placeMarkers();
    this.annotate();
  }

  /** Data attributes that tests and the benchmark read. */
  annotate() {
    let points = 0;
    let lastStep = -1;
    for (const l of this.shown) {
      points += l.steps.length;
      if (l.steps.length) lastStep = Math.max(lastStep, l.steps[l.steps.length - 1]);
    }
    Object.assign(this.cell.dataset, {
      key: this.key,
      series: String(this.shown.length),
      points: String(points),
      lastStep: String(lastStep),
      bucketed: String(this.shown.some((l) => l.bucketed)),
      zoomed: String(!!this.zoom),
    });
  }

  /** Redraws with the current lines; a structural change (series or bands) rebuilds the chart. */
  redraw() {
    const built = this.buildData();
    const sameShape =
      this.u && built.series.length === this.u.series.length && built.bands.length === (this.u.bands || []).length;
    if (!sameShape) {
      this.create();
      return;
    }
    this.u.setData(built.data, !this.zoom);
    if (this.zoom) this.u.setScale("x", { min: this.zoom.x0, max: this.zoom.x1 });
    this.annotate();
  }

  setView(view) {
    const rebuild = view.xMode !== this.view.xMode || view.log !== this.view.log || view.band !== this.view.band;
    if (view.xMode !== this.view.xMode && this.zoom) {
      this.zoom = null;
      this.shown = this.full;
    }
    this.view = view;
    if (rebuild) this.create();
    else this.redraw();
  }

  setEvents(events) {
    this.events = events;
    this.placeMarkers();
  }

  /** Replaces the full-range lines (a refresh); the zoomed view stays as it is. */
  setFull(lines) {
    this.full = lines;
    if (!this.zoom) {
      this.shown = lines;
      this.redraw();
    }
  }

  /**
   * Appends a live tail to run `runId`'s line: points after the line's last step
   * only. Returns the line's length afterwards.
   */
  appendTail(run, tail) {
    let line = this.full.find((l) => l.run.id === run.id);
    if (!line) {
      line = { run, key: this.key, steps: [], wallclocks: [], values: [], min: null, max: null, bucketed: false, total: 0 };
      this.full = [...this.full, line];
      if (!this.zoom) this.shown = this.full;
    }
    const last = line.steps.length ? line.steps[line.steps.length - 1] : -1;
    let start = 0;
    while (start < tail.steps.length && tail.steps[start] <= last) start++;
    if (start >= tail.steps.length) return line.steps.length;
    if (tail.bucketed && !line.bucketed) {
      line.bucketed = true;
      line.min = line.values.slice();
      line.max = line.values.slice();
    }
    for (let i = start; i < tail.steps.length; i++) {
      line.steps.push(tail.steps[i]);
      line.wallclocks.push(tail.wallclocks[i]);
      line.values.push(tail.values[i]);
      if (line.bucketed) {
        line.min.push(tail.bucketed ? tail.min[i] : tail.values[i]);
        line.max.push(tail.bucketed ? tail.max[i] : tail.values[i]);
      }
    }
    line.total += tail.total_points - start;
    if (!this.zoom) this.redraw();
    return line.steps.length;
  }

  /** A drag-selection ended: ask for the selected step range of every line. */
  selected(u) {
    const sel = u.select;
    if (!sel || sel.width < 4) return;
    const x0 = u.posToVal(sel.left, "x");
    const x1 = u.posToVal(sel.left + sel.width, "x");
    u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
    const ranges = [];
    for (const line of this.full) {
      const r = this.stepRange(line, x0, x1);
      if (r) ranges.push({ run: line.run, ...r });
    }
    if (!ranges.length || !this.onZoom) return;
    this.zoom = { x0, x1 };
    this.cell.dataset.zoomed = "true";
    this.onZoom(this, ranges, this.pixelWidth);
  }

  /** The steps of `line` whose x lies in [x0, x1], widened to whole buckets. */
  stepRange(line, x0, x1) {
    if (this.view.xMode === "step") {
      const start = Math.max(0, Math.ceil(x0));
      const end = Math.floor(x1);
      return end >= start ? { start, end } : null;
    }
    const xs = xsOf(line, this.view.xMode);
    let i0 = -1;
    let i1 = -1;
    for (let i = 0; i < xs.length; i++) {
      if (xs[i] >= x0 && xs[i] <= x1) {
        if (i0 < 0 || line.steps[i] < line.steps[i0]) i0 = i;
        if (i1 < 0 || line.steps[i] > line.steps[i1]) i1 = i;
      }
    }
    if (i0 < 0) return null;
    // A bucket ends at its last step: the selection starts after the previous bucket.
    const start = line.bucketed && i0 > 0 ? line.steps[i0 - 1] + 1 : line.steps[i0];
    return { start, end: line.steps[i1] };
  }

  /** Shows zoomed lines fetched by the owner for the selection. */
  showZoomed(lines) {
    if (!this.zoom) return;
    this.shown = lines;
    this.redraw();
  }

  resetZoom() {
    if (!this.zoom) {
      if (this.u) this.u.setData(this.u.data, true);
      return;
    }
    this.zoom = null;
    this.shown = this.full;
    this.redraw();
    if (this.onReset) this.onReset(this);
  }

  resize() {
    if (this.u) this.u.setSize({ width: this.width, height: 210 });
  }

  /** Event markers: DOM elements over the plot, titled with the event's text. */
  placeMarkers() {
    if (!this.u || !this.markerEl) return;
    const u = this.u;
    const xMode = this.view.xMode;
    const els = this.markerEl.children;
    let n = 0;
    for (const ev of this.events) {
      let x = null;
      if (xMode === "wallclock") x = ev.wallclock / 1000;
      else {
        const line = this.shown.find((l) => l.run.id === ev.runId) || this.shown[0];
        if (!line || !line.wallclocks.length) continue;
        if (xMode === "relative") x = (ev.wallclock - (line.run.t0 ?? line.wallclocks[0])) / 1000;
        else {
          // The step being logged when the event happened: the first point at or after it.
          const wc = line.wallclocks;
          const i = ascending(wc) ? lowerBound(wc, ev.wallclock) : wc.findIndex((w) => w >= ev.wallclock);
          if (i < 0 || i >= wc.length) continue;
          x = line.steps[i];
        }
      }
      const min = u.scales.x.min;
      const max = u.scales.x.max;
      if (x === null || min == null || x < min || x > max) continue;
      let el = els[n];
      if (!el) {
        el = h("div", { class: "marker" });
        this.markerEl.appendChild(el);
      }
      el.style.left = u.valToPos(x, "x") + "px";
      el.title = ev.source ? `${ev.name} (${ev.source}) ${fmtTime(ev.wallclock)}` : `${ev.name} ${fmtTime(ev.wallclock)}`;
      el.dataset.event = ev.name;
      n++;
    }
    while (els.length > n) els[els.length - 1].remove();
  }

  destroy() {
    if (this.u) this.u.destroy();
    this.u = null;
  }
}
