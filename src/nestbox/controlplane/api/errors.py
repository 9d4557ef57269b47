"""The one place errors become HTTP answers: `{"error": {"code", "message"}}`, with the status
`protocol.errors.HTTP_STATUS` gives the code. Unexpected exceptions are logged once here (a
summary at ERROR, the traceback at DEBUG) and answered 500 `internal_error` without details."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from nestbox.controlplane.errors import ControlPlaneError
from nestbox.protocol.errors import HTTP_STATUS, ErrorBody, ErrorCode

if TYPE_CHECKING:
    from collections.abc import Mapping

    from starlette.requests import Request
    from starlette.types import ExceptionHandler

log = logging.getLogger(__name__)

STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.INVALID_REQUEST,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.UNAVAILABLE,
}


def error_response(
    code: ErrorCode,
    message: str,
    *,
    status: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> JSONResponse:
    doc = ErrorBody.of(code, message).model_dump(mode="json")
    doc.update(extra or {})
    return JSONResponse(doc, status_code=status or HTTP_STATUS[code])


async def on_control_plane_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ControlPlaneError)
    if exc.code is ErrorCode.INTERNAL:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    response = error_response(exc.code, exc.message, extra=exc.extra())
    response.headers.update(exc.headers())
    return response


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own: unknown paths (404) and wrong methods (405)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    code = STATUS_CODES.get(exc.status_code, ErrorCode.INTERNAL)
    message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
    response = error_response(code, message, status=exc.status_code)
    response.headers.update(exc.headers or {})
    return response


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %r", request.method, request.url.path, exc)
    log.debug("traceback", exc_info=exc)
    return error_response(ErrorCode.INTERNAL, "internal error")


EXCEPTION_HANDLERS: dict[type[Exception] | int, ExceptionHandler] = {
    ControlPlaneError: on_control_plane_error,
    HTTPException: on_http_exception,
    Exception: on_unexpected,
}
