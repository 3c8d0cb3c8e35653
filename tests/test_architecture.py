"""The shape of the code: the API depends on a control-plane protocol, not on the daemon;
no module imports itself back through others; one logger naming scheme; the document
describes exactly the routes that are served."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from iotflow.api.control import ControlPlane
from iotflow.api.server import TABLE, create_app, openapi_document
from iotflow.app import Daemon
from iotflow.config.load import load_settings
from iotflow.formats.fields import DEV_EUI_PATTERN, normalize_dev_eui
from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto

PACKAGE = Path(__file__).resolve().parents[1] / "daemon" / "iotflow"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, *, with_type_checking: bool) -> set[str]:
    """The iotflow modules `path` imports, at any depth of its code (a function's local
    import counts: it runs too)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    skipped: set[int] = set()
    if not with_type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _type_checking(node):
                skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def graph(*, with_type_checking: bool) -> dict[str, set[str]]:
    return {
        module_name(p): imports(p, with_type_checking=with_type_checking)
        for p in PACKAGE.rglob("*.py")
    }


def cycles_through(edges: dict[str, set[str]], roots: set[str]) -> list[list[str]]:
    """Import cycles that pass through one of `roots` (a path back to where it started)."""
    found = []
    for root in sorted(roots):
        stack = [(root, [root])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                # A package's own __init__ re-exporting its modules is not a cycle of ours.
                if nxt == root and not root.startswith(node + "."):
                    found.append([*path, nxt])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


API = {"iotflow.api", "iotflow.ingest"}


def _in_api(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in API)


def test_nothing_of_the_api_imports_the_daemon() -> None:
    edges = graph(with_type_checking=True)  # not even for type checking
    offenders = {m: i for m, i in edges.items() if _in_api(m) and "iotflow.app" in i}
    assert offenders == {}


def test_no_import_cycle_through_the_api_or_the_daemon() -> None:
    edges = graph(with_type_checking=True)
    roots = {m for m in edges if _in_api(m)} | {"iotflow.app"}
    assert cycles_through(edges, roots) == []


def test_the_api_loads_without_the_daemon() -> None:
    code = (
        "import sys, iotflow.api.server, iotflow.ingest.http;"
        "assert 'iotflow.app' not in sys.modules, 'iotflow.app was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(PACKAGE.parent)},
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_daemon_is_a_control_plane() -> None:
    """mypy checks it (`create_app(self)` in Daemon.start); this says it at run time too."""
    from iotflow.config.load import Settings
    from iotflow.config.model import Config

    daemon = Daemon(Settings("iotflow.toml", Config()))
    members = [name for name in vars(ControlPlane) if not name.startswith("_")]
    assert {"registry", "config", "worker", "refresh", "readiness", "accept"} <= set(members)
    # The registry is a property that raises until it is open: looked up on the class.
    missing = [n for n in members if not hasattr(Daemon, n) and not hasattr(daemon, n)]
    assert missing == []
    assert daemon.worker("nothing") is None
    assert daemon.alarm_states("nothing") == []


# -- lifecycle ------------------------------------------------------------------------------

# What start opens, in order; shutdown closes it in reverse.
STARTED = [
    "registry",
    "events",
    "alarms",
    "directory",
    "drivers",
    "spool",
    "deliveries",
    "transitions",
    "recovery",  # dead letters and replays: resumes replays once the workers run
    "registry-changes",
    "fleet",
    "api",
    "source",
    "systemd-ready",
]


def _layout(tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud) -> DaemonProcess:
    """The config of a daemon with one connection; the daemon runs in this process."""
    return DaemonProcess(
        tmp_path / "lifecycle",
        broker_url=mosquitto.url,
        connections=[
            {
                "id": "c1",
                "name": "c1",
                "connectorId": "actility-http-iot",
                "devices": ["0018B20000000C01"],
                "configuration": {"destinationURL": cloud.url("/c1")},
            }
        ],
    )


async def test_shutdown_closes_what_start_opened_in_reverse(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    layout = _layout(tmp_path, mosquitto, cloud)
    daemon = Daemon(load_settings(layout.config_path, env={}))
    await daemon.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{layout.api}/healthz") as answer,
        ):
            assert answer.status == 200
    finally:
        code = await daemon.shutdown()
    assert code == 0
    assert daemon.closed == list(reversed(STARTED))
    # The API writes through the spool, the workers too: both are gone before it closes.
    closed = daemon.closed
    assert closed.index("api") < closed.index("deliveries") < closed.index("spool")
    assert await daemon.shutdown() == 0  # a second shutdown closes nothing twice
    assert daemon.closed == list(reversed(STARTED))


async def test_a_close_that_fails_does_not_keep_the_others_open(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    layout = _layout(tmp_path, mosquitto, cloud)
    daemon = Daemon(load_settings(layout.config_path, env={}))
    await daemon.start()

    async def broken() -> None:
        raise OSError("No space left on device")

    # A resource opened after the source: the first to close, and it fails.
    daemon._closing("broken", broken)
    with capture_logs() as logs:
        code = await daemon.shutdown()
    assert code == 1
    assert daemon.closed == ["broken", *reversed(STARTED)]
    failed = [e for e in logs if e["event"] == "Shutdown step failed"]
    assert [(e["step"], e["error"]) for e in failed] == [("broken", "No space left on device")]
    assert [e["failed"] for e in logs if e["event"] == "Stopped with errors"] == [["broken"]]


# -- the document and the router come from one table ---------------------------------------


def _served(app: web.Application) -> set[tuple[str, str]]:
    served = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is not None and route.method != "HEAD":
            served.add((route.method, resource.canonical))
    return served


class _Nothing:
    """Just enough of a control plane to build the application (no request is made)."""

    class config:
        class api:
            tokens: tuple[object, ...] = ()
            max_body_bytes = 1024


def test_the_document_describes_exactly_the_routes_served() -> None:
    app = create_app(_Nothing())  # type: ignore[arg-type]
    documented = {
        (method.upper(), path)
        for path, operations in openapi_document()["paths"].items()
        for method in operations
    }
    assert documented == _served(app)
    for must in ("/healthz", "/readyz", "/metrics", "/iot-flow/v1/ingest/{ingestId}"):
        assert must in openapi_document()["paths"]


def test_every_model_a_route_names_is_in_the_document() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for route in TABLE:
        for model in (route.request, *(a.model for a in route.answers.values())):
            if model is not None:
                assert any(
                    s.get("title") == (model.model_config.get("title") or model.__name__)
                    for s in schemas.values()
                ), model


def test_routes_not_under_the_bearer_token_are_the_exempt_ones() -> None:
    document = openapi_document()
    open_paths = {
        path
        for path, operations in document["paths"].items()
        for operation in operations.values()
        if operation.get("security") is not None
        and operation["security"] != [{"bearer": []}]
        and path.startswith("/iot-flow/")
    }
    assert open_paths == TABLE.exempt()


# -- one logger naming scheme ----------------------------------------------------------------


def logger_names() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute | ast.Name)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "get_logger"
                and node.args
            ):
                arg = node.args[0]
                value = arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg)
                names.setdefault(module_name(path), []).append(str(value))
    return names


def test_every_module_logs_as_iotflow_dot_its_package() -> None:
    wrong = {}
    for module, names in logger_names().items():
        expected = ".".join(module.split(".")[:2])  # iotflow.<package> (or .<module>)
        bad = [n for n in names if n not in (expected, "name")]
        if bad:
            wrong[module] = (bad, expected)
    assert wrong == {}


# -- the document's patterns are the runtime's -----------------------------------------------


@given(st.text(alphabet="0123456789abcdefABCDEFgG-: \n", max_size=24))
def test_the_documented_dev_eui_pattern_is_what_normalize_accepts(text: str) -> None:
    """`normalize_dev_eui` checks with the pattern the document shows; it accepts what it
    accepted before: 16 hex digits once '-' and ':' are removed."""
    digits = text.replace("-", "").replace(":", "")
    before = len(digits) == 16 and all(c in "0123456789abcdefABCDEF" for c in digits)
    assert (re.fullmatch(DEV_EUI_PATTERN, text) is not None) == before
    try:
        assert normalize_dev_eui(text) == digits.upper()
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == before
