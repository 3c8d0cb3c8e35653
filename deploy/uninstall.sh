#!/usr/bin/env bash
# Remove iotflow installed by deploy/install.sh: stop and disable the service, remove the
# unit and /opt/iotflow. The config (/etc/iotflow) and the data (/var/lib/iotflow: the
# registry, and deliveries still waiting in the spool) are kept, with the `iotflow` user
# that owns them, unless --purge is given. Running it twice is harmless.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/uninstall.sh [options]
  --purge          also delete /etc/iotflow, /var/lib/iotflow and the iotflow user
  --prefix DIR     where the virtualenv is (default /opt/iotflow; env PREFIX)
  --destdir DIR    act on a tree staged with install.sh --destdir (env DESTDIR);
                   implies --no-systemd
  --no-systemd     do not stop, disable or reload anything
  -h, --help       this text
EOF
}

prefix="${PREFIX:-/opt/iotflow}"
destdir="${DESTDIR:-}"
purge=0
use_systemd=1
user=iotflow

while [ $# -gt 0 ]; do
    case "$1" in
        --purge) purge=1; shift ;;
        --prefix) prefix="$2"; shift 2 ;;
        --destdir) destdir="$2"; shift 2 ;;
        --no-systemd) use_systemd=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "uninstall: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "uninstall: $*"; }
die() { echo "uninstall: $*" >&2; exit 1; }

case "$prefix" in
    /?*) ;;
    *) die "--prefix must be an absolute path other than /, not '$prefix'" ;;
esac
if [ -n "$destdir" ]; then
    [ -d "$destdir" ] || die "no such directory: $destdir"
    destdir="$(cd "$destdir" && pwd)"
    use_systemd=0
elif [ "$(id -u)" != 0 ]; then
    die "run as root (or act on a staged tree with --destdir)"
fi

venv="$destdir$prefix"
etc="$destdir/etc/iotflow"
state="$destdir/var/lib/iotflow"
unit="$destdir/etc/systemd/system/iotflow.service"

if [ "$use_systemd" = 1 ] && [ -d /run/systemd/system ]; then
    # Stopping drains in-flight sends; what is left stays in the spool (kept below).
    systemctl disable --now iotflow.service 2>/dev/null || true
    say "stopped and disabled iotflow.service"
fi

if [ -e "$unit" ]; then
    rm -f "$unit"
    say "removed $unit"
fi
if [ "$use_systemd" = 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed iotflow.service 2>/dev/null || true
fi

if [ -e "$venv/pyvenv.cfg" ]; then
    rm -rf "$venv"
    say "removed $venv"
elif [ -e "$venv" ]; then
    # Never rm -rf a directory that is not the virtualenv we made (a wrong --prefix).
    die "$venv is not a virtualenv (no pyvenv.cfg); not removing it"
fi

if [ "$purge" = 1 ]; then
    rm -rf "$etc" "$state"
    say "purged $etc and $state"
    if [ -z "$destdir" ] && id "$user" >/dev/null 2>&1; then
        userdel "$user"
        say "removed user $user"
    fi
else
    for kept in "$etc" "$state"; do
        [ -e "$kept" ] && say "kept $kept (--purge deletes it)"
    done
fi
say "done"
