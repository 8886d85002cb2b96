"""Test collections indexed by the pipeline's own steps, as `lookalike process --weights none` does.

The API tests need databases that look exactly like a real run's: the real weights identity,
statuses, sizes, decode errors, staged batches and neighbour lists. So the rows here are only
ever written by the functions the flow's tasks call (catalog sync, extraction, loads, the kNN
pass, the run record); tamper_file_names alone writes by hand, and stands for a database
edited by hand.
"""

from __future__ import annotations

import atexit
import io
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import Engine, func, select

from lookalike.sql.schema import (
    RUN_COMPLETED,
    STATUS_PENDING,
    image_features,
    image_names,
    runs,
    sources,
)
from lookalike.tasks.catalog import (
    apply_changes,
    close_interrupted_runs,
    finish_run,
    list_pending,
    mark_indexed,
    open_collection,
    read_known,
    start_run,
)
from lookalike.tasks.database import connect_checked
from lookalike.tasks.discover import check_root, find_changes
from lookalike.tasks.extract import extract_batches, plan_batches
from lookalike.tasks.knn.plan import PassKind
from lookalike.tasks.load import load_feature_batches, load_neighbour_table
from lookalike.tasks.models import weights_identity
from lookalike.tasks.neighbours import compute_neighbours, plan_neighbour_pass
from lookalike.tasks.settings import Settings
from lookalike.tasks.sources import Source, open_source, read_sources
from tests.odd_images import write_photos

WEIGHTS = "none"  # seeded random init: no download
# One image per batch: a staged batch is then keyed by one image's bytes, so a photo any earlier
# catalog of this test process extracted is never run through the model again (the pipeline's
# own cache). It is also the batch size of the API's search (api.search_index), and
# tasks.extract keeps one model per batch size: the tests build the model once.
BATCH_SIZE = 1
PHOTOS = 5
BROKEN = "photos/Broken.jpg"  # not an image: failed
BROKEN_REASON = "not an image (unrecognised content)"
# Found by a later run that stopped after its catalog sync, so pending:
PNG_NAMED_JPG = "odd/100%_real.jpg"  # a PNG under a .jpg name
PENDING = "odd/100xyreal.jpg"  # a copy of the first photo; "100%_real" must not match it
MISSING = "photos/missing.jpg"  # then deleted
ESCAPE = "escape.jpg"  # then replaced by a symlink leading out of the root
OUTSIDE = "../outside/secret.jpg"  # no run stores this: a row written by hand


@dataclass
class Catalog:
    """A database indexed from an image folder, and what the tests expect of it."""

    url: str
    root: Path
    weights_id: str
    ids: dict[str, int] = field(default_factory=dict)  # file name -> id, every row
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # stored features by id
    # Exact euclidean neighbours of every image with features, computed here from the vectors.
    neighbours: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    last_completed_run: datetime | None = None

    @property
    def ok_ids(self) -> list[int]:
        """Ids of the images with features."""
        return sorted(self.vectors)

    @property
    def photo_ids(self) -> list[int]:
        """Ids of photos/photo_*.jpg, in name order."""
        return [i for name, i in sorted(self.ids.items()) if name.startswith("photos/photo_")]

    @property
    def stored_k(self) -> int:
        """Neighbours stored per image: every other indexed image (k is larger)."""
        return len(self.vectors) - 1


@cache
def staging_dir() -> Path:
    """One staging folder for every catalog this test process builds (content-addressed)."""
    path = Path(tempfile.mkdtemp(prefix="lookalike-test-staging-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@contextmanager
def database(url: str) -> Iterator[Engine]:
    """An engine on the database, with the schema created as every run creates it."""
    engine = connect_checked(url)
    try:
        yield engine
    finally:
        engine.dispose()


def start_run_and_sync(url: str, root: Path, source: str | None = None) -> int:
    """A run's first steps (open-collection, open-source, sync-catalog) on the folder as the
    source of this name (default: the folder's own, or its source's): the run's id, still
    running."""
    folder = check_root(root)
    weights_id = weights_identity(WEIGHTS)
    with database(url) as engine:
        close_interrupted_runs(engine)
        open_collection(engine, weights_id)
        run_id = start_run(engine, weights_id)
        found = open_source(engine, folder, source)
        apply_changes(engine, found.id, find_changes(folder, read_known(engine, found.id)))
    return run_id


def source_at(engine: Engine, root: Path) -> Source:
    """The source whose folder is root (a run has added it)."""
    folder = str(check_root(root))
    (found,) = [source for source in read_sources(engine) if source.root == folder]
    return found


def extract_and_load(url: str, root: Path) -> None:
    """Extract the folder's pending images into staged batches and load them (extract-shard,
    load-*)."""
    folder = check_root(root)
    with database(url) as engine:
        pending = list_pending(engine, source_at(engine, folder).id)
        batches = plan_batches(pending, BATCH_SIZE, weights_identity(WEIGHTS))
        paths = extract_batches(
            batches, folder, staging_dir(), weights=WEIGHTS, batch_size=BATCH_SIZE, workers=1
        )
        load_feature_batches(engine, paths)


def refresh_neighbours(url: str, k: int = Settings().k) -> None:
    """The neighbour pass the plan chooses, swapped in (compute-neighbours, load-neighbours)."""
    with database(url) as engine:
        kind = plan_neighbour_pass(engine, k)
        if kind is PassKind.UNCHANGED:
            return
        staged = compute_neighbours(engine, staging_dir(), k, kind)
        load_neighbour_table(url, staged.staged, staging_dir())
        mark_indexed(engine, staged.refreshed_ids)
        staged.staged.unlink(missing_ok=True)


def complete_run(url: str, run_id: int) -> None:
    """Record the run as completed (finish-run), which tells the API a new state is ready."""
    with database(url) as engine:
        finish_run(engine, run_id, RUN_COMPLETED, {})


def index_folder(url: str, root: Path, source: str | None = None) -> int:
    """One complete run over the folder, as `lookalike process ROOT --weights none` (with
    --source SOURCE); its id."""
    run_id = start_run_and_sync(url, root, source)
    extract_and_load(url, root)
    refresh_neighbours(url)
    complete_run(url, run_id)
    return run_id


def index_and_lay_out(url: str, root: Path) -> None:
    """index_folder, then the map laid out as a run's layout-map step does it."""
    from lookalike.tasks.map import layout_map

    index_folder(url, root)
    engine = connect_checked(url)
    layout_map(engine)
    engine.dispose()


def build_catalog(url: str, base: Path) -> Catalog:
    """The API tests' collection under base/images: 11 rows, 5 of them indexed.

    A first run indexes five photos and a broken file (failed). A later run syncs four new
    files and stops there, so they stay pending; then one of them is deleted and another
    replaced by a symlink leading out of the root. Last, OUTSIDE is written by hand, as a
    tampered database would hold it. The photos' features come from the --weights none model.
    """
    root = base / "images"
    photos = write_photos(root / "photos", PHOTOS)
    (root / BROKEN).write_bytes(b"this is not a jpeg")
    index_folder(url, root)
    (root / PNG_NAMED_JPG).parent.mkdir()
    (root / PNG_NAMED_JPG).write_bytes(png_bytes())
    for name in (PENDING, MISSING, ESCAPE):
        shutil.copyfile(photos[0], root / name)
    start_run_and_sync(url, root)  # and no more: as a run killed after its catalog sync
    (root / MISSING).unlink()
    secret = base / "outside" / "secret.jpg"
    secret.parent.mkdir()
    (root / ESCAPE).rename(secret)
    (root / ESCAPE).symlink_to(secret)
    tamper_file_names(url, [OUTSIDE])
    return read_catalog(url, root)


def png_bytes() -> bytes:
    """A small PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 128, 255)).save(buffer, "PNG")
    return buffer.getvalue()


def read_catalog(url: str, root: Path) -> Catalog:
    """What the database holds now (ids: the rows of root's source), and the exact neighbours
    its features should have."""
    with database(url) as engine, engine.connect() as conn:
        source = source_at(engine, root)
        named = select(image_names.c.file_name, image_names.c.id)
        ids = dict(conn.execute(named.where(image_names.c.source_id == source.id)).tuples().all())
        blobs = conn.execute(select(image_features.c.image_id, image_features.c.features))
        vectors = {int(i): np.frombuffer(blob, "<f4").astype(np.float32) for i, blob in blobs}
        finished = conn.execute(
            select(func.max(runs.c.finished_at)).where(runs.c.status == RUN_COMPLETED)
        ).scalar_one()
    catalog = Catalog(url, root, weights_identity(WEIGHTS), ids, vectors)
    catalog.neighbours = exact_neighbours(vectors)
    catalog.last_completed_run = finished
    return catalog


def exact_neighbours(vectors: dict[int, np.ndarray]) -> dict[int, list[tuple[int, float]]]:
    """Every other image by euclidean distance (float64), ties by id: what kNN must store."""
    found = {}
    for image_id, vector in vectors.items():
        others = [
            (other, float(np.linalg.norm(vector.astype(np.float64) - theirs)))
            for other, theirs in vectors.items()
            if other != image_id
        ]
        found[image_id] = sorted(others, key=lambda pair: (pair[1], pair[0]))
    return found


def tamper_file_names(url: str, names: list[str]) -> dict[str, int]:
    """Pending rows for names no run would store (a database edited by hand), in the first
    source (the catalog's); their ids."""
    with database(url) as engine, engine.begin() as conn:
        source_id = conn.execute(select(func.min(sources.c.id))).scalar_one()
        return {
            name: int(
                conn.execute(
                    image_names.insert().values(
                        source_id=source_id,
                        file_name=name,
                        content_hash="0" * 32,
                        size=1,
                        mtime_ns=1,
                        status=STATUS_PENDING,
                        indexed=False,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            )
            for name in names
        }


def app_settings(url: str, tmp_path: Path, **overrides: object) -> Settings:
    """Settings for a test app: this database, thumbnails under tmp_path."""
    return Settings(
        database_url=url, data_dir=tmp_path / "data", thumbnail_dir=tmp_path / "thumbnails"
    ).with_overrides(**overrides)


def index_duplicate_set(url: str, root: Path, threshold: float) -> None:
    """Eight photos, an exact copy of the second and a re-encoded copy of the first, indexed
    and grouped as a run does it (find-duplicates at this threshold)."""
    from lookalike.tasks.duplicates import find_duplicates

    photos = write_photos(root, 8, size=(320, 240))
    shutil.copyfile(photos[1], root / "exact_copy.jpg")
    Image.open(photos[0]).save(root / "reencoded.jpg", "JPEG", quality=70)
    index_folder(url, root)
    engine = connect_checked(url)
    find_duplicates(engine, threshold)
    engine.dispose()
