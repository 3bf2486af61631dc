// mboxd's web view: routes by location.pathname and renders one page.
//
// window.__mboxReady resolves (to performance.now()) once the page's first view is
// complete — for chart pages, when every chart has drawn — and
// <html data-ready="true"> says the same to tests; "error" when the page failed.
import { h, replace } from "./dom.js";
import { initToken } from "./api.js";
import { listPage } from "./list.js";
import { runPage } from "./run.js";
import { comparePage } from "./compare.js";
import { healthPage } from "./health.js";

let resolveReady;
let rejectReady;
window.__mboxReady = new Promise((res, rej) => {
  resolveReady = res;
  rejectReady = rej;
});
window.__mboxReady.catch(() => {});

function markReady() {
  const t = performance.now();
  window.__mboxReadyAt = t;
  document.documentElement.dataset.ready = "true";
  resolveReady(t);
}

function markFailed(e) {
  document.documentElement.dataset.ready = "error";
  rejectReady(e);
}

function route(path) {
  if (path === "/" || path === "/index.html") return { page: listPage, nav: "list" };
  const m = /^\/experiments\/([^/]+)\/?$/.exec(path);
  if (m) return { page: (main) => runPage(main, decodeURIComponent(m[1])), nav: "list" };
  if (path === "/compare" || path === "/compare/") return { page: comparePage, nav: "list" };
  if (path === "/health" || path === "/health/") return { page: healthPage, nav: "health" };
  return null;
}

async function main() {
  initToken();
  const main = document.getElementById("main");
  const r = route(location.pathname);
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("current", a.dataset.nav === r?.nav);
  if (!r) {
    replace(main, h("h1", { text: "Not found" }), h("p", null, "No page at ", h("code", { text: location.pathname }), "."));
    markReady();
    return;
  }
  try {
    await r.page(main);
    markReady();
  } catch (e) {
    console.error(e);
    if (e.status !== 401) {
      main.querySelector(".loading-page")?.remove();
      main.prepend(h("h1", { text: e.status === 404 ? "Not found" : "Error" }), h("p", { class: "error", role: "alert", text: e.message || String(e) }));
    }
    markFailed(e);
  }
}

main();
