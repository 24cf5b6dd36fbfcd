// Small SVG charts, readable without colour: every bar and point carries its value as text, the two
// models differ by fill pattern (solid vs hatched) and by a text label under each bar, axes are named.

import { s } from "./dom.js";
import { num } from "./format.js";

let chartCount = 0;
const FONT = 12;

// Series styles: a fill colour plus a pattern, so print and colour-blind readers can tell them apart.
export const SERIES = {
  original: { label: "original", short: "orig.", color: "#56657a", pattern: "solid" },
  compressed: { label: "compressed", short: "comp.", color: "#1f6fbf", pattern: "hatch" },
  estimate: { label: "estimate", short: "est.", color: "#9a6a12", pattern: "dots" },
  // A target's speedups (the job page's gains): the runtime's, the compression's, and their product.
  runtime: { label: "runtime gain", short: "runtime", color: "#7a4f9e", pattern: "dots" },
  compression: { label: "compression gain", short: "compr.", color: "#1f6fbf", pattern: "hatch" },
  total: { label: "total", short: "total", color: "#2f7d5b", pattern: "solid" },
  single: { label: "", short: "", color: "#2f7d5b", pattern: "solid" },
};

function niceStep(span, target = 5) {
  const raw = span / target;
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = raw / power;
  return (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 2.5 ? 2.5 : unit <= 5 ? 5 : 10) * power;
}

function ticks(min, max, target = 5) {
  if (!(max > min)) max = min + 1;
  const step = niceStep(max - min, target);
  const out = [];
  // From the last tick at or below min to the first at or above max, so the axis covers every value.
  const first = Math.floor(min / step + 1e-9) * step;
  for (let v = first; out.length < 50; v += step) {
    out.push(Number(v.toPrecision(12)));
    if (v >= max - step * 1e-9) break;
  }
  return out;
}

/** Room for the y tick labels plus the rotated axis label, so neither overlaps the other. */
function leftMargin(tickValues, format) {
  const longest = Math.max(...tickValues.map((t) => String(format(t)).length), 1);
  return Math.max(56, 34 + longest * 7);
}

function patternDefs(id) {
  const defs = s("defs");
  for (const [name, style] of Object.entries(SERIES)) {
    if (style.pattern === "hatch") {
      defs.append(
        s("pattern", { id: `${id}-${name}`, patternUnits: "userSpaceOnUse", width: 7, height: 7, patternTransform: "rotate(45)" },
          s("rect", { width: 7, height: 7, fill: style.color }),
          s("line", { x1: 0, y1: 0, x2: 0, y2: 7, stroke: "#ffffff", "stroke-width": 2.5 })),
      );
    } else if (style.pattern === "dots") {
      defs.append(
        s("pattern", { id: `${id}-${name}`, patternUnits: "userSpaceOnUse", width: 6, height: 6 },
          s("rect", { width: 6, height: 6, fill: style.color }),
          s("circle", { cx: 3, cy: 3, r: 1.3, fill: "#ffffff" })),
      );
    }
  }
  return defs;
}

function fillFor(id, series) {
  const style = SERIES[series] || SERIES.single;
  return style.pattern === "solid" ? style.color : `url(#${id}-${series})`;
}

function svgRoot(width, height, title, description) {
  chartCount += 1;
  const id = `chart${chartCount}`;
  const svg = s("svg", {
    class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": `${id}-title ${id}-desc`,
    xmlns: "http://www.w3.org/2000/svg", "font-size": FONT,
  });
  svg.append(s("title", { id: `${id}-title` }, title), s("desc", { id: `${id}-desc` }, description || title));
  svg.append(patternDefs(id));
  return { svg, id };
}

function legend(id, seriesNames, x, y) {
  const g = s("g", { class: "legend" });
  let cursor = x;
  for (const name of seriesNames) {
    const style = SERIES[name];
    if (!style || !style.label) continue;
    g.append(
      s("rect", { x: cursor, y: y - 10, width: 14, height: 12, fill: fillFor(id, name), stroke: "#222", "stroke-width": 0.6 }),
      s("text", { x: cursor + 19, y, class: "legend-text" }, style.label),
    );
    cursor += 28 + style.label.length * 7;
  }
  return g;
}

/**
 * Vertical grouped bars. groups: [{label, note?, bars: [{series, value, text?}]}]. A bar without a
 * value (null) is drawn as a "n/a" label, never as zero.
 */
export function groupedBarChart({ title, description, groups, series, yLabel, xLabel, format = num, width = 640, height = 320 }) {
  const values = groups.flatMap((g) => g.bars.map((b) => b.value)).filter((v) => v !== null && v !== undefined);
  const maxValue = Math.max(...values, 0) || 1;
  const yTicks = ticks(0, maxValue * 1.12);
  // Room under the axis: series names, the group label's lines, its note, the axis label.
  const labelLines = Math.max(...groups.map((g) => String(g.label).split("\n").length), 1);
  const hasNote = groups.some((g) => g.note);
  const bottom = 32 + 14 * (labelLines - 1) + (hasNote ? 16 : 0) + 10 + (xLabel ? 22 : 0);
  const margin = { top: 40, right: 16, bottom: Math.max(50, bottom), left: leftMargin(yTicks, format) };
  const { svg, id } = svgRoot(width, height, title, description);
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const yMax = yTicks[yTicks.length - 1];
  const y = (v) => margin.top + plotH - (v / yMax) * plotH;

  const axis = s("g", { class: "axis" });
  for (const t of yTicks) {
    axis.append(
      s("line", { x1: margin.left, x2: margin.left + plotW, y1: y(t), y2: y(t), class: "grid" }),
      s("text", { x: margin.left - 6, y: y(t) + 4, "text-anchor": "end" }, format(t)),
    );
  }
  axis.append(s("line", { x1: margin.left, x2: margin.left + plotW, y1: y(0), y2: y(0), class: "baseline" }));
  axis.append(s("text", {
    class: "axis-label", "text-anchor": "middle",
    transform: `translate(${16} ${margin.top + plotH / 2}) rotate(-90)`,
  }, yLabel || ""));
  if (xLabel) axis.append(s("text", { class: "axis-label", x: margin.left + plotW / 2, y: height - 6, "text-anchor": "middle" }, xLabel));
  svg.append(axis);

  const groupW = plotW / Math.max(1, groups.length);
  const perGroup = Math.max(...groups.map((g) => g.bars.length), 1);
  const barW = Math.min(64, (groupW * 0.72) / perGroup);
  const bars = s("g", { class: "bars" });
  groups.forEach((group, gi) => {
    const center = margin.left + groupW * (gi + 0.5);
    const start = center - (barW * group.bars.length) / 2;
    group.bars.forEach((bar, bi) => {
      const x = start + bi * barW;
      const style = SERIES[bar.series] || SERIES.single;
      const label = bar.text || (bar.value === null || bar.value === undefined ? "n/a" : format(bar.value));
      const g = s("g", { class: "bar-group", "data-series": bar.series || "single" });
      if (bar.value !== null && bar.value !== undefined) {
        const top = y(bar.value);
        g.append(s("rect", {
          x: x + 2, y: top, width: barW - 4, height: Math.max(0.5, y(0) - top),
          fill: fillFor(id, bar.series), stroke: "#1d2430", "stroke-width": 0.6,
        }, s("title", null, `${group.label}, ${style.label || "value"}: ${label}`)));
        g.append(s("text", { class: "value-label", x: x + barW / 2, y: top - 5, "text-anchor": "middle" }, label));
      } else {
        g.append(s("text", { class: "value-label", x: x + barW / 2, y: y(0) - 5, "text-anchor": "middle" }, label));
      }
      if (style.short) {
        g.append(s("text", { class: "bar-series", x: x + barW / 2, y: y(0) + 14, "text-anchor": "middle" }, style.short));
      }
      bars.append(g);
    });
    const labelY = y(0) + (perGroup > 1 || groups.some((gr) => gr.bars.some((b) => SERIES[b.series]?.short)) ? 32 : 16);
    // A label may hold line breaks ("2.\nquantize.int8_dynamic"): one tspan per line.
    const lines = String(group.label).split("\n");
    bars.append(s("text", { class: "group-label", x: center, y: labelY, "text-anchor": "middle" },
      lines.map((line, i) => s("tspan", { x: center, dy: i ? 14 : 0 }, line))));
    if (group.note) bars.append(s("text", { class: "group-note", x: center, y: labelY + 16 + 14 * (lines.length - 1), "text-anchor": "middle" }, group.note));
  });
  svg.append(bars);
  const used = [...new Set(groups.flatMap((g) => g.bars.map((b) => b.series)))];
  svg.append(legend(id, used, margin.left, 16));
  return svg;
}

/** The x axis of a horizontal chart: a grid line from top to bottom and a label under the plot at each tick. */
function xGrid(xTicks, x, top, bottom, format) {
  const axis = s("g", { class: "axis" });
  for (const t of xTicks) {
    axis.append(
      s("line", { x1: x(t), x2: x(t), y1: top, y2: bottom, class: "grid" }),
      s("text", { x: x(t), y: bottom + 16, "text-anchor": "middle" }, format(t)),
    );
  }
  return axis;
}

/**
 * Horizontal intervals: a point estimate with its confidence interval per row, against a reference
 * line (1.00x: no change). rows: [{label, value, low, high, text}].
 */
export function intervalChart({ title, description, rows, reference = 1, xLabel, width = 640, format = (v) => `${v.toFixed(2)}x` }) {
  const rowH = 40;
  const margin = { top: 30, right: 170, bottom: 66, left: 84 };
  const height = margin.top + margin.bottom + rowH * rows.length;
  const { svg } = svgRoot(width, height, title, description);
  const plotW = width - margin.left - margin.right;
  const lows = rows.map((r) => r.low ?? r.value);
  const highs = rows.map((r) => r.high ?? r.value);
  let lo = Math.min(reference, ...lows);
  let hi = Math.max(reference, ...highs);
  const pad = (hi - lo) * 0.12 || 0.1;
  lo = Math.max(0, lo - pad);
  hi += pad;
  const xTicks = ticks(lo, hi, 5).filter((t) => t >= lo && t <= hi);
  const x = (v) => margin.left + ((v - lo) / (hi - lo)) * plotW;
  const bottom = margin.top + rowH * rows.length;

  const axis = xGrid(xTicks, x, margin.top - 6, bottom, format);
  axis.append(
    s("line", { x1: x(reference), x2: x(reference), y1: margin.top - 14, y2: bottom, class: "reference" }),
    s("text", { x: x(reference), y: margin.top - 16, "text-anchor": "middle", class: "reference-label" }, `${format(reference)} = no change`),
    s("text", { class: "axis-label", x: margin.left + plotW / 2, y: height - 6, "text-anchor": "middle" }, xLabel || ""),
  );
  svg.append(axis);
  rows.forEach((row, i) => {
    const cy = margin.top + rowH * i + rowH / 2;
    const g = s("g", { class: "interval" });
    g.append(s("text", { x: margin.left - 10, y: cy + 4, "text-anchor": "end", class: "group-label" }, row.label));
    if (row.low !== null && row.low !== undefined && row.high !== null && row.high !== undefined) {
      g.append(
        s("line", { x1: x(row.low), x2: x(row.high), y1: cy, y2: cy, class: "ci-line" }),
        s("line", { x1: x(row.low), x2: x(row.low), y1: cy - 7, y2: cy + 7, class: "ci-line" }),
        s("line", { x1: x(row.high), x2: x(row.high), y1: cy - 7, y2: cy + 7, class: "ci-line" }),
      );
    }
    g.append(s("path", {
      d: `M ${x(row.value)} ${cy - 7} l 7 7 l -7 7 l -7 -7 z`, class: "ci-point",
    }, s("title", null, `${row.label}: ${row.text}`)));
    g.append(s("text", { x: margin.left + plotW + 10, y: cy + 4, class: "value-label" }, row.text));
    svg.append(g);
  });
  svg.append(s("text", { x: margin.left, y: bottom + 32, class: "hint" }, "← slower than the original"));
  svg.append(s("text", { x: margin.left + plotW, y: bottom + 32, class: "hint", "text-anchor": "end" }, "faster →"));
  return svg;
}

const MARKERS = [
  (x, y) => s("circle", { cx: x, cy: y, r: 4.5 }),
  (x, y) => s("rect", { x: x - 4, y: y - 4, width: 8, height: 8 }),
  (x, y) => s("path", { d: `M ${x} ${y - 5.5} L ${x + 5} ${y + 4} L ${x - 5} ${y + 4} Z` }),
  (x, y) => s("path", { d: `M ${x} ${y - 5.5} L ${x + 5.5} ${y} L ${x} ${y + 5.5} L ${x - 5.5} ${y} Z` }),
  (x, y) => s("path", { d: `M ${x - 4.5} ${y - 4.5} L ${x + 4.5} ${y + 4.5} M ${x - 4.5} ${y + 4.5} L ${x + 4.5} ${y - 4.5}`, "stroke-width": 2 }),
];
const LINE_COLORS = ["#1f6fbf", "#b3541e", "#2f7d5b", "#7a4fa8", "#8a7a12"];
const DASHES = ["", "6 3", "2 3", "8 3 2 3", "1 2"];

/**
 * Lines over an ordinal x axis (one point per job, oldest first). series: [{name, points: [{x, y}]}]
 * where x indexes xLabels. Each series has its own marker shape and dash, and its name at its end.
 */
export function lineChart({ title, description, xLabels, series, yLabel, xLabel, format = num, width = 640, height = 280 }) {
  const values = series.flatMap((se) => se.points.map((p) => p.y)).filter((v) => Number.isFinite(v));
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo > 0 && lo / (hi || 1) > 0.3) lo = lo * 0.9; else lo = Math.min(0, lo);
  if (hi === lo) hi = lo + (Math.abs(lo) || 1);
  const yTicks = ticks(lo, hi + (hi - lo) * 0.1, 4);
  const margin = { top: 20, right: 124, bottom: 62, left: leftMargin(yTicks, format) };
  const { svg } = svgRoot(width, height, title, description);
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const y0 = yTicks[0];
  const y1 = yTicks[yTicks.length - 1];
  const y = (v) => margin.top + plotH - ((v - y0) / (y1 - y0)) * plotH;
  // Points sit inside the plot (inset), so their labels clear the y axis and the legend.
  const inset = 36;
  const step = xLabels.length > 1 ? (plotW - 2 * inset) / (xLabels.length - 1) : 0;
  const x = (i) => (xLabels.length > 1 ? margin.left + inset + i * step : margin.left + plotW / 2);

  const axis = s("g", { class: "axis" });
  for (const t of yTicks) {
    axis.append(
      s("line", { x1: margin.left, x2: margin.left + plotW, y1: y(t), y2: y(t), class: "grid" }),
      s("text", { x: margin.left - 6, y: y(t) + 4, "text-anchor": "end" }, format(t)),
    );
  }
  const every = Math.ceil(xLabels.length / 8);
  xLabels.forEach((label, i) => {
    if (i % every === 0 || i === xLabels.length - 1) {
      axis.append(s("text", { x: x(i), y: margin.top + plotH + 16, "text-anchor": "middle" }, label));
    }
  });
  axis.append(
    s("text", { class: "axis-label", "text-anchor": "middle", transform: `translate(16 ${margin.top + plotH / 2}) rotate(-90)` }, yLabel || ""),
    s("text", { class: "axis-label", x: margin.left + plotW / 2, y: height - 8, "text-anchor": "middle" }, xLabel || ""),
  );
  svg.append(axis);
  const labelValues = series.reduce((n, se) => n + se.points.length, 0) <= 16;
  // Value labels right of their points, nudged apart where points of several series are close.
  const labelY = new Map();
  if (labelValues) {
    const byX = new Map();
    series.forEach((se, si) => se.points.filter((p) => Number.isFinite(p.y)).forEach((p) => {
      if (!byX.has(p.x)) byX.set(p.x, []);
      byX.get(p.x).push({ key: `${si}:${p.x}`, py: y(p.y) });
    }));
    for (const list of byX.values()) {
      list.sort((a, b) => b.py - a.py); // bottom first
      let previous = Infinity;
      for (const item of list) {
        const wanted = Math.min(item.py + 4, previous - 13);
        labelY.set(item.key, wanted);
        previous = wanted;
      }
    }
  }
  series.forEach((se, si) => {
    const color = LINE_COLORS[si % LINE_COLORS.length];
    const g = s("g", { class: "series", "data-series": se.name, stroke: color, fill: color });
    const pts = se.points.filter((p) => Number.isFinite(p.y));
    if (pts.length > 1) {
      g.append(s("polyline", {
        points: pts.map((p) => `${x(p.x)},${y(p.y)}`).join(" "), fill: "none", "stroke-width": 2,
        "stroke-dasharray": DASHES[si % DASHES.length] || null,
      }));
    }
    for (const p of pts) {
      const marker = MARKERS[si % MARKERS.length](x(p.x), y(p.y));
      marker.append(s("title", null, `${se.name}, ${xLabels[p.x]}: ${format(p.y)}`));
      g.append(marker);
      if (labelValues) {
        g.append(s("text", { x: x(p.x) + 8, y: labelY.get(`${si}:${p.x}`), class: "value-label point-label", stroke: "none", fill: "#1d2430" }, format(p.y)));
      }
    }
    // The legend (right margin): the series' marker, dash and name, so lines read without colour.
    const ly = margin.top + 8 + si * 20;
    const lx = margin.left + plotW + 14;
    g.append(s("line", { x1: lx, x2: lx + 26, y1: ly, y2: ly, "stroke-width": 2, "stroke-dasharray": DASHES[si % DASHES.length] || null }));
    g.append(MARKERS[si % MARKERS.length](lx + 13, ly));
    g.append(s("text", { x: lx + 32, y: ly + 4, class: "series-label", stroke: "none", fill: "#1d2430" }, se.name));
    svg.append(g);
  });
  return svg;
}

/**
 * Points on two numeric axes (both lower-is-better here: latency and size), each named beside it. points:
 * [{label, x, y, marked, front}]: a marked point is drawn filled (a circle), an unmarked one hollow with a cross
 * inside, so the two read apart without colour; the points on the front are joined by a dashed step line.
 * markedLabel / unmarkedLabel name the two kinds in the legend.
 */
export function scatterChart({ title, description, points, xLabel, yLabel, xFormat = num, yFormat = num,
  markedLabel, unmarkedLabel, frontLabel, width = 640, height = 360 }) {
  const xs = points.map((p) => p.x);
  const ys = points.map((p) => p.y);
  const xTicks = ticks(0, Math.max(...xs, 0) * 1.12 || 1, 5);
  const yTicks = ticks(0, Math.max(...ys, 0) * 1.12 || 1, 5);
  const margin = { top: 44, right: 24, bottom: 56, left: leftMargin(yTicks, yFormat) };
  const { svg } = svgRoot(width, height, title, description);
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const xMax = xTicks[xTicks.length - 1];
  const yMax = yTicks[yTicks.length - 1];
  const x = (v) => margin.left + (v / xMax) * plotW;
  const y = (v) => margin.top + plotH - (v / yMax) * plotH;

  const axis = s("g", { class: "axis" });
  for (const t of yTicks) {
    axis.append(
      s("line", { x1: margin.left, x2: margin.left + plotW, y1: y(t), y2: y(t), class: "grid" }),
      s("text", { x: margin.left - 6, y: y(t) + 4, "text-anchor": "end" }, yFormat(t)),
    );
  }
  for (const t of xTicks) {
    axis.append(
      s("line", { x1: x(t), x2: x(t), y1: margin.top, y2: margin.top + plotH, class: "grid" }),
      s("text", { x: x(t), y: margin.top + plotH + 16, "text-anchor": "middle" }, xFormat(t)),
    );
  }
  axis.append(
    s("line", { x1: margin.left, x2: margin.left + plotW, y1: y(0), y2: y(0), class: "baseline" }),
    s("line", { x1: margin.left, x2: margin.left, y1: margin.top, y2: y(0), class: "baseline" }),
    s("text", { class: "axis-label", "text-anchor": "middle", transform: `translate(16 ${margin.top + plotH / 2}) rotate(-90)` }, yLabel || ""),
    s("text", { class: "axis-label", x: margin.left + plotW / 2, y: height - 8, "text-anchor": "middle" }, xLabel || ""),
  );
  svg.append(axis);

  // The front as a staircase through its points, left to right.
  const front = points.filter((p) => p.front).sort((a, b) => a.x - b.x || a.y - b.y);
  if (front.length > 1) {
    const path = front.map((p, i) => (i ? `H ${x(p.x)} V ${y(p.y)}` : `M ${x(p.x)} ${y(p.y)}`)).join(" ");
    svg.append(s("path", { d: path, class: "front-line", fill: "none", stroke: "#59616e", "stroke-width": 1.5, "stroke-dasharray": "6 4" }));
  }
  // Labels above their points (clear of the front's horizontal runs), nudged apart where points are close.
  const placed = [];
  const layer = s("g", { class: "points" });
  for (const p of [...points].sort((a, b) => y(b.y) - y(a.y))) {
    const px = x(p.x);
    const py = y(p.y);
    let ly = py - 8;
    while (placed.some((q) => Math.abs(q.y - ly) < 13 && Math.abs(q.x - px) < 150)) ly -= 13;
    placed.push({ x: px, y: ly });
    const g = s("g", { class: "point", "data-name": p.label, "data-marked": String(Boolean(p.marked)), "data-front": String(Boolean(p.front)) });
    g.append(marker(px, py, p.marked), s("title", null, `${p.label}: ${xFormat(p.x)}, ${yFormat(p.y)}`));
    const right = px < margin.left + plotW * 0.7;
    g.append(s("text", { x: right ? px + 9 : px - 9, y: ly, class: "point-label", "text-anchor": right ? "start" : "end" },
      `${p.label}${p.front ? " ★" : ""}`));
    layer.append(g);
  }
  svg.append(layer);
  // The legend: the two markers and the front's line, named.
  const legendItems = s("g", { class: "legend" });
  let cursor = margin.left;
  for (const [draw, label] of [[(cx) => marker(cx, 12, true), markedLabel], [(cx) => marker(cx, 12, false), unmarkedLabel],
    [(cx) => s("line", { x1: cx - 8, x2: cx + 8, y1: 12, y2: 12, stroke: "#59616e", "stroke-width": 1.5, "stroke-dasharray": "6 4" }), frontLabel]]) {
    if (!label) continue;
    legendItems.append(draw(cursor + 6), s("text", { x: cursor + 18, y: 16, class: "legend-text" }, label));
    cursor += 30 + label.length * 6.5;
  }
  svg.append(legendItems);
  return svg;
}

function marker(cx, cy, filled) {
  if (filled) return s("circle", { cx, cy, r: 5.5, fill: "#2f7d5b", stroke: "#1d2430", "stroke-width": 1 });
  return s("g", null, s("circle", { cx, cy, r: 5.5, fill: "#ffffff", stroke: "#b3541e", "stroke-width": 1.6 }),
    s("path", { d: `M ${cx - 3} ${cy - 3} L ${cx + 3} ${cy + 3} M ${cx - 3} ${cy + 3} L ${cx + 3} ${cy - 3}`, stroke: "#b3541e", "stroke-width": 1.4 }));
}

/**
 * Horizontal bars in rank order, one row each: the bar's value as text at its end and a second figure in a column
 * beside it (sideLabel names that column). rows: [{label, value, text, side, title?}]. log: a log10 axis, for values
 * spanning decades (an error of 0.3 beside one of 1e-6); there a value of 0 draws no bar, only its text.
 */
export function rankedBarChart({ title, description, rows, xLabel, sideLabel, log = false, format = num, width = 760 }) {
  const rowH = 22;
  const longest = Math.max(...rows.map((r) => String(r.label).length), 4);
  const margin = { top: 30, right: 150, bottom: 48, left: Math.min(320, 20 + Math.min(longest, 40) * 7.6) };
  const height = margin.top + margin.bottom + rowH * rows.length;
  const { svg, id } = svgRoot(width, height, title, description);
  const plotW = width - margin.left - margin.right;
  const span = plotW - 56; // the longest bar leaves room for its value's text before the side column
  const bottom = margin.top + rowH * rows.length;
  const positive = rows.map((r) => r.value).filter((v) => v > 0);
  let x;
  let xTicks;
  if (log && positive.length) {
    const lo = Math.floor(Math.log10(Math.min(...positive)));
    const hi = Math.max(lo + 1, Math.ceil(Math.log10(Math.max(...positive))));
    x = (v) => margin.left + ((Math.log10(v) - lo) / (hi - lo)) * span;
    xTicks = Array.from({ length: hi - lo + 1 }, (_, i) => 10 ** (lo + i));
  } else {
    xTicks = ticks(0, Math.max(...positive, 0) || 1);
    const top = xTicks[xTicks.length - 1];
    x = (v) => margin.left + (v / top) * span;
  }
  const start = x(xTicks[0]);

  const axis = xGrid(xTicks, x, margin.top - 4, bottom, format);
  axis.append(
    s("line", { x1: start, x2: start, y1: margin.top - 4, y2: bottom, class: "baseline" }),
    s("text", { class: "axis-label", x: margin.left + plotW / 2, y: height - 8, "text-anchor": "middle" }, xLabel || ""),
    s("text", { class: "axis-label", x: margin.left + plotW + 12, y: margin.top - 12 }, sideLabel || ""),
  );
  svg.append(axis);
  rows.forEach((row, i) => {
    const cy = margin.top + rowH * i + rowH / 2;
    const g = s("g", { class: "ranked-row", "data-label": row.label });
    const label = String(row.label);
    const shown = label.length > 40 ? `…${label.slice(-39)}` : label;
    g.append(s("text", { x: margin.left - 8, y: cy + 4, "text-anchor": "end", class: "group-label" }, shown,
      s("title", null, row.title || label)));
    const drawn = row.value !== null && row.value !== undefined && (!log || row.value > 0);
    const end = drawn ? Math.max(start + 0.5, x(row.value)) : start;
    if (drawn) {
      g.append(s("rect", { x: start, y: cy - 7, width: end - start, height: 14, fill: fillFor(id, "single"), stroke: "#1d2430", "stroke-width": 0.6 },
        s("title", null, `${label}: ${row.text ?? format(row.value)}`)));
    }
    g.append(
      s("text", { x: end + 5, y: cy + 4, class: "value-label" }, row.text ?? (row.value === null || row.value === undefined ? "n/a" : format(row.value))),
      s("text", { x: margin.left + plotW + 12, y: cy + 4, class: "side-label" }, row.side ?? ""),
    );
    svg.append(g);
  });
  return svg;
}
