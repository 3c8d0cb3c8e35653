"""`iotflow run` as a real process: config written by the test, logs read as events."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from support.ports import free_port

LogEvent = dict[str, Any]


def toml_value(value: Any) -> str:
    """Enough TOML for test configs: JSON's syntax is valid TOML for these values."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return orjson.dumps(value).decode()


class DaemonProcess:
    """One iotflow daemon; its JSON log lines are parsed and can be awaited."""

    def __init__(
        self,
        workdir: Path,
        *,
        broker_url: str,
        connections: list[dict[str, Any]] | None = None,
        client_id: str | None = None,
        delivery: dict[str, Any] | None = None,
        extra: str = "",
        api_port: int | None = None,
        env: dict[str, str] | None = None,
        spool_path: Path | None = None,
        mqtt: dict[str, Any] | None = None,
        subscriptions: list[dict[str, Any]] | None = None,
        tokens: str = '["test-token"]',
        registry_url: str | None = None,
        registry: dict[str, Any] | None = None,
        api: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "iotflow.toml"
        self.api_port = api_port or free_port()
        self.broker_url = broker_url
        # Unique per directory: the session broker is shared, and a persistent session left
        # by another test under the same name would hand its queued uplinks to this one.
        digest = hashlib.sha1(str(workdir).encode()).hexdigest()[:8]
        self.client_id = client_id or f"iotflow-test-{digest}-{workdir.name}"[:60]
        self.delivery = delivery or {}
        self.extra = extra
        self.env = env or {}
        self.spool_path = spool_path or workdir / "spool.db"
        # [mqtt] keys over the test defaults; None removes one (the daemon's default then).
        self.mqtt = mqtt or {}
        self.subscriptions = subscriptions
        self.tokens = tokens  # the TOML value of [api] tokens
        # A fleet shares one PostgreSQL registry; alone, a SQLite file of its own.
        self.registry_url = registry_url or f"sqlite:///{workdir}/registry.db"
        self.registry = registry or {}  # more [registry] keys ("heartbeat")
        self.api_settings = api or {}  # more [api] keys ("url")
        self.logs: list[LogEvent] = []
        self.output: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.write_config(connections or [])

    # -- config ----------------------------------------------------------------------------

    def config_text(self, connections: list[dict[str, Any]]) -> str:
        delivery = {"retry_initial": "50ms", "retry_max": "1s", **self.delivery}
        mqtt = {
            "url": self.broker_url,
            "client_id": self.client_id,
            "reconnect_initial": "100ms",
            "reconnect_max": "1s",
            **self.mqtt,
        }
        lines = ["[mqtt]", *(f"{k} = {toml_value(v)}" for k, v in mqtt.items() if v is not None)]
        subscriptions = self.subscriptions
        if subscriptions is None:
            subscriptions = [
                {"topic": "application/+/device/+/event/up", "format": "chirpstack"},
                {"topic": "v3/+/devices/+/up", "format": "tts"},
                {"topic": "tpx/things/+/uplink", "format": "actility"},
            ]
        for subscription in subscriptions:
            lines.append("[[mqtt.subscriptions]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in subscription.items()]
        lines += [
            "[registry]",
            f'url = "{self.registry_url}"',
            *(f"{k} = {toml_value(v)}" for k, v in self.registry.items()),
            "[spool]",
            f'path = "{self.spool_path}"',
            "[api]",
            f'listen = "127.0.0.1:{self.api_port}"',
            f"tokens = {self.tokens}",
            *(f"{k} = {toml_value(v)}" for k, v in self.api_settings.items()),
            "[log]",
            'level = "debug"',
            "[delivery]",
            *(f"{k} = {toml_value(v)}" for k, v in delivery.items()),
            self.extra,
        ]
        for connection in connections:
            lines.append("[[connections]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in connection.items()]
        return "\n".join(lines) + "\n"

    def write_config(self, connections: list[dict[str, Any]], text: str | None = None) -> None:
        self.config_path.write_text(text if text is not None else self.config_text(connections))

    # -- process ---------------------------------------------------------------------------

    async def start(self, *, wait: bool = True) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "iotflow",
            "run",
            "-c",
            str(self.config_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, **self.env},
        )
        ready = sum(1 for e in self.logs if e.get("event") == "Consuming uplinks")
        self._reader = asyncio.create_task(self._read(self.process))
        if wait:
            # The logs of earlier runs are kept: wait for this run's line.
            await self.wait_log(lambda e: e.get("event") == "Consuming uplinks", count=ready + 1)

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.output.append(line)
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                event = {"event": line, "level": "raw"}
            async with self._changed:
                self.logs.append(event if isinstance(event, dict) else {"event": line})
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_log(
        self, predicate: Callable[[LogEvent], bool], *, count: int = 1, timeout: float = 60
    ) -> list[LogEvent]:
        """Await `count` log events matching `predicate`; fail with the log on timeout."""

        def found() -> list[LogEvent]:
            return [e for e in self.logs if predicate(e)]

        def done() -> bool:
            exited = self.process is None or self.process.returncode is not None
            return len(found()) >= count or (
                exited and self._reader is not None and self._reader.done()
            )

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(done)
        except TimeoutError:
            raise AssertionError(f"log event not seen in {timeout}s:\n{self.tail()}") from None
        matches = found()
        if len(matches) < count:
            raise AssertionError(f"daemon exited before the log event:\n{self.tail()}")
        return matches

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output[-lines:])

    async def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self._wait_exit(timeout)

    async def wait_exit(self, timeout: float = 60) -> int:
        """The exit code of a daemon that exits by itself (no signal sent)."""
        return await self._wait_exit(timeout)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self._wait_exit(30)

    async def _wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            raise AssertionError(f"daemon did not exit in {timeout}s:\n{self.tail()}") from None
        if self._reader is not None:
            await self._reader
        return code

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with contextlib.suppress(ProcessLookupError):
                await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    # -- API -------------------------------------------------------------------------------

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        async with aiohttp.ClientSession() as session, session.get(f"{self.api}/metrics") as r:
            text = await r.text()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    async def metric(self, name: str, **labels: str) -> float:
        return (await self.metrics()).get((name, tuple(sorted(labels.items()))), 0.0)
