// DOM helpers. Every string that came from the server (names, keys, metadata,
// event text) reaches the page through text nodes or property assignment, never
// through HTML parsing: `h` has no way to insert markup.

/**
 * Creates an element. `attrs`: `class`, `text`, `dataset` (an object), `style`
 * (an object), `on<event>` (a function), any other key is set with setAttribute
 * (attribute names come from this code, values may be data). Children: nodes,
 * strings (as text nodes), arrays of them; null and undefined are skipped.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = String(v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k === "style") Object.assign(el.style, v);
      else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else if (k === "value" || k === "checked" || k === "disabled" || k === "selected") el[k] = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
}

/** Replaces the children of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function pagePath(id) {
  return "/experiments/" + encodeURIComponent(id);
}

// --- Formatting -------------------------------------------------------------

const numFmt = new Intl.NumberFormat("en-US", { maximumSignificantDigits: 6 });
const intFmt = new Intl.NumberFormat("en-US");

export function fmtNum(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (!Number.isFinite(v)) return String(v);
  if (Number.isInteger(v)) return intFmt.format(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-4 || a >= 1e9)) return v.toExponential(4);
  return numFmt.format(v);
}

const tickFmt = new Intl.NumberFormat("en-US", { maximumSignificantDigits: 4 });

/** Axis ticks: short. */
export function fmtTick(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e9)) return v.toExponential(1).replace(".0e", "e");
  return tickFmt.format(v);
}

/** An axis wide enough for its tick labels (uPlot `axes[].size`). */
export function axisSize(u, values) {
  if (!values || !values.length) return 40;
  return Math.max(40, Math.max(...values.map((s) => String(s).length)) * 7 + 16);
}

export function fmtInt(v) {
  return v === null || v === undefined ? "—" : intFmt.format(v);
}

export function fmtTime(ms) {
  if (!ms) return "—";
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function fmtAgo(ms, now = Date.now()) {
  if (!ms) return "—";
  const s = Math.max(0, (now - ms) / 1000);
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function fmtDuration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "";
  const neg = s < 0;
  s = Math.abs(s);
  let out;
  if (s < 60) out = `${+s.toFixed(s < 10 ? 1 : 0)}s`;
  else if (s < 3600) out = `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`;
  else if (s < 86400) out = `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  else out = `${Math.floor(s / 86400)}d${String(Math.floor((s % 86400) / 3600)).padStart(2, "0")}h`;
  return neg ? "-" + out : out;
}

export function fmtBytes(b) {
  if (b === null || b === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < units.length - 1) {
    b /= 1024;
    i++;
  }
  return `${i === 0 ? b : b.toFixed(1)} ${units[i]}`;
}

/** A metadata value as text: strings as they are, the rest as JSON. */
export function fmtValue(v) {
  if (typeof v === "string") return v;
  if (typeof v === "number") return fmtNum(v);
  return JSON.stringify(v);
}

/** Stable comparison key of a metadata value (for "do these differ"). */
export function valueKey(v) {
  return v === undefined ? "\u0000undefined" : JSON.stringify(v);
}
