"""Connector plugins for tests: the example package installed with pip into a directory of
its own (the shared venv is not changed), and hand-made broken distributions.

A daemon sees them through `PYTHONPATH`; the test process loads them through
`iotflow.connectors.catalog.load_connectors` over exactly their entry points, so that its
own catalog (the installed built-ins) stays as it is.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import EntryPoint, distributions
from pathlib import Path

from iotflow.connectors.catalog import GROUP, Connector, load_connectors

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "acme-echo"


@functools.cache
def installed_example() -> Path:
    """`pip install` of examples/acme-echo into a fresh directory (once per test run).

    pip builds from a copy, so that setuptools' build/ and egg-info/ do not land in the
    checkout.
    """
    root = Path(tempfile.mkdtemp(prefix="iotflow-plugin-"))
    source = root / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def entry_points_in(path: Path) -> list[EntryPoint]:
    """The `iotflow.connectors` entry points of the distributions found in `path`."""
    return [
        point
        for dist in distributions(path=[str(path)])
        for point in dist.entry_points
        if point.group == GROUP
    ]


@contextlib.contextmanager
def importable(path: Path) -> Iterator[None]:
    """`path` on sys.path while plugins are imported from it (their modules stay loaded)."""
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))


def load_from(path: Path) -> dict[str, Connector]:
    with importable(path):
        return load_connectors(entry_points_in(path))


@functools.cache
def example_connector() -> Connector:
    return load_from(installed_example())["acme-echo"]


def fake_distribution(
    site: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """A distribution as pip would leave it (dist-info with METADATA and entry_points.txt),
    with its modules, written by hand: enough for importlib.metadata to find it."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = [f"[{GROUP}]", *(f"{key} = {value}" for key, value in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, text in modules.items():
        (site / f"{module}.py").write_text(text)


BROKEN_PLUGINS: dict[str, str] = {
    # entry point name → why it must be left out
    "acme-broken-import": "ModuleNotFoundError",
    "acme-raising-import": "RuntimeError: the plugin's own bug",
    "acme-not-a-connector": "names a str",
    "actility-http-iot": "already registered",
    "acme-wrong-id": "names connector 'acme-other'",
    "acme-missing-object": "AttributeError",
    "acme-bad-configuration": "not a ConnectorConfiguration subclass",
}


def broken_plugins(site: Path) -> Path:
    """One distribution with every kind of broken entry point (see BROKEN_PLUGINS)."""
    fake_distribution(
        site,
        "acme-broken",
        {
            "acme-broken-import": "acme_broken_import:CONNECTOR",
            "acme-raising-import": "acme_raising_import:CONNECTOR",
            "acme-not-a-connector": "acme_broken_objects:NOT_A_CONNECTOR",
            "actility-http-iot": "acme_broken_objects:TAKES_HTTP",
            "acme-wrong-id": "acme_broken_objects:WRONG_ID",
            "acme-missing-object": "acme_broken_objects:MISSING",
            "acme-bad-configuration": "acme_broken_objects:BAD_CONFIGURATION",
        },
        {
            "acme_broken_import": "import acme_module_that_does_not_exist  # noqa\n",
            "acme_raising_import": 'raise RuntimeError("the plugin\'s own bug")\n',
            "acme_broken_objects": (
                "from iotflow.plugin import Connector, ConnectorConfiguration\n"
                "NOT_A_CONNECTOR = 'oops'\n"
                "def _sink(connection, context):\n"
                "    raise RuntimeError('never made')\n"
                "TAKES_HTTP = Connector(id='actility-http-iot', description='impostor',"
                " version='6.6.6', configuration=ConnectorConfiguration, create_sink=_sink)\n"
                "WRONG_ID = Connector(id='acme-other', description='x', version='1',"
                " configuration=ConnectorConfiguration, create_sink=_sink)\n"
                "BAD_CONFIGURATION = Connector(id='acme-bad-configuration', description='x',"
                " version='1', configuration=dict, create_sink=_sink)\n"
            ),
        },
    )
    return site
