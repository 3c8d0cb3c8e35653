"""The drivers under `[drivers] path`: found and loaded once at start, called off the loop.

`Drivers.decode(document, driver_id)` is what routing calls (app.py, `Daemon.accept`): it
returns a new ThingPark document with `payload` set to the codec's `data`, or with
`payloadDecodedError` and no `payload` when the codec fails — it never raises for a codec's
fault. Calls run on a small thread pool, one call per codec at a time, so a codec that loops
holds one thread for at most `[drivers] timeout` and the other codecs and the event loop go on.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from iotflow.config.model import DriverSettings
from iotflow.drivers.engine import (
    INVALID_INPUT,
    LOAD_FAILED,
    NO_DRIVER,
    NOT_FOUND,
    Codec,
    CodecFault,
    Limits,
)
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.drivers")

AUTO = "actility:auto:1"  # the uplink's own DriverCfg.id (ThingPark)
ROOT = "DevEUI_uplink"
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
T = TypeVar("T")
_THREADS = 4  # V8 runs without the GIL: a few threads serve many codecs


@dataclass(frozen=True, slots=True)
class DriverInfo:
    id: str
    producer: str
    module: str
    version: str
    path: str
    status: str  # "ready" or "failed"
    error: str | None = None
    encode: bool = False  # defines encodeDownlink

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "producer": self.producer,
            "module": self.module,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "encodeDownlink": self.encode,
        }


def discover(root: Path) -> list[tuple[str, Path]]:
    """`<producer>/<module>/<version>/driver.js` below `root`, as (id, path), by id."""
    found: list[tuple[str, Path]] = []
    if not root.is_dir():
        log.warning("Drivers path is no directory", path=str(root))
        return found
    for path in sorted(root.glob("*/*/*/driver.js")):
        parts = path.relative_to(root).parts[:3]
        if all(_SEGMENT.match(p) and ":" not in p for p in parts):
            found.append((":".join(parts), path))
        else:
            log.warning("Driver skipped: bad name", path=str(path))
    return found


class Drivers:
    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        self.limits = Limits(settings.timeout.total_seconds(), int(settings.memory_limit))
        self._codecs: dict[str, Codec] = {}
        self._infos: dict[str, DriverInfo] = {}
        self._busy: dict[str, asyncio.Lock] = {}
        self._pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="iotflow-driver")
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every codec once; one that fails is listed with its error, not fatal."""
        if self.settings.path is None:
            return
        root = Path(self.settings.path)
        loop = asyncio.get_running_loop()
        for driver_id, path in await loop.run_in_executor(self._pool, discover, root):
            producer, module, version = driver_id.split(":")
            try:
                codec = await loop.run_in_executor(self._pool, Codec, path, self.limits)
            except (CodecFault, OSError, UnicodeDecodeError) as exc:
                error = exc.message if isinstance(exc, CodecFault) else str(exc)
                log.warning("Driver failed to load", driver=driver_id, error=error)
                self._infos[driver_id] = DriverInfo(
                    driver_id, producer, module, version, str(path), "failed", error
                )
                continue
            self._codecs[driver_id] = codec
            self._busy[driver_id] = asyncio.Lock()
            self._infos[driver_id] = DriverInfo(
                driver_id, producer, module, version, str(path), "ready", None, codec.has_encoder
            )
        log.info(
            "Drivers loaded", ready=len(self._codecs), failed=len(self._infos) - len(self._codecs)
        )

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for codec in self._codecs.values():
            await loop.run_in_executor(self._pool, codec.close)
        self._codecs.clear()
        self._closed = True
        # Off the loop: a call in flight may still run up to its time limit.
        await loop.run_in_executor(None, self._pool.shutdown)

    # -- what the API reads ----------------------------------------------------------------

    def list(self) -> list[DriverInfo]:
        return [self._infos[k] for k in sorted(self._infos)]

    def get(self, driver_id: str) -> DriverInfo | None:
        return self._infos.get(driver_id)

    # -- calls -----------------------------------------------------------------------------

    async def decode_bytes(
        self, driver_id: str, payload: bytes, f_port: int | None, recv_time: str
    ) -> Any:
        """The codec's `data`; CodecFault when it gives none."""
        codec = self._codec(driver_id)
        async with self._busy[driver_id]:  # one thread per codec: a looping one holds one
            return await self._run(codec.decode, payload, f_port, recv_time)

    async def encode(
        self, driver_id: str, data: Any, f_port: int | None
    ) -> tuple[bytes, int | None]:
        """encodeDownlink: (bytes, fPort); CodecFault when the codec gives none."""
        codec = self._codec(driver_id)
        async with self._busy[driver_id]:
            return await self._run(codec.encode, data, f_port)

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call, *args)
        except RuntimeError as exc:  # the pool is shut down: the daemon is stopping
            if self._closed:
                raise CodecFault(LOAD_FAILED, "the drivers are closed") from None
            raise exc from None

    async def decode(self, document: dict[str, Any], driver_id: str) -> dict[str, Any]:
        """A new document: `payload` from the codec, or `payloadDecodedError` without it."""
        inner = dict(document.get(ROOT) or {})
        inner.pop("payload", None)
        inner.pop("payloadDecodedError", None)
        try:
            resolved = _resolve(driver_id, inner)
            payload, f_port = _input(inner)
            data = await self.decode_bytes(resolved, payload, f_port, str(inner.get("Time", "")))
        except CodecFault as fault:
            inner["payloadDecodedError"] = fault.document()
        except Exception as exc:
            # A bug of ours or of the engine: the uplink still goes on, undecoded.
            log.error("Driver call failed", driver=driver_id, error=f"{type(exc).__name__}: {exc}")
            inner["payloadDecodedError"] = {"code": "internal", "message": type(exc).__name__}
        else:
            inner["payload"] = data
        return {**document, ROOT: inner}

    def _codec(self, driver_id: str) -> Codec:
        codec = self._codecs.get(driver_id)
        if codec is not None:
            return codec
        info = self._infos.get(driver_id)
        if info is not None:
            raise CodecFault(LOAD_FAILED, f"driver {driver_id} failed to load: {info.error}")
        raise CodecFault(NOT_FOUND, f"no driver {driver_id}")


def _resolve(driver_id: str, inner: dict[str, Any]) -> str:
    if driver_id != AUTO:
        return driver_id
    cfg = inner.get("DriverCfg")
    own = cfg.get("id") if isinstance(cfg, dict) else None
    if not isinstance(own, str) or not own:
        raise CodecFault(NO_DRIVER, "actility:auto:1 needs DriverCfg.id in the uplink")
    return own


def _input(inner: dict[str, Any]) -> tuple[bytes, int | None]:
    text = inner.get("payload_hex")
    try:
        payload = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        raise CodecFault(INVALID_INPUT, "payload_hex is not hexadecimal") from None
    port = inner.get("FPort")
    try:
        f_port = int(port) if port is not None else None
    except (TypeError, ValueError):
        raise CodecFault(INVALID_INPUT, "FPort is not a number") from None
    return payload, f_port
