"""prefect.yaml for real: a Prefect server, a process pool, `prefect deploy`, a worker, a run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from lookalike.sql.schema import (
    RUN_COMPLETED,
    STATUS_OK,
    image_names,
    image_neighbours,
    runs,
    sources,
)
from lookalike.tasks.database import connect_checked
from scripts.make_demo_images import DEFAULT_COUNT, plan_images
from tests.odd_images import write_photos

ROOT = Path(__file__).resolve().parent.parent
# The text just before each block of the README's recipe: deploy and index the first folder,
# then add a second folder as a source with a run on it.
README_RECIPE = "Deployments (`prefect.yaml`)"
README_SECOND_SOURCE = "The second folder becomes a source"
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def api_call(api_url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (no body) or POST (body) on the Prefect REST API; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{api_url}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def wait_for_health(api_url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    """Block until the server answers /health; fail when it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited with status {server.returncode}")
        try:
            api_call(api_url, "/health")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"prefect server did not answer within {timeout:.0f} s")


@contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A running `prefect server start` on a free port, its data under home; the environment
    that talks to it (no PREFECT_* or LOOKALIKE_* setting of the caller's own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LOOKALIKE_"))}
    port = free_port()
    env.update(
        PREFECT_HOME=str(home / "prefect-home"),  # its own SQLite database lives here
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    home.mkdir(parents=True, exist_ok=True)
    with (home / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_health(env["PREFECT_API_URL"], server, timeout=180)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def shared_prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running `prefect server start` shared by this module's tests (a start-up costs about
    10 s): each creates (or overwrites) the same work pool and deployments, and reads only the
    runs and databases of its own folders."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as env:
        yield env


def prefect(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    """Run the prefect CLI in the project folder; its output (the test fails on an error)."""
    result = subprocess.run(
        [*PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def start_and_run(
    deployment: str, *params: str, env: dict[str, str], worker_env: dict[str, str]
) -> str:
    """Start a run of the deployment (-p NAME=VALUE each), let a process worker take it and
    run it; the run's id, once it completed (the test fails otherwise)."""
    started = prefect("deployment", "run", deployment, *params, env=env)
    match = re.search(r"UUID: ([0-9a-f-]{36})", started)
    assert match, started
    prefect(
        "worker", "start", "--pool", "lookalike", "--type", "process", "--run-once",
        env=worker_env,
        timeout=400,
    )  # fmt: skip
    flow_run = api_call(env["PREFECT_API_URL"], f"/flow_runs/{match.group(1)}")
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    return match.group(1)


def source_counts(database_url: str) -> dict[str, tuple[str, int]]:
    """Each source's root and its images indexed ok."""
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(sources.c.name, sources.c.root, func.count(image_names.c.id))
            .outerjoin(
                image_names,
                (image_names.c.source_id == sources.c.id) & (image_names.c.status == STATUS_OK),
            )
            .group_by(sources.c.id)
        ).all()
    engine.dispose()
    return {name: (root, count) for name, root, count in rows}


@pytest.mark.slow
def test_deployment_runs_on_a_process_worker(
    shared_prefect_env: dict[str, str], tmp_path: Path
) -> None:
    prefect_env = shared_prefect_env
    photos, scans = tmp_path / "photos", tmp_path / "scans"
    write_photos(photos, 3)
    write_photos(scans, 2, seed=1)
    database_url = f"sqlite:///{tmp_path / 'lookalike.sqlite'}"
    api_url = prefect_env["PREFECT_API_URL"]

    # The flows run in a folder without any source: the module-path entrypoints must come
    # from the installed package, as in the Docker image, never from files beside prefect.yaml.
    workdir = tmp_path / "workdir"
    workdir.mkdir()

    # --overwrite: the recipe's tests create the same pool on this shared server.
    prefect("work-pool", "create", "lookalike", "--type", "process", "--overwrite", env=prefect_env)
    deploy_env = dict(
        prefect_env,
        LOOKALIKE_PROJECT_DIR=str(workdir),
        LOOKALIKE_IMAGE_ROOT=str(photos),
        LOOKALIKE_SOURCE_1_NAME="photos",
        LOOKALIKE_SOURCE_1_ROOT=str(photos),
        LOOKALIKE_SOURCE_2_NAME="scans",
        LOOKALIKE_SOURCE_2_ROOT=str(scans),
    )
    prefect("--no-prompt", "deploy", "--all", env=deploy_env)
    deployments = {d["name"]: d for d in api_call(api_url, "/deployments/filter", {})}
    process = "lookalike.flows.process.process_images"
    assert {name: d["entrypoint"] for name, d in deployments.items()} == {
        "process-images": process,
        "process-source-1": process,
        "process-source-2": process,
        "process-archive": process,
        "remove-source": "lookalike.flows.sources.remove_source",
        "rebuild-neighbours": "lookalike.flows.neighbours.rebuild_neighbours",
    }
    assert all(d["description"] for d in deployments.values())
    # Both ways of deploying the archive, from the environment at deploy time: the
    # per-source schedules run, the list's waits to be resumed.
    assert deployments["process-archive"]["parameters"]["sources"] == [
        {"name": "photos", "root": str(photos)},
        {"name": "scans", "root": str(scans)},
    ]
    schedules = {
        name: [(s["schedule"]["cron"], s["active"]) for s in d["schedules"]]
        for name, d in deployments.items()
        if d["schedules"]
    }
    assert schedules == {
        "process-source-1": [("30 2 * * *", True)],
        "process-source-2": [("30 4 * * *", True)],
        "process-archive": [("30 2 * * *", False)],
    }
    for number, name, folder in (("1", "photos", photos), ("2", "scans", scans)):
        parameters = deployments[f"process-source-{number}"]["parameters"]
        assert (parameters["source"], parameters["root"]) == (name, str(folder))

    worker_env = dict(
        prefect_env,
        LOOKALIKE_DATABASE_URL=database_url,  # from the worker's environment, never the file
        LOOKALIKE_WEIGHTS="none",  # LOOKALIKE_DATA_DIR left at its default: data, relative
    )
    flow_run_id = start_and_run(
        "process-images/process-archive", "-p", "batch_size=4", "-p", "k=2",
        env=prefect_env, worker_env=worker_env,
    )  # fmt: skip
    artifacts = api_call(
        api_url, "/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    )
    assert {"process-images-summary", "process-images-failed", "process-images-progress"} <= {
        a["key"] for a in artifacts
    }
    assert source_counts(database_url) == {"photos": (str(photos), 3), "scans": (str(scans), 2)}
    # The pull step ran the flow in LOOKALIKE_PROJECT_DIR: the relative data folder is there.
    assert list((workdir / "data" / "staging" / "features").rglob("*.arrow"))

    start_and_run(
        "remove-source/remove-source", "-p", "name=scans", "-p", "k=2",
        env=prefect_env, worker_env=worker_env,
    )  # fmt: skip
    assert source_counts(database_url) == {"photos": (str(photos), 3)}
    engine = connect_checked(database_url)
    with engine.connect() as conn:
        neighbours = conn.execute(select(func.count()).select_from(image_neighbours)).scalar()
        run_rows = conn.execute(select(runs.c.status)).scalars().all()
    engine.dispose()
    assert (neighbours, run_rows) == (3 * 2, [RUN_COMPLETED, RUN_COMPLETED])


# --- the README's deployment recipe, run verbatim -----------------------------------------------


def readme_block(marker: str) -> str:
    """The first fenced code block after marker in the README, exactly as written."""
    readme = (ROOT / "README.md").read_text()
    assert marker in readme, f"the README has no {marker!r}"
    match = re.search(r"^```\w*\n(.*?)^```", readme[readme.index(marker) :], re.M | re.S)
    assert match, f"no code block after {marker!r} in the README"
    return match.group(1)


def readme_recipe() -> str:
    """The recipe's two blocks, one after the other in one shell, as a reader runs them."""
    return readme_block(README_RECIPE) + readme_block(README_SECOND_SOURCE)


def run_recipe(checkout: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The README's recipe, run by bash in checkout, stopping at the first failing command
    (`set -e -o pipefail`: what a reader sees when a step fails)."""
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", readme_recipe()],
        cwd=checkout, env=recipe_env(checkout, env), capture_output=True, text=True, timeout=500,
    )  # fmt: skip


def recipe_env(checkout: Path, env: dict[str, str]) -> dict[str, str]:
    """env, with prefect, lookalike and python3 of this venv first on the PATH (an active
    virtual environment) and checkout as the working directory."""
    venv_bin = str(Path(sys.executable).parent)
    return dict(env, PATH=f"{venv_bin}{os.pathsep}{env['PATH']}", PWD=str(checkout))


def new_checkout(folder: Path) -> Path:
    """A folder with what the recipe reads of a checkout: prefect.yaml (and, for `make demo`,
    the Makefile's scripts)."""
    folder.mkdir()
    (folder / "prefect.yaml").write_bytes((ROOT / "prefect.yaml").read_bytes())
    (folder / "scripts").symlink_to(ROOT / "scripts", target_is_directory=True)
    return folder


def deployment_runs(api_url: str, root: Path) -> list[dict[str, Any]]:
    """The runs of the process-images deployment on root that were started (not scheduled
    ones)."""
    deployment = api_call(api_url, "/deployments/name/process-images/process-images")
    started = {
        "deployment_id": {"any_": [deployment["id"]]},
        "state": {"type": {"not_any_": ["SCHEDULED"]}},
    }
    flow_runs = api_call(api_url, "/flow_runs/filter", {"flow_runs": started})
    return [run for run in flow_runs if run["parameters"].get("root") == str(root)]


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.slow
def test_readme_recipe_indexes_the_demo_set(
    shared_prefect_env: dict[str, str], tmp_path: Path
) -> None:
    checkout = new_checkout(tmp_path / "checkout")
    # `make demo` of this Makefile in the checkout, with this venv (nothing to install).
    venv = Path(sys.executable).parent.parent
    made = subprocess.run(
        ["make", "-f", str(ROOT / "Makefile"), "-o", "install", f"VENV={venv}", "demo"],
        cwd=checkout, env=shared_prefect_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, f"make demo:\n{made.stdout}\n{made.stderr}"

    result = run_recipe(checkout, shared_prefect_env)

    assert result.returncode == 0, f"the recipe failed:\n{result.stdout}\n{result.stderr}"
    # Each run's state, on a line of its own: the demo set's, then the second folder's.
    assert [line for line in result.stdout.splitlines() if line == "Completed"] == [
        "Completed",
        "Completed",
    ], result.stdout
    api_url = shared_prefect_env["PREFECT_API_URL"]
    images, more = checkout / "demo-images", checkout / "more-images"
    for root in (images, more):
        started = deployment_runs(api_url, root)
        assert [run["state"]["type"] for run in started] == ["COMPLETED"], (root, started)
    # `-p root=` of the second run added the folder as a source named after it.
    listed = subprocess.run(
        ["lookalike", "sources", "--json"],
        cwd=checkout, env=recipe_env(checkout, shared_prefect_env),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    found = {s["name"]: s for s in json.loads(last_line(listed.stdout))}
    made_more = re.search(r"make_demo_images\.py more-images --count (\d+)", readme_recipe())
    assert made_more, "the recipe makes no second folder"
    more_count = int(made_more[1])
    assert {name: (s["root"], s["images"], s["ok"]) for name, s in found.items()} == {
        "demo-images": (str(images), DEFAULT_COUNT, DEFAULT_COUNT),
        "more-images": (str(more), more_count, more_count),
    }
    assert found["more-images"]["last_run_status"] == RUN_COMPLETED
    # The recipe's `lookalike sources` printed both, after the second run's state.
    assert [line.split(":")[0] for line in result.stdout.splitlines()[-2:]] == [
        "demo-images",
        "more-images",
    ], result.stdout
    engine = connect_checked(f"sqlite:///{checkout / 'data' / 'lookalike.sqlite'}")
    with engine.connect() as conn:
        names = conn.execute(
            select(sources.c.name, image_names.c.file_name)
            .join(sources, sources.c.id == image_names.c.source_id)
            .where(image_names.c.status == STATUS_OK)
        ).all()
        run_rows = conn.execute(select(runs.c.status).order_by(runs.c.id)).scalars().all()
    engine.dispose()
    for name, count in (("demo-images", DEFAULT_COUNT), ("more-images", more_count)):
        assert sorted(file for source, file in names if source == name) == sorted(
            image.relative_path for image in plan_images(count)
        ), name
    # make demo's run, then the deployment's two: same weights, so not refused.
    assert run_rows == [RUN_COMPLETED] * 3


@pytest.mark.slow
def test_readme_recipe_fails_with_the_reason_when_the_run_fails(
    shared_prefect_env: dict[str, str], tmp_path: Path
) -> None:
    checkout = new_checkout(tmp_path / "checkout")  # no `make demo`: no demo-images folder
    images = checkout / "demo-images"

    result = run_recipe(checkout, shared_prefect_env)

    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 1, output
    assert "stopped!" in output  # the worker ran the run and stopped; its check failed
    reason = last_line(result.stdout)
    assert reason.startswith("Failed: "), output
    assert reason.endswith(f"DiscoveryError: folder not found: {images}"), output
    started = deployment_runs(shared_prefect_env["PREFECT_API_URL"], images)
    assert [run["state"]["type"] for run in started] == ["FAILED"], started
