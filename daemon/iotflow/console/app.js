// The console's entry point: sign in, the sections, and a router on the URL's fragment
// (#/connections/...). The fragment names pages only: never a token, never a secret.

import { ApiError, call, me, session } from "./api.js";
import { fill, h, toast } from "./dom.js";
import { connectionPage, connectionForm, connectionsList } from "./connections.js";
import { alarmsPage, driversPage, flowForm, flowsList } from "./pages.js";

const main = document.getElementById("main");
let stopCurrent = () => {};

const routes = [
  [/^\/connections$/, () => connectionsList(main)],
  [/^\/connections\/new$/, () => connectionForm(main)],
  [/^\/connections\/([^/]+)\/edit$/, (id) => connectionForm(main, id)],
  [/^\/connections\/([^/]+)$/, (id) => connectionPage(main, id)],
  [/^\/flows$/, () => flowsList(main)],
  [/^\/flows\/new$/, () => flowForm(main)],
  [/^\/flows\/([^/]+)$/, (id) => flowForm(main, id)],
  [/^\/drivers$/, () => driversPage(main)],
  [/^\/alarms$/, () => alarmsPage(main)],
];

function signedIn(visible) {
  for (const id of ["nav", "who", "signout"]) document.getElementById(id).hidden = !visible;
}

/** The sign-in page; `message` says why it is shown again. */
function signIn(message) {
  stopCurrent();
  stopCurrent = () => {};
  signedIn(false);
  const status = h("p.form-error", { role: "alert", id: "signin-error" }, message || "");
  if (!message) status.hidden = true;
  const form = h(
    "form.card.signin",
    { novalidate: true, "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("p.muted", {}, "With an API token of the daemon ([api] tokens). It is kept for this tab only."),
    status,
    h("label", { for: "token" }, "API token"),
    h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true }),
    h("div.actions", {}, h("button", { type: "submit" }, "Sign in")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = form.elements.token.value.trim();
    if (!token) {
      fill(status, "Type a token.");
      status.hidden = false;
      return;
    }
    // A header carries ASCII only: anything else cannot be a token (and fetch
    // would refuse to send it).
    if (!/^[\x20-\x7e]+$/.test(token)) {
      fill(status, "This token is not valid: a token is made of ASCII letters, digits and symbols.");
      status.hidden = false;
      return;
    }
    try {
      const { body } = await call("GET", "/whoami", undefined, token);
      session.set(token);
      start(body);
    } catch (exc) {
      const text =
        exc instanceof ApiError && exc.status === 401
          ? "This token is not valid: the daemon refused it."
          : `Cannot sign in: ${exc.message}`;
      fill(status, text);
      status.hidden = false;
      form.elements.token.focus();
    }
  });
  fill(main, form);
  form.elements.token.focus();
}

function start(who) {
  me.set(who);
  fill(document.getElementById("who"), `${who.name} (${who.role})`);
  signedIn(true);
  if (!location.hash || location.hash === "#/" || location.hash === "#") {
    location.hash = "#/connections";
  } else {
    route();
  }
}

async function route() {
  if (!session.token()) {
    signIn();
    return;
  }
  stopCurrent();
  stopCurrent = () => {};
  const path = decodeURIComponent(location.hash.replace(/^#/, "")) || "/connections";
  for (const link of document.querySelectorAll("#nav a")) {
    const here = path.startsWith(link.getAttribute("href").slice(1));
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const [pattern, render] of routes) {
    const match = pattern.exec(path);
    if (!match) continue;
    fill(main, h("p.muted", {}, "Loading…"));
    try {
      stopCurrent = (await render(...match.slice(1))) || (() => {});
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 401) return; // signed out already
      fill(main, h("h1", {}, "Something went wrong"), h("p.form-error", { role: "alert" }, exc.message));
    }
    main.focus();
    return;
  }
  fill(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/connections" }, "Connections")));
}

session.whenSignedOut((message) => signIn(message));
document.getElementById("signout").addEventListener("click", () => {
  session.clear();
  toast("Signed out.");
  signIn();
});
window.addEventListener("hashchange", route);

async function boot() {
  const token = session.token();
  if (!token) {
    signIn();
    return;
  }
  try {
    const { body } = await call("GET", "/whoami");
    start(body);
  } catch (exc) {
    if (!(exc instanceof ApiError && exc.status === 401)) signIn(`Cannot reach the daemon: ${exc.message}`);
  }
}

boot();
