import { api, clearKey, setKey } from "../api.js";
import { errorBox, h } from "../dom.js";

export function signinPage(main, { query, navigate, message }) {
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false",
    placeholder: "mp_…", "aria-describedby": "key-help",
  });
  const status = h("div", { class: "status-line", "aria-live": "polite" });
  if (message) status.append(errorBox({ message }));
  const form = h("form", { class: "card narrow", id: "signin-form" },
    h("h1", null, "Sign in"),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("small", { id: "key-help", class: "help" },
      "`make run` prints the local key (also in ", h("code", null, ".modelpress/api-key"), "); ",
      h("code", null, ".venv/bin/modelpress keys create --tenant NAME"),
      " makes another. The key stays in this browser tab's session storage and is sent only to this server."),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Sign in")),
    status,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    status.replaceChildren(h("span", { class: "muted" }, "checking the key…"));
    setKey(input.value.trim());
    try {
      await api("/v1/methods");
      const next = query.get("next");
      navigate(next && next.startsWith("#/") && !next.startsWith("#/signin") ? next : "#/jobs");
    } catch (err) {
      clearKey();
      status.replaceChildren(errorBox(err));
    }
  });
  main.append(form);
  input.focus();
}
