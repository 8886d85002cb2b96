"""Extraction: InceptionV3 features for batches of images, decoded in parallel with the model."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE, CachePolicy

from sql.schema import FEATURE_DIM
from tasks.catalog import MODEL_NAME, PendingImage, list_pending
from tasks.database import engine_for, retry_if_transient
from tasks.decode import (
    INPUT_SIZE,
    PREPROCESS_VERSION,
    DecodedImage,
    ImageDecodeError,
    decode_image,
)
from tasks.progress import report_progress
from tasks.stage import feature_batch_path, write_feature_batch

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
PREFETCH_BATCHES = 2


class WeightsError(ValueError):
    """The --weights value cannot be used; one line for the user."""


@dataclass(frozen=True)
class Batch:
    """Images extracted together; the key names their staged Arrow file."""

    key: str
    images: tuple[PendingImage, ...]


def weights_identity(weights: str) -> str:
    """A stable name for the weights, stored with the collection and in cache keys."""
    if weights == "imagenet":
        return "imagenet"
    if weights == "none":
        return f"none (random init, seed {RANDOM_INIT_SEED})"
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"weights must be 'imagenet', 'none' or an .h5 file; not found: {weights}"
        )
    if not path.name.endswith(".h5"):
        raise WeightsError(f"weights file must be a Keras .h5 file: {weights}")
    digest = hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()
    return f"file {path.name} ({digest})"


def batch_key(images: Sequence[PendingImage], weights_id: str) -> str:
    """Content address of a batch: model, weights, preprocessing and every image's hash."""
    digest = hashlib.blake2b(digest_size=20)
    for part in (MODEL_NAME, weights_id, PREPROCESS_VERSION, str(INPUT_SIZE)):
        digest.update(part.encode() + b"\0")
    for image in images:
        digest.update(image.content_hash.encode() + b"\0")
    return digest.hexdigest()


def plan_batches(pending: Sequence[PendingImage], batch_size: int, weights_id: str) -> list[Batch]:
    """Cut the pending images (sorted by file name) into batches of batch_size."""
    chunks = [tuple(pending[i : i + batch_size]) for i in range(0, len(pending), batch_size)]
    return [Batch(batch_key(chunk, weights_id), chunk) for chunk in chunks]


def default_decode_workers() -> int:
    """One decoder thread per core; Pillow releases the GIL while it decodes and resizes."""
    return max(1, os.cpu_count() or 1)


class FeatureModel:
    """InceptionV3 without its top, average-pooled: uint8 pixels in, 2048 float32 out."""

    def __init__(self, weights: str, batch_size: int) -> None:
        import keras
        import tensorflow as tf

        self.weights_id = weights_identity(weights)
        self.model_name = MODEL_NAME
        self.batch_size = batch_size
        self.on_gpu = bool(tf.config.list_physical_devices("GPU"))
        _configure_devices(tf, keras, self.on_gpu)
        if weights == "none":
            keras.utils.set_random_seed(RANDOM_INIT_SEED)
        self.model = keras.applications.InceptionV3(
            include_top=False,
            pooling="avg",
            input_shape=(INPUT_SIZE, INPUT_SIZE, 3),
            weights=None if weights == "none" else weights,
        )
        spec = tf.TensorSpec([batch_size, INPUT_SIZE, INPUT_SIZE, 3], tf.uint8)
        self._forward = tf.function(self._call, input_signature=[spec], jit_compile=self.on_gpu)

    def _call(self, pixels: Any) -> Any:
        import tensorflow as tf

        scaled = tf.cast(pixels, tf.float32) / 127.5 - 1.0  # inception_v3.preprocess_input
        return tf.cast(self.model(scaled, training=False), tf.float32)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Features of up to batch_size images; short batches are padded so nothing retraces."""
        count = len(pixels)
        out = np.empty((count, FEATURE_DIM), dtype=np.float32)
        for start in range(0, count, self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
            padded[: len(chunk)] = chunk
            out[start : start + len(chunk)] = self._forward(padded).numpy()[: len(chunk)]
        return out


def _configure_devices(tf: Any, keras: Any, on_gpu: bool) -> None:
    """On a GPU: memory growth and float16 compute; on a CPU: leave the defaults."""
    if not on_gpu:
        return
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            log.debug("GPU already initialised; memory growth unchanged")
    keras.mixed_precision.set_global_policy("mixed_float16")


@functools.lru_cache(maxsize=2)
def load_feature_model(weights: str, batch_size: int = 64) -> FeatureModel:
    """The feature model, built once per process for these weights and batch size."""
    weights_identity(weights)  # fail with one clear line before TensorFlow loads
    model = FeatureModel(weights, batch_size)
    log.info(
        "feature model %s ready, weights %s, %s",
        model.model_name,
        model.weights_id,
        "GPU" if model.on_gpu else "CPU",
    )
    return model


Decoded = DecodedImage | ImageDecodeError


def _decode_or_error(path: Path, max_pixels: int) -> Decoded:
    """Decode one image; a failure is returned as the error, not raised."""
    try:
        return decode_image(path, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return exc


def decoded_batches(
    batches: Sequence[Batch], root: Path, workers: int, max_pixels: int
) -> Iterator[tuple[Batch, list[Decoded]]]:
    """Batches with their decoded images; later batches decode while the caller runs the model."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        queue: deque[tuple[Batch, list[Future[Decoded]]]] = deque()
        pending = iter(batches)
        for batch in pending:
            queue.append(
                (
                    batch,
                    [
                        pool.submit(_decode_or_error, root / image.file_name, max_pixels)
                        for image in batch.images
                    ],
                )
            )
            if len(queue) > PREFETCH_BATCHES:
                head, futures = queue.popleft()
                yield head, [f.result() for f in futures]
        while queue:
            head, futures = queue.popleft()
            yield head, [f.result() for f in futures]


def stage_decoded_batch(
    model: FeatureModel, batch: Batch, decoded: list[Decoded], staging_dir: Path
) -> Path:
    """Run the model on a batch's decoded images and stage the features with the failures."""
    good = [i for i, d in enumerate(decoded) if isinstance(d, DecodedImage)]
    features = np.zeros((len(decoded), FEATURE_DIM), dtype=np.float32)
    if good:
        pixels = np.stack([decoded[i].pixels for i in good])  # type: ignore[union-attr]
        features[good] = model.embed(pixels)
    return write_feature_batch(
        feature_batch_path(staging_dir, batch.key),
        [image.file_name for image in batch.images],
        [image.content_hash for image in batch.images],
        [(d.width, d.height) if isinstance(d, DecodedImage) else None for d in decoded],
        [str(d) if isinstance(d, ImageDecodeError) else None for d in decoded],
        features,
    )


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
) -> list[Path]:
    """Stage every batch not staged yet; TensorFlow is imported only when there is work."""
    todo = [b for b in batches if not feature_batch_path(staging_dir, b.key).exists()]
    if todo:
        model = load_feature_model(weights, batch_size)
        for batch, decoded in decoded_batches(
            todo, root, workers or default_decode_workers(), max_pixels
        ):
            stage_decoded_batch(model, batch, decoded, staging_dir)
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
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def plan_batches_task(database_url: str, batch_size: int, weights_id: str) -> list[Batch]:
    """Cut the pending images into content-addressed batches."""
    return plan_batches(list_pending(engine_for(database_url)), batch_size, weights_id)


@task(name="extract-shard", cache_policy=StagedShardPolicy(), persist_result=True)
def extract_shard_task(
    batches: list[Batch],
    root: str,
    staging_dir: str,
    weights: str,
    batch_size: int,
    workers: int,
    max_pixels: int,
    total: int,
) -> list[str]:
    """Extract and stage the features of a few batches; cached by their content keys."""
    paths = extract_batches(
        batches,
        Path(root),
        Path(staging_dir),
        weights=weights,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        on_progress=lambda n: report_progress("extract", n, total),
    )
    return [str(path) for path in paths]
