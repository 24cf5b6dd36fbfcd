// The caller's models and datasets.

import { allPages, api, download } from "../api.js";
import { errorBox, h } from "../dom.js";
import { bytes, num, shortId, when } from "../format.js";

function shapes(items) {
  return (items || []).map((i) => `${i.name}[${(i.shape || []).join(",")}]`).join(" ");
}

function downloadButton(path, filename) {
  const status = h("span", { class: "small" });
  const button = h("button", { type: "button", class: "link" }, "Download");
  button.addEventListener("click", async () => {
    try {
      const got = await download(path, filename);
      status.textContent = got.actual && got.actual === got.expected ? " ✓" : "";
    } catch (err) {
      status.replaceChildren(errorBox(err));
    }
  });
  return [button, status];
}

function deleteButton(path, label, onDone) {
  const button = h("button", { type: "button", class: "link danger" }, "Delete");
  button.addEventListener("click", async () => {
    if (!window.confirm(`Delete ${label}? Jobs that used it keep their results.`)) return;
    try {
      await api(path, { method: "DELETE" });
      onDone();
    } catch (err) {
      button.after(errorBox(err));
    }
  });
  return button;
}

export function modelsPage(main) {
  const body = h("div", null, h("p", { class: "muted" }, "loading…"));
  main.append(h("div", { class: "page-head" }, h("h1", null, "Models & datasets"),
    h("div", { class: "actions" }, h("a", { class: "button primary", href: "#/upload" }, "Upload"))), body);
  async function load() {
    const [models, datasets] = await Promise.all([allPages("/v1/models"), allPages("/v1/datasets")]);
    body.replaceChildren(
      h("section", { class: "card" }, h("h2", null, "Models"), models.length ? h("table", { class: "compact", id: "models-table" },
        h("thead", null, h("tr", null, ["name", "format", "size", "parameters", "inputs", "uploaded", ""].map((c) => h("th", null, c)))),
        h("tbody", null, models.map((m) => h("tr", { "data-model-id": m.id },
          h("td", null, h("a", { href: `#/models/${m.id}` }, m.name), h("div", { class: "small muted" }, shortId(m.id))),
          h("td", null, m.format), h("td", null, bytes(m.size_bytes)), h("td", null, num(m.inspection.parameters)),
          h("td", null, h("code", null, shapes(m.inspection.inputs))), h("td", null, when(m.created_at)),
          h("td", { class: "row-actions" }, h("a", { href: `#/jobs/new?model=${m.id}` }, "Compress"), " ",
            h("a", { href: `#/models/${m.id}` }, "Measurements"), " ",
            downloadButton(`/v1/models/${m.id}/download`, m.name), " ",
            deleteButton(`/v1/models/${m.id}`, m.name, load))))))
        : h("p", { class: "muted" }, "No models yet.")),
      h("section", { class: "card" }, h("h2", null, "Datasets"), datasets.length ? h("table", { class: "compact", id: "datasets-table" },
        h("thead", null, h("tr", null, ["name", "id", "samples", "arrays", "labels", "size", "uploaded", ""].map((c) => h("th", null, c)))),
        h("tbody", null, datasets.map((d) => h("tr", null,
          h("td", null, d.name), h("td", null, h("code", null, shortId(d.id))), h("td", null, num(d.inspection.samples)),
          h("td", null, h("code", null, shapes(d.inspection.arrays))), h("td", null, d.inspection.has_labels ? "yes" : "no"),
          h("td", null, bytes(d.size_bytes)), h("td", null, when(d.created_at)),
          h("td", { class: "row-actions" }, downloadButton(`/v1/datasets/${d.id}/download`, d.name), " ",
            deleteButton(`/v1/datasets/${d.id}`, d.name, load))))))
        : h("p", { class: "muted" }, "No datasets yet.")),
    );
  }
  load().catch((err) => body.replaceChildren(errorBox(err)));
}
