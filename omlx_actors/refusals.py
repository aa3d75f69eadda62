"""Typed refusals of a request, decided before its stream starts.

Each carries the HTTP status the front maps it to and an OpenAI-style `code` / `param`, so the
HTTP layer is a table lookup and the in-process API raises the same types.
"""

from __future__ import annotations


class RequestError(Exception):
    """A request the runtime will not run. `status` is the HTTP status the front answers."""

    status = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details or {}  # extra fields for the error body (e.g. the estimate)
        if code is not None:
            self.code = code

    def __reduce__(self):  # keep kw-only args through pickling (process boundary)
        return (_rebuild, (type(self), self.message, self.param, self.code, self.details))


def _rebuild(cls, message, param, code, details=None):
    return cls(message, param=param, code=code, details=details)


class InvalidRequest(RequestError):
    status = 400
    code = "invalid_request"


class ContextLengthExceeded(RequestError):
    status = 400
    code = "context_length_exceeded"


class ModelNotFound(RequestError):
    status = 404
    error_type = "not_found_error"
    code = "model_not_found"


class RequestTooLarge(RequestError):
    status = 413
    error_type = "request_too_large"
    code = "request_too_large"


class QueueFull(RequestError):
    status = 429
    error_type = "rate_limit_error"
    code = "queue_full"
    retry_after_s = 1


class EngineUnavailable(RequestError):
    status = 503
    error_type = "overloaded_error"
    code = "engine_unavailable"


class DuplicateRequestId(RequestError):
    status = 409
    code = "duplicate_request_id"
