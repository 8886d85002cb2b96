"""A database made before sources (one folder per database) opens unchanged: its folder becomes
the first source, every feature, list, group and judgement stays, and nothing is re-extracted.

The old database is built with the schema of that version (LEGACY below: image_names without
source_id and unique by file name, collection with the folder's root), filled with the rows a
real run wrote (copied from a database the pipeline's own steps indexed), on SQLite and MariaDB.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    Table,
    create_engine,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError

from lookalike.sql.migrations import needs_sources_migration, source_name_for
from lookalike.sql.schema import image_names, metadata, sources
from lookalike.tasks.database import connect_checked, utcnow
from lookalike.tasks.duplicates import find_duplicates
from lookalike.tasks.settings import Settings
from tests.legacy_schema import legacy_metadata
from tests.odd_images import write_photos
from tests.pipeline_catalog import index_and_lay_out


def rows_of(engine: Engine, table: Table) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table))]


def build_legacy_database(url: str, indexed_url: str) -> str:
    """Create the old schema at url and copy every row of the indexed database into it; the
    folder the old collection row names."""
    indexed = connect_checked(indexed_url)
    (root,) = [s["root"] for s in rows_of(indexed, sources)]
    legacy = legacy_metadata()
    engine = create_engine(url)
    legacy.create_all(engine)
    with engine.begin() as conn:
        for table in legacy.sorted_tables:
            rows = rows_of(indexed, metadata.tables[table.name])
            for row in rows:
                row.pop("source_id", None)
                if table.name == "collection":
                    row["root"] = root
            if rows:
                conn.execute(insert(table), rows)
    indexed.dispose()
    engine.dispose()
    return str(root)


@pytest.fixture
def legacy(database_url: str, tmp_path: Path) -> tuple[str, Path]:
    """An old-schema database of a folder a real run indexed: (url, folder)."""
    root = tmp_path / "campaign 2019"
    write_photos(root, 4)
    indexed_url = f"sqlite:///{tmp_path / 'indexed.sqlite'}"
    index_and_lay_out(indexed_url, root)
    engine = connect_checked(indexed_url)
    find_duplicates(engine, Settings().duplicate_threshold)
    engine.dispose()
    assert build_legacy_database(database_url, indexed_url) == str(root.resolve())
    return database_url, root


def test_the_legacy_schema_is_recognised_and_migrated_once(legacy: tuple[str, Path]) -> None:
    url, root = legacy
    plain = create_engine(url)
    assert needs_sources_migration(plain)
    with plain.connect() as conn:
        before = {t: conn.execute(select(func.count()).select_from(metadata.tables[t])).scalar()
                  for t in ("image_names", "image_features", "image_neighbours", "image_map",
                            "duplicate_groups")}  # fmt: skip
        features_before = conn.execute(select(metadata.tables["image_features"])).all()

    engine = connect_checked(url)  # what every command does first

    assert not needs_sources_migration(engine)
    assert [(s["id"], s["name"], s["root"]) for s in rows_of(engine, sources)] == [
        (1, "campaign-2019", str(root.resolve()))
    ]
    assert {r["source_id"] for r in rows_of(engine, image_names)} == {1}
    with engine.connect() as conn:
        after = {t: conn.execute(select(func.count()).select_from(metadata.tables[t])).scalar()
                 for t in before}  # fmt: skip
        assert conn.execute(select(metadata.tables["image_features"])).all() == features_before
    assert after == before and before["image_neighbours"] > 0
    assert "root" not in {c["name"] for c in inspect(engine).get_columns("collection")}
    connect_checked(url).dispose()  # a second open changes nothing
    assert len(rows_of(engine, sources)) == 1
    engine.dispose()
    plain.dispose()


def test_the_migrated_keys_allow_a_path_once_per_source(legacy: tuple[str, Path]) -> None:
    url, _ = legacy
    engine = connect_checked(url)
    first = rows_of(engine, image_names)[0]
    copy = {k: v for k, v in first.items() if k != "id"}
    with engine.begin() as conn:
        conn.execute(insert(sources).values(id=2, name="other", root="/other", created_at=utcnow()))
        conn.execute(insert(image_names).values(**{**copy, "source_id": 2}))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert(image_names).values(**copy))  # the same path in the same source
    engine.dispose()


def test_a_migrated_database_is_up_to_date_without_extracting(legacy: tuple[str, Path]) -> None:
    """The next `lookalike process FOLDER` finds nothing to do: no image is read again."""
    from lookalike.flows.process import plan_run, up_to_date_summary
    from lookalike.tasks.sources import SourceSpec

    url, root = legacy
    settings = Settings.from_env(database_url=url, weights="none")
    plan, check_bytes = plan_run([SourceSpec(root=str(root))], settings)
    summary = up_to_date_summary(plan, started=time.perf_counter(), bytes_read=check_bytes)

    assert summary is not None, "the migrated database should need nothing"
    answer = asdict(summary)
    assert answer["sources"] == {source_name_for(str(root)): str(root.resolve())}
    assert (answer["found"], answer["new"], answer["changed"], answer["extracted"]) == (4, 0, 0, 0)
    assert answer["neighbour_mode"] == "unchanged"


def test_a_migrated_database_takes_a_second_folder_as_a_second_source(
    legacy: tuple[str, Path], tmp_path: Path
) -> None:
    from lookalike.tasks.sources import open_source, read_sources

    url, root = legacy
    other = tmp_path / "other"
    shutil.copytree(root, other)
    engine = connect_checked(url)
    source = open_source(engine, other.resolve(), None)
    assert (source.id, source.name) == (2, "other")
    assert [s.name for s in read_sources(engine)] == ["campaign-2019", "other"]
    engine.dispose()
