// The experiments page: every namespace, search by name or the filter grammar,
// sort by created/updated, live ingest activity, selection for comparison.
import { h, replace, pagePath, fmtNum, fmtTime, fmtAgo, fmtInt } from "./dom.js";
import { api, ApiError } from "./api.js";

const REFRESH_MS = 3000;
const ORDERS = [
  ["created_at DESC", "Newest first"],
  ["created_at ASC", "Oldest first"],
  ["updated_at DESC", "Recently updated"],
  ["updated_at ASC", "Least recently updated"],
];

/** A string literal of the filter grammar. */
export function quote(s) {
  return '"' + s.replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '"';
}

/** The search box (a name substring) and the advanced filter, joined with `and`. */
export function buildFilter(q, advanced) {
  const parts = [];
  if (q.trim()) parts.push(`name ~ ${quote(q.trim())}`);
  if (advanced.trim()) parts.push(advanced.trim());
  return parts.join(" and ");
}

function summaryText(summaries) {
  const keys = Object.keys(summaries || {}).sort((a, b) => {
    const va = a.startsWith("val") ? 0 : 1;
    const vb = b.startsWith("val") ? 0 : 1;
    return va - vb || (a < b ? -1 : a > b ? 1 : 0);
  });
  return keys.slice(0, 3).map((k) => h("span", { class: "summary" }, h("span", { class: "k", text: k }), " ", fmtNum(summaries[k].last)));
}

export async function listPage(main) {
  const params = new URLSearchParams(location.search);
  const state = {
    q: params.get("q") || "",
    filter: params.get("filter") || "",
    namespace: params.get("namespace") || "",
    order: params.get("order") || "created_at DESC",
  };
  const selected = new Set();
  let experiments = [];
  let nextToken = "";
  let generation = 0;

  const search = h("input", {
    type: "search",
    name: "q",
    placeholder: "Search by name",
    value: state.q,
    "aria-label": "search by name",
    oninput: debounce(() => {
      state.q = search.value;
      reload();
    }, 250),
  });
  const advanced = h("input", {
    type: "text",
    name: "filter",
    class: "filter",
    placeholder: 'Filter, e.g. owner = "a@b" and params.lr = 0.0003 and metrics.val/loss.last < 0.2',
    value: state.filter,
    "aria-label": "filter",
    onkeydown: (e) => {
      if (e.key === "Enter") {
        state.filter = advanced.value;
        reload();
      }
    },
    onchange: () => {
      state.filter = advanced.value;
      reload();
    },
  });
  const nsSelect = h(
    "select",
    {
      name: "namespace",
      "aria-label": "namespace",
      onchange: () => {
        state.namespace = nsSelect.value;
        reload();
      },
    },
    h("option", { value: "", text: "All namespaces" }),
  );
  const orderSelect = h(
    "select",
    {
      name: "order",
      "aria-label": "sort",
      onchange: () => {
        state.order = orderSelect.value;
        reload();
      },
    },
    ORDERS.map(([v, label]) => h("option", { value: v, text: label, selected: v === state.order })),
  );
  const compareBtn = h("button", {
    type: "button",
    class: "compare-btn",
    disabled: true,
    text: "Compare",
    onclick: () => {
      const ids = experiments.map((e) => e.id).filter((id) => selected.has(id));
      location.href = "/compare?ids=" + ids.map(encodeURIComponent).join(",");
    },
  });
  const filterError = h("p", { class: "filter-error", role: "alert", hidden: true });
  const tbody = h("tbody");
  const more = h("button", { type: "button", class: "more", hidden: true, text: "Load more", onclick: () => loadMore() });
  const count = h("span", { class: "count" });

  const sortHeader = (field, label) =>
    h("th", {
      class: "sortable",
      text: label + (state.order.startsWith(field) ? (state.order.endsWith("ASC") ? " ▲" : " ▼") : ""),
      onclick: () => {
        state.order = state.order === `${field} DESC` ? `${field} ASC` : `${field} DESC`;
        orderSelect.value = state.order;
        reload();
      },
    });
  const thead = h("thead");
  const renderHead = () =>
    replace(
      thead,
      h(
        "tr",
        null,
        h("th", { class: "sel" }),
        h("th", { text: "Name" }),
        h("th", { text: "Namespace" }),
        h("th", { text: "Owner" }),
        sortHeader("created_at", "Created"),
        sortHeader("updated_at", "Updated"),
        h("th", { text: "Points / min", title: "points ingested in the last minute" }),
        h("th", { text: "Latest" }),
      ),
    );

  replace(
    main,
    h("h1", { text: "Experiments" }),
    h("div", { class: "controls" }, search, nsSelect, orderSelect, compareBtn, count),
    h("div", { class: "controls" }, advanced),
    filterError,
    h("table", { class: "experiments" }, thead, tbody),
    more,
  );

  function updateCompare() {
    const n = experiments.filter((e) => selected.has(e.id)).length;
    compareBtn.disabled = n < 1;
    compareBtn.textContent = n ? `Compare (${n})` : "Compare";
  }

  function row(e) {
    const box = h("input", {
      type: "checkbox",
      class: "select",
      checked: selected.has(e.id),
      "aria-label": "select for comparison",
      onchange: () => {
        if (box.checked) selected.add(e.id);
        else selected.delete(e.id);
        updateCompare();
      },
    });
    const tr = h("tr", { dataset: { id: e.id } });
    tr.append(
      h("td", { class: "sel" }, box),
      h("td", { class: "name" }, h("a", { href: pagePath(e.id), text: e.name || "(unnamed)" })),
      h("td", { class: "ns", text: e.namespace }),
      h("td", { class: "owner", text: e.owner }),
      h("td", { class: "created" }),
      h("td", { class: "updated" }),
      h("td", { class: "activity" }),
      h("td", { class: "latest" }),
    );
    fill(tr, e);
    return tr;
  }

  function fill(tr, e) {
    const now = Date.now();
    const c = tr.querySelector(".created");
    c.textContent = fmtAgo(e.created_at, now);
    c.title = fmtTime(e.created_at);
    const u = tr.querySelector(".updated");
    u.textContent = fmtAgo(e.updated_at, now);
    u.title = fmtTime(e.updated_at);
    const a = tr.querySelector(".activity");
    const pts = e.points_last_minute || 0;
    a.textContent = pts ? fmtInt(pts) : "—";
    a.dataset.points = String(pts);
    a.classList.toggle("live", pts > 0);
    replace(tr.querySelector(".latest"), summaryText(e.summaries));
  }

  function render(list, append) {
    if (!append && list.length === experiments.length && list.every((e, i) => e.id === experiments[i].id)) {
      // The same rows: refresh their figures in place (no flicker, no lost focus).
      const rows = tbody.children;
      list.forEach((e, i) => fill(rows[i], e));
    } else if (append) {
      tbody.append(...list.map(row));
    } else {
      replace(tbody, list.length ? list.map(row) : h("tr", null, h("td", { colspan: "8", class: "empty", text: "No experiments match." })));
    }
    experiments = append ? experiments.concat(list) : list;
    more.hidden = !nextToken;
    count.textContent = `${experiments.length}${nextToken ? "+" : ""} experiment${experiments.length === 1 ? "" : "s"}`;
    updateCompare();
  }

  function query(extra) {
    return {
      namespace: state.namespace,
      filter: buildFilter(state.q, state.filter),
      order_by: state.order,
      ...extra,
    };
  }

  function syncUrl() {
    const p = new URLSearchParams();
    if (state.q) p.set("q", state.q);
    if (state.filter) p.set("filter", state.filter);
    if (state.namespace) p.set("namespace", state.namespace);
    if (state.order !== "created_at DESC") p.set("order", state.order);
    const qs = p.toString();
    history.replaceState(null, "", location.pathname + (qs ? "?" + qs : ""));
  }

  async function fetchPage(extra, append) {
    const gen = ++generation;
    try {
      const r = await api("/api/v1/experiments", query(extra));
      if (gen !== generation) return;
      filterError.hidden = true;
      advanced.classList.remove("invalid");
      nextToken = r.next_page_token || "";
      render(r.experiments, append);
    } catch (e) {
      if (gen !== generation) return;
      if (e instanceof ApiError && e.status === 400) {
        filterError.textContent = e.parameter ? `${e.parameter}: ${e.message}` : e.message;
        filterError.hidden = false;
        if (e.parameter === "filter") advanced.classList.add("invalid");
        return;
      }
      throw e;
    }
  }

  async function reload() {
    syncUrl();
    renderHead();
    await fetchPage({ page_size: 100 }, false);
  }

  async function loadMore() {
    if (nextToken) await fetchPage({ page_size: 100, page_token: nextToken }, true);
  }

  async function refresh() {
    if (!document.hidden) {
      const size = Math.min(1000, Math.max(100, experiments.length));
      try {
        await fetchPage({ page_size: size }, false);
      } catch {
        /* the next refresh tries again */
      }
    }
    setTimeout(refresh, REFRESH_MS);
  }

  const nsLoad = api("/api/v1/namespaces").then((r) => {
    for (const ns of r.namespaces) nsSelect.append(h("option", { value: ns, text: ns, selected: ns === state.namespace }));
  });
  await Promise.all([reload(), nsLoad]);
  setTimeout(refresh, REFRESH_MS);
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}
