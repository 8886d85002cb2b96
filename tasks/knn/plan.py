"""Which neighbour pass a collection needs: none, an incremental update, or a full pass."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Deep lists keep this many entries beyond k, at least _MIN_RESERVE and a quarter of k: a
# source's images are spread over the feature space, so removing 10% of the images at
# random takes Binomial(depth, 0.1) entries from every list. A list of 125 (k = 100) then
# drops below 100 with probability 2.4e-4 (about 4 of 18,000 rows to recompute); 28
# (k = 20) with 1.2e-3, 18 (k = 10) with 2.1e-5. Removing 20% at once would recompute
# about 45% of the rows at k = 100 (the update then falls back to a full pass).
_MIN_RESERVE = 8
# Past this share of changed images an incremental update (changed * n * d, plus merging
# into every kept list) costs about as much as a symmetric full pass (n * n * d / 2).
INCREMENTAL_LIMIT = 0.25


class PassKind(enum.Enum):
    """What a run does to the neighbour lists."""

    UNCHANGED = "unchanged"  # every list is complete and current: nothing to compute
    INCREMENTAL = "incremental"  # update the stored lists for the changed and deleted images
    FULL = "full"  # compute every list from scratch


@dataclass(frozen=True)
class ListState:
    """What the database holds, as far as the choice of pass is concerned."""

    images: int  # images with features (status ok)
    changed: int  # ok images whose lists are missing or stale (new or re-extracted)
    deleted: int  # images that still have lists but are gone or failed
    stored_rows: int  # rows of the neighbour table
    stored_images: int  # images that have a list in the neighbour table


def list_length(k: int, n: int) -> int:
    """Entries per list: k, or every other image when there are fewer."""
    return max(0, min(int(k), n - 1))


def reserve(k: int) -> int:
    """Entries a deep list keeps beyond k, so that deletions rarely leave fewer than k."""
    return max(_MIN_RESERVE, -(-int(k) // 4))


def list_depth(k: int, n: int) -> int:
    """Entries per deep list (k plus its reserve), or every other image when there are fewer.

    The one place that decides how deep stored lists are kept; see _MIN_RESERVE.
    """
    return list_length(int(k) + reserve(k), n)


def choose_pass(state: ListState, k: int, *, rebuild: bool = False) -> PassKind:
    """The one place that decides between no pass, an incremental update and a full pass.

    Stored lists can be updated only when they were made for this k (every stored image has
    list_length(k, stored images) entries) and few images changed; rebuild forces a full pass.
    """
    if rebuild:
        return PassKind.FULL
    current = state.stored_rows == state.images * list_length(k, state.images)
    if current and not state.changed and not state.deleted:
        return PassKind.UNCHANGED
    stored_width = list_length(k, state.stored_images)
    usable = state.stored_images > 0 and state.stored_rows == state.stored_images * stored_width
    if usable and state.changed <= INCREMENTAL_LIMIT * max(state.images, 1):
        return PassKind.INCREMENTAL
    return PassKind.FULL
