"""Staging: feature batches and neighbour lists as uncompressed, memory-mappable Arrow IPC files."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from lookalike.tasks.errors import LookalikeError


def features_schema(dim: int) -> pa.Schema:
    """The schema of a staged feature batch whose vectors have dim values (the model's)."""
    return pa.schema(
        [
            ("file_name", pa.string()),
            ("content_hash", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("error", pa.string()),  # null when the image decoded and has features
            ("features", pa.list_(pa.float32(), dim)),
        ]
    )


NEIGHBOURS_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("rank", pa.int16()),
        ("neighbour_id", pa.int64()),
        ("distance", pa.float32()),
    ]
)


class StagingError(LookalikeError, RuntimeError):
    """The staging folder cannot be written; one line for the user."""


def feature_batch_path(staging_dir: Path, key: str) -> Path:
    """Where the batch with this content key is staged (two-level fan-out keeps folders small)."""
    return staging_dir / "features" / key[:2] / f"{key}.arrow"


def write_table_atomically(table: pa.Table, path: Path) -> Path:
    """Write an Arrow IPC file so that a reader (or a crash) never sees half of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # nothing to remove when the folder itself failed
            tmp.unlink()
        raise StagingError(f"cannot write staging file {path}: {exc.strerror or exc}") from exc
    return path


def write_feature_batch(
    path: Path,
    file_names: Sequence[str],
    content_hashes: Sequence[str],
    sizes: Sequence[tuple[int, int] | None],
    errors: Sequence[str | None],
    features: np.ndarray,
) -> Path:
    """Stage one extracted batch; features has one row per image (zeros where it failed), of
    the model's length."""
    if features.ndim != 2 or features.shape[0] != len(file_names) or features.shape[1] < 1:
        raise ValueError(f"features shape {features.shape} does not match {len(file_names)} images")
    dim = features.shape[1]
    flat = pa.array(np.ascontiguousarray(features, dtype="<f4").reshape(-1), type=pa.float32())
    mask = pa.array([err is not None for err in errors], type=pa.bool_())
    vectors = pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)
    table = pa.Table.from_arrays(
        [
            pa.array(file_names, pa.string()),
            pa.array(content_hashes, pa.string()),
            pa.array([s[0] if s else None for s in sizes], pa.int32()),
            pa.array([s[1] if s else None for s in sizes], pa.int32()),
            pa.array(errors, pa.string()),
            vectors,
        ],
        schema=features_schema(dim),
    )
    return write_table_atomically(table, path)


def read_table(path: Path) -> pa.Table:
    """A staged Arrow file, memory-mapped (no copy of its buffers)."""
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_file(source).read_all()


def feature_matrix(table: pa.Table) -> np.ndarray:
    """The (n, dim) float32 matrix of a feature table, a zero-copy view where possible; dim is
    the list size its schema records."""
    chunks = table.column("features")
    dim = chunks.type.list_size
    # combine_chunks() copies even a single chunk; a lone chunk can be viewed in place.
    column = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
    values = column.values.slice(column.offset * dim, len(column) * dim)
    return values.to_numpy(zero_copy_only=False).reshape(len(column), dim)


def write_neighbour_lists(
    path: Path, image_ids: np.ndarray, neighbour_ids: np.ndarray, distances: np.ndarray
) -> Path:
    """Stage neighbour lists as one row per (image, rank), in primary-key order."""
    n, k = neighbour_ids.shape
    if image_ids.shape != (n,) or distances.shape != (n, k):
        raise ValueError(
            f"neighbour lists of shapes {image_ids.shape}, {neighbour_ids.shape} "
            f"and {distances.shape} do not match"
        )
    table = pa.Table.from_arrays(
        [
            pa.array(np.repeat(image_ids.astype(np.int64), k)),
            pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), n)),
            pa.array(neighbour_ids.reshape(-1).astype(np.int64)),
            pa.array(distances.reshape(-1).astype(np.float32)),
        ],
        schema=NEIGHBOURS_SCHEMA,
    )
    return write_table_atomically(table, path)
