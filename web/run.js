// One run: its metadata (hyperparameters) as a table, events on a timeline and as
// chart markers, one chart per metric key grouped by prefix, live while it trains.
import { h, replace, fmtNum, fmtTime, fmtAgo, fmtInt, fmtValue } from "./dom.js";
import { api } from "./api.js";
import { Board } from "./board.js";
import { PALETTE } from "./chart.js";

const REFRESH_MS = 5000;

/** Metadata flattened one level per nesting: {"opt": {"lr": 1}} → {"opt.lr": 1}. */
export function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix + k;
    if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length) flatten(v, key + ".", out);
    else out[key] = v;
  }
  return out;
}

export function expPath(id) {
  return `/api/v1/experiments/${encodeURIComponent(id)}`;
}

export function isLive(exp) {
  return (exp.points_last_minute || 0) > 0 || Date.now() - (exp.updated_at || 0) < 60000;
}

function paramsTable(metadata) {
  const flat = flatten(metadata);
  const keys = Object.keys(flat).sort();
  if (!keys.length) return h("p", { class: "empty", text: "No metadata." });
  return h(
    "table",
    { class: "params" },
    h("thead", null, h("tr", null, h("th", { text: "Key" }), h("th", { text: "Value" }))),
    h("tbody", null, keys.map((k) => h("tr", null, h("td", { class: "k", text: k }), h("td", { class: "v", text: fmtValue(flat[k]) })))),
  );
}

function summariesTable(summaries) {
  const keys = Object.keys(summaries || {}).sort();
  if (!keys.length) return null;
  return h(
    "table",
    { class: "summaries" },
    h("thead", null, h("tr", null, ["Metric", "Last", "Min", "Max", "Points", "Last step"].map((t) => h("th", { text: t })))),
    h(
      "tbody",
      null,
      keys.map((k) => {
        const s = summaries[k];
        return h(
          "tr",
          null,
          h("td", { class: "k", text: k }),
          [s.last, s.min, s.max].map((v) => h("td", { class: "num", text: fmtNum(v) })),
          h("td", { class: "num", text: fmtInt(s.count) }),
          h("td", { class: "num", text: fmtInt(s.last_step) }),
        );
      }),
    ),
  );
}

/** Events as ticks on a time line and as a table. */
function eventsView(events, t0, t1) {
  if (!events.length) return h("p", { class: "empty", text: "No events." });
  const lo = Math.min(t0 ?? Infinity, events[0].wallclock);
  const hi = Math.max(t1 ?? -Infinity, events[events.length - 1].wallclock);
  const span = Math.max(1, hi - lo);
  const line = h(
    "div",
    { class: "timeline", role: "img", "aria-label": "event timeline" },
    events.map((e) =>
      h("span", {
        class: "tick",
        style: { left: `${(100 * (e.wallclock - lo)) / span}%` },
        title: `${fmtTime(e.wallclock)} ${e.name}${e.source ? " (" + e.source + ")" : ""}`,
        dataset: { event: e.name },
      }),
    ),
  );
  const shown = events.slice(-500);
  const table = h(
    "table",
    { class: "events" },
    h("thead", null, h("tr", null, ["Time", "Event", "Source", "Metadata"].map((t) => h("th", { text: t })))),
    h(
      "tbody",
      null,
      shown.map((e) =>
        h(
          "tr",
          null,
          h("td", { class: "time", text: fmtTime(e.wallclock) }),
          h("td", { class: "name", text: e.name }),
          h("td", { class: "source", text: e.source || "" }),
          h("td", { class: "meta", text: e.metadata && Object.keys(e.metadata).length ? JSON.stringify(e.metadata) : "" }),
        ),
      ),
    ),
  );
  return h(
    "div",
    null,
    h("div", { class: "timeline-axis" }, h("span", { text: fmtTime(lo) }), h("span", { text: fmtTime(hi) })),
    line,
    h(
      "details",
      { class: "events-list", open: events.length <= 5 },
      h("summary", { text: events.length > shown.length ? `The latest ${shown.length} of ${events.length} events` : `${events.length} event${events.length === 1 ? "" : "s"}` }),
      table,
    ),
  );
}

function header(exp) {
  const badge = h("span", { class: "activity-badge" });
  const update = (e) => {
    const pts = e.points_last_minute || 0;
    badge.textContent = pts ? `live · ${fmtInt(pts)} points/min` : "idle";
    badge.classList.toggle("live", pts > 0);
    badge.dataset.points = String(pts);
  };
  update(exp);
  const el = h(
    "div",
    { class: "run-header" },
    h("h1", null, h("span", { class: "run-name", text: exp.name || "(unnamed)" }), " ", badge),
    h(
      "dl",
      { class: "facts" },
      [
        ["Namespace", exp.namespace],
        ["Owner", exp.owner],
        ["Framework", exp.framework],
        ["Task", exp.task],
        ["External id", exp.external_id],
        ["Id", exp.id],
        ["Created", fmtTime(exp.created_at)],
      ]
        .filter(([, v]) => v)
        .map(([k, v]) => h("div", null, h("dt", { text: k }), h("dd", { text: v }))),
      h("div", null, h("dt", { text: "Updated" }), h("dd", { class: "updated", text: fmtAgo(exp.updated_at), title: fmtTime(exp.updated_at) })),
    ),
  );
  return { el, update };
}

export async function runPage(main, id) {
  const [exp, ev] = await Promise.all([api(expPath(id)), api(expPath(id) + "/events")]);
  document.title = `${exp.name || exp.id} · mboxd`;
  const run = { id: exp.id, label: exp.name || exp.id, color: PALETTE[0], keys: [...(exp.keys || [])], t0: exp.created_at };
  let events = ev.events.map((e) => ({ ...e, runId: exp.id }));
  const board = new Board({ runs: [run], events });
  const head = header(exp);
  const eventsBox = h("div", { class: "events-box" }, eventsView(events, exp.created_at, exp.updated_at));
  const summaries = h("div", { class: "summaries-box" }, summariesTable(exp.summaries));
  const params = h("div", { class: "params-box" }, paramsTable(exp.metadata));
  replace(
    main,
    head.el,
    h(
      "div",
      { class: "panels" },
      h("section", { class: "panel" }, h("h2", { text: "Hyperparameters" }), params),
      h("section", { class: "panel" }, h("h2", { text: "Metrics" }), summaries),
    ),
    h("section", { class: "panel wide" }, h("h2", { text: "Events" }), eventsBox),
    h("section", { class: "charts" }, h("h2", { text: "Charts" }), board.el),
  );
  await board.load();
  board.setLive(exp.id, isLive(exp));

  let lastEventsKey = JSON.stringify(ev.events);
  const refresh = async () => {
    if (!document.hidden) {
      try {
        const [e, evs] = await Promise.all([api(expPath(id)), api(expPath(id) + "/events")]);
        head.update(e);
        const u = main.querySelector(".run-header .updated");
        u.textContent = fmtAgo(e.updated_at);
        board.addKeys(run, e.keys || []);
        board.setLive(e.id, isLive(e));
        replace(summaries, summariesTable(e.summaries));
        if (JSON.stringify(e.metadata) !== JSON.stringify(exp.metadata)) {
          exp.metadata = e.metadata;
          replace(params, paramsTable(e.metadata));
        }
        const key = JSON.stringify(evs.events);
        if (key !== lastEventsKey) {
          lastEventsKey = key;
          events = evs.events.map((x) => ({ ...x, runId: e.id }));
          replace(eventsBox, eventsView(events, e.created_at, e.updated_at));
          board.setEvents(events);
        }
      } catch {
        /* the next refresh tries again */
      }
    }
    setTimeout(refresh, REFRESH_MS);
  };
  setTimeout(refresh, REFRESH_MS);
}
