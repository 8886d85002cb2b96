"""The exact kNN engine: pure numpy, no Prefect.

Data flows space -> tiles -> rerank -> passes (full, row block) and incremental (updates);
threads holds the worker pool they share, and plan decides which pass a state of the
collection needs.
"""

from lookalike.tasks.knn.incremental import knn_update
from lookalike.tasks.knn.passes import (
    NeighbourLists,
    knn_all,
    knn_row_block,
    list_length,
    merge_row_blocks,
)

__all__ = [
    "NeighbourLists",
    "knn_all",
    "knn_row_block",
    "knn_update",
    "list_length",
    "merge_row_blocks",
]
