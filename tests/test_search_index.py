"""Search by upload (api/search_index.py): ranked as the stored lists, prepared once per run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy

from lookalike.api.errors import ServiceUnavailableError, UnreadableImageError
from lookalike.api.repository import ImageRepository
from lookalike.api.search_index import SimilaritySearch, model_weights_for
from lookalike.sql.schema import (
    collection,
    image_features,
    image_names,
    image_neighbours,
    metadata,
    runs,
    sources,
)
from lookalike.tasks.decode import decode_image
from lookalike.tasks.knn import knn_all
from lookalike.tasks.models import load_feature_model, weights_identity
from lookalike.tasks.settings import Settings
from tests.odd_images import write_photos

K = 6
SOURCE = "demo"
FINISHED = datetime(2025, 2, 3, 4, 5, 6)
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Collection:
    """A database indexed as a run indexes it: model features, engine lists, one completed run."""

    url: str
    root: Path
    ids: dict[str, int]  # file name -> image id


def build_collection(base: Path, model: str = "InceptionV3") -> Collection:
    """Photos (one stored twice under two names) with seeded-model features and kNN lists."""
    root = base / "images"
    photos = write_photos(root / "photos", 9, seed=3)
    (root / "copies").mkdir()
    shutil.copy(photos[4], root / "copies" / "same_as_4.jpg")  # equal vectors: a tie at 0
    paths = sorted(p for p in root.rglob("*.jpg"))
    names = [p.relative_to(root).as_posix() for p in paths]
    embedder = load_feature_model("none", 1)
    vectors = embedder.embed(np.stack([decode_image(p).pixels for p in paths]))
    url = f"sqlite:///{base / 'lookalike.sqlite'}"
    engine = sqlalchemy.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            collection.insert().values(
                id=1, model=model, weights=weights_identity("none"), created_at=FINISHED
            )
        )
        conn.execute(
            sources.insert().values(id=1, name=SOURCE, root=str(root), created_at=FINISHED)
        )
        ids = [insert_image(conn, name) for name in names]
        conn.execute(
            image_features.insert(),
            [
                {"image_id": i, "model": model, "features": v.astype("<f4").tobytes()}
                for i, v in zip(ids, vectors, strict=True)
            ],
        )
        insert_lists(conn, np.array(ids), vectors)
        record_run(conn, FINISHED)
    engine.dispose()
    return Collection(url, root, dict(zip(names, ids, strict=True)))


def insert_image(conn: sqlalchemy.Connection, name: str) -> int:
    """One ok image row; its id."""
    result = conn.execute(
        image_names.insert().values(
            source_id=1, file_name=name, content_hash=name.ljust(32, "0")[:32], size=1, mtime_ns=1,
            width=160, height=120, status="ok",
        )
    )  # fmt: skip
    assert result.inserted_primary_key is not None
    return int(result.inserted_primary_key[0])


def insert_lists(conn: sqlalchemy.Connection, ids: np.ndarray, vectors: np.ndarray) -> None:
    """The engine's lists, stored as the load stage stores them."""
    lists = knn_all(vectors, ids, K)
    conn.execute(
        image_neighbours.insert(),
        [
            {"image_id": int(image), "rank": rank, "neighbour_id": int(other), "distance": float(d)}
            for image, others, distances in zip(
                lists.image_ids, lists.neighbour_ids, lists.distances, strict=True
            )
            for rank, (other, d) in enumerate(zip(others, distances, strict=True), start=1)
        ],
    )


def record_run(conn: sqlalchemy.Connection, finished: datetime) -> None:
    conn.execute(
        runs.insert().values(
            started_at=finished, finished_at=finished, status="completed",
            weights=weights_identity("none"), summary="{}",
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Collection:
    return build_collection(tmp_path_factory.mktemp("indexed"))


def searcher(url: str, **settings: object) -> SimilaritySearch:
    engine = sqlalchemy.create_engine(url)
    return SimilaritySearch(ImageRepository(engine), Settings().with_overrides(**settings))


@pytest.mark.slow
def test_an_indexed_photo_finds_itself_then_its_stored_list(indexed: Collection) -> None:
    search = searcher(indexed.url)
    repository = search.repository
    for name, image_id in indexed.ids.items():
        found = search.search((indexed.root / name).read_bytes(), K + 1)
        stored = [(n.id, n.distance) for n in repository.get_neighbours(image_id, K)]
        # The image itself comes first at 0, unless an equal image with a lower id ties it.
        at = sum(1 for other, distance in stored if distance == 0 and other < image_id)
        expected = [*stored[:at], (image_id, 0.0), *stored[at:]]
        assert [(n.id, n.distance) for n in found] == expected, name
        assert [n.rank for n in found] == list(range(1, K + 2))
        assert all((n.file_name, n.source) == repository.file_names([n.id])[n.id] for n in found)
        assert {n.source for n in found} == {SOURCE}


@pytest.mark.slow
def test_a_stored_duplicate_ties_at_zero_broken_by_id(indexed: Collection) -> None:
    search = searcher(indexed.url)
    original, copy = indexed.ids["photos/photo_003_00004.jpg"], indexed.ids["copies/same_as_4.jpg"]
    for name in ("photos/photo_003_00004.jpg", "copies/same_as_4.jpg"):
        found = search.search((indexed.root / name).read_bytes(), 3)
        assert [(n.id, n.distance) for n in found[:2]] == sorted([(original, 0.0), (copy, 0.0)])
        assert found[2].distance > 0


@pytest.mark.slow
def test_the_space_is_prepared_once_per_completed_run(tmp_path: Path, indexed: Collection) -> None:
    base = tmp_path / "copy"
    shutil.copytree(indexed.root.parent, base)
    url = f"sqlite:///{base / 'lookalike.sqlite'}"
    search = searcher(url)
    photo = (base / "images/photos/photo_003_00000.jpg").read_bytes()
    search.search(photo, 3)
    loaded = search.current_snapshot()
    assert loaded.space is not None and loaded.space.right_rows is not None
    search.search(photo, 3)
    assert search.current_snapshot() is loaded  # same run: nothing prepared again
    engine = sqlalchemy.create_engine(url)
    gone = indexed.ids["photos/photo_003_00001.jpg"]
    with engine.begin() as conn:
        conn.execute(image_names.delete().where(image_names.c.id == gone))
    answer = search.search(photo, len(indexed.ids))  # deleted since loading: skipped
    assert gone not in [n.id for n in answer] and len(answer) == len(indexed.ids) - 1
    assert [n.rank for n in answer] == list(range(1, len(answer) + 1))
    assert search.current_snapshot() is loaded
    with engine.begin() as conn:
        record_run(conn, datetime(2025, 3, 1))
    engine.dispose()
    search.search(photo, 3)
    reloaded = search.current_snapshot()
    assert reloaded is not loaded and reloaded.space is not None
    assert len(reloaded.ids) == len(indexed.ids) - 1  # features of a deleted image not loaded


def test_unreadable_uploads_are_refused_before_anything_loads(tmp_path: Path) -> None:
    search = searcher(f"sqlite:///{tmp_path / 'missing' / 'no.sqlite'}")
    with pytest.raises(UnreadableImageError, match="the uploaded file is empty"):
        search.search(b"", 3)
    with pytest.raises(UnreadableImageError, match="not a readable image"):
        search.search(b"GIF89a but not really", 3)


def test_a_collection_without_features_answers_empty_without_the_model(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    engine = sqlalchemy.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            collection.insert().values(
                id=1, model="InceptionV3", weights="imagenet", created_at=FINISHED
            )
        )
    engine.dispose()
    search = searcher(url)
    photo = write_photos(tmp_path / "upload", 1)[0].read_bytes()
    assert search.search(photo, 5) == []
    assert search.current_snapshot().model is None  # "imagenet" was never downloaded


def test_a_collection_of_an_unknown_model_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.sqlite'}"
    engine = sqlalchemy.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            collection.insert().values(id=1, model="VGG16", weights="imagenet", created_at=FINISHED)
        )
    engine.dispose()
    photo = write_photos(tmp_path / "upload", 1)[0].read_bytes()
    with pytest.raises(ServiceUnavailableError, match="indexed with model 'VGG16', which"):
        searcher(url).search(photo, 5)


def test_weights_are_found_again_from_the_stored_identity(tmp_path: Path) -> None:
    assert model_weights_for("imagenet", "none") == "imagenet"
    assert model_weights_for(weights_identity("none"), "imagenet") == "none"
    assert model_weights_for("none (random init, seed 0)", "imagenet") == "none"  # older identity
    weights = tmp_path / "mine.weights.h5"
    weights.write_bytes(b"some weights")
    assert model_weights_for(weights_identity(str(weights)), str(weights)) == str(weights)
    with pytest.raises(ServiceUnavailableError, match="set LOOKALIKE_WEIGHTS"):
        model_weights_for(weights_identity(str(weights)), "imagenet")
    with pytest.raises(ServiceUnavailableError, match="set LOOKALIKE_WEIGHTS"):
        model_weights_for(weights_identity(str(weights)), str(tmp_path / "gone.h5"))


# A search through the whole app (Litestar's test client) in a fresh interpreter, then which
# of the pipeline's modules it loaded.
SEARCH_IN_A_NEW_PROCESS = """
import json, sys
from pathlib import Path
from litestar.testing import TestClient
from lookalike.api.app import create_app
from lookalike.tasks.settings import Settings
settings = Settings(database_url=sys.argv[1], data_dir=Path(sys.argv[3]))
with TestClient(app=create_app(settings)) as client:
    photo = Path(sys.argv[2]).read_bytes()
    answer = client.post("/api/search", files={"file": ("a.jpg", photo, "image/jpeg")})
    assert answer.status_code == 200, answer.text
pipeline = ("prefect", "lookalike.tasks.extract", "lookalike.tasks.catalog")
loaded = [m for m in pipeline if m in sys.modules]
first = answer.json()[0]
print(json.dumps({"first": [first["source"], first["file_name"]], "loaded": loaded}))
"""


@pytest.mark.slow
def test_a_search_loads_neither_prefect_nor_the_extraction_pipeline(
    indexed: Collection, tmp_path: Path
) -> None:
    photo = indexed.root / "photos/photo_003_00002.jpg"
    result = subprocess.run(
        [sys.executable, "-c", SEARCH_IN_A_NEW_PROCESS, indexed.url, str(photo), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer == {"first": [SOURCE, "photos/photo_003_00002.jpg"], "loaded": []}
