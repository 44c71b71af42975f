"""API errors in OpenAI's JSON shape."""

from __future__ import annotations

from starlette.responses import JSONResponse

MAX_MESSAGE_CHARS = 1000  # the most of an error message sent back (values in it are quoted briefly already)


class APIError(Exception):
    """A request the server refuses: an HTTP status, OpenAI's error type and the field at fault."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.kind, self.param = message, status, kind, param


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    message = err.message if len(err.message) <= MAX_MESSAGE_CHARS else err.message[:MAX_MESSAGE_CHARS] + "..."
    param = err.param if err.param is None or len(err.param) <= 100 else err.param[:100] + "..."
    body = {"error": {"message": message, "type": err.kind, "param": param, "code": err.status}}
    return JSONResponse(body, status_code=err.status, headers=headers)
