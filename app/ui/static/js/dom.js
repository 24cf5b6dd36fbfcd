// Building DOM nodes without innerHTML: every text from the server goes in as text, never as markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "style" && typeof value === "object") Object.assign(node.style, value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
}

/** h("div", {class: "x", onclick: fn}, "text", child, [more]) */
export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

/** The same for SVG elements. */
export function s(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

/** A progress bar readable without colour: the percentage is written on it. */
export function progressBar(fraction, { label = "progress", status = "" } = {}) {
  const pct = Math.max(0, Math.min(100, Math.round((fraction || 0) * 100)));
  const fill = h("div", { class: "bar-fill" });
  fill.style.width = `${pct}%`;
  return h(
    "div",
    {
      class: `bar ${status ? `bar-${status}` : ""}`,
      role: "progressbar",
      "aria-label": label,
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": pct,
    },
    fill,
    h("span", { class: "bar-text" }, `${pct}%`),
  );
}

export function updateProgressBar(bar, fraction) {
  const pct = Math.max(0, Math.min(100, Math.round((fraction || 0) * 100)));
  bar.setAttribute("aria-valuenow", pct);
  bar.querySelector(".bar-fill").style.width = `${pct}%`;
  bar.querySelector(".bar-text").textContent = `${pct}%`;
}

/** A status label: a word and a symbol, so it reads without colour. */
export function statusBadge(status) {
  const symbol = { queued: "◷", running: "▶", succeeded: "✓", failed: "✗", cancelled: "■" }[status] || "•";
  return h("span", { class: `badge badge-${status}`, "data-status": status }, `${symbol} ${status}`);
}

export function errorBox(error) {
  const code = error && error.code ? h("code", null, error.code) : null;
  return h("div", { class: "error", role: "alert" }, code, code ? " " : null, String((error && error.message) || error));
}
