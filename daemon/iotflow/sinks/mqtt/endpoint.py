"""Where an MQTT session connects: host, port, TLS, websockets; and its client id."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass

from iotflow.connectors.mqtt import MqttConfig

WEBSOCKET_PATH = "/mqtt"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a session connects. Its text form (for logs) never carries credentials."""

    host: str
    port: int
    tls: bool
    websockets: bool = False
    path: str = WEBSOCKET_PATH

    def __str__(self) -> str:
        scheme = (
            ("wss" if self.tls else "ws") if self.websockets else "mqtts" if self.tls else "mqtt"
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = self.path if self.websockets else ""
        return f"{scheme}://{host}:{self.port}{suffix}"


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` → (host, port). ValueError when malformed."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"malformed host {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""  # a name, an IPv4 address, or a bare IPv6 address
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"malformed port in {text!r}")
    return host, int(port_text)


def mqtt_endpoint(config: MqttConfig) -> Endpoint:
    """The broker of an `actility-mqtt-iot` connection: `hostName` and `protocol`."""
    tls = config.protocol in ("SSL", "WSS")
    websockets = config.protocol == "WSS"
    default = 443 if websockets else 8883 if tls else 1883
    host, port = split_host_port(config.hostName, default)
    return Endpoint(host, port, tls=tls, websockets=websockets)


def default_client_id(connection_id: str) -> str:
    """A client id that is the same at every start (so a persistent session is found again)
    and differs between the instances of a scale-out (a broker drops the older of two
    connections that share an id, so two instances with one id would take turns)."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
    return f"iotflow-{connection_id}-{host}"
