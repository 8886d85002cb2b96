"""Worker threads of the kNN passes: every job runs, errors surface, results do not change."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import lookalike.tasks.knn as knn
import lookalike.tasks.knn.rerank as knn_rerank
import lookalike.tasks.knn.threads as knn_threads
import lookalike.tasks.knn.tiles as knn_tiles
from lookalike.tasks.knn.incremental import knn_update
from lookalike.tasks.knn.threads import TileWorkers, tile_workers
from tests.test_knn_passes import assert_same_lists, brute_force, clustered_features, shuffled_ids


@pytest.mark.parametrize("count", [1, 2, 3])
def test_every_job_runs_exactly_once(count: int) -> None:
    done: list[int] = []
    lock = threading.Lock()

    def job(start: int) -> None:
        with lock:
            done.append(start)

    workers = TileWorkers(count)
    try:
        workers.map(job, range(0, 50, 2))
    finally:
        workers.close()
    assert sorted(done) == list(range(0, 50, 2))


@pytest.mark.parametrize("count", [1, 2])
def test_the_first_error_of_a_job_is_raised(count: int) -> None:
    def job(start: int) -> None:
        if start == 7:
            raise ValueError("job 7 failed")

    workers = TileWorkers(count)
    try:
        with pytest.raises(ValueError, match="job 7 failed"):
            workers.map(job, range(20))
    finally:
        workers.close()


def test_a_long_job_does_not_hold_back_the_queue_behind_it() -> None:
    # The first job runs until the last is submitted; the other thread takes all the
    # short ones meanwhile. Waiting on the oldest job would never get that far.
    release = threading.Event()
    released: list[bool] = []
    short_done: list[int] = []
    workers = TileWorkers(2)
    try:
        workers.submit(lambda: released.append(release.wait(timeout=10)))
        for number in range(20):
            workers.submit(lambda number=number: short_done.append(number))
        release.set()
        workers.drain()
    finally:
        release.set()
        workers.close()
    assert released == [True]  # False: the first job waited in vain for the others
    assert sorted(short_done) == list(range(20))


def test_errors_come_out_in_the_order_jobs_were_given() -> None:
    # Job 1 fails at once while job 0 is still running and fails later: job 0's error is
    # the one raised.
    release = threading.Event()

    def slow_failure() -> None:
        release.wait(timeout=10)
        raise ValueError("job 0 failed")

    def quick_failure() -> None:
        raise ValueError("job 1 failed")

    workers = TileWorkers(2)
    try:
        with pytest.raises(ValueError, match="job 0 failed"):
            workers.submit(slow_failure)
            workers.submit(quick_failure)
            for _ in range(10):
                workers.submit(lambda: None)
            release.set()
            workers.drain()
    finally:
        release.set()
        workers.close()


def test_blas_is_single_threaded_inside_a_pass_and_restored_after() -> None:
    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    with tile_workers(2):
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


def use_cores(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make every engine module see `count` cores."""
    for module in (knn_threads, knn_tiles, knn_rerank):
        monkeypatch.setattr(module, "cpu_cores", lambda: count)


@pytest.mark.parametrize("threads", [2, 5])
def test_threads_give_the_lists_of_one_thread(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    features = clustered_features(400, 16, seed=8)
    features[50:60] = features[40]  # exact duplicates: ties settled by id
    ids = shuffled_ids(400)
    use_cores(monkeypatch, 1)
    single = knn.knn_all(features, ids, 12, block_rows=37)
    use_cores(monkeypatch, threads)
    several = knn.knn_all(features, ids, 12, block_rows=37)
    assert_same_lists(several, single)
    assert_same_lists(several, brute_force(features, ids, 12))
    added = knn_update(
        knn.knn_all(features[:380], ids[:380], 12, block_rows=37),
        features,
        ids,
        changed_ids=ids[380:],
        deleted_ids=np.empty(0, dtype=np.int64),
        k=12,
        block_rows=37,
    )
    assert_same_lists(added, single)


def test_wait_for_returns_once_the_first_jobs_have_finished() -> None:
    release = [threading.Event() for _ in range(3)]
    finished: list[int] = []

    def job(number: int) -> None:
        release[number].wait(10)
        finished.append(number)

    workers = TileWorkers(3)
    try:
        for number in range(3):
            workers.submit(lambda number=number: job(number))
        assert workers.submitted == 3
        release[0].set()
        release[1].set()
        workers.wait_for(2)  # jobs 1 and 2 (0 and 1 here); the third still waits
        assert sorted(finished) == [0, 1]
        release[2].set()
        workers.drain()
        assert sorted(finished) == [0, 1, 2]
    finally:
        workers.close()


def test_a_strip_buffer_is_not_written_while_a_tile_still_reads_it() -> None:
    from lookalike.tasks.knn.passes import StripLefts
    from lookalike.tasks.knn.space import prepare_space

    x = np.arange(60 * 4, dtype=np.float32).reshape(60, 4)
    space = prepare_space(x, np.arange(60), "euclidean", None)
    reading = threading.Event()
    seen: list[np.ndarray] = []

    def slow_reader(left: np.ndarray) -> None:
        reading.set()
        threading.Event().wait(0.3)  # long enough for strips 2 and 3 to be given meanwhile
        seen.append(left.copy())

    workers = TileWorkers(2)
    try:
        lefts = StripLefts(space, workers, 20)
        first = lefts.left(np.arange(0, 20))
        expected = first.copy()
        workers.submit(lambda: slow_reader(first))
        lefts.release()
        reading.wait(10)
        lefts.left(np.arange(20, 40))  # the other buffer: no wait
        lefts.release()
        third = lefts.left(np.arange(40, 60))  # the first buffer again: after the reader
        assert np.shares_memory(third, first)
        lefts.release()
        workers.drain()
    finally:
        workers.close()
    assert np.array_equal(seen[0], expected)
    assert np.array_equal(third, space.left(np.arange(40, 60)))
