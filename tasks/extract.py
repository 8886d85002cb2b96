"""Extraction: features of batches of images, decoded in threads while the model runs.

The Prefect tasks, batching and the decoding pipeline; the model itself is tasks/models.py.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.assets import materialize
from prefect.cache_policies import NO_CACHE, CachePolicy

from lookalike.tasks.catalog import DEFAULT_MODEL_NAME, PendingImage, list_pending
from lookalike.tasks.database import DATABASE_RETRIES, engine_for
from lookalike.tasks.decode import (
    INPUT_SIZE,
    PREPROCESS_VERSION,
    DecodedImage,
    ImageDecodeError,
    decode_image,
)
from lookalike.tasks.models import FeatureModel, load_feature_model, parse_model_name
from lookalike.tasks.progress import advance_progress
from lookalike.tasks.report import (
    count_image_reads,
    record_staging_asset,
)
from lookalike.tasks.stage import feature_batch_path, read_table, write_feature_batch

log = logging.getLogger(__name__)

# Batches decoded ahead of the model. Pixels held at once: (PREFETCH_BATCHES + 1) batches,
# about 50 MB at batch size 64, however many images a run has.
PREFETCH_BATCHES = 2
# On a CPU, decoder threads run at this niceness so that they take the cores only when the
# model's threads leave them idle (benchmarks/extract.py measures the effect).
CPU_DECODE_NICENESS = 10
# Added to a batch's cache key when big JPEGs are decoded at reduced scale: other pixels,
# other features, so they must never share a staged file with full decodes.
REDUCED_SCALE_TAG = "jpeg-draft-reduced-scale"


@dataclass(frozen=True)
class Batch:
    """Images extracted together; the key names their staged Arrow file."""

    key: str
    images: tuple[PendingImage, ...]
    reduced_scale: bool = False  # decode big JPEGs at 1/2, 1/4 or 1/8 scale (part of the key)
    model: str = DEFAULT_MODEL_NAME  # stored model name: network and precision (in the key)


def batch_key(
    images: Sequence[PendingImage],
    weights_id: str,
    *,
    reduced_scale: bool = False,
    model: str = DEFAULT_MODEL_NAME,
) -> str:
    """Content address of a batch: model, weights, preprocessing and every image's hash.

    The model is its stored name, which names the precision unless it is float32
    (tasks.models.feature_model_name): float32 keys stay those of earlier versions.
    """
    digest = hashlib.blake2b(digest_size=20)
    input_size = parse_model_name(model)[0].input_size
    parts = [model, weights_id, PREPROCESS_VERSION, str(input_size)]
    if reduced_scale:  # only when on, so that keys of full decodes stay as they were
        parts.append(REDUCED_SCALE_TAG)
    for part in parts:
        digest.update(part.encode() + b"\0")
    for image in images:
        digest.update(image.content_hash.encode() + b"\0")
    return digest.hexdigest()


def plan_batches(
    pending: Sequence[PendingImage],
    batch_size: int,
    weights_id: str,
    *,
    reduced_scale: bool = False,
    model: str = DEFAULT_MODEL_NAME,
) -> list[Batch]:
    """Cut the pending images (sorted by file name) into batches of batch_size."""
    chunks = [tuple(pending[i : i + batch_size]) for i in range(0, len(pending), batch_size)]
    return [
        Batch(
            batch_key(chunk, weights_id, reduced_scale=reduced_scale, model=model),
            chunk,
            reduced_scale,
            model,
        )
        for chunk in chunks
    ]


def default_decode_workers() -> int:
    """One decoder thread per core; Pillow releases the GIL while it decodes and resizes.

    On a GPU decoding decides the wall time, so it gets every core. On a CPU the threads run
    at lower priority (CPU_DECODE_NICENESS): they fill the moments the model's threads leave a
    core idle instead of pre-empting them.
    """
    return max(1, os.cpu_count() or 1)


@dataclass
class ExtractTimings:
    """Where an extraction's time went; filled in by extract_batches when passed one."""

    images: int = 0
    decode_cpu: float = 0.0  # CPU seconds reading and decoding, summed over decoder threads
    wait: float = 0.0  # wall seconds the model stood idle waiting for decoded pixels
    model: float = 0.0  # wall seconds in the model
    write: float = 0.0  # wall seconds staging features to Arrow files


Decoded = DecodedImage | ImageDecodeError


def _decode_timed(
    path: Path, size: int, max_pixels: int, reduced_scale: bool
) -> tuple[Decoded, float]:
    """Decode one image and the thread's CPU seconds it took; a failure is returned, not raised."""
    started = time.thread_time()
    try:
        decoded: Decoded = decode_image(
            path, size=size, max_pixels=max_pixels, reduced_scale=reduced_scale
        )
    except ImageDecodeError as exc:
        decoded = exc
    return decoded, time.thread_time() - started


def _lower_thread_priority(niceness: int) -> None:
    """Raise the calling thread's niceness (Linux schedules threads one by one)."""
    if niceness <= 0:
        return
    try:
        thread_id = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, max(current, niceness))
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: same work, slower
        log.debug("decoder thread priority unchanged: %s", exc)


def decoded_batches(
    batches: Iterable[Batch],
    root: Path,
    workers: int,
    max_pixels: int,
    *,
    niceness: int = 0,
    timings: ExtractTimings | None = None,
    size: int = INPUT_SIZE,
) -> Iterator[tuple[Batch, list[Decoded]]]:
    """Batches with their images decoded to size x size; later batches decode meanwhile.

    The caller runs the model on one batch while the next decode. At most PREFETCH_BATCHES
    batches are decoded ahead, so memory stays bounded.
    """
    timings = timings if timings is not None else ExtractTimings()
    with ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix="decode",
        initializer=_lower_thread_priority,
        initargs=(niceness,),
    ) as pool:
        queue: deque[tuple[Batch, list[Future[tuple[Decoded, float]]]]] = deque()

        def next_done() -> tuple[Batch, list[Decoded]]:
            head, futures = queue.popleft()
            started = time.perf_counter()
            results = [future.result() for future in futures]
            timings.wait += time.perf_counter() - started
            timings.decode_cpu += sum(seconds for _, seconds in results)
            return head, [decoded for decoded, _ in results]

        for batch in batches:
            futures = [
                pool.submit(
                    _decode_timed, root / image.file_name, size, max_pixels, batch.reduced_scale
                )
                for image in batch.images
            ]
            queue.append((batch, futures))
            if len(queue) > PREFETCH_BATCHES:
                yield next_done()
        while queue:
            yield next_done()


def stage_decoded_batch(
    model: FeatureModel,
    batch: Batch,
    decoded: list[Decoded],
    staging_dir: Path,
    timings: ExtractTimings | None = None,
) -> Path:
    """Run the model on a batch's decoded images and stage the features with the failures."""
    timings = timings if timings is not None else ExtractTimings()
    started = time.perf_counter()
    good = [i for i, d in enumerate(decoded) if isinstance(d, DecodedImage)]
    features = np.zeros((len(decoded), model.spec.feature_dim), dtype=np.float32)
    if good:
        pixels = np.stack([decoded[i].pixels for i in good])  # type: ignore[union-attr]
        features[good] = model.embed(pixels)
    staged = time.perf_counter()
    timings.model += staged - started
    timings.images += len(decoded)
    path = write_feature_batch(
        feature_batch_path(staging_dir, batch.key),
        [image.file_name for image in batch.images],
        [image.content_hash for image in batch.images],
        [(d.width, d.height) if isinstance(d, DecodedImage) else None for d in decoded],
        [str(d) if isinstance(d, ImageDecodeError) else None for d in decoded],
        features,
    )
    timings.write += time.perf_counter() - staged
    return path


def extract_batches(
    batches: Sequence[Batch],
    root: Path,
    staging_dir: Path,
    *,
    weights: str,
    batch_size: int,
    workers: int = 0,
    max_pixels: int = 100_000_000,
    on_progress: Callable[[int], None] | None = None,
    timings: ExtractTimings | None = None,
) -> list[Path]:
    """Stage every batch not staged yet; TensorFlow is imported only when there is work.

    Batches planned with reduced_scale decode their big JPEGs at reduced scale. The batches
    of one call share their model (network and precision), which they name.
    """
    todo = [b for b in batches if not feature_batch_path(staging_dir, b.key).exists()]
    if todo:
        spec, precision = parse_model_name(todo[0].model)
        model = load_feature_model(weights, batch_size, spec, precision)
        for batch, decoded in decoded_batches(
            todo,
            root,
            workers or default_decode_workers(),
            max_pixels,
            niceness=0 if model.on_gpu else CPU_DECODE_NICENESS,
            timings=timings,
            size=model.spec.input_size,
        ):
            stage_decoded_batch(model, batch, decoded, staging_dir, timings)
            if on_progress:
                on_progress(len(batch.images))
    return [feature_batch_path(staging_dir, b.key) for b in batches]


def shard_is_staged(batches: Sequence[Batch], staging_dir: Path) -> bool:
    """True when every batch of the shard already has its staged Arrow file."""
    return all(feature_batch_path(staging_dir, b.key).exists() for b in batches)


class StagedShardPolicy(CachePolicy):
    """Cache key of an extraction shard: the content keys of its batches and the staging folder."""

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        digest = hashlib.blake2b(str(inputs["staging_dir"]).encode(), digest_size=16)
        for batch in inputs["batches"]:
            digest.update(batch.key.encode())
        return f"extract-shard-{digest.hexdigest()}"


@task(
    name="plan-batches",
    **DATABASE_RETRIES,
    cache_policy=NO_CACHE,
)
def plan_batches_task(
    database_url: str,
    batch_size: int,
    weights_id: str,
    reduced_scale: bool = False,
    model: str = DEFAULT_MODEL_NAME,
    source_id: int | None = None,
) -> list[Batch]:
    """Cut the pending images (of one source, or all) into content-addressed batches
    (reduced_scale: big JPEGs faster)."""
    pending = list_pending(engine_for(database_url), source_id)
    batches = plan_batches(
        pending, batch_size, weights_id, reduced_scale=reduced_scale, model=model
    )
    get_run_logger().info(
        "%d pending images in %d batches of up to %d%s",
        len(pending),
        len(batches),
        batch_size,
        ", big JPEGs decoded at reduced scale" if reduced_scale else "",
    )
    return batches


@dataclass(frozen=True)
class ShardResult:
    """What one extraction shard staged, and what it cost."""

    paths: list[str]
    decoded: int  # images handed to the decoder
    model_calls: int  # forward passes of the model
    bytes_read: int  # bytes of image files opened (counted by tasks.report.count_image_reads)
    seconds: float


def count_model_calls(batches: Sequence[Batch], staging_dir: Path, batch_size: int) -> int:
    """Forward passes that staging these batches took: one per batch_size decoded images."""
    calls = 0
    for batch in batches:
        table = read_table(feature_batch_path(staging_dir, batch.key))
        calls += -(-table.column("error").null_count // batch_size)  # null error: decoded
    return calls


@materialize(
    "file://lookalike/staging/features",  # the flow names the real staging folder
    name="extract-shard",
    cache_policy=StagedShardPolicy(),
    persist_result=True,
)
def extract_shard_task(
    batches: list[Batch],
    root: str,
    staging_dir: str,
    weights: str,
    batch_size: int,
    workers: int,
    max_pixels: int,
    progress_token: str = "",
) -> ShardResult:
    """Extract and stage the features of a few batches; cached by their content keys."""
    started = time.perf_counter()
    staging = Path(staging_dir)
    todo = [b for b in batches if not feature_batch_path(staging, b.key).exists()]

    with count_image_reads(root) as reads:
        paths = extract_batches(
            batches,
            Path(root),
            staging,
            weights=weights,
            batch_size=batch_size,
            workers=workers,
            max_pixels=max_pixels,
            on_progress=functools.partial(advance_progress, progress_token),
        )
    result = ShardResult(
        paths=[str(path) for path in paths],
        decoded=sum(len(b.images) for b in todo),
        model_calls=count_model_calls(todo, staging, batch_size),
        bytes_read=reads.bytes,
        seconds=round(time.perf_counter() - started, 3),
    )
    record_staging_asset(
        sum(len(b.images) for b in batches),
        len(batches),
        weights,
        batches[0].model if batches else DEFAULT_MODEL_NAME,
    )
    get_run_logger().info(
        "staged %d of %d batches: %d images decoded, %d model calls, %d image bytes read, %.1f s",
        len(todo),
        len(batches),
        result.decoded,
        result.model_calls,
        result.bytes_read,
        result.seconds,
    )
    return result
