// Several runs overlaid: one chart per metric key with a line per run, and a table
// of the hyperparameters in which they differ.
import { h, replace, pagePath, fmtValue, valueKey } from "./dom.js";
import { api } from "./api.js";
import { Board } from "./board.js";
import { PALETTE } from "./chart.js";
import { flatten, expPath, isLive } from "./run.js";

const MAX_RUNS = 20;

function swatch(color) {
  return h("span", { class: "swatch", style: { background: color } });
}

function paramsDiff(runs, showAll) {
  const flats = runs.map((r) => flatten(r.exp.metadata));
  const keys = [...new Set(flats.flatMap((f) => Object.keys(f)))].sort();
  const differing = keys.filter((k) => new Set(flats.map((f) => valueKey(f[k]))).size > 1);
  const rows = showAll ? keys : differing;
  if (!rows.length)
    return h("p", { class: "empty", text: keys.length ? "The runs' hyperparameters are all equal." : "No metadata." });
  return h(
    "table",
    { class: "params-diff" },
    h("thead", null, h("tr", null, h("th", { text: "Key" }), runs.map((r) => h("th", null, swatch(r.color), " ", r.label)))),
    h(
      "tbody",
      null,
      rows.map((k) =>
        h(
          "tr",
          { class: differing.includes(k) ? "differs" : "same", dataset: { key: k } },
          h("td", { class: "k", text: k }),
          flats.map((f) => h("td", { class: "v", text: k in f ? fmtValue(f[k]) : "—" })),
        ),
      ),
    ),
  );
}

export async function comparePage(main) {
  const raw = new URLSearchParams(location.search).get("ids") || "";
  const ids = [...new Set(raw.split(",").map((s) => s.trim()).filter(Boolean))].slice(0, MAX_RUNS);
  if (!ids.length) {
    replace(main, h("h1", { text: "Compare" }), h("p", null, "Select runs on the ", h("a", { href: "/", text: "experiments page" }), " to compare them."));
    return;
  }
  document.title = `Compare ${ids.length} runs · mboxd`;
  const answers = await Promise.allSettled(ids.map((id) => api(expPath(id))));
  const missing = [];
  const runs = [];
  answers.forEach((a, i) => {
    if (a.status === "fulfilled") {
      const exp = a.value;
      runs.push({ id: exp.id, exp, label: exp.name || exp.id, color: PALETTE[runs.length % PALETTE.length], keys: [...(exp.keys || [])], t0: exp.created_at });
    } else if (a.reason.status === 404) missing.push(ids[i]);
    else throw a.reason;
  });
  const board = new Board({ runs });
  let showAll = false;
  const diffBox = h("div", { class: "diff-box" }, paramsDiff(runs, showAll));
  const toggle = h("label", { class: "toggle" }, h("input", {
    type: "checkbox",
    name: "show-all",
    onchange: (e) => {
      showAll = e.target.checked;
      replace(diffBox, paramsDiff(runs, showAll));
    },
  }), " Show equal ones too");
  replace(
    main,
    h("h1", { text: `Compare ${runs.length} runs` }),
    missing.length ? h("p", { class: "error", role: "alert", text: `Not found: ${missing.join(", ")}` }) : null,
    h("ul", { class: "run-legend" }, runs.map((r) => h("li", { dataset: { id: r.id } }, swatch(r.color), " ", h("a", { href: pagePath(r.id), text: r.label }), " ", h("span", { class: "ns", text: r.exp.namespace })))),
    h("section", { class: "panel wide" }, h("h2", { text: "Hyperparameters that differ" }), toggle, diffBox),
    h("section", { class: "charts" }, h("h2", { text: "Charts" }), board.el),
  );
  await board.load();
  for (const r of runs) board.setLive(r.id, isLive(r.exp));
  const refresh = async () => {
    if (!document.hidden) {
      await Promise.all(
        runs.map(async (r) => {
          try {
            const e = await api(expPath(r.id));
            board.addKeys(r, e.keys || []);
            board.setLive(r.id, isLive(e));
          } catch {
            /* the next refresh tries again */
          }
        }),
      );
    }
    setTimeout(refresh, 5000);
  };
  setTimeout(refresh, 5000);
}
