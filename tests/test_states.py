"""Connection states and delivery outcomes: the enums carry exactly the contract's strings
(docs/architecture.md), and what leaves the daemon (JSON, metric labels, event kinds) is
those plain strings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import orjson

from iotflow.states import ConnectionState, Outcome
from iotflow.telemetry.metrics import Metrics

ARCHITECTURE = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()


def test_states_are_the_documented_ones() -> None:
    start = ARCHITECTURE.index("Connection states, as in the product")
    # "...: DEACTIVATED (`active=false`), OPENING, OPENED, AUTHENTICATION_FAILED, CLOSED (..."
    listed = ARCHITECTURE[start : ARCHITECTURE.index(" (cloud unreachable", start)]
    documented = re.findall(r"\b[A-Z][A-Z_]{4,}\b", listed)
    assert [state.value for state in ConnectionState] == documented


def test_outcomes_are_the_documented_ones() -> None:
    (row,) = [line for line in ARCHITECTURE.splitlines() if "`iotflow_deliveries_total`" in line]
    listed = re.search(r"`outcome` \(([^)]*)\)", row)
    assert listed is not None
    assert [outcome.value for outcome in Outcome] == listed.group(1).split(", ")


def test_on_the_wire_they_are_plain_strings() -> None:
    document = {"state": ConnectionState.AUTHENTICATION_FAILED, "outcome": Outcome.EXPIRED}
    expected = {"state": "AUTHENTICATION_FAILED", "outcome": "expired"}
    assert json.loads(json.dumps(document)) == expected
    assert orjson.loads(orjson.dumps(document)) == expected
    assert f"delivery_{Outcome.DROPPED}" == "delivery_dropped"

    metrics = Metrics()
    metrics.set_state("c1", ConnectionState.CLOSED)
    metrics.deliveries.labels("c1", Outcome.FILTERED).inc()
    sample = metrics.registry.get_sample_value
    assert sample("iotflow_connection_state", {"connection": "c1", "state": "CLOSED"}) == 1
    assert sample("iotflow_connection_state", {"connection": "c1", "state": "OPENED"}) == 0
    assert sample("iotflow_deliveries_total", {"connection": "c1", "outcome": "filtered"}) == 1
    metrics.forget_connection("c1")
    assert sample("iotflow_deliveries_total", {"connection": "c1", "outcome": "filtered"}) is None
