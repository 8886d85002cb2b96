"""Search by example: the feature model and the prepared feature space, refreshed per run.

The model comes from tasks/models.py and the ranking from the kNN engine (tasks/knn/query.py),
so an upload is ranked as the stored neighbour lists are; neither imports Prefect or the
extraction pipeline, which would reconfigure the web server's logging.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from PIL import Image

from lookalike.api.errors import BadRequestError, ServiceUnavailableError, UnreadableImageError
from lookalike.api.repository import CollectionInfo, ImageRepository
from lookalike.api.schemas import Neighbour
from lookalike.tasks.decode import ImageDecodeError, decode_image_bytes
from lookalike.tasks.errors import LookalikeError, first_line
from lookalike.tasks.knn.query import knn_query, prepare_query_space
from lookalike.tasks.knn.space import FeatureSpace
from lookalike.tasks.models import (
    INCEPTION_V3,
    FeatureModel,
    ModelSpec,
    PrecisionError,
    UnknownModelError,
    WeightsError,
    limit_cpu_threads,
    load_feature_model,
    load_text_encoder,
    parse_model_name,
    weights_identity,
)
from lookalike.tasks.settings import Settings

log = logging.getLogger(__name__)

SEARCH_BATCH_SIZE = 1  # one upload at a time: no padding to a large batch
# The metric of the stored lists (tasks.neighbours runs the engine with its default).
SEARCH_METRIC = "euclidean"


Marker = tuple[datetime | None, CollectionInfo | None]  # last completed run, collection row


@dataclass(frozen=True)
class IndexSnapshot:
    """The model and the prepared feature space of one completed state of the collection."""

    marker: Marker
    model: FeatureModel | None  # None: no stored vector to search (the model is not loaded)
    space: FeatureSpace | None  # None: likewise
    spec: ModelSpec = INCEPTION_V3  # the collection's network (the default before any run)

    @property
    def ids(self) -> np.ndarray:
        """Image ids of the stored vectors, in the space's row order."""
        return np.empty(0, np.int64) if self.space is None else self.space.ids


class SimilaritySearch:
    """Exact euclidean search of an uploaded image against every stored feature vector.

    The model and the prepared space are loaded on the first search and again only after a
    newer run has completed (one cheap query on the small runs table per search), never per
    request; a search then costs one forward pass and one matrix-vector product.
    """

    def __init__(
        self,
        repository: ImageRepository,
        settings: Settings,
        compute_threads: int | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.compute_threads = compute_threads  # None: TensorFlow's and BLAS's own choice
        self._snapshot: IndexSnapshot | None = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one forward pass at a time keeps memory flat

    def search(self, data: bytes, k: int) -> list[Neighbour]:
        """The k stored images nearest to the uploaded image, closest first."""
        pixels = decode_upload(data, self.settings.max_image_pixels, self.spec.input_size)
        snapshot = self.current_snapshot()
        if snapshot.model is None or snapshot.space is None:
            return []
        if len(pixels) != snapshot.spec.input_size:  # a first search, of another network
            pixels = decode_upload(data, self.settings.max_image_pixels, snapshot.spec.input_size)
        with self._model_lock:
            query = snapshot.model.embed(pixels[np.newaxis])
        found = knn_query(snapshot.space, query, k)
        return self.neighbours(found.neighbour_ids[0], found.distances[0])

    def search_text(self, text: str, k: int) -> list[Neighbour]:
        """The k stored images nearest to the words (models with a text tower only)."""
        words = text.strip()
        if not words:
            raise BadRequestError("the text to search by is blank")
        snapshot = self.current_snapshot()
        if not self.spec.text_tower:
            raise BadRequestError(
                f"the collection's model {self.spec.name} has no text tower: search by a "
                "photo instead, or index the images with a text-capable model"
            )
        if snapshot.space is None:
            return []
        query = self.embed_words(snapshot, words)
        found = knn_query(snapshot.space, query, k)
        return self.neighbours(found.neighbour_ids[0], found.distances[0])

    def embed_words(self, snapshot: IndexSnapshot, words: str) -> np.ndarray:
        """(1, dim) text features in the stored image features' space; the text tower and
        its tokenizer are built on the first such search (tasks.models caches them)."""
        info = snapshot.marker[1]
        stored = info.weights if info is not None else self.settings.weights
        weights = model_weights_for(stored, self.settings.weights, snapshot.spec)
        try:
            encoder = load_text_encoder(snapshot.spec.key, weights, self.settings.tokenizer)
        except LookalikeError as exc:  # no tokenizer, weights not available
            log.warning("cannot load the text tower: %s", exc)
            raise ServiceUnavailableError(
                f"search in words is unavailable: {first_line(exc)}"
            ) from None
        with self._model_lock:
            return encoder.embed([words])

    def neighbours(self, ids: np.ndarray, distances: np.ndarray) -> list[Neighbour]:
        """Ranked answers for these ids; an image deleted since the space was loaded is skipped."""
        names = self.repository.file_names(ids.tolist())
        found = [
            (int(image_id), float(distance))
            for image_id, distance in zip(ids, distances, strict=True)
            if int(image_id) in names
        ]
        return [
            Neighbour(image_id, *names[image_id], rank=rank, distance=distance)
            for rank, (image_id, distance) in enumerate(found, start=1)
        ]

    def current_snapshot(self) -> IndexSnapshot:
        """The loaded snapshot, reloaded first when a newer run has completed."""
        marker = (self.repository.latest_completed_run(), self.repository.get_collection())
        snapshot = self._snapshot
        if snapshot is not None and snapshot.marker == marker:
            return snapshot
        # While one request loads a newer state (tens of seconds at 100k images), the others
        # answer from the state they have rather than queue behind it.
        if snapshot is not None and not self._load_lock.acquire(blocking=False):
            return snapshot
        if snapshot is None:
            self._load_lock.acquire()
        try:
            snapshot = self._snapshot
            if snapshot is None or snapshot.marker != marker:
                snapshot = self._load_snapshot(marker)
                self._snapshot = snapshot
        finally:
            self._load_lock.release()
        return snapshot

    @property
    def spec(self) -> ModelSpec:
        """The network of the collection as last loaded (InceptionV3 before any run)."""
        snapshot = self._snapshot
        return INCEPTION_V3 if snapshot is None else snapshot.spec

    def _load_snapshot(self, marker: Marker) -> IndexSnapshot:
        """Load the collection's model (network, precision, weights) and prepare every stored
        vector once."""
        info = marker[1]
        if info is None:
            return IndexSnapshot(marker, None, None)
        try:
            spec, precision = parse_model_name(info.model)
        except UnknownModelError:
            raise ServiceUnavailableError(
                f"the collection was indexed with model {info.model!r}, which this version "
                "does not know"
            ) from None
        matrix = self.repository.load_feature_matrix(info.model)
        if len(matrix.ids) == 0:  # nothing to rank: the model is not worth loading
            return IndexSnapshot(marker, None, None, spec)
        if self.compute_threads is not None:
            limit_cpu_threads(self.compute_threads)
        weights = model_weights_for(info.weights, self.settings.weights, spec)
        model = load_search_model(weights, spec, precision)
        space = prepare_query_space(matrix.vectors, matrix.ids, metric=SEARCH_METRIC)
        log.info("search index loaded: %d vectors, weights %s", space.n, info.weights)
        return IndexSnapshot(marker, model, space, spec)


def decode_upload(data: bytes, max_pixels: int, size: int = INCEPTION_V3.input_size) -> np.ndarray:
    """The upload as (size, size, 3) uint8 pixels; UnreadableImageError when it is no image."""
    if not data:
        raise UnreadableImageError("the uploaded file is empty")
    try:
        return decode_image_bytes(data, size=size, max_pixels=max_pixels).pixels
    except ImageDecodeError as exc:
        raise UnreadableImageError(f"not a readable image: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(f"image refused as a decompression bomb: {exc}") from None


def model_weights_for(stored: str, configured: str, spec: ModelSpec = INCEPTION_V3) -> str:
    """The weights argument that rebuilds the model the collection was indexed with.

    The collection stores tasks.models.weights_identity(weights, spec); a weights file or a
    preset folder cannot be found again from its identity, so it must be the one configured
    (LOOKALIKE_WEIGHTS).
    """
    if stored in ("imagenet", f"preset {spec.weights_url}"):
        return "imagenet"
    if stored == "none" or stored.startswith("none "):
        return "none"
    try:
        if configured not in ("imagenet", "none") and weights_identity(configured, spec) == stored:
            return configured
    except WeightsError as exc:
        log.warning("configured weights unusable for search: %s", exc)
    raise ServiceUnavailableError(
        f"the collection was indexed with weights {stored!r}; "
        "set LOOKALIKE_WEIGHTS to that weights file or preset folder to search by upload"
    )


def load_search_model(
    weights: str, spec: ModelSpec = INCEPTION_V3, precision: str = "float32"
) -> FeatureModel:
    """The feature model for one image at a time (built once per process by tasks.models), in
    the collection's precision; in float32 where this machine cannot run that one (features
    differ by rounding only: see the README's precision figures)."""
    try:
        try:
            return load_feature_model(weights, SEARCH_BATCH_SIZE, spec, precision)
        except PrecisionError as exc:
            log.warning("searching in float32: %s", exc)
            return load_feature_model(weights, SEARCH_BATCH_SIZE, spec, "float32")
    except Exception as exc:  # weights missing, not downloadable, or corrupt: search is down
        log.exception("cannot load the feature model")
        reason = first_line(exc)
        raise ServiceUnavailableError(f"cannot load the feature model: {reason}") from None
