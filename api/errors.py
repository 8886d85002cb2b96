"""The API's exceptions and the one place where they, and database errors, become HTTP answers."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap
from sqlalchemy.exc import SQLAlchemyError

from lookalike.tasks.database import describe_db_error

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error meant for the client; ``detail`` is one line, ``status_code`` its HTTP status."""

    status_code = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequestError(ApiError):
    """A parameter is outside what the route accepts."""

    status_code = 400


class ImageNotFoundError(ApiError):
    """No image, feature vector or file exists for the id."""

    status_code = 404


class PathOutsideRootError(ApiError):
    """A stored file name resolves outside the collection root (symlink, ``..``)."""

    status_code = 403


class UploadTooLargeError(ApiError):
    """The uploaded file is larger than Settings.upload_limit_mb."""

    status_code = 413


class UnreadableImageError(ApiError):
    """The bytes are not an image we can decode, or decoding would be a decompression bomb."""

    status_code = 422


class CorruptFeaturesError(ApiError):
    """A stored feature vector does not have 2048 float32 values."""

    status_code = 500


class ServiceUnavailableError(ApiError):
    """Something the route needs (database, model) is not available right now."""

    status_code = 503


def error_body(status_code: int, detail: str) -> dict[str, Any]:
    """The JSON body of every error answer, in the shape Litestar uses for its own."""
    return {"status_code": status_code, "detail": detail}


def handle_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[dict[str, Any]]:
    """Answer with the error's own status and one-line detail."""
    return Response(error_body(exc.status_code, exc.detail), status_code=exc.status_code)


def handle_database_error(
    request: Request[Any, Any, Any], exc: SQLAlchemyError
) -> Response[dict[str, Any]]:
    """503: the database is down, refuses us, or lacks the tables; the reason goes to the log."""
    log.error(
        "database error on %s %s: %s", request.method, request.url.path, describe_db_error(exc)
    )
    log.debug("database error details", exc_info=exc)
    return Response(error_body(503, "database unavailable"), status_code=503)


def handle_undecodable_text(
    request: Request[Any, Any, Any], exc: UnicodeDecodeError
) -> Response[dict[str, Any]]:
    """400: a form field or parameter that should be text is not UTF-8.

    Litestar reads a multipart part without a file name (filename="") as a text field, so a
    photo sent that way fails to decode here rather than in our handlers.
    """
    log.warning("undecodable text in %s %s: %s", request.method, request.url.path, exc)
    detail = "request data that should be text is not UTF-8 (send images as file parts)"
    return Response(error_body(400, detail), status_code=400)


async def reject_nul_in_path(request: Request[Any, Any, Any]) -> Response[dict[str, Any]] | None:
    """404 for a path holding a NUL byte: no route or file has one, and os.stat would raise.

    Async on purpose: Litestar runs a sync before_request hook in a worker thread.
    """
    if "\x00" in request.scope["path"]:
        return Response(error_body(404, "Not Found"), status_code=404)
    return None


def handle_unexpected_error(
    request: Request[Any, Any, Any], exc: Exception
) -> Response[dict[str, Any]]:
    """500 without a stack trace for the client; the trace goes to the log."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(error_body(500, "internal server error"), status_code=500)


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ApiError: handle_api_error,  # type: ignore[dict-item]
    SQLAlchemyError: handle_database_error,  # type: ignore[dict-item]
    UnicodeDecodeError: handle_undecodable_text,  # type: ignore[dict-item]
    # Litestar uses a 500 handler for every exception that is not one of its HTTPExceptions;
    # those (validation 400, unknown route 404, body too large 413) keep its default answer.
    HTTP_500_INTERNAL_SERVER_ERROR: handle_unexpected_error,
}
