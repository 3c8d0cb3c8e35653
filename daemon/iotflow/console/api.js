// The public API, with the token of this tab (sessionStorage: never in a URL, gone with the tab).

const BASE = "/iot-flow/v1";
const KEY = "iotflow.token";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.code || "http_error";
    this.details = Array.isArray(body?.details) ? body.details : [];
  }
}

let onSignedOut = () => {};

export const session = {
  token: () => sessionStorage.getItem(KEY),
  set(token) {
    sessionStorage.setItem(KEY, token);
  },
  clear() {
    sessionStorage.removeItem(KEY);
  },
  whenSignedOut(handler) {
    onSignedOut = handler;
  },
};

/** Call the API; resolves {body, headers}; rejects with ApiError. A 401 signs the tab out. */
export async function call(method, path, body, token = session.token()) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`${BASE}${path}`, init);
  } catch (exc) {
    throw new ApiError(0, { code: "unreachable", message: "The daemon does not answer." });
  }
  const text = await response.text();
  let parsed = null;
  if (text) {
    try {
      parsed = JSON.parse(text);
    } catch (exc) {
      parsed = { message: text.slice(0, 200) };
    }
  }
  if (!response.ok) {
    const error = new ApiError(response.status, parsed);
    if (response.status === 401 && token === session.token()) {
      session.clear();
      onSignedOut("Signed out: the API refused the token.");
    }
    throw error;
  }
  return { body: parsed, headers: response.headers };
}

export const get = (path) => call("GET", path).then((r) => r.body);

/** One page of a paginated list: {items, page, pages, total}. */
export async function page(path, number = 1, perPage = 20) {
  const sep = path.includes("?") ? "&" : "?";
  const { body, headers } = await call("GET", `${path}${sep}page=${number}&perPage=${perPage}`);
  return {
    items: body || [],
    page: Number(headers.get("X-Page") || number),
    pages: Number(headers.get("X-Total-Pages") || 1),
    total: Number(headers.get("X-Total") || (body || []).length),
  };
}

/** Every page of a paginated list. */
export async function all(path) {
  const first = await page(path, 1, 100);
  const items = [...first.items];
  for (let n = 2; n <= first.pages; n += 1) items.push(...(await page(path, n, 100)).items);
  return items;
}

const ROLES = ["reader", "writer", "owner"];
let role = "reader";
let name = "";

export const me = {
  set(who) {
    role = who.role;
    name = who.name;
  },
  get name() {
    return name;
  },
  get role() {
    return role;
  },
  /** May the signed-in token do what needs `needed`? */
  can(needed) {
    return ROLES.indexOf(role) >= ROLES.indexOf(needed);
  },
};
