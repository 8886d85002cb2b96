"""Extraction throughput knobs: bounded prefetch, decoder priority, reduced-scale decoding."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.tasks.catalog import PendingImage
from lookalike.tasks.decode import DecodedImage, decode_image
from lookalike.tasks.extract import (
    PREFETCH_BATCHES,
    Batch,
    ExtractTimings,
    batch_key,
    decoded_batches,
    plan_batches,
)


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[PendingImage]:
    """count distinct JPEGs of this size, as pending catalog rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        coarse = rng.integers(0, 256, (size[1] // 50 + 2, size[0] // 50 + 2, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        picture.save(folder / f"img{i:03d}.jpg", quality=90)
        images.append(PendingImage(i + 1, f"img{i:03d}.jpg", f"{i:032x}"))
    return images


def test_reduced_scale_has_its_own_cache_key_and_off_keeps_the_old_one() -> None:
    images = [PendingImage(i, f"img{i}.jpg", f"{i:032x}") for i in range(6)]
    full = plan_batches(images, 4, "imagenet")
    reduced = plan_batches(images, 4, "imagenet", reduced_scale=True)
    assert [b.reduced_scale for b in full] == [False, False]
    assert [b.reduced_scale for b in reduced] == [True, True]
    assert {b.key for b in full}.isdisjoint(b.key for b in reduced)
    assert full[0].key == batch_key(images[:4], "imagenet")  # unchanged for existing caches


def test_decoding_runs_at_most_prefetch_batches_ahead(tmp_path: Path) -> None:
    images = write_jpegs(tmp_path, 2, (64, 48))
    batches = [Batch(f"{i:040x}", tuple(images)) for i in range(8)]
    pulled = 0

    def planned() -> Iterator[Batch]:
        nonlocal pulled
        for batch in batches:
            pulled += 1
            yield batch

    for consumed, (batch, decoded) in enumerate(decoded_batches(planned(), tmp_path, 2, 10**8)):
        assert pulled <= consumed + 1 + PREFETCH_BATCHES
        assert len(decoded) == len(batch.images)
    assert pulled == len(batches)


def test_decoder_threads_run_at_the_given_niceness(tmp_path: Path) -> None:
    images = write_jpegs(tmp_path, 3, (64, 48))
    batches = [Batch(f"{i:040x}", tuple(images)) for i in range(2)]
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for _ in decoded_batches(batches, tmp_path, 2, 10**8, niceness=base + 5):
        decoders = [t for t in threading.enumerate() if t.name.startswith("decode")]
        assert decoders
        for thread in decoders:
            assert thread.native_id is not None
            assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == base + 5
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the model's thread keeps its priority


def test_reduced_scale_batches_decode_big_jpegs_at_reduced_scale(tmp_path: Path) -> None:
    images = write_jpegs(tmp_path, 3, (1400, 1000))  # > 2 x 299: libjpeg decodes at 1/2 scale
    full = Batch("0" * 40, tuple(images))
    reduced = Batch("1" * 40, tuple(images), reduced_scale=True)
    timings = ExtractTimings()
    results = dict(decoded_batches([full, reduced], tmp_path, 2, 10**8, timings=timings))
    for image, got_full, got_reduced in zip(images, results[full], results[reduced], strict=True):
        assert isinstance(got_full, DecodedImage) and isinstance(got_reduced, DecodedImage)
        path = tmp_path / image.file_name
        expected = decode_image(path, reduced_scale=True).pixels
        np.testing.assert_array_equal(got_reduced.pixels, expected)
        np.testing.assert_array_equal(got_full.pixels, decode_image(path).pixels)
        assert not np.array_equal(got_full.pixels, got_reduced.pixels)
        assert (got_reduced.width, got_reduced.height) == (1400, 1000)  # original size kept
    assert timings.decode_cpu > 0
