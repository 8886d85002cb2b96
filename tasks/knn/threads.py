"""Worker threads for the kNN engine's CPU passes: one BLAS thread each, every core busy."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from threadpoolctl import threadpool_limits

Job = Callable[[], None]


class TileWorkers:
    """Runs jobs on `count` threads, at most 2 x count unfinished, in the order given.

    A tile is a multiply (BLAS, no GIL) followed by a selection (numpy, single-threaded).
    With BLAS on all cores the selection leaves all but one idle; with one BLAS thread per
    worker, one worker selects while the other multiplies. `lock` guards shared state that
    jobs update (candidate lists, timings). With count 1 jobs run inline, in this thread.
    """

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self.lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.count, "knn") if self.count > 1 else None
        self._pending: deque[Future[None]] = deque()
        self._numbers: dict[Future[None], int] = {}  # the order each pending job was given in
        self.submitted = 0  # jobs given so far

    def submit(self, job: Job) -> None:
        """Run job soon; waits while too many are queued (their inputs hold memory)."""
        self.submitted += 1
        if self._pool is None:
            job()
            return
        self._reap()
        # Wait for any job, not the oldest: a long tile at the head of the queue must not
        # keep the other workers idle while shorter ones behind it have finished.
        while self._unfinished() >= 2 * self.count:
            wait([future for future in self._pending if not future.done()], None, FIRST_COMPLETED)
            self._reap()
        future = self._pool.submit(job)
        self._numbers[future] = self.submitted
        self._pending.append(future)

    def wait_for(self, count: int) -> None:
        """Wait until the first `count` jobs given have finished (errors: see _reap)."""
        wait([future for future in self._pending if self._numbers[future] <= count])

    def _unfinished(self) -> int:
        return sum(not future.done() for future in self._pending)

    def _reap(self) -> None:
        """Forget finished jobs; an error is raised once every job before it has finished.

        So errors come out in the order the jobs were given, whichever thread ran first.
        """
        kept: deque[Future[None]] = deque()
        for future in self._pending:
            if future.done() and not kept:
                future.result()  # re-raises the job's error here
                del self._numbers[future]
            elif not future.done() or future.exception() is not None:
                kept.append(future)
            else:
                del self._numbers[future]
        self._pending = kept

    def drain(self) -> None:
        """Wait for every submitted job; the first error is raised."""
        while self._pending:
            future = self._pending.popleft()
            self._numbers.pop(future, None)
            future.result()

    def map(self, job: Callable[[int], None], starts: range) -> None:
        """job(start) for each start, then wait for all of them."""
        for start in starts:
            self.submit(lambda start=start: job(start))  # type: ignore[misc]
        self.drain()

    def close(self) -> None:
        """Wait for running jobs (errors of the others are dropped) and stop the threads."""
        if self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            self._numbers.clear()
            self._pool.shutdown(wait=True)


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def tile_workers(count: int) -> Iterator[TileWorkers]:
    """Workers for one pass; BLAS runs single-threaded inside each while there are several."""
    workers = TileWorkers(count)
    try:
        if workers.count == 1:
            yield workers
        else:
            with threadpool_limits(limits=1, user_api="blas"):
                yield workers
                workers.drain()
    finally:
        workers.close()


def on_all_cores(job: Callable[[int], None], starts: range) -> None:
    """job(start) for every start, on every core when there are several chunks.

    Errors come out in chunk order, so the first bad row reported is the first in order.
    """
    workers = TileWorkers(cpu_cores() if len(starts) > 1 else 1)
    try:
        workers.map(job, starts)
    finally:
        workers.close()
