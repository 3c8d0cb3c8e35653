#!/usr/bin/env python3
"""What `make run`'s helpers need from its config file ($CONFIG), one value a line:
the source broker's scheme, host and port, and the API's listen address.

`${VAR}` and `${VAR:-default}` are expanded as iotflow does; an unset variable without a
default is left empty rather than failing: this reads two addresses, it does not validate
(the daemon does, and says so).
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from urllib.parse import urlsplit

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand(value: str) -> str:
    return _VARIABLE.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)


def main(path: str) -> int:
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    mqtt = raw.get("mqtt", {}) if isinstance(raw.get("mqtt"), dict) else {}
    api = raw.get("api", {}) if isinstance(raw.get("api"), dict) else {}
    url = urlsplit(expand(str(mqtt.get("url", "mqtt://127.0.0.1:1883"))))
    tls = url.scheme in ("mqtts", "ssl")
    try:
        port = url.port or (8883 if tls else 1883)
    except ValueError:
        print(f"{path}: [mqtt] url has a bad port", file=sys.stderr)
        return 1
    print(url.scheme or "mqtt")
    print(url.hostname or "127.0.0.1")
    print(port)
    print(expand(str(api.get("listen", "127.0.0.1:8080"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "config/iotflow.toml"))
