"""Duplicate groups: the grouping rule, and the find-duplicates step in real runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import delete, select

from lookalike.sql.schema import duplicate_groups, duplicate_state, image_names
from lookalike.tasks.database import connect_checked
from lookalike.tasks.duplicate_groups import (
    Pairs,
    exact_pairs,
    group_pairs,
    largest_first,
    merge_pairs,
)
from lookalike.tasks.duplicates import find_duplicates
from lookalike.tasks.settings import Settings
from tests.odd_images import write_photos


def as_sets(groups) -> dict[int, set[int]]:  # type: ignore[no-untyped-def]
    found: dict[int, set[int]] = {}
    for group, image in zip(groups.group_id.tolist(), groups.image_id.tolist(), strict=True):
        found.setdefault(group, set()).add(image)
    return found


def test_a_chain_of_near_pairs_is_cut_at_the_representative() -> None:
    # 1-2-3-4-5 each 1.0 apart; 3 has the most pairs within 1.0 (tied with 2 and 4: lowest id
    # first among the highest degree is 2), so 2 takes 1 and 3, and 4 takes 5.
    pairs = Pairs.of([1, 2, 3, 4], [2, 3, 4, 5], [1.0, 1.0, 1.0, 1.0])
    groups = group_pairs(pairs, 1.0, {})
    assert as_sets(groups) == {2: {1, 2, 3}, 4: {4, 5}}
    # every member within the threshold of its representative, none of them twice
    assert sorted(groups.image_id.tolist()) == [1, 2, 3, 4, 5]
    assert np.all(groups.distance <= 1.0)


def test_pairs_beyond_the_threshold_make_no_group_but_exact_copies_always_do() -> None:
    near = Pairs.of([1, 3], [2, 4], [0.5, 2.0])
    exact = exact_pairs([7, 8, 9], ["h", "h", "other"])
    hashes = {7: "h", 8: "h", 9: "other"}
    groups = group_pairs(merge_pairs(near, exact), 0.1, hashes)
    assert as_sets(groups) == {7: {7, 8}}
    assert groups.kinds() == ["exact", "exact"]
    wider = group_pairs(merge_pairs(near, exact), 0.5, hashes)
    assert as_sets(wider) == {1: {1, 2}, 7: {7, 8}}
    assert dict(zip(wider.image_id.tolist(), wider.kinds(), strict=True))[2] == "near"


def test_pairs_given_twice_keep_their_smaller_distance() -> None:
    pairs = Pairs.of([2, 1, 5], [1, 2, 5], [0.3, 0.2, 0.0])
    assert (pairs.a.tolist(), pairs.b.tolist()) == ([1], [2])
    assert pairs.distance.tolist() == [np.float32(0.2)]


def test_largest_groups_come_first() -> None:
    pairs = Pairs.of([1, 1, 10], [2, 3, 11], [0.1, 0.2, 0.1])
    assert largest_first(group_pairs(pairs, 1.0, {})) == [1, 10]


def stored_groups(database_url: str) -> dict[str, tuple[str, str]]:
    """file name -> (representative's file name, kind)."""
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        names = dict(conn.execute(select(image_names.c.id, image_names.c.file_name)).all())
        columns = duplicate_groups.c
        rows = conn.execute(select(columns.image_id, columns.group_id, columns.kind)).all()
    engine.dispose()
    return {names[i]: (names[g], kind) for i, g, kind in rows}


def groups_from_scratch(database_url: str) -> dict[str, tuple[str, str]]:
    """The groups a full recomputation finds (the stored state forgotten first)."""
    engine = connect_checked(database_url)
    with engine.begin() as conn:
        conn.execute(delete(duplicate_state))
    threshold = Settings().duplicate_threshold
    assert find_duplicates(engine, threshold).mode == "full"
    engine.dispose()
    return stored_groups(database_url)


@pytest.fixture
def run_flow(prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from lookalike.flows.process import process_images

    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "data"))

    def run(root: Path, database_url: str) -> dict:
        return process_images(
            root=str(root), batch_size=8, k=5, weights="none", database_url=database_url
        )

    return run


def test_copies_join_their_original_across_runs(  # type: ignore[no-untyped-def]
    run_flow, database_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    photos = write_photos(root, 8, size=(320, 240))
    shutil.copyfile(photos[1], root / "exact_copy.jpg")
    first = run_flow(root, database_url)
    assert first["duplicate_mode"] == "full"
    groups = stored_groups(database_url)
    assert groups["exact_copy.jpg"][1] == "exact"
    assert groups["exact_copy.jpg"][0] == groups[photos[1].name][0]

    again = run_flow(root, database_url)  # nothing changed: nothing recomputed
    assert again["duplicate_mode"] == "unchanged" and again["duplicates_recomputed"] is False
    assert (again["duplicate_groups"], again["duplicate_images"]) == (
        first["duplicate_groups"],
        first["duplicate_images"],
    )

    # A re-encoded copy arrives: an incremental run finds it in its original's group.
    Image.open(photos[0]).save(root / "reencoded.jpg", "JPEG", quality=70)
    third = run_flow(root, database_url)
    assert (third["neighbour_mode"], third["duplicate_mode"]) == ("incremental", "incremental")
    groups = stored_groups(database_url)
    assert groups["reencoded.jpg"][1] == "near"
    assert groups["reencoded.jpg"][0] == groups[photos[0].name][0]
    assert groups == groups_from_scratch(database_url)

    # Deleting the exact copy dissolves its group.
    (root / "exact_copy.jpg").unlink()
    assert run_flow(root, database_url)["duplicate_mode"] == "incremental"
    groups = stored_groups(database_url)
    assert groups == groups_from_scratch(database_url)
    assert "exact_copy.jpg" not in groups and photos[1].name not in groups
    assert groups["reencoded.jpg"][0] == groups[photos[0].name][0]


def test_the_threshold_setting_is_recorded_with_the_groups(  # type: ignore[no-untyped-def]
    run_flow, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    write_photos(root, 4)
    monkeypatch.setenv("LOOKALIKE_DUPLICATE_THRESHOLD", "0.2")
    run_flow(root, sqlite_url)
    engine = connect_checked(sqlite_url)
    with engine.connect() as conn:
        threshold, scale = conn.execute(
            select(duplicate_state.c.threshold, duplicate_state.c.scale)
        ).one()
    engine.dispose()
    assert threshold == pytest.approx(0.2) and scale > 0


def test_an_exact_copy_in_another_source_joins_the_group_and_is_listed_with_its_source(  # type: ignore[no-untyped-def]
    run_flow, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lookalike.flows.cli import main

    photos = write_photos(tmp_path / "a", 4)
    write_photos(tmp_path / "b", 2, seed=3)
    shutil.copyfile(photos[1], tmp_path / "b" / "copy.jpg")
    run_flow(tmp_path / "a", sqlite_url)
    assert run_flow(tmp_path / "b", sqlite_url)["duplicate_groups"] >= 1
    groups = stored_groups(sqlite_url)
    assert groups["copy.jpg"] == (groups[photos[1].name][0], "exact")
    capsys.readouterr()

    assert main(["duplicates", "--db", sqlite_url, "--format", "json"]) == 0

    listed = json.loads(capsys.readouterr().out)["images"]
    group = next(row["group"] for row in listed if row["file_name"] == "copy.jpg")
    members = {(row["source"], row["file_name"]) for row in listed if row["group"] == group}
    assert {("a", photos[1].name), ("b", "copy.jpg")} <= members
    assert main(["duplicates", "--db", sqlite_url]) == 0
    assert " b/copy.jpg\n" in capsys.readouterr().out
