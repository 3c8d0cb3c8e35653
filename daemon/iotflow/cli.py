"""Command line: `iotflow run | check | migrate [-c PATH]`, `iotflow drivers test ID HEX`,
`iotflow deadletters list|show|resend|purge CONNECTION`, `iotflow replay CONNECTION`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from iotflow import __version__, remote
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
    drivers = commands.add_parser("drivers", help="try the payload drivers of [drivers] path")
    actions = drivers.add_subparsers(dest="action", required=True)
    test = actions.add_parser("test", help="decode a payload with a driver; exit 1 on error")
    test.add_argument("id", help="producer:module:version")
    test.add_argument("hex", help="the payload, in hexadecimal")
    test.add_argument("--fport", type=int, default=None, help="the uplink's FPort")
    test.add_argument("-c", "--config", default=None, help="config file (as for run)")
    remote.add_commands(commands)
    return parser


async def _drivers_test(settings: Settings, driver_id: str, text: str, f_port: int | None) -> int:
    import orjson

    from iotflow.drivers import CodecFault, Drivers

    try:
        payload = bytes.fromhex(text)
    except ValueError:
        print(f"{text!r} is not hexadecimal", file=sys.stderr)
        return 1
    drivers = Drivers(settings.config.drivers)
    await drivers.start()
    try:
        data = await drivers.decode_bytes(driver_id, payload, f_port, _now())
    except CodecFault as fault:
        print(orjson.dumps({"payloadDecodedError": fault.document()}).decode())
        return 1
    finally:
        await drivers.close()
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    return 0


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="milliseconds")


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


def event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (the `speed` extra): cheaper sockets and callbacks for
    every uplink (docs/performance.md). `IOTFLOW_EVENT_LOOP=asyncio` keeps the standard
    library's loop, should uvloop ever misbehave on a host. The "iotflow running" line
    says which loop runs."""
    if os.environ.get("IOTFLOW_EVENT_LOOP", "").strip().lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop
    return None


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

    factory = event_loop()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(run(settings))
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
    if args.command == "drivers":
        # Quiet: stdout is the result; a broken driver shows in its own error message.
        logs.configure(level="error")
        return asyncio.run(_drivers_test(settings, args.id, args.hex, args.fport))
    if args.command in ("deadletters", "replay"):
        return asyncio.run(remote.run(args, settings))
    if args.command == "check":
        print(
            f"{path}: OK ({len(settings.connections)} provisioned connections,"
            f" {len(settings.flows)} provisioned flows)"
        )
        return 0
    return asyncio.run(_migrate(settings))
