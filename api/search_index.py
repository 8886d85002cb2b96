"""Search by example: the feature model and feature matrix, held in memory, refreshed per run."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import numpy as np
from PIL import Image

from lookalike.api.errors import ServiceUnavailableError, UnreadableImageError
from lookalike.api.repository import CollectionInfo, ImageRepository
from lookalike.api.schemas import Neighbour
from lookalike.tasks.settings import Settings

log = logging.getLogger(__name__)

SEARCH_BATCH_SIZE = 1  # one upload at a time: no padding to a large batch


Marker = tuple[datetime | None, CollectionInfo | None]  # last completed run, collection row


class FeatureModel(Protocol):
    """What search needs of tasks.extract's model."""

    def embed(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class IndexSnapshot:
    """The model and matrix of one completed state of the collection."""

    marker: Marker
    model: FeatureModel | None
    ids: np.ndarray
    vectors: np.ndarray
    squared_norms: np.ndarray


class SimilaritySearch:
    """Exact euclidean search of an uploaded image against every stored feature vector.

    The model and the matrix are loaded on the first search and again only after a newer run
    has completed (one cheap query on the small runs table per search), never per request.
    """

    def __init__(self, repository: ImageRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self._snapshot: IndexSnapshot | None = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one forward pass at a time keeps memory flat

    def search(self, data: bytes, k: int) -> list[Neighbour]:
        """The k stored images nearest to the uploaded image, closest first."""
        pixels = decode_upload(data, self.settings.max_image_pixels)
        snapshot = self.current_snapshot()
        if snapshot.model is None or len(snapshot.ids) == 0:
            return []
        with self._model_lock:
            query = np.asarray(snapshot.model.embed(pixels[np.newaxis]), dtype=np.float32)[0]
        ids, distances = nearest_rows(snapshot, query, k)
        names = self.repository.file_names(ids.tolist())
        found = [
            (int(image_id), float(distance))
            for image_id, distance in zip(ids, distances, strict=True)
            if int(image_id) in names  # an image deleted since the matrix was loaded is skipped
        ]
        return [
            Neighbour(id=image_id, file_name=names[image_id], rank=rank, distance=distance)
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

    def _load_snapshot(self, marker: Marker) -> IndexSnapshot:
        """Load the model for the collection's weights and every stored feature vector."""
        info = marker[1]
        if info is None:
            empty = np.empty((0, 0), dtype=np.float32)
            return IndexSnapshot(marker, None, np.empty(0, np.int64), empty, np.empty(0))
        weights = model_weights_for(info.weights, self.settings.weights)
        model = load_search_model(weights)
        matrix = self.repository.load_feature_matrix(info.model)
        vectors = matrix.vectors
        squared_norms = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
        log.info("search index loaded: %d vectors, weights %s", len(matrix.ids), info.weights)
        return IndexSnapshot(marker, model, matrix.ids, vectors, squared_norms)


def nearest_rows(
    snapshot: IndexSnapshot, query: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ids and euclidean distances of the k rows nearest to query, closest first."""
    # |x - q|^2 = |x|^2 - 2 x.q + |q|^2: one matrix-vector product over the whole collection.
    products = snapshot.vectors @ query
    squared = snapshot.squared_norms - 2.0 * products + float(query @ query)
    count = min(k, len(squared))
    if count < len(squared):
        nearest = np.argpartition(squared, count - 1)[:count]
    else:
        nearest = np.arange(count)
    order = nearest[np.argsort(squared[nearest], kind="stable")]
    distances = np.sqrt(np.maximum(squared[order], 0.0))
    return snapshot.ids[order], distances


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """The upload as (299, 299, 3) uint8 pixels; UnreadableImageError when it is not an image."""
    from lookalike.tasks.decode import ImageDecodeError, decode_image_bytes

    if not data:
        raise UnreadableImageError("the uploaded file is empty")
    try:
        return decode_image_bytes(data, max_pixels=max_pixels).pixels
    except ImageDecodeError as exc:
        raise UnreadableImageError(f"not a readable image: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(f"image refused as a decompression bomb: {exc}") from None


def model_weights_for(stored: str, configured: str) -> str:
    """The weights argument that rebuilds the model the collection was indexed with.

    The collection stores tasks.extract.weights_identity(weights); a weights file cannot be
    found again from its identity, so it must be the one configured (LOOKALIKE_WEIGHTS).
    """
    if stored == "imagenet":
        return "imagenet"
    if stored == "none" or stored.startswith("none "):
        return "none"
    from lookalike.tasks.extract import WeightsError, weights_identity

    try:
        if configured not in ("imagenet", "none") and weights_identity(configured) == stored:
            return configured
    except WeightsError as exc:
        log.warning("configured weights unusable for search: %s", exc)
    raise ServiceUnavailableError(
        f"the collection was indexed with weights {stored!r}; "
        "set LOOKALIKE_WEIGHTS to that .h5 file to search by upload"
    )


def load_search_model(weights: str) -> FeatureModel:
    """The feature model for one image at a time (built once per process by tasks.extract)."""
    from lookalike.tasks.extract import load_feature_model

    try:
        model: Any = load_feature_model(weights, SEARCH_BATCH_SIZE)
    except Exception as exc:  # weights missing, not downloadable, or corrupt: search is down
        log.exception("cannot load the feature model")
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ServiceUnavailableError(f"cannot load the feature model: {reason}") from None
    return model  # type: ignore[no-any-return]
