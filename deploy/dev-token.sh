#!/usr/bin/env bash
# The API token of `make run`: made once into var/api-token (mode 0600), printed with how
# to use it. The Makefile gives it to the daemon as IOTFLOW_API_TOKEN, which
# config/iotflow.toml reads ([api] tokens = ["${IOTFLOW_API_TOKEN:-}"]).
# VAR (default ./var) is where it goes; CONFIG says where the API listens.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
config="${CONFIG:-$root/config/iotflow.toml}"
var="${VAR:-$root/var}"
file="$var/api-token"
python="$root/.venv/bin/python"
[ -x "$python" ] || python="${PYTHON:-python3}"

mkdir -p "$var"
if [ ! -s "$file" ]; then
    # umask first: the file never exists with wider permissions, not even for a moment.
    (umask 077 && "$python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file.tmp")
    mv "$file.tmp" "$file"
    echo "api: made a token in ${file#"$root"/}"
fi
{ read -r _; read -r _; read -r _; read -r listen; } < <("$python" "$root/deploy/dev-config.py" "$config")
host="${listen%:*}"
case "$host" in "" | 0.0.0.0 | "[::]") host=127.0.0.1 ;; esac
echo "api: http://$host:${listen##*:}/iot-flow/v1 with the token of ${file#"$root"/}, e.g."
echo "       curl -H \"Authorization: Bearer \$(cat ${file#"$root"/})\" http://$host:${listen##*:}/iot-flow/v1/connections"
