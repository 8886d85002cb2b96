"""Extraction: content-addressed batches, the decoding pipeline and staged batches.

The model itself is tested in tests/test_models.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lookalike.tasks.catalog import PendingImage
from lookalike.tasks.decode import INPUT_SIZE
from lookalike.tasks.discover import hash_file
from lookalike.tasks.extract import (
    batch_key,
    decoded_batches,
    extract_batches,
    plan_batches,
    shard_is_staged,
)
from lookalike.tasks.models import weights_identity
from lookalike.tasks.stage import feature_matrix, read_table
from tests.odd_images import write_odd_images, write_photos

BATCH = 4  # small batches keep the CPU model fast in tests


def pending_for(root: Path) -> list[PendingImage]:
    """Pending rows for every file under root, ids in file-name order."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [
        PendingImage(i + 1, p.relative_to(root).as_posix(), hash_file(p))
        for i, p in enumerate(files)
    ]


def test_one_changed_image_changes_exactly_one_batch_key() -> None:
    images = [PendingImage(i, f"img{i:03d}.jpg", f"{i:032x}") for i in range(10)]
    batches = plan_batches(images, 4, "imagenet")
    assert [len(b.images) for b in batches] == [4, 4, 2]
    changed = list(images)
    changed[5] = PendingImage(5, "img005.jpg", "f" * 32)
    after = plan_batches(changed, 4, "imagenet")
    assert [a.key == b.key for a, b in zip(batches, after, strict=True)] == [True, False, True]
    assert batch_key(images[:4], "imagenet") != batch_key(images[:4], "none")


def test_extract_stages_features_and_failures(tmp_path: Path) -> None:
    root, staging = tmp_path / "images", tmp_path / "staging"
    expected = write_odd_images(root)
    write_photos(root / "photos", 3)
    batches = plan_batches(pending_for(root), BATCH, weights_identity("none"))
    paths = extract_batches(batches, root, staging, weights="none", batch_size=BATCH)
    assert len(paths) == len(batches) and all(p.exists() for p in paths)
    rows: dict[str, str | None] = {}
    for path in paths:
        table = read_table(path)
        for name, error in zip(
            table.column("file_name").to_pylist(), table.column("error").to_pylist(), strict=True
        ):
            rows[name] = error
        assert np.isfinite(feature_matrix(table)).all()
    assert len(rows) == len(expected) + 3
    for name, status in expected.items():
        assert (rows[name] is None) == (status == "ok"), (name, rows[name])
    assert shard_is_staged(batches, staging)


def test_staged_batches_are_not_extracted_again(tmp_path: Path) -> None:
    root, staging = tmp_path / "images", tmp_path / "staging"
    write_photos(root, 5)
    batches = plan_batches(pending_for(root), BATCH, weights_identity("none"))
    extract_batches(batches, root, staging, weights="none", batch_size=BATCH)
    seen: list[int] = []
    extract_batches(
        batches, root, staging, weights="none", batch_size=BATCH, on_progress=seen.append
    )
    assert seen == []  # nothing decoded, the model never called


def test_file_deleted_after_discovery_fails_alone(tmp_path: Path) -> None:
    root, staging = tmp_path / "images", tmp_path / "staging"
    photos = write_photos(root, 3)
    batches = plan_batches(pending_for(root), BATCH, weights_identity("none"))
    photos[1].unlink()
    (path,) = extract_batches(batches, root, staging, weights="none", batch_size=BATCH)
    errors = read_table(path).column("error").to_pylist()
    assert errors[0] is None and errors[2] is None
    assert errors[1] == "file disappeared before extraction"


def test_images_are_decoded_to_the_size_asked_for(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_photos(root, 3)
    batches = plan_batches(pending_for(root), 2, weights_identity("none"))
    for size in (INPUT_SIZE, 64):
        decoded = [
            d for _, images in decoded_batches(batches, root, 2, 10**8, size=size) for d in images
        ]
        assert [d.pixels.shape for d in decoded] == [(size, size, 3)] * 3  # type: ignore[union-attr]


def test_extraction_runs_the_model_of_tasks_models() -> None:
    """Extraction builds its network with the loader of tasks.models, the API's loader too."""
    import lookalike.tasks.extract as extract
    import lookalike.tasks.models as models

    assert extract.load_feature_model is models.load_feature_model
