"""The exact kNN engine: pure numpy, no Prefect.

Data flows space -> tiles -> rerank -> passes (full, row block) and incremental (updates);
order gives the full pass the order it visits rows in, threads holds the worker pool they
share, and plan decides which pass a state of the collection needs. Lists kept deeper
than k (plan.list_depth) let knn_update absorb deletions without recomputing rows;
prefix_lists cuts them back to k.
"""

from lookalike.tasks.knn.incremental import knn_update
from lookalike.tasks.knn.passes import (
    NeighbourLists,
    knn_all,
    knn_row_block,
    list_depths,
    list_length,
    merge_row_blocks,
    prefix_lists,
)
from lookalike.tasks.knn.plan import list_depth

__all__ = [
    "NeighbourLists",
    "knn_all",
    "knn_row_block",
    "knn_update",
    "list_depth",
    "list_depths",
    "list_length",
    "merge_row_blocks",
    "prefix_lists",
]
