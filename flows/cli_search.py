"""`lookalike search`: the nearest stored images to a photo, or (text-capable models) to words."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from lookalike.tasks.errors import LookalikeError
from lookalike.tasks.settings import Settings

RANDOM_WEIGHTS_NOTE = (
    "note: weights 'none' are a seeded random initialisation, not ImageNet: "
    "similarities are not meaningful (for tests and demos without the weights)"
)
DEFAULT_RESULTS = 20
MAX_RESULTS = 100


class SearchError(LookalikeError):
    """The search cannot run (no features yet, another model, weights not available...)."""


def add_search_command(add: Any, add_db_options: Any) -> None:
    """The `search` command, made with flows.cli.command_factory's add."""
    search = add(
        "search",
        "print the stored images nearest to a photo or to words",
        "The k stored images nearest to a photo (any model) or to a text (models with a text "
        "tower), ranked exactly as the API ranks them.",
        'lookalike search --text "amphora with two handles" --k 5',
    )
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", metavar="FILE", help="a photo to search by")
    query.add_argument("--text", metavar="WORDS", help="words to search by (text-capable models)")
    search.add_argument(
        "--k",
        dest="results",
        type=int,
        default=DEFAULT_RESULTS,
        help=f"how many to print, 1-{MAX_RESULTS} (default {DEFAULT_RESULTS})",
    )
    search.add_argument("--json", action="store_true", help="print one JSON list")
    add_db_options(search)
    search.set_defaults(func=command_search)


def command_search(args: argparse.Namespace) -> int:
    """lookalike search: rank, distance and path of each result, closest first."""
    if not args.verbose:  # the engine's log lines are for a server's log; here, one line
        logging.getLogger("lookalike").setLevel(logging.ERROR)
    if not 1 <= args.results <= MAX_RESULTS:
        raise SearchError(f"--k must be between 1 and {MAX_RESULTS}, got {args.results}")
    found, weights = run_search(Settings.from_env(database_url=args.database_url), args)
    if weights.startswith("none"):
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
    if args.json:
        print(json.dumps([{"id": n.id, "source": n.source, "file_name": n.file_name,
                           "rank": n.rank, "distance": n.distance} for n in found]))  # fmt: skip
        return 0
    if not found:
        print("nothing to search yet: run `lookalike process FOLDER` first")
    for neighbour in found:
        where = f"{neighbour.source}/{neighbour.file_name}"
        print(f"{neighbour.rank:>4}  {neighbour.distance:10.4f}  {where}")
    return 0


def run_search(settings: Settings, args: argparse.Namespace) -> tuple[list[Any], str]:
    """The API's own search engine, run once in this process: the results and the weights
    of the collection; its refusals as one line."""
    from litestar.exceptions import HTTPException

    from lookalike.api.repository import ImageRepository
    from lookalike.api.search_index import SimilaritySearch
    from lookalike.tasks.database import connect_checked

    engine = connect_checked(settings.resolved_database_url)
    try:
        repository = ImageRepository(engine)
        search = SimilaritySearch(repository, settings)
        if args.text is not None:
            found = search.search_text(args.text, args.results)
        else:
            found = search.search(read_photo(Path(args.image)), args.results)
        info = repository.get_collection()
        return found, info.weights if info is not None else ""
    except HTTPException as exc:
        raise SearchError(str(exc.detail)) from None
    finally:
        engine.dispose()


def read_photo(path: Path) -> bytes:
    """The photo's bytes; one line when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SearchError(f"cannot read {path}: {exc.strerror or exc}") from None
