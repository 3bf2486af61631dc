// The JSON API client (docs/http-api.md), with the optional bearer token.
import { h } from "./dom.js";

const TOKEN_KEY = "mbox.token";

export class ApiError extends Error {
  constructor(status, message, parameter) {
    super(message);
    this.status = status;
    this.parameter = parameter || null;
  }
}

/** Takes `#token=...` from the address (then removes it from the address and history) into localStorage. */
export function initToken() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    setToken(decodeURIComponent(m[1]));
    history.replaceState(history.state, "", location.pathname + location.search);
  }
}

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(t) {
  try {
    if (t) localStorage.setItem(TOKEN_KEY, t);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: the token lasts this page only */
  }
  memoryToken = t;
}

let memoryToken = "";

/**
 * GET `path` with `params` (arrays become repeated parameters; undefined, null
 * and "" are left out). Resolves to the decoded JSON; rejects with ApiError.
 */
export async function api(path, params = {}, { signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === "") continue;
    for (const x of Array.isArray(v) ? v : [v]) url.searchParams.append(k, String(x));
  }
  const headers = { Accept: "application/json" };
  const token = getToken() || memoryToken;
  if (token) headers.Authorization = "Bearer " + token;
  let r;
  try {
    r = await fetch(url, { headers, signal, cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "mboxd is not reachable: " + e.message);
  }
  let body = null;
  try {
    body = await r.json();
  } catch {
    /* not JSON */
  }
  if (r.status === 401) {
    showTokenPrompt(!!token);
    throw new ApiError(401, (body && body.error) || "a bearer token is required");
  }
  if (!r.ok) {
    throw new ApiError(r.status, (body && body.error) || `${r.status} ${r.statusText}`, body && body.parameter);
  }
  return body;
}

let prompt = null;

/** The token form, shown when the API answers 401. */
export function showTokenPrompt(hadToken) {
  if (prompt) return;
  const input = h("input", { type: "password", name: "token", autocomplete: "off", placeholder: "token", "aria-label": "bearer token" });
  const form = h(
    "form",
    {
      class: "token-form",
      onsubmit: (e) => {
        e.preventDefault();
        setToken(input.value.trim());
        location.reload();
      },
    },
    h("h2", { text: "mboxd needs a token" }),
    h("p", {
      text: hadToken
        ? "The stored token was refused. Enter the bearer token this mboxd was configured with."
        : "This mboxd requires a bearer token. Enter it to continue (it is kept in this browser's local storage).",
    }),
    input,
    h("button", { type: "submit", text: "Use token" }),
  );
  prompt = h("div", { class: "token-prompt", id: "token-prompt", role: "dialog" }, form);
  document.body.appendChild(prompt);
  input.focus();
}
