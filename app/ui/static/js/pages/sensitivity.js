// The report's per-node sensitivity (workers.search.sensitivity): which node breaks the model when it alone is
// quantized, and which nodes take the run time. A chart of the int8 error per node with its time share beside it,
// and the ranked table; shown when the report has one.

import { rankedBarChart } from "../charts.js";
import { h } from "../dom.js";
import { num, pct } from "../format.js";

const TOP = 20;

// A time share: a fraction, "unmapped" (no profiled kernel was traced to the node) or null (not profiled).
function share(value) {
  if (value === null || value === undefined) return "—";
  return value === "unmapped" ? "unmapped" : pct(value);
}

function cosine(figures) {
  return figures ? num(figures.worst_cosine, 6) : "—";
}

// The error a chart bar shows: 1 - worst cosine, in a few digits (1e-7 reads as 1e-7, not 0.000).
function error(value) {
  if (value === null || value === undefined) return "n/a";
  return value > 0 && value < 1e-3 ? value.toExponential(1) : num(value, 3);
}

export function sensitivitySection(report) {
  const table = report.sensitivity;
  if (!table) return null;
  const rows = (table.rows || []).slice(0, TOP);
  const parts = [h("p", { class: "small muted" },
    `Each node quantized alone (int8: QuantizeLinear/DequantizeLinear in front of its inputs only; fp16: its inputs `
    + `rounded to float16), the rest float, on ${table.samples} sample(s) of ${table.source}; int8 activation ranges `
    + `from ${table.calibration}. Time shares from ONNX Runtime's profiler. ${table.rows.length} node(s) measured in `
    + `${num(table.seconds)} s.`)];
  if (rows.length) {
    parts.push(h("figure", { class: "figure", id: "sensitivity-chart" },
      h("figcaption", null, `int8 output error per node (1 − worst-sample cosine), the ${rows.length} worst first, `
        + "with the node's share of run time beside it"),
      rankedBarChart({
        title: "int8 output error per node",
        description: rows.map((r) => `${r.node}: error ${error(r.int8 ? 1 - r.int8.worst_cosine : null)}, `
          + `time ${share(r.float_time_share)}`).join("; "),
        rows: rows.map((r) => {
          const value = r.int8 ? Math.max(0, 1 - r.int8.worst_cosine) : null;
          return { label: r.node, title: `${r.node} (${r.op_type})`, value, text: error(value),
            side: `${share(r.float_time_share)}${table.quantized_model ? ` → ${share(r.quantized_time_share)}` : ""}` };
        }),
        log: true, format: (v) => (v < 1e-3 ? v.toExponential(0) : num(v)),
        xLabel: "1 − worst-sample cosine with only this node int8 (log scale, longer is worse)",
        sideLabel: table.quantized_model ? "time: float → int8" : "time share",
      })));
    parts.push(h("table", { class: "compact", id: "sensitivity-table" },
      h("caption", null, `The ${rows.length} nodes whose int8 version moves the output most, of ${table.rows.length} measured`),
      h("thead", null, h("tr", null, ["#", "node", "op", "int8 worst cosine", "int8 mean cosine", "fp16 worst cosine",
        "time share (float)", `time share (${table.quantized_model || "quantized"})`].map((c) => h("th", null, c)))),
      h("tbody", null, rows.map((r, i) => h("tr", { "data-node": r.node },
        h("td", null, i + 1), h("td", null, h("code", null, r.node)), h("td", null, r.op_type),
        h("td", null, cosine(r.int8)), h("td", null, r.int8 ? num(r.int8.mean_cosine, 6) : "—"), h("td", null, cosine(r.fp16)),
        h("td", null, share(r.float_time_share)), h("td", null, share(r.quantized_time_share)))))));
  }
  const skipped = table.skipped || [];
  if (skipped.length) {
    const reasons = {};
    for (const item of skipped) reasons[item.reason] = (reasons[item.reason] || 0) + 1;
    parts.push(h("p", { class: "small muted", id: "sensitivity-skipped" }, "Not measured: ",
      Object.entries(reasons).map(([reason, count]) => `${count} node(s): ${reason}`).join("; ")));
  }
  const unmapped = Object.entries(table.unmapped_time_share || {}).filter(([, value]) => value > 0);
  if (unmapped.length) {
    parts.push(h("p", { class: "small muted" }, "Profiled time traced to no node: ",
      unmapped.map(([model, value]) => `${model === "float" ? "float model" : table.quantized_model || model} ${pct(value)}`).join(", ")));
  }
  for (const note of table.notes || []) parts.push(h("p", { class: "small muted" }, note));
  return h("section", { class: "card", id: "sensitivity" }, h("h2", null, "Per-node sensitivity"), parts);
}
