"""Command line: `iotflow run | check | migrate [-c PATH]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from iotflow import __version__
from iotflow.config.load import Settings, default_source, load_settings
from iotflow.errors import ConfigError
from iotflow.telemetry import logging as logs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iotflow", description="Route LoRaWAN uplinks from MQTT to cloud platforms."
    )
    parser.add_argument("--version", action="version", version=f"iotflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run in the foreground until SIGTERM; SIGHUP reloads the config"),
        ("check", "validate the config file and its provisioned connections"),
        ("migrate", "apply the registry's migrations"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "-c",
            "--config",
            default=None,
            help="config file (default: $IOTFLOW_CONFIG, else /etc/iotflow/iotflow.toml)",
        )
    return parser


def _load(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


async def _migrate(settings: Settings) -> int:
    from iotflow.registry import open_registry

    store = open_registry(settings.config)
    try:
        version = await store.migrate()
    finally:
        await store.close()
    print(f"registry at schema version {version}")
    return 0


def _run(path: str, why: str | None) -> int:
    """The daemon: from its first line on, everything it prints is one JSON object a line."""
    logs.configure()  # the file's [log] takes over once it is read
    log = logs.get_logger("iotflow.cli")
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        log.error(
            "Invalid configuration; not starting",
            config=path,
            **({"config_source": why} if why else {}),
            problems=[str(p) for p in exc.problems],
        )
        return 1
    from iotflow.app import run

    try:
        return asyncio.run(run(settings))
    except Exception as exc:
        # A bug: one line still, with the traceback in its `exception` field.
        log.exception("iotflow crashed", error=f"{type(exc).__name__}: {exc}")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    why: str | None = None
    if args.config:
        path = args.config
    else:
        path, why = default_source()
    if args.command == "run":
        return _run(path, why)
    # check and migrate speak to a person: plain text, and only warnings from the libraries.
    logs.configure("warning", "console")
    if why is not None:
        # Say which file, or a missing /etc/iotflow/iotflow.toml is a riddle.
        print(f"config: {path} ({why})", file=sys.stderr)
    settings = _load(path)
    if settings is None:
        return 1
    if args.command == "check":
        print(
            f"{path}: OK ({len(settings.connections)} provisioned connections,"
            f" {len(settings.flows)} provisioned flows)"
        )
        return 0
    return asyncio.run(_migrate(settings))
