"""Prometheus metrics; the names are part of the contract (docs/architecture.md "Observability")."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from iotflow.downlinks.model import REASONS
from iotflow.states import ConnectionState, Outcome

STATES = tuple(ConnectionState)
OUTCOMES = tuple(Outcome)
DOWNLINK_OUTCOMES = ("sent", *REASONS)  # a downlink is sent, or refused for one reason


class Metrics:
    """One set of metrics per daemon, on its own registry (tests run several in a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.uplinks_received = Counter(
            "iotflow_uplinks_received",
            "Uplink messages received, by input format",
            ["format"],
            registry=r,
        )
        self.uplinks_rejected = Counter(
            "iotflow_uplinks_rejected",
            "Uplink messages dropped as malformed, by reason",
            ["reason"],
            registry=r,
        )
        self.uplinks_unrouted = Counter(
            "iotflow_uplinks_unrouted",
            "Valid uplinks of devices bound to no active connection",
            registry=r,
        )
        self.deliveries = Counter(
            "iotflow_deliveries",
            "Finished deliveries, by connection and outcome",
            ["connection", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "iotflow_delivery_retries",
            "Delivery attempts that will be retried",
            ["connection"],
            registry=r,
        )
        self.latency = Histogram(
            "iotflow_delivery_latency_seconds",
            "From receiving an uplink to the cloud's ack",
            ["connection"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
        )
        self.spool_pending = Gauge(
            "iotflow_spool_pending", "Deliveries waiting in the spool", ["connection"], registry=r
        )
        self.connection_state = _States()
        r.register(self.connection_state)
        self.alarm_active = Gauge(
            "iotflow_alarm_active",
            "1 while a connection's alarm is raised",
            ["connection", "alarm"],
            registry=r,
        )
        self.spool_writable = Gauge(
            "iotflow_spool_writable",
            "0 while the spool cannot commit (disk full): uplinks are not acknowledged",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "iotflow_mqtt_connected", "1 while connected to the source broker", registry=r
        )
        self.downlinks = Counter(
            "iotflow_downlinks",
            "Downlinks from clouds, by connection and outcome (sent, or why it was refused)",
            ["connection", "outcome"],
            registry=r,
        )
        self.ingest_requests = Counter(
            "iotflow_ingest_requests",
            "HTTP ingest requests, by [[ingest]] id and result"
            " (accepted, rejected, unauthorized, unavailable)",
            ["ingest", "result"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "iotflow_dead_letters",
            "Dead letters kept (failed and expired deliveries), by connection",
            ["connection"],
            registry=r,
        )
        self.dead_letters_dropped = Counter(
            "iotflow_dead_letters_dropped",
            "Dead letters removed by [deadletters] retention or max_per_connection",
            ["connection"],
            registry=r,
        )
        self.replayed = Counter(
            "iotflow_replayed",
            "Replayed uplinks that ended, by connection and outcome",
            ["connection", "outcome"],
            registry=r,
        )
        self.config_reloads = Counter(
            "iotflow_config_reloads", "Config reloads, by result", ["result"], registry=r
        )

    def set_state(self, connection: str, state: ConnectionState) -> None:
        self.connection_state.current[connection] = state

    def forget_connection(self, connection: str) -> None:
        """A deleted connection leaves no stale series behind."""
        self.connection_state.current.pop(connection, None)
        for outcome in OUTCOMES:
            _remove(self.deliveries, connection, outcome)
        for result in DOWNLINK_OUTCOMES:
            _remove(self.downlinks, connection, result)
        for outcome in OUTCOMES:
            _remove(self.replayed, connection, outcome)
        for metric in (
            self.retries,
            self.latency,
            self.spool_pending,
            self.dead_letters,
            self.dead_letters_dropped,
        ):
            _remove(metric, connection)


class _States:
    """`iotflow_connection_state`: 1 for each connection's current state, 0 for the others,
    made at each scrape from one dict. A labelled Gauge held a child per state and
    connection, each with its lock: 5,000 made at start with 1,000 connections (issue #16)."""

    def __init__(self) -> None:
        self.current: dict[str, ConnectionState] = {}

    def describe(self) -> list[Metric]:
        return [_state_family()]

    def collect(self) -> list[Metric]:
        family = _state_family()
        for connection, state in list(self.current.items()):
            for s in STATES:
                family.add_metric([connection, s], 1 if s == state else 0)
        return [family]


def _state_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "iotflow_connection_state",
        "1 for the connection's current state",
        labels=["connection", "state"],
    )


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
