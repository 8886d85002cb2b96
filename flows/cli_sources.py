"""The commands for sources: `lookalike sources` and `lookalike remove-source`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lookalike.flows.cli_prefect import check_prefect_server, prefect_api_url, tell_if_waiting
from lookalike.tasks.errors import LookalikeError
from lookalike.tasks.settings import Settings

AddOptions = Callable[[argparse.ArgumentParser], None]


class NotConfirmedError(LookalikeError):
    """A removal asked for without --yes where nobody can be asked."""


def add_source_commands(
    add: Any, add_db_options: AddOptions, add_k: AddOptions, add_lock_timeout: AddOptions
) -> None:
    """`sources` and `remove-source`; add makes a command with a description and an example
    (flows.cli.command_factory)."""
    listing = add(
        "sources",
        "list the archive's sources with their counts and last run",
        "Every source (a named root folder) of the database: its images by status and the "
        "last run that brought it up to date.",
        "lookalike sources --json",
    )
    add_db_options(listing)
    listing.add_argument("--json", action="store_true", help="print the sources as JSON")
    listing.set_defaults(func=command_sources)

    remove = add(
        "remove-source",
        "remove a source's images from the archive",
        "Delete the source NAME with its images, features and neighbour rows, and update every "
        "other image's neighbour list, the duplicate groups and the map. The files stay.",
        "lookalike remove-source campaign-2019 --yes",
    )
    remove.add_argument("name", metavar="NAME", help="the source's name (see lookalike sources)")
    remove.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)"
    )
    add_db_options(remove)
    add_k(remove)
    add_lock_timeout(remove)
    remove.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    remove.set_defaults(func=command_remove_source)


def command_sources(args: argparse.Namespace) -> int:
    """lookalike sources: one line per source (or JSON)."""
    from lookalike.tasks.database import connect_checked
    from lookalike.tasks.sources import source_statuses

    engine = connect_checked(
        Settings.from_env(database_url=args.database_url).resolved_database_url
    )
    statuses = source_statuses(engine)
    engine.dispose()
    if args.json:
        print(json.dumps([dict(vars(s), last_run_finished=iso(s.last_run_finished))
                          for s in statuses]))  # fmt: skip
        return 0
    if not statuses:
        print("no sources yet: lookalike process FOLDER adds one")
    for s in statuses:
        last = (
            f"last run {s.last_run_id} {s.last_run_status} {iso(s.last_run_finished) or ''}"
            if s.last_run_id is not None
            else "no run yet"
        )
        print(
            f"{s.name}: {s.root}  {s.images:,} images ({s.ok:,} ok, {s.failed:,} failed, "
            f"{s.pending:,} pending), {last.rstrip()}"
        )
    return 0


def iso(moment: Any) -> str | None:
    """A datetime as ISO 8601 (UTC, as stored), None as None."""
    return None if moment is None else f"{moment.isoformat()}Z"


def command_remove_source(args: argparse.Namespace) -> int:
    """lookalike remove-source: confirm, run the remove-source flow, print what it did."""
    settings = Settings.from_env(
        database_url=args.database_url, k=args.k, lock_timeout=args.lock_timeout
    )
    confirm_removal(args.name, settings, args.yes)
    from lookalike.flows.sources import remove_source

    api_url = prefect_api_url()
    if api_url is not None:
        check_prefect_server(api_url)
    tell_if_waiting(settings.resolved_database_url, settings.lock_timeout)
    summary = remove_source(
        name=args.name, database_url=args.database_url, k=args.k, lock_timeout=args.lock_timeout
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"removed source {summary['source']}: {summary['removed_images']:,} images; "
            f"neighbours of the other {summary['images']:,} updated "
            f"({summary['neighbour_mode']}) in {summary['seconds']:.1f} s"
        )
    return 0


def confirm_removal(name: str, settings: Settings, yes: bool) -> None:
    """Ask on a terminal before deleting (the source must exist); NotConfirmedError otherwise."""
    from lookalike.tasks.database import connect_checked
    from lookalike.tasks.sources import find_source, source_statuses

    engine = connect_checked(settings.resolved_database_url)
    try:
        find_source(engine, name)
        images = next(s.images for s in source_statuses(engine) if s.name == name)
    finally:
        engine.dispose()
    if yes:
        return
    if not sys.stdin.isatty():
        raise NotConfirmedError(f"removing {name!r} deletes {images:,} images' features: "
                                "pass --yes to confirm")  # fmt: skip
    answer = input(f"remove source {name!r} and its {images:,} images from the database? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise NotConfirmedError("nothing removed")
