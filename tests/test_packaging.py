"""The package declares every third-party module its code imports (dev extras do not count)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "flows", "api", "sql")  # folders, installed as lookalike.<folder>
CACHES = shutil.ignore_patterns("__pycache__", "*.pyc")


def imported_top_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports, lazily inside functions too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements() -> set[str]:
    """Distribution names a user can install: dependencies and extras, except dev."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra, extra_specs in project.get("optional-dependencies", {}).items():
        if extra != "dev":  # dev tools are never there for a user
            specs.extend(extra_specs)
    return {normalised(re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0]) for spec in specs}


def third_party_imports() -> dict[str, set[str]]:
    """Import name -> files importing it, for names outside the stdlib and this project."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for name in imported_top_modules(path):
                if name in sys.stdlib_module_names or name in ("lookalike", "__future__"):
                    continue
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared_for_users() -> None:
    required = runtime_requirements()
    distributions = packages_distributions()
    missing = {
        name: sorted(files)
        for name, files in third_party_imports().items()
        if not {normalised(dist) for dist in distributions.get(name, [name])} & required
    }
    assert missing == {}, f"imported but not declared outside the dev extra: {missing}"


def test_the_check_sees_the_engine_imports() -> None:
    # Guards the test above against passing vacuously (e.g. a wrong root or package list).
    found = third_party_imports()
    assert {"numpy", "threadpoolctl", "prefect", "litestar", "sqlalchemy"} <= set(found)
    assert "tasks/knn/threads.py" in found["threadpoolctl"]


def test_the_wheel_installs_one_import_namespace(tmp_path: Path) -> None:
    # tasks/, flows/, api/ and sql/ must land under lookalike/, never as top-level packages
    # that could collide with another distribution's `tasks` or `api`. Built from a copy:
    # setuptools writes build/ and egg-info next to the sources it builds.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", *PACKAGES):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": CACHES} if copy is shutil.copytree else {}))
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
    subprocess.run([*command, str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("lookalike-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"lookalike"}
    for module in (
        "tasks/knn/passes.py",
        "flows/process.py",
        "api/static/app.js",
        "sql/mariadb.sql",
    ):
        assert f"lookalike/{module}" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "lookalike = lookalike.flows.cli:main" in archive.read(entry_points).decode()
