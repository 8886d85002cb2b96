"""The README documents every setting, command, option and route, and CI runs its test command."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from lookalike.flows.cli import build_parser
from lookalike.tasks.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_is_documented(name: str) -> None:
    assert f"{ENV_PREFIX}{name.upper()}" in README


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_command_and_option_is_documented(command: str) -> None:
    assert f"lookalike {command}" in README
    for action in _subcommands()[command]._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert option in README, f"{command} {option}"


def test_every_route_is_documented() -> None:
    from lookalike.api.app import create_app

    app = create_app(Settings(database_url="sqlite://"))
    paths = {route.path for route in app.routes if not route.path.startswith("/schema")}
    for path in sorted(paths):
        if path == "/":
            continue
        documented = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", path)
        assert documented in README, path


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in README and "make demo" in README
