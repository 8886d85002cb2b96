"""The API's exceptions (Litestar's, by cause) and the one place where errors become answers."""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import (
    ClientException,
    HTTPException,
    InternalServerException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    ServiceUnavailableException,
    TooManyRequestsException,
    ValidationException,
)
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ExceptionHandlersMap
from sqlalchemy.exc import SQLAlchemyError

from lookalike.tasks.database import describe_db_error

log = logging.getLogger(__name__)


# Litestar's own exceptions, one subclass per cause so that the code raising them says why;
# handle_http_exception answers them, and Litestar's, with {"status_code": ..., "detail": ...}.


class BadRequestError(ValidationException):
    """A parameter is outside what the route accepts (400)."""


class ImageNotFoundError(NotFoundException):
    """No image, feature vector or file exists for the id (404)."""


class PathOutsideRootError(PermissionDeniedException):
    """A stored file name resolves outside the collection root: symlink, ``..`` (403)."""


class UploadTooLargeError(ClientException):
    """The uploaded file is larger than Settings.upload_limit_mb (413)."""

    status_code = HTTP_413_REQUEST_ENTITY_TOO_LARGE


class UnreadableImageError(ClientException):
    """Bytes that are no image we can decode, or whose decoding would be a bomb (422)."""

    status_code = HTTP_422_UNPROCESSABLE_ENTITY


class CorruptFeaturesError(InternalServerException):
    """A stored feature vector is not of its model's length, or of an unknown model (500)."""


class ServiceUnavailableError(ServiceUnavailableException):
    """Something the route needs (database, model) is not available right now (503)."""


class SignInRequiredError(NotAuthorizedException):
    """No identity, or a token or session that is not (or no longer) valid (401)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail=detail, headers={"WWW-Authenticate": 'Bearer realm="lookalike"'})


class AdminOnlyError(PermissionDeniedException):
    """A curator asked for what only admins may do (403)."""


class WritesDisabledError(ServiceUnavailableException):
    """The API has no writer database account (LOOKALIKE_WRITER_DATABASE_URL) (503)."""


class ServerBusyError(ServiceUnavailableException):
    """Every slot and queue place for this kind of work is taken (503, Retry-After)."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail=detail, headers={"Retry-After": str(retry_after)})


class TooManyRequestsError(TooManyRequestsException):
    """This client spent its allowance of this kind of request (429, Retry-After)."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail=detail, headers={"Retry-After": str(retry_after)})


def error_response(
    status_code: int, detail: str, exc: HTTPException | None = None
) -> Response[dict[str, Any]]:
    """A JSON error answer in Litestar's shape, whatever the route's own media type."""
    body: dict[str, Any] = {"status_code": status_code, "detail": detail}
    if exc is not None and exc.extra:  # Litestar's validation errors name the bad parameter
        body["extra"] = exc.extra
    headers = exc.headers if exc is not None else None
    return Response(body, status_code=status_code, headers=headers, media_type=MediaType.JSON)


def handle_http_exception(
    request: Request[Any, Any, Any], exc: HTTPException
) -> Response[dict[str, Any]]:
    """Litestar's exceptions and ours: status and detail, as JSON even on an SVG or file route.

    A 500 from Litestar itself (bad configuration, unserialisable answer) is a bug: its detail
    stays in the log. CorruptFeaturesError is a 500 whose detail the client is meant to see.
    """
    if exc.status_code == HTTP_500_INTERNAL_SERVER_ERROR and not isinstance(
        exc, CorruptFeaturesError
    ):
        return handle_unexpected_error(request, exc)
    return error_response(exc.status_code, exc.detail, exc)


def handle_database_error(
    request: Request[Any, Any, Any], exc: SQLAlchemyError
) -> Response[dict[str, Any]]:
    """503: the database is down, refuses us, or lacks the tables; the reason goes to the log."""
    log.error(
        "database error on %s %s: %s", request.method, request.url.path, describe_db_error(exc)
    )
    log.debug("database error details", exc_info=exc)
    return error_response(HTTP_503_SERVICE_UNAVAILABLE, "database unavailable")


def handle_undecodable_text(
    request: Request[Any, Any, Any], exc: UnicodeDecodeError
) -> Response[dict[str, Any]]:
    """400: a form field or parameter that should be text is not UTF-8.

    Litestar reads a multipart part without a file name (filename="") as a text field, so a
    photo sent that way fails to decode here rather than in our handlers.
    """
    log.warning("undecodable text in %s %s: %s", request.method, request.url.path, exc)
    detail = "request data that should be text is not UTF-8 (send images as file parts)"
    return error_response(HTTP_400_BAD_REQUEST, detail)


async def reject_nul_in_path(request: Request[Any, Any, Any]) -> None:
    """404 for a path holding a NUL byte: no route or file has one, and os.stat would raise.

    Async on purpose: Litestar runs a sync before_request hook in a worker thread.
    """
    if "\x00" in request.scope["path"]:
        raise NotFoundException()


def handle_unexpected_error(
    request: Request[Any, Any, Any], exc: Exception
) -> Response[dict[str, Any]]:
    """500 without a stack trace for the client; the trace goes to the log."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal server error")


# By class, not by status code: Litestar looks a status code up before the class, so a 500
# handler would also take CorruptFeaturesError; Exception catches everything else.
EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    HTTPException: handle_http_exception,  # type: ignore[dict-item]
    SQLAlchemyError: handle_database_error,  # type: ignore[dict-item]
    UnicodeDecodeError: handle_undecodable_text,  # type: ignore[dict-item]
    Exception: handle_unexpected_error,
}
