"""Extraction: weights identity, content-addressed batches, the model, and staged batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lookalike.tasks.catalog import PendingImage
from lookalike.tasks.decode import INPUT_SIZE, decode_image
from lookalike.tasks.discover import hash_file
from lookalike.tasks.extract import (
    WeightsError,
    batch_key,
    extract_batches,
    load_feature_model,
    plan_batches,
    shard_is_staged,
    weights_identity,
)
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


def test_weights_identity_names_each_kind(tmp_path: Path) -> None:
    assert weights_identity("imagenet") == "imagenet"
    assert weights_identity("none") == "none (random init, seed 0, numpy he-uniform)"
    with pytest.raises(WeightsError, match="not found"):
        weights_identity(str(tmp_path / "missing.h5"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match=".h5"):
        weights_identity(str(other))
    h5 = tmp_path / "mine.weights.h5"
    h5.write_bytes(b"first")
    first = weights_identity(str(h5))
    h5.write_bytes(b"second")
    assert first.startswith("file mine.weights.h5 (") and weights_identity(str(h5)) != first


def test_one_changed_image_changes_exactly_one_batch_key() -> None:
    images = [PendingImage(i, f"img{i:03d}.jpg", f"{i:032x}") for i in range(10)]
    batches = plan_batches(images, 4, "imagenet")
    assert [len(b.images) for b in batches] == [4, 4, 2]
    changed = list(images)
    changed[5] = PendingImage(5, "img005.jpg", "f" * 32)
    after = plan_batches(changed, 4, "imagenet")
    assert [a.key == b.key for a, b in zip(batches, after, strict=True)] == [True, False, True]
    assert batch_key(images[:4], "imagenet") != batch_key(images[:4], "none")


def test_random_init_model_is_seeded_and_batch_independent() -> None:
    model = load_feature_model("none", BATCH)
    pixels = np.random.default_rng(1).integers(0, 256, (5, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    features = model.embed(pixels)
    assert features.shape == (5, 2048) and features.dtype == np.float32
    assert np.isfinite(features).all()
    # The padded short batch gives the same vectors as a full one.
    np.testing.assert_allclose(model.embed(pixels[:3]), features[:3], rtol=1e-5, atol=1e-7)
    load_feature_model.cache_clear()
    again = load_feature_model("none", BATCH).embed(pixels)
    np.testing.assert_array_equal(again, features)


# Features of one image with weights "none", in a fresh Python process.
EMBED_IN_A_NEW_PROCESS = """
import sys
import numpy as np
from lookalike.tasks.decode import decode_image
from lookalike.tasks.extract import load_feature_model
pixels = decode_image(sys.argv[1]).pixels[None]
np.save(sys.argv[2], load_feature_model("none", 1).embed(pixels))
"""


@pytest.mark.slow
def test_random_init_gives_the_same_features_in_separate_processes(tmp_path: Path) -> None:
    (photo,) = write_photos(tmp_path, 1)
    outputs = [tmp_path / f"features-{i}.npy" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", EMBED_IN_A_NEW_PROCESS, str(photo), str(out)],
            cwd=Path(__file__).resolve().parents[1],
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outputs
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    first, second = (np.load(out) for out in outputs)
    assert first.shape == (1, 2048) and np.isfinite(first).all()
    assert 1.0 < float(np.linalg.norm(first)) < 1e4  # He-uniform keeps activations near unit scale
    np.testing.assert_array_equal(second, first)
    here = load_feature_model("none", BATCH).embed(decode_image(photo).pixels[None])
    np.testing.assert_allclose(here, first, rtol=1e-5, atol=1e-6)  # other batch size, same model


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


def test_weights_from_a_local_h5_file(tmp_path: Path) -> None:
    model = load_feature_model("none", BATCH)
    weights_file = tmp_path / "random.weights.h5"
    model.model.save_weights(weights_file)
    pixels = np.random.default_rng(2).integers(0, 256, (2, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    from_file = load_feature_model(str(weights_file), BATCH).embed(pixels)
    np.testing.assert_allclose(from_file, model.embed(pixels), rtol=1e-5, atol=1e-7)
