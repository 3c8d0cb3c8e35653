"""`iotflow deadletters ...` and `iotflow replay ...`: the running daemon's API, from a shell.

The URL comes from the config file's `[api] listen` (or `--url`), the token from
`$IOTFLOW_API_TOKEN` (or `--token`); the token is never printed, not even in errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from iotflow.config.load import Settings

__all__ = ["add_commands", "run"]

_TIMEOUT = aiohttp.ClientTimeout(total=30)


def add_commands(commands: Any) -> None:
    """The subcommands, on `iotflow`'s parser."""
    letters = commands.add_parser(
        "deadletters", help="list, show, re-send or purge a connection's dead letters"
    )
    actions = letters.add_subparsers(dest="action", required=True)
    for name, text in (
        ("list", "list the dead letters, newest first"),
        ("show", "one dead letter, with its document"),
        ("resend", "re-send dead letters (by --id, or all matching the filters)"),
        ("purge", "delete the dead letters matching the filters (all without)"),
    ):
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument("connection", help="connection id")
        if name == "show":
            sub.add_argument("letter", type=int, help="dead letter id")
        else:
            sub.add_argument("--outcome", choices=("failed", "expired"))
            sub.add_argument("--device", help="DevEUI")
        if name == "list":
            sub.add_argument("--page", type=int, default=1)
            sub.add_argument("--per-page", type=int, default=20)
        if name == "resend":
            sub.add_argument("--id", type=int, action="append", dest="ids", help="repeatable")
        _common(sub)
    replay = commands.add_parser(
        "replay", help="send a connection the journal's uplinks of a time window again"
    )
    replay.add_argument("connection", help="connection id")
    replay.add_argument("--from", dest="start", required=True, help="ISO 8601 with offset")
    replay.add_argument("--to", dest="end", required=True, help="ISO 8601 with offset")
    replay.add_argument("--device", action="append", dest="devices", help="DevEUI, repeatable")
    _common(replay)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=None, help="config file (as for run)")
    parser.add_argument("--url", default=None, help="API base URL (default: from [api] listen)")
    parser.add_argument(
        "--token", default=None, help="API token (default: $IOTFLOW_API_TOKEN; never printed)"
    )


def base_url(settings: Settings) -> str:
    host = settings.config.api.host
    if host in ("0.0.0.0", "", "::"):  # listening everywhere: this host is one of them
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.config.api.port}"


async def run(args: argparse.Namespace, settings: Settings) -> int:
    token = args.token or os.environ.get("IOTFLOW_API_TOKEN", "")
    if not token:
        print("no API token: set $IOTFLOW_API_TOKEN or pass --token", file=sys.stderr)
        return 1
    url = (args.url or base_url(settings)).rstrip("/") + "/iot-flow/v1"
    cid = quote(args.connection, safe="")
    method, path, body = _request(args, cid)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=_TIMEOUT) as session,
            session.request(method, url + path, json=body, headers=headers) as response,
        ):
            text = await response.text()
            status = response.status
            total = response.headers.get("X-Total")
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"cannot reach the daemon at {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if status >= 400:
        print(describe_error(status, text), file=sys.stderr)
        return 1
    if text:
        data = orjson.loads(text)
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    if total is not None:
        print(f"{total} in all", file=sys.stderr)
    return 0


def describe_error(status: int, text: str) -> str:
    """The API's error body (`code`, `message`, `details`) as lines for a person; any
    other body (a proxy's page, say) as it came."""
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        return f"HTTP {status}: {text}".rstrip()
    lines = [f"error: {body['message']} (HTTP {status} {body.get('code', '')})".replace(" )", ")")]
    for detail in body.get("details") or []:
        if isinstance(detail, dict):
            path = detail.get("path") or "(request)"
            lines.append(f"  {path}: {detail.get('message', '')}")
    return "\n".join(lines)


def _request(args: argparse.Namespace, cid: str) -> tuple[str, str, Any]:
    if args.command == "replay":
        body: dict[str, Any] = {"from": args.start, "to": args.end}
        if args.devices:
            body["devEUIs"] = args.devices
        return "POST", f"/connections/{cid}/replay", body
    letters = f"/connections/{cid}/deadLetters"
    if args.action == "show":
        return "GET", f"{letters}/{args.letter}", None
    filters = {
        k: v for k, v in (("outcome", args.outcome), ("devEUI", args.device)) if v is not None
    }
    if args.action == "list":
        query = urlencode({**filters, "page": args.page, "perPage": args.per_page})
        return "GET", f"{letters}?{query}", None
    if args.action == "resend":
        if args.ids:
            return "POST", f"{letters}/resend", {"ids": args.ids}
        return "POST", f"{letters}/resend", {"all": True, **filters}
    query = urlencode(filters)
    return "DELETE", f"{letters}?{query}" if query else letters, None
