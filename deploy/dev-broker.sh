#!/usr/bin/env bash
# Make sure an MQTT broker listens on 127.0.0.1:1883 for `make run`:
# use the one that is there, else start Mosquitto (installing Debian's package if we may).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
var="$root/var"

listening() { (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; }

if listening; then
    echo "broker: using the one listening on 127.0.0.1:1883"
    exit 0
fi

bin="$(command -v mosquitto || true)"
[ -z "$bin" ] && [ -x /usr/sbin/mosquitto ] && bin=/usr/sbin/mosquitto
if [ -z "$bin" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "broker: installing Debian's mosquitto package"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto
        bin=/usr/sbin/mosquitto
    else
        echo "broker: no MQTT broker on 127.0.0.1:1883 and mosquitto is not installed." >&2
        echo "        install it with:  sudo apt-get install mosquitto" >&2
        exit 1
    fi
fi

mkdir -p "$var/mosquitto"
sed "s|@VAR@|$var|g" "$root/deploy/mosquitto/dev.conf.in" > "$var/mosquitto/dev.conf"
# Started as root, mosquitto drops to its own user: let that user write its state.
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown -R mosquitto "$var/mosquitto"
fi
"$bin" -d -c "$var/mosquitto/dev.conf"
for _ in $(seq 50); do
    listening && { echo "broker: started mosquitto on 127.0.0.1:1883 (state in var/mosquitto)"; exit 0; }
    sleep 0.1
done
echo "broker: mosquitto did not start; see $var/mosquitto/mosquitto.log" >&2
exit 1
