// The dashboard's router: hash routes (#/jobs, #/jobs/<id>, ...) in one page, so the server serves
// a single index and the browser's back button works.

import { clearKey, getKey, unauthorized } from "./api.js";
import { clear, h } from "./dom.js";
import { jobPage } from "./pages/job.js";
import { jobsPage } from "./pages/jobs.js";
import { modelPage } from "./pages/model.js";
import { modelsPage } from "./pages/models.js";
import { newJobPage } from "./pages/newjob.js";
import { signinPage } from "./pages/signin.js";
import { targetsPage } from "./pages/targets.js";
import { uploadPage } from "./pages/upload.js";

const ROUTES = [
  { pattern: /^\/signin$/, page: signinPage, open: true, nav: null },
  { pattern: /^\/jobs$/, page: jobsPage, nav: "jobs" },
  { pattern: /^\/jobs\/new$/, page: newJobPage, nav: "new" },
  { pattern: /^\/jobs\/([\w-]+)$/, page: jobPage, nav: "jobs" },
  { pattern: /^\/upload$/, page: uploadPage, nav: "upload" },
  { pattern: /^\/models$/, page: modelsPage, nav: "models" },
  { pattern: /^\/models\/([\w-]+)$/, page: modelPage, nav: "models" },
  { pattern: /^\/targets$/, page: targetsPage, nav: "targets" },
];

let cleanup = null;
let signinMessage = null;

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/jobs";
  const [path, queryString] = raw.split("?");
  return { path, query: new URLSearchParams(queryString || "") };
}

export function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function renderSession() {
  const session = clear(document.getElementById("session"));
  const nav = document.getElementById("nav");
  const key = getKey();
  nav.hidden = !key;
  if (key) {
    session.append(
      h("span", { class: "muted" }, "key ", h("code", null, `${key.slice(0, 10)}…`)),
      h("button", { type: "button", class: "link", id: "signout", onclick: () => { clearKey(); navigate("#/signin"); } }, "Sign out"),
    );
  }
}

function route() {
  if (cleanup) {
    try { cleanup(); } catch (err) { console.warn(err); }
    cleanup = null;
  }
  const { path, query } = parseHash();
  const match = ROUTES.map((r) => ({ r, m: r.pattern.exec(path) })).find((x) => x.m);
  const main = clear(document.getElementById("main"));
  renderSession();
  if (!match) {
    main.append(h("h1", null, "Not found"), h("p", null, "No page at ", h("code", null, path), ". ", h("a", { href: "#/jobs" }, "Back to the jobs")));
    return;
  }
  if (!match.r.open && !getKey()) {
    navigate(`#/signin?next=${encodeURIComponent(location.hash || "#/jobs")}`);
    return;
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === match.r.nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const context = { params: match.m.slice(1), query, navigate, message: signinMessage };
  signinMessage = null;
  cleanup = match.r.page(main, context) || null;
}

unauthorized.addEventListener("unauthorized", (ev) => {
  clearKey();
  signinMessage = ev.detail || "The API key was refused: sign in again.";
  if (parseHash().path === "/signin") {
    route();
    return;
  }
  navigate(`#/signin?next=${encodeURIComponent(location.hash)}`);
});

window.addEventListener("hashchange", route);
route();
