"""Read the stored map: every point packed once per layout, and the points near a place.

Free of Prefect: the API's /api/map routes read here.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, select

from lookalike.sql.schema import image_map, image_names, map_state, sources
from lookalike.tasks.errors import LookalikeError

log = logging.getLogger(__name__)

# One point on the wire: image id (uint32), x, y (float32), little-endian, 12 bytes.
POINT_FORMAT = np.dtype([("id", "<u4"), ("x", "<f4"), ("y", "<f4")])


class MapNotFoundError(LookalikeError):
    """No run has laid out the map of this database yet."""


@dataclass(frozen=True)
class MapPoints:
    """Every point of one stored layout."""

    etag: str  # changes whenever the layout changes
    ids: np.ndarray  # (n,) int64
    xy: np.ndarray  # (n, 2) float32
    packed: bytes  # n POINT_FORMAT records, in id order
    # The groups the page colours by, sorted: top-level folders ("" for files at the root),
    # as "source/folder" when the archive has several sources.
    folders: list[str]
    folder_of: np.ndarray  # (n,) index into folders of each point, in id order

    def near(
        self, x: float, y: float, radius: float, limit: int
    ) -> list[tuple[int, float, float, float]]:
        """(image id, x, y, distance) of the points within radius of (x, y), closest first."""
        distances = np.hypot(self.xy[:, 0] - x, self.xy[:, 1] - y)
        inside = np.flatnonzero(distances <= radius)
        closest = inside[np.argsort(distances[inside], kind="stable")[:limit]].tolist()
        return [
            (int(self.ids[i]), float(self.xy[i, 0]), float(self.xy[i, 1]), float(distances[i]))
            for i in closest
        ]


def rows_as_array(rows: Sequence[Sequence[Any]], columns: int) -> np.ndarray:
    """Numeric query rows as an (n, columns) float64 array; np.array on the row objects
    takes seconds at 250,000 rows, this a few milliseconds."""
    flat = itertools.chain.from_iterable(rows)
    return np.fromiter(flat, dtype=np.float64, count=len(rows) * columns).reshape(-1, columns)


def layout_etag(fingerprint: str, computed_at: datetime) -> str:
    """The ETag of one stored layout: its inputs and when it was made."""
    return f'"{fingerprint[:16]}-{computed_at:%Y%m%d%H%M%S%f}"'


def read_map(engine: Engine) -> MapPoints:
    """The stored layout; MapNotFoundError when there is none yet."""
    with engine.connect() as conn:
        state = conn.execute(select(map_state.c.fingerprint, map_state.c.computed_at)).first()
        if state is None:
            raise MapNotFoundError("no map yet: run `lookalike process FOLDER` first")
        joined = image_map.join(image_names, image_map.c.image_id == image_names.c.id)
        rows = conn.execute(
            select(image_map.c.image_id, image_map.c.x, image_map.c.y)
            .select_from(joined)
            .order_by(image_map.c.image_id)
        ).all()
        named = joined.join(sources, sources.c.id == image_names.c.source_id)
        names = conn.execute(
            select(sources.c.name, image_names.c.file_name)
            .select_from(named)
            .order_by(image_map.c.image_id)
        ).all()
    table = rows_as_array(rows, 3)
    packed = np.empty(len(table), dtype=POINT_FORMAT)
    packed["id"], packed["x"], packed["y"] = table[:, 0], table[:, 1], table[:, 2]
    etag = layout_etag(state.fingerprint, state.computed_at)
    xy = np.column_stack([packed["x"], packed["y"]]).astype(np.float32)
    folders, folder_of = top_folders([name for _, name in names], [source for source, _ in names])
    ids = table[:, 0].astype(np.int64)
    return MapPoints(etag, ids, xy, packed.tobytes(), folders, folder_of)


def top_folders(
    file_names: Sequence[str], source_names: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """The sorted top-level folders of these paths, and each path's index among them; with
    the paths' sources, when there are several, "source/folder"."""
    tops = [name.split("/", 1)[0] if "/" in name else "" for name in file_names]
    if source_names is not None and len(set(source_names)) > 1:
        tops = [f"{source}/{top}" for source, top in zip(source_names, tops, strict=True)]
    folders = sorted(set(tops))
    where = {folder: i for i, folder in enumerate(folders)}
    return folders, np.array([where[top] for top in tops], dtype=np.int32)


class MapCache:
    """The last layout read, kept until the stored map changes (one look at its state row)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._points: MapPoints | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Read the stored layout in the background (the app's start-up hook): at 250,000
        images that takes seconds, which then no request waits for."""

        def warm() -> None:
            try:
                self.get()
            except MapNotFoundError:
                pass  # no map yet: the first request after a run reads it
            except Exception as exc:  # e.g. the database is down: the request path says so
                log.warning("reading the map at start-up failed: %s", exc)

        threading.Thread(target=warm, name="lookalike-map", daemon=True).start()

    def get(self) -> MapPoints:
        """The stored layout, read again only when it changed (one reader at a time: a request
        arriving during a read waits for it rather than reading too)."""
        with self.engine.connect() as conn:
            state = conn.execute(select(map_state.c.fingerprint, map_state.c.computed_at)).first()
        if self._is_current(state):
            return self._points  # type: ignore[return-value]
        with self._lock:
            if not self._is_current(state):
                self._points = read_map(self.engine)
            return self._points  # type: ignore[return-value]

    def _is_current(self, state: Any) -> bool:
        points = self._points
        return points is not None and state is not None and points.etag == layout_etag(*state)
