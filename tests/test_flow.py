"""The process-images flow end to end, on SQLite and MariaDB, against a brute-force reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from lookalike.sql.schema import image_features, image_names, image_neighbours
from lookalike.tasks.catalog import NoImagesError
from lookalike.tasks.database import connect_checked
from lookalike.tasks.sources import SourceError
from tests.odd_images import write_odd_images, write_photos

K = 5
BATCH = 4


@pytest.fixture
def run_flow(prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Call process_images with test defaults: random weights, small batches, a private data dir."""
    from lookalike.flows.process import process_images

    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "data"))

    def run(root: Path, database_url: str, **options: object) -> dict:
        params = dict(batch_size=BATCH, k=K, weights="none", database_url=database_url)
        params.update(options)
        return process_images(root=str(root), **params)

    return run


def brute_force(ids: np.ndarray, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference kNN in float64: (neighbour ids, distances), ties by id."""
    x = features.astype(np.float64)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    order = np.lexsort((np.broadcast_to(ids, dist.shape), dist), axis=1)[:, :k]
    return ids[order], np.take_along_axis(dist, order, axis=1)


def stored_state(database_url: str) -> dict:
    """Statuses, features and neighbour lists as stored."""
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        names = {r.file_name: (r.id, r.status, r.error) for r in conn.execute(select(image_names))}
        feats = conn.execute(select(image_features).order_by(image_features.c.image_id)).all()
        neigh = conn.execute(
            select(image_neighbours).order_by(image_neighbours.c.image_id, image_neighbours.c.rank)
        ).all()
    engine.dispose()
    ids = np.array([r.image_id for r in feats], dtype=np.int64)
    matrix = np.stack([np.frombuffer(r.features, "<f4") for r in feats]) if feats else None
    return {"names": names, "ids": ids, "features": matrix, "neighbours": neigh}


def assert_neighbours_exact(state: dict, k: int) -> None:
    """Stored lists equal the brute-force reference: same ids, same order, distances 1e-4."""
    ids, matrix = state["ids"], state["features"]
    width = min(k, len(ids) - 1)
    ref_ids, ref_dist = brute_force(ids, matrix, width)
    rows = state["neighbours"]
    assert len(rows) == len(ids) * width
    got_ids = np.array([r.neighbour_id for r in rows]).reshape(len(ids), width)
    got_dist = np.array([r.distance for r in rows]).reshape(len(ids), width)
    assert [r.rank for r in rows[:width]] == list(range(1, width + 1))
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_allclose(got_dist, ref_dist, rtol=1e-4, atol=1e-6)


def test_first_run_then_rerun_then_changes(run_flow, database_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "images"
    expected = write_odd_images(root / "odd")
    photos = write_photos(root / "photos", 6)
    ok_count = sum(1 for s in expected.values() if s == "ok") + 6

    first = run_flow(root, database_url)
    assert (first["found"], first["new"], first["extracted"]) == (27, 27, 27)
    assert first["failed"] == 5 and first["neighbour_mode"] == "full"
    state = stored_state(database_url)
    for name, status in expected.items():
        assert state["names"][f"odd/{name}"][1] == status, name
    failed = {n: e for n, (_, s, e) in state["names"].items() if s == "failed"}
    assert all(failed.values()) and len(failed) == 5
    assert len(state["ids"]) == ok_count
    assert_neighbours_exact(state, K)

    again = run_flow(root, database_url)
    assert (again["new"], again["changed"], again["extracted"], again["unchanged"]) == (0, 0, 0, 27)

    write_photos(root / "more", 2, seed=7)
    photos[0].unlink()
    shutil.copyfile(photos[2], photos[1])  # new content under an old name
    third = run_flow(root, database_url)
    assert (third["new"], third["changed"], third["deleted"]) == (2, 1, 1)
    assert third["extracted"] == 3 and third["neighbour_mode"] == "incremental"
    state = stored_state(database_url)
    assert len(state["ids"]) == ok_count + 1
    assert_neighbours_exact(state, K)


def test_fewer_images_than_k_get_all_others(run_flow, sqlite_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_photos(tmp_path / "few", 3)
    run_flow(tmp_path / "few", sqlite_url)
    state = stored_state(sqlite_url)
    assert len(state["neighbours"]) == 3 * 2
    assert_neighbours_exact(state, K)


def test_another_folder_becomes_another_source(run_flow, sqlite_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = write_photos(tmp_path / "a", 2)
    other = write_photos(tmp_path / "b", 3, seed=5)
    other[2].rename(tmp_path / "b" / first[0].name)  # the same path in both, other bytes
    run_flow(tmp_path / "a", sqlite_url)

    second = run_flow(tmp_path / "b", sqlite_url)

    assert second["sources"] == {"b": str(tmp_path / "b")}
    assert (second["found"], second["new"], second["extracted"]) == (3, 3, 3)
    state = stored_state(sqlite_url)
    assert len(state["ids"]) == 5  # the same path in two sources is two images
    assert_neighbours_exact(state, K)  # the lists span both sources


def test_a_source_name_bound_to_another_folder_is_refused(
    run_flow, sqlite_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    write_photos(tmp_path / "a", 2)
    write_photos(tmp_path / "b", 2)
    run_flow(tmp_path / "a", sqlite_url)
    with pytest.raises(SourceError, match="lookalike move-source a "):
        run_flow(tmp_path / "b", sqlite_url, source="a")
    assert len(stored_state(sqlite_url)["names"]) == 2


def test_emptied_folder_is_refused(run_flow, sqlite_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An emptied (say, unmounted) folder must not wipe the collection."""
    root = tmp_path / "docs"
    write_photos(root, 3)
    run_flow(root, sqlite_url)
    for photo in root.iterdir():
        photo.unlink()
    (root / "notes.txt").write_text("no images here")
    with pytest.raises(NoImagesError, match="no image files"):
        run_flow(root, sqlite_url)
    state = stored_state(sqlite_url)
    assert len(state["names"]) == 3 and len(state["neighbours"]) == 3 * 2
