// A form generated from a JSON Schema (a method's or a recipe's params, as GET /v1/methods and
// GET /v1/recipes publish them): one input per property, by type; enums as selects; defaults filled
// in; descriptions as help. Dataset and model ids get a select of the caller's uploads.

import { h } from "./dom.js";

let formCount = 0;

/** {schema, nullable}: a property whose anyOf is [X, null] is X, optional. */
function unwrap(prop) {
  if (Array.isArray(prop.anyOf)) {
    const options = prop.anyOf.filter((o) => o.type !== "null");
    const nullable = options.length < prop.anyOf.length;
    if (options.length === 1) {
      const { anyOf, ...outer } = prop;
      return { schema: { ...options[0], ...outer }, nullable };
    }
  }
  return { schema: prop, nullable: false };
}

function rangeText(schema) {
  const low = schema.minimum ?? (schema.exclusiveMinimum !== undefined ? `>${schema.exclusiveMinimum}` : null);
  const high = schema.maximum ?? (schema.exclusiveMaximum !== undefined ? `<${schema.exclusiveMaximum}` : null);
  if (low === null && high === null) return null;
  return `range ${low ?? "…"} to ${high ?? "…"}`;
}

function show(value) {
  return Array.isArray(value) ? value.join(", ") : JSON.stringify(value);
}

function sameValue(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

function choiceOptions(items, selected, { placeholder }) {
  const options = [h("option", { value: "" }, placeholder)];
  for (const item of items) {
    options.push(h("option", { value: item.id, selected: item.id === selected }, `${item.name} (${item.id.slice(0, 8)})`));
  }
  return options;
}

/**
 * Build the form. Answers {element, read()} where read() gives the params object (only what differs
 * from the schema's defaults, and every required property) or throws an Error naming the field.
 */
export function schemaForm(schema, { datasets = [], models = [], prefix = "param" } = {}) {
  formCount += 1;
  const fields = [];
  const required = new Set(schema.required || []);
  const container = h("div", { class: "schema-form" });
  const properties = Object.entries(schema.properties || {});
  if (!properties.length) container.append(h("p", { class: "muted" }, "This method takes no parameters."));

  for (const [name, rawProp] of properties) {
    const { schema: prop, nullable } = unwrap(rawProp);
    const id = `f${formCount}-${prefix}-${name}`;
    const isRequired = required.has(name);
    const hasDefault = Object.prototype.hasOwnProperty.call(rawProp, "default");
    const fallback = hasDefault ? rawProp.default : undefined;
    const inputName = `${prefix}.${name}`;
    let control;
    let read;

    if (prop.enum && prop.type !== "array") {
      const numeric = prop.type === "integer" || prop.type === "number";
      const options = [];
      if (nullable || !hasDefault) options.push(h("option", { value: "" }, isRequired ? "— choose —" : "— none —"));
      for (const value of prop.enum) options.push(h("option", { value: String(value), selected: value === fallback }, String(value)));
      control = h("select", { id, name: inputName }, options);
      read = () => (control.value === "" ? undefined : numeric ? Number(control.value) : control.value);
    } else if (prop.type === "boolean") {
      if (nullable) {
        control = h("select", { id, name: inputName },
          h("option", { value: "" }, "— automatic —"), h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
        read = () => (control.value === "" ? undefined : control.value === "true");
      } else {
        control = h("input", { id, name: inputName, type: "checkbox", checked: fallback === true });
        read = () => control.checked;
      }
    } else if (prop.type === "integer" || prop.type === "number") {
      control = h("input", {
        id, name: inputName, type: "number", inputmode: prop.type === "integer" ? "numeric" : "decimal",
        step: prop.type === "integer" ? 1 : "any",
        min: prop.minimum ?? prop.exclusiveMinimum, max: prop.maximum ?? prop.exclusiveMaximum,
        value: fallback === null || fallback === undefined ? "" : String(fallback),
        placeholder: nullable ? "(none)" : "",
      });
      read = () => {
        // Emptied where the default is a number but null is allowed (a goal's min_cosine): null, not the default.
        if (control.value.trim() === "") return nullable && fallback !== null && fallback !== undefined ? null : undefined;
        const value = Number(control.value);
        if (!Number.isFinite(value) || (prop.type === "integer" && !Number.isInteger(value))) {
          throw new Error(`${name}: ${control.value} is not ${prop.type === "integer" ? "an integer" : "a number"}`);
        }
        return value;
      };
    } else if (prop.type === "array" && prop.items && prop.items.enum) {
      const boxes = prop.items.enum.map((value) => {
        const box = h("input", { type: "checkbox", name: inputName, value: String(value), checked: Array.isArray(fallback) && fallback.includes(value) });
        return { value, box, label: h("label", { class: "check" }, box, ` ${value}`) };
      });
      control = h("div", { id, class: "checks", role: "group", "aria-label": name }, boxes.map((b) => b.label));
      read = () => {
        const chosen = boxes.filter((b) => b.box.checked).map((b) => b.value);
        return chosen.length || !nullable ? chosen : undefined;
      };
    } else if (prop.type === "array") {
      control = h("input", {
        id, name: inputName, type: "text", placeholder: prop.examples ? `e.g. ${show(prop.examples[0])}` : "comma-separated",
        value: Array.isArray(fallback) ? fallback.join(", ") : "",
      });
      read = () => {
        const items = control.value.split(",").map((v) => v.trim()).filter(Boolean);
        const numeric = prop.items && (prop.items.type === "integer" || prop.items.type === "number");
        if (!items.length) return nullable ? undefined : [];
        return numeric ? items.map(Number) : items;
      };
    } else if (prop.type === "string" && /dataset_id$/.test(name)) {
      control = h("select", { id, name: inputName }, choiceOptions(datasets, fallback, { placeholder: isRequired ? "— choose a dataset —" : "— none —" }));
      read = () => control.value || undefined;
    } else if (prop.type === "string" && /model_id$/.test(name)) {
      control = h("select", { id, name: inputName }, choiceOptions(models, fallback, { placeholder: isRequired ? "— choose a model —" : "— none —" }));
      read = () => control.value || undefined;
    } else if (prop.type === "string") {
      control = h("input", {
        id, name: inputName, type: "text", value: typeof fallback === "string" ? fallback : "",
        maxlength: prop.maxLength, pattern: prop.pattern,
      });
      read = () => (control.value === "" ? undefined : control.value);
    } else {
      // Objects (e.g. evaluate.input_shapes) are typed as JSON; the schema's first example shows the form.
      const example = (rawProp.examples || prop.examples || [])[0];
      const placeholder = example === undefined ? "JSON" : `JSON, e.g. ${JSON.stringify(example)}`;
      control = h("textarea", { id, name: inputName, rows: 2, placeholder },
        fallback === undefined || fallback === null ? "" : JSON.stringify(fallback));
      read = () => {
        if (!control.value.trim()) return undefined;
        try {
          return JSON.parse(control.value);
        } catch {
          throw new Error(`${name}: not valid JSON`);
        }
      };
    }

    const help = [];
    if (rawProp.description) help.push(rawProp.description);
    const facts = [hasDefault && fallback !== null ? `default ${show(fallback)}` : null, rangeText(prop), isRequired ? "required" : null]
      .filter(Boolean).join(" · ");
    const field = h("div", { class: `field ${prop.type === "boolean" && !nullable ? "field-check" : ""}` },
      h("label", { for: id }, rawProp.title || name, isRequired ? h("span", { class: "req", title: "required" }, " *") : null,
        h("code", { class: "param-name" }, name)),
      control,
      help.length || facts ? h("small", { class: "help" }, help.join(" "), facts ? h("span", { class: "facts" }, ` (${facts})`) : null) : null,
    );
    container.append(field);
    fields.push({ name, read, isRequired, hasDefault, fallback });
  }

  function readParams() {
    const params = {};
    for (const field of fields) {
      const value = field.read();
      if (value === undefined) {
        if (field.isRequired) throw new Error(`${field.name} is required`);
        continue;
      }
      if (field.hasDefault && sameValue(value, field.fallback) && !field.isRequired) continue;
      params[field.name] = value;
    }
    return params;
  }

  return { element: container, read: readParams };
}
