// Building the page without innerHTML: every text from the API goes in as text, never markup.

/** h("tag.class", {attr: value, onclick: fn}, ...children) → an element. */
export function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag);
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "value" && "value" in el) {
      el.value = value;
    } else if (key === "checked") {
      el.checked = Boolean(value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

const SVG = "http://www.w3.org/2000/svg";

/** An SVG element with its attributes (presentation attributes, never style=). */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  append(el, children);
  return el;
}

/** Replace the content of `el` by `children`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let lastId = 0;
/** A fresh id for label/for and aria-describedby pairs. */
export function uid(prefix = "f") {
  lastId += 1;
  return `${prefix}-${lastId}`;
}

/** A short notification in the corner; errors stay longer. */
export function toast(text, kind = "info") {
  const box = document.getElementById("toasts");
  const item = h("div.toast", { class: `toast ${kind}` }, text);
  box.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 9000 : 5000);
}

/** A modal question; resolves true when confirmed. Escape or Cancel: false. */
export function confirmDialog(question, confirmLabel = "Confirm") {
  return new Promise((resolve) => {
    const dialog = h("dialog", { "aria-label": "Confirm" });
    const done = (answer) => {
      dialog.close();
      dialog.remove();
      resolve(answer);
    };
    dialog.append(
      h("p", {}, question),
      h(
        "div.actions",
        {},
        h("button.secondary", { type: "button", onclick: () => done(false) }, "Cancel"),
        h("button.danger", { type: "button", onclick: () => done(true) }, confirmLabel),
      ),
    );
    dialog.addEventListener("cancel", () => done(false));
    document.body.append(dialog);
    dialog.showModal();
  });
}

/** A labelled control: <label for> + control + help; `name` is the key path it sets. */
export function field({ label, name, type = "text", value, required, help, options, attrs = {} }) {
  const id = uid();
  const helpId = help ? uid("help") : undefined;
  let control;
  if (type === "select") {
    control = h(
      "select",
      { id, name, "aria-describedby": helpId, ...attrs },
      (options || []).map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
    );
  } else if (type === "textarea") {
    control = h("textarea", { id, name, "aria-describedby": helpId, ...attrs });
    control.value = value ?? "";
  } else if (type === "checkbox") {
    control = h("input", { id, name, type, checked: Boolean(value), ...attrs });
  } else {
    control = h("input", {
      id, name, type, value: value ?? "", "aria-describedby": helpId, autocomplete: "off", ...attrs,
    });
  }
  if (required) control.setAttribute("aria-required", "true");
  const labelEl = h(
    "label",
    { for: id },
    label,
    required ? h("span.required", { title: "mandatory" }, " *") : null,
  );
  if (type === "checkbox") {
    return h("div.field", {}, h("label.inline", { for: id }, control, label), help ? h("p.help", { id: helpId }, help) : null);
  }
  return h("div.field", {}, labelEl, control, help ? h("p.help", { id: helpId }, help) : null);
}

/** Remove the field errors of a form. */
export function clearErrors(form) {
  for (const el of form.querySelectorAll(".field-error, .form-error")) el.remove();
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

/** Put each `{path, message}` next to the control whose name is that path (or the longest
 * name the path starts with); the rest at the top of the form. */
export function showErrors(form, message, details = []) {
  clearErrors(form);
  const controls = [...form.elements].filter((el) => el.name);
  const loose = [];
  for (const { path, message: text } of details) {
    const target = controls
      .filter((el) => path === el.name || path.startsWith(`${el.name}.`) || path.startsWith(`${el.name}[`))
      .sort((a, b) => b.name.length - a.name.length)[0];
    if (!target) {
      loose.push(`${path}: ${text}`);
      continue;
    }
    const id = uid("err");
    const error = h("p.field-error", { id }, text);
    target.setAttribute("aria-invalid", "true");
    const described = target.getAttribute("aria-describedby");
    target.setAttribute("aria-describedby", described ? `${described} ${id}` : id);
    (target.closest(".field") || target).after(error);
  }
  const top = h("div.form-error", { role: "alert" }, message, loose.length ? h("ul", {}, loose.map((t) => h("li", {}, t))) : null);
  const heading = form.querySelector("h1, h2");
  if (heading && heading.parentElement === form) heading.after(top);
  else form.prepend(top);
  const first = form.querySelector("[aria-invalid='true']");
  (first || top).focus?.();
}

/** "2026-12-06T03:25:31.123+00:00" → local, short; empty for nothing. */
export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

/** A state badge, coloured by its value. */
export function badge(state) {
  return h("span.state", { class: `state state-${state}` }, state);
}
