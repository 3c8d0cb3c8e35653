"""Where each device's downlinks go: the network server of its latest uplink, remembered.

A downlink goes to the network server the device talks through, addressed with that
server's own identifiers (ChirpStack's application id, TTS's application and device ids).
They are in the device's uplinks and nowhere else, so every routed uplink tells the
directory (`remember`, on the ingest hot path) and a downlink asks it (`lookup`).

The registry keeps them (table `device_sources`), so a restart or another instance of a
scale-out knows the devices it has not heard yet. The hot path never waits for it: an
in-memory copy answers "nothing changed" for all but the first uplink of a device after
start (or one whose network server changed), and those few writes go out in the
background, coalesced per device, many per transaction, retried while the registry is
unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable

from iotflow.backoff import Backoff
from iotflow.registry import Store
from iotflow.telemetry.logging import get_logger

__all__ = ["DeviceDirectory", "DeviceSource"]

log = get_logger("iotflow.downlinks")

DeviceSource = tuple[str, dict[str, str]]  # (input format, the network server's identifiers)
WRITE_BATCH = 500  # devices written per registry transaction


class DeviceDirectory:
    def __init__(
        self,
        store: Store,
        *,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._known: dict[str, DeviceSource] = {}  # as last remembered or written
        self._pending: dict[str, DeviceSource] = {}  # not written yet, newest per device
        self._wake = asyncio.Event()
        # Doubling without jitter, as before: one writer per instance, a predictable spacing.
        self._backoff = Backoff(retry_initial, retry_max, jitter="none")
        self._sleep = sleep  # between retries; a test gives one it controls
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="device-directory")

    def remember(self, dev_eui: str, fmt: str, source: dict[str, str]) -> None:
        """Note the network server of a device's uplink. Never waits; cheap when unchanged."""
        entry = (fmt, source)
        if self._known.get(dev_eui) == entry:
            return
        self._known[dev_eui] = entry
        self._pending[dev_eui] = entry
        self._wake.set()

    async def lookup(self, dev_eui: str) -> DeviceSource | None:
        """The network server of the device's latest uplink, None if none was ever seen.

        What this instance has not written yet is the newest it knows; otherwise the
        registry is, as another instance may have heard the device since. Should the
        registry be unavailable, what this instance remembers is better than nothing.
        """
        entry = self._pending.get(dev_eui)
        if entry is not None:
            return entry
        try:
            stored = await self._store.device_source(dev_eui)
        except Exception as exc:
            log.warning("Device directory read failed", devEUI=dev_eui, error=str(exc))
            return self._known.get(dev_eui)
        return stored if stored is not None else self._known.get(dev_eui)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._write_pending()
                self._backoff.reset()
            except Exception as exc:
                # Kept pending: written when the registry answers again.
                delay = self._backoff.next()
                log.warning(
                    "Device directory write failed; retrying",
                    pending=len(self._pending),
                    retry_in=delay,
                    error=str(exc),
                )
                await self._sleep(delay)
                self._wake.set()

    async def _write_pending(self) -> None:
        while self._pending:
            # One transaction for many devices: at start, or when a fleet's devices first
            # show up, a write each made a commit each (a millisecond of the loop apiece).
            batch = list(itertools.islice(self._pending.items(), WRITE_BATCH))
            await self._store.remember_device_sources(
                [(dev_eui, fmt, source) for dev_eui, (fmt, source) in batch]
            )
            for dev_eui, entry in batch:
                # A newer uplink that arrived during the write replaced the entry: keep it.
                if self._pending.get(dev_eui) is entry:
                    del self._pending[dev_eui]

    @property
    def pending(self) -> int:
        """Devices whose latest network server is not written to the registry yet."""
        return len(self._pending)

    async def close(self, grace: float = 5.0) -> None:
        """Write what is pending, for at most `grace` seconds, and stop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not self._pending:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(grace):
                await self._write_pending()
        if self._pending:
            # Not lost for good: the next uplink of each of these devices writes it again.
            log.warning("Device directory closed with writes pending", count=len(self._pending))
