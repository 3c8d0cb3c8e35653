"""The web console's files (docs/console.md): static, from the package, under a strict
Content-Security-Policy. Loading them needs no token; every API call they make does."""

from __future__ import annotations

import functools
from importlib.resources import files

from aiohttp import web

from iotflow.api.errors import ApiError
from iotflow.api.table import Answer, Auth, Param, RouteTable

CONSOLE = "/console/"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Only our own files; no inline script or style, no other origin, never in a frame.
CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    # The files change with the package; the browser asks again rather than guess.
    "Cache-Control": "no-cache",
}


@functools.cache
def console_files() -> dict[str, tuple[bytes, str]]:
    """Name → (content, type) of every file of the console, read once. A request names one
    of these or gets 404: no path is ever joined to a directory."""
    found: dict[str, tuple[bytes, str]] = {}
    root = files("iotflow") / "console"
    for entry in root.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            found[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return found


console_routes = RouteTable()
_FILE = Answer(
    "A file of the console (HTML, CSS, JavaScript or SVG)",
    media_type="text/html",
    schema={"type": "string"},
)
_TO_CONSOLE = Answer("To the console", headers=(("Location", CONSOLE),))


@console_routes.route(
    "GET",
    "/",
    summary="The web console is at /console/",
    auth=Auth.OPEN,
    answers={302: _TO_CONSOLE},
)
async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound(CONSOLE)


@console_routes.route(
    "GET", "/console", summary="The web console", auth=Auth.OPEN, answers={302: _TO_CONSOLE}
)
async def console_bare(request: web.Request) -> web.Response:
    raise web.HTTPFound(CONSOLE)


@console_routes.route(
    "GET",
    CONSOLE,
    summary="The web console (docs/console.md); loading it needs no token, its calls do",
    auth=Auth.OPEN,
    answers={200: _FILE},
)
async def console_index(request: web.Request) -> web.Response:
    return _file("index.html")


@console_routes.route(
    "GET",
    CONSOLE + "{name}",
    summary="A file of the web console",
    auth=Auth.OPEN,
    parameters=[Param("name", "path", {"type": "string"}, required=True)],
    answers={200: _FILE, 404: Answer("No such file")},
)
async def console_file(request: web.Request) -> web.Response:
    return _file(request.match_info["name"])


def _file(name: str) -> web.Response:
    found = console_files().get(name)
    if found is None:
        raise ApiError(404, "not_found", "No such file of the console.")
    body, content_type = found
    return web.Response(body=body, headers={"Content-Type": content_type, **HEADERS})
