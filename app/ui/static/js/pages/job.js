// One job: live status while it runs (server-sent events read with fetch, or polling), then its
// report, led by its verdict (and, for a goal job, the search and its candidates): latency per batch size before/after
// with the speedup's confidence interval, size, memory, energy, accuracy/fidelity, the Pareto front, the per-step
// trajectory, notes, environment, artifacts and the event log.

import { api, download, streamEvents } from "../api.js";
import { groupedBarChart, intervalChart, scatterChart } from "../charts.js";
import { clear, errorBox, h, progressBar, statusBadge, updateProgressBar } from "../dom.js";
import { bytes, duration, ms, num, pct, shortId, when } from "../format.js";
import { sensitivitySection } from "./sensitivity.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1500;

function figure(id, caption, chart, note) {
  return h("figure", { class: "figure", id }, h("figcaption", null, caption), chart, note ? h("p", { class: "small muted" }, note) : null);
}

function section(id, title, ...children) {
  return h("section", { class: "card", id }, h("h2", null, title), ...children);
}

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined).map(([k, v]) => [h("dt", null, k), h("dd", null, v ?? "—")]));
}

// --- report sections ---------------------------------------------------------------------------

// The verdict leads the report: beneficial or not, the reason in a sentence, and each check with its figure.
function verdictSection(verdict, search) {
  if (!verdict) return null;
  const good = verdict.verdict === "beneficial";
  const checks = verdict.checks || [];
  const limit = (c) => (c.limit === null || c.limit === undefined ? "—" : c.name === "max_size_bytes" ? bytes(c.limit) : num(c.limit, 4));
  const value = (c) => (c.value === null || c.value === undefined ? "—" : c.name === "max_size_bytes" ? bytes(c.value) : num(c.value, 4));
  // What the objective's figure is: the speedup interval's lower bound, or the result's share of the original.
  const what = { latency: "speedup (interval's low end)", size: "size ratio", energy: "energy ratio" };
  const label = (c) => (c.name === "objective" ? `${verdict.objective || "latency"}: ${what[verdict.objective || "latency"]}` : c.name);
  return h("section", { class: `card verdict verdict-${good ? "good" : "bad"}`, id: "verdict", "data-verdict": verdict.verdict },
    h("h2", null, good ? "✓ Beneficial" : "✗ Not beneficial"),
    h("p", { class: "verdict-reason" }, verdict.reason),
    good ? null : h("p", { class: "small muted" }, search
      ? `Nothing was handed over as the result: no candidate met the goal. Every candidate is below to download; the figures below are ${search.closest ? `the closest one's (${search.closest})` : "the search's"}.`
      : "The steps' models are still below to download: you asked for them. They are not an improvement against this job's budget."),
    checks.length ? h("table", { class: "compact", id: "verdict-checks" },
      h("caption", null, `What was checked (objective: ${verdict.objective || "latency"}${verdict.budget?.batch_size ? ` at batch ${verdict.budget.batch_size}` : ""})`),
      h("thead", null, h("tr", null, ["check", "figure", "limit", "", "why"].map((c) => h("th", null, c)))),
      h("tbody", null, checks.map((c) => h("tr", { "data-check": c.name, "data-passed": String(c.passed) },
        h("td", null, label(c)), h("td", null, value(c)), h("td", null, limit(c)),
        h("td", null, c.passed ? "✓ holds" : "✗ fails"), h("td", null, c.text))))) : null);
}

// The Pareto front over the job's models: a table, and latency against size with the faithful points filled.
function paretoSection(points, verdict) {
  if (!points || points.length < 2) return null;
  const batch = verdict?.budget?.batch_size;
  const minCosine = verdict?.budget?.min_cosine;
  const faithful = (p) => minCosine === null || minCosine === undefined || (p.worst_cosine !== null && p.worst_cosine >= minCosine);
  const withEnergy = points.every((p) => p.energy_j !== null && p.energy_j !== undefined);
  const plotted = points.filter((p) => p.p50_ms !== null && p.size_bytes !== null);
  const chart = plotted.length ? figure("pareto-chart", `Latency${batch ? ` at batch ${batch}` : ""} against size: lower-left is better; ★ on the front`, scatterChart({
    title: "p50 latency against file size per model",
    description: plotted.map((p) => `${p.name}: ${ms(p.p50_ms)}, ${bytes(p.size_bytes)}, worst cosine ${num(p.worst_cosine, 4)}${p.on_front ? ", on the front" : ""}`).join("; "),
    points: plotted.map((p) => ({ label: p.name, x: p.size_bytes, y: p.p50_ms, marked: faithful(p), front: p.on_front })),
    xLabel: "file size (lower is better)", yLabel: "p50 latency (ms, lower is better)", xFormat: bytes, yFormat: (v) => num(v),
    markedLabel: minCosine !== null && minCosine !== undefined ? `faithful (worst cosine ≥ ${minCosine})` : "faithful",
    unmarkedLabel: "not faithful", frontLabel: "Pareto front",
  })) : null;
  const table = h("table", { class: "compact", id: "pareto-table" },
    h("caption", null, "A model is on the front when no other is as good on every count and better on one"),
    h("thead", null, h("tr", null, ["model", `p50${batch ? ` @${batch}` : ""}`, "size", "worst cosine", ...(withEnergy ? ["energy"] : []), "front"].map((c) => h("th", null, c)))),
    h("tbody", null, points.map((p) => h("tr", { "data-point": p.name, "data-on-front": String(p.on_front) },
      h("td", null, p.name), h("td", null, ms(p.p50_ms)), h("td", null, bytes(p.size_bytes)), h("td", null, num(p.worst_cosine, 4)),
      withEnergy ? h("td", null, `${num(p.energy_j)} J`) : null,
      h("td", null, p.on_front ? "★ on the front" : `dominated by ${p.dominated_by.join(", ")}`)))));
  return section("pareto", "Pareto front", chart, table);
}

// A goal job's search: what it handed over (or what came closest), its time against the budget, the candidates by
// status, and every candidate with the same columns as `modelpress optimize`, each downloadable.
function candidateCells(candidate, batch) {
  const summary = candidate.summary || {};
  const fid = summary.fidelity || {};
  const judged = candidate.verdict ? `${candidate.verdict.verdict === "beneficial" ? "✓ beneficial" : "✗ not beneficial"}: ${candidate.verdict.reason}`
    : candidate.error ? `${candidate.error.code}: ${candidate.error.message}` : "—";
  return [candidate.family || "—", candidate.status, summary.speedup_ci?.[batch] || (summary.speedup?.[batch] !== undefined ? `${num(summary.speedup[batch])}x` : "—"),
    num(fid.worst_cosine ?? fid.cosine_similarity, 4), summary.size_ratio !== undefined && summary.size_ratio !== null ? `×${num(summary.size_ratio)}` : "—", judged]
    .map((text) => h("td", null, text));
}

const CANDIDATE_COLUMNS = (batch) => ["candidate", "family", "status", `speedup @${batch}`, "worst cosine", "size", "verdict", ""];

function searchSection(jobId, report, artifacts) {
  const search = report.search;
  if (!search) return null;
  const batch = String(search.goal?.batch_size ?? 1);
  const byName = new Map(artifacts.map((a) => [a.name, a]));
  const counts = Object.entries(search.candidates || {}).map(([status, n]) => `${n} ${status}`).join(", ");
  const facts = kv([
    ["handed over", search.result_artifact ? h("span", null, h("code", null, search.result_artifact), ` (candidate ${search.chosen})`) : "nothing: no candidate met the goal"],
    ["closest", search.result_artifact ? undefined : search.closest || "—"],
    ["time", `${num(search.elapsed_s)} s of the ${search.time_budget_s} s budget`],
    ["candidates", counts || "none"],
  ]);
  const rows = (report.candidates || []).map((c) => {
    const mark = c.name === search.chosen ? " (chosen)" : c.name === search.closest ? " (closest)" : "";
    const artifact = c.artifact && byName.get(c.artifact);
    return h("tr", { "data-candidate": c.name, "data-status": c.status, "data-verdict": c.verdict?.verdict || "" },
      h("td", null, c.name, mark ? h("strong", null, mark) : null, c.why ? h("div", { class: "small muted" }, c.why) : null),
      candidateCells(c, batch), h("td", null, artifact ? downloadButton(jobId, artifact, "⬇ Download") : "—"));
  });
  const notes = search.notes || [];
  return section("search", "Search", facts,
    h("table", { class: "compact", id: "candidates-table" },
      h("caption", null, `Every candidate, measured briefly against the original (${search.candidate_measurement?.iterations ?? "?"} timed calls each)`),
      h("thead", null, h("tr", null, CANDIDATE_COLUMNS(batch).map((c) => h("th", null, c)))), h("tbody", null, rows)),
    notes.length ? h("ul", { class: "notes small" }, notes.map((n) => h("li", null, n))) : null);
}

function headline(summary) {
  const cards = [];
  if (summary.size_ratio !== null && summary.size_ratio !== undefined) {
    cards.push(["Size", `×${summary.size_ratio}`, `${bytes(summary.original_size_bytes)} → ${bytes(summary.compressed_size_bytes)}`]);
  }
  for (const [batch, text] of Object.entries(summary.speedup_ci || {})) cards.push([`Speed, batch ${batch}`, text.split(" ")[0], `95% interval ${text.split(" ").slice(1).join(" ")}`]);
  const acc = summary.accuracy;
  if (acc) cards.push(["Top-1 accuracy", `${pct(acc.compressed_top1)}`, `original ${pct(acc.original_top1)}, drop ${num(acc.top1_drop_points)} points`]);
  const fid = summary.fidelity || {};
  if (fid.cosine_similarity !== null && fid.cosine_similarity !== undefined) cards.push(["Output cosine", num(fid.cosine_similarity, 4), summary.fidelity_on || ""]);
  cards.push(["Energy", summary.energy_j_per_inference ? `${num(summary.energy_j_per_inference?.result ?? summary.energy_j_per_inference)} J` : "not measured",
    summary.energy_j_per_inference ? "per inference" : "see Energy below"]);
  return h("div", { class: "headline", id: "headline" }, cards.map(([title, big, small]) =>
    h("div", { class: "stat" }, h("div", { class: "stat-title" }, title), h("div", { class: "stat-value" }, big), h("div", { class: "stat-note" }, small))));
}

// A job with a target: its total speedup (the result on the target vs the original on ONNX Runtime fp32) is the
// runtime's gain (the original on the target vs on ONNX Runtime) times the compression's (the result vs the
// original, both on the target). Shown side by side per batch size, when the summary has them.
function gainsSection(summary) {
  const target = summary.target;
  if (!target) return null;
  const name = [target.runtime, target.device, target.precision].filter(Boolean).join("/");
  const runtime = summary.runtime_speedup || {};
  const compression = summary.compression_speedup || {};
  const total = summary.speedup || {};
  const batches = [...new Set([...Object.keys(runtime), ...Object.keys(compression), ...Object.keys(total)])]
    .sort((a, b) => Number(a) - Number(b));
  const text = (values, texts, batch) => (texts || {})[batch] || (values[batch] !== undefined && values[batch] !== null ? `${num(values[batch])}x` : "—");
  const parts = [h("p", { class: "small muted" }, `Measured on ${name}${target.device_name ? ` (${target.device_name})` : ""}, `
    + "beside ONNX Runtime fp32 on the same worker. Total = runtime gain × compression gain.")];
  if (batches.length) {
    parts.push(figure("gains-chart", "Speedup over the original on ONNX Runtime fp32: the runtime's gain and the compression's", groupedBarChart({
      title: `runtime gain, compression gain and total speedup on ${name}`,
      description: batches.map((b) => `batch ${b}: runtime ${text(runtime, summary.runtime_speedup_ci, b)}, compression ${text(compression, summary.compression_speedup_ci, b)}, total ${text(total, summary.speedup_ci, b)}`).join("; "),
      // A gain not measured is drawn as "n/a", never as zero.
      groups: batches.map((b) => ({ label: `batch ${b}`, bars: [["runtime", runtime], ["compression", compression], ["total", total]]
        .map(([series, values]) => ({ series, value: values[b] ?? null })) })),
      yLabel: "speedup (×, higher is better)", xLabel: "batch size", format: (v) => `${num(v)}x`,
    })));
    parts.push(h("table", { class: "compact", id: "gains-table" },
      h("caption", null, "Speedup per batch size, with its 95% interval"),
      h("thead", null, h("tr", null, ["batch", `runtime gain (original: ${target.runtime} vs onnxruntime)`, `compression gain (result vs original, on ${target.runtime})`, "total"].map((c) => h("th", null, c)))),
      h("tbody", null, batches.map((b) => h("tr", { "data-batch": b }, h("td", null, b),
        h("td", { "data-gain": "runtime" }, text(runtime, summary.runtime_speedup_ci, b)),
        h("td", { "data-gain": "compression" }, text(compression, summary.compression_speedup_ci, b)),
        h("td", { "data-gain": "total" }, text(total, summary.speedup_ci, b)))))));
  }
  return section("gains", `Target ${name}: the runtime's gain and the compression's`, parts);
}

function latencySection(measurement) {
  const providers = (measurement.providers || []).length ? measurement.providers
    : [{ provider: measurement.latency?.provider || "CPUExecutionProvider", available: true, latency: measurement.latency }];
  const parts = [];
  for (const provider of providers) {
    if (!provider.available) {
      parts.push(h("p", { class: "unavailable" }, h("strong", null, provider.provider), ` unavailable: ${provider.reason}`));
      continue;
    }
    const batches = provider.latency?.batch_sizes || [];
    if (!batches.length) continue;
    const suffix = providers.length > 1 ? ` on ${provider.provider}` : "";
    parts.push(figure(`latency-chart${suffix ? `-${provider.provider}` : ""}`, `Median latency (p50) per batch size, original vs compressed${suffix}`,
      groupedBarChart({
        title: `p50 latency per batch size${suffix}`,
        description: batches.map((b) => `batch ${b.batch_size}: original ${ms(b.baseline.p50_ms)}, compressed ${ms(b.result.p50_ms)}, speedup ${b.speedup_text || num(b.speedup)}`).join("; "),
        groups: batches.map((b) => ({
          label: `batch ${b.batch_size}`,
          note: b.speedup_text ? `speedup ${b.speedup_text}` : `speedup ${num(b.speedup)}x`,
          bars: [{ series: "original", value: b.baseline.p50_ms }, { series: "compressed", value: b.result.p50_ms }],
        })),
        yLabel: "p50 latency (ms, lower is better)", xLabel: "batch size (under each group: speedup with its 95% interval)",
        format: (v) => num(v),
      })));
    const withCi = batches.filter((b) => b.speedup_ci && b.speedup_ci.low !== undefined);
    if (withCi.length) {
      parts.push(figure(`speedup-chart${suffix ? `-${provider.provider}` : ""}`, `Speedup (original p50 / compressed p50) with its 95% bootstrap interval${suffix}`,
        intervalChart({
          title: `speedup with 95% interval${suffix}`,
          rows: withCi.map((b) => ({ label: `batch ${b.batch_size}`, value: b.speedup, low: b.speedup_ci.low, high: b.speedup_ci.high, text: b.speedup_text || `${num(b.speedup)}x` })),
          xLabel: "speedup (× faster; an interval containing 1.00x cannot tell the models apart)",
        }),
        withCi[0].speedup_ci.method));
    }
    parts.push(h("table", { class: "compact latency-table" },
      h("caption", null, `Latency percentiles${suffix} (${provider.latency.iterations} timed calls per model and batch size, ${provider.latency.warmup} warm-up)`),
      h("thead", null, h("tr", null, ["batch", "model", "p50", "p90", "p99", "mean", "cv", "throughput", ""].map((c) => h("th", null, c)))),
      h("tbody", null, batches.flatMap((b) => ["baseline", "result"].map((role) => {
        const st = b[role];
        return h("tr", null, h("td", null, b.batch_size), h("td", null, role === "baseline" ? "original" : "compressed"),
          h("td", null, ms(st.p50_ms)), h("td", null, ms(st.p90_ms)), h("td", null, ms(st.p99_ms)), h("td", null, ms(st.mean_ms)),
          h("td", null, pct(st.cv, 0)), h("td", null, `${num(st.throughput_per_s)}/s`), h("td", null, st.noisy ? "noisy" : ""));
      })))));
  }
  const skipped = measurement.latency?.skipped || [];
  if (skipped.length) parts.push(h("p", { class: "small muted" }, "Skipped: ", skipped.map((s) => `batch ${s.batch_size} (${s.reason})`).join("; ")));
  return section("latency", "Latency", parts.length ? parts : h("p", { class: "muted" }, "No latency was measured."));
}

function sizeSection(measurement, summary) {
  const size = measurement.size || {};
  const memory = measurement.memory || {};
  const cold = measurement.cold_start || {};
  const charts = [];
  if (size.baseline && size.result) {
    charts.push(figure("size-chart", "File size", groupedBarChart({
      title: "file size, original vs compressed", width: 320, height: 280,
      groups: [{ label: "file", note: `×${size.ratio}`, bars: [{ series: "original", value: size.baseline.file_bytes }, { series: "compressed", value: size.result.file_bytes }] }],
      yLabel: "bytes (lower is better)", format: bytes,
    }), `${num(size.baseline.parameters)} → ${num(size.result.parameters)} parameters`));
  }
  if (memory.baseline && memory.result) {
    charts.push(figure("memory-chart", "Peak memory added", groupedBarChart({
      title: "peak resident memory a session adds", width: 320, height: 280,
      groups: [{ label: `batch ${memory.batch_size}`, note: memory.ratio ? `×${memory.ratio}` : "", bars: [
        { series: "original", value: memory.baseline.peak_rss_increase_bytes }, { series: "compressed", value: memory.result.peak_rss_increase_bytes }] }],
      yLabel: "bytes (lower is better)", format: bytes,
    })));
  }
  if (cold.baseline && cold.result) {
    charts.push(figure("cold-start-chart", "Cold start", groupedBarChart({
      title: "session load and first call", width: 320, height: 280,
      groups: [
        { label: "load", bars: [{ series: "original", value: cold.baseline.load_ms }, { series: "compressed", value: cold.result.load_ms }] },
        { label: "first call", bars: [{ series: "original", value: cold.baseline.first_run_ms }, { series: "compressed", value: cold.result.first_run_ms }] },
      ],
      yLabel: "ms (lower is better)", format: (v) => num(v),
    })));
  }
  if (!charts.length && summary.original_size_bytes) {
    charts.push(kv([["original", bytes(summary.original_size_bytes)], ["compressed", bytes(summary.compressed_size_bytes)]]));
  }
  return section("size", "Size, memory and cold start", h("div", { class: "figures-row" }, charts),
    memory.method ? h("p", { class: "small muted" }, memory.method) : null);
}

function energySection(measurement, summary) {
  const energy = measurement.energy || { value: null, reason: summary.energy_note };
  const parts = [];
  if (energy.value && (energy.batch_sizes || []).length) {
    parts.push(figure("energy-chart", `Energy per inference (${energy.counter || "hardware counter"}, ${energy.scope || ""})`, groupedBarChart({
      title: "energy per inference",
      groups: energy.batch_sizes.map((b) => ({ label: `batch ${b.batch_size}`, note: b.ratio ? `×${b.ratio}` : "",
        bars: [{ series: "original", value: b.baseline_j_per_inference }, { series: "compressed", value: b.result_j_per_inference }] })),
      yLabel: "joules per inference (lower is better)", format: (v) => `${num(v)} J`,
    }), energy.window));
  } else {
    parts.push(h("p", { class: "null-reason", id: "energy-null" }, h("strong", null, "Not measured: "), energy.reason || "no energy counter was read"));
  }
  if (energy.estimate) {
    const est = energy.estimate;
    parts.push(figure("energy-estimate-chart", "ESTIMATE (not a measurement): energy per inference from the TDP you gave", groupedBarChart({
      title: "estimated energy per inference",
      groups: (est.batch_sizes || []).map((b) => ({ label: `batch ${b.batch_size}`,
        bars: [{ series: "original", value: b.baseline_j_per_inference, text: `~${num(b.baseline_j_per_inference)} J` },
          { series: "compressed", value: b.result_j_per_inference, text: `~${num(b.result_j_per_inference)} J` }] })),
      yLabel: "estimated joules per inference", format: (v) => `${num(v)} J`,
    }), `${est.formula}. ${est.caveat}`));
  }
  return section("energy", "Energy", parts);
}

function qualitySection(summary, measurement) {
  const parts = [];
  const acc = summary.accuracy;
  if (acc) {
    const groups = [{ label: "top-1", note: `drop ${num(acc.top1_drop_points)} points`, bars: [
      { series: "original", value: acc.original_top1 * 100, text: pct(acc.original_top1) }, { series: "compressed", value: acc.compressed_top1 * 100, text: pct(acc.compressed_top1) }] }];
    if (acc.original_top5 !== null && acc.original_top5 !== undefined) {
      groups.push({ label: "top-5", bars: [
        { series: "original", value: acc.original_top5 * 100, text: pct(acc.original_top5) }, { series: "compressed", value: acc.compressed_top5 * 100, text: pct(acc.compressed_top5) }] });
    }
    parts.push(figure("accuracy-chart", `Accuracy on ${acc.samples} labelled samples`, groupedBarChart({
      title: "accuracy, original vs compressed", width: 420, groups, yLabel: "accuracy (%, higher is better)", format: (v) => `${num(v)}%`,
    }), summary.accuracy_note));
  } else {
    parts.push(h("p", { class: "muted" }, "No accuracy: the job named no labelled eval dataset (evaluate.eval_dataset_id)."));
  }
  const fid = summary.fidelity || {};
  parts.push(h("h3", null, "Fidelity (how far the outputs move)"),
    kv([
      ["measured on", summary.fidelity_on || measurement.fidelity?.inputs],
      ["cosine similarity (mean)", num(fid.cosine_similarity, 5)],
      ["worst-case cosine", fid.worst_cosine !== undefined ? num(fid.worst_cosine, 5) : undefined],
      ["max abs difference", num(fid.max_abs_diff)],
      ["top-1 agreement", pct(fid.top1_agreement)],
    ]));
  const outputs = measurement.fidelity?.outputs || [];
  if (outputs.length > 1) {
    parts.push(h("table", { class: "compact" }, h("caption", null, "per output"),
      h("thead", null, h("tr", null, ["output", "cosine", "max abs diff", "top-1 agreement"].map((c) => h("th", null, c)))),
      h("tbody", null, outputs.map((o) => h("tr", null, h("td", null, o.name), h("td", null, num(o.cosine_similarity, 5)), h("td", null, num(o.max_abs_diff)), h("td", null, pct(o.top1_agreement)))))));
  }
  return section("quality", "Accuracy and fidelity", parts);
}

function trajectorySection(summary) {
  const trajectory = summary.trajectory || [];
  if (trajectory.length < 2) return null;
  const batches = Object.keys(trajectory[0].speedup || {});
  const first = batches[0];
  const stepLabel = (t) => `step ${t.step}\n${t.method.replace(".", ".\n")}`; // prune.magnitude: two lines
  const charts = h("div", { class: "figures-row" },
    figure("trajectory-size-chart", "Size after each step", groupedBarChart({
      title: "model size after each step", width: 460, height: 320,
      groups: [{ label: "original", bars: [{ series: "original", value: summary.original_size_bytes }] },
        ...trajectory.map((t) => ({ label: stepLabel(t), note: `×${t.size_ratio}`, bars: [{ series: "compressed", value: t.size_bytes }] }))],
      yLabel: "bytes", format: bytes,
    })),
    first ? figure("trajectory-speed-chart", `Speedup at batch ${first} after each step`, groupedBarChart({
      title: `speedup at batch ${first} after each step`, width: 460, height: 320,
      groups: trajectory.map((t) => ({ label: stepLabel(t), bars: [{ series: "compressed", value: t.speedup?.[first], text: `${num(t.speedup?.[first])}x` }] })),
      yLabel: "speedup vs original (×)", format: (v) => `${num(v)}x`,
    })) : null);
  const table = h("table", { class: "compact", id: "trajectory-table" },
    h("caption", null, "Every step's model measured against the original"),
    h("thead", null, h("tr", null, ["step", "method", "size", "× original", ...batches.map((b) => `p50 @${b}`), ...batches.map((b) => `speedup @${b}`), "top-1", "cosine", "model"].map((c) => h("th", null, c)))),
    h("tbody", null, trajectory.map((t) => h("tr", null,
      h("td", null, t.step), h("td", null, t.method), h("td", null, bytes(t.size_bytes)), h("td", null, num(t.size_ratio)),
      batches.map((b) => h("td", null, ms(t.latency_p50_ms?.[b]))), batches.map((b) => h("td", null, `${num(t.speedup?.[b])}x`)),
      h("td", null, t.top1 !== null && t.top1 !== undefined ? `${pct(t.top1)} (−${num(t.top1_drop_points)})` : "—"),
      h("td", null, num(t.cosine, 4)), h("td", null, h("code", null, t.artifact))))));
  return section("trajectory", "Trajectory of the pipeline", charts, table);
}

function stepsSection(report) {
  return section("steps", "Steps", (report.steps || []).map((step) => h("details", { class: "step-detail" },
    h("summary", null, `${step.index}. ${step.method} (v${step.version}) — ${step.duration_s ?? "?"} s`),
    h("pre", { class: "json" }, JSON.stringify({ params: step.params, details: step.details }, null, 2)))));
}

function environmentSection(env) {
  if (!env) return null;
  return section("environment", "Measured on", kv([
    ["CPU", `${env.cpu} (${env.physical_cores} physical / ${env.logical_cores} logical cores)`],
    ["memory", bytes(env.memory_bytes)], ["GPU", env.gpu ? `${env.gpu} (driver ${env.gpu_driver})` : "none"],
    ["OS", env.os], ["Python", env.python], ["ONNX Runtime", env.onnxruntime], ["torch", env.torch],
    ["provider", env.provider], ["threads", env.threads], ["pinned cores", (env.pinned_cores || []).join(", ")],
    ["process", env.process?.how],
  ]));
}

function notesSection(summary) {
  const notes = summary.notes || [];
  if (!notes.length) return null;
  return section("notes", "Notes", h("ul", { class: "notes" }, notes.map((n) => h("li", null, n))));
}

/** A button that downloads an artifact (with the key) and checks its sha256, and the line saying how it went. */
function downloadButton(jobId, a, label = `⬇ Download ${a.name}`) {
  const status = h("span", { class: "small download-status", "aria-live": "polite" });
  const button = h("button", { type: "button", class: "download", "data-artifact": a.name }, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    status.textContent = " downloading…";
    try {
      const got = await download(`/v1/jobs/${jobId}/artifacts/${encodeURIComponent(a.name)}`, a.name);
      status.textContent = got.actual === null ? ` saved (${bytes(got.size)})`
        : got.actual === a.sha256 ? ` ✓ saved, sha256 verified (${bytes(got.size)})` : " ✗ sha256 mismatch: the file is damaged";
    } catch (err) {
      status.replaceChildren(errorBox(err));
    } finally {
      button.disabled = false;
    }
  });
  return h("span", null, button, status);
}

function artifactsSection(jobId, artifacts) {
  const rows = artifacts.map((a) => h("tr", { "data-artifact-row": a.name }, h("td", null, h("code", null, a.name)), h("td", null, a.kind),
    h("td", null, bytes(a.size_bytes)), h("td", null, h("code", { class: "sha", title: a.sha256 }, `${a.sha256.slice(0, 12)}…`)),
    h("td", null, downloadButton(jobId, a))));
  return section("artifacts", "Downloads", artifacts.length
    ? h("table", { class: "compact" }, h("thead", null, h("tr", null, ["file", "kind", "size", "sha256", ""].map((c) => h("th", null, c)))), h("tbody", null, rows))
    : h("p", { class: "muted" }, "No artifacts."));
}

function measurementsSection(jobId) {
  const body = h("div", null, h("p", { class: "muted" }, "loading…"));
  const details = h("details", { id: "all-measurements" }, h("summary", null, "Every measured figure (table)"), body);
  let loaded = false;
  details.addEventListener("toggle", async () => {
    if (!details.open || loaded) return;
    loaded = true;
    try {
      const { items } = await api(`/v1/jobs/${jobId}/measurements`);
      body.replaceChildren(h("table", { class: "compact" },
        h("thead", null, h("tr", null, ["model", "provider", "batch", "metric", "value", "unit"].map((c) => h("th", null, c)))),
        h("tbody", null, items.map((m) => h("tr", null, h("td", null, m.model_role), h("td", null, m.provider || "—"), h("td", null, m.batch_size ?? "—"),
          h("td", null, m.metric), h("td", null, num(m.value, 5)), h("td", null, m.unit))))));
    } catch (err) {
      body.replaceChildren(errorBox(err));
    }
  });
  return h("section", { class: "card" }, h("h2", null, "Measurements"), details);
}

/** A goal in a line: "latency at batch 1; worst cosine ≥ 0.99; time budget 900 s; families: all that apply". */
function goalText(goal) {
  const parts = [`${goal.objective} at batch ${goal.batch_size}`];
  if (goal.min_cosine !== null && goal.min_cosine !== undefined) parts.push(`worst cosine ≥ ${goal.min_cosine}`);
  if (goal.max_accuracy_drop !== null && goal.max_accuracy_drop !== undefined) parts.push(`top-1 drop ≤ ${goal.max_accuracy_drop} points`);
  if (goal.max_latency_ms) parts.push(`p50 ≤ ${ms(goal.max_latency_ms)}`);
  if (goal.max_size_bytes) parts.push(`size ≤ ${bytes(goal.max_size_bytes)}`);
  if (goal.min_speedup) parts.push(`at least ${goal.min_speedup}x faster`);
  parts.push(`time budget ${goal.time_budget_s} s`, `families: ${goal.families ? goal.families.join(", ") : "all that apply"}`);
  return parts.join("; ");
}

// While a goal job runs: the candidates finished so far, from their records (artifacts of kind candidate-record).
function liveCandidates(jobId, batch) {
  const body = h("tbody");
  const element = section("candidates-so-far", "Candidates so far",
    h("table", { class: "compact", id: "live-candidates-table" },
      h("thead", null, h("tr", null, CANDIDATE_COLUMNS(batch).slice(0, -1).map((c) => h("th", null, c)))), body));
  const seen = new Set();
  let busy = false;
  let again = false; // asked while busy: look once more when done, so the last candidate is not missed
  async function update() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      const records = (await api(`/v1/jobs/${jobId}/artifacts`)).filter((a) => a.kind === "candidate-record" && !seen.has(a.name));
      for (const a of records) {
        seen.add(a.name);
        const record = await api(`/v1/jobs/${jobId}/artifacts/${encodeURIComponent(a.name)}`);
        body.append(h("tr", { "data-candidate": record.plan.name, "data-status": record.status },
          h("td", null, record.plan.name), candidateCells({ ...record, family: record.plan.family }, batch)));
      }
    } catch {
      /* the final report lists them all */
    } finally {
      busy = false;
    }
    if (again) {
      again = false;
      update();
    }
  }
  return { element, update };
}

// --- the page ----------------------------------------------------------------------------------

export function jobPage(main, { params }) {
  const [jobId] = params;
  let stopped = false;
  let timer = null;
  const controller = new AbortController();
  let job = null;
  let etag = null;
  let lastEventId = 0;
  let rendered = null; // the status the report was last rendered for
  let live = null; // a running goal job's candidates so far

  const title = h("h1", null, `Job ${shortId(jobId)}`);
  const badge = h("span");
  const bar = progressBar(0, { label: "job progress" });
  const stage = h("p", { class: "stage muted" });
  const facts = h("div");
  const errorArea = h("div");
  const cancel = h("button", { type: "button", id: "cancel-job", hidden: true }, "Cancel");
  const liveNote = h("span", { class: "small muted", id: "live-mode" });
  const statusCard = h("section", { class: "card", id: "job-status" }, bar, stage, liveNote, errorArea, facts);
  let streamed = 0;
  const report = h("div", { id: "report" });
  const eventsBody = h("tbody");
  const events = section("events", "Event log", h("table", { class: "compact events" },
    h("thead", null, h("tr", null, ["time", "kind", "status", "progress", "stage", "message"].map((c) => h("th", null, c)))), eventsBody));
  main.append(
    h("p", null, h("a", { href: "#/jobs" }, "← All jobs")),
    h("div", { class: "page-head" }, h("div", null, title, badge), h("div", { class: "actions" }, cancel)),
    statusCard,
    report, events);

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      showJob(await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" }));
    } catch (err) {
      errorArea.replaceChildren(errorBox(err));
    }
  });

  // What was measured (summary.input_shapes, with where each chosen size came from), else what was asked for.
  function inputShapesText(job) {
    const measured = job.summary?.input_shapes;
    if (measured) {
      const sources = job.summary.input_shapes_source || {};
      return Object.entries(measured).map(([name, shape]) => {
        const chosen = [...new Set((sources[name] || []).filter((s) => s !== "batch size" && s !== "declared by the model"))];
        return `${name} [${shape.join(", ")}]` + (chosen.length ? ` (${chosen.join("; ")})` : "");
      }).join("; ");
    }
    const given = job.evaluate?.input_shapes;
    return given ? JSON.stringify(given) : "from the model (and the job's datasets)";
  }

  function showJob(next) {
    job = next;
    if (!statusCard.dataset.firstStatus) statusCard.dataset.firstStatus = job.status;
    title.textContent = job.name ? `Job ${job.name}` : `Job ${shortId(job.id)}`;
    badge.replaceChildren(statusBadge(job.status));
    updateProgressBar(bar, job.progress);
    bar.className = `bar bar-${job.status}`;
    // A finished job's message stands alone (it leads with the verdict).
    stage.textContent = job.message && job.stage && job.stage !== "done" && !job.message.startsWith(job.stage) ? `${job.stage}: ${job.message}` : job.message || job.stage || "";
    cancel.hidden = TERMINAL.has(job.status);
    if (TERMINAL.has(job.status)) liveNote.textContent = "";
    cancel.disabled = false;
    errorArea.replaceChildren(job.error ? errorBox(job.error) : "");
    const steps = job.recipe?.id ? `recipe ${job.recipe.id}: ${(job.steps || []).map((s) => s.method).join(" → ")}` : (job.steps || []).map((s) => s.method).join(" → ");
    facts.replaceChildren(kv([
      ["id", h("code", null, job.id)], ["model", job.model_id ? h("a", { href: `#/models/${job.model_id}` }, shortId(job.model_id)) : "—"],
      ["goal", job.goal ? goalText(job.goal) : undefined],
      ["steps", steps || (job.goal ? "chosen by the search" : job.target ? "none: the target's lowering only" : "")],
      ["target", job.target ? [job.target.runtime, job.target.device, job.target.precision].filter(Boolean).join("/") : "onnxruntime/cpu (default)"],
      ["batch sizes", (job.evaluate?.batch_sizes || []).join(", ")],
      ["input shapes", inputShapesText(job)],
      ["created", when(job.created_at)], ["ran for", job.started_at ? duration(job.started_at, job.finished_at) : "—"],
      ["queue / attempts", `${job.queue} / ${job.attempts}`],
    ]));
    if (job.goal && job.status === "running") {
      if (!live) {
        live = liveCandidates(jobId, String(job.goal.batch_size));
        report.replaceChildren(live.element);
      }
      live.update();
    }
    if (TERMINAL.has(job.status) && rendered !== job.status) {
      rendered = job.status;
      renderReport();
    }
  }

  function addEvents(list) {
    for (const ev of list) {
      if (ev.id <= lastEventId) continue;
      lastEventId = ev.id;
      eventsBody.append(h("tr", { "data-kind": ev.kind }, h("td", null, when(ev.created_at)), h("td", null, ev.kind), h("td", null, ev.status),
        h("td", null, pct(ev.progress, 0)), h("td", null, ev.stage || ""), h("td", null, ev.message || "")));
    }
  }

  async function renderReport() {
    const [reportData, artifacts] = await Promise.all([
      // Only a succeeded job has a report; a failed one keeps the models of the steps before it.
      job.status === "succeeded" ? api(`/v1/jobs/${jobId}/report`) : Promise.resolve(null),
      api(`/v1/jobs/${jobId}/artifacts`),
    ]).catch((err) => {
      report.replaceChildren(errorBox(err));
      return [undefined, undefined];
    });
    if (artifacts === undefined || stopped) return;
    const parts = [];
    if (reportData) {
      const summary = reportData.summary || job.summary || {};
      const measurement = reportData.measurement || {};
      parts.push(verdictSection(reportData.verdict || summary.verdict, reportData.search), searchSection(jobId, reportData, artifacts), headline(summary), gainsSection(summary), latencySection(measurement), sizeSection(measurement, summary), qualitySection(summary, measurement),
        sensitivitySection(reportData), energySection(measurement, summary), paretoSection(reportData.pareto, reportData.verdict || summary.verdict),
        trajectorySection(summary), notesSection(summary), stepsSection(reportData),
        environmentSection(measurement.environment));
    } else if (job.status !== "succeeded") {
      parts.push(h("p", { class: "muted" }, `The job ${job.status}: no report. The models of the steps that finished are below.`));
    }
    parts.push(artifactsSection(jobId, artifacts));
    if (reportData) parts.push(measurementsSection(jobId));
    report.replaceChildren(...parts.filter(Boolean));
    report.dataset.ready = "true";
  }

  async function refresh() {
    const got = await api(`/v1/jobs/${jobId}`, { etag });
    if (!got.notModified) {
      etag = got.etag;
      showJob(got.data);
    }
    addEvents(await api(`/v1/jobs/${jobId}/events?after=${lastEventId}`));
  }

  // Events can come in bursts: at most one refresh in flight, and one more after it if needed.
  let refreshing = null;
  let again = false;
  function refreshSoon() {
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = refresh().catch(() => {}).finally(() => {
      refreshing = null;
      if (again && !stopped) {
        again = false;
        refreshSoon();
      }
    });
  }

  async function poll() {
    if (stopped) return;
    try {
      await refresh();
    } catch (err) {
      if (!stopped) errorArea.replaceChildren(errorBox(err));
    }
    if (!stopped && !(job && TERMINAL.has(job.status))) timer = setTimeout(poll, POLL_MS);
  }

  async function follow() {
    await refresh();
    if (TERMINAL.has(job.status)) {
      liveNote.textContent = "";
      return;
    }
    try {
      // Each event says something changed; the JSON routes say what (robust to the stream's exact payload).
      liveNote.textContent = "live: following the job's event stream";
      statusCard.dataset.live = "stream";
      await streamEvents(`/v1/jobs/${jobId}/events`, {
        signal: controller.signal, lastEventId,
        onEvent: (ev) => {
          streamed += 1;
          statusCard.dataset.streamed = String(streamed);
          const data = ev.json;
          if (data && typeof data.id === "number") {
            addEvents([data]);
            if (live && data.job_status === "running") live.update(); // a progress event: a candidate may have finished
            if (typeof data.job_progress === "number") updateProgressBar(bar, data.job_progress);
            if (data.message || data.stage) stage.textContent = data.message || data.stage;
          }
          // A state change (or an event this page cannot read): fetch the job itself.
          if (!data || !job || data.kind === "state" || (data.job_status && data.job_status !== job.status)) refreshSoon();
        },
      });
      await refresh();
      if (!TERMINAL.has(job.status) && !stopped) poll();
    } catch (err) {
      if (stopped) return;
      liveNote.textContent = `live: refreshing every ${POLL_MS / 1000} s`;
      statusCard.dataset.live = "poll";
      poll();
    }
  }

  follow().catch((err) => {
    errorArea.replaceChildren(errorBox(err));
    poll();
  });
  return () => {
    stopped = true;
    controller.abort();
    clearTimeout(timer);
  };
}
