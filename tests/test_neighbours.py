"""The neighbour stage on a real database: the plan read from the tables, and the passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import update

from lookalike.sql.schema import image_names, image_neighbours
from lookalike.tasks.database import connect_checked
from lookalike.tasks.knn import knn_all
from lookalike.tasks.knn.plan import PassKind
from lookalike.tasks.neighbours import compute_neighbours, plan_neighbour_pass, read_features
from lookalike.tasks.stage import read_table
from tests.test_neighbour_blocks import add_images, add_lists


def planned(database_url: str, k: int, rebuild: bool = False) -> PassKind:
    """plan_neighbour_pass on a fresh engine, disposed afterwards."""
    engine = connect_checked(database_url)
    try:
        return plan_neighbour_pass(engine, k, rebuild=rebuild)
    finally:
        engine.dispose()


def mark_stale(database_url: str, image_id: int) -> None:
    engine = connect_checked(database_url)
    with engine.begin() as conn:
        conn.execute(update(image_names).where(image_names.c.id == image_id).values(indexed=False))
    engine.dispose()


def test_the_plan_follows_the_stored_lists_and_the_changes(database_url: str) -> None:
    ids = add_images(database_url, 8, stale=2)  # 2 of 8 changed: at the 25 % limit
    assert planned(database_url, 3) is PassKind.FULL  # no lists yet

    add_lists(database_url, ids[:6], 2)
    assert planned(database_url, 3) is PassKind.FULL  # lists of another length
    assert planned(database_url, 2) is PassKind.INCREMENTAL  # 2 changed <= 0.25 * 8
    assert planned(database_url, 2, rebuild=True) is PassKind.FULL
    assert planned(database_url, 100) is PassKind.FULL  # k past the images asks for 5 entries

    mark_stale(database_url, ids[0])  # a third changed image passes the limit
    assert planned(database_url, 2) is PassKind.FULL


def test_current_lists_are_unchanged(database_url: str) -> None:
    ids = add_images(database_url, 5)
    add_lists(database_url, ids, 4)
    assert planned(database_url, 4) is PassKind.UNCHANGED
    assert planned(database_url, 10) is PassKind.UNCHANGED  # k past the images: every other
    assert planned(database_url, 3) is PassKind.FULL


def test_an_incremental_pass_gives_the_full_pass_lists(sqlite_url: str, tmp_path: Path) -> None:
    ids = add_images(sqlite_url, 40, stale=4)
    engine = connect_checked(sqlite_url)
    staging = tmp_path / "staging"
    try:
        all_ids, features = read_features(engine, staging)
        old = knn_all(features[:36], all_ids[:36], 5)
        rows = [
            dict(image_id=int(i), rank=r + 1, neighbour_id=int(n), distance=float(d))
            for i, ns, ds in zip(old.image_ids, old.neighbour_ids, old.distances, strict=True)
            for r, (n, d) in enumerate(zip(ns, ds, strict=True))
        ]
        with engine.begin() as conn:
            conn.execute(image_neighbours.insert(), rows)
        assert plan_neighbour_pass(engine, 5) is PassKind.INCREMENTAL
        result = compute_neighbours(engine, staging, 5, PassKind.INCREMENTAL)
    finally:
        engine.dispose()
    assert (result.kind, result.images, result.rows, result.refreshed_ids) == (
        PassKind.INCREMENTAL,
        40,
        200,
        ids[36:],
    )
    table = read_table(result.staged)
    expected = knn_all(features, all_ids, 5)
    np.testing.assert_array_equal(
        table.column("neighbour_id").to_numpy().reshape(40, 5), expected.neighbour_ids
    )
