"""Packaging: every import declared, one import namespace, and constraints.txt pins them all."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "flows", "api", "sql")  # folders, installed as lookalike.<folder>
CACHES = shutil.ignore_patterns("__pycache__", "*.pyc")
CONSTRAINTS = ROOT / "constraints.txt"
# Their next major release may drop what this code calls: pyproject.toml must stop before it.
BOUNDED = {"prefect", "tensorflow", "keras", "numpy", "sqlalchemy", "litestar", "pymysql"}


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


def all_requirements() -> list[Requirement]:
    """Every requirement of pyproject.toml: dependencies and all extras, dev included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"]]
    for extra_specs in project.get("optional-dependencies", {}).values():
        specs.extend(extra_specs)
    return [Requirement(spec) for spec in specs]


def locked_versions() -> dict[str, str]:
    """Normalised name -> exact version of each `name==version` line of constraints.txt."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, pinned = line.partition("==")
            assert sep and re.fullmatch(r"[\w.+!-]+", pinned), f"not an exact pin: {line}"
            pins[normalised(name)] = pinned
    return pins


def test_constraints_pin_every_requirement_within_its_bounds() -> None:
    pins = locked_versions()
    assert "lookalike" not in pins  # the project itself is installed from the checkout
    for requirement in all_requirements():
        name = normalised(requirement.name)
        assert name in pins, f"{name} is not pinned: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside {requirement}: run make install and make lock"
        )


def test_major_releases_that_would_break_are_excluded() -> None:
    bounded = {
        normalised(r.name)
        for r in all_requirements()
        if any(spec.operator in ("<", "<=", "~=", "==") for spec in r.specifier)
    }
    assert not BOUNDED - bounded, f"no upper bound: {sorted(BOUNDED - bounded)}"
    names = {normalised(r.name) for r in all_requirements()}
    assert {"pyyaml", "packaging"} <= names  # imported by the tests


def test_the_venv_holds_the_locked_versions_of_the_requirements() -> None:
    # What the tests run against is what constraints.txt promises (make install uses it).
    pins = locked_versions()
    drift = {}
    for requirement in all_requirements():
        name = normalised(requirement.name)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pins.get(name):
            drift[name] = f"installed {installed}, locked {pins.get(name)}"
    assert drift == {}, f"the venv differs from constraints.txt (make install): {drift}"
