// The jobs list: status and progress of every job, refreshed every 1.5 s without reloading the page.

import { allPages, api } from "../api.js";
import { clear, errorBox, h, progressBar, statusBadge, updateProgressBar } from "../dom.js";
import { bytes, duration, shortId, when } from "../format.js";

const POLL_MS = 1500;

function stepsText(job) {
  if (job.recipe && job.recipe.id) return `recipe ${job.recipe.id}`;
  return (job.steps || []).map((s) => s.method).join(" → ");
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

/** What the job is doing now; a finished job's full message sits in the Result column. */
export function stageText(job) {
  const { stage, message } = job;
  if (TERMINAL.has(job.status)) return stage || job.status;
  if (!message) return stage || "";
  if (!stage || message.startsWith(stage)) return message;
  return `${stage}: ${message}`;
}

function resultText(job) {
  const summary = job.summary;
  if (job.status === "failed" && job.error) return h("span", { class: "error-text" }, `${job.error.code}: ${job.error.message}`);
  if (!summary) return "";
  const parts = [];
  if (summary.size_ratio) parts.push(`size ×${summary.size_ratio} (${bytes(summary.original_size_bytes)} → ${bytes(summary.compressed_size_bytes)})`);
  const ci = summary.speedup_ci || {};
  const first = Object.keys(ci)[0];
  if (first) parts.push(`speed ${ci[first]} at batch ${first}`);
  return parts.join(" · ");
}

function row(job, models) {
  const model = models.get(job.model_id);
  const tr = h("tr", { "data-job-id": job.id, "data-status": job.status },
    h("td", null, h("a", { href: `#/jobs/${job.id}`, class: "job-link" }, job.name || shortId(job.id)),
      h("div", { class: "muted small" }, when(job.created_at))),
    h("td", null, model ? h("a", { href: `#/models/${model.id}` }, model.name) : shortId(job.model_id)),
    h("td", null, stepsText(job)),
    h("td", null, statusBadge(job.status)),
    h("td", { class: "progress-cell" }, progressBar(job.progress, { label: `progress of job ${job.name || shortId(job.id)}`, status: job.status }),
      h("div", { class: "muted small stage" }, stageText(job))),
    h("td", { class: "small" }, job.finished_at || job.started_at ? duration(job.started_at || job.created_at, job.finished_at) : "—"),
    h("td", { class: "small result", title: job.error ? job.error.message : job.message || "" }, h("div", { class: "clamp" }, resultText(job))),
  );
  return tr;
}

export function jobsPage(main, { query }) {
  let stopped = false;
  let timer = null;
  const models = new Map();
  const rows = new Map(); // id -> {json, tr}
  const filter = h("select", { id: "status-filter", "aria-label": "status filter" },
    ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s }, s || "all statuses")));
  filter.value = query.get("status") || "";
  const tbody = h("tbody");
  const table = h("table", { class: "jobs", id: "jobs-table" },
    h("thead", null, h("tr", null, ["Job", "Model", "Steps", "Status", "Progress", "Time", "Result"].map((c) => h("th", { scope: "col" }, c)))),
    tbody);
  const empty = h("p", { class: "muted", hidden: true }, "No jobs yet. ", h("a", { href: "#/upload" }, "Upload a model"), " and ",
    h("a", { href: "#/jobs/new" }, "start a job"), ".");
  const live = h("p", { class: "muted small live", "aria-live": "off" }, "loading…");
  const problems = h("div");
  main.append(
    h("div", { class: "page-head" }, h("h1", null, "Jobs"),
      h("div", { class: "actions" }, filter, h("a", { class: "button primary", href: "#/jobs/new" }, "New job"))),
    problems, table, empty, live,
  );

  async function refreshModels(jobs) {
    if (jobs.every((j) => !j.model_id || models.has(j.model_id))) return;
    for (const model of await allPages("/v1/models", { maxItems: 1000 })) models.set(model.id, model);
  }

  let inFlight = false;
  async function poll() {
    if (stopped) return;
    inFlight = true;
    try {
      const status = filter.value ? `&status=${filter.value}` : "";
      const page = await api(`/v1/jobs?limit=50${status}`);
      await refreshModels(page.items);
      if (stopped) return;
      clear(problems);
      const seen = new Set();
      let previous = null;
      for (const job of page.items) {
        seen.add(job.id);
        const json = JSON.stringify(job);
        let entry = rows.get(job.id);
        if (!entry || entry.json !== json) {
          const tr = row(job, models);
          if (query.get("new") === job.id) tr.classList.add("highlight");
          // Same status: move the bar rather than replace it, so its width animates.
          if (entry && entry.job.status === job.status) {
            updateProgressBar(entry.tr.querySelector(".bar"), job.progress);
            tr.querySelector(".progress-cell").replaceWith(entry.tr.querySelector(".progress-cell"));
            tr.querySelector(".stage").textContent = stageText(job);
          }
          if (entry) entry.tr.replaceWith(tr);
          entry = { json, tr, job };
          rows.set(job.id, entry);
        }
        const anchor = previous ? previous.nextSibling : tbody.firstChild;
        if (entry.tr !== anchor) tbody.insertBefore(entry.tr, anchor);
        previous = entry.tr;
      }
      for (const [id, entry] of rows) {
        if (!seen.has(id)) {
          entry.tr.remove();
          rows.delete(id);
        }
      }
      empty.hidden = page.items.length > 0;
      const active = page.items.filter((j) => j.status === "queued" || j.status === "running").length;
      live.textContent = `Updated ${new Date().toLocaleTimeString()} · refreshing every ${POLL_MS / 1000} s` +
        (active ? ` · ${active} job${active > 1 ? "s" : ""} in progress` : "");
    } catch (err) {
      if (!stopped) problems.replaceChildren(errorBox(err));
    }
    inFlight = false;
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  }
  filter.addEventListener("change", () => {
    if (inFlight) return; // the poll under way schedules the next one, which reads the filter
    clearTimeout(timer);
    poll();
  });
  poll();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
