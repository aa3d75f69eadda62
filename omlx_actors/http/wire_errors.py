"""Errors on the wire: one `ApiError` value, rendered in the shape of the route it hit.

OpenAI routes answer `{"error": {"message", "type", "code", "param"}}`; the Anthropic route
(`/v1/messages`) answers `{"type": "error", "error": {"type", "message"}}`. Every failure
the front can see - a `RequestError` from a session, a werkzeug HTTP error (404, 405, 413,
a bad body), an unexpected exception - becomes one of these; nothing answers a bare 500 or
a stack trace.
"""

from __future__ import annotations

import logging

import attrs
import msgspec
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from omlx_actors.refusals import QueueFull, RequestError

log = logging.getLogger(__name__)

ANTHROPIC_PREFIX = "/v1/messages"
BODY_TOO_LARGE = "request_too_large"  # the code of a 413 for the body's size

# Anthropic's error `type` for each status it documents.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

_OPENAI_TYPES = {
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "overloaded_error",
}

_HTTP_CODES = {
    400: "bad_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: BODY_TOO_LARGE,
    415: "unsupported_media_type",
    500: "internal_error",
}


@attrs.frozen(kw_only=True)
class WireError:
    """What a client is told. `type` is the OpenAI error type; the Anthropic type is derived
    from the status. `retry_after_s` becomes a Retry-After header."""

    status: int
    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None
    retry_after_s: int | None = None
    # Extra fields for both shapes' error object, e.g. a memory refusal's estimate/limit.
    details: tuple[tuple[str, object], ...] = ()

    @property
    def openai_type(self) -> str:
        if self.type is not None:
            return self.type
        return _OPENAI_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    @property
    def anthropic_type(self) -> str:
        if self.status in _ANTHROPIC_TYPES:
            return _ANTHROPIC_TYPES[self.status]
        return "invalid_request_error" if self.status < 500 else "api_error"

    def openai_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "code": self.code,
                "param": self.param,
                **dict(self.details),
            }
        }

    def anthropic_body(self) -> dict:
        return {
            "type": "error",
            "error": {"type": self.anthropic_type, "message": self.message, **dict(self.details)},
        }

    def body_for(self, path: str) -> dict:
        return self.anthropic_body() if is_anthropic_path(path) else self.openai_body()


class ApiError(Exception):
    """Raised by routes to answer with a `WireError`."""

    def __init__(self, error: WireError) -> None:
        super().__init__(error.message)
        self.error = error


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(WireError(status=400, message=message, code=code, param=param))


def is_anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def from_request_error(exc: RequestError) -> WireError:
    return WireError(
        status=exc.status,
        message=exc.message,
        type=exc.error_type,
        code=exc.code,
        param=exc.param,
        retry_after_s=QueueFull.retry_after_s if isinstance(exc, QueueFull) else None,
        details=tuple(sorted(exc.details.items())),
    )


def from_http_exception(exc: HTTPException) -> WireError:
    status = exc.code or 500
    if status == 413:
        message = "the request body is larger than this server accepts"
    elif status == 404:
        message = f"no route for {request.method} {request.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.path}"
    else:
        message = exc.description or exc.name
    return WireError(status=status, message=message, code=_HTTP_CODES.get(status))


def error_response(error: WireError, path: str | None = None) -> Response:
    body = error.body_for(request.path if path is None else path)
    response = Response(msgspec.json.encode(body), status=error.status, mimetype="application/json")
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    if error.code == BODY_TOO_LARGE:
        # The rest of the body is never read: the connection cannot be reused, and saying
        # so keeps clients from sending their next request into it.
        response.headers["Connection"] = "close"
    return response


def install_error_handlers(app: Quart) -> None:
    """Every exception a handler can raise answers in the route's shape."""

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError):
        return error_response(exc.error)

    @app.errorhandler(RequestError)
    async def _request_error(exc: RequestError):
        return error_response(from_request_error(exc))

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException):
        return error_response(from_http_exception(exc))

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(
            WireError(status=500, message="internal server error", code="internal_error")
        )
