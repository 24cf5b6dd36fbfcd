// Numbers as people read them.

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = Number(n);
  let unit = 0;
  while (Math.abs(value) >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  // Three significant digits, no trailing zeros: 3.66 MB, 92.7 KB, 5 MB.
  return `${unit === 0 ? Math.round(value) : Number(value.toPrecision(3))} ${units[unit]}`;
}

/** A value with a few significant digits: 0.0234 -> "0.0234", 1234.5 -> "1,235". */
export function num(n, digits = 3) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return "—";
  const value = Number(n);
  if (value === 0) return "0";
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en-US");
  return Number(value.toPrecision(digits)).toString();
}

export function ms(n) {
  return n === null || n === undefined ? "—" : `${num(n)} ms`;
}

export function pct(fraction, digits = 1) {
  return fraction === null || fraction === undefined ? "—" : `${(fraction * 100).toFixed(digits)}%`;
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function duration(startIso, endIso) {
  if (!startIso) return "—";
  const seconds = ((endIso ? new Date(endIso) : new Date()) - new Date(startIso)) / 1000;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

export function shortId(id) {
  return id ? String(id).slice(0, 8) : "—";
}

/** A metric's value in its unit. */
export function withUnit(value, unit) {
  if (unit === "bytes") return bytes(value);
  if (unit === "ms") return ms(value);
  if (unit === "1" || !unit) return num(value);
  if (unit === "count") return num(value);
  return `${num(value)} ${unit}`;
}
