"""One error shape for every answer that is not a success, and the middleware that keeps it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from iotflow.errors import ConfigError, ConflictError, NotFoundError, Problem, RegistryError
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer with status, a stable `code`, a human sentence and field-by-field details."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[Problem] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or {}

    def response(self) -> web.Response:
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "details": [{"path": p.path, "message": p.message} for p in self.details],
        }
        return web.json_response(body, status=self.status, headers=self.headers)


def invalid(problems: list[Problem], what: str = "request") -> ApiError:
    count = len(problems)
    noun = "problem" if count == 1 else "problems"
    return ApiError(422, "validation_failed", f"The {what} is invalid ({count} {noun}).", problems)


_HTTP_CODES = {
    404: ("not_found", "No such resource."),
    405: ("method_not_allowed", "This method is not allowed here."),
    413: ("payload_too_large", "The request body is too large."),
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Whatever goes wrong, the client gets the error shape, never a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except ConfigError as exc:
        return invalid(exc.problems).response()
    except NotFoundError as exc:
        return ApiError(404, "not_found", str(exc)).response()
    except ConflictError as exc:
        return ApiError(409, "conflict", str(exc)).response()
    except RegistryError as exc:
        log.error("Registry unavailable", error=str(exc))
        return ApiError(503, "registry_unavailable", "The registry is unavailable.").response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return ApiError(exc.status, code, message, headers=headers).response()
    except Exception:
        # A bug: logged with its traceback for us, a plain sentence for the client.
        log.exception("API request failed", method=request.method, path=request.path)
        return ApiError(500, "internal_error", "The request could not be processed.").response()
