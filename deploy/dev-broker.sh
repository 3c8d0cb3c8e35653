#!/usr/bin/env bash
# The MQTT broker of `make run`, at the address of [mqtt] url in $CONFIG
# (default config/iotflow.toml):
#   deploy/dev-broker.sh        use the broker listening there, else start Mosquitto
#                               (installing Debian's package if we may); its pid goes to
#                               var/mosquitto/mosquitto.pid
#   deploy/dev-broker.sh stop   stop the Mosquitto that this script started (`make stop`)
# VAR (default ./var) is where its config, state, log and pid file go.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
config="${CONFIG:-$root/config/iotflow.toml}"
var="${VAR:-$root/var}"
state="$var/mosquitto"
pidfile="$state/mosquitto.pid"

stop() {
    if [ ! -s "$pidfile" ]; then
        echo "broker: no Mosquitto started by make run ($pidfile is absent)"
        return 0
    fi
    local pid
    pid="$(cat "$pidfile")"
    # Only our Mosquitto: a stale pid file may name a process that reused the number.
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != mosquitto ]; then
        echo "broker: Mosquitto (pid $pid) is not running; removing $pidfile"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 100); do
        [ -e "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -e "/proc/$pid" ]; then
        echo "broker: Mosquitto (pid $pid) did not stop in 10 s" >&2
        return 1
    fi
    rm -f "$pidfile"
    echo "broker: stopped Mosquitto (pid $pid)"
}

if [ "${1:-start}" = stop ]; then
    stop
    exit
fi

python="$root/.venv/bin/python"
[ -x "$python" ] || python="${PYTHON:-python3}"
{ read -r scheme; read -r host; read -r port; read -r _listen; } < <("$python" "$root/deploy/dev-config.py" "$config")
where="$host:$port"

listening() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if listening; then
    echo "broker: using the one listening on $where (from $config)"
    exit 0
fi
case "$host" in
    127.0.0.1 | localhost | ::1) ;;
    *)
        echo "broker: nothing listens on $where ([mqtt] url of $config)." >&2
        echo "        start that broker, or point [mqtt] url at 127.0.0.1 for a local one." >&2
        exit 1
        ;;
esac
if [ "$scheme" = mqtts ] || [ "$scheme" = ssl ]; then
    echo "broker: nothing listens on $where, and a local broker for $scheme:// needs TLS" >&2
    echo "        set up by hand (deploy/mosquitto/mosquitto.conf)." >&2
    exit 1
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
        echo "broker: no MQTT broker on $where and mosquitto is not installed." >&2
        echo "        install it with:  sudo apt-get install mosquitto" >&2
        exit 1
    fi
fi

mkdir -p "$state"
sed -e "s|@VAR@|$state|g" -e "s|@HOST@|$host|g" -e "s|@PORT@|$port|g" \
    "$root/deploy/mosquitto/dev.conf.in" > "$state/dev.conf"
# Started as root, mosquitto drops to its own user: let that user write its state.
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown -R mosquitto "$state"
fi
"$bin" -d -c "$state/dev.conf"
for _ in $(seq 50); do
    if listening; then
        echo "broker: started Mosquitto on $where (state in $state; make stop stops it)"
        exit 0
    fi
    sleep 0.1
done
echo "broker: mosquitto did not start; see $state/mosquitto.log" >&2
exit 1
