"""structlog, configured once: JSON lines on stdout (journald takes them) or console.

Everything the process prints goes through here, so that every line is one JSON object:
iotflow's own events, the standard library's `logging` of the libraries (aiohttp, asyncio,
aiomqtt, asyncpg...) through structlog's ProcessorFormatter, `warnings`, and the event
loop's unhandled errors. A traceback is the `exception` field of its line, never lines of
its own.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Libraries say what matters at WARNING and above; their INFO/DEBUG is chatter.
_LIBRARY_LEVEL = logging.WARNING
# Malformed HTTP requests logged per minute at most: a scanner must not drown the log.
MALFORMED_LINES = 100

log = structlog.get_logger("iotflow.telemetry")


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (garbage, a TLS hello, a bad request line) as
    "Error handling request" with a traceback. That is the client's mistake, expected on
    any open port: one warning line with the reason, no traceback, at most
    MALFORMED_LINES a minute."""

    def __init__(self) -> None:
        super().__init__()
        self._window = (0.0, 0)  # (minute start, lines in it)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            now = time.monotonic()
            start, lines = self._window
            if now - start >= 60:
                start, lines = now, 0
            self._window = (start, lines + 1)
            if lines > MALFORMED_LINES:
                return False
            if lines == MALFORMED_LINES:
                record.msg, record.args, record.exc_info, record.exc_text = (
                    "Too many malformed HTTP requests; logging them paused for a minute",
                    (),
                    None,
                    None,
                )
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                return True
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.msg, record.args, record.exc_info, record.exc_text = (
                "Malformed HTTP request",
                (),
                None,
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            # aiohttp's message goes on with the offending bytes and a caret: the first
            # line says what is wrong, the rest is the client's garbage.
            first = str(exc.message).splitlines()
            record.error = first[0].rstrip(": ") if first else "malformed request"
            record.status = exc.code
            record.remote = str(remote) if remote is not None else None
        return True


_MALFORMED = _MalformedRequests()


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler on the sys.stdout of the moment (see `configure`)."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ and setStream set it: always sys.stdout instead


def configure(level: str = "info", fmt: str = "json") -> None:
    """(Re)configure logging; called at start and on every reload (the level is reloadable)."""
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # No file given: each logger writes to the sys.stdout of the moment, not to the one
        # configure() saw (a stream swapped out since, then closed, would make every log
        # call raise: the worker's catch-all too).
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    # The standard library's records, rendered by the same processors into the same stream.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _StdoutHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LIBRARY_LEVEL)
    server = logging.getLogger("aiohttp.server")
    if _MALFORMED not in server.filters:
        server.addFilter(_MALFORMED)
    # warnings.warn() goes to the `py.warnings` logger instead of raw lines on stderr.
    logging.captureWarnings(True)


def install_loop_handler(loop: asyncio.AbstractEventLoop) -> None:
    """The event loop's unhandled errors ("Task exception was never retrieved", a failing
    callback) as one JSON line each, with the traceback in its `exception` field."""

    def handle(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        fields: dict[str, Any] = {"context": context.get("message", "")}
        task = context.get("future") or context.get("task")
        if task is not None:
            fields["task"] = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        if isinstance(exc, BaseException):
            log.error(
                "Unhandled error in the event loop",
                error=f"{type(exc).__name__}: {exc}",
                exc_info=exc,
                **fields,
            )
        else:
            log.error("Unhandled error in the event loop", error=fields.pop("context"), **fields)

    loop.set_exception_handler(handle)


def get_logger(name: str) -> Any:
    """The logger of a module: named `iotflow.<package>` (`iotflow.api`, `iotflow.sinks`),
    the same for every module of a package, so that splitting a module renames nothing."""
    return structlog.get_logger(name)
