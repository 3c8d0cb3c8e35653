"""What an operator sees of the daemon: every output line one JSON object, expected errors
in one line without a traceback, a taken API port, the first run without a token."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
HAVE_MOSQUITTO = bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())


@pytest.fixture
async def daemon_factory(
    tmp_path: Path, mosquitto: Mosquitto
) -> AsyncIterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(name: str = "d", **kw: Any) -> DaemonProcess:
        kw.setdefault("broker_url", mosquitto.url)
        daemon = DaemonProcess(tmp_path / name, **kw)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        await daemon.close()


def json_objects(lines: list[str]) -> list[dict[str, Any]]:
    """Every line parsed; fails naming the first line that is not one JSON object."""
    parsed = []
    for line in lines:
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n" + "\n".join(lines)) from None
        assert isinstance(value, dict), f"not a JSON object: {line!r}"
        parsed.append(value)
    return parsed


async def send_raw(port: int, data: bytes) -> bytes:
    """Write bytes to the API port and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.slow
async def test_every_line_of_output_is_one_json_object(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory()
    await daemon.start()
    # A malformed request line, a bad header, raw garbage (a TLS hello on the HTTP port):
    # each is answered 400 and logged as one warning, not as aiohttp's traceback.
    for data in (
        b"THIS IS NOT HTTP\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    ):
        answer = await send_raw(daemon.api_port, data)
        status_line = answer.split(b"\r\n")[0]
        assert status_line.startswith(b"HTTP/1."), answer
        assert b" 400 " in status_line, answer
    # A refused reload is an expected error: one line with its problems, no traceback.
    good = daemon.config_path.read_text()
    daemon.write_config([], text=good.replace('retry_max = "1s"', 'retry_max = "soon"'))
    await daemon.signal(signal.SIGHUP)
    (refused,) = await daemon.wait_log(lambda e: e.get("event", "").startswith("Reload refused"))
    assert "exception" not in refused
    assert any("retry_max" in p for p in refused["problems"])
    assert await daemon.stop() == 0

    lines = json_objects(daemon.output)
    malformed = [e for e in lines if e.get("event") == "Malformed HTTP request"]
    # aiohttp says nothing at all (debug) of garbage as the first request of a connection:
    # the two with a valid request line are the ones logged.
    assert len(malformed) == 2, daemon.tail()
    assert {e["error"] for e in malformed} == {
        "Invalid header token",
        "Invalid character in Content-Length",
    }
    for event in malformed:
        assert (event["level"], event["status"]) == ("warning", 400)
        assert "exception" not in event
    assert not [e for e in lines if "Traceback" in str(e) and e.get("level") != "error"]


def run_python(code: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        **kw,
    )


def test_library_logs_and_loop_errors_are_json_lines() -> None:
    """stdlib logging (aiohttp, aiomqtt, asyncio...), warnings, a future whose exception
    nobody retrieved, and an unexpected error logged with its traceback: each one line."""
    code = """
import asyncio, gc, logging, warnings
from iotflow.telemetry import logging as logs

logs.configure("info", "json")
logging.getLogger("aiomqtt").warning("library says %s", "hello\\nworld")
logging.getLogger("asyncpg").info("not shown: libraries log warnings and above")
warnings.warn("an old API", DeprecationWarning, stacklevel=1)
log = logs.get_logger("iotflow")
try:
    raise ValueError("unexpected")
except ValueError:
    log.exception("Something broke", error="unexpected")

async def main():
    logs.install_loop_handler(asyncio.get_running_loop())
    future = asyncio.get_running_loop().create_future()
    future.set_exception(RuntimeError("nobody awaited me"))
    del future
    gc.collect()
    await asyncio.sleep(0)

asyncio.run(main())
"""
    result = run_python(code, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr
    lines = json_objects(result.stdout.splitlines() + result.stderr.splitlines())
    by_event = {e["event"]: e for e in lines}
    library = by_event["library says hello\nworld"]
    assert (library["level"], library["logger"]) == ("warning", "aiomqtt")
    assert "timestamp" in library
    assert not any("not shown" in e["event"] for e in lines)
    assert any("an old API" in e["event"] for e in lines)
    broke = by_event["Something broke"]
    assert broke["level"] == "error"
    assert "Traceback" in broke["exception"]
    assert "ValueError: unexpected" in broke["exception"]
    (loop_error,) = [e for e in lines if e["event"] == "Unhandled error in the event loop"]
    assert loop_error["level"] == "error"
    assert "nobody awaited me" in loop_error["error"]
    assert "RuntimeError" in loop_error["exception"]
    assert len(lines) == 4


async def test_a_taken_api_port_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # No broker either: the port is checked before anything is started.
        daemon = DaemonProcess(
            tmp_path / "d", broker_url=f"mqtt://127.0.0.1:{free_port()}", api_port=port
        )
        try:
            await daemon.start(wait=False)
            assert await daemon.wait_exit(timeout=30) == 1
        finally:
            await daemon.close()
    (line,) = json_objects(daemon.output)
    assert line["level"] == "error"
    assert line["event"] == "Cannot listen for the API"
    assert line["listen"] == f"127.0.0.1:{port}"
    assert "in use" in line["error"]
    assert "exception" not in line
    assert not (tmp_path / "d" / "registry.db").exists()  # nothing was opened


@pytest.mark.slow
async def test_no_token_configured_is_said_at_start_and_in_the_401(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory()
    daemon.write_config([], text=daemon.config_text([]).replace('["test-token"]', "[]"))
    await daemon.start()
    (warning,) = await daemon.wait_log(lambda e: e.get("event") == "No API token configured")
    assert warning["level"] == "warning"
    url = f"{daemon.api}/iot-flow/v1/connections"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": "Bearer guess"}) as r,
    ):
        assert r.status == 401
        body = await r.json()
    assert body["code"] == "unauthorized"
    assert "no API token is configured" in body["message"]
    assert "[api] tokens" in body["message"]
    assert await daemon.stop() == 0


@pytest.mark.slow
async def test_with_a_token_the_401_does_not_say_none_is_configured(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory()
    await daemon.start()
    assert not [e for e in daemon.logs if e.get("event") == "No API token configured"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.api}/iot-flow/v1/connections") as r,
    ):
        assert r.status == 401
        assert "configured" not in (await r.json())["message"]


async def test_an_abandoned_commit_that_failed_is_no_unhandled_error(tmp_path: Path) -> None:
    """The source stops awaiting the commits behind the first one that failed (it
    reconnects, and the broker redelivers them): their failures must not come out as
    "Task exception was never retrieved"; the source logs the first one."""
    from iotflow.app import Daemon
    from iotflow.config.load import load_settings
    from iotflow.config.model import Subscription
    from iotflow.delivery.manager import Deliveries
    from iotflow.routing import RoutingIndex
    from iotflow.sources.mqtt import Incoming
    from iotflow.spool import Spool
    from support.uplinks import uplink

    dev = "0018B20000000B20"
    path = tmp_path / "iotflow.toml"
    path.write_text(
        f"""
[[connections]]
id = "c1"
name = "c1"
connectorId = "actility-http-iot"
devices = ["{dev}"]
configuration = {{ destinationURL = "http://127.0.0.1:9/" }}
"""
    )
    settings = load_settings(path, env={})
    daemon = Daemon(settings)
    daemon.index = RoutingIndex([p.connection for p in settings.connections], {dev: ["c1"]})
    daemon.spool = await Spool.open(tmp_path / "spool.db")
    daemon.deliveries = Deliveries(
        spool=daemon.spool,
        metrics=daemon.metrics,
        settings=settings.config.delivery,
        record=daemon.record,
    )
    await daemon.spool.close()  # every commit now fails
    unhandled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        topic, payload = uplink("actility", dev, 1)
        subscription = Subscription(topic="tpx/things/+/uplink", format="actility")
        awaited = daemon.handle(Incoming(topic, payload, subscription))
        abandoned = daemon.handle(Incoming(topic, payload, subscription))
        assert awaited is not None
        assert abandoned is not None
        with pytest.raises(Exception, match="closed"):
            await awaited  # the one the source awaits still raises
        await asyncio.wait([asyncio.ensure_future(abandoned)])
        del awaited, abandoned
        import gc

        gc.collect()
        await asyncio.sleep(0)  # the loop reports unretrieved exceptions from callbacks
    finally:
        loop.set_exception_handler(previous)
    assert unhandled == []


@pytest.mark.slow
async def test_a_stop_says_what_it_waits_for(
    daemon_factory: Callable[..., DaemonProcess], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    import aiomqtt

    from support.uplinks import uplink

    # Two devices: one device's uplinks go out one at a time, in order.
    devices = ["0018B20000000D01", "0018B20000000D02"]
    cloud.hang(path="/slow")
    connection = {
        "id": "slow",
        "name": "slow",
        "connectorId": "actility-http-iot",
        "devices": devices,
        "configuration": {"destinationURL": cloud.url("/slow")},
    }
    daemon = daemon_factory(connections=[connection], delivery={"drain_timeout": "1s"})
    await daemon.start()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        for dev in devices:
            await client.publish(*uplink("actility", dev, 1), qos=1)
    await cloud.wait_for_requests(2, path="/slow")
    assert await daemon.stop() == 0
    (waiting,) = [e for e in daemon.logs if e.get("event") == "Waiting for in-flight deliveries"]
    assert waiting["connections"] == {"slow": 2}
    assert waiting["in_flight"] == 2
    assert waiting["timeout"] == "1s"


# -- make run: the first run of a new user --------------------------------------------------


def dev_config(tmp_path: Path, broker_port: int, api_port: int) -> Path:
    """config/iotflow.toml with its addresses and state moved to `tmp_path`."""
    text = (ROOT / "config" / "iotflow.toml").read_text()
    replaced = (
        text.replace("mqtt://127.0.0.1:1883", f"mqtt://127.0.0.1:{broker_port}")
        .replace("127.0.0.1:8080", f"127.0.0.1:{api_port}")
        .replace("sqlite:///var/registry.db", f"sqlite:///{tmp_path}/registry.db")
        .replace('"var/spool.db"', f'"{tmp_path}/spool.db"')
    )
    assert replaced.count(str(tmp_path)) == 2
    path = tmp_path / "iotflow.toml"
    path.write_text(replaced)
    return path


@pytest.fixture
def var_dir() -> Iterator[Path]:
    """A `var/` that Mosquitto can reach after dropping to its own user (pytest's tmp_path
    is under a root-only directory; the repository's var/ is not)."""
    path = Path(tempfile.mkdtemp(prefix="iotflow-var-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "deploy" / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


def listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_dev_token_is_made_once_private_and_explained(tmp_path: Path) -> None:
    config = dev_config(tmp_path, 1883, 18080)
    first = script("dev-token.sh", CONFIG=str(config), VAR=str(tmp_path / "var"))
    assert first.returncode == 0, first.stderr
    token_file = tmp_path / "var" / "api-token"
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert "made a token" in first.stdout
    assert 'curl -H "Authorization: Bearer $(cat ' in first.stdout
    assert "http://127.0.0.1:18080/iot-flow/v1/connections" in first.stdout
    again = script("dev-token.sh", CONFIG=str(config), VAR=str(tmp_path / "var"))
    assert again.returncode == 0, again.stderr
    assert "made a token" not in again.stdout
    assert token_file.read_text().strip() == token


@pytest.mark.slow
def test_dev_broker_follows_config_and_stops_by_its_pid_file(tmp_path: Path, var_dir: Path) -> None:
    if not HAVE_MOSQUITTO:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    env = {"CONFIG": str(dev_config(tmp_path, port, free_port())), "VAR": str(var_dir)}
    started = script("dev-broker.sh", **env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"started Mosquitto on 127.0.0.1:{port}" in started.stdout
        assert listens(port)
        pidfile = var_dir / "mosquitto" / "mosquitto.pid"
        pid = int(pidfile.read_text())
        # A second run finds it and leaves it alone.
        again = script("dev-broker.sh", **env)
        assert f"using the one listening on 127.0.0.1:{port}" in again.stdout
    finally:
        stopped = script("dev-broker.sh", "stop", **env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"stopped Mosquitto (pid {pid})" in stopped.stdout
    assert not Path(f"/proc/{pid}").exists()
    assert not pidfile.exists()
    assert not listens(port)
    twice = script("dev-broker.sh", "stop", **env)
    assert twice.returncode == 0
    assert "no Mosquitto started by make run" in twice.stdout


@pytest.mark.slow
async def test_make_run_works_on_the_first_run_and_make_stop_stops_its_broker(
    tmp_path: Path, var_dir: Path
) -> None:
    """What README's first run says, as a new user does it: `make run`, the printed curl
    with the token it made, Ctrl-C, `make stop`."""
    if not HAVE_MOSQUITTO:
        pytest.skip("mosquitto is not installed")
    broker, api = free_port(), free_port()
    args = [f"CONFIG={dev_config(tmp_path, broker, api)}", f"VAR={var_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "IOTFLOW_API_TOKEN"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    make = await asyncio.create_subprocess_exec(
        "make",
        "--no-print-directory",
        "run",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        assert make.stdout is not None
        async with asyncio.timeout(120):
            async for raw in make.stdout:
                output.append(raw.decode().rstrip())
                if '"Consuming uplinks"' in output[-1]:
                    break
        text = "\n".join(output)
        assert "Consuming uplinks" in text, text
        token = (var_dir / "api-token").read_text().strip()
        assert "No API token configured" not in text
        url = f"http://127.0.0.1:{api}/iot-flow/v1/connections"
        assert url in text
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers={"Authorization": f"Bearer {token}"}) as r,
        ):
            assert r.status == 200, await r.text()
    finally:
        if make.returncode is None:
            os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        await asyncio.wait_for(make.wait(), 60)
    stop = await asyncio.create_subprocess_exec(
        "make", "--no-print-directory", "stop", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    stopped, _ = await asyncio.wait_for(stop.communicate(), 60)
    assert stop.returncode == 0, stopped
    assert b"stopped Mosquitto" in stopped
    assert not listens(broker)


# -- the env file of a gateway ----------------------------------------------------------------


def installed_env_file(token: str) -> str:
    """The iotflow.env that deploy/install.sh writes, as it writes it."""
    source = (ROOT / "deploy" / "install.sh").read_text()
    start = source.index('cat >"$etc/iotflow.env" <<EOF\n') + len('cat >"$etc/iotflow.env" <<EOF\n')
    body = source[start : source.index("\nEOF\n", start) + 1]
    return body.replace("$token", token).replace("\\$", "$")


def test_the_env_file_loads_as_documented_and_says_restart(tmp_path: Path) -> None:
    text = installed_env_file("tok-123_abc")
    (tmp_path / "iotflow.env").write_text(text + "DATACAKE_TOKEN='with space & $dollar'\n")
    # The command of config/iotflow.production.toml and docs/operations.md, outside systemd.
    show = "import os; print(os.environ['IOTFLOW_API_TOKEN']); print(os.environ['DATACAKE_TOKEN'])"
    result = subprocess.run(
        ["sh", "-c", f'set -a; . ./iotflow.env; set +a; exec "{sys.executable}" -c "{show}"'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["tok-123_abc", "with space & $dollar"]
    # What a changed secret needs: the same answer everywhere (systemd reads the file at
    # start only; SIGHUP re-reads the TOML file with the environment the daemon started with).
    comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert "systemctl restart iotflow" in comments
    assert "systemctl reload" not in comments
    production = (ROOT / "config" / "iotflow.production.toml").read_text()
    assert "set -a; . /etc/iotflow/iotflow.env; set +a" in production
    assert "needs `systemctl restart iotflow`" in production
    assert "**A changed secret needs a restart**" in (ROOT / "docs" / "operations.md").read_text()


def test_no_document_suggests_env_cat_of_the_env_file() -> None:
    """`env $(cat iotflow.env)` splits on the file's own comments and fails."""
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("config/*")]
    files += [p for p in ROOT.glob("deploy/**/*") if p.is_file()]
    offenders = [str(p) for p in files if "env $(" in p.read_text(errors="replace")]
    assert offenders == []


def test_a_flood_of_malformed_requests_is_bounded_in_the_log() -> None:
    code = """
import logging
from aiohttp.http_exceptions import BadHttpMessage
from iotflow.telemetry import logging as logs

logs.configure("info", "json")
server = logging.getLogger("aiohttp.server")
for _ in range(logs.MALFORMED_LINES + 50):
    server.exception("Error handling request from %s", "127.0.0.1", exc_info=BadHttpMessage("x"))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    lines = json_objects(result.stdout.splitlines() + result.stderr.splitlines())
    assert [e["event"] for e in lines] == ["Malformed HTTP request"] * 100 + [
        "Too many malformed HTTP requests; logging them paused for a minute"
    ]


def test_logging_follows_the_stdout_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """configure() must not keep the stream it saw: once that stream is swapped out and
    closed (pytest's capture, a redirected daemon), every log call would raise, the delivery
    worker's catch-all included, and the worker would die."""
    import io
    import logging as stdlib

    from iotflow.telemetry import logging as logs

    first = io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    logs.configure("info", "json")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stdout", second)
    logs.get_logger("iotflow.test").warning("Still logging", where="structlog")
    stdlib.getLogger("aiohttp.client").warning("and the standard library")
    lines = [orjson.loads(line) for line in second.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["Still logging", "and the standard library"]
