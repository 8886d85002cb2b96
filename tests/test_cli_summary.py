"""The end of `lookalike process`: wall time from the command's start, rates only over work done,
and a bar whose final rate is the summary's."""

from __future__ import annotations

import time
from typing import Any

import pytest
from rich.progress import Progress

from lookalike.flows.cli import (
    PREFECT_EPHEMERAL,
    PREFECT_NOT_STARTED,
    PREFECT_SERVER,
    RateColumn,
    command_started,
    print_process_summary,
    process_age,
)


def summary(**changes: Any) -> dict[str, Any]:
    """A summary as `lookalike process --json` prints it."""
    base: dict[str, Any] = dict(
        sources={"photos": "/photos"}, database="sqlite:///data/lookalike.sqlite",
        model="InceptionV3", weights="imagenet",
        found=1000, new=0, changed=0, deleted=0, unchanged=1000, extracted=0, failed=0,
        cached_batches=0, decoded=0, model_calls=0, bytes_read=0, tensorflow_imported=False,
        neighbour_mode="unchanged", neighbour_rows=100_000, neighbour_tasks=0,
        duplicate_groups=2, duplicate_images=5, duplicates_recomputed=False,
        duplicate_mode="unchanged", map_points=1000, map_mode="unchanged", seconds=0.26,
        extract_seconds=0.0, images_per_second=0.0, lock_wait_seconds=0.0, task_runner="local",
        flow_run_id="", prefect=PREFECT_NOT_STARTED, wall_seconds=1.84,
    )  # fmt: skip
    base.update(changes)
    return base


def printed(capsys: pytest.CaptureFixture[str], **changes: Any) -> list[str]:
    print_process_summary(summary(**changes))
    return capsys.readouterr().out.splitlines()


def test_an_up_to_date_folder_says_so_and_that_prefect_never_started(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = printed(capsys)
    assert lines[0] == "up to date: 1,000 images, nothing to do (checked without starting Prefect)"
    assert lines[1] == "  source photos (/photos), database sqlite:///data/lookalike.sqlite"
    assert lines[-1] == (
        "  time 1.8 s since the command started (start-up included; the check 0.3 s), "
        "nothing extracted"
    )


def test_a_flow_run_counts_its_start_up_and_gives_no_rate_for_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = printed(capsys, prefect=PREFECT_EPHEMERAL, wall_seconds=14.3, flow_run_id="x")
    assert lines[0] == "processed source photos (/photos) into sqlite:///data/lookalike.sqlite"
    two = printed(capsys, prefect=PREFECT_EPHEMERAL, sources={"a": "/photos", "b": "/mnt/b"})
    assert two[0] == "processed source a (/photos), source b (/mnt/b) into " + (
        "sqlite:///data/lookalike.sqlite"
    )
    assert lines[-1] == (
        "  time 14.3 s since the command started (start-up and Prefect's temporary API server "
        "included; the flow 0.3 s), nothing extracted"
    )
    assert "images/s" not in "\n".join(lines)


def test_the_extraction_rate_is_over_the_images_extracted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = printed(capsys, prefect=PREFECT_SERVER, wall_seconds=40.2, seconds=38.4, new=300,
                    extracted=300, extract_seconds=30.6, images_per_second=9.8)  # fmt: skip
    assert lines[-1] == (
        "  time 40.2 s since the command started (start-up included; the flow 38.4 s), "
        "extraction 300 images in 30.6 s (model start-up included): 9.8 images/s"
    )
    one = printed(capsys, prefect=PREFECT_SERVER, extracted=1, extract_seconds=10.4,
                  images_per_second=0.1)  # fmt: skip
    assert "extraction 1 image in 10.4 s" in one[-1]


def test_the_bars_final_rate_is_over_the_whole_stage() -> None:
    """rich's own figure is the last half minute's; the summary's is the stage's, start-up and
    all: once the stage has ended the bar shows the summary's."""
    clock = [0.0]
    progress = Progress(RateColumn(), get_time=lambda: clock[0], auto_refresh=False)
    task_id = progress.add_task("extract", total=10)
    clock[0] = 15.0  # 10 s of model start-up, then 5 images in 5 s
    progress.update(task_id, completed=5)
    clock[0] = 20.0
    progress.update(task_id, completed=10)
    progress.stop_task(task_id)
    task = progress.tasks[0]
    assert task.speed == pytest.approx(1.0)  # rich: the last 5 images in the last 5 s
    assert RateColumn().render(task).plain == "0.5/s"  # 10 images in the stage's 20 s
    running = Progress(RateColumn(), get_time=lambda: clock[0], auto_refresh=False)
    live = running.add_task("extract", total=10)
    clock[0] = 25.0
    running.update(live, completed=2)
    clock[0] = 26.0
    running.update(live, completed=4)
    assert RateColumn().render(running.tasks[0]).plain == "2.0/s"  # while running: rich's


def test_the_command_is_timed_from_the_process_start() -> None:
    age = process_age()
    assert age is not None and 0 < age < 24 * 3600  # this test process, started earlier
    before = time.perf_counter()
    assert command_started(None) <= before - age + 0.05  # the console script: the process
    assert command_started(["process", "x"]) >= before  # main(argv) from code: the call
