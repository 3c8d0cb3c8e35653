"""Configuration types of the connectors that call a web API at a host (Cumulocity,
ThingsBoard, Splunk HEC, InfluxDB): the host with an optional scheme and port, and the CA
of a private installation."""

from __future__ import annotations

import ipaddress
import re
import ssl
from typing import Annotated

from pydantic import AfterValidator, Field

# `c8y.example.com`, `c8y.example.com:8443`, `https://c8y.example.com`, `http://127.0.0.1:8443`,
# `[::1]:8443`: a scheme and a port are optional (DESIGN "Connectors"); a path is not, since
# these APIs live at the root of their host.
HOST_NAME_PATTERN = (
    r"^(?:[Hh][Tt][Tt][Pp][Ss]?://)?(?:[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?/?$"
)
_HOST_NAME = re.compile(
    r"^(?:(?P<scheme>https?)://)?(?P<host>[^/:\[\]]+|\[[^\]]+\])(?::(?P<port>[0-9]+))?/?$",
    re.IGNORECASE,
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def base_url(host_name: str) -> str:
    """`hostName` as the URL the API paths are appended to: `https://host[:port]`.

    The default scheme is https and its port 443, which the URL then leaves out.
    """
    match = _HOST_NAME.match(host_name.strip())
    if match is None:
        raise ValueError(f"{host_name!r} is not a host name with an optional scheme and port")
    scheme = (match["scheme"] or "https").lower()
    host = match["host"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
    port = int(match["port"]) if match["port"] else _DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    suffix = "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{host}{suffix}"


def _host_name(value: str) -> str:
    base_url(value)  # raises ValueError for a port out of range, a bad IPv6 literal
    return value


def _certificate(value: str | None) -> str | None:
    if value is not None:
        # Checked here so that a bad certificate is a 422 naming the field, not a
        # connection that fails at every delivery.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cadata=value)
        except (ssl.SSLError, ValueError, TypeError):  # TypeError: not ASCII
            raise ValueError("not a PEM certificate") from None
    return value


HostName = Annotated[
    str,
    Field(min_length=1, max_length=255, pattern=HOST_NAME_PATTERN),
    AfterValidator(_host_name),
]
# PEM of the CA that signed the server's certificate (the product's spelling of the key is
# `trustedCaCertficate`): private installations and local doubles. Absent: the system store.
CaCertificate = Annotated[str | None, AfterValidator(_certificate)]


def client_ssl(ca: str | None) -> ssl.SSLContext | bool:
    """What aiohttp verifies the server with: only `ca` when given, else the system store."""
    if ca is None:
        return True
    return ssl.create_default_context(cadata=ca)
