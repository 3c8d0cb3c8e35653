"""What the API asks of the daemon: the control plane, as a protocol.

The API (`iotflow.api`, `iotflow.ingest`) depends on this, never on `iotflow.app`: the
daemon satisfies it structurally, and a test can hand the API anything else that does.
Keep it to what the handlers use; a new handler needing more adds it here first.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from aiohttp import web

from iotflow.config.model import Config
from iotflow.delivery.recovery import Recovery
from iotflow.delivery.worker import Statistics
from iotflow.downlinks.service import Downlinks
from iotflow.drivers import Drivers
from iotflow.fleet import Fleet
from iotflow.registry import Store
from iotflow.telemetry.metrics import Metrics

__all__ = ["CONTROL", "ControlPlane", "WorkerView"]


class WorkerView(Protocol):
    """A connection worker as the API reads it: its state and statistics, nothing to call."""

    @property
    def state(self) -> str: ...

    @property
    def startup_time(self) -> float | None: ...

    @property
    def stats(self) -> Statistics: ...


class ControlPlane(Protocol):
    """The daemon as the API sees it."""

    @property
    def registry(self) -> Store:
        """The registry store (RuntimeError before it is open)."""
        ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def config(self) -> Config:
        """The settings of the moment: a reload (SIGHUP) replaces them."""
        ...

    @property
    def downlinks(self) -> Downlinks | None:
        """The downlink handler; None while the daemon is starting."""
        ...

    @property
    def drivers(self) -> Drivers | None:
        """The payload drivers; None while the daemon is starting."""
        ...

    @property
    def fleet(self) -> Fleet | None:
        """This instance among those sharing the registry; None while starting."""
        ...

    @property
    def recovery(self) -> Recovery | None:
        """Dead letters and replays; None while the daemon is starting."""
        ...

    def worker(self, connection_id: str) -> WorkerView | None: ...

    def alarm_states(self, connection_id: str) -> list[dict[str, Any]]: ...

    def active_alarms(self) -> list[dict[str, Any]]: ...

    def record(self, connection_id: str, kind: str, data: dict[str, Any]) -> None:
        """Add to a connection's event log."""
        ...

    async def refresh(self) -> None:
        """Bring routing and workers in line with the registry after a change."""
        ...

    async def readiness(self) -> dict[str, bool]: ...

    def accept(
        self, fmt: str, payload: bytes, *, hold: bool = True, **origin: str
    ) -> Awaitable[None] | None:
        """One uplink: decode, route, commit (see `Daemon.accept`)."""
        ...


CONTROL: web.AppKey[ControlPlane] = web.AppKey("control", ControlPlane)
