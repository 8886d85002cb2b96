"""Several folders in one archive (sources), on SQLite and MariaDB: identity by (source, path),
the rules for names and folders, neighbours across all sources equal to a brute force over
their union after every add, update, removal and move, and concurrent runs of two sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, insert, select, update

from lookalike.sql.schema import (
    STATUS_OK,
    image_features,
    image_names,
    runs,
)
from lookalike.tasks.catalog import (
    DEFAULT_MODEL_NAME,
    apply_changes,
    mark_indexed,
    open_collection,
    read_known,
)
from lookalike.tasks.database import connect_checked
from lookalike.tasks.discover import find_changes
from lookalike.tasks.knn import knn_all
from lookalike.tasks.knn.plan import PassKind, list_depth
from lookalike.tasks.load import load_neighbour_table
from lookalike.tasks.models import INCEPTION_V3
from lookalike.tasks.neighbours import (
    compute_neighbours,
    deep_lists_path,
    keep_deep_lists,
    plan_neighbour_pass,
    read_deep_lists,
    read_neighbour_lists,
    read_staged_lists,
)
from lookalike.tasks.sources import (
    SourceError,
    delete_source,
    find_source,
    open_source,
    read_sources,
    resolve_source,
)
from tests.odd_images import write_photos

K = 5
DIM = INCEPTION_V3.feature_dim


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = connect_checked(database_url)
    open_collection(engine, "none-test")
    yield engine
    engine.dispose()


# --- identity and names -----------------------------------------------------------------------


def test_the_same_path_in_two_sources_is_two_images(engine: Engine, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root, colour in ((a, b"\xff\xd8first"), (b, b"\xff\xd8second")):
        (root / "shelf").mkdir(parents=True)
        (root / "shelf" / "1.jpg").write_bytes(colour)
        (root / "2.jpg").write_bytes(colour + b"2")
    first, second = open_source(engine, a, None), open_source(engine, b, None)
    for source in (first, second):
        apply_changes(engine, source.id, find_changes(Path(source.root), {}))

    known_a, known_b = read_known(engine, first.id), read_known(engine, second.id)
    assert sorted(known_a) == sorted(known_b) == ["2.jpg", "shelf/1.jpg"]
    assert known_a["shelf/1.jpg"].image_id != known_b["shelf/1.jpg"].image_id
    assert known_a["shelf/1.jpg"].content_hash != known_b["shelf/1.jpg"].content_hash

    (a / "2.jpg").unlink()  # gone from one source only
    changes = find_changes(a, read_known(engine, first.id))
    assert changes.deleted_ids == [known_a["2.jpg"].image_id]
    apply_changes(engine, first.id, changes)
    assert sorted(read_known(engine, second.id)) == ["2.jpg", "shelf/1.jpg"]


def test_what_a_folder_and_a_name_mean_together(engine: Engine, tmp_path: Path) -> None:
    a, b, c = (tmp_path / name for name in ("fotos 1998", "b", "c"))
    first = open_source(engine, a, None)
    assert first.name == "fotos-1998"  # named after its folder, made printable
    assert resolve_source(engine, a, None) == ("fotos-1998", first)  # found by its folder
    open_source(engine, b, "dept")
    assert resolve_source(engine, b, None)[0] == "dept"  # no name given: the folder's source

    with pytest.raises(SourceError, match="move-source dept"):
        resolve_source(engine, c, "dept")  # a name bound to another folder
    with pytest.raises(SourceError, match="already the source 'dept'"):
        resolve_source(engine, b, "other")  # a folder belongs to one source
    with pytest.raises(SourceError, match="bad source name"):
        resolve_source(engine, c, "a/b")
    with pytest.raises(SourceError, match="no source named 'nope'.*fotos-1998, dept"):
        find_source(engine, "nope")

    moved = open_source(engine, c, "dept", move=True)
    assert (moved.id, moved.root) == (find_source(engine, "dept").id, str(c))
    assert [s.name for s in read_sources(engine)] == ["fotos-1998", "dept"]


# --- neighbours across sources ------------------------------------------------------------------


def add_images(engine: Engine, source_id: int, vectors: np.ndarray, prefix: str) -> list[int]:
    """Rows with features, as a feature load leaves them (ok, not yet indexed): their ids."""
    rows = [
        dict(source_id=source_id, file_name=f"{prefix}/{i}.jpg", size=1, mtime_ns=1,
             content_hash=f"{prefix}{i}".ljust(32, "0"), status=STATUS_OK, indexed=False)
        for i in range(len(vectors))
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(image_names), rows)
        ids = conn.execute(
            select(image_names.c.id)
            .where(image_names.c.source_id == source_id)
            .order_by(image_names.c.id)
        ).scalars().all()[-len(vectors):]  # fmt: skip
        conn.execute(insert(image_features), [
            dict(image_id=i, model=DEFAULT_MODEL_NAME, features=v.tobytes())
            for i, v in zip(ids, vectors, strict=True)
        ])  # fmt: skip
    return list(ids)


def refresh(engine: Engine, url: str, staging: Path) -> PassKind:
    """The neighbour step of a run: the planned pass, swapped in; which pass it was."""
    kind = plan_neighbour_pass(engine, K)
    if kind is not PassKind.UNCHANGED:
        staged = compute_neighbours(engine, staging, K, kind)
        load_neighbour_table(url, staged.staged, staging)
        mark_indexed(engine, staged.refreshed_ids)
        keep_deep_lists(staged, staging, url)
        deep = read_staged_lists(deep_lists_path(staging, url))  # what the next update starts from
        assert deep.neighbour_ids.shape[1] == list_depth(K, len(deep.image_ids)) > K
    return kind


def all_vectors(engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(image_features.c.image_id, image_features.c.features).order_by("image_id")
        ).all()
    ids = np.array([r.image_id for r in rows], dtype=np.int64)
    return ids, np.stack([np.frombuffer(r.features, dtype=np.float32) for r in rows])


def assert_lists_are_exact(engine: Engine) -> None:
    """The stored lists equal a full recomputation and a brute force over every source."""
    stored = read_neighbour_lists(engine)
    ids, vectors = all_vectors(engine)
    assert stored is not None and np.array_equal(stored.image_ids, ids)
    full = knn_all(vectors, ids, K)
    assert np.array_equal(stored.neighbour_ids, full.neighbour_ids)
    # MariaDB hands FLOAT columns over as text of 6 significant digits.
    np.testing.assert_allclose(stored.distances, full.distances, rtol=1e-5)
    squared = ((vectors[:, None, :].astype(np.float64) - vectors[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(squared, np.inf)
    brute = ids[np.argsort(squared, axis=1, kind="stable")[:, :K]]
    assert np.array_equal(stored.neighbour_ids, brute)


def source_of(engine: Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return dict(conn.execute(select(image_names.c.id, image_names.c.source_id)).all())  # type: ignore[arg-type]


def test_neighbours_span_sources_and_every_change_updates_them_exactly(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(6, DIM)).astype(np.float32)

    def photos(count: int) -> np.ndarray:  # clusters shared by all sources
        picks = centres[rng.integers(len(centres), size=count)]
        return (picks + 0.3 * rng.normal(size=(count, DIM))).astype(np.float32)

    a = open_source(engine, tmp_path / "a", None)
    b = open_source(engine, tmp_path / "b", None)
    add_images(engine, a.id, photos(60), "x")
    add_images(engine, b.id, photos(40), "x")  # the same relative paths as in a
    assert refresh(engine, database_url, tmp_path) is PassKind.FULL
    assert_lists_are_exact(engine)
    stored = read_neighbour_lists(engine)
    assert stored is not None
    owner = source_of(engine)
    across = sum(
        owner[int(i)] != owner[int(n)]
        for i, row in zip(stored.image_ids, stored.neighbour_ids, strict=True)
        for n in row
    )
    assert across > 0  # similarity runs across the folders

    c = open_source(engine, tmp_path / "c", None)  # a source added
    add_images(engine, c.id, photos(8), "y")
    assert refresh(engine, database_url, tmp_path) is PassKind.INCREMENTAL
    assert_lists_are_exact(engine)

    changed = add_images(engine, a.id, photos(3), "z")  # a source updated: new images...
    with engine.begin() as conn:  # ...and re-extracted ones
        ids = (
            conn.execute(select(image_names.c.id).where(image_names.c.source_id == a.id).limit(2))
            .scalars()
            .all()
        )
        for image_id, vector in zip(ids, photos(2), strict=True):
            conn.execute(
                update(image_features)
                .where(image_features.c.image_id == image_id)
                .values(features=vector.tobytes())
            )
        conn.execute(update(image_names).where(image_names.c.id.in_(ids)).values(indexed=False))
    assert changed and refresh(engine, database_url, tmp_path) is PassKind.INCREMENTAL
    assert_lists_are_exact(engine)

    removed = delete_source(engine, find_source(engine, "b"))  # a source removed
    assert removed == 40
    assert refresh(engine, database_url, tmp_path) is PassKind.INCREMENTAL
    assert_lists_are_exact(engine)
    assert set(source_of(engine).values()) == {a.id, c.id}

    # Deep lists that no longer begin the table (a run of an older version, a crash between
    # the swap and keeping them) are noticed by their digest: the update starts from the table.
    kept = deep_lists_path(tmp_path, database_url)
    stale = kept.read_bytes()
    add_images(engine, c.id, photos(2), "w")
    assert refresh(engine, database_url, tmp_path) is PassKind.INCREMENTAL
    kept.write_bytes(stale)
    assert read_deep_lists(kept, engine, K) is None
    add_images(engine, c.id, photos(2), "v")
    assert refresh(engine, database_url, tmp_path) is PassKind.INCREMENTAL
    assert_lists_are_exact(engine)
    assert read_deep_lists(kept, engine, K) is not None

    before = read_neighbour_lists(engine)
    open_source(engine, tmp_path / "moved", "a", move=True)  # a source moved: same images
    assert refresh(engine, database_url, tmp_path) is PassKind.UNCHANGED
    after = read_neighbour_lists(engine)
    assert before is not None and after is not None
    assert np.array_equal(before.neighbour_ids, after.neighbour_ids)


# --- runs: two sources at once, removal and move through the command line -------------------------


def lookalike(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lookalike.flows.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finished(process: subprocess.Popen[str]) -> str:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    return stdout


@pytest.fixture
def cli_env(tmp_path: Path, database_url: str, prefect_harness: None) -> dict[str, str]:
    """The commands' environment: this session's Prefect API (no temporary server per run)
    and the test-only small configuration of DINOv2 with random weights."""
    from prefect.settings import get_current_settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env.update(
        LOOKALIKE_DATA_DIR=str(tmp_path / "data"),
        LOOKALIKE_DATABASE_URL=database_url,
        LOOKALIKE_MODEL="dinov2_small",
        LOOKALIKE_TEST_REDUCED_MODELS="1",
        LOOKALIKE_WEIGHTS="none",
        LOOKALIKE_K="3",
        PREFECT_API_URL=str(get_current_settings().api.url),
    )
    return env


def test_two_sources_run_at_once_then_one_is_removed_and_one_moved(
    cli_env: dict[str, str], database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    names = [p.name for p in write_photos(a, 4, seed=1)]
    for path, name in zip(write_photos(b, 4, seed=2), names, strict=True):
        path.rename(b / name)  # the same relative paths, other photos

    both = [lookalike("process", str(root), "--json", env=cli_env) for root in (a, b)]
    summaries = [json.loads(finished(p)) for p in both]

    assert [list(s["sources"]) for s in summaries] == [["a"], ["b"]]
    assert [s["new"] for s in summaries] == [4, 4]
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        spans = conn.execute(
            select(runs.c.started_at, runs.c.finished_at).order_by(runs.c.started_at)
        ).all()
    assert len(spans) == 2 and spans[0].finished_at <= spans[1].started_at  # never overlapping
    assert_neighbour_rows(engine, images=8)
    listed = json.loads(finished(lookalike("sources", "--json", env=cli_env)))
    assert sorted((s["name"], s["images"], s["ok"], s["last_run_status"]) for s in listed) == [
        ("a", 4, 4, "completed"), ("b", 4, 4, "completed")]  # fmt: skip

    # The flows themselves, in this process, as a deployment run would call them.
    from lookalike.flows.process import process_images
    from lookalike.flows.sources import remove_source

    for name in ("LOOKALIKE_MODEL", "LOOKALIKE_TEST_REDUCED_MODELS", "LOOKALIKE_WEIGHTS"):
        monkeypatch.setenv(name, cli_env[name])
    monkeypatch.setenv("LOOKALIKE_DATA_DIR", cli_env["LOOKALIKE_DATA_DIR"])
    removal = remove_source(name="b", database_url=database_url, k=3)
    assert (removal["removed_images"], removal["images"]) == (4, 4)
    assert_neighbour_rows(engine, images=4)

    moved = tmp_path / "moved"
    shutil.copytree(a, moved)  # the same files, elsewhere
    summary = process_images(root=str(moved), source="a", move=True, database_url=database_url, k=3)
    assert summary["sources"] == {"a": str(moved.resolve())}
    assert (summary["new"], summary["deleted"], summary["extracted"]) == (0, 0, 0)
    assert [s.root for s in read_sources(engine)] == [str(moved.resolve())]
    engine.dispose()


def assert_neighbour_rows(engine: Engine, images: int) -> None:
    lists = read_neighbour_lists(engine)
    assert lists is not None and lists.neighbour_ids.shape == (images, 3)
