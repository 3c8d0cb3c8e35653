// A connection's configuration form, generated from its connector's JSON Schema.
// Every control's name is the key path it sets: `configuration.destinationURL`,
// `configuration.headers.Authorization`, ...

import { field, h } from "./dom.js";

export const MASK = "*****";
const PEM = /certificate|certficate|privatekey/i;
const LONG = new Set(["description"]);

/** The JSON Schema of a property, without its `null` branch; and whether it may be null. */
function branch(prop) {
  if (!prop.anyOf) return prop;
  const own = prop.anyOf.find((b) => b.type !== "null") || {};
  return { ...own, ...prop, anyOf: undefined, type: own.type, writeOnly: prop.writeOnly || own.writeOnly };
}

function label(key) {
  return key;
}

/** Controls for the configuration object of `schema`, filled from `config` (an edit). */
export function configurationFields(schema, config = {}, { skip = [], brand } = {}) {
  const required = new Set(schema.required || []);
  const out = [];
  for (const [key, raw] of Object.entries(schema.properties || {})) {
    if (skip.includes(key)) continue;
    const prop = branch(raw);
    const name = `configuration.${key}`;
    const value = config[key];
    const help = prop.description;
    if (prop.type === "boolean") {
      out.push(field({ label: label(key), name, type: "checkbox", value: value ?? prop.default, help }));
    } else if (prop.enum) {
      const options = prop.enum.map((v) => [String(v), String(v)]);
      if (!required.has(key) && prop.default === undefined) options.unshift(["", "(none)"]);
      out.push(
        field({
          label: label(key), name, type: "select", value: String(value ?? prop.default ?? ""), options, help,
          required: required.has(key), attrs: { "data-type": prop.type || "string" },
        }),
      );
    } else if (prop.type === "integer" || prop.type === "number") {
      out.push(
        field({
          label: label(key), name, type: "number", value: value ?? "", required: required.has(key), help,
          attrs: { "data-type": prop.type, min: prop.minimum, max: prop.maximum, step: prop.type === "integer" ? 1 : "any", placeholder: prop.default ?? "" },
        }),
      );
    } else if (prop.type === "object") {
      out.push(objectField(key, prop, value || {}, brand));
    } else {
      const secret = Boolean(prop.writeOnly);
      const long = PEM.test(key) || LONG.has(key);
      // A PEM key is many lines, which a password field cannot hold: a text area, filled
      // with ***** on edit like any secret (the stored key is never sent to the browser).
      out.push(
        field({
          label: label(key), name, required: required.has(key), help,
          type: long ? "textarea" : secret ? "password" : "text",
          value: value ?? "",
          attrs: {
            placeholder: prop.default ?? (prop.examples ? `e.g. ${prop.examples[0]}` : undefined),
            "data-secret": secret ? "1" : undefined,
            spellcheck: long ? "false" : undefined,
          },
        }),
      );
    }
  }
  return out;
}

/** `headers`: the brand's required headers as their own fields, the others as lines
 * "Name: value" (a credential read back as ***** is kept unless retyped). */
function objectField(key, prop, value, brand) {
  const own = new Set();
  const parts = [];
  for (const req of brand?.requires || []) {
    if (req.in !== "header" || key !== "headers") continue;
    const found = Object.keys(value).find((k) => k.toLowerCase() === req.name.toLowerCase());
    own.add(found || req.name);
    parts.push(
      field({
        label: `${req.name} (header)`, name: `configuration.${key}.${req.name}`, required: true,
        type: req.writeOnly ? "password" : "text", value: found ? value[found] : "",
        help: `${brand.id}: ${req.description}`, attrs: { "data-secret": req.writeOnly ? "1" : undefined },
      }),
    );
  }
  const rest = Object.entries(value).filter(([k]) => !own.has(k)).map(([k, v]) => `${k}: ${v}`).join("\n");
  parts.push(
    field({
      label: `${key} (other, one "Name: value" per line)`, name: `configuration.${key}`, type: "textarea",
      value: rest, help: prop.description, attrs: { "data-type": "lines" },
    }),
  );
  return h("fieldset", {}, h("legend", {}, key), parts);
}

/** Set `value` at the dotted `path` of `target`. */
function put(target, path, value) {
  const keys = path.split(".");
  let node = target;
  for (const key of keys.slice(0, -1)) {
    node[key] = node[key] && typeof node[key] === "object" ? node[key] : {};
    node = node[key];
  }
  const last = keys[keys.length - 1];
  if (value && typeof value === "object" && node[last] && typeof node[last] === "object") {
    Object.assign(node[last], value);
  } else {
    node[last] = value;
  }
}

/** The configuration object the controls of `form` describe. Empty fields are left out. */
export function readConfiguration(form) {
  const config = {};
  const problems = [];
  for (const el of form.elements) {
    if (!el.name || !el.name.startsWith("configuration.")) continue;
    const path = el.name.slice("configuration.".length);
    if (el.type === "checkbox") {
      put(config, path, el.checked);
      continue;
    }
    const text = el.value;
    if (el.dataset.type === "lines") {
      const object = {};
      for (const [i, line] of text.split("\n").entries()) {
        if (!line.trim()) continue;
        const colon = line.indexOf(":");
        if (colon <= 0) {
          problems.push({ path: el.name, message: `line ${i + 1}: expected "Name: value"` });
          continue;
        }
        object[line.slice(0, colon).trim()] = line.slice(colon + 1).trim();
      }
      put(config, path, object);
      continue;
    }
    if (text === "") continue;
    if (el.dataset.type === "integer" || el.dataset.type === "number") {
      put(config, path, Number(text));
    } else {
      put(config, path, text);
    }
  }
  return { config, problems };
}
