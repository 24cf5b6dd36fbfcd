// Targets: what the deployment's live workers serve (GET /v1/targets), and the workers themselves. A job
// names one of these targets in the job form; the default (ONNX Runtime on the CPU) is always listed.

import { api } from "../api.js";
import { errorBox, h } from "../dom.js";
import { bytes, when } from "../format.js";

/** openvino/cpu/bf16, onnxruntime/cpu */
export function targetName(t) {
  return [t.runtime, t.device, t.precision].filter(Boolean).join("/");
}

function deviceText(d) {
  const extra = d.isa && d.isa.length ? ` (${d.isa.join(", ")})` : d.memory_bytes ? ` (${bytes(d.memory_bytes)})` : "";
  return `${d.name}${extra}`;
}

function versionsText(versions) {
  return Object.entries(versions || {}).map(([name, v]) => `${name} ${v}`).join(", ") || "—";
}

export function targetsTable(targets) {
  return h("table", { class: "compact", id: "targets-table" },
    h("thead", null, h("tr", null, ["target", "queue", "workers", "devices", "versions"].map((c) => h("th", null, c)))),
    h("tbody", null, targets.map((t) => h("tr", { "data-target": targetName(t) },
      h("td", null, h("code", null, targetName(t)), t.default ? " (default)" : ""),
      h("td", null, h("code", null, t.queue)),
      h("td", null, String(t.workers), t.default && !t.workers ? h("div", { class: "small muted" }, "jobs wait for a worker") : null),
      h("td", null, (t.devices || []).map(deviceText).join("; ") || "—"),
      h("td", null, versionsText(t.versions))))));
}

function workersTable(workers) {
  if (!workers.length) return h("p", { class: "muted", id: "no-workers" }, "No live worker: jobs for the default target wait for one; other targets are refused until one serves them.");
  return h("table", { class: "compact", id: "workers-table" },
    h("thead", null, h("tr", null, ["worker", "host", "targets", "CPU", "memory", "GPUs", "started", "last seen"].map((c) => h("th", null, c)))),
    h("tbody", null, workers.map((w) => {
      const caps = w.capabilities || {};
      const cpu = caps.cpu || {};
      return h("tr", { "data-worker": w.id },
        h("td", null, h("code", null, w.id)), h("td", null, w.host),
        h("td", null, (w.targets || []).map(targetName).join(", ")),
        h("td", null, `${cpu.name || "?"} (${cpu.logical_cores ?? "?"} logical cores)`,
          cpu.isa && cpu.isa.length ? h("div", { class: "small muted" }, cpu.isa.join(" ")) : null),
        h("td", null, bytes(caps.memory_bytes)),
        h("td", null, (caps.gpus || []).map((g) => `${g.name} (${bytes(g.memory_bytes)})`).join("; ") || "none"),
        h("td", null, when(w.started_at)), h("td", null, when(w.last_seen_at)));
    })));
}

export function targetsPage(main) {
  const body = h("div", null, h("p", { class: "muted" }, "loading…"));
  main.append(h("h1", null, "Targets"),
    h("p", { class: "muted" }, "Where a job's result can be built and measured: the runtimes, devices and precisions the live workers serve. "
      + "Every result is measured beside ONNX Runtime fp32 on the same worker."), body);
  api("/v1/targets").then((found) => {
    body.replaceChildren(
      h("section", { class: "card", id: "targets" }, h("h2", null, "Targets"), targetsTable(found.targets)),
      h("section", { class: "card", id: "workers" }, h("h2", null, "Workers"), workersTable(found.workers)));
  }).catch((err) => body.replaceChildren(errorBox(err)));
}
