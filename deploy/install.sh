#!/usr/bin/env bash
# Install or upgrade iotflow on a gateway host, from this checkout:
#   - a system user `iotflow`;
#   - a virtualenv in /opt/iotflow with iotflow and its dependencies;
#   - /etc/iotflow/iotflow.toml (from config/iotflow.production.toml, only if absent) and
#     /etc/iotflow/iotflow.env (a generated API token, only if absent);
#   - /var/lib/iotflow for the registry and the spool;
#   - /etc/systemd/system/iotflow.service, enabled and (re)started when systemd runs.
# Running it again upgrades: the package and the unit are replaced, the config and the
# data are kept, and a running service is restarted. docs/operations.md tells the rest.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/install.sh [options]
  --prefix DIR     where the virtualenv goes (default /opt/iotflow; env PREFIX)
  --destdir DIR    stage everything under DIR instead of / (packaging, tests; env DESTDIR).
                   Implies --no-user and --no-systemd. The virtualenv then only runs from
                   DIR: its scripts carry absolute paths.
  --python PATH    the Python 3.11+ to build the virtualenv with (default python3; env PYTHON)
  --wheels DIR     install offline from a wheelhouse made elsewhere with
                   `pip wheel -w DIR /path/to/iotflow` (same Python version and architecture)
  --no-user        do not create the `iotflow` system user
  --no-systemd     install the unit file but do not reload, enable or start anything
  -h, --help       this text
EOF
}

src="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${PREFIX:-/opt/iotflow}"
destdir="${DESTDIR:-}"
python="${PYTHON:-python3}"
wheels=""
create_user=1
use_systemd=1
user=iotflow

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --destdir) destdir="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --wheels) wheels="$(cd "$2" && pwd)"; shift 2 ;;
        --no-user) create_user=0; shift ;;
        --no-systemd) use_systemd=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "install: $*"; }
die() { echo "install: $*" >&2; exit 1; }

case "$prefix" in
    /?*) ;;
    *) die "--prefix must be an absolute path other than /, not '$prefix'" ;;
esac
if [ -n "$destdir" ]; then
    destdir="$(mkdir -p "$destdir" && cd "$destdir" && pwd)"
    # A staged tree is not this host's system: no user, no service manager.
    create_user=0
    use_systemd=0
elif [ "$(id -u)" != 0 ]; then
    die "run as root (or stage into a directory with --destdir)"
fi

venv="$destdir$prefix"
etc="$destdir/etc/iotflow"
state="$destdir/var/lib/iotflow"
unit="$destdir/etc/systemd/system/iotflow.service"
share="$venv/share/iotflow"

# -- Python --------------------------------------------------------------------------------
command -v "$python" >/dev/null 2>&1 || die "$python not found; on Debian: apt-get install python3"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "iotflow needs Python 3.11 or newer; $python is $("$python" -V 2>&1)"
"$python" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$python cannot create virtualenvs; on Debian: apt-get install python3-venv"

# -- user ----------------------------------------------------------------------------------
if [ "$create_user" = 1 ]; then
    if id "$user" >/dev/null 2>&1; then
        say "user $user exists"
    else
        nologin="$(command -v nologin || echo /usr/sbin/nologin)"
        useradd --system --user-group --home-dir /var/lib/iotflow --no-create-home \
            --shell "$nologin" --comment "iotflow LoRaWAN uplink router" "$user"
        say "created system user $user"
    fi
fi
# Ownership is given only to a user that exists (not in a staged tree without one).
owned_by_user() { [ "$(id -u)" = 0 ] && id "$user" >/dev/null 2>&1; }

# -- the virtualenv ------------------------------------------------------------------------
upgrade=0
[ -x "$venv/bin/iotflow" ] && upgrade=1
if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
    say "created the virtualenv $venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input --quiet)
if [ -n "$wheels" ]; then
    "${pip[@]}" install --upgrade --no-index --find-links "$wheels" iotflow
else
    # A local directory is always rebuilt and reinstalled; dependencies are upgraded
    # only as far as pyproject.toml's bounds allow.
    "${pip[@]}" install --upgrade "$src"
fi
say "installed $("$venv/bin/iotflow" --version) into $venv"

# Reference copies for the operator (and for diffing after an upgrade): the production
# config template, the unit as shipped, the docs and the deploy examples.
mkdir -p "$share/docs"
install -m 0644 "$src/config/iotflow.production.toml" "$share/iotflow.toml.example"
install -m 0644 "$src/systemd/iotflow.service" "$share/iotflow.service"
install -m 0644 "$src"/docs/*.md "$share/docs/"
for dir in mosquitto prometheus grafana postgresql; do
    rm -rf "${share:?}/$dir"
    cp -R "$src/deploy/$dir" "$share/$dir"
done
rm -f "$share/mosquitto/dev.conf.in"  # `make run`'s broker, not a gateway's

# -- configuration -------------------------------------------------------------------------
# /etc/iotflow is root:iotflow 0750: readable by the daemon, writable by root only.
install -d -m 0750 "$etc"
owned_by_user && chgrp "$user" "$etc"
if [ -e "$etc/iotflow.toml" ]; then
    say "kept $etc/iotflow.toml (compare with $share/iotflow.toml.example)"
else
    install -m 0640 "$src/config/iotflow.production.toml" "$etc/iotflow.toml"
    owned_by_user && chgrp "$user" "$etc/iotflow.toml"
    say "wrote $etc/iotflow.toml"
fi
if [ -e "$etc/iotflow.env" ]; then
    say "kept $etc/iotflow.env"
else
    # Read by systemd as root (EnvironmentFile=) before it drops privileges: root only.
    token="$("$python" -c 'import secrets; print(secrets.token_urlsafe(32))')"
    (
        umask 077
        cat >"$etc/iotflow.env" <<EOF
# Secrets of iotflow, as environment variables that iotflow.toml reads as \${VAR}.
# systemd reads this file as root (EnvironmentFile=); keep it mode 0600, owner root.
# After a change: systemctl restart iotflow. The daemon gets these variables at start only;
# a reload re-reads iotflow.toml with the environment it started with.
# NAME=value, one a line; quote a value in '...' if it has spaces or shell characters.
# Outside systemd: set -a; . ./iotflow.env; set +a
IOTFLOW_API_TOKEN=$token
# IOTFLOW_MQTT_PASSWORD=
# DATACAKE_TOKEN=
EOF
    )
    say "wrote $etc/iotflow.env with a new API token (IOTFLOW_API_TOKEN)"
fi

# -- state ---------------------------------------------------------------------------------
# systemd creates it too (StateDirectory=); made here for a start without systemd.
install -d -m 0750 "$state"
owned_by_user && chown "$user:$user" "$state"

# -- the unit ------------------------------------------------------------------------------
install -d -m 0755 "$(dirname "$unit")"
sed "s|/opt/iotflow|$prefix|g" "$src/systemd/iotflow.service" >"$unit.tmp"
chmod 0644 "$unit.tmp"
mv "$unit.tmp" "$unit"
say "installed $unit"

if [ "$use_systemd" = 0 ]; then
    say "systemd left alone (--no-systemd or --destdir)"
elif [ ! -d /run/systemd/system ]; then
    # sd_booted(3): without this directory systemd is not the running init (a container).
    say "systemd is not running here: the unit is installed but not enabled."
    say "run it by hand: sh -c 'set -a; . $etc/iotflow.env; exec runuser -u $user -- $prefix/bin/iotflow run'"
else
    systemctl daemon-reload
    systemctl enable iotflow.service
    if [ "$upgrade" = 1 ] && systemctl is-active --quiet iotflow.service; then
        # Blocks until the new version says READY=1 (or fails): the upgrade is seen to work.
        systemctl restart iotflow.service
        say "restarted iotflow.service on the new version"
    else
        # Not blocking: READY=1 waits for the broker, which may not be configured yet.
        systemctl start --no-block iotflow.service
        say "started iotflow.service; follow it with: journalctl -u iotflow -f -o cat"
    fi
fi
say "done. Next: edit $etc/iotflow.toml, then systemctl reload iotflow (docs/operations.md)"
