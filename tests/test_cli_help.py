"""The command line explains itself: --version, --verbose anywhere, settings and examples."""

from __future__ import annotations

import argparse
import contextlib
import io
from importlib.metadata import version

import pytest

from lookalike.flows.cli import build_parser
from lookalike.tasks.settings import ENV_PREFIX, Settings


def commands() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser by name (the top-level subcommands)."""
    top = build_parser()
    (group,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(group.choices)


def test_version_prints_the_installed_version() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["--version"])
    assert stopped.value.code == 0
    assert out.getvalue().strip() == f"lookalike {version('lookalike')}"


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["process", "ROOT"], False),
        (["-v", "process", "ROOT"], True),
        (["process", "ROOT", "--verbose"], True),
        (["serve", "-v"], True),
        (["users", "list"], False),
    ],
)
def test_verbose_is_taken_before_or_after_the_command(argv: list[str], verbose: bool) -> None:
    assert build_parser().parse_args(argv).verbose is verbose


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_has_a_description_and_an_example(name: str) -> None:
    parser = commands()[name]
    assert parser.description and len(parser.description) > 20
    assert parser.epilog and parser.epilog.startswith("example:\n  lookalike ")
    assert f"lookalike {name}" in parser.format_help()


@pytest.mark.parametrize("name", sorted(commands()))
def test_options_with_a_setting_name_it_in_their_help(name: str) -> None:
    fields = set(Settings.model_fields)
    for action in commands()[name]._actions:
        if action.option_strings and action.dest in fields:
            expected = f"env {ENV_PREFIX}{action.dest.upper()}"
            assert action.help and expected in action.help, (name, action.option_strings)
