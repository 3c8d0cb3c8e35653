"""The wiring contract with the drivers (issue #13): `Daemon.accept` groups an uplink's
targets by the flows' drivers, decodes once per driver through `Daemon.drivers.decode`,
spools each group with its own document, and commits only when every group is in.

The daemon runs in this process, with a real broker, spool, registry and local cloud; the
decoder is a stand-in with the interface of `iotflow.drivers.Drivers` (another helper's),
counting its calls.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import orjson

from iotflow.app import Daemon
from iotflow.config.load import load_settings
from iotflow.drivers import Drivers
from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import actility

DEV = "0018B20000000C01"
FLOWS = f"""
[[flows]]
id = "decoded"
name = "decoded"
driver = {{ id = "acme:sensor:1" }}
matchers = [{{ type = "key", key = "{DEV}" }}]
connectors = [{{ connectionId = "c2" }}, {{ connectionId = "c3" }}]
"""


class Decoder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def decode(self, document: dict[str, Any], driver_id: str) -> dict[str, Any]:
        self.calls.append(driver_id)
        inner = dict(document["DevEUI_uplink"])
        inner["payload"] = {"decodedBy": driver_id}
        return {**document, "DevEUI_uplink": inner}


def layout(tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud) -> DaemonProcess:
    return DaemonProcess(
        tmp_path / "drivers",
        broker_url=mosquitto.url,
        extra=FLOWS,
        connections=[
            {
                "id": cid,
                "name": cid,
                "connectorId": "actility-http-iot",
                "devices": [DEV] if cid == "c1" else [],
                "configuration": {"destinationURL": cloud.url(f"/{cid}")},
            }
            for cid in ("c1", "c2", "c3")
        ],
    )


async def test_targets_are_decoded_once_per_driver_and_spooled_per_group(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    daemon = Daemon(load_settings(layout(tmp_path, mosquitto, cloud).config_path, env={}))
    await daemon.start()
    try:
        decoder = Decoder()
        daemon.drivers = cast(Drivers, decoder)  # a stand-in of the same interface
        commit = daemon.accept("actility", orjson.dumps(actility(DEV, 7)))
        assert commit is not None
        await commit  # every group is in the spool
        assert decoder.calls == ["acme:sensor:1"]  # one decode for c2 and c3
        (plain,) = await cloud.wait_for(1, path="/c1")
        assert "payload" not in plain.json["DevEUI_uplink"]  # the binding: no driver
        for path in ("/c2", "/c3"):
            (decoded,) = await cloud.wait_for(1, path=path)
            assert decoded.json["DevEUI_uplink"]["payload"] == {"decodedBy": "acme:sensor:1"}
        # Without drivers (None), a flow's driver decodes nothing and one document goes out.
        daemon.drivers = None
        commit = daemon.accept("actility", orjson.dumps(actility(DEV, 8)))
        assert commit is not None
        await commit
        for path in ("/c1", "/c2", "/c3"):
            received = await cloud.wait_for(2, path=path)
            assert "payload" not in received[1].json["DevEUI_uplink"]
    finally:
        await daemon.shutdown()


class SlowDecoder(Decoder):
    """Holds the first decode until released: a codec slower than the next uplink."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def decode(self, document: dict[str, Any], driver_id: str) -> dict[str, Any]:
        if not self.calls:
            self.calls.append(driver_id)
            await self.release.wait()
            inner = dict(document["DevEUI_uplink"])
            inner["payload"] = {"decodedBy": driver_id}
            return {**document, "DevEUI_uplink": inner}
        return await super().decode(document, driver_id)


async def test_a_slow_decode_keeps_the_devices_order_in_the_spool(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> None:
    daemon = Daemon(load_settings(layout(tmp_path, mosquitto, cloud).config_path, env={}))
    await daemon.start()
    try:
        decoder = SlowDecoder()
        daemon.drivers = cast(Drivers, decoder)  # a stand-in of the same interface
        first = daemon.accept("actility", orjson.dumps(actility(DEV, 1)))
        second = daemon.accept("actility", orjson.dumps(actility(DEV, 2)))
        assert first is not None
        assert second is not None
        # The second uplink's decode is done at once while the first's is held. Its
        # deliveries must still be spooled (and so sent) after the first's, on every
        # connection, the binding's included. Without the order, the second is committed
        # within this second; with it, it waits for the first (the timeout only gives the
        # wrong order its chance to show).
        await asyncio.wait({asyncio.ensure_future(second)}, timeout=1)
        assert decoder.calls == ["acme:sensor:1", "acme:sensor:1"]
        decoder.release.set()
        await asyncio.gather(first, second)
        for path in ("/c1", "/c2", "/c3"):
            received = await cloud.wait_for(2, path=path)
            assert [r.json["DevEUI_uplink"]["FCntUp"] for r in received] == [1, 2], path
    finally:
        await daemon.shutdown()
