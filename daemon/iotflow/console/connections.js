// Connections: the list (live), the form (create and edit), and a connection's page.

import { ApiError, all, call, get, me, page } from "./api.js";
import { chart, record } from "./chart.js";
import { badge, clearErrors, confirmDialog, field, fill, h, showErrors, toast, when } from "./dom.js";
import { MASK, configurationFields, readConfiguration } from "./form.js";

export const POLL_MS = 2000;
const STATS = ["received", "delivered", "retried", "failed", "expired", "filtered", "dropped", "pending"];
const READ_ONLY = ["state", "startupTime", "statistics", "provisioned", "alarmStates"];
const HTTP = "actility-http-iot";

/** Repeat `task` every POLL_MS until the returned stop function is called. */
function every(task) {
  let stopped = false;
  let timer;
  const tick = async () => {
    if (stopped) return;
    try {
      await task();
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 401) return;
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  };
  timer = setTimeout(tick, POLL_MS);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function statistics(stats) {
  return h(
    "dl.stats",
    {},
    STATS.map((key) => h("div", { "data-stat": key }, h("dt", {}, key), h("dd", {}, String(stats[key] ?? 0)))),
  );
}

function lastError(stats) {
  return stats.lastError ? h("p.last-error", {}, `Last error: ${stats.lastError}`) : null;
}

// -- the list -----------------------------------------------------------------------------

function card(connection) {
  record(connection.id, connection.statistics);
  return h(
    "article.card.conn",
    { "data-connection": connection.id },
    h("h2", {}, h("a", { href: `#/connections/${encodeURIComponent(connection.id)}` }, connection.name)),
    h(
      "div.row",
      {},
      badge(connection.state),
      h("span.muted.mono", {}, connection.id),
      h("span.muted", {}, connection.brand ? `${connection.connectorId} · ${connection.brand}` : connection.connectorId),
    ),
    statistics(connection.statistics),
    lastError(connection.statistics),
    chart(connection.id),
  );
}

export async function connectionsList(main) {
  const list = h("div.conn-list", { "aria-live": "off" });
  const header = h(
    "div.row",
    {},
    h("h1", {}, "Connections"),
    h("span.spacer"),
    me.can("writer") ? h("a.button", { href: "#/connections/new" }, "Create a connection") : null,
  );
  const empty = h("p.muted", {}, "No connection yet.");
  const draw = async () => {
    const connections = await all("/connections");
    fill(list, connections.length ? connections.map(card) : empty);
  };
  await draw();
  fill(main, header, list);
  return every(draw);
}

// -- the form -----------------------------------------------------------------------------

/** Create (no id) or edit a connection: connector, brand, then its schema's form. */
export async function connectionForm(main, id) {
  const connectors = await get("/connectors");
  let current = null;
  if (id) current = await get(`/connections/${encodeURIComponent(id)}`);
  const form = h("form.card", { novalidate: true, "aria-labelledby": "form-title" });
  const title = h("h1", { id: "form-title" }, current ? `Edit ${current.name}` : "Create a connection");
  const dynamic = h("div");

  const connectorField = field({
    label: "Connector",
    name: "connectorId",
    type: "select",
    required: true,
    value: current?.connectorId || "",
    options: [["", "Choose a connector…"], ...connectors.map((c) => [c.id, `${c.id} — ${c.description}`])],
    attrs: current ? { disabled: true } : {},
  });
  const connectorSelect = connectorField.querySelector("select");

  const render = () => {
    clearErrors(form);
    const connector = connectors.find((c) => c.id === connectorSelect.value);
    if (!connector) {
      fill(dynamic, h("p.muted", {}, "Pick the connector first."));
      return;
    }
    const brands = connector.brands || [];
    const brandValue = form.elements.brand?.value ?? current?.brand ?? "";
    const brand = brands.find((b) => b.id === brandValue);
    const config = readKept() || current?.configuration || {};
    const parts = [];
    if (brands.length) {
      const brandField = field({
        label: "Brand",
        name: "brand",
        type: "select",
        value: brandValue,
        options: [["", "(none: a plain webhook)"], ...brands.map((b) => [b.id, b.description])],
        help: "The cloud this webhook goes to: it fills the URL and asks for what the cloud needs.",
      });
      brandField.querySelector("select").addEventListener("change", render);
      parts.push(brandField);
    }
    parts.push(
      field({ label: "Name", name: "name", required: true, value: form.elements.name?.value ?? current?.name ?? "" }),
    );
    if (!current) {
      parts.push(
        field({
          label: "Id",
          name: "id",
          value: form.elements.id?.value ?? "",
          help: "Optional: letters, digits, '-', '_' and '.'; one is made when left empty.",
        }),
      );
    }
    parts.push(
      field({ label: "Active", name: "active", type: "checkbox", value: form.elements.active ? form.elements.active.checked : current?.active ?? true }),
    );
    const schema = connector.connection.configurationSchema;
    const fields = configurationFields(schema, config, { brand });
    if (brand && connector.id === HTTP) {
      const url = fields.map((f) => f.querySelector?.("[name='configuration.destinationURL']")).find(Boolean);
      if (url) {
        url.placeholder = brand.destinationURL || "";
        const note = brand.destinationURL
          ? `Default for ${brand.id}: ${brand.destinationURL} (used when left empty).`
          : `${brand.id} has no default URL: type the one your account gives.`;
        url.closest(".field").append(h("p.help.brand-url", {}, note));
      }
    }
    parts.push(h("fieldset", {}, h("legend", {}, "Configuration"), fields));
    parts.push(
      h(
        "details",
        {},
        h("summary", {}, "Alarms and processors (JSON)"),
        field({
          label: "alarms",
          name: "alarms",
          type: "textarea",
          value: JSON.stringify(current?.alarms || [], null, 2),
          help: "A list of alarms (docs/alarms.md).",
        }),
        field({
          label: "upOperations",
          name: "upOperations",
          type: "textarea",
          value: current?.upOperations ? JSON.stringify(current.upOperations, null, 2) : "",
          help: "Processors run on each document, in order (docs/processors.md). Empty: none.",
        }),
      ),
    );
    fill(dynamic, parts);
  };
  // Values typed before the brand changed are kept across the re-render.
  const readKept = () => (dynamic.childElementCount && form.elements["configuration.destinationURL"] !== undefined ? readConfiguration(form).config : null);
  connectorSelect.addEventListener("change", () => {
    fill(dynamic);
    render();
  });

  const submit = h("button", { type: "submit" }, current ? "Save" : "Create");
  fill(form,
    title,
    current?.provisioned ? h("p.form-error", {}, "Provisioned by the config file: read-only here.") : null,
    connectorField,
    dynamic,
    h(
      "div.actions",
      {},
      submit,
      h("a.button.secondary", { href: current ? `#/connections/${encodeURIComponent(current.id)}` : "#/connections" }, "Cancel"),
    ),
  );
  render();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const { config, problems } = readConfiguration(form);
    const body = {
      name: form.elements.name.value,
      connectorId: connectorSelect.value,
      active: form.elements.active.checked,
      configuration: config,
    };
    if (form.elements.brand && form.elements.brand.value) body.brand = form.elements.brand.value;
    if (!current && form.elements.id.value) body.id = form.elements.id.value;
    for (const key of ["alarms", "upOperations"]) {
      const text = form.elements[key].value.trim();
      if (!text) continue;
      try {
        body[key] = JSON.parse(text);
      } catch (exc) {
        problems.push({ path: key, message: "is not valid JSON" });
      }
    }
    if (!body.connectorId) problems.push({ path: "connectorId", message: "choose a connector" });
    if (problems.length) {
      showErrors(form, "Please correct the marked fields.", problems);
      return;
    }
    submit.disabled = true;
    try {
      const path = current ? `/connections/${encodeURIComponent(current.id)}` : "/connections";
      const { body: saved } = await call(current ? "PUT" : "POST", path, body);
      toast(current ? `Connection ${saved.name} saved.` : `Connection ${saved.name} created.`);
      location.hash = `#/connections/${encodeURIComponent(saved.id)}`;
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 401) return;
      showErrors(form, exc.message, exc.details);
    } finally {
      submit.disabled = false;
    }
  });
  fill(main, form);
  (connectorSelect.disabled ? form.elements.name : connectorSelect)?.focus();
}

// -- a connection's page ------------------------------------------------------------------

function configList(config, prefix = "") {
  const rows = [];
  for (const [key, value] of Object.entries(config || {})) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      const inner = configList(value, `${prefix}${key}.`);
      if (inner.length) rows.push(...inner);
      else rows.push(h("dt", {}, `${prefix}${key}`), h("dd.muted", {}, "(empty)"));
    } else {
      rows.push(h("dt", {}, `${prefix}${key}`), h("dd.mono", {}, value === null ? "" : typeof value === "string" ? value : JSON.stringify(value)));
    }
  }
  return rows;
}

function withoutReadOnly(connection) {
  return Object.fromEntries(Object.entries(connection).filter(([k]) => !READ_ONLY.includes(k)));
}

/** A table with a header row; `rows` are arrays of cells. */
function table(headers, rows, empty = "Nothing here.") {
  if (!rows.length) return h("p.muted", {}, empty);
  return h(
    "div.table-wrap",
    {},
    h("table", {}, h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))), h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c)))))),
  );
}

/** Prev / next for a paginated list; `load(n)` draws page n. */
function pager(state, load, label) {
  return h(
    "div.pager",
    { role: "navigation", "aria-label": label },
    h("button.secondary", { type: "button", disabled: state.page <= 1, onclick: () => load(state.page - 1) }, "Newer"),
    h("span", {}, `Page ${state.page} of ${Math.max(1, state.pages)} (${state.total})`),
    h("button.secondary", { type: "button", disabled: state.page >= state.pages, onclick: () => load(state.page + 1) }, "Older"),
  );
}

export async function connectionPage(main, id) {
  const path = `/connections/${encodeURIComponent(id)}`;
  let connection = await get(path);
  const summary = h("section.card", { "aria-labelledby": "sum-title" });
  const configBox = h("section.card", { "aria-labelledby": "cfg-title" });
  const devicesBox = h("section.card", { "aria-labelledby": "dev-title" });
  const eventsBox = h("section.card", { "aria-labelledby": "evt-title" });
  const lettersBox = h("section.card", { "aria-labelledby": "dl-title" });
  const replayBox = h("section.card", { "aria-labelledby": "rp-title" });
  const alarmsBox = h("section.card", { "aria-labelledby": "al-title" });
  const writable = me.can("writer") && !connection.provisioned;

  const drawSummary = () => {
    record(connection.id, connection.statistics);
    fill(
      summary,
      h("h2", { id: "sum-title" }, "State and statistics"),
      h("div.row", {}, badge(connection.state), h("span.muted", {}, connection.startupTime ? `since ${when(connection.startupTime)}` : "")),
      statistics(connection.statistics),
      lastError(connection.statistics),
      connection.statistics.lastDeliveryTime ? h("p.muted", {}, `Last delivery: ${when(connection.statistics.lastDeliveryTime)}`) : null,
      chart(connection.id),
    );
    fill(
      alarmsBox,
      h("h2", { id: "al-title" }, "Alarms"),
      table(
        ["#", "message", "min per hour", "state", "rate", "since"],
        (connection.alarms || []).map((alarm, i) => {
          const status = (connection.alarmStates || []).find((s) => s.alarm === i) || {};
          return [String(i), alarm.message || "", String(alarm.uplinkRateMinPerHour ?? ""), status.state ? badge(status.state) : "", status.rate ?? "", when(status.since)];
        }),
        "No alarm.",
      ),
    );
  };
  const drawConfig = () => {
    fill(
      configBox,
      h("h2", { id: "cfg-title" }, "Configuration"),
      h(
        "dl.config",
        {},
        h("dt", {}, "connectorId"),
        h("dd.mono", {}, connection.connectorId),
        connection.brand ? [h("dt", {}, "brand"), h("dd.mono", {}, connection.brand)] : null,
        h("dt", {}, "active"),
        h("dd.mono", {}, String(connection.active)),
        configList(connection.configuration, "configuration."),
      ),
    );
  };

  const toggle = async () => {
    const body = { ...withoutReadOnly(connection), active: !connection.active };
    try {
      const { body: saved } = await call("PUT", path, body);
      connection = saved;
      toast(saved.active ? "Connection activated." : "Connection deactivated.");
      drawHeader();
      drawSummary();
      drawConfig();
    } catch (exc) {
      if (exc.status !== 401) toast(exc.message, "error");
    }
  };
  const remove = async () => {
    if (!(await confirmDialog(`Delete the connection ${connection.name}? Its pending deliveries are dropped.`, "Delete"))) return;
    try {
      await call("DELETE", path);
      toast(`Connection ${connection.name} deleted.`);
      location.hash = "#/connections";
    } catch (exc) {
      if (exc.status !== 401) toast(exc.message, "error");
    }
  };
  const header = h("div");
  const drawHeader = () =>
    fill(
      header,
      h("h1", {}, connection.name),
      h("p.muted.mono", {}, connection.id),
      connection.provisioned ? h("p.muted", {}, "Provisioned by the config file: read-only here.") : null,
      writable
        ? h(
            "div.actions",
            {},
            h("a.button", { href: `#${path}/edit` }, "Edit"),
            h("button.secondary", { type: "button", onclick: toggle }, connection.active ? "Deactivate" : "Activate"),
            h("button.danger", { type: "button", onclick: remove }, "Delete"),
          )
        : null,
    );

  // Devices: the bindings of this connection, bound and unbound one DevEUI at a time.
  const drawDevices = async () => {
    const devices = await all(`/devices?connectionId=${encodeURIComponent(id)}`);
    const form = h(
      "form.row",
      { novalidate: true },
      field({ label: "DevEUI to bind", name: "devEUI", help: "16 hex digits; '-' or ':' separators and lower case are accepted." }),
      h("button", { type: "submit" }, "Bind"),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const given = form.elements.devEUI.value.trim();
      try {
        let others = [];
        try {
          others = (await get(`/devices/${encodeURIComponent(given)}`)).connections;
        } catch (exc) {
          if (exc.status !== 404) throw exc;
        }
        const { body } = await call("PUT", `/devices/${encodeURIComponent(given)}`, { connections: [...new Set([...others, id])] });
        toast(`Device ${body.devEUI} bound.`);
        await drawDevices();
      } catch (exc) {
        if (exc.status === 401) return;
        showErrors(form, exc.message, exc.details.map((d) => ({ ...d, path: d.path === "devEUI" || d.path === "path.devEUI" ? "devEUI" : d.path })));
      }
    });
    const unbind = async (device) => {
      const rest = device.connections.filter((c) => c !== id);
      try {
        if (rest.length) await call("PUT", `/devices/${device.devEUI}`, { connections: rest });
        else await call("DELETE", `/devices/${device.devEUI}`);
        toast(`Device ${device.devEUI} unbound.`);
        await drawDevices();
      } catch (exc) {
        if (exc.status !== 401) toast(exc.message, "error");
      }
    };
    fill(
      devicesBox,
      h("h2", { id: "dev-title" }, "Devices"),
      table(
        ["DevEUI", "connections", ""],
        devices.map((d) => [
          h("span.mono", {}, d.devEUI),
          d.connections.join(", "),
          writable ? h("button.secondary", { type: "button", onclick: () => unbind(d), "aria-label": `Unbind ${d.devEUI}` }, "Unbind") : "",
        ]),
        "No device bound (flows may still route uplinks here).",
      ),
      writable ? form : null,
    );
  };

  let eventsPage = 1;
  const drawEvents = async (n = eventsPage) => {
    const state = await page(`${path}/events`, n, 10);
    eventsPage = state.page;
    fill(
      eventsBox,
      h("h2", { id: "evt-title" }, "Event log"),
      table(
        ["time", "event", "details"],
        state.items.map((e) => [when(e.time), e.type, h("span.mono", {}, JSON.stringify(e.details))]),
        "No event yet.",
      ),
      pager(state, drawEvents, "Event log pages"),
    );
  };

  await Promise.all([drawDevices(), drawEvents()]);
  drawHeader();
  drawSummary();
  drawConfig();
  const refreshLetters = await drawLetters(lettersBox, path);
  drawReplays(replayBox, path);
  fill(main, header, summary, configBox, devicesBox, lettersBox, replayBox, eventsBox, alarmsBox);
  return every(async () => {
    connection = await get(path);
    drawSummary();
    await refreshLetters();
    // The newest events as they come, unless the operator is reading an older page.
    if (eventsPage === 1) await drawEvents(1);
  });
}

// -- dead letters and replays (DESIGN.md "Dead letters and replay") -----------------------

async function drawLetters(box, path) {
  const filters = h(
    "form.row",
    { novalidate: true, "aria-label": "Filter dead letters" },
    field({ label: "Outcome", name: "outcome", type: "select", options: [["", "any"], ["failed", "failed"], ["expired", "expired"]] }),
    field({ label: "Dead letters of the DevEUI", name: "devEUI" }),
    h("button.secondary", { type: "submit" }, "Filter"),
  );
  const listing = h("div");
  const query = () => {
    const params = new URLSearchParams();
    if (filters.elements.outcome.value) params.set("outcome", filters.elements.outcome.value);
    if (filters.elements.devEUI.value.trim()) params.set("devEUI", filters.elements.devEUI.value.trim());
    return params;
  };
  const resend = async (body, what) => {
    try {
      const { body: answer } = await call("POST", `${path}/deadLetters/resend`, body);
      toast(`${answer.resent} dead letter(s) re-sent${what}.`);
      await load(1);
    } catch (exc) {
      if (exc.status !== 401) toast(exc.message, "error");
    }
  };
  const show = async (letter) => {
    try {
      const one = await get(`${path}/deadLetters/${encodeURIComponent(letter.id)}`);
      const dialog = h("dialog", { "aria-label": `Dead letter ${letter.id}` });
      dialog.append(
        h("h2", {}, `Dead letter ${letter.id}`),
        h("pre", {}, JSON.stringify(one, null, 2)),
        h("div.actions", {}, h("button", { type: "button", onclick: () => dialog.close() }, "Close")),
      );
      dialog.addEventListener("close", () => dialog.remove());
      document.body.append(dialog);
      dialog.showModal();
    } catch (exc) {
      if (exc.status !== 401) toast(exc.message, "error");
    }
  };
  let shown = 1;
  let seen = "";
  const load = async (n = 1, onlyIfChanged = false) => {
    let state;
    try {
      state = await page(`${path}/deadLetters?${query()}`, n, 10);
    } catch (exc) {
      if (exc.status === 401) throw exc;
      fill(listing, h("p.muted", {}, `Dead letters unavailable: ${exc.message}`));
      return;
    }
    // A refresh redraws only what changed: the focus stays where the operator put it.
    const signature = JSON.stringify([state.items, state.total, state.page]);
    if (onlyIfChanged && signature === seen) return;
    seen = signature;
    shown = state.page;
    const filter = Object.fromEntries(query());
    fill(
      listing,
      table(
        ["time", "DevEUI", "outcome", "reason", "attempts", ""],
        state.items.map((l) => [
          when(l.time),
          h("span.mono", {}, l.devEUI),
          l.outcome,
          [
            l.reason,
            l.status && !String(l.reason).includes(String(l.status)) ? ` (HTTP ${l.status})` : "",
            l.body ? h("div.muted.mono", {}, l.body.length > 160 ? `${l.body.slice(0, 160)}…` : l.body) : null,
          ],
          String(l.attempts),
          h(
            "div.row",
            {},
            h("button.secondary", { type: "button", onclick: () => show(l), "aria-label": `Show dead letter ${l.id}` }, "Show"),
            me.can("writer") ? h("button.secondary", { type: "button", onclick: () => resend({ ids: [l.id] }, ""), "aria-label": `Re-send dead letter ${l.id}` }, "Re-send") : null,
          ),
        ]),
        "No dead letter.",
      ),
      pager(state, load, "Dead letter pages"),
      h(
        "div.actions",
        {},
        me.can("writer") && state.total ? h("button", { type: "button", onclick: () => resend({ all: true, ...filter }, " (all that match)") }, "Re-send all that match") : null,
        me.can("owner") && state.total
          ? h(
              "button.danger",
              {
                type: "button",
                onclick: async () => {
                  if (!(await confirmDialog(`Purge the ${state.total} dead letter(s) that match?`, "Purge"))) return;
                  try {
                    await call("DELETE", `${path}/deadLetters?${query()}`);
                    toast("Dead letters purged.");
                    await load(1);
                  } catch (exc) {
                    if (exc.status !== 401) toast(exc.message, "error");
                  }
                },
              },
              "Purge all that match",
            )
          : null,
      ),
    );
  };
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    load(1);
  });
  fill(box, h("h2", { id: "dl-title" }, "Dead letters"), filters, listing);
  await load(1);
  return () => load(shown, true);
}

/** "2026-12-06T10:00" (datetime-local, the browser's zone) → ISO 8601 with offset. */
function isoOf(local) {
  const date = new Date(local);
  return Number.isNaN(date.getTime()) ? local : date.toISOString();
}

function localOf(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

function drawReplays(box, path) {
  const title = h("h2", { id: "rp-title" }, "Replays");
  if (!me.can("owner")) {
    fill(box, title, h("p.muted", {}, "Starting a replay needs a token of role owner."));
    return;
  }
  const now = new Date();
  const form = h(
    "form",
    { novalidate: true, "aria-label": "Start a replay" },
    h("p.muted", {}, "Send the journal's uplinks of a window again to this connection."),
    field({ label: "From", name: "from", type: "datetime-local", required: true, value: localOf(new Date(now - 3600_000)) }),
    field({ label: "To", name: "to", type: "datetime-local", required: true, value: localOf(new Date(now.getTime() + 60_000)) }),
    field({ label: "DevEUIs", name: "devEUIs", help: "Optional, separated by spaces or commas: by default the devices routed here now." }),
    h("div.actions", {}, h("button", { type: "submit" }, "Start replay")),
  );
  const follow = h("div", { "aria-live": "polite" });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const body = { from: isoOf(form.elements.from.value), to: isoOf(form.elements.to.value) };
    const devices = form.elements.devEUIs.value.split(/[\s,]+/).filter(Boolean);
    if (devices.length) body.devEUIs = devices;
    try {
      const { body: started } = await call("POST", `${path}/replay`, body);
      toast(`Replay started: ${started.uplinks} uplink(s).`);
      track(follow, started.id);
    } catch (exc) {
      if (exc.status !== 401) showErrors(form, exc.message, exc.details);
    }
  });
  fill(box, title, form, follow);
}

/** Follow a replay until it is done or cancelled. */
function track(box, replayId) {
  const where = `/replays/${encodeURIComponent(replayId)}`;
  const row = h("div.card", { "data-replay": replayId });
  box.prepend(row);
  const draw = (r) => {
    fill(
      row,
      h("div.row", {}, h("strong", {}, `Replay ${r.id}`), badge(r.state)),
      h("p", {}, `${r.delivered} delivered, ${r.pending} pending, ${r.failed} failed, ${r.expired} expired, of ${r.total}`),
      r.state === "running"
        ? h(
            "button.danger",
            {
              type: "button",
              onclick: async () => {
                try {
                  await call("DELETE", where);
                  toast("Replay cancelled.");
                } catch (exc) {
                  if (exc.status !== 401) toast(exc.message, "error");
                }
              },
            },
            "Cancel replay",
          )
        : null,
    );
  };
  const poll = async () => {
    if (!row.isConnected) return;
    try {
      const r = await get(where);
      draw(r);
      if (r.state === "running") setTimeout(poll, POLL_MS);
    } catch (exc) {
      if (exc.status !== 401) fill(row, h("p.form-error", {}, exc.message));
    }
  };
  poll();
}

export { MASK };
