"""The layout-map step on real runs: full, unchanged, incremental (nobody moves), refit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from lookalike.sql.schema import STATUS_OK, image_map, image_names, map_state
from lookalike.tasks.database import connect_checked
from lookalike.tasks.map import MODE_FULL, MODE_INCREMENTAL, MODE_UNCHANGED, layout_map
from lookalike.tasks.map_reader import read_map
from tests.odd_images import write_photos
from tests.pipeline_catalog import index_folder

pytestmark = pytest.mark.slow


def stored_map(url: str) -> dict[int, tuple[float, float]]:
    engine = connect_checked(url)
    with engine.connect() as conn:
        rows = conn.execute(select(image_map.c.image_id, image_map.c.x, image_map.c.y)).all()
    engine.dispose()
    return {int(r[0]): (float(r[1]), float(r[2])) for r in rows}


def ok_ids(url: str) -> set[int]:
    engine = connect_checked(url)
    with engine.connect() as conn:
        ids = conn.execute(select(image_names.c.id).where(image_names.c.status == STATUS_OK))
        found = set(ids.scalars())
    engine.dispose()
    return found


def test_map_is_made_kept_updated_without_moving_anyone_and_refitted(
    database_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    write_photos(root / "first", 30, seed=1)
    index_folder(database_url, root)
    engine = connect_checked(database_url)
    first = layout_map(engine)
    assert (first.mode, first.points, first.placed) == (MODE_FULL, 30, 0)
    before = stored_map(database_url)
    assert set(before) == ok_ids(database_url)

    again = layout_map(engine)
    assert again.mode == MODE_UNCHANGED and stored_map(database_url) == before

    added = write_photos(root / "later", 3, seed=2)
    (root / "first" / "photo_001_00000.jpg").unlink()
    index_folder(database_url, root)
    update = layout_map(engine)
    assert (update.mode, update.points, update.placed) == (MODE_INCREMENTAL, 32, 3)
    after = stored_map(database_url)
    assert set(after) == ok_ids(database_url)
    assert all(after[i] == position for i, position in before.items() if i in after)
    assert len(set(before) - set(after)) == 1 and len(set(after) - set(before)) == len(added)

    refit = layout_map(engine, refit=True)
    assert refit.mode == MODE_FULL and refit.placed == 0
    with engine.connect() as conn:
        state = conn.execute(select(map_state)).one()
    assert (state.fitted_images, state.placed_images) == (32, 0)
    engine.dispose()


def test_many_changes_since_the_last_fit_make_a_full_refit(sqlite_url: str, tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_photos(root / "first", 20, seed=3)
    index_folder(sqlite_url, root)
    engine = connect_checked(sqlite_url)
    assert layout_map(engine).mode == MODE_FULL
    write_photos(root / "later", 3, seed=4)  # 3 of 20 since the fit: placed
    index_folder(sqlite_url, root)
    assert layout_map(engine).mode == MODE_INCREMENTAL
    write_photos(root / "more", 2, seed=5)  # 5 of 20 since the fit: past the fifth, refit
    index_folder(sqlite_url, root)
    assert layout_map(engine).mode == MODE_FULL
    engine.dispose()


def test_the_demo_sets_copies_land_beside_their_originals(sqlite_url: str, tmp_path: Path) -> None:
    """Each transformed copy's nearest point on the map belongs to its own photo (the original
    or another copy) for most copies: 37 of 49 (0.76) and 34 of 49 (0.69) with the random
    weights used here on two machines (float rounding differs between CPUs); a photo's family
    is one of 11, so chance would give about 0.1."""
    from scripts.make_demo_images import make_demo_images

    root = tmp_path / "demo"
    make_demo_images(root)
    index_folder(sqlite_url, root)
    engine = connect_checked(sqlite_url)
    layout_map(engine)
    with engine.connect() as conn:
        rows = conn.execute(
            select(image_names.c.file_name, image_map.c.x, image_map.c.y).join(
                image_map, image_map.c.image_id == image_names.c.id
            )
        ).all()
    engine.dispose()
    names = [row[0] for row in rows]
    xy = np.array([(row[1], row[2]) for row in rows])
    families = [name.split("/")[1].removesuffix(".jpg") for name in names]
    copies = [i for i, name in enumerate(names) if name.startswith("variants/")]
    beside = 0
    for i in copies:
        squared = ((xy - xy[i]) ** 2).sum(axis=1)
        squared[i] = np.inf
        beside += families[int(np.argmin(squared))] == families[i]
    assert len(copies) == 49
    assert beside / len(copies) >= 0.6, f"{beside} of {len(copies)} copies beside their photo"


def test_the_map_command_refits_on_request(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lookalike.flows.cli import main

    write_photos(tmp_path / "images", 12, seed=6)
    index_folder(sqlite_url, tmp_path / "images")
    assert main(["map", "--db", sqlite_url]) == 0
    assert capsys.readouterr().out == "map: 12 points (full)\n"
    assert main(["map", "--db", sqlite_url]) == 0
    assert capsys.readouterr().out == "map: 12 points (unchanged)\n"
    assert main(["map", "--db", sqlite_url, "--refit"]) == 0
    assert capsys.readouterr().out == "map: 12 points (full)\n"


def test_with_several_sources_the_maps_groups_are_source_and_folder(
    sqlite_url: str, tmp_path: Path
) -> None:
    write_photos(tmp_path / "a" / "trip", 5, seed=7)
    write_photos(tmp_path / "b", 5, seed=8)  # files at the source's root
    index_folder(sqlite_url, tmp_path / "a")
    engine = connect_checked(sqlite_url)
    layout_map(engine)
    assert read_map(engine).folders == ["trip"]  # one source: the folders alone
    index_folder(sqlite_url, tmp_path / "b", "scans")
    assert layout_map(engine).points == 10

    points = read_map(engine)
    engine.dispose()
    assert points.folders == ["a/trip", "scans/"]
    assert sorted(points.folder_of.tolist()) == [0] * 5 + [1] * 5
