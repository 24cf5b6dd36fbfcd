// Start a job: the forms are generated from the JSON Schemas the API publishes (GET /v1/methods,
// GET /v1/recipes, and GoalSpec, GoalDatasets and EvaluateSpec in /openapi.json), so a new method or
// option shows up here without touching the dashboard. A goal is offered first: what the user needs,
// the search finds the steps.

import { allPages, api } from "../api.js";
import { clear, errorBox, h } from "../dom.js";
import { bytes } from "../format.js";
import { schemaForm } from "../schema-form.js";
import { targetName } from "./targets.js";

// Used only when GET /v1/targets cannot be read: the default target, which every deployment has.
const DEFAULT_TARGETS = [{ runtime: "onnxruntime", device: "cpu", precision: null, queue: "cpu", default: true, workers: 0, devices: [], versions: {} }];

// Used only when /openapi.json cannot be read.
const FALLBACK_EVALUATE = {
  type: "object",
  properties: {
    batch_sizes: { type: "array", items: { type: "integer" }, default: [1], title: "Batch Sizes" },
    warmup: { type: "integer", minimum: 0, default: 10, title: "Warmup" },
    iterations: { type: "integer", minimum: 1, default: 100, title: "Iterations" },
    eval_dataset_id: { anyOf: [{ type: "string" }, { type: "null" }], title: "Eval Dataset Id" },
  },
};

const EVALUATE_HELP = {
  batch_sizes: "Batch sizes to time, comma-separated (e.g. 1, 8, 32); each gets its own latency percentiles and speedup interval.",
  warmup: "Calls per model before timing starts.",
  iterations: "Timed calls per model and batch size, split into interleaved rounds (ABBA).",
  providers: "Execution providers to measure on; the CPU is always measured. One that cannot start is reported as unavailable.",
};

/** {evaluate, goal, goalDatasets}: the schemas of /openapi.json the forms are built from (goal null when unreadable). */
async function jobSchemas() {
  try {
    const resp = await fetch("/openapi.json");
    const { schemas } = (await resp.json()).components;
    const evaluate = structuredClone(schemas.EvaluateSpec);
    for (const [name, help] of Object.entries(EVALUATE_HELP)) {
      if (evaluate.properties[name] && !evaluate.properties[name].description) evaluate.properties[name].description = help;
    }
    // The datasets by role get a form of their own (selects of the user's uploads), not a JSON box.
    const goal = structuredClone(schemas.GoalSpec);
    delete goal.properties.datasets;
    return { evaluate, goal, goalDatasets: schemas.GoalDatasets };
  } catch {
    return { evaluate: FALLBACK_EVALUATE, goal: null, goalDatasets: null };
  }
}

// The goal: its budget and search limits, then the datasets by role. Without the schemas, the default goal.
function goalEditor(schemas, uploads) {
  if (!schemas.goal) {
    return { element: h("p", { class: "muted" }, "The goal's form could not be loaded (/openapi.json): the default goal runs (fastest at batch 1 within cosine 0.99)."),
      read: () => ({}) };
  }
  const goalForm = schemaForm(schemas.goal, { ...uploads, prefix: "goal" });
  const datasetsForm = schemaForm(schemas.goalDatasets, { ...uploads, prefix: "goal.datasets" });
  const element = h("div", { id: "goal" },
    h("p", { class: "muted small" }, schemas.goal.description),
    goalForm.element,
    h("fieldset", { class: "step" }, h("legend", null, "Datasets by role"), datasetsForm.element));
  return {
    element,
    read: () => {
      const goal = goalForm.read();
      const datasets = datasetsForm.read();
      if (Object.keys(datasets).length) goal.datasets = datasets;
      return goal;
    },
  };
}

function stepEditor(methods, uploads, index, onRemove, preset) {
  const select = h("select", { name: "method", class: "method-select", "aria-label": `method of step ${index}` },
    methods.map((m) => h("option", { value: m.id, selected: m.id === preset }, m.id)));
  const description = h("p", { class: "muted small" });
  const paramsBox = h("div");
  let form = null;
  function render() {
    const method = methods.find((m) => m.id === select.value);
    description.textContent = method.description || "";
    form = schemaForm(method.params_schema, { ...uploads, prefix: `step${index}` });
    clear(paramsBox).append(form.element);
  }
  select.addEventListener("change", render);
  const title = h("h3", null, `Step ${index}`);
  const element = h("fieldset", { class: "step", "data-step": index },
    h("legend", null, title),
    h("div", { class: "step-head" }, h("label", null, "Method ", select),
      onRemove ? h("button", { type: "button", class: "link", onclick: onRemove }, "Remove this step") : null),
    description, h("details", { open: true }, h("summary", null, "Parameters"), paramsBox));
  render();
  return { element, read: () => ({ method: select.value, params: form.read() }) };
}

export function newJobPage(main, { query, navigate }) {
  const problems = h("div", { "aria-live": "polite" });
  main.append(h("h1", null, "New job"), problems);
  const body = h("div", null, h("p", { class: "muted" }, "loading methods, recipes and your uploads…"));
  main.append(body);

  (async () => {
    const [methods, recipes, models, datasets, schemas, found] = await Promise.all([
      api("/v1/methods"), api("/v1/recipes"), allPages("/v1/models"), allPages("/v1/datasets"), jobSchemas(),
      api("/v1/targets").catch(() => ({ targets: DEFAULT_TARGETS })),
    ]);
    const uploads = { models, datasets };
    if (!models.length) {
      body.replaceChildren(h("p", null, "No model yet: ", h("a", { href: "#/upload" }, "upload one"), " first."));
      return;
    }
    const modelSelect = h("select", { id: "job-model", name: "model_id", required: true },
      models.map((m) => h("option", { value: m.id, selected: m.id === query.get("model") },
        `${m.name} — ${bytes(m.size_bytes)}, inputs ${(m.inspection.inputs || []).map((i) => `${i.name}[${i.shape.join(",")}]`).join(" ")} (${m.id.slice(0, 8)})`)));
    const nameInput = h("input", { id: "job-name", name: "name", type: "text", maxlength: 255, placeholder: "(optional)" });
    const queueSelect = h("select", { id: "job-queue", name: "queue" },
      h("option", { value: "" }, "server default"), h("option", { value: "cpu" }, "cpu"), h("option", { value: "gpu" }, "gpu"));

    // The target: the default, or one a live worker serves (GET /v1/targets); the precision is part of the choice.
    const targets = found.targets.filter((t) => t.default || t.workers > 0);
    const targetSelect = h("select", { id: "job-target", name: "target" }, targets.map((t, i) => h("option", { value: i, "data-target": targetName(t) },
      t.default ? `${targetName(t)} (default)` : `${targetName(t)} — ${t.workers} worker${t.workers === 1 ? "" : "s"}${t.devices.length ? `, ${t.devices[0].name}` : ""}`)));
    const calibrationSelect = h("select", { id: "target-calibration", name: "calibration_dataset_id" },
      h("option", { value: "" }, "the eval dataset's inputs, else random inputs"),
      datasets.map((d) => h("option", { value: d.id }, `${d.name} (${d.id.slice(0, 8)})`)));
    const calibrationField = h("div", { class: "field", hidden: true },
      h("label", { for: "target-calibration" }, "int8 calibration dataset"), calibrationSelect);
    const chosenTarget = () => targets[Number(targetSelect.value)] || targets[0];

    // A goal (the default), steps or a recipe.
    const modeGoal = h("input", { type: "radio", name: "mode", value: "goal", id: "mode-goal", checked: true });
    const goal = goalEditor(schemas, uploads);
    const goalSection = h("div", null, goal.element);
    const modeSteps = h("input", { type: "radio", name: "mode", value: "steps", id: "mode-steps" });
    const modeRecipe = h("input", { type: "radio", name: "mode", value: "recipe", id: "mode-recipe" });
    const modeNone = h("input", { type: "radio", name: "mode", value: "none", id: "mode-none", disabled: true });
    const stepsBox = h("div", { id: "steps" });
    const steps = [];
    function renumber() {
      const presets = steps.map((s) => s.read().method);
      clear(stepsBox);
      const old = steps.splice(0);
      old.forEach((_, i) => addStep(presets[i]));
    }
    function addStep(preset) {
      const index = steps.length + 1;
      const editor = stepEditor(methods, uploads, index, index > 1 ? () => { steps.splice(index - 1, 1); renumber(); } : null, preset);
      steps.push(editor);
      stepsBox.append(editor.element);
    }
    addStep(methods.some((m) => m.id === "quantize.int8_dynamic") ? "quantize.int8_dynamic" : methods[0].id);
    const stepsSection = h("div", null, stepsBox,
      h("button", { type: "button", id: "add-step", onclick: () => addStep(methods[0].id) }, "+ Add a step (runs on the previous step's model)"));

    const recipeSelect = h("select", { id: "recipe", name: "recipe" }, recipes.map((r) => h("option", { value: r.id }, r.id)));
    const recipeInfo = h("p", { class: "muted small" });
    const recipeParams = h("div");
    let recipeForm = null;
    function renderRecipe() {
      const recipe = recipes.find((r) => r.id === recipeSelect.value);
      if (!recipe) return;
      recipeInfo.textContent = `${recipe.description} Steps: ${(recipe.steps || []).join(" → ")}.`;
      recipeForm = schemaForm(recipe.params_schema, { ...uploads, prefix: "recipe" });
      clear(recipeParams).append(recipeForm.element);
    }
    recipeSelect.addEventListener("change", renderRecipe);
    renderRecipe();
    const recipeSection = h("div", { hidden: true },
      recipes.length ? h("div", null, h("label", { for: "recipe" }, "Recipe "), recipeSelect, recipeInfo, recipeParams) : h("p", null, "No recipes."));
    const targetNote = h("p", { class: "muted small", hidden: true }, "A goal tries every target the workers serve: the search chooses.");
    const evaluateForm = schemaForm(schemas.evaluate, { ...uploads, prefix: "evaluate" });
    // The evaluate fields that set a steps job's verdict budget: a goal carries its own, so they are hidden with one.
    const verdictFields = ["objective", "objective_batch_size", "min_cosine", "max_accuracy_drop"]
      .map((name) => evaluateForm.element.querySelector(`[name='evaluate.${name}']`)?.closest(".field")).filter(Boolean);
    function switchMode() {
      goalSection.hidden = !modeGoal.checked;
      stepsSection.hidden = !modeSteps.checked;
      recipeSection.hidden = !modeRecipe.checked;
      targetSelect.disabled = modeGoal.checked;
      targetNote.hidden = !modeGoal.checked;
      queueSelect.disabled = !modeGoal.checked && !chosenTarget().default;
      calibrationField.hidden = modeGoal.checked || !String(chosenTarget().precision || "").startsWith("int8");
      for (const field of verdictFields) field.hidden = modeGoal.checked;
    }
    modeGoal.addEventListener("change", switchMode);
    modeSteps.addEventListener("change", switchMode);
    modeRecipe.addEventListener("change", switchMode);
    modeNone.addEventListener("change", switchMode);
    function switchTarget() {
      const target = chosenTarget();
      // Another target has its own queue, and may go without steps: its lowering and precision are the compression.
      if (!target.default) queueSelect.value = "";
      modeNone.disabled = target.default;
      if (target.default && modeNone.checked) modeSteps.checked = true;
      switchMode();
    }
    targetSelect.addEventListener("change", switchTarget);
    switchMode();

    const submit = h("button", { type: "submit", class: "primary", id: "start-job" }, "Start the job");
    const form = h("form", { id: "job-form", class: "stack" },
      h("section", { class: "card" }, h("h2", null, "Model"),
        h("div", { class: "field" }, h("label", { for: "job-model" }, "Model to compress"), modelSelect),
        h("div", { class: "grid-2" },
          h("div", { class: "field" }, h("label", { for: "job-name" }, "Job name"), nameInput),
          h("div", { class: "field" }, h("label", { for: "job-queue" }, "Worker queue"), queueSelect)),
        h("div", { class: "grid-2" },
          h("div", { class: "field" }, h("label", { for: "job-target" }, "Target (runtime / device / precision)"), targetSelect, targetNote,
            h("p", { class: "muted small" }, "Where the result is built and measured, beside ONNX Runtime fp32 on the same worker. ",
              h("a", { href: "#/targets" }, "What the workers serve"))),
          calibrationField)),
      h("section", { class: "card" }, h("h2", null, "Compression"),
        h("div", { class: "mode", role: "radiogroup", "aria-label": "goal, steps or recipe" },
          h("label", { class: "check" }, modeGoal, " A goal (what you need: the search finds the best model that meets it, or the evidence that none does)"),
          h("label", { class: "check" }, modeSteps, " Steps (methods, in order)"),
          h("label", { class: "check" }, modeRecipe, " A recipe (a named chain)"),
          h("label", { class: "check" }, modeNone, " None: the target's lowering and precision only")),
        goalSection, stepsSection, recipeSection),
      h("section", { class: "card" }, h("h2", null, "Evaluation"),
        h("p", { class: "muted small" }, "How the original and the compressed model (with a goal: the candidate handed over) are measured side by side."),
        evaluateForm.element),
      h("div", { class: "actions" }, submit));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clear(problems);
      let spec;
      try {
        spec = { model_id: modelSelect.value, evaluate: evaluateForm.read() };
        if (modeGoal.checked) {
          spec.goal = goal.read();
        } else if (modeRecipe.checked) {
          spec.recipe = recipeSelect.value;
          spec.params = recipeForm.read();
        } else if (!modeNone.checked) {
          spec.steps = steps.map((s) => s.read());
        }
        if (nameInput.value.trim()) spec.name = nameInput.value.trim();
        const target = chosenTarget();
        if (!target.default && !modeGoal.checked) {
          spec.target = { runtime: target.runtime, device: target.device, precision: target.precision };
          if (String(target.precision || "").startsWith("int8") && calibrationSelect.value) spec.target.calibration_dataset_id = calibrationSelect.value;
        } else if (queueSelect.value) spec.queue = queueSelect.value;
      } catch (err) {
        problems.append(errorBox(err));
        return;
      }
      submit.disabled = true;
      try {
        const job = await api("/v1/jobs", { method: "POST", body: spec, headers: { "Idempotency-Key": crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}` } });
        navigate(`#/jobs?new=${job.id}`);
      } catch (err) {
        problems.append(errorBox(err));
        window.scrollTo(0, 0);
      } finally {
        submit.disabled = false;
      }
    });
    body.replaceChildren(form);
  })().catch((err) => body.replaceChildren(errorBox(err)));
}
