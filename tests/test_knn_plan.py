"""The one decision between no pass, an incremental update and a full pass."""

from __future__ import annotations

import pytest

from lookalike.tasks.knn.plan import (
    INCREMENTAL_LIMIT,
    ListState,
    PassKind,
    choose_pass,
    list_length,
)


def state(
    images: int, changed: int = 0, deleted: int = 0, *, width: int, listed: int | None = None
):
    """A collection of `images` whose `listed` images (default all) have lists of `width`."""
    listed = images - changed if listed is None else listed
    return ListState(images, changed, deleted, stored_rows=listed * width, stored_images=listed)


def test_list_length_is_k_or_every_other_image() -> None:
    assert [list_length(3, n) for n in (0, 1, 2, 4, 10)] == [0, 0, 1, 3, 3]


def test_current_lists_need_nothing_and_rebuild_forces_a_full_pass() -> None:
    current = state(10, width=3)
    assert choose_pass(current, 3) is PassKind.UNCHANGED
    assert choose_pass(current, 3, rebuild=True) is PassKind.FULL
    assert choose_pass(state(1, width=0), 3) is PassKind.UNCHANGED  # one image: empty list


def test_lists_of_another_k_need_a_full_pass() -> None:
    assert choose_pass(state(10, width=3), 5) is PassKind.FULL
    assert choose_pass(state(10, changed=1, width=3), 5) is PassKind.FULL
    assert choose_pass(state(10, changed=1, width=2), 3) is PassKind.FULL


def test_few_changes_are_incremental_up_to_the_limit() -> None:
    at_limit = int(INCREMENTAL_LIMIT * 100)
    assert choose_pass(state(100, changed=at_limit, width=5), 5) is PassKind.INCREMENTAL
    assert choose_pass(state(100, changed=at_limit + 1, width=5), 5) is PassKind.FULL
    deleted_only = ListState(95, 0, 5, stored_rows=100 * 5, stored_images=100)
    assert choose_pass(deleted_only, 5) is PassKind.INCREMENTAL


def test_a_collection_that_outgrows_short_lists_is_incremental() -> None:
    # 4 images had lists of 3 (every other image); 1 more joins with k = 10: lists of 4 now.
    grown = ListState(5, 1, 0, stored_rows=4 * 3, stored_images=4)
    assert choose_pass(grown, 10) is PassKind.INCREMENTAL  # 1 of 5 is within 25 %
    grown = ListState(40, 6, 0, stored_rows=34 * 10, stored_images=34)
    assert choose_pass(grown, 10) is PassKind.INCREMENTAL


@pytest.mark.parametrize("rows", [0, 29, 31])
def test_missing_or_ragged_lists_are_never_current(rows: int) -> None:
    broken = ListState(10, 0, 0, stored_rows=rows, stored_images=10 if rows else 0)
    assert choose_pass(broken, 3) is PassKind.FULL
