"""Curators' verdicts on pairs: set and clear one, page through them, and the audit trail."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, delete, get, put
from litestar.params import Parameter

from lookalike.api.admission import client_key
from lookalike.api.controllers.params import ImageId
from lookalike.api.errors import BadRequestError
from lookalike.api.judgement_store import JudgementStore
from lookalike.api.openapi import DENIALS, REFUSALS, RefusableOperation
from lookalike.api.repository import ImageRepository
from lookalike.api.schemas import (
    AuditPage,
    Judgement,
    JudgementInput,
    JudgementPage,
    Verdict,
)
from lookalike.api.security import current_identity, requires_admin, requires_identity

JUDGEMENT_PATH = "/api/images/{image_id:int}/neighbours/{neighbour_id:int}/judgement"
MAX_JUDGEMENT_BODY = 16 * 1024  # a verdict and a 500-character note, with room to spare
MAX_PAGE = 500
SIGNED_IN: list[dict[str, list[str]]] = [{"bearerToken": []}, {"sessionCookie": []}]
WRITE: dict[str, Any] = {
    "guards": [requires_identity],
    "responses": {**DENIALS, **REFUSALS},
    "operation_class": RefusableOperation,
    "security": SIGNED_IN,
    "request_max_body_size": MAX_JUDGEMENT_BODY,
    "tags": ["judgements"],
}


@put(JUDGEMENT_PATH, sync_to_thread=True, **WRITE)
def put_judgement(
    request: Request[Any, Any, Any],
    repository: ImageRepository,
    judgement_store: JudgementStore,
    image_id: ImageId,
    neighbour_id: ImageId,
    data: JudgementInput,
) -> Judgement:
    """Set the caller's verdict on the pair (one per user and pair; a new one replaces it).

    The verdict is about the pair, whichever of the two images it is given from.
    """
    identity = _signed_in(request)
    _check_pair(repository, image_id, neighbour_id)
    note = (data.note or "").strip() or None
    when = judgement_store.record(
        image_id, neighbour_id, identity.id, data.verdict, note, client_key(request)
    )
    return Judgement(image_id, neighbour_id, identity.name, data.verdict, note, when)


@delete(JUDGEMENT_PATH, sync_to_thread=True, **WRITE)
def delete_judgement(
    request: Request[Any, Any, Any],
    repository: ImageRepository,
    judgement_store: JudgementStore,
    image_id: ImageId,
    neighbour_id: ImageId,
) -> None:
    """Clear the caller's verdict on the pair (nothing to clear is fine)."""
    identity = _signed_in(request)
    _check_pair(repository, image_id, neighbour_id)
    judgement_store.record(image_id, neighbour_id, identity.id, None, None, client_key(request))


@get("/api/judgements", sync_to_thread=True, tags=["judgements"])
def list_judgements(
    judgement_store: JudgementStore,
    offset: Annotated[int, Parameter(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 50,
    user: Annotated[str | None, Parameter(max_length=64, description="Only this user's")] = None,
    verdict: Verdict | None = None,
) -> JudgementPage:
    """Current judgements, newest first."""
    return judgement_store.page(offset, limit, user, verdict)


@get(
    "/api/judgements/history",
    sync_to_thread=True,
    guards=[requires_admin],
    responses=DENIALS,
    security=SIGNED_IN,
    tags=["judgements"],
)
def list_judgement_history(
    judgement_store: JudgementStore,
    offset: Annotated[int, Parameter(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 50,
) -> AuditPage:
    """Every change to a judgement, newest first, with who made it and from where (admins)."""
    total, items = judgement_store.audit(offset, limit)
    return AuditPage(total=total, offset=offset, limit=limit, items=items)


def _signed_in(request: Request[Any, Any, Any]) -> Any:
    identity = current_identity(request)
    assert identity is not None  # requires_identity let the request in
    return identity


def _check_pair(repository: ImageRepository, image_id: int, neighbour_id: int) -> None:
    """Both images exist and differ (404 / 400 otherwise)."""
    if image_id == neighbour_id:
        raise BadRequestError("an image and its neighbour must be two different images")
    repository.get_image_file(image_id)
    repository.get_image_file(neighbour_id)
