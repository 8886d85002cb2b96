"""Row-block kNN without the Prefect engine: blocks, the staged matrix, the merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from lookalike.sql.schema import (
    STATUS_OK,
    image_features,
    image_names,
    image_neighbours,
)
from lookalike.tasks.database import connect_checked, engine_for
from lookalike.tasks.knn import knn_all
from lookalike.tasks.knn.plan import PassKind, list_depth
from lookalike.tasks.models import INCEPTION_V3
from lookalike.tasks.neighbour_blocks import (
    RowBlockInput,
    compute_row_block,
    knn_features_schema,
    merge_blocks,
    read_row_block,
    row_blocks,
    stage_knn_features,
    write_knn_features,
)
from lookalike.tasks.neighbours import read_staged_lists
from lookalike.tasks.sources import open_source
from lookalike.tasks.stage import feature_matrix, read_table

FEATURE_DIM = INCEPTION_V3.feature_dim  # the default model's, stored in the collection

K = 5


def random_features(n: int, seed: int = 7) -> np.ndarray:
    """n feature vectors of unit-ish length (distances near 1.4, far from float32 limits)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, FEATURE_DIM)) / np.sqrt(FEATURE_DIM)).astype(np.float32)


@pytest.mark.parametrize(
    ("images", "blocks", "expected"),
    [
        (0, 4, [(0, 0)]),  # one empty block, never none
        (1, 4, [(0, 1)]),
        (3, 8, [(0, 1), (1, 2), (2, 3)]),  # more blocks than images: one image each
        (10, 4, [(0, 2), (2, 5), (5, 7), (7, 10)]),
        (12, 4, [(0, 3), (3, 6), (6, 9), (9, 12)]),
        (7, 1, [(0, 7)]),
        (7, 0, [(0, 7)]),  # no worker threads reported still gives one block
    ],
)
def test_row_blocks_cover_every_row_once(
    images: int, blocks: int, expected: list[tuple[int, int]]
) -> None:
    assert row_blocks(images, blocks) == expected


def test_staged_knn_features_read_back_exactly(tmp_path: Path) -> None:
    ids = np.array([3, 8, 9, 40, 41], dtype=np.int32)  # any int dtype is stored as int64
    features = random_features(5)
    path = write_knn_features(tmp_path / "blocks" / "features.arrow", ids, features)

    assert path == tmp_path / "blocks" / "features.arrow"
    assert [p.name for p in path.parent.iterdir()] == ["features.arrow"]  # no temp file left
    table = read_table(path)
    assert table.schema == knn_features_schema(FEATURE_DIM) and table.num_rows == 5
    np.testing.assert_array_equal(table.column("image_id").to_numpy(), [3, 8, 9, 40, 41])
    assert feature_matrix(table).dtype == np.float32
    np.testing.assert_array_equal(feature_matrix(table), features)


def test_row_blocks_merged_equal_the_local_engine(tmp_path: Path) -> None:
    n = 37
    ids = np.arange(n, dtype=np.int64) * 3 + 5  # ids with gaps, in id order as staged
    features = random_features(n)
    folder = tmp_path / "staging" / "neighbours" / "blocks-test"
    matrix = write_knn_features(folder / "features.arrow", ids, features)
    staged = RowBlockInput(str(folder), str(matrix), n, [5, 8])

    blocks = row_blocks(n, 4)
    assert blocks == [(0, 9), (9, 18), (18, 27), (27, 37)]
    parts = [
        compute_row_block(str(matrix), a, b, K, str(folder / f"rows-{a}-{b}.arrow"))
        for a, b in blocks
    ]
    assert [(p.lists, p.images) for p in parts] == [(b - a, n) for a, b in blocks]
    plan = merge_blocks([p.path for p in parts], str(tmp_path / "staging"), K, staged)

    assert (plan.kind, plan.images, plan.rows, plan.refreshed_ids) == (
        PassKind.FULL,
        n,
        n * K,
        [5, 8],
    )
    assert plan.staged.parent == tmp_path / "staging" / "neighbours"
    merged = read_row_block(plan.staged, K)
    expected = knn_all(features, ids, K)
    np.testing.assert_array_equal(merged.image_ids, ids)
    np.testing.assert_array_equal(merged.neighbour_ids, expected.neighbour_ids)
    np.testing.assert_allclose(merged.distances, expected.distances, rtol=0, atol=1e-5)
    # Beside the table's lists, the deep ones the next update starts from (k plus a reserve).
    assert plan.deep is not None
    deep = read_staged_lists(plan.deep)
    depth = list_depth(K, n)
    assert depth > K
    np.testing.assert_array_equal(deep.neighbour_ids, knn_all(features, ids, depth).neighbour_ids)

    with pytest.raises(RuntimeError, match=rf"row blocks gave lists of shape \(27, {depth}\)"):
        merge_blocks([p.path for p in parts[:-1]], str(tmp_path / "staging"), K, staged)


# --- on a real database ----------------------------------------------------------------


def add_images(database_url: str, count: int, stale: int = 0) -> list[int]:
    """count ok images with features; the last `stale` of them not yet through a kNN pass."""
    engine = connect_checked(database_url)
    vectors = random_features(count, seed=11)
    ids: list[int] = []
    source = open_source(engine, Path("/images"), None)
    with engine.begin() as conn:
        for i in range(count):
            image_id = conn.execute(
                insert(image_names).values(
                    source_id=source.id,
                    file_name=f"img-{i:03d}.jpg",
                    content_hash=f"{i:032x}",
                    size=1000 + i,
                    mtime_ns=i,
                    status=STATUS_OK,
                    indexed=i < count - stale,
                )
            ).inserted_primary_key[0]
            ids.append(image_id)
            conn.execute(
                insert(image_features).values(
                    image_id=image_id, model="InceptionV3", features=vectors[i].tobytes()
                )
            )
    engine.dispose()
    return ids


def add_lists(database_url: str, ids: list[int], width: int) -> None:
    """Stored neighbour lists of `width` entries for every image (the next ids, cyclically)."""
    rows = [
        dict(image_id=i, rank=r, neighbour_id=ids[(pos + r) % len(ids)], distance=float(r))
        for pos, i in enumerate(ids)
        for r in range(1, width + 1)
    ]
    engine = connect_checked(database_url)
    with engine.begin() as conn:
        conn.execute(insert(image_neighbours), rows)
    engine.dispose()


def test_stage_knn_features_writes_every_ok_image_in_id_order(
    sqlite_url: str, tmp_path: Path
) -> None:
    ids = add_images(sqlite_url, 6, stale=2)
    staging = tmp_path / "staging"
    try:
        staged = stage_knn_features(sqlite_url, str(staging))
    finally:
        engine_for(sqlite_url).dispose()

    assert (staged.images, staged.refreshed_ids) == (6, ids[4:])
    folder = Path(staged.folder)
    assert folder.parent == staging / "neighbours" and folder.name.startswith("blocks-")
    assert staged.matrix == str(folder / "features.arrow")
    table = read_table(Path(staged.matrix))
    np.testing.assert_array_equal(table.column("image_id").to_numpy(), ids)
    np.testing.assert_array_equal(feature_matrix(table), random_features(6, seed=11))
