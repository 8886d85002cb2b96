"""Stage progress: one tracker, counted by tasks and the flow, shown to every listener."""

from __future__ import annotations

import threading

from lookalike.tasks.progress import (
    ProgressUpdate,
    StageProgress,
    advance_progress,
    watch_progress,
)


def figures(updates: list[ProgressUpdate]) -> list[tuple[int, bool]]:
    """(done, final) of each update."""
    return [(update.done, update.final) for update in updates]


def test_tasks_find_the_tracker_by_token_and_the_figure_never_goes_back() -> None:
    seen: list[ProgressUpdate] = []
    tracker = StageProgress("extract", 10, [seen.append])
    worker = threading.Thread(target=advance_progress, args=(tracker.token, 4))
    worker.start()
    worker.join()
    tracker.finish_shard(3)  # a shard the flow heard of: behind the batches counted here
    tracker.finish_shard(4)
    advance_progress(tracker.token, 20)  # more than the total: shown as the total
    tracker.close(completed=True)
    assert figures(seen) == [
        (0, False),
        (4, False),
        (4, False),
        (7, False),
        (10, False),
        (10, True),
    ]
    assert {(u.stage, u.total) for u in seen} == {("extract", 10)}


def test_a_closed_tracker_is_silent_and_a_failed_stage_keeps_its_figure() -> None:
    seen: list[ProgressUpdate] = []
    tracker = StageProgress("extract", 10, [seen.append])
    tracker.advance_batch(2)
    tracker.close(completed=False)
    advance_progress(tracker.token, 5)  # a task still running after the flow gave up
    tracker.finish_shard(5)
    tracker.close(completed=True)
    assert figures(seen) == [(0, False), (2, False), (2, True)]
    advance_progress("no-such-token", 1)  # a task on another machine: nothing to find


def test_watchers_see_the_stages_created_in_their_block_only() -> None:
    watched: list[ProgressUpdate] = []
    before = StageProgress("before", 1)
    with watch_progress(watched.append):
        inside = StageProgress("inside", 2)
        elsewhere: list[StageProgress] = []
        # Another thread has its own context: a second caller's stages stay its own.
        thread = threading.Thread(target=lambda: elsewhere.append(StageProgress("other", 3)))
        thread.start()
        thread.join()
    after = StageProgress("after", 4)
    for tracker in (before, inside, elsewhere[0], after):
        tracker.advance_batch(1)
        tracker.close(completed=True)
    assert [(u.stage, u.done, u.final) for u in watched] == [
        ("inside", 0, False),
        ("inside", 1, False),
        ("inside", 2, True),
    ]
