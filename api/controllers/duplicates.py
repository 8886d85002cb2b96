"""/api/duplicates: groups of exact and near-identical images, and one image's group."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from litestar import get
from litestar.exceptions import NotFoundException
from litestar.params import Parameter

from lookalike.api.controllers.params import ImageId
from lookalike.api.judgement_store import JudgementStore
from lookalike.api.repository import ImageRepository
from lookalike.api.schemas import (
    DuplicateGroup,
    DuplicateHistogram,
    DuplicateImage,
    DuplicatePage,
)
from lookalike.tasks.duplicate_reader import (
    DuplicatesNotFoundError,
    Group,
    GroupIndex,
    GroupIndexCache,
    group_containing,
    judged_members,
    with_members,
)
from lookalike.tasks.settings import MAX_DUPLICATE_THRESHOLD

MAX_GROUPS_PAGE = 200
Threshold = Annotated[
    float | None,
    Parameter(
        gt=0,
        le=MAX_DUPLICATE_THRESHOLD,
        description="Fraction of the median k-th-neighbour distance; default: the stored one",
    ),
]


@get("/api/duplicates", sync_to_thread=True, tags=["duplicates"])
def list_duplicates(
    repository: ImageRepository,
    duplicates: GroupIndexCache,
    threshold: Threshold = None,
    offset: Annotated[int, Parameter(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Parameter(ge=1, le=MAX_GROUPS_PAGE)] = 20,
) -> DuplicatePage:
    """Groups of duplicates, largest first, each with its representative first."""
    index = _index(duplicates, threshold)
    page = index.order[offset : offset + limit]
    return _page(index, with_members(repository.engine, index, page), offset, limit)


@get("/api/images/{image_id:int}/duplicates", sync_to_thread=True, tags=["duplicates"])
def get_image_duplicates(
    repository: ImageRepository,
    duplicates: GroupIndexCache,
    judgement_store: JudgementStore,
    image_id: ImageId,
    threshold: Threshold = None,
) -> DuplicatePage:
    """The group the image belongs to, with images curators judged "same object" (none: [])."""
    repository.get_image(image_id)  # 404 for an unknown image
    index = _index(duplicates, threshold)
    group = group_containing(index, image_id)
    groups = [] if group is None else with_members(repository.engine, index, [group])
    return _page(index, with_judged(repository, judgement_store, groups, image_id), 0, 1)


def with_judged(
    repository: ImageRepository, store: JudgementStore, groups: list[Group], image_id: int
) -> list[Group]:
    """The image's group, joined by the images curators marked "same object" with a member.

    Without a group, the image itself leads a group of those it was judged the same as.
    """
    members = [m.id for m in groups[0].members] if groups else [image_id]
    partners = store.same_object_partners(members)
    if not partners:
        return groups
    judged = judged_members(repository.engine, partners)
    if groups:
        return [Group(groups[0].id, groups[0].members + judged)]
    (itself,) = judged_members(repository.engine, {image_id})
    representative = replace(itself, distance=0.0, kind="exact")
    return [Group(image_id, [representative, *judged])]


def _index(duplicates: GroupIndexCache, threshold: float | None) -> GroupIndex:
    try:
        return duplicates.get(threshold)
    except DuplicatesNotFoundError as exc:
        raise NotFoundException(str(exc)) from None


def _page(index: GroupIndex, groups: list[Group], offset: int, limit: int) -> DuplicatePage:
    return DuplicatePage(
        threshold=index.threshold,
        distance=index.distance,
        scale=index.scale,
        total_groups=len(index.order),
        images_in_groups=index.images,
        offset=offset,
        limit=limit,
        groups=[
            DuplicateGroup(
                id=g.id,
                size=len(g.members),
                images=[
                    DuplicateImage(
                        m.id, m.file_name, m.source, m.size, m.width, m.height, m.distance, m.kind
                    )
                    for m in g.members
                ],
            )
            for g in groups
        ],
        histogram=DuplicateHistogram(
            edges=index.histogram["edges"], counts=index.histogram["counts"]
        ),
    )
