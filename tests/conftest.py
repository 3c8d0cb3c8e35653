"""Fixtures for the real parts the suite starts itself: broker, database, clouds.

Nothing here connects to services that happen to run on the machine (a Mosquitto on
1883, a PostgreSQL on 5432): every process is started on a free port from the installed
binaries and stopped at the end.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Generator, Iterator

import pytest
import pytest_asyncio
import structlog
from hypothesis import settings

from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.postgres import Postgres
from support.rabbitmq import RabbitMQ
from support.tls import make_pki

# Hypothesis fails an example slower than 200 ms by default: a timed assertion, which a
# loaded CI machine trips. Tests assert behaviour; speed is for tests/bench/.
settings.register_profile("iotflow", deadline=None)
settings.load_profile("iotflow")

_phase_reports = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Kept so that function fixtures can tell, at teardown, whether their test failed
    # and attach what the real parts logged (pytest's documented recipe).
    report = yield
    item.stash.setdefault(_phase_reports, {})[report.when] = report
    return report


@pytest.fixture(autouse=True)
def _logging_as_found() -> Iterator[None]:
    """A test that configures logging in this process (`iotflow check` through `main`,
    `logs.configure`) leaves it as it found it: the level it set must not hide the log
    lines a later test captures."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_phase_reports, {})
    return any(report.failed for report in reports.values())


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    """The suite's broker, shared by every test. Tests that stop it use fresh_mosquitto."""
    with Mosquitto() as broker:
        yield broker


@pytest.fixture
def fresh_mosquitto(request: pytest.FixtureRequest) -> Iterator[Mosquitto]:
    """A broker of the test's own, which it may kill or restart."""
    with Mosquitto() as broker:
        yield broker
        if _failed(request):
            request.node.add_report_section("teardown", "mosquitto log", broker.log_text())


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQ]:
    """The suite's RabbitMQ node: an MQTT 3.1.1-only broker (and AMQP on `amqp_port`).

    It takes about fifteen seconds to start: once a session, only when a test asks.
    Skipped, with the reason, where rabbitmq-server is not installed.
    """
    with RabbitMQ(tls=make_pki()) as node:  # AMQP over TLS too (`amqps_port`)
        yield node


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The suite's PostgreSQL with database `iotflow`.

    A session fixture is only set up when a test asks for it, so runs that select no
    PostgreSQL test never pay for initdb.
    """
    with Postgres() as server:
        yield server


@pytest_asyncio.fixture
async def cloud(request: pytest.FixtureRequest) -> AsyncIterator[FakeCloud]:
    """A started fake webhook platform, fresh for each test."""
    async with FakeCloud() as fake:
        yield fake
        if _failed(request):
            request.node.add_report_section("teardown", "fake cloud requests", fake.describe())


@pytest_asyncio.fixture
async def daemons() -> AsyncIterator[list[DaemonProcess]]:
    """Daemon processes a test starts (append them); killed at its end whatever happened."""
    made: list[DaemonProcess] = []
    yield made
    for daemon in made:
        await daemon.close()
