// One model: what it is, the jobs that compressed it, and a chart of every figure measured on it
// across those jobs (GET /v1/models/{id}/measurements), one chart per metric.

import { allPages, api } from "../api.js";
import { lineChart } from "../charts.js";
import { errorBox, h, statusBadge } from "../dom.js";
import { bytes, num, shortId, when } from "../format.js";
import { ioTable } from "./upload.js";

const METRIC_ORDER = ["p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "stdev_ms", "cv", "throughput_per_s",
  "file_bytes", "parameters", "initializer_bytes", "peak_rss_increase", "retained_rss_increase", "load_ms", "first_run_ms",
  "energy_per_inference", "watts"];
const METRIC_NAMES = {
  p50_ms: "median latency (p50)", p90_ms: "latency p90", p95_ms: "latency p95", p99_ms: "latency p99", mean_ms: "mean latency",
  min_ms: "fastest call", max_ms: "slowest call", stdev_ms: "latency standard deviation", cv: "coefficient of variation",
  throughput_per_s: "throughput", file_bytes: "file size", parameters: "parameters", initializer_bytes: "weight bytes",
  peak_rss_increase: "peak memory added", retained_rss_increase: "memory retained", load_ms: "session load time",
  first_run_ms: "first call time", energy_per_inference: "energy per inference",
};

function metricRank(metric) {
  const i = METRIC_ORDER.indexOf(metric);
  return i < 0 ? METRIC_ORDER.length : i;
}

export function measurementCharts(items) {
  // x axis: the jobs, oldest first; one series per batch size (and provider / model role when several).
  const jobs = [...new Map(items.map((m) => [m.job_id, m.created_at])).entries()].sort((a, b) => (a[1] < b[1] ? -1 : 1));
  const jobIndex = new Map(jobs.map(([id], i) => [id, i]));
  const xLabels = jobs.map(([id, at]) => `${shortId(id)} ${new Date(at).toLocaleDateString(undefined, { month: "short", day: "numeric" })}`);
  const providers = new Set(items.map((m) => m.provider));
  const roles = new Set(items.map((m) => m.model_role));
  const byMetric = new Map();
  for (const m of items) {
    if (!byMetric.has(m.metric)) byMetric.set(m.metric, { unit: m.unit, series: new Map() });
    const parts = [m.batch_size !== null && m.batch_size !== undefined ? `batch ${m.batch_size}` : "all batches"];
    if (providers.size > 1 && m.provider) parts.push(m.provider.replace("ExecutionProvider", ""));
    if (roles.size > 1) parts.push(m.model_role);
    const name = parts.join(" · ");
    const series = byMetric.get(m.metric).series;
    if (!series.has(name)) series.set(name, new Map());
    series.get(name).set(jobIndex.get(m.job_id), m.value);
  }
  const metrics = [...byMetric.keys()].sort((a, b) => metricRank(a) - metricRank(b) || a.localeCompare(b));
  return metrics.map((metric) => {
    const { unit, series } = byMetric.get(metric);
    const list = [...series.entries()].sort((a, b) => a[0].localeCompare(b[0], undefined, { numeric: true }))
      .map(([name, points]) => ({ name, points: [...points.entries()].sort((a, b) => a[0] - b[0]).map(([x, y]) => ({ x, y })) }));
    const label = METRIC_NAMES[metric] || metric;
    return h("figure", { class: "figure", "data-metric": metric },
      h("figcaption", null, `${label} `, h("code", null, metric), unit && unit !== "1" ? ` (${unit})` : ""),
      lineChart({
        title: `${label} per job`, xLabels, series: list, yLabel: unit && unit !== "1" ? `${metric} (${unit})` : metric,
        xLabel: "job (oldest first)", format: (v) => (unit === "bytes" ? bytes(v) : num(v)),
      }));
  });
}

export function modelPage(main, { params }) {
  const [modelId] = params;
  const body = h("div", null, h("p", { class: "muted" }, "loading…"));
  main.append(h("p", null, h("a", { href: "#/models" }, "← Models & datasets")), body);
  (async () => {
    const [model, measurements, jobs] = await Promise.all([
      api(`/v1/models/${modelId}`),
      allPages(`/v1/models/${modelId}/measurements`, { limit: 1000, maxItems: 20000 }),
      allPages("/v1/jobs", { maxItems: 1000 }).catch(() => []),
    ]);
    const mine = jobs.filter((j) => j.model_id === modelId);
    const ins = model.inspection || {};
    const charts = measurementCharts(measurements);
    body.replaceChildren(
      h("div", { class: "page-head" }, h("h1", null, model.name),
        h("div", { class: "actions" }, h("a", { class: "button primary", href: `#/jobs/new?model=${model.id}` }, "Compress this model"))),
      h("section", { class: "card" }, h("div", { class: "grid-2" },
        h("div", null,
          h("dl", { class: "kv" },
            h("dt", null, "id"), h("dd", null, h("code", null, model.id)),
            h("dt", null, "size"), h("dd", null, `${bytes(model.size_bytes)} (${model.format})`),
            h("dt", null, "parameters"), h("dd", null, num(ins.parameters)),
            h("dt", null, "nodes"), h("dd", null, `${ins.nodes} (${Object.entries(ins.op_histogram || {}).map(([op, n]) => `${op} ${n}`).join(", ")})`),
            h("dt", null, "opsets"), h("dd", null, (ins.opsets || []).map((o) => `${o.domain} ${o.version}`).join(", ")),
            h("dt", null, "producer"), h("dd", null, ins.producer || "—"),
            h("dt", null, "uploaded"), h("dd", null, when(model.created_at)),
            h("dt", null, "sha256"), h("dd", null, h("code", { class: "sha" }, model.sha256)))),
        h("div", null, ioTable(ins.inputs || [], "inputs"), ioTable(ins.outputs || [], "outputs")))),
      h("section", { class: "card", id: "model-jobs" }, h("h2", null, `Jobs on this model (${mine.length})`),
        mine.length ? h("ul", { class: "plain" }, mine.map((j) => h("li", null, statusBadge(j.status), " ",
          h("a", { href: `#/jobs/${j.id}` }, j.name || shortId(j.id)), ` ${(j.steps || []).map((s) => s.method).join(" → ")} · ${when(j.created_at)}`,
          j.summary?.speedup_ci ? ` · ${Object.entries(j.summary.speedup_ci).map(([b, t]) => `batch ${b}: ${t}`).join(", ")}` : "")))
          : h("p", { class: "muted" }, "None yet.")),
      h("section", { class: "card", id: "model-measurements" },
        h("h2", null, `Measurements across jobs (${measurements.length} figures)`),
        h("p", { class: "small muted" }, "Every figure measured on this model's content, one chart per metric, one point per job. Each line is a batch size; markers and dashes tell them apart."),
        charts.length ? h("div", { class: "figures-grid" }, charts) : h("p", { class: "muted" }, "Nothing measured yet: run a job on this model.")),
    );
  })().catch((err) => body.replaceChildren(errorBox(err)));
}

