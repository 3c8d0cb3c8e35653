"""Read the TOML config file: environment expansion, validation, every problem at once."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from iotflow.config.model import Config
from iotflow.connectors.connection import Connection, parse_connection, problems_of
from iotflow.errors import ConfigError, Problem
from iotflow.flows.model import Flow, parse_flow
from iotflow.formats import normalize_dev_eui

DEFAULT_PATH = "/etc/iotflow/iotflow.toml"
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


@dataclass(frozen=True, slots=True)
class Provisioned:
    """A connection of the config file and the devices bound to it there."""

    connection: Connection
    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Settings:
    """A validated config file."""

    path: str
    config: Config
    connections: tuple[Provisioned, ...] = field(default_factory=tuple)
    flows: tuple[Flow, ...] = field(default_factory=tuple)  # [[flows]], provisioned


def default_path() -> str:
    return default_source()[0]


def default_source() -> tuple[str, str]:
    """The config file used without `-c`, and why that one (said to the operator)."""
    from_env = os.environ.get("IOTFLOW_CONFIG")
    if from_env:
        return from_env, "from $IOTFLOW_CONFIG"
    return DEFAULT_PATH, "the default: $IOTFLOW_CONFIG is not set and no -c PATH was given"


def expand(value: Any, env: Mapping[str, str], path: str, problems: list[Problem]) -> Any:
    """Replace `${VAR}` (and `${VAR:-default}`) in every string of the tree."""
    if isinstance(value, str):
        if "${" not in value:
            return value  # most strings (100,000 DevEUIs in a large file, issue #16)

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(Problem(path, f"environment variable {name} is not set"))
            return ""

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, dict):
        return {k: expand(v, env, f"{path}.{k}" if path else k, problems) for k, v in value.items()}
    if isinstance(value, list):
        # A plain string item is kept without a call or a key path of its own.
        return [
            v if isinstance(v, str) and "${" not in v else expand(v, env, f"{path}[{i}]", problems)
            for i, v in enumerate(value)
        ]
    return value


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Load and validate; raise ConfigError with every problem found."""
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read: {exc.strerror or exc}")], source) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("", f"not valid TOML: {exc}")], source) from None
    return parse_settings(raw, source, os.environ if env is None else env)


def parse_settings(raw: dict[str, Any], source: str, env: Mapping[str, str]) -> Settings:
    problems: list[Problem] = []
    data = expand(raw, env, "", problems)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_of(exc))
    provisioned: list[Provisioned] = []
    seen: set[str] = set()
    raw_connections = data.get("connections", [])
    for i, item in enumerate(raw_connections if isinstance(raw_connections, list) else []):
        prefix = f"connections[{i}]"
        if not isinstance(item, dict):
            continue  # already reported by Config
        body = dict(item)
        devices = body.pop("devices", [])
        # The devices are checked whatever the rest says: every problem at once.
        eui_list = _devices(devices, f"{prefix}.devices", problems)
        try:
            connection = parse_connection(body)
        except ConfigError as exc:
            problems.extend(
                Problem(f"{prefix}.{p.path}".rstrip("."), p.message) for p in exc.problems
            )
            continue
        if connection.id in seen:
            problems.append(Problem(f"{prefix}.id", f"duplicate connection id {connection.id!r}"))
        seen.add(connection.id)
        provisioned.append(
            Provisioned(connection.model_copy(update={"provisioned": True}), eui_list)
        )
    flows = _flows(data.get("flows", []), seen, problems)
    if problems or config is None:
        raise ConfigError(problems, source)
    return Settings(source, config, tuple(provisioned), flows)


def _flows(raw: Any, connections: set[str], problems: list[Problem]) -> tuple[Flow, ...]:
    """The `[[flows]]`: each a flow in the API's shape with an `id`, naming connections of
    the config file only (an API connection may not exist when the file is checked)."""
    flows: list[Flow] = []
    seen: set[str] = set()
    for i, item in enumerate(raw if isinstance(raw, list) else []):
        prefix = f"flows[{i}]"
        if not isinstance(item, dict):
            continue  # already reported by Config
        if "id" not in item:
            problems.append(Problem(f"{prefix}.id", "required in the config file"))
            continue
        try:
            flow = parse_flow(item, provisioned=True)
        except ConfigError as exc:
            problems.extend(
                Problem(f"{prefix}.{p.path}".rstrip("."), p.message) for p in exc.problems
            )
            continue
        if flow.id in seen:
            problems.append(Problem(f"{prefix}.id", f"duplicate flow id {flow.id!r}"))
        seen.add(flow.id)
        for j, connector in enumerate(flow.connectors):
            if connector.connectionId not in connections:
                problems.append(
                    Problem(
                        f"{prefix}.connectors.{j}.connectionId",
                        "not a connection of the config file",
                    )
                )
        flows.append(flow)
    return tuple(flows)


def _devices(value: Any, path: str, problems: list[Problem]) -> tuple[str, ...]:
    if not isinstance(value, list):
        problems.append(Problem(path, "expected a list of DevEUIs"))
        return ()
    result: list[str] = []
    for i, item in enumerate(value):
        try:
            result.append(normalize_dev_eui(item if isinstance(item, str) else ""))
        except ValueError:
            problems.append(Problem(f"{path}[{i}]", "expected a DevEUI of 16 hex digits"))
    return tuple(dict.fromkeys(result))
