"""The config file: typed, validated, every problem with its key path."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from iotflow.cli import main
from iotflow.config.load import load_settings
from iotflow.config.types import format_duration, parse_duration
from iotflow.connectors.http import HttpConfig
from iotflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

GOOD = """
[mqtt]
url = "mqtt://user:pw@127.0.0.1:1884"
shared_group = "g1"
[[mqtt.subscriptions]]
topic = "application/+/device/+/event/up"
format = "chirpstack"

[delivery]
timeout = "2s"
retry_initial = "250ms"

[[connections]]
id = "datacake-main"
name = "Actility To Datacake"
connectorId = "actility-http-iot"
brand = "DATACAKE"
devices = ["0018b200-0000-0b20", "0018B20000000B20", "70:B3:D5:7E:D0:05:A1:B2"]
configuration.uplinkTimeValidity = "5m"
configuration.headers = { Authorization = "Token ${DATACAKE_TOKEN}" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "iotflow.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env=env or {})
    return {p.path: p.message for p in info.value.problems}


def test_good_file_is_typed(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), env={"DATACAKE_TOKEN": "s3cr3t"})
    config = settings.config
    assert config.mqtt.port == 1884
    assert config.mqtt.credentials() == ("user", "pw")
    assert config.delivery.timeout == timedelta(seconds=2)
    assert config.delivery.retry_initial == timedelta(milliseconds=250)
    (provisioned,) = settings.connections
    connection = provisioned.connection
    assert connection.provisioned
    assert isinstance(connection.configuration, HttpConfig)
    # The brand fills the default URL; the variable is read from the environment.
    assert connection.configuration.destinationURL == (
        "https://api.datacake.co/integrations/lorawan/actility"
    )
    assert connection.configuration.headers["Authorization"] == "Token s3cr3t"
    assert connection.validity_seconds == 300
    # Normalised and de-duplicated.
    assert provisioned.devices == ("0018B20000000B20", "70B3D57ED005A1B2")


def test_secrets_are_masked_on_output(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), env={"DATACAKE_TOKEN": "s3cr3t"})
    connection = settings.connections[0].connection
    assert "s3cr3t" not in str(connection.document())
    assert connection.document()["configuration"]["headers"]["Authorization"] == "*****"
    assert connection.document(reveal=True)["configuration"]["headers"]["Authorization"] == (
        "Token s3cr3t"
    )


def test_every_problem_is_listed_with_its_path(tmp_path: Path) -> None:
    text = """
[mqtt]
url = "http://nowhere"
colour = "blue"
[[mqtt.subscriptions]]
topic = "a/#/b"
format = "lorawan"
[delivery]
timeout = "10"
max_in_flight = 0
[log]
level = "loud"
[[connections]]
id = "x"
name = "no brand url"
connectorId = "actility-http-iot"
brand = "UNABIZ"
[[connections]]
id = "y"
name = "datacake without token"
connectorId = "actility-http-iot"
brand = "DATACAKE"
configuration = { sendMetadata = "sometimes", uplinkTimeValidity = "forever" }
[[connections]]
id = "z"
name = "unknown brand"
connectorId = "actility-http-iot"
brand = "ACME"
devices = ["not-a-eui"]
[[connections]]
id = "w"
name = "unknown connector"
connectorId = "carrier-pigeon"
"""
    found = problems(tmp_path, text, env={})
    assert set(found) >= {
        "mqtt.url",
        "mqtt.colour",
        "mqtt.subscriptions.0.topic",
        "mqtt.subscriptions.0.format",
        "delivery.timeout",
        "delivery.max_in_flight",
        "log.level",
        "connections[0].configuration.destinationURL",
        "connections[1].configuration.sendMetadata",
        "connections[1].configuration.uplinkTimeValidity",
        "connections[2].brand",
        "connections[3].connectorId",
    }
    assert found["mqtt.colour"] == "unknown field"


def test_missing_variable_and_duplicate_id(tmp_path: Path) -> None:
    cayenne = """
[[connections]]
id = "dup"
name = "cayenne"
connectorId = "actility-http-iot"
brand = "CAYENNE"
configuration = { description = "${UNSET_VARIABLE}" }
"""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, cayenne + cayenne), env={})
    found = [(p.path, p.message) for p in info.value.problems]
    assert (
        "connections[0].configuration.description",
        "environment variable UNSET_VARIABLE is not set",
    ) in found
    assert ("connections[1].id", "duplicate connection id 'dup'") in found


def test_variable_default(tmp_path: Path) -> None:
    text = '[api]\ntokens = ["${IOTFLOW_API_TOKEN:-}", "${OTHER:-fixed}"]\n'
    settings = load_settings(write(tmp_path, text), env={})
    assert [t.token.get_secret_value() for t in settings.config.api.tokens] == ["fixed"]


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in next(iter(problems(tmp_path, "[mqtt\nurl=").values()))
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml", env={})


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    text = """
[[connections]]
id = "q"
name = "qubitro"
connectorId = "actility-http-iot"
brand = "QUBITRO"
configuration = { headers = { projectId = "p-1", webhookSigningKey = "" }, downlinkAsKey = 42 }
"""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    assert "p-1" not in str(info.value)
    paths = {p.path for p in info.value.problems}
    assert "connections[0].configuration.downlinkAsKey" in paths


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("72h", 259200), ("1d", 86400), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@pytest.mark.parametrize("bad", ["", "10", "5 minutes", "-1s", 10, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(REPO / "config" / "iotflow.toml")]) == 0
    bad = write(tmp_path, "[log]\nlevel = 3\n[api]\nlisten = 'nowhere'\n")
    assert main(["check", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "log.level" in err
    assert "api.listen" in err


def test_every_problem_of_every_connection_at_once(tmp_path: Path) -> None:
    """A connection-level error (here DATACAKE's Authorization header) used to hide the
    problems found after it (its bad DevEUI), and an unknown field of the envelope hid
    those of the configuration: one `iotflow check` lists them all."""
    text = """
[[connections]]
id = "dc"
name = "datacake"
connectorId = "actility-http-iot"
brand = "DATACAKE"
devices = ["0018B20000000B20", "not-a-deveui"]
configuration = { headers = { Authorization = "Bearer wrong-scheme" } }

[[connections]]
id = "second"
name = "second"
connectorId = "actility-http-iot"
colour = "blue"
devices = ["XYZ"]
configuration = { destinationURL = "ftp://nowhere", uplinkTimeValidity = "soon" }

[[connections]]
id = "third"
name = "third"
connectorId = "no-such-connector"
devices = [42]
"""
    found = problems(tmp_path, text)
    assert "connections[0].configuration.headers.Authorization" in found
    assert found["connections[0].devices[1]"] == "expected a DevEUI of 16 hex digits"
    assert found["connections[1].colour"] == "unknown field"
    assert "connections[1].configuration.destinationURL" in found
    assert "connections[1].configuration.uplinkTimeValidity" in found
    assert found["connections[1].devices[0]"] == "expected a DevEUI of 16 hex digits"
    assert "connections[2].connectorId" in found
    assert found["connections[2].devices[0]"] == "expected a DevEUI of 16 hex digits"


@pytest.mark.parametrize("from_env", [True, False], ids=["IOTFLOW_CONFIG", "default"])
def test_check_without_c_says_which_file_and_why(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    from_env: bool,
) -> None:
    import iotflow.config.load as load

    good = write(tmp_path, "[log]\nlevel = 'info'\n")
    if from_env:
        monkeypatch.setenv("IOTFLOW_CONFIG", str(good))
    else:
        monkeypatch.delenv("IOTFLOW_CONFIG", raising=False)
        monkeypatch.setattr(load, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    code = main(["check"])
    out = capsys.readouterr()
    text = out.out + out.err
    if from_env:
        assert code == 0
        assert f"{good} (from $IOTFLOW_CONFIG)" in text
    else:
        assert code == 1
        assert f"{tmp_path / 'absent.toml'} (the default: $IOTFLOW_CONFIG is not set" in text
        assert "-c PATH" in text


def test_events_bound_is_a_validated_setting(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), env={}).config.events.max_per_connection == 1000
    text = "[events]\nmax_per_connection = 50\n"
    assert load_settings(write(tmp_path, text), env={}).config.events.max_per_connection == 50
    assert "events.max_per_connection" in problems(tmp_path, "[events]\nmax_per_connection = 0\n")


def test_protocol_and_qos(tmp_path: Path) -> None:
    text = """
[mqtt]
protocol = "3.1.1"
[[mqtt.subscriptions]]
topic = "v3/+/devices/+/up"
format = "tts"
qos = 0
[[mqtt.subscriptions]]
topic = "application/+/device/+/event/up"
format = "chirpstack"
"""
    mqtt = load_settings(write(tmp_path, text), env={}).config.mqtt
    assert mqtt.protocol == "3.1.1"
    assert [s.qos for s in mqtt.subscriptions] == [0, 1]
    # The defaults: MQTT 5, and a low reconnect cap for the local source broker.
    defaults = load_settings(write(tmp_path, "[mqtt]\n"), env={}).config.mqtt
    assert defaults.protocol == "5"
    assert defaults.reconnect_max == timedelta(seconds=2)
    assert (
        load_settings(write(tmp_path, "[mqtt]\nprotocol = 5\n"), env={}).config.mqtt.protocol == "5"
    )


@pytest.mark.parametrize(
    ("line", "path"),
    [
        ('protocol = "3"', "mqtt.protocol"),
        ('protocol = "v5"', "mqtt.protocol"),
        ("protocol = 3.1", "mqtt.protocol"),
        ('reconnect_max = "0s"', "mqtt.reconnect_max"),
    ],
)
def test_bad_mqtt_settings(tmp_path: Path, line: str, path: str) -> None:
    found = problems(tmp_path, f"[mqtt]\n{line}\n", env={})
    assert set(found) == {path}
    if path == "mqtt.protocol":
        assert found[path] == 'expected "5" or "3.1.1"'


@pytest.mark.parametrize("qos", ["2", '"1"', "true", "-1"])
def test_bad_qos(tmp_path: Path, qos: str) -> None:
    text = f'[[mqtt.subscriptions]]\ntopic = "t/#"\nformat = "tts"\nqos = {qos}\n'
    assert set(problems(tmp_path, text, env={})) == {"mqtt.subscriptions.0.qos"}


FLOWS = """
[[flows]]
id = "paris"
name = "Paris"
driver = { id = "actility:auto:1" }
matchers = [
  { type = "thing", tags = ["Site=Paris"] },
  { type = "key", key = "lora:0018b20000000b20" },
]
connectors = [
  { id = "actility-http-iot", connectionId = "datacake-main", uplinkTimeValidity = "72h" },
]
"""
ENV = {"DATACAKE_TOKEN": "x"}


def test_provisioned_flows_are_parsed_and_checked(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD + FLOWS), env=ENV)
    (flow,) = settings.flows
    assert (flow.id, flow.provisioned) == ("paris", True)
    assert flow.connectors[0].validity_seconds == 72 * 3600
    bad = FLOWS.replace('"72h"', '"0s"').replace('"Site=Paris"', '" "')
    assert set(problems(tmp_path, GOOD + bad, ENV)) == {
        "flows[0].connectors.0.uplinkTimeValidity",
        "flows[0].matchers.0.thing.tags.0",
    }
    no_id = problems(tmp_path, GOOD + FLOWS.replace('id = "paris"\n', ""), ENV)
    assert no_id == {"flows[0].id": "required in the config file"}
    unknown = problems(tmp_path, GOOD + FLOWS.replace("datacake-main", "api-only"), ENV)
    assert unknown == {"flows[0].connectors.0.connectionId": "not a connection of the config file"}
    dup = problems(tmp_path, GOOD + FLOWS + FLOWS, ENV)
    assert dup == {"flows[1].id": "duplicate flow id 'paris'"}
