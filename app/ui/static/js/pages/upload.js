// Uploads with a progress bar: XMLHttpRequest reports how much of the body has gone out.

import { upload } from "../api.js";
import { errorBox, h, progressBar, updateProgressBar } from "../dom.js";
import { bytes } from "../format.js";

export function ioTable(items, caption) {
  return h("table", { class: "compact" },
    h("caption", null, caption),
    h("thead", null, h("tr", null, h("th", null, "name"), h("th", null, "dtype"), h("th", null, "shape"))),
    h("tbody", null, items.map((i) => h("tr", null, h("td", null, h("code", null, i.name)), h("td", null, i.dtype),
      h("td", null, `[${(i.shape || []).join(", ")}]`)))));
}

function uploadCard({ kind, title, accept, hint, endpoint, done }) {
  const file = h("input", { type: "file", id: `${kind}-file`, name: `${kind}-file`, accept, required: true });
  const name = h("input", { type: "text", id: `${kind}-name`, name: `${kind}-name`, placeholder: "(the file name)" });
  const bar = progressBar(0, { label: `${kind} upload progress` });
  const sent = h("span", { class: "muted small" });
  const progress = h("div", { class: "upload-progress", hidden: true }, bar, sent);
  const result = h("div", { class: "upload-result", "aria-live": "polite", id: `${kind}-result` });
  const button = h("button", { type: "submit", class: "primary", id: `${kind}-upload` }, "Upload");
  const form = h("form", { class: "card", id: `${kind}-form` },
    h("h2", null, title),
    h("p", { class: "muted" }, hint),
    h("div", { class: "field" }, h("label", { for: `${kind}-file` }, "File"), file),
    h("div", { class: "field" }, h("label", { for: `${kind}-name` }, "Name (optional)"), name),
    h("div", { class: "actions" }, button),
    progress, result);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const chosen = file.files[0];
    if (!chosen) return;
    button.disabled = true;
    progress.hidden = false;
    result.replaceChildren();
    updateProgressBar(bar, 0);
    try {
      const body = await upload(endpoint, chosen, {
        name: name.value.trim() || undefined,
        onProgress: (loaded, total) => {
          updateProgressBar(bar, total ? loaded / total : 0);
          sent.textContent = ` ${bytes(loaded)} of ${bytes(total)} sent` + (loaded >= total ? "; checking it on the server…" : "");
        },
      });
      sent.textContent = ` ${bytes(chosen.size)} uploaded and checked`;
      result.replaceChildren(done(body));
    } catch (err) {
      result.replaceChildren(errorBox(err));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export function uploadPage(main) {
  main.append(
    h("h1", null, "Upload"),
    h("div", { class: "grid-2" },
      uploadCard({
        kind: "model", title: "A model", accept: ".onnx,.zip,.keras", endpoint: "/v1/models",
        hint: "One .onnx file; a .zip holding the .onnx and its external-data files, a Hugging Face model folder (config.json + safetensors) or a TensorFlow SavedModel; or a .keras file. ONNX is checked by the ONNX checker and shape inference; other formats are converted to ONNX by a conversion job. The same file is stored once.",
        done: (model) => h("div", { class: "ok", "data-model-id": model.id },
          h("p", null, "✓ Stored ", h("strong", null, model.name), ` (${bytes(model.size_bytes)}, ${model.inspection.parameters ?? "?"} parameters, sha256 `,
            h("code", null, model.sha256.slice(0, 16)), "…)"),
          ioTable(model.inspection.inputs || [], "inputs"),
          h("div", { class: "actions" },
            h("a", { class: "button primary", id: "compress-uploaded", href: `#/jobs/new?model=${model.id}` }, "Compress this model →"),
            h("a", { class: "button", href: `#/models/${model.id}` }, "Model page"))),
      }),
      uploadCard({
        kind: "dataset", title: "A dataset", accept: ".npz,.safetensors", endpoint: "/v1/datasets",
        hint: "A .npz or .safetensors of arrays named after the model's inputs (first axis = samples), plus optional integer labels: for calibration, fine-tuning, distillation or evaluation.",
        done: (dataset) => h("div", { class: "ok", "data-dataset-id": dataset.id },
          h("p", null, "✓ Stored ", h("strong", null, dataset.name), `: ${dataset.inspection.samples} samples`,
            dataset.inspection.has_labels ? ", with labels" : ", no labels", ` (${bytes(dataset.size_bytes)})`),
          ioTable(dataset.inspection.arrays || [], "arrays"),
          h("p", { class: "small muted" }, "id ", h("code", null, dataset.id))),
      }),
    ),
  );
}
