"""Faults: runs killed mid-way, MariaDB going away, a full staging disk, files changing mid-run.

Every run here is the real `lookalike process` command in its own process, reporting to the
session's Prefect test API. Kill points are found from outside the run, never by hooks in the
code: staged Arrow files appearing, or a statement of the run waiting in MariaDB's process
list for a table lock this test holds (so the kill lands inside that statement).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pyarrow as pa
import pytest
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from lookalike.sql.schema import (
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_INTERRUPTED,
    image_features,
    image_names,
    image_neighbours,
    runs,
)
from lookalike.tasks.catalog import (
    apply_changes,
    list_pending,
    open_collection,
    read_known,
    stale_neighbour_ids,
)
from lookalike.tasks.database import connect_checked
from lookalike.tasks.decode import DecodedImage, ImageDecodeError, decode_image
from lookalike.tasks.discover import find_changes, hash_file
from lookalike.tasks.extract import Batch, decoded_batches, plan_batches
from lookalike.tasks.load import load_feature_batches, write_neighbour_table
from lookalike.tasks.models import weights_identity
from lookalike.tasks.sources import open_source, read_sources
from lookalike.tasks.stage import (
    NEIGHBOURS_SCHEMA,
    StagingError,
    feature_batch_path,
    write_feature_batch,
)
from tests.mariadb_server import MariaDBUnavailable, PrivateMariaDB
from tests.odd_images import write_photos

pytestmark = [pytest.mark.faults, pytest.mark.slow]

PHOTOS = 5  # the shared folder: five model batches of one image
K = 2
BATCH = 1
RUN_TIMEOUT = 300  # seconds a run may take on this small, busy machine
WAIT_LIMIT = 240  # seconds to wait for a kill point
POLL = 0.02  # seconds between looks at the staging folder: far below one model call
DB_POLL = 0.1  # seconds between looks at MariaDB's process list (a connection each)
MISSING = "file disappeared before extraction"
TRUNCATED = "truncated image data"


# --- running the command -------------------------------------------------------------------


@dataclass
class CliRun:
    """One `lookalike process` process with its output files."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        """Its exit status, once it has ended."""
        return self.process.wait(timeout=timeout)

    def stderr(self) -> str:
        """What it wrote on stderr so far."""
        return self.err.read_text(errors="replace")

    def summary(self) -> dict[str, Any]:
        """The JSON summary on the last line of its output; it must have ended with status 0."""
        assert self.wait() == 0, self.stderr()
        return dict(json.loads(self.out.read_text().strip().splitlines()[-1]))

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a power cut would end it: no clean-up at all."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)


_STARTED: list[CliRun] = []


@pytest.fixture(autouse=True)
def no_stray_runs() -> Iterator[None]:
    """A test that fails half-way leaves none of the runs it started behind."""
    yield
    while _STARTED:
        run = _STARTED.pop()
        if run.process.poll() is None:
            run.kill()


def start_cli(root: Path, database_url: str, data_dir: Path, name: str, **env: str) -> CliRun:
    """Start `lookalike process ROOT --json` with tiny settings and a private data folder."""
    from prefect.settings import PREFECT_API_URL

    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    environ.update(
        LOOKALIKE_DATA_DIR=str(data_dir),
        PREFECT_API_URL=str(PREFECT_API_URL.value()),  # the test's API: no server start-up
        **env,
    )
    command = [
        sys.executable, "-m", "lookalike.flows.cli", "process", str(root), "--db", database_url,
        "--weights", "none", "--k", str(K), "--batch-size", str(BATCH), "--json",
        "--lock-timeout", "30",  # a lock a killed run failed to release shows up quickly
    ]  # fmt: skip
    data_dir.mkdir(parents=True, exist_ok=True)
    # Its temporary files (TensorFlow's autograph modules, MariaDB load files) in the test's
    # folder: a killed run leaves them behind, and not in the machine's /tmp.
    (temp := data_dir.parent / f"{name}-tmp").mkdir(exist_ok=True)
    environ["TMPDIR"] = str(temp)
    out, err = data_dir.parent / f"{name}.out", data_dir.parent / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(command, env=environ, stdout=stdout, stderr=stderr)
    _STARTED.append(CliRun(process, out, err))
    return _STARTED[-1]


def wait_for(condition: Callable[[], bool], run: CliRun, what: str, interval: float = POLL) -> None:
    """Poll condition() while the run is alive; fail when it ends or WAIT_LIMIT passes first."""
    deadline = time.monotonic() + WAIT_LIMIT
    while not condition():
        if run.process.poll() is not None:
            pytest.fail(f"the run ended before {what}: {run.stderr()[-2000:]}")
        if time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"no {what} within {WAIT_LIMIT} s")
        time.sleep(interval)


def error_lines(run: CliRun) -> list[str]:
    """The run's `lookalike: error:` lines; there must be no traceback anywhere."""
    stderr = run.stderr()
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("lookalike: error:")]


# --- what a database holds -----------------------------------------------------------------


@dataclass(frozen=True)
class Tables:
    """image_names, image_features and image_neighbours keyed by file name (ids may differ)."""

    images: dict[str, tuple[Any, ...]]
    features: dict[str, bytes]
    neighbours: list[tuple[str, int, str]]
    distances: list[float]


def read_tables(database_url: str) -> Tables:
    """The three tables as stored, every id replaced by its file name."""
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(image_names)).all()
        vectors = conn.execute(select(image_features.c.image_id, image_features.c.features))
        features = {r.image_id: bytes(r.features) for r in vectors}
        order = (image_neighbours.c.image_id, image_neighbours.c.rank)
        lists = conn.execute(select(image_neighbours).order_by(*order)).all()
    engine.dispose()
    names = {r.id: r.file_name for r in rows}
    neighbours = sorted(
        (names[r.image_id], r.rank, names[r.neighbour_id], float(r.distance)) for r in lists
    )
    return Tables(
        images={
            r.file_name: (
                r.content_hash,
                r.size,
                r.mtime_ns,
                r.status,
                r.error,
                r.width,
                r.height,
                bool(r.indexed),
            )
            for r in rows
        },
        features={names[image_id]: blob for image_id, blob in features.items()},
        neighbours=[row[:3] for row in neighbours],
        distances=[row[3] for row in neighbours],
    )


def assert_same_tables(got: Tables, expected: Tables) -> None:
    """Equal rows; distances to MariaDB FLOAT precision, which prints 6 significant digits."""
    assert got.images == expected.images
    assert got.features == expected.features
    assert got.neighbours == expected.neighbours
    assert got.distances == pytest.approx(expected.distances, rel=1e-5)


def count_rows(database_url: str, table: Any) -> int:
    """Rows in one table."""
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(table)).scalar_one()
    engine.dispose()
    return int(count)


def run_statuses(database_url: str) -> list[str]:
    """Status of every recorded run, oldest first."""
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        statuses = conn.execute(select(runs.c.status).order_by(runs.c.id)).scalars().all()
    engine.dispose()
    return list(statuses)


def staged_files(staging: Path) -> dict[str, tuple[int, int]]:
    """Staged feature batches (complete files only) with their inode and mtime."""
    found = {}
    for path in (staging / "features").glob("*/*.arrow"):
        info = path.stat()
        found[path.name] = (info.st_ino, info.st_mtime_ns)
    return found


# --- the shared folder and its uninterrupted run ---------------------------------------------


@dataclass
class Reference:
    """The shared photo folder, and one uninterrupted run of it, in progress or ended."""

    root: Path
    run: CliRun
    url: str
    staging: Path

    @functools.cached_property
    def tables(self) -> Tables:
        """The three tables the run made, once it has ended."""
        summary = self.run.summary()
        assert (summary["extracted"], summary["failed"]) == (PHOTOS, 0)
        return read_tables(self.url)


@pytest.fixture(scope="module")
def reference(
    prefect_harness: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Reference]:
    """Five photos and a run over them (SQLite) that nothing disturbs.

    The run starts here and is only waited for when its tables are first needed, so the first
    test's own runs overlap it: they mostly wait for imports and the API, which saves time.
    """
    folder = tmp_path_factory.mktemp("reference")
    root = folder / "images"
    write_photos(root, PHOTOS)
    url = f"sqlite:///{folder / 'reference.sqlite'}"
    run = start_cli(root, url, folder / "data", "reference")
    _STARTED.remove(run)  # it outlives the test that started it
    yield Reference(root, run, url, folder / "data" / "staging")
    if run.process.poll() is None:  # no test waited for it
        run.kill()


def copy_staged_features(reference: Reference, staging: Path) -> None:
    """Stage the folder's batches as an earlier run did, without the model: its Arrow files."""
    assert len(reference.tables.features) == PHOTOS  # the run has ended: every batch staged
    shutil.copytree(reference.staging / "features", staging / "features")


# --- 1. SIGKILL at three points, then a normal re-run ---------------------------------------


def test_killed_during_extraction_a_rerun_extracts_only_the_rest(
    reference: Reference, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'lookalike.sqlite'}"
    staging = tmp_path / "data" / "staging"
    first = start_cli(reference.root, url, tmp_path / "data", "killed")
    wait_for(lambda: len(staged_files(staging)) >= 2, first, "two staged batches")
    first.kill()
    before = staged_files(staging)
    assert 2 <= len(before) < PHOTOS, "the kill came after extraction had ended"
    assert count_rows(url, image_features) == 0

    summary = start_cli(reference.root, url, tmp_path / "data", "rerun").summary()
    done, rest = len(before), PHOTOS - len(before)
    assert (summary["new"], summary["cached_batches"], summary["extracted"]) == (0, done, rest)
    assert (summary["decoded"], summary["model_calls"]) == (rest, rest)
    after = staged_files(staging)
    assert {name: after[name] for name in before} == before  # never written again
    assert len(after) == PHOTOS
    assert run_statuses(url) == [RUN_INTERRUPTED, RUN_COMPLETED]
    assert_same_tables(read_tables(url), reference.tables)


def mariadb_sessions(database_url: str, condition: str = "TRUE", **params: str) -> int:
    """Connections to this database, other than the asking one, matching a SQL condition."""
    url = make_url(database_url)
    engine = create_engine(url.set(database="information_schema"))
    query = (
        f"SELECT COUNT(*) FROM PROCESSLIST WHERE DB = :db AND ID <> CONNECTION_ID() AND {condition}"
    )
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(query), {"db": url.database, **params}).scalar_one())
    finally:
        engine.dispose()


def waiting_on_lock(database_url: str, statement: str) -> bool:
    """True when a statement starting with these words waits for a table lock."""
    condition = "STATE LIKE '%metadata lock%' AND INFO LIKE :statement"
    return mariadb_sessions(database_url, condition, statement=statement + "%") > 0


@contextlib.contextmanager
def table_read_lock(database_url: str, table: str) -> Iterator[None]:
    """LOCK TABLES ... READ on a connection of the test's: writers of the table wait for it."""
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    conn = engine.connect()
    conn.exec_driver_sql(f"LOCK TABLES {table} READ")
    try:
        yield
    finally:
        with contextlib.suppress(DBAPIError):  # the server may have been killed meanwhile
            conn.exec_driver_sql("UNLOCK TABLES")
        with contextlib.suppress(DBAPIError):
            conn.close()
        engine.dispose()


def kill_inside(run: CliRun, database_url: str, table: str, statement: str) -> None:
    """Kill the run while its `statement` waits for the lock this test holds on the table."""
    with table_read_lock(database_url, table):
        waiting = f"a waiting {statement}"
        wait_for(lambda: waiting_on_lock(database_url, statement), run, waiting, DB_POLL)
        run.kill()
    deadline = time.monotonic() + 60
    while mariadb_sessions(database_url) and time.monotonic() < deadline:
        time.sleep(0.1)  # the dead run's statements end once the lock is gone
    assert mariadb_sessions(database_url) == 0


def test_killed_in_feature_load_and_in_neighbour_swap_a_rerun_completes(
    reference: Reference, mariadb_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    copy_staged_features(reference, data / "staging")
    staged = staged_files(data / "staging")
    connect_checked(mariadb_url).dispose()  # the tables exist, so the test can lock one

    loading = start_cli(reference.root, mariadb_url, data, "load")
    kill_inside(loading, mariadb_url, "image_features", "LOAD DATA LOCAL INFILE%image_features")
    # The load's transaction died with it: no vector, every image still pending.
    state = read_tables(mariadb_url)
    assert state.features == {}
    assert sorted(row[3] for row in state.images.values()) == ["pending"] * PHOTOS

    swapping = start_cli(reference.root, mariadb_url, data, "swap")
    kill_inside(swapping, mariadb_url, "image_neighbours", "RENAME TABLE image_neighbours")
    # Features are in. The RENAME may still complete after its client died (MariaDB 10.11 does):
    # readers then see the complete new lists, else the old (empty) ones, never a part.
    state = read_tables(mariadb_url)
    assert state.features == reference.tables.features
    assert len(state.neighbours) in (0, PHOTOS * K)

    summary = start_cli(reference.root, mariadb_url, data, "rerun").summary()
    assert (summary["new"], summary["extracted"], summary["decoded"]) == (0, 0, 0)
    assert (summary["neighbour_mode"], summary["neighbour_rows"]) == ("full", PHOTOS * K)
    assert summary["tensorflow_imported"] is False
    assert staged_files(data / "staging") == staged  # the staged batches were only read
    assert run_statuses(mariadb_url) == [RUN_INTERRUPTED, RUN_INTERRUPTED, RUN_COMPLETED]
    assert_same_tables(read_tables(mariadb_url), reference.tables)
    engine = connect_checked(mariadb_url)
    with engine.connect() as conn:
        tables = set(conn.exec_driver_sql("SHOW TABLES").scalars())
    engine.dispose()
    assert not tables & {"image_neighbours_new", "image_neighbours_old"}


# --- 2. MariaDB killed and restarted during a run -----------------------------------------


def task_run_counts(flow_run_id: str) -> dict[str, int]:
    """How many times each task of a flow run ran (retries included), by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
        )
    return {t.name.rsplit("-", 1)[0]: t.run_count for t in task_runs}


@pytest.fixture
def private_mariadb() -> Iterator[PrivateMariaDB]:
    """A fresh MariaDB server of this test's own (it gets killed), with a `lookalike` database."""
    try:
        server = PrivateMariaDB.launch()
    except MariaDBUnavailable as exc:
        pytest.skip(f"needs a MariaDB server it may kill: {exc}")
    try:
        admin = create_engine(server.url("mysql"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(
                "CREATE DATABASE lookalike CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
            )
        admin.dispose()
        yield server
    finally:
        server.remove()


def test_mariadb_killed_mid_load_and_restarted_the_run_retries_and_completes(
    reference: Reference, private_mariadb: PrivateMariaDB, tmp_path: Path
) -> None:
    url = private_mariadb.url("lookalike")
    data = tmp_path / "data"
    copy_staged_features(reference, data / "staging")
    connect_checked(url).dispose()

    run = start_cli(reference.root, url, data, "outage")
    statement = "LOAD DATA LOCAL INFILE%image_features"
    with table_read_lock(url, "image_features"):
        wait_for(lambda: waiting_on_lock(url, statement), run, "a waiting feature load", DB_POLL)
        private_mariadb.kill()  # mid-statement, inside the load's transaction
    private_mariadb.start()  # same data folder: InnoDB rolls the load back

    # load-features failed with "lost connection", a transient error: it is retried.
    summary = run.summary()
    assert task_run_counts(summary["flow_run_id"])["load-features"] >= 2
    assert (summary["new"], summary["extracted"], summary["failed"]) == (PHOTOS, 0, 0)
    assert (summary["cached_batches"], summary["neighbour_rows"]) == (PHOTOS, PHOTOS * K)
    assert run_statuses(url) == [RUN_COMPLETED]
    assert_same_tables(read_tables(url), reference.tables)


# --- 3. a full staging disk ----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, filled up by the test; skipped where mounting is not permitted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_up(folder: Path) -> None:
    """Write one file until the disk holding folder has no space left."""
    block = b"\0" * 4096
    with (folder / "filler").open("wb", buffering=0) as out:  # unbuffered: nothing left to flush
        try:
            while True:
                out.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_full_staging_disk_fails_in_one_line_and_a_good_folder_then_works(
    reference: Reference, small_disk: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'lookalike.sqlite'}"
    copy_staged_features(reference, small_disk)
    fill_up(small_disk)
    before = {p.name: p.read_bytes() for p in small_disk.glob("features/*/*.arrow")}

    failed = start_cli(
        reference.root, url, tmp_path / "data", "full", LOOKALIKE_STAGING_DIR=str(small_disk)
    )
    assert failed.wait() == 2, failed.stderr()
    lines = error_lines(failed)
    assert len(lines) == 1, failed.stderr()
    assert "cannot write staging file" in lines[0] and "No space left on device" in lines[0]
    # The features were loaded; only the neighbour lists could not be staged. Nothing is half.
    assert {p.name: p.read_bytes() for p in small_disk.glob("features/*/*.arrow")} == before
    assert [p.name for p in small_disk.rglob("*") if p.is_file() and p.suffix == ".tmp"] == []
    assert count_rows(url, image_neighbours) == 0
    assert run_statuses(url) == [RUN_FAILED]

    good = tmp_path / "good-staging"
    summary = start_cli(
        reference.root, url, tmp_path / "data", "good", LOOKALIKE_STAGING_DIR=str(good)
    ).summary()
    assert (summary["new"], summary["extracted"], summary["unchanged"]) == (0, 0, PHOTOS)
    assert (summary["neighbour_mode"], summary["neighbour_rows"]) == ("full", PHOTOS * K)
    assert run_statuses(url) == [RUN_FAILED, RUN_COMPLETED]
    assert_same_tables(read_tables(url), reference.tables)


def one_feature_batch(path: Path) -> Path:
    """Stage a one-image batch at path."""
    return write_feature_batch(
        path, ["a.jpg"], ["0" * 32], [(4, 3)], [None], np.ones((1, 2048), np.float32)
    )


def test_a_staging_folder_below_a_regular_file_fails_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"  # unwritable even for root, unlike a chmod 000 folder
    blocker.write_text("not a folder")
    with pytest.raises(StagingError, match="Not a directory") as failure:
        one_feature_batch(feature_batch_path(blocker / "staging", "ab" * 20))
    assert "\n" not in str(failure.value)
    assert blocker.read_text() == "not a folder"


def test_staging_and_load_files_on_a_full_disk_fail_cleanly(
    small_disk: Path, mariadb_url: str, tmp_path: Path
) -> None:
    fill_up(small_disk)
    key = "ab" * 20
    with pytest.raises(StagingError, match="No space left on device"):
        one_feature_batch(feature_batch_path(small_disk / "staging", key))
    assert [p for p in small_disk.rglob("*") if p.is_file()] == [small_disk / "filler"]

    # MariaDB's LOAD DATA files: a full disk is one line, and the live neighbour rows stay.
    engine = connect_checked(mariadb_url)
    with engine.begin() as conn:
        conn.execute(
            insert(image_neighbours), [dict(image_id=1, rank=1, neighbour_id=2, distance=0.5)]
        )
    lists = pa.table(
        {"image_id": [1, 2], "rank": [1, 1], "neighbour_id": [2, 1], "distance": [0.1, 0.1]},
        schema=NEIGHBOURS_SCHEMA,
    )
    with pytest.raises(StagingError, match="No space left on device"):
        write_neighbour_table(mariadb_url, lists, small_disk, expected_rows=2)
    assert count_rows(mariadb_url, image_neighbours) == 1
    staged = one_feature_batch(feature_batch_path(tmp_path / "staging", key))
    source = open_source(engine, tmp_path / "images", None)
    with engine.begin() as conn:
        conn.execute(
            insert(image_names).values(
                source_id=source.id,
                file_name="a.jpg",
                content_hash="0" * 32,
                size=1,
                mtime_ns=1,
                status="pending",
            )
        )
    with pytest.raises(StagingError, match="No space left on device"):
        load_feature_batches(engine, [staged], scratch_dir=small_disk)
    assert [image.file_name for image in list_pending(engine)] == ["a.jpg"]
    engine.dispose()
    assert count_rows(mariadb_url, image_features) == 0


# --- 4. files changing under a run ----------------------------------------------------------


def stand_in_features(decoded: list[DecodedImage | ImageDecodeError]) -> np.ndarray:
    """Vectors for a staged batch without the model: this test is about the files, not features.

    Each decoded image gets its mean colour repeated; failed ones zeros, as extraction stages.
    """
    rows = np.zeros((len(decoded), 2048), np.float32)
    for i, item in enumerate(decoded):
        if isinstance(item, DecodedImage):
            rows[i] = np.resize(item.pixels.mean(axis=(0, 1)), 2048)
    return rows


def stage_batches(
    batches: list[Batch], root: Path, staging: Path
) -> tuple[list[Path], dict[str, DecodedImage | ImageDecodeError]]:
    """The decode stage for real, then each batch staged; (paths, decode result by name)."""
    paths, results = [], {}
    for batch, decoded in decoded_batches(batches, root, workers=2, max_pixels=10**8):
        names = [image.file_name for image in batch.images]
        results.update(zip(names, decoded, strict=True))
        paths.append(
            write_feature_batch(
                feature_batch_path(staging, batch.key),
                names,
                [image.content_hash for image in batch.images],
                [(d.width, d.height) if isinstance(d, DecodedImage) else None for d in decoded],
                [str(d) if isinstance(d, ImageDecodeError) else None for d in decoded],
                stand_in_features(decoded),
            )
        )
    return paths, results


def test_files_changed_after_discovery_fail_or_count_as_changed(tmp_path: Path) -> None:
    root = tmp_path / "images"
    photos = write_photos(root, 5)
    names = [p.name for p in photos]
    engine = connect_checked(f"sqlite:///{tmp_path / 'lookalike.sqlite'}")
    open_collection(engine, weights_identity("none"))
    source = open_source(engine, root, None).id
    apply_changes(engine, source, find_changes(root, read_known(engine, source)))
    batches = plan_batches(list_pending(engine, source), 2, weights_identity("none"))

    # After discovery, before decoding: deleted, truncated, replaced, replaced by a folder.
    photos[0].unlink()
    photos[1].write_bytes(photos[1].read_bytes()[:1500])
    shutil.copyfile(photos[3], photos[2])
    photos[4].unlink()
    photos[4].mkdir()
    paths, decoded = stage_batches(batches, root, tmp_path / "staging")

    reasons = {n: str(d) for n, d in decoded.items() if isinstance(d, ImageDecodeError)}
    assert reasons == {
        names[0]: MISSING,
        names[1]: TRUNCATED,
        names[4]: "not a file (it is a directory)",
    }
    replaced, original = decoded[names[2]], decoded[names[3]]
    assert isinstance(replaced, DecodedImage) and isinstance(original, DecodedImage)
    np.testing.assert_array_equal(replaced.pixels, original.pixels)  # decoded what is there

    counts = load_feature_batches(engine, paths)
    assert (counts.ok, counts.failed) == (2, 3)
    changes = find_changes(root, read_known(engine, source))
    known = read_known(engine, source)
    assert sorted(f.file_name for _, f in changes.changed) == [names[1], names[2]]
    assert changes.deleted_ids == sorted(known[n].image_id for n in (names[0], names[4]))
    assert changes.unchanged == 1
    counted = apply_changes(engine, source, changes)
    assert (counted.changed, counted.deleted, counted.unchanged) == (2, 2, 1)
    assert [p.file_name for p in list_pending(engine, source)] == [names[1], names[2]]
    engine.dispose()


def test_a_file_replaced_by_a_fifo_after_discovery_fails_without_hanging(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | DecodedImage] = []

    def decode() -> None:
        try:
            outcome.append(decode_image(fifo))
        except ImageDecodeError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(timeout=3)
    hung = worker.is_alive()
    if hung:  # release the blocked open() so the thread ends: open a writer, then close it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=10)
    assert not hung, "decode_image blocked on a FIFO"
    assert str(outcome[0]) == "not a regular file (a pipe, socket or device)"


def test_whole_run_with_files_changing_during_extraction(
    prefect_harness: None, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    photos = write_photos(root, 8, seed=3)
    names = [p.name for p in photos]
    url = f"sqlite:///{tmp_path / 'lookalike.sqlite'}"
    run = start_cli(root, url, tmp_path / "data", "changing")
    staging = tmp_path / "data" / "staging"
    # The first batch is staged; the last three are at least two model calls from decoding.
    wait_for(lambda: len(staged_files(staging)) >= 1, run, "the first staged batch")
    shutil.copyfile(photos[0], photos[5])
    photos[6].write_bytes(photos[6].read_bytes()[:2000])
    photos[7].unlink()

    summary = run.summary()
    assert (summary["found"], summary["extracted"], summary["failed"]) == (8, 8, 2)
    assert summary["neighbour_rows"] == 6 * K
    tables = read_tables(url)
    assert {n: row[3:5] for n, row in tables.images.items() if row[3] != "ok"} == {
        names[6]: ("failed", TRUNCATED),
        names[7]: ("failed", MISSING),
    }
    assert tables.features[names[5]] == tables.features[names[0]]  # the bytes now there
    assert (names[5], 1, names[0]) in tables.neighbours

    # The next run's catalog sees the replaced and the truncated file as changed.
    engine = connect_checked(url)
    [source] = [s.id for s in read_sources(engine) if s.root == str(root)]  # the run's
    changes = find_changes(root, read_known(engine, source))
    assert sorted(f.file_name for _, f in changes.changed) == [names[5], names[6]]
    assert changes.deleted_ids == [read_known(engine, source)[names[7]].image_id]
    assert {f.file_name: f.content_hash for _, f in changes.changed}[names[5]] == hash_file(
        photos[0]
    )
    assert stale_neighbour_ids(engine) == ([], [])
    engine.dispose()
