"""What an operator installs: the systemd unit, the install scripts, the source broker's
config, the Prometheus rules, the Grafana dashboard and the PostgreSQL setup. Each is
checked by the tool that will read it (systemd-analyze, promtool, mosquitto, psql) where
that tool is installed, and against the metrics the daemon really exports."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotflow.config.load import load_settings
from iotflow.registry import open_store
from iotflow.telemetry.metrics import Metrics
from support.ports import free_port
from support.postgres import Postgres

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "iotflow.service"
RULES = ROOT / "deploy" / "prometheus" / "iotflow-rules.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "iotflow-dashboard.json"
MOSQUITTO_CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
PG_SETUP = ROOT / "deploy" / "postgresql" / "setup.sql"
INSTALL = ROOT / "deploy" / "install.sh"
UNINSTALL = ROOT / "deploy" / "uninstall.sh"
PRODUCTION_CONFIG = ROOT / "config" / "iotflow.production.toml"

# The iotflow console script of the interpreter running the tests (the project's venv).
IOTFLOW_BIN = Path(sys.executable).parent / "iotflow"
# The worst `systemd-analyze security` exposure we accept (0 = locked down, 10 = none).
MAX_EXPOSURE = 2.0


def tool(name: str) -> str:
    """The path of a command-line tool, or skip the test that needs it, saying which."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def run(command: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, **kw)


# -- the systemd unit ----------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    """`Section.Key` → values in order (a key may repeat, as ExecReload= does)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return directives


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """The unit with its commands pointed at this venv's iotflow: systemd-analyze verify
    checks that every Exec*= binary exists, and /opt/iotflow is not installed here."""
    text = UNIT.read_text().replace("/opt/iotflow/bin/iotflow", str(IOTFLOW_BIN))
    path = tmp_path / "iotflow.service"  # the name matters: it is the unit's name
    path.write_text(text)
    return path


def test_the_unit_has_what_the_issue_asks_for() -> None:
    d = unit_directives(UNIT.read_text())
    config = "-c /etc/iotflow/iotflow.toml"
    assert d["Service.Type"] == ["notify"]
    assert d["Service.ExecStartPre"] == [f"/opt/iotflow/bin/iotflow check {config}"]
    assert d["Service.ExecStart"] == [f"/opt/iotflow/bin/iotflow run {config}"]
    # Check first, then signal: a bad file fails `systemctl reload` and is never loaded.
    assert d["Service.ExecReload"] == [
        f"/opt/iotflow/bin/iotflow check {config}",
        "/bin/kill -HUP $MAINPID",
    ]
    assert d["Service.User"] == ["iotflow"]
    assert d["Service.StateDirectory"] == ["iotflow"]
    assert d["Service.ConfigurationDirectory"] == ["iotflow"]
    assert d["Service.EnvironmentFile"] == ["-/etc/iotflow/iotflow.env"]
    assert d["Service.WatchdogSec"] == ["30s"]
    assert d["Service.Restart"] == ["on-failure"]
    assert d["Service.KillSignal"] == ["SIGTERM"]
    # The stop must outlast the drain of in-flight sends ([delivery] drain_timeout).
    drain = load_settings(PRODUCTION_CONFIG, env={"IOTFLOW_API_TOKEN": "t"}).config.delivery
    stop = d["Service.TimeoutStopSec"][0]
    assert stop.endswith("s")
    assert int(stop[:-1]) > drain.drain_timeout.total_seconds() + 10
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
    }.items():
        assert d[f"Service.{key}"] == [value], key
    assert "@system-service" in d["Service.SystemCallFilter"]
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_the_unit_passes_systemd_analyze_verify(testable_unit: Path) -> None:
    analyze = tool("systemd-analyze")
    result = run([analyze, "verify", str(testable_unit)])
    complaints = [line for line in result.stderr.splitlines() if "iotflow" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == [], result.stderr


def test_the_credentials_drop_in_of_the_docs_verifies(testable_unit: Path) -> None:
    """docs/operations.md shows a LoadCredential= drop-in; systemd must accept it."""
    analyze = tool("systemd-analyze")
    docs = (ROOT / "docs" / "operations.md").read_text()
    found = re.search(r"```ini\n(.*?)```", docs, re.DOTALL)
    assert found, "operations.md has no ```ini drop-in"
    credential = testable_unit.parent / "api-token"
    credential.write_text("token\n")
    drop_in = (
        found.group(1)
        .replace("/opt/iotflow/bin/iotflow", str(IOTFLOW_BIN))
        .replace("/etc/iotflow/credentials/api-token", str(credential))
    )
    assert "LoadCredential=" in drop_in
    directory = testable_unit.parent / "iotflow.service.d"
    directory.mkdir()
    (directory / "credentials.conf").write_text(drop_in)
    # The unit's own directory first (where its drop-ins are looked for), then the defaults.
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{testable_unit.parent}:"}
    result = run([analyze, "verify", str(testable_unit)], env=env)
    assert result.returncode == 0, result.stderr
    # The drop-in was read: a second ExecStart= without a reset would be refused.
    (directory / "credentials.conf").write_text(drop_in + "ExecStart=/bin/true\n")
    result = run([analyze, "verify", str(testable_unit)], env=env)
    assert result.returncode != 0


def test_the_unit_is_rated_well_by_systemd_analyze_security(testable_unit: Path) -> None:
    analyze = tool("systemd-analyze")
    result = run([analyze, "security", "--offline=true", "--no-pager", str(testable_unit)])
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for iotflow\.service: ([\d.]+) (\w+)", result.stdout)
    assert found, result.stdout
    exposure, rating = float(found.group(1)), found.group(2)
    print(f"systemd-analyze security: {exposure} {rating}")
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert rating in ("SAFE", "OK"), result.stdout


# -- PromQL as the rules and the dashboard write it ----------------------------------------

_PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "atan2",
    "inf",
    "nan",
    "group_left",
    "group_right",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (enough PromQL for our own queries)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, Grafana's $__rate_interval among them
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function or aggregation, or an operator
        names.add(word)
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        "histogram_quantile(0.99,"
        ' sum by (connection, le) (rate(a_bucket{x="y"}[$__rate_interval])))'
        " / on (connection) group_left b_total offset 5m or vector(1e3) unless up == bool 0"
        " and sum(c) by (le)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up", "c"}


def exported_metric_names() -> set[str]:
    """Every sample name the daemon's /metrics can show, with the suffixes Prometheus
    adds (`_total` of counters; `_bucket`, `_sum`, `_count` of histograms)."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_the_exported_metrics_are_the_contract() -> None:
    # docs/architecture.md "Observability": the names the rules and the dashboard use.
    assert exported_metric_names() == {
        "iotflow_uplinks_received_total",
        "iotflow_uplinks_rejected_total",
        "iotflow_uplinks_unrouted_total",
        "iotflow_deliveries_total",
        "iotflow_delivery_retries_total",
        "iotflow_delivery_latency_seconds_bucket",
        "iotflow_delivery_latency_seconds_sum",
        "iotflow_delivery_latency_seconds_count",
        "iotflow_spool_pending",
        "iotflow_connection_state",
        "iotflow_alarm_active",
        "iotflow_mqtt_connected",
        "iotflow_config_reloads_total",
        "iotflow_ingest_requests_total",
        # Added with downlinks (docs/downlinks.md), beyond the table of docs/architecture.md.
        "iotflow_downlinks_total",
        # Added with the disk-full handling (docs/operations.md "Disk full").
        "iotflow_spool_writable",
        # Dead letters and replays (docs/deadletters.md); the dropped counter is beyond
        # the table of docs/architecture.md.
        "iotflow_dead_letters",
        "iotflow_dead_letters_dropped_total",
        "iotflow_replayed_total",
    }


# -- Prometheus rules ----------------------------------------------------------------------

REQUIRED_ALERTS = {
    "IotflowAlarmActive",
    "IotflowDeliveriesExpiring",
    "IotflowDeliveriesFailing",
    "IotflowSpoolGrowing",
    "IotflowBrokerDisconnected",
    "IotflowReloadFailed",
    "IotflowConnectionNotOpened",
    "IotflowDown",
}


def load_rules() -> list[dict[str, Any]]:
    # PyYAML is a dev tool here, not a dependency of iotflow: skip when it is absent.
    yaml = pytest.importorskip("yaml")
    document = yaml.safe_load(RULES.read_text())
    rules: list[dict[str, Any]] = [r for g in document["groups"] for r in g["rules"]]
    return rules


def test_every_rule_is_complete() -> None:
    rules = load_rules()
    assert {r["alert"] for r in rules} >= REQUIRED_ALERTS
    assert len({r["alert"] for r in rules}) == len(rules), "alert names are unique"
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_the_rules_read_only_metrics_that_exist() -> None:
    exported = exported_metric_names()
    for rule in load_rules():
        # `up` is Prometheus's own, per scrape target.
        unknown = metric_names(rule["expr"]) - exported - {"up"}
        assert not unknown, f"{rule['alert']} reads {unknown}, which iotflow does not export"


def test_promtool_accepts_the_rules_and_the_scrape_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    # prometheus.yml names the rules file relatively: check them side by side.
    shutil.copy(PROMETHEUS, tmp_path / "prometheus.yml")
    shutil.copy(RULES, tmp_path / "iotflow-rules.yml")
    result = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


GW = {"instance": "gw:8080", "job": "iotflow"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    selector = ", ".join(f'{k}="{v}"' for k, v in {**GW, **labels}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def firing(at: str, alert: str, *expected: dict[str, str]) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [{"exp_labels": labels} for labels in expected],
    }


def test_the_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """`promtool test rules` on made-up series: each alert fires on its symptom, after its
    `for`, and not on a healthy series. Annotations are left out of the copy tested, so
    that rewording a description does not break the test."""
    promtool = tool("promtool")
    rules = [{k: v for k, v in r.items() if k != "annotations"} for r in load_rules()]
    rules_file = tmp_path / "rules.json"  # JSON is YAML, and needs no YAML writer
    rules_file.write_text(json.dumps({"groups": [{"name": "iotflow", "rules": rules}]}))
    inst = {"instance": "gw:8080"}
    crit, warn = {"severity": "critical"}, {"severity": "warning"}
    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("up", "1x5 0x20"),
                    series("iotflow_mqtt_connected", "1x5 0x20"),
                    series("iotflow_alarm_active", "0x5 1x20", connection="c1", alarm="night"),
                    series("iotflow_alarm_active", "0x25", connection="c2", alarm="night"),
                    series("iotflow_connection_state", "1x25", connection="c1", state="CLOSED"),
                    series("iotflow_connection_state", "1x25", connection="c2", state="OPENED"),
                    series("iotflow_connection_state", "0x25", connection="c2", state="CLOSED"),
                ],
                "alert_rule_test": [
                    firing("4m", "IotflowDown"),
                    firing("6m", "IotflowDown"),  # down for 1 minute: pending, not firing
                    firing("10m", "IotflowDown", {**GW, **crit}),
                    firing("6m", "IotflowBrokerDisconnected"),
                    firing("10m", "IotflowBrokerDisconnected", {**GW, **crit}),
                    firing(
                        "7m",
                        "IotflowAlarmActive",
                        {**GW, **warn, "connection": "c1", "alarm": "night"},
                    ),
                    firing("5m", "IotflowConnectionNotOpened"),
                    firing(
                        "15m",
                        "IotflowConnectionNotOpened",
                        {**GW, **warn, "connection": "c1", "state": "CLOSED"},
                    ),
                ],
            },
            {
                # Labelled counters appear at 1 on their first event: the first expiry, the
                # first refused reload must alert, not only later increases. (Every series
                # looks new until there are 15 minutes of history: no evaluation before.)
                "interval": "1m",
                "input_series": [
                    series(
                        "iotflow_deliveries_total", "_x20 1x60", connection="c1", outcome="expired"
                    ),
                    series(
                        "iotflow_deliveries_total", "3x30 4x40", connection="c2", outcome="expired"
                    ),
                    series(
                        "iotflow_deliveries_total", "_x20 1x60", connection="c1", outcome="failed"
                    ),
                    series(
                        "iotflow_deliveries_total", "0+10x80", connection="c3", outcome="delivered"
                    ),
                    series("iotflow_config_reloads_total", "_x20 1x60", result="failure"),
                    series("iotflow_config_reloads_total", "1x80", result="success"),
                ],
                "alert_rule_test": [
                    firing("17m", "IotflowDeliveriesExpiring"),
                    firing(
                        "25m", "IotflowDeliveriesExpiring", {**inst, **crit, "connection": "c1"}
                    ),
                    firing(
                        "33m",
                        "IotflowDeliveriesExpiring",
                        {**inst, **crit, "connection": "c1"},
                        {**inst, **crit, "connection": "c2"},
                    ),
                    firing(
                        "45m", "IotflowDeliveriesExpiring", {**inst, **crit, "connection": "c2"}
                    ),
                    firing("60m", "IotflowDeliveriesExpiring"),  # nothing new for 15 minutes
                    firing("17m", "IotflowDeliveriesFailing"),
                    firing("25m", "IotflowDeliveriesFailing", {**inst, **warn, "connection": "c1"}),
                    firing("60m", "IotflowDeliveriesFailing"),
                    firing("17m", "IotflowReloadFailed"),
                    firing("25m", "IotflowReloadFailed", {**inst, **warn}),
                    firing("70m", "IotflowReloadFailed"),  # nothing new for 30 minutes
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    series("iotflow_spool_pending", "0+10x100", connection="growing"),
                    series("iotflow_spool_pending", "5000x100", connection="steady"),
                    series("iotflow_dead_letters", "0+1x100", connection="growing"),
                    series("iotflow_dead_letters", "500x100", connection="steady"),
                    series("iotflow_delivery_retries_total", "0+5x60", connection="dead"),
                    series(
                        "iotflow_deliveries_total", "0x60", connection="dead", outcome="delivered"
                    ),
                    series("iotflow_delivery_retries_total", "0+5x60", connection="flaky"),
                    series(
                        "iotflow_deliveries_total",
                        "0+9x60",
                        connection="flaky",
                        outcome="delivered",
                    ),
                ],
                "alert_rule_test": [
                    # Growing for an hour, then 15 minutes more: fires; steady never.
                    firing("70m", "IotflowDeadLettersGrowing"),
                    firing(
                        "80m",
                        "IotflowDeadLettersGrowing",
                        {**GW, **warn, "connection": "growing"},
                    ),
                    firing("30m", "IotflowSpoolGrowing"),
                    firing(
                        "70m",
                        "IotflowSpoolGrowing",
                        {**GW, **warn, "connection": "growing"},
                    ),
                    firing(
                        "40m",
                        "IotflowDeliveriesRetrying",
                        {**inst, **warn, "connection": "dead"},
                    ),
                ],
            },
        ],
    }
    test_file = tmp_path / "tests.json"
    test_file.write_text(json.dumps(tests))
    result = run([promtool, "test", "rules", str(test_file)])
    assert result.returncode == 0, result.stdout + result.stderr


# -- the Grafana dashboard -----------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert inner, variable["definition"]
            found.append(inner.group(1))
    return found


def test_the_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "iotflow"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        # Every query goes to the data source the importer picks.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_the_dashboard_shows_every_metric_and_only_those(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(q) for q in queries(dashboard)))
    exported = exported_metric_names()
    assert not used - exported, (
        f"the dashboard reads metrics iotflow does not export: {used - exported}"
    )
    # Throughput, outcomes, retries, latency, spool, states, alarms, broker, reloads: all of it.
    unused = {n for n in exported if not n.endswith(("_sum", "_count"))} - used
    assert not unused, f"no panel shows {unused}"
    titles = {p["title"] for p in panels(dashboard)}
    assert {"Latency, receive to cloud ack (p50, p99)", "Connection states", "Alarms"} <= titles


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for, for promtool to parse."""
    for variable, value in (
        ("$__rate_interval", "1m"),
        ("$__range", "1h"),
        ("$instance", ".*"),
        ("$connection", ".*"),
    ):
        expr = expr.replace(variable, value)
    return expr


def test_promtool_parses_every_dashboard_query(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = tool("promtool")
    # As recording rules, the queries go through Prometheus's own parser.
    rules = [
        {"record": f"dashboard:query{i}", "expr": grafana_to_promql(expr)}
        for i, expr in enumerate(queries(dashboard))
    ]
    path = tmp_path / "dashboard-queries.json"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_connection_state_panel_shows_the_worst_state(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    promtool = tool("promtool")
    (panel,) = [p for p in panels(dashboard) if p["title"] == "Connection states"]
    expr = grafana_to_promql(panel["targets"][0]["expr"])
    codes = {
        o["text"]: int(v)
        for m in panel["fieldConfig"]["defaults"]["mappings"]
        for v, o in m["options"].items()
    }
    states = ("DEACTIVATED", "OPENING", "OPENED", "AUTHENTICATION_FAILED", "CLOSED")
    assert set(codes) == set(states)
    input_series = []
    # One connection per state; `two` is OPENED on one instance and CLOSED on another.
    for state in states:
        for other in states:
            input_series.append(
                series(
                    "iotflow_connection_state",
                    "1" if other == state else "0",
                    connection=state.lower(),
                    state=other,
                )
            )
    for instance, current in (("a:8080", "OPENED"), ("b:8080", "CLOSED")):
        for other in states:
            input_series.append(
                {
                    "series": "iotflow_connection_state"
                    f'{{instance="{instance}", connection="two", state="{other}"}}',
                    "values": "1" if other == current else "0",
                }
            )
    expected = [{"labels": f'{{connection="{s.lower()}"}}', "value": codes[s]} for s in states]
    expected.append({"labels": '{connection="two"}', "value": codes["CLOSED"]})
    test_file = tmp_path / "state-panel.json"
    test_file.write_text(
        json.dumps(
            {
                "rule_files": [],
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": input_series,
                        "promql_expr_test": [
                            {"expr": expr, "eval_time": "0m", "exp_samples": expected}
                        ],
                    }
                ],
            }
        )
    )
    result = run([promtool, "test", "rules", str(test_file)])
    assert result.returncode == 0, result.stdout + result.stderr


# -- install and uninstall -----------------------------------------------------------------


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=lambda p: p.name)
def test_the_scripts_are_sound_shell(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck") is None:
        return  # bash -n is all we can say; .ci/run installs shellcheck
    result = run(["shellcheck", str(script)])
    assert result.returncode == 0, result.stdout


def env_file_values(path: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in path.read_text().splitlines())
    return {k: v for k, _, v in pairs if k and not k.startswith("#")}


@pytest.mark.slow
def test_install_upgrade_and_uninstall_in_a_staged_tree(tmp_path: Path) -> None:
    """The scripts as a packager would run them: into a staged root (--destdir), so that
    this machine's /opt, /etc and users are not touched. pip installs the checkout."""
    root = tmp_path / "root"
    prefix = "/srv/iotflow"  # not the default: the unit's paths must follow it
    install = [str(INSTALL), "--destdir", str(root), "--prefix", prefix, "--python", sys.executable]
    result = run(install)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "systemd left alone" in result.stdout

    venv, etc, state = root / prefix.lstrip("/"), root / "etc/iotflow", root / "var/lib/iotflow"
    iotflow = venv / "bin" / "iotflow"
    assert iotflow.exists()
    assert (etc / "iotflow.toml").read_text() == PRODUCTION_CONFIG.read_text()
    assert stat.S_IMODE((etc / "iotflow.toml").stat().st_mode) == 0o640
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750
    assert stat.S_IMODE((etc / "iotflow.env").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o750
    secrets = env_file_values(etc / "iotflow.env")
    token = secrets["IOTFLOW_API_TOKEN"]
    assert len(token) >= 32
    unit = unit_directives((root / "etc/systemd/system/iotflow.service").read_text())
    assert unit["Service.ExecStart"] == [f"{prefix}/bin/iotflow run -c /etc/iotflow/iotflow.toml"]
    assert (venv / "share/iotflow/iotflow.toml.example").exists()
    assert (venv / "share/iotflow/docs/operations.md").exists()
    assert (venv / "share/iotflow/grafana/iotflow-dashboard.json").exists()

    # The installed iotflow runs, and accepts the installed config with the installed secrets.
    check = run(
        [str(iotflow), "check", "-c", str(etc / "iotflow.toml")], env={**os.environ, **secrets}
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK" in check.stdout

    # Again, as an upgrade: the operator's config and secrets stay as they are.
    (etc / "iotflow.toml").write_text(
        PRODUCTION_CONFIG.read_text() + "\n# edited by the operator\n"
    )
    (state / "registry.db").write_bytes(b"data")
    result = run(install)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kept" in result.stdout
    assert (etc / "iotflow.toml").read_text().endswith("# edited by the operator\n")
    assert env_file_values(etc / "iotflow.env")["IOTFLOW_API_TOKEN"] == token

    # Uninstall keeps the config and the data; twice is harmless.
    uninstall = [str(UNINSTALL), "--destdir", str(root), "--prefix", prefix]
    for _ in range(2):
        result = run(uninstall)
        assert result.returncode == 0, result.stdout + result.stderr
    assert not venv.exists()
    assert not (root / "etc/systemd/system/iotflow.service").exists()
    assert (etc / "iotflow.toml").exists()
    assert (state / "registry.db").read_bytes() == b"data"

    # --purge removes them too.
    result = run([*uninstall, "--purge"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert not etc.exists()
    assert not state.exists()


def test_uninstall_refuses_to_remove_what_is_not_a_virtualenv(tmp_path: Path) -> None:
    precious = tmp_path / "root" / "srv" / "data"
    precious.mkdir(parents=True)
    (precious / "keep.txt").write_text("mine")
    result = run([str(UNINSTALL), "--destdir", str(tmp_path / "root"), "--prefix", "/srv/data"])
    assert result.returncode != 0
    assert "not a virtualenv" in result.stderr
    assert (precious / "keep.txt").read_text() == "mine"


def test_the_scripts_refuse_a_bad_prefix(tmp_path: Path) -> None:
    for script in (INSTALL, UNINSTALL):
        result = run([str(script), "--destdir", str(tmp_path), "--prefix", "/"])
        assert result.returncode != 0
        assert "absolute path other than /" in result.stderr


def test_the_production_config_is_valid() -> None:
    settings = load_settings(PRODUCTION_CONFIG, env={"IOTFLOW_API_TOKEN": "secret"})
    config = settings.config
    assert config.registry.url == "sqlite:////var/lib/iotflow/registry.db"
    assert config.spool.path == "/var/lib/iotflow/spool.db"
    assert [t.get_secret_value() for t in config.api.tokens] == ["secret"]
    assert config.api.host == "127.0.0.1"


# -- the source broker's config ------------------------------------------------------------


class Broker:
    """deploy/mosquitto/mosquitto.conf with its port and paths moved into a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.log = directory / "mosquitto.log"
        self.config = directory / "mosquitto.conf"
        self.binary = tool("mosquitto")
        self.process: subprocess.Popen[bytes] | None = None
        text = MOSQUITTO_CONF.read_text()
        for old, new in (
            ("listener 1883 127.0.0.1", f"listener {self.port} 127.0.0.1"),
            ("persistence_location /var/lib/mosquitto/", f"persistence_location {directory}/"),
            ("pid_file /run/mosquitto/mosquitto.pid", f"pid_file {directory}/mosquitto.pid"),
            ("log_dest file /var/log/mosquitto/mosquitto.log", f"log_dest file {self.log}"),
        ):
            assert old in text, f"{old!r} is no longer in mosquitto.conf: update this test"
            text = text.replace(old, new)
        if os.geteuid() == 0:
            # As root mosquitto drops to its own user, which must own its files; without
            # that account it would fall back to `nobody` (see support/mosquitto.py).
            try:
                user = pwd.getpwnam("mosquitto")
                self.log.touch()
                for path in (directory, self.log):
                    os.chown(path, user.pw_uid, user.pw_gid)
            except KeyError:
                text = "user root\n" + text
        self.config.write_text(text)

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode() if self.process.stdout else ""
                raise AssertionError(f"mosquitto refused the config:\n{output}\n{self.log_text()}")
            if " running" in self.log_text()[offset:] and self._accepts():
                return
            time.sleep(0.05)  # polling another process's log
        raise AssertionError(f"mosquitto did not start:\n{self.log_text()}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # saves the persistence file
            self.process.wait(timeout=30)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def production_broker() -> Iterator[Broker]:
    # Not tmp_path: as root mosquitto runs as its own user, who cannot enter pytest's
    # 0700 temporary tree; a directory of its own is handed over instead.
    directory = Path(tempfile.mkdtemp(prefix="iotflow-deploy-mosquitto-"))
    broker = Broker(directory)
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(directory, ignore_errors=True)


def session_client(broker: Broker) -> aiomqtt.Client:
    """A client like iotflow's source: MQTT 5, persistent session, never a clean start."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier="iotflow-session-test",
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    )


async def test_the_broker_keeps_a_session_queue_across_its_restart(
    production_broker: Broker,
) -> None:
    production_broker.start()
    topic = "application/1/device/0018B20000000B20/event/up"
    async with session_client(production_broker) as client:
        await client.subscribe("application/+/device/+/event/up", qos=1)
    # iotflow is down: the broker queues for its session.
    async with aiomqtt.Client("127.0.0.1", production_broker.port) as publisher:
        for n in range(50):
            await publisher.publish(topic, f"uplink {n}".encode(), qos=1)
    # A restart of the broker itself (an upgrade, a reboot) keeps the queue.
    production_broker.stop()
    production_broker.start()
    received = []
    async with session_client(production_broker) as client:
        async with asyncio.timeout(20):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                received.append(message.payload.decode())
                if len(received) == 50:
                    break
    assert received == [f"uplink {n}" for n in range(50)]
    problems = [
        line
        for line in production_broker.log_text().splitlines()
        if re.search(r"\b(error|warning)\b", line, re.IGNORECASE)
    ]
    assert problems == []


# -- the fleet's PostgreSQL ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_postgres() -> Iterator[Postgres]:
    """A cluster of our own: setup.sql creates database `iotflow`, which the suite's
    shared cluster already has."""
    with Postgres(database="scratch") as server:
        yield server


def psql(
    server: Postgres, *args: str, user: str = "postgres", database: str = "postgres"
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return run(
        [
            str(server.bindir / "psql"),
            "-X",
            "-h",
            server.host,
            "-p",
            str(server.port),
            "-U",
            user,
            "-d",
            database,
            *args,
        ],
        env=env,
    )


async def test_setup_sql_gives_iotflow_what_it_needs_and_no_more(
    bare_postgres: Postgres, tmp_path: Path
) -> None:
    refused = psql(bare_postgres, "-f", str(PG_SETUP))
    assert "give the role a password" in refused.stdout + refused.stderr
    result = psql(
        bare_postgres, "-v", "ON_ERROR_STOP=1", "-v", "password=s3cret", "-f", str(PG_SETUP)
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # The daemon, as the role setup.sql made, migrates and uses its registry.
    url = f"postgresql://iotflow:s3cret@{bare_postgres.host}:{bare_postgres.port}/iotflow"
    config = tmp_path / "iotflow.toml"
    config.write_text(
        f'[registry]\nurl = "{url}"\n'
        "[[connections]]\n"
        'id = "c1"\nname = "one"\nconnectorId = "actility-http-iot"\n'
        'devices = ["0018B20000000B20"]\n'
        'configuration = { destinationURL = "https://example.com/up" }\n'
    )
    settings = load_settings(config, env={})
    store = open_store(url)
    try:
        assert await store.migrate() >= 1
        await store.reconcile_provisioned(list(settings.connections))
        assert [c.id for c in await store.list_connections()] == ["c1"]
        assert await store.get_device("0018B20000000B20") == ["c1"]
    finally:
        await store.close()

    # Its tables are in its own schema, and it owns nothing else.
    tables = psql(
        bare_postgres,
        "-At",
        "-c",
        "SELECT DISTINCT schemaname || ':' || tableowner FROM pg_tables"
        " WHERE tablename = 'connections'",
        database="iotflow",
    )
    assert tables.stdout.split() == ["iotflow:iotflow"]
    for statement in (
        "CREATE DATABASE other",
        "CREATE ROLE other",
        "CREATE TABLE public.t (x int)",
    ):
        denied = psql(bare_postgres, "-c", statement, user="iotflow", database="iotflow")
        assert denied.returncode != 0, statement
        assert "permission denied" in denied.stderr, denied.stderr
    # Nobody else may connect to the registry.
    psql(bare_postgres, "-c", "CREATE ROLE stranger LOGIN")
    stranger = psql(bare_postgres, "-c", "SELECT 1", user="stranger", database="iotflow")
    assert stranger.returncode != 0
    assert "permission denied" in stranger.stderr, stranger.stderr
