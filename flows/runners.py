"""Task runners for the extraction step: threads in this process, or a Dask cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.settings import SettingsError

TASK_RUNNERS = ("local", "dask")
# Without an address: a temporary cluster on this machine, one model per worker process.
LOCAL_DASK_CLUSTER = {"n_workers": 2, "processes": True, "threads_per_worker": 1}


class TaskRunnerError(SettingsError):
    """The task runner cannot be built or reached; one line for the user."""


def build_task_runner(kind: str, dask_address: str | None = None) -> TaskRunner[Any]:
    """The runner extraction shards are submitted to.

    local: one thread in the flow's process (the model uses every core by itself).
    dask: prefect-dask's DaskTaskRunner on the scheduler at dask_address, or on a temporary
    local cluster when there is none. Workers must see the image root and the staging folder
    under the same paths as the flow.
    """
    if kind not in TASK_RUNNERS:
        raise TaskRunnerError(f"task runner must be one of {', '.join(TASK_RUNNERS)}, not {kind!r}")
    if kind == "local":
        if dask_address:
            raise TaskRunnerError("a Dask address needs the dask task runner (--task-runner dask)")
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
