"""The lookalike command line: process a folder, rebuild neighbours, serve the API."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from lookalike.flows.cli_accounts import add_account_commands
from lookalike.flows.cli_prefect import check_prefect_server, prefect_api_url, tell_if_waiting
from lookalike.flows.cli_search import RANDOM_WEIGHTS_NOTE, add_search_command
from lookalike.flows.cli_sources import add_source_commands
from lookalike.tasks.errors import LookalikeError, first_line
from lookalike.tasks.models import (
    DEFAULT_MODEL,
    MODELS,
    PRECISIONS,
    REDUCED_MODELS_VARIABLE,
    parse_model_name,
)
from lookalike.tasks.progress import ProgressUpdate, watch_progress
from lookalike.tasks.settings import TASK_RUNNERS, Settings

log = logging.getLogger("lookalike")

REDUCED_MODEL_NOTE = (
    f"note: {REDUCED_MODELS_VARIABLE} is set: the model is {{}}, a reduced test-only "
    "configuration of the network, not the network itself"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its commands."""
    parser = argparse.ArgumentParser(prog="lookalike", description=__doc__)
    parser.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"lookalike {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = command_factory(commands)

    process = add(
        "process",
        "extract features of a folder and find neighbours",
        "Bring the database up to date with the folder: new and changed images are extracted, "
        "deleted ones removed, and the neighbour lists, duplicate groups and map updated.",
        "lookalike process ~/photos --weights none    # try it without downloading weights",
    )
    process.add_argument("root", metavar="ROOT", help="folder of images (searched recursively)")
    process.add_argument(
        "--source",
        metavar="NAME",
        help="the name of the folder's source (default: the name it has in the database, "
        "else the folder's own name)",
    )
    _add_process_options(process)
    process.set_defaults(func=command_process, move=False)

    move = add(
        "move-source",
        "tell the database that a source's folder moved",
        "Point the source NAME at its new folder and bring it up to date: images whose files "
        "are the same there (by content hash) keep their features, neighbours and judgements.",
        "lookalike move-source campaign-2019 /mnt/archive/campaign-2019",
    )
    move.add_argument("source", metavar="NAME", help="the source's name")
    move.add_argument("root", metavar="NEWROOT", help="the folder the source now lives in")
    _add_process_options(move)
    move.set_defaults(func=command_process, move=True)
    add_source_commands(add, _add_db_options, _add_k, _add_lock_timeout)

    neighbours = add(
        "neighbours",
        "recompute neighbours from stored features",
        "Recompute every image's neighbour list from the stored features (no image is read).",
        "lookalike neighbours --k 50",
    )
    _add_db_options(neighbours)
    _add_k(neighbours)
    _add_runner_options(neighbours)
    _add_lock_timeout(neighbours)
    neighbours.add_argument(
        "--json", action="store_true", help="print the summary as one JSON line"
    )
    neighbours.set_defaults(func=command_neighbours)

    duplicates = add(
        "duplicates",
        "list the groups of duplicate images the last run found",
        "The groups of exact and near duplicates the last run found, largest first.",
        "lookalike duplicates --threshold 0.1 --format csv > duplicates.csv",
    )
    _add_db_options(duplicates)
    duplicates.add_argument(
        "--threshold",
        type=float,
        help="regroup at this fraction of the median k-th-neighbour distance "
        "(default: the one the groups were computed with; env LOOKALIKE_DUPLICATE_THRESHOLD)",
    )
    duplicates.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format"
    )
    duplicates.set_defaults(func=command_duplicates)

    layout = add(
        "map",
        "bring the map up to date, or lay it out afresh",
        "Place new images on the map of the archive, or lay every image out again.",
        "lookalike map --refit",
    )
    _add_db_options(layout)
    layout.add_argument(
        "--refit", action="store_true", help="lay every image out again (moves everyone)"
    )
    _add_lock_timeout(layout)
    layout.set_defaults(func=command_map)

    serve = add(
        "serve",
        "start the web service and page",
        "Serve the API and the web page on the database, until stopped.",
        "lookalike serve --host 0.0.0.0 --port 8080",
    )
    _add_db_options(serve)
    serve.add_argument(
        "--host", help="address to listen on (default 127.0.0.1; env LOOKALIKE_HOST)"
    )
    serve.add_argument(
        "--port", type=int, help="port to listen on (default 5000; env LOOKALIKE_PORT)"
    )
    serve.set_defaults(func=command_serve)
    add_search_command(add, _add_db_options)
    add_account_commands(add, _add_db_options)
    return parser


def _add_process_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that run the process-images flow."""
    _add_db_options(parser)
    parser.add_argument(
        "--model",
        choices=list(MODELS),
        help=f"the feature network (default {DEFAULT_MODEL}; env LOOKALIKE_MODEL)",
    )
    parser.add_argument(
        "--weights",
        help="imagenet (default: the model's pretrained weights), none (seeded random init), "
        "a .h5, .weights.h5 or .keras file, or a KerasHub preset folder (env LOOKALIKE_WEIGHTS)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="what the model computes in (default float16 on a GPU, else float32; "
        "env LOOKALIKE_PRECISION)",
    )
    _add_k(parser)
    parser.add_argument(
        "--batch-size",
        type=int,
        help="images per model call (default 64; env LOOKALIKE_BATCH_SIZE)",
    )
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="allow another model, precision or weights than the database's: re-extract everything",
    )
    _add_runner_options(parser)
    _add_lock_timeout(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")


VERBOSE_HELP = "show Prefect's run logs and TensorFlow's start-up notes"
CommandFactory = Callable[[str, str, str, str], argparse.ArgumentParser]


def command_factory(commands: Any) -> CommandFactory:
    """A maker of subcommands with a description, an example and --verbose of their own."""
    verbose = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the subcommand sets it only when given, and `lookalike -v process` still works.
    verbose.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                         help=VERBOSE_HELP)  # fmt: skip

    def add(name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
        return commands.add_parser(  # type: ignore[no-any-return]
            name,
            help=summary,
            description=description,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[verbose],
        )

    return add


def package_version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lookalike")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_k(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, help="neighbours per image (default 100; env LOOKALIKE_K)")


def _add_db_options(parser: argparse.ArgumentParser) -> None:
    """Options every command shares."""
    parser.add_argument(
        "--db",
        dest="database_url",
        metavar="URL",
        help="SQLAlchemy URL (default: SQLite in the data folder; env LOOKALIKE_DATABASE_URL)",
    )
    parser.add_argument(
        "--data-dir", help="folder for the SQLite file and staging (env LOOKALIKE_DATA_DIR)"
    )


def _add_runner_options(parser: argparse.ArgumentParser) -> None:
    """Where extraction shards and kNN row blocks run."""
    parser.add_argument(
        "--task-runner",
        choices=TASK_RUNNERS,
        help="where extraction and full kNN passes run: local (default, here) or dask "
        "(env LOOKALIKE_TASK_RUNNER)",
    )
    parser.add_argument(
        "--dask-address",
        metavar="ADDRESS",
        help="scheduler of an existing Dask cluster, e.g. tcp://HOST:8786; without it, dask "
        "starts a temporary local cluster (env LOOKALIKE_DASK_ADDRESS)",
    )


def _add_lock_timeout(parser: argparse.ArgumentParser) -> None:
    """How long a run waits for another run on the same database."""
    parser.add_argument(
        "--lock-timeout",
        type=float,
        metavar="SECONDS",
        help="wait this long for another run on the same database to finish "
        "(default 3600; env LOOKALIKE_LOCK_TIMEOUT)",
    )


class RateColumn(ProgressColumn):
    """Items per second: while the stage runs, rich's estimate over the last half minute; once
    it has ended, items over the stage's whole time, the rate the run's summary reports."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed
        if task.finished and elapsed:
            speed: float | None = task.completed / elapsed
        else:
            speed = task.speed
        return Text(f"{speed:.1f}/s" if speed else "-/s", style="progress.data.speed")


class TerminalBar:
    """rich progress bars of a run's stages, drawn on a terminal while a stage runs."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            RateColumn(),
            TimeRemainingColumn(),
            console=console,
            redirect_stdout=False,  # stdout carries the summary and nothing else
        )
        self._stages: dict[str, TaskID] = {}
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, update: ProgressUpdate) -> None:
        """Draw one update; the display ends when no stage runs any more."""
        if update.total <= 0:
            return
        with self._lock:
            task = self._stages.get(update.stage)
            if task is None:
                task = self._begin(update.stage, update.total)
            self.progress.update(task, completed=update.done, total=update.total)
            if update.final:
                self.progress.stop_task(task)
                self._running.discard(update.stage)
                if not self._running:
                    self.progress.stop()

    def _begin(self, stage: str, total: int) -> TaskID:
        """A bar for a new stage; the display starts with the first."""
        task = self._stages[stage] = self.progress.add_task(stage, total=total)
        self._running.add(stage)
        self.progress.start()
        return task

    def close(self) -> None:
        """Stop drawing, also when a stage never ended (the run failed or was interrupted)."""
        self.progress.stop()


@contextlib.contextmanager
def terminal_progress(enabled: bool) -> Iterator[None]:
    """Progress bars on stderr for the stages run in the block, if enabled and on a terminal."""
    if not enabled or not sys.stderr.isatty():  # a log file or a pipe gets no bar
        yield
        return
    bar = TerminalBar(Console(stderr=True))
    try:
        with watch_progress(bar):
            yield
    finally:
        bar.close()


def quiet_prefect_console(verbose: bool) -> None:
    """Keep Prefect's INFO logs for the UI and API, off the terminal, unless --verbose."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lookalike")
    # The ephemeral API server needs longer than Prefect's 20 s default on a busy small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        # Failures reach the user as one line from main(); the UI keeps the full log.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        # Prefect's own internals (e.g. events it could not send while the ephemeral server
        # stopped after a failure) log through a handler of their own.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_DEBUG_LEVEL", "CRITICAL")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_process(args: argparse.Namespace) -> dict[str, Any]:
    """Bring the database up to date with the options given (None: the environment's).

    Without a Prefect server configured, a folder that needs nothing is answered from the
    database and the folder's stat, without starting Prefect's temporary API server
    (flows.process.up_to_date_summary); anything to do, or a configured server, runs the
    process-images flow. The summary's "prefect" says which: "not started", "ephemeral" or
    "server".
    """
    settings = Settings.from_env(  # bad settings fail here, before Prefect is imported
        batch_size=args.batch_size,
        k=args.k,
        weights=args.weights,
        database_url=args.database_url,
        model=args.model,
        precision=args.precision,
        **runner_options(args),
    )
    from lookalike.flows.process import plan_run, process_images, up_to_date_summary
    from lookalike.flows.runners import build_task_runner
    from lookalike.tasks.sources import SourceSpec

    checked = time.perf_counter()
    specs = [SourceSpec(root=args.root, name=args.source)]
    plan, check_bytes = plan_run(specs, settings, args.recompute, args.move)  # before Prefect
    build_task_runner(settings.task_runner, settings.dask_address)
    api_url = prefect_api_url()
    if api_url is None:
        answer = up_to_date_summary(plan, started=checked, bytes_read=check_bytes)
        if answer is not None:
            return {**asdict(answer), "prefect": PREFECT_NOT_STARTED}
    else:
        check_prefect_server(api_url)
    tell_if_waiting(settings.resolved_database_url, settings.lock_timeout)
    with terminal_progress(enabled=not args.json):
        summary = process_images(
            root=args.root,
            source=args.source,
            move=args.move,
            batch_size=args.batch_size,
            k=args.k,
            weights=args.weights,
            database_url=args.database_url,
            recompute=args.recompute,
            model=args.model,
            precision=args.precision,
            **runner_options(args),
        )
    return {**summary, "prefect": PREFECT_EPHEMERAL if api_url is None else PREFECT_SERVER}


PREFECT_NOT_STARTED = "not started"  # found up to date before Prefect was needed
PREFECT_EPHEMERAL = "ephemeral"  # the flow ran on a temporary API server started for it
PREFECT_SERVER = "server"  # the flow ran against the server PREFECT_API_URL names


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """The task runner, Dask address and lock timeout options (None where not given)."""
    return {
        "task_runner": args.task_runner,
        "dask_address": args.dask_address,
        "lock_timeout": args.lock_timeout,
    }


def run_neighbours(args: argparse.Namespace) -> dict[str, Any]:
    """Run the rebuild-neighbours flow with the command's options (None: the environment's)."""
    settings = Settings.from_env(database_url=args.database_url, k=args.k, **runner_options(args))
    from lookalike.flows.neighbours import rebuild_neighbours
    from lookalike.flows.runners import build_task_runner

    build_task_runner(settings.task_runner, settings.dask_address)
    api_url = prefect_api_url()
    if api_url is not None:
        check_prefect_server(api_url)
    tell_if_waiting(settings.resolved_database_url, settings.lock_timeout)
    return rebuild_neighbours(k=args.k, database_url=args.database_url, **runner_options(args))


def print_process_summary(summary: dict[str, Any]) -> None:
    """The human-readable end of a process run."""
    if summary["prefect"] == PREFECT_NOT_STARTED:
        print(
            f"up to date: {summary['found']:,} images, nothing to do "
            "(checked without starting Prefect)"
        )
        print(f"  {sources_line(summary['sources'])}, database {summary['database']}")
    else:
        print(f"processed {sources_line(summary['sources'])} into {summary['database']}")
    print(f"  model: {summary['model']}, weights: {summary['weights']}")
    print(
        "  found {found}, new {new}, changed {changed}, deleted {deleted}, "
        "extracted {extracted}, failed {failed}, cached batches {cached_batches}".format(**summary)
    )
    tasks = summary["neighbour_tasks"]
    print(
        f"  neighbours: {summary['neighbour_rows']} rows ({summary['neighbour_mode']}, "
        f"{tasks} kNN task{'' if tasks == 1 else 's'} on the {summary['task_runner']} runner)"
    )
    print(
        f"  duplicates: {summary['duplicate_groups']} groups of {summary['duplicate_images']} "
        f"images ({summary['duplicate_mode']})"
    )
    print(f"  map: {summary['map_points']} points ({summary['map_mode']})")
    print(f"  {time_line(summary)}")


def sources_line(sources: dict[str, str]) -> str:
    """The run's sources as 'source NAME (ROOT)', joined."""
    return ", ".join(f"source {name} ({root})" for name, root in sources.items())


def time_line(summary: dict[str, Any]) -> str:
    """Wall time since the command started, what it includes, and extraction's rate if any."""
    included = {
        PREFECT_NOT_STARTED: "start-up included; the check",
        PREFECT_EPHEMERAL: "start-up and Prefect's temporary API server included; the flow",
        PREFECT_SERVER: "start-up included; the flow",
    }[summary["prefect"]]
    line = f"time {summary['wall_seconds']:.1f} s since the command started ({included} "
    line += f"{summary['seconds']:.1f} s)"
    if not summary["extracted"]:
        return line + ", nothing extracted"
    images = summary["extracted"]
    return line + (
        f", extraction {images} image{'' if images == 1 else 's'} in "
        f"{summary['extract_seconds']:.1f} s (model start-up included): "
        f"{summary['images_per_second']:.1f} images/s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the lookalike console script; the exit status."""
    started = command_started(argv)
    args = build_parser().parse_args(argv)
    args.started = started
    quiet_prefect_console(args.verbose)
    if args.data_dir:
        os.environ["LOOKALIKE_DATA_DIR"] = args.data_dir
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("lookalike: interrupted", file=sys.stderr)
        return 130
    except LookalikeError as exc:  # one line for the user, the traceback only in the debug log
        log.debug("command failed", exc_info=True)
        print(f"lookalike: error: {first_line(exc)}", file=sys.stderr)
        return 2


def command_process(args: argparse.Namespace) -> int:
    """lookalike process: bring the database up to date with the folder, then print a summary."""
    summary = run_process(args)
    summary["wall_seconds"] = round(time.perf_counter() - args.started, 3)
    if summary["weights"].startswith("none"):
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
    if parse_model_name(summary["model"])[0].test_only:
        print(REDUCED_MODEL_NOTE.format(summary["model"]), file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print_process_summary(summary)
    return 0


def command_started(argv: Sequence[str] | None) -> float:
    """The command's start on the perf_counter clock: for the console script (argv None) the
    process's own start, so that the interpreter's and the imports' time count too; for a
    call of main(argv) from other code, the call."""
    age = process_age() if argv is None else None
    return time.perf_counter() - (age or 0.0)


def process_age() -> float | None:
    """Seconds since this process started, from /proc (Linux); None where that is unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time
    except (OSError, ValueError, IndexError):
        return None
    return age if age >= 0 else None


def command_neighbours(args: argparse.Namespace) -> int:
    """lookalike neighbours: recompute every neighbour list and print what was done."""
    summary = run_neighbours(args)
    print(json.dumps(summary) if args.json else f"neighbours rebuilt: {summary}")
    return 0


def command_map(args: argparse.Namespace) -> int:
    """lookalike map: the layout-map step on its own, under the run lock, then one line."""
    from lookalike.tasks.database import connect_checked
    from lookalike.tasks.lock import hold_run_lock
    from lookalike.tasks.map import layout_map

    settings = Settings.from_env(database_url=args.database_url, lock_timeout=args.lock_timeout)
    database_url = settings.resolved_database_url
    engine = connect_checked(database_url)
    tell_if_waiting(database_url, settings.lock_timeout)
    with hold_run_lock(database_url, settings.lock_timeout):
        counts = layout_map(engine, refit=args.refit)
    engine.dispose()
    print(f"map: {counts.points} points ({counts.mode})")
    return 0


def command_duplicates(args: argparse.Namespace) -> int:
    """lookalike duplicates: every group, largest first, as a table, CSV or JSON."""
    from lookalike.tasks.database import connect_checked
    from lookalike.tasks.duplicate_reader import read_group_index, with_members

    settings = Settings.from_env(database_url=args.database_url)
    engine = connect_checked(settings.resolved_database_url)
    index = read_group_index(engine, args.threshold)
    groups = with_members(engine, index, index.order)
    engine.dispose()
    rows = [
        {
            "group": g.id,
            "image_id": m.id,
            "source": m.source,
            "file_name": m.file_name,
            "size": m.size,
            "width": m.width,
            "height": m.height,
            "distance": None if m.distance is None else round(m.distance, 6),
            "kind": m.kind,
        }
        for g in groups
        for m in g.members
    ]
    write_duplicate_rows(rows, args.format, index.threshold, len(groups))
    return 0


def write_duplicate_rows(
    rows: list[dict[str, Any]], fmt: str, threshold: float, groups: int
) -> None:
    """Print the rows of every group in the chosen format."""
    if fmt == "json":
        print(json.dumps({"threshold": threshold, "groups": groups, "images": rows}))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(DUPLICATE_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(f"{groups} groups, {len(rows)} images (threshold {threshold:g})")
        for row in rows:
            print(
                f"{row['group']:>8} {row['kind']:<5} {row['distance']:>10.4f} "
                f"{row['width'] or '-':>5}x{row['height'] or '-':<5} {row['size']:>10} "
                f"{row['source']}/{row['file_name']}"
            )


DUPLICATE_COLUMNS = (
    "group",
    "image_id",
    "source",
    "file_name",
    "size",
    "width",
    "height",
    "distance",
    "kind",
)


def command_serve(args: argparse.Namespace) -> int:
    """lookalike serve: the API and the page, until stopped."""
    from lookalike.api.app import run_server

    run_server(Settings.from_env(database_url=args.database_url, host=args.host, port=args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
