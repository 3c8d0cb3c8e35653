// Flows (list, create, edit with their matchers), drivers (and trying one), active alarms.

import { ApiError, all, call, get, me } from "./api.js";
import { clearErrors, confirmDialog, field, fill, h, showErrors, toast, when } from "./dom.js";

function table(headers, rows, empty) {
  if (!rows.length) return h("p.muted", {}, empty);
  return h(
    "div.table-wrap",
    {},
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))),
    ),
  );
}

function matcherText(m) {
  switch (m.type) {
    case "key":
      return `key ${m.key}`;
    case "thing":
      return `tags ${m.tags.join(", ")}`;
    case "application":
      return `application ${m.id}`;
    case "range":
      return `range ${m.from}…${m.to}`;
    default:
      return JSON.stringify(m);
  }
}

// -- flows --------------------------------------------------------------------------------

export async function flowsList(main) {
  const flows = await all("/flows");
  fill(
    main,
    h(
      "div.row",
      {},
      h("h1", {}, "Flows"),
      h("span.spacer"),
      me.can("writer") ? h("a.button", { href: "#/flows/new" }, "Create a flow") : null,
    ),
    h("p.muted", {}, "A flow routes the uplinks its matchers select to its connections, beside the device bindings."),
    table(
      ["name", "matchers", "driver", "connections"],
      flows.map((f) => [
        h("a", { href: `#/flows/${encodeURIComponent(f.id)}` }, f.name),
        f.matchers.map(matcherText).join(" | "),
        f.driver?.id || "",
        f.connectors.map((c) => c.connectionId).join(", "),
      ]),
      "No flow yet.",
    ),
  );
}

const MATCHERS = [
  ["key", "device (lora:DevEUI)"],
  ["thing", "tags"],
  ["application", "application"],
  ["range", "DevEUI range"],
];

/** The controls of matcher `i`, named by their key path (`matchers[0].key`, ...). */
function matcherRow(i, matcher, onRemove) {
  const box = h("fieldset.matcher", { "data-index": String(i) });
  const values = h("div");
  const typeField = field({
    label: "Type",
    name: `matchers[${i}].type`,
    type: "select",
    value: matcher.type || "key",
    options: MATCHERS,
  });
  const draw = () => {
    const type = typeField.querySelector("select").value;
    const parts = {
      key: [field({ label: "Key", name: `matchers[${i}].key`, value: matcher.key || "", required: true, help: "lora:<DevEUI>, e.g. lora:0018b20000000b20" })],
      thing: [field({ label: "Tags", name: `matchers[${i}].tags`, value: (matcher.tags || []).join(", "), required: true, help: "All of them, separated by commas (site=Paris, Temperature)." })],
      application: [field({ label: "Application", name: `matchers[${i}].id`, value: matcher.id || "", required: true })],
      range: [
        field({ label: "From DevEUI", name: `matchers[${i}].from`, value: matcher.from || "", required: true }),
        field({ label: "To DevEUI", name: `matchers[${i}].to`, value: matcher.to || "", required: true }),
      ],
    }[type];
    fill(values, parts);
  };
  typeField.querySelector("select").addEventListener("change", draw);
  draw();
  box.append(
    h("legend", {}, `Matcher ${i + 1}`),
    typeField,
    values,
    h("button.secondary", { type: "button", onclick: onRemove }, `Remove matcher ${i + 1}`),
  );
  return box;
}

function readMatchers(form, count) {
  const out = [];
  for (let i = 0; i < count; i += 1) {
    const value = (key) => form.elements[`matchers[${i}].${key}`]?.value.trim();
    const type = value("type");
    if (type === "key") out.push({ type, key: value("key") });
    else if (type === "thing") out.push({ type, tags: value("tags").split(",").map((t) => t.trim()).filter(Boolean) });
    else if (type === "application") out.push({ type, id: value("id") });
    else if (type === "range") out.push({ type, from: value("from"), to: value("to") });
  }
  return out;
}

export async function flowForm(main, id) {
  const [connections, drivers] = await Promise.all([all("/connections"), get("/drivers").catch(() => [])]);
  const current = id ? await get(`/flows/${encodeURIComponent(id)}`) : null;
  const writable = me.can("writer") && !current?.provisioned;
  let matchers = current ? [...current.matchers] : [{ type: "key" }];
  const chosen = new Map((current?.connectors || []).map((c) => [c.connectionId, c]));
  const form = h("form.card", { novalidate: true, "aria-labelledby": "flow-title" });
  const matcherBox = h("div");
  const drawMatchers = () => {
    // Keep what was typed when a row is added or removed.
    if (matcherBox.childElementCount) matchers = readMatchers(form, matcherBox.childElementCount);
    fill(
      matcherBox,
      matchers.map((m, i) =>
        matcherRow(i, m, () => {
          matchers = readMatchers(form, matcherBox.childElementCount);
          matchers.splice(i, 1);
          fill(matcherBox);
          drawMatchers();
        }),
      ),
    );
  };
  const driverOptions = [["", "(none)"], ["actility:auto:1", "actility:auto:1 (the uplink's own driver)"], ...drivers.map((d) => [d.id, `${d.id} (${d.status})`])];
  const submit = h("button", { type: "submit", disabled: !writable }, current ? "Save" : "Create");
  fill(form,
    h("h1", { id: "flow-title" }, current ? `Flow ${current.name}` : "Create a flow"),
    current?.provisioned ? h("p.muted", {}, "Provisioned by the config file: read-only here.") : null,
    field({ label: "Name", name: "name", required: true, value: current?.name || "" }),
    field({ label: "Description", name: "description", value: current?.description || "" }),
    field({ label: "Driver", name: "driver.id", type: "select", value: current?.driver?.id || "", options: driverOptions }),
    h("fieldset", {}, h("legend", {}, "Matchers (any of them)"), matcherBox, h("button.secondary", { type: "button", onclick: () => { matchers = readMatchers(form, matcherBox.childElementCount); matchers.push({ type: "key" }); fill(matcherBox); drawMatchers(); } }, "Add a matcher")),
    h(
      "fieldset",
      { "data-name": "connectors" },
      h("legend", {}, "Connections"),
      connections.length
        ? connections.map((c) => field({ label: `${c.name} (${c.id})`, name: "connectors", type: "checkbox", value: chosen.has(c.id), attrs: { value: c.id } }))
        : h("p.muted", {}, "No connection yet."),
    ),
    h(
      "div.actions",
      {},
      submit,
      current && writable
        ? h(
            "button.danger",
            {
              type: "button",
              onclick: async () => {
                if (!(await confirmDialog(`Delete the flow ${current.name}?`, "Delete"))) return;
                try {
                  await call("DELETE", `/flows/${encodeURIComponent(current.id)}`);
                  toast("Flow deleted.");
                  location.hash = "#/flows";
                } catch (exc) {
                  if (exc.status !== 401) toast(exc.message, "error");
                }
              },
            },
            "Delete",
          )
        : null,
      h("a.button.secondary", { href: "#/flows" }, "Back"),
    ),
  );
  drawMatchers();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const picked = [...form.querySelectorAll("input[name='connectors']:checked")].map((el) => el.value);
    const body = {
      name: form.elements.name.value,
      matchers: readMatchers(form, matcherBox.childElementCount),
      connectors: picked.map((cid) => ({ ...(chosen.get(cid) || {}), connectionId: cid })),
    };
    if (form.elements.description.value) body.description = form.elements.description.value;
    if (form.elements["driver.id"].value) body.driver = { id: form.elements["driver.id"].value };
    try {
      const { body: saved } = await call(current ? "PUT" : "POST", current ? `/flows/${encodeURIComponent(current.id)}` : "/flows", body);
      toast(current ? "Flow saved." : "Flow created.");
      location.hash = `#/flows/${encodeURIComponent(saved.id)}`;
      if (current) await flowForm(main, saved.id);
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 401) return;
      // The API says matchers.0.key; the controls are named matchers[0].key.
      const details = exc.details.map((d) => ({ ...d, path: d.path.replace(/^(matchers|connectors)\.(\d+)/, "$1[$2]") }));
      showErrors(form, exc.message, details);
    }
  });
  fill(main, form);
}

// -- drivers ------------------------------------------------------------------------------

export async function driversPage(main) {
  let drivers = [];
  let problem = null;
  try {
    drivers = await get("/drivers");
  } catch (exc) {
    if (exc.status === 401) throw exc;
    problem = exc.message;
  }
  const output = h("pre", { "aria-live": "polite", id: "decoded" }, "");
  const form = h(
    "form.card",
    { novalidate: true, "aria-labelledby": "try-title" },
    h("h2", { id: "try-title" }, "Try a driver"),
    field({ label: "Driver", name: "driver", type: "select", options: drivers.map((d) => [d.id, d.id]) }),
    field({ label: "Payload (hex)", name: "payload_hex", required: true, attrs: { spellcheck: "false" } }),
    field({ label: "FPort", name: "fPort", type: "number", attrs: { min: 0, max: 255 } }),
    h("div.actions", {}, h("button", { type: "submit", disabled: !drivers.length }, "Decode")),
    output,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const body = { payload_hex: form.elements.payload_hex.value.trim() };
    if (form.elements.fPort.value !== "") body.fPort = Number(form.elements.fPort.value);
    try {
      const { body: decoded } = await call("POST", `/drivers/${encodeURIComponent(form.elements.driver.value)}/decode`, body);
      fill(output, JSON.stringify(decoded, null, 2));
    } catch (exc) {
      if (exc.status !== 401) showErrors(form, exc.message, exc.details);
    }
  });
  fill(
    main,
    h("h1", {}, "Drivers"),
    problem ? h("p.form-error", {}, problem) : null,
    table(
      ["id", "status", "encodeDownlink", "error"],
      drivers.map((d) => [h("span.mono", {}, d.id), d.status, d.encodeDownlink ? "yes" : "no", d.error || ""]),
      "No driver found under [drivers] path.",
    ),
    form,
  );
}

// -- alarms -------------------------------------------------------------------------------

export async function alarmsPage(main) {
  const box = h("div");
  const draw = async () => {
    const alarms = await get("/alarms");
    fill(
      box,
      table(
        ["connection", "alarm", "message", "rate / threshold", "since"],
        alarms.map((a) => [
          h("a", { href: `#/connections/${encodeURIComponent(a.connectionId)}` }, a.connectionId),
          String(a.alarm),
          a.message,
          `${a.rate} / ${a.threshold}`,
          when(a.since),
        ]),
        "No alarm raised.",
      ),
    );
  };
  await draw();
  fill(main, h("h1", {}, "Active alarms"), box);
  const timer = setInterval(() => draw().catch(() => {}), 5000);
  return () => clearInterval(timer);
}
