"""The README documents every setting, CLI command and option, make target and API route.

In the style of Datasette's documentation tests: each item is read from the code (the settings
dataclass, the argparse parser, the Makefile, the Litestar app) and must have its own entry in
the README, so that adding one without documenting it fails here:

- a setting: a row of a table whose first cell is its variable, `LOOKALIKE_NAME`;
- a command: a synopsis line `lookalike COMMAND ...` in a code block, naming every option of
  the command (its long form), its positional arguments (metavar) and the choices of options
  that have them; options of `lookalike` itself on a line `lookalike --option ...`;
- a make target in the two-commands block (the first code block made only of `make` lines):
  a rule of the Makefile, and `make test` is what CI runs;
- a route: its path, with `{name}` for each parameter, not followed by more path; a method
  other than GET as `METHOD /path`; the OpenAPI routes Litestar adds as `/schema`.
"""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import fields
from functools import cache
from pathlib import Path

import pytest

from lookalike.flows.cli import build_parser
from lookalike.tasks.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
TOP_LEVEL = "lookalike"  # the key of the options of the program itself


# --- what the README documents ------------------------------------------------------------------


def code_blocks() -> list[str]:
    """The contents of every fenced code block, in order."""
    return FENCE.findall(README)


@cache
def documented_settings() -> frozenset[str]:
    """Variables that have a row of their own in a table (first cell `LOOKALIKE_...`)."""
    return frozenset(re.findall(r"^\|\s*`(LOOKALIKE_\w+)`\s*\|", README, re.MULTILINE))


@cache
def synopses() -> dict[str, str]:
    """Per command (TOP_LEVEL for the program's own options), its synopsis lines joined."""
    found: dict[str, list[str]] = {}
    for block in code_blocks():
        current: list[str] | None = None
        for line in block.splitlines():
            start = re.match(r"\s*(?:\.venv/bin/)?lookalike (\S+)(?: ([a-z]+))?", line)
            if start:
                both = f"{start[1]} {start[2]}"
                command = TOP_LEVEL if start[1].startswith("-") else start[1]
                command = both if both in parsers() else command
                current = found.setdefault(command, [])
                current.append(line)
            elif current is not None and re.match(r"\s+\[", line):
                current.append(line)  # a continuation line of the synopsis above
            else:
                current = None
    return {command: "\n".join(lines) for command, lines in found.items()}


def two_commands_block() -> str:
    """The first code block whose every command line is a `make` command."""
    for block in code_blocks():
        lines = [line.split("#")[0].strip() for line in block.splitlines()]
        commands = [line for line in lines if line]
        if commands and all(line.startswith("make ") for line in commands):
            return block
    pytest.fail("the README has no code block of only `make` commands (the two commands)")


def mentions(text: str, term: str) -> bool:
    """term appears in text as a whole word (not as part of a longer option or name)."""
    return re.search(rf"(?<![\w-]){re.escape(term)}(?![\w-])", text) is not None


# --- what the code has ----------------------------------------------------------------------


def setting_variables() -> list[str]:
    """The environment variable of every field of the settings object."""
    # A pydantic model lists its fields in model_fields; a dataclass answers fields().
    model_fields = getattr(Settings, "model_fields", None)
    names = list(model_fields) if model_fields else [field.name for field in fields(Settings)]
    return [f"{ENV_PREFIX}{name.upper()}" for name in names]


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The program's parser (TOP_LEVEL) and each command's, walked from build_parser(); a
    command with actions of its own (`users add`) is keyed by both words."""
    found = {TOP_LEVEL: build_parser()}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    key = f"{prefix} {name}".strip()
                    if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                        walk(sub, key)  # a group of actions: its actions are the commands
                    else:
                        found[key] = sub

    walk(found[TOP_LEVEL], "")
    return found


def documented_form(action: argparse.Action) -> str:
    """How the README names an argument: its long option, else its first, else its metavar."""
    long = [option for option in action.option_strings if option.startswith("--")]
    if long or action.option_strings:
        return (long or action.option_strings)[0]
    return str(action.metavar or action.dest.upper())


def cli_items() -> list[tuple[str, str]]:
    """(command, argument) for every argument of every parser, --help and --version left out,
    and --verbose only at the top (every command takes it; the README says so once)."""
    return [
        (command, documented_form(action))
        for command, parser in parsers().items()
        for action in parser._actions
        if not isinstance(
            action, argparse._HelpAction | argparse._SubParsersAction | argparse._VersionAction
        )
        and (command == TOP_LEVEL or action.dest != "verbose")
    ]


def make_targets() -> set[str]:
    """Targets that have a rule in the Makefile (a .PHONY entry alone is not a rule)."""
    rules = re.findall(r"^([\w.$()/-]+(?:[ \t]+[\w.$()/-]+)*)[ \t]*:(?![=:])", _makefile(), re.M)
    return {target for rule in rules for target in rule.split() if not target.startswith(".")}


def _makefile() -> str:
    return (ROOT / "Makefile").read_text()


@cache
def app_routes() -> dict[str, frozenset[str]]:
    """Every route path of the service, as the README writes it, with its methods."""
    from lookalike.api.app import create_app

    app = create_app(Settings(database_url="sqlite://"))
    routes: dict[str, frozenset[str]] = {}
    for route in app.routes:
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        if path.startswith("/schema/"):
            path = "/schema"  # the OpenAPI documents and viewers Litestar serves under it
        methods = getattr(route, "methods", set()) - {"HEAD", "OPTIONS"}
        routes[path] = routes.get(path, frozenset()) | frozenset(methods)
    return routes


def route_is_mentioned(path: str) -> bool:
    """The path appears in the README, not as the start of a longer path."""
    if path == "/":
        return re.search(r"127\.0\.0\.1:\d+/(?![\w{.-])", README) is not None
    return re.search(rf"{re.escape(path)}(?![\w{{}}/.-])", README) is not None


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", setting_variables())
def test_every_setting_has_a_row(variable: str) -> None:
    assert variable in documented_settings(), f"{variable} has no row in a settings table"


def test_every_documented_setting_exists() -> None:
    assert sorted(documented_settings() - set(setting_variables())) == []


@pytest.mark.parametrize("command", sorted(set(parsers()) - {TOP_LEVEL}))
def test_every_command_has_a_synopsis(command: str) -> None:
    assert command in synopses(), f"no `lookalike {command} ...` line in a code block"


@pytest.mark.parametrize(("command", "argument"), cli_items())
def test_every_option_is_in_its_commands_synopsis(command: str, argument: str) -> None:
    synopsis = synopses().get(command, "")
    assert mentions(synopsis, argument), f"`{argument}` missing from the synopsis of {command}"


@pytest.mark.parametrize("command", sorted(parsers()))
def test_the_choices_of_options_are_in_the_synopsis(command: str) -> None:
    synopsis = synopses().get(command, "")
    options = [action for action in parsers()[command]._actions if action.option_strings]
    for action in options:
        for choice in action.choices or ():
            assert mentions(synopsis, str(choice)), f"{command} {action.option_strings}: {choice}"


@pytest.mark.parametrize("command", sorted(parsers()))
def test_every_option_in_a_synopsis_exists(command: str) -> None:
    real = {option for action in parsers()[command]._actions for option in action.option_strings}
    written = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", synopses().get(command, "")))
    assert sorted(written - real) == []


def test_the_two_commands_are_make_targets_and_ci_runs_the_test_command() -> None:
    named = re.findall(r"^\s*make ([\w-]+)", two_commands_block(), re.MULTILINE)
    assert "demo" in named and "test" in named
    assert sorted(set(named) - make_targets()) == [], "named in the README, no rule in Makefile"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_make_target_the_readme_names_has_a_rule() -> None:
    in_text = re.findall(r"`make ([\w-]+)`", README)
    in_blocks = re.findall(r"^\s*make ([\w-]+)", "\n".join(code_blocks()), re.MULTILINE)
    assert sorted(set(in_text + in_blocks) - make_targets()) == []


@pytest.mark.parametrize("path", sorted(app_routes()))
def test_every_route_is_documented(path: str) -> None:
    assert route_is_mentioned(path), f"route {path} is not in the README"
    for method in sorted(app_routes()[path] - {"GET"}):
        assert f"{method} {path}" in README, f"{method} {path} is not in the README"


def test_every_source_file_the_readme_names_exists() -> None:
    folders = "tasks|flows|api|sql|tests|scripts|benchmarks"
    named = set(re.findall(rf"`((?:{folders})/[\w/]+\.py)`", README))
    assert sorted(name for name in named if not (ROOT / name).is_file()) == []


def resolves(dotted: str) -> bool:
    """True when lookalike.<dotted> is a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module("lookalike." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for name in parts[cut:]:
                target = getattr(target, name)
        except AttributeError:
            return False
        return True
    return False


def test_every_dotted_name_the_readme_names_exists() -> None:
    named = set(re.findall(r"`((?:tasks|flows|api|sql)(?:\.\w+)+)", README))
    assert sorted(name for name in named if not resolves(name)) == []
