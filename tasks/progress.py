"""Progress of a long stage: one tracker per stage, shown by every listener it was given.

The flow creates the tracker (with the Prefect progress artifact as a listener); tasks in
this process find it by its token, since only strings travel as task parameters. A caller
of the flow in this process, such as the CLI with its terminal bar, adds listeners for the
stages tracked while it waits with watch_progress().
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressUpdate:
    """Where a stage stands: items done of total; final once the stage has ended."""

    stage: str
    done: int
    total: int
    final: bool = False


ProgressListener = Callable[[ProgressUpdate], None]

# A context variable, not a module global: the listeners belong to the code that called the
# flow (Prefect runs a flow called directly in the caller's thread and context), so two
# callers in one process never see each other's stages.
_watchers: ContextVar[tuple[ProgressListener, ...]] = ContextVar("progress_watchers", default=())
_open_trackers: dict[str, StageProgress] = {}
_open_lock = threading.Lock()


@contextlib.contextmanager
def watch_progress(listener: ProgressListener) -> Iterator[None]:
    """Tell listener, too, about every stage whose tracker is created in the block."""
    token = _watchers.set((*_watchers.get(), listener))
    try:
        yield
    finally:
        _watchers.reset(token)


class StageProgress:
    """Items done of a stage, counted per batch by tasks here and per finished shard by the flow.

    Tasks that run elsewhere (on Dask workers) are heard of only when their shard finishes, so
    the two counts are kept apart and the larger is shown: the figure never goes back.
    """

    def __init__(self, stage: str, total: int, listeners: Sequence[ProgressListener] = ()) -> None:
        self.stage = stage
        self.total = total
        self.token = uuid.uuid4().hex
        self._listeners = (*listeners, *_watchers.get())
        self._batch_items = 0
        self._shard_items = 0
        self._closed = False
        self._lock = threading.Lock()  # also keeps listeners' updates in order
        with _open_lock:
            _open_trackers[self.token] = self
        self._notify()

    def advance_batch(self, items: int) -> None:
        """A task in this process finished a batch of items."""
        with self._lock:
            self._batch_items += items
            self._notify_locked(final=False)

    def finish_shard(self, items: int) -> None:
        """A shard of items finished, wherever it ran."""
        with self._lock:
            self._shard_items += items
            self._notify_locked(final=False)

    def close(self, completed: bool) -> None:
        """The stage is over: tasks can no longer find the tracker; completed shows all done."""
        with _open_lock:
            _open_trackers.pop(self.token, None)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if completed:
                self._batch_items = self._shard_items = self.total
            self._notify_locked(final=True)

    def _notify(self) -> None:
        """Tell every listener where the stage stands now."""
        with self._lock:
            self._notify_locked(final=False)

    def _notify_locked(self, final: bool) -> None:
        """_notify with the lock held; nothing once closed, except the final update itself."""
        if self._closed and not final:
            return
        done = min(max(self._batch_items, self._shard_items), self.total)
        update = ProgressUpdate(self.stage, done, self.total, final)
        for listener in self._listeners:
            listener(update)


def advance_progress(token: str, items: int) -> None:
    """Advance the tracker with this token, when it lives in this process (else nothing)."""
    with _open_lock:
        tracker = _open_trackers.get(token)
    if tracker is not None:
        tracker.advance_batch(items)
