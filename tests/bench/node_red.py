"""Node-RED as the benchmark's point of comparison: one flow, `mqtt in` → `http request`.

Installed from the npm registry into a temporary directory by `bench_routing.py
--node-red` (never globally, never into the checkout). The flow keeps nothing on disk: the
`mqtt in` node acknowledges at QoS 1 as soon as the message is in Node-RED, so what it
measures is a router without durability, for scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from support.ports import free_port

VERSION = "4"  # the major release the issue compared against (4.1 at the time)


def install(root: Path, version: str = VERSION) -> Path:
    """`npm install node-red@version` under `root`; the path of its red.js."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("--node-red needs npm (Node.js 18 or newer)")
    quiet = ("--no-audit", "--no-fund", "--loglevel=error")
    subprocess.run(
        [npm, "install", "--prefix", str(root), f"node-red@{version}", *quiet],
        check=True,
        timeout=900,
        stdout=subprocess.DEVNULL,
    )
    red = root / "node_modules" / "node-red" / "red.js"
    if not red.exists():
        raise RuntimeError(f"npm installed no {red}")
    return red


class NodeRed:
    """One Node-RED process; the same few methods the benchmark uses of a DaemonProcess."""

    def __init__(
        self, red: Path, workdir: Path, *, broker_port: int, topic: str, url: str, qos: int = 1
    ) -> None:
        self.red = red
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.output: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        flows = [
            {"id": "bench-tab", "type": "tab", "label": "bench"},
            {
                "id": "bench-broker",
                "type": "mqtt-broker",
                "name": "bench",
                "broker": "127.0.0.1",
                "port": str(broker_port),
                "clientid": "node-red-bench",
                "autoConnect": True,
                "usetls": False,
                "protocolVersion": "4",
                "keepalive": "60",
                "cleansession": True,
            },
            {
                "id": "bench-in",
                "type": "mqtt in",
                "z": "bench-tab",
                "topic": topic,
                "qos": str(qos),
                "datatype": "utf8",
                "broker": "bench-broker",
                "nl": False,
                "rap": True,
                "rh": 0,
                "inputs": 0,
                "wires": [["bench-post"]],
            },
            {
                "id": "bench-post",
                "type": "http request",
                "z": "bench-tab",
                "method": "POST",
                "ret": "txt",
                "paytoqs": "ignore",
                "url": url,
                "persist": True,  # keep-alive, as iotflow's sink
                "senderr": False,
                "headers": [],
                "wires": [[]],
            },
        ]
        (workdir / "flows.json").write_text(json.dumps(flows))
        (workdir / "settings.js").write_text(
            "module.exports = {\n"
            f"  uiPort: {self.port}, uiHost: '127.0.0.1',\n"
            "  flowFile: 'flows.json', credentialSecret: false,\n"
            "  httpAdminRoot: false, httpNodeRoot: false,\n"
            "  logging: { console: { level: 'info', metrics: false, audit: false } },\n"
            "};\n"
        )

    async def start(self, timeout: float = 120) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("--node-red needs node")
        self.process = await asyncio.create_subprocess_exec(
            node,
            str(self.red),
            "--settings",
            str(self.workdir / "settings.js"),
            "--userDir",
            str(self.workdir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, "NODE_RED_ENABLE_PROJECTS": "false"},
        )
        self._reader = asyncio.create_task(self._read(self.process))
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(
                f"Node-RED did not connect in {timeout:g}s:\n{self.tail()}"
            ) from None

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.output.append(line)
            if "Connected to broker" in line:
                self._connected.set()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output[-lines:])

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {}

    async def stop(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            return await self.process.wait()

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with contextlib.suppress(ProcessLookupError):
                await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
