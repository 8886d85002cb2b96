"""Task runners for extraction shards and kNN row blocks: threads here, or a Dask cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from lookalike.tasks.settings import SettingsError, check_task_runner

# Without an address: a temporary cluster on this machine, one model per worker process.
LOCAL_DASK_CLUSTER = {"n_workers": 2, "processes": True, "threads_per_worker": 1}


class TaskRunnerError(SettingsError):
    """The task runner cannot be built or reached; one line for the user."""


def build_task_runner(kind: str, dask_address: str | None = None) -> TaskRunner[Any]:
    """The runner extraction shards and kNN row blocks are submitted to.

    local: one thread in the flow's process (the model uses every core by itself).
    dask: prefect-dask's DaskTaskRunner on the scheduler at dask_address, or on a temporary
    local cluster when there is none. Workers must see the image root and the staging folder
    under the same paths as the flow. An unknown kind or a misplaced address fails with the
    settings' own message.
    """
    check_task_runner(kind, dask_address or "")
    if kind == "local":
        return ThreadPoolTaskRunner(max_workers=1)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise TaskRunnerError(
            "the dask task runner needs prefect-dask: pip install 'lookalike[dask]'"
        ) from None
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs=dict(LOCAL_DASK_CLUSTER))


@contextlib.contextmanager
def open_task_runner(kind: str, dask_address: str | None = None) -> Iterator[TaskRunner[Any]]:
    """A started task runner; a Dask scheduler that does not answer fails here, in one line."""
    runner = build_task_runner(kind, dask_address)
    with runner:
        if kind == "dask":
            _connect_dask(runner, dask_address)
        yield runner


def _connect_dask(runner: Any, address: str | None) -> None:
    """Open the Dask client now rather than at the first submission."""
    try:
        runner.client  # noqa: B018 - the property connects (or starts the local cluster)
    except (OSError, TimeoutError) as exc:
        where = address or "a local cluster"
        raise TaskRunnerError(f"cannot reach the Dask scheduler at {where}: {exc}") from None


def runner_threads(runner: TaskRunner[Any]) -> int:
    """Tasks the runner runs at once: the Dask cluster's worker threads, else 1."""
    client = getattr(runner, "client", None)  # DaskTaskRunner's, connected by open_task_runner
    if client is None:
        return 1
    return max(1, sum(client.nthreads().values()))


class TaskRunnerSession:
    """The run's task runner, started on first use and shut down when the session ends.

    A run that has nothing to extract and lists that are current never starts a Dask
    client (or a temporary local cluster); a run that needs it for extraction and for the
    kNN row blocks starts it once.
    """

    def __init__(self, kind: str, dask_address: str | None = None) -> None:
        self.kind = kind
        self.dask_address = dask_address or None
        self._stack = contextlib.ExitStack()
        self._runner: TaskRunner[Any] | None = None

    def runner(self) -> TaskRunner[Any]:
        """The started runner."""
        if self._runner is None:
            self._runner = self._stack.enter_context(open_task_runner(self.kind, self.dask_address))
        return self._runner

    def __enter__(self) -> TaskRunnerSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.__exit__(exc_type, exc, traceback)  # the runner sees how the run ended
