"""The deployment files: compose stack, Dockerfile, .env.example and prefect.yaml hang together."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import yaml

from lookalike.sql.schema import mariadb_ddl
from lookalike.tasks.settings import ENV_PREFIX, Settings
from tests.test_packaging import locked_versions

REPO = Path(__file__).resolve().parents[1]
COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?-][^}]*)?\}")
SERVICES = {"mariadb", "prefect-server", "worker", "api"}
PYTHON_IMAGE = "python:3.11-slim"  # the Dockerfile's base; the Prefect server runs the same Python
SOURCE_FOLDERS = ("tasks", "flows", "api", "sql")
# Read by prefect.yaml's templates when deploying, not by Settings.
DEPLOY_VARS = {"LOOKALIKE_PROJECT_DIR", "LOOKALIKE_IMAGE_ROOT"}


def load_yaml(name: str) -> Any:
    return yaml.safe_load((REPO / name).read_text())


def env_example() -> dict[str, str]:
    """The variables of .env.example, as KEY=VALUE lines."""
    pairs = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(bind address, host port, container port) of each 'ADDRESS:HOST:CONTAINER' entry."""
    result = []
    for entry in service.get("ports", []):
        address, host, container = str(entry).split(":")
        result.append((address, int(host), int(container)))
    return result


def settings_env_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


# --- docker-compose.yml ---------------------------------------------------------------


def test_compose_has_the_four_services_with_their_ports() -> None:
    services = load_yaml("docker-compose.yml")["services"]
    assert set(services) == SERVICES
    assert re.fullmatch(r"mariadb:11\.\d+\.\d+", services["mariadb"]["image"])
    assert services["prefect-server"]["image"].startswith("prefecthq/prefect:3.")
    assert services["worker"]["build"] == "." and services["api"]["build"] == "."
    assert published_ports(services["mariadb"]) == [("127.0.0.1", 3308, 3306)]
    assert published_ports(services["prefect-server"]) == [("127.0.0.1", 4200, 4200)]
    assert published_ports(services["api"]) == [("127.0.0.1", 5000, 5000)]
    assert published_ports(services["worker"]) == []


def test_pulled_images_are_pinned_and_the_prefect_server_matches_the_lock() -> None:
    services = load_yaml("docker-compose.yml")["services"]
    pulled = {name: s["image"] for name, s in services.items() if "build" not in s}
    assert set(pulled) == {"mariadb", "prefect-server"}
    for name, image in pulled.items():
        # An exact release: no floating major tag such as mariadb:11 or prefect:3-..., no latest.
        tag = image.partition(":")[2]
        assert re.match(r"\d+\.\d+\.\d+(-|$)", tag), f"{name}: {image} is not an exact version"
    python = PYTHON_IMAGE.partition(":")[2].removesuffix("-slim")
    assert (
        pulled["prefect-server"]
        == f"prefecthq/prefect:{locked_versions()['prefect']}-python{python}"
    )
    assert load_yaml("prefect.yaml")["prefect-version"] == locked_versions()["prefect"]


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies() -> None:
    services = load_yaml("docker-compose.yml")["services"]
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert "--innodb_initialized" in services["mariadb"]["healthcheck"]["test"]
    assert any("/api/health" in part for part in services["prefect-server"]["healthcheck"]["test"])
    assert any(":5000/health" in part for part in services["api"]["healthcheck"]["test"])
    assert services["worker"]["depends_on"] == {
        "mariadb": {"condition": "service_healthy"},
        "prefect-server": {"condition": "service_healthy"},
    }
    assert services["api"]["depends_on"] == {"mariadb": {"condition": "service_healthy"}}


def test_named_volumes_are_declared_and_bind_mounts_exist() -> None:
    compose = load_yaml("docker-compose.yml")
    declared = set(compose["volumes"])
    used = set()
    for service in compose["services"].values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).is_file(), source
            elif not source.startswith("${"):
                used.add(source)
    assert used == declared
    assert {"mariadb-data", "prefect-data", "worker-data"} <= declared
    assert (REPO / "Dockerfile").is_file()


def test_schema_file_mounted_into_mariadb_is_current() -> None:
    mounts = load_yaml("docker-compose.yml")["services"]["mariadb"]["volumes"]
    assert "./sql/mariadb.sql:/docker-entrypoint-initdb.d/10-schema.sql:ro" in mounts
    assert (REPO / "sql" / "mariadb.sql").read_text() == mariadb_ddl(), (
        "sql/mariadb.sql is stale: run `python -m sql.schema > sql/mariadb.sql`"
    )


def test_images_are_mounted_read_only_at_the_same_path_in_worker_and_api() -> None:
    services = load_yaml("docker-compose.yml")["services"]
    for name in ("worker", "api"):
        image_mounts = [m for m in services[name]["volumes"] if ":/images" in m]
        assert image_mounts == ["${IMAGE_DIR:?set IMAGE_DIR in .env}:/images:ro"], name
    assert services["worker"]["environment"]["LOOKALIKE_IMAGE_ROOT"] == "/images"


def test_compose_variables_are_all_documented_in_env_example() -> None:
    used = set(COMPOSE_VAR.findall((REPO / "docker-compose.yml").read_text()))
    documented = env_example()
    assert used == set(documented), "compose and .env.example must name the same variables"


def test_lookalike_variables_are_settings_fields() -> None:
    fields = settings_env_names()
    documented = {name for name in env_example() if name.startswith(ENV_PREFIX)}
    assert documented and documented <= fields
    services = load_yaml("docker-compose.yml")["services"]
    for name, service in services.items():
        names = {key for key in service.get("environment", {}) if key.startswith(ENV_PREFIX)}
        assert names <= fields | DEPLOY_VARS, name


def test_no_password_is_written_into_compose_or_env_example() -> None:
    services = load_yaml("docker-compose.yml")["services"]
    for service in services.values():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key or key.endswith("DATABASE_URL"):
                assert COMPOSE_VAR.search(str(value)), key
    for key, value in env_example().items():
        if "PASSWORD" in key:
            assert value.startswith("change-me"), key


def test_api_reads_the_database_with_the_read_only_account() -> None:
    services = load_yaml("docker-compose.yml")["services"]
    assert (
        "${API_DB_USER}:${API_DB_PASSWORD}@mariadb:3306"
        in (services["api"]["environment"]["LOOKALIKE_DATABASE_URL"])
    )
    assert (
        "${MARIADB_USER}:${MARIADB_PASSWORD}@mariadb:3306"
        in (services["worker"]["environment"]["LOOKALIKE_DATABASE_URL"])
    )
    mounts = services["mariadb"]["volumes"]
    assert "./sql/mariadb-readonly-user.sh:/docker-entrypoint-initdb.d/20-readonly-user.sh:ro" in (
        mounts
    )


def test_worker_creates_a_process_pool_deploys_and_polls_it() -> None:
    worker = load_yaml("docker-compose.yml")["services"]["worker"]
    script = " ".join(worker["command"])
    assert "prefect work-pool create lookalike --type process" in script
    assert "prefect --no-prompt deploy --all" in script
    assert "prefect worker start --pool lookalike --type process --with-healthcheck" in script
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["LOOKALIKE_PROJECT_DIR"] == "/app"


# --- Dockerfile ---------------------------------------------------------------------


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_dockerfile_installs_the_project_as_a_non_root_user() -> None:
    lines = dockerfile_instructions()
    assert lines[0] == f"FROM {PYTHON_IMAGE}"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
        if line.startswith(("ENV ", "ARG ")):
            assert not re.search(r"PASSWORD|SECRET|DATABASE_URL", line), line
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()


def test_dockerfile_installs_one_copy_of_the_code_at_the_locked_versions() -> None:
    lines = dockerfile_instructions()
    (install,) = [line for line in lines if "pip install" in line]
    # The build context is mounted for the install only; the package lands in site-packages.
    assert install.startswith("RUN --mount=type=bind,target=/src,rw ")
    assert install.endswith('pip install -c /src/constraints.txt "/src[dask]"')
    assert " -e " not in install
    copied = [
        source
        for line in lines
        if line.startswith(("COPY ", "ADD "))
        for source in line.split()[1:-1]
    ]
    assert copied == ["prefect.yaml"], "only the deployment file is copied, never the sources"
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for needed in ("constraints.txt", "pyproject.toml", "README.md", *SOURCE_FOLDERS):
        assert needed not in ignored and f"{needed}/" not in ignored, needed


def test_make_install_and_ci_use_the_constraints() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "CONSTRAINTS := constraints.txt" in makefile
    assert "pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'" in makefile
    assert "$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)" in makefile
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line[:1] != "#"]
    assert "make test" in ci and "make lint" in ci


# --- prefect.yaml -------------------------------------------------------------------


def deployments() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in load_yaml("prefect.yaml")["deployments"]}


def resolve_entrypoint(entrypoint: str) -> Any:
    """The object a module-path entrypoint (package.module.name) names."""
    module, _, name = entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_deployments_point_at_real_flows_with_real_parameters() -> None:
    found = deployments()
    assert set(found) == {"process-images", "rebuild-neighbours"}
    for name, deployment in found.items():
        assert len(deployment["description"].split()) >= 8, name
        flow = resolve_entrypoint(deployment["entrypoint"])
        # `prefect deployment run 'process-images/process-images'` needs these names.
        assert flow.name == name
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment["parameters"]) <= accepted, name
        assert deployment["work_pool"]["name"] == "lookalike"
    assert found["process-images"]["entrypoint"] == "lookalike.flows.process.process_images"
    assert (
        found["rebuild-neighbours"]["entrypoint"] == "lookalike.flows.neighbours.rebuild_neighbours"
    )


def test_prefect_loads_the_entrypoints_from_the_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(tmp_path)  # no source folder here: only the installed package can answer
    for name, deployment in deployments().items():
        flow: Any = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
        assert flow is resolve_entrypoint(deployment["entrypoint"]), name


def test_process_images_runs_nightly_one_at_a_time() -> None:
    from prefect.client.schemas.objects import ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule

    deployment = deployments()["process-images"]
    (schedule,) = deployment["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.cron.split()[2:] == ["*", "*", "*"]  # every day
    assert deployment["concurrency_limit"]["limit"] == 1
    ConcurrencyOptions(collision_strategy=deployment["concurrency_limit"]["collision_strategy"])
    assert "schedules" not in deployments()["rebuild-neighbours"]


def test_prefect_yaml_holds_no_database_settings() -> None:
    def strings(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [s for key, item in value.items() for s in [str(key), *strings(item)]]
        if isinstance(value, list):
            return [s for item in value for s in strings(item)]
        return [str(value)]

    for text in strings(load_yaml("prefect.yaml")):
        assert not re.search(r"://|password|database_url|sqlite|mysql", text, re.IGNORECASE), text


def test_templates_resolve_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.utilities.templating import apply_values

    monkeypatch.setenv("LOOKALIKE_PROJECT_DIR", "/app")
    monkeypatch.setenv("LOOKALIKE_IMAGE_ROOT", "/images")
    config = load_yaml("prefect.yaml")
    pull = apply_values(config["pull"], dict(os.environ))
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
    process = apply_values(deployments()["process-images"], dict(os.environ))
    assert process["parameters"]["root"] == "/images"


def test_job_variables_fit_a_process_work_pool() -> None:
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    allowed = set(template["variables"]["properties"])
    for name, deployment in deployments().items():
        assert set(deployment["work_pool"]["job_variables"]) <= allowed, name


# --- MariaDB init files, run as the MariaDB image's entrypoint would ---------------------

# Stand-ins for the helpers the MariaDB entrypoint offers init files; the case statement and
# docker_sql_escape_string_literal follow the entrypoint's own code.
ENTRYPOINT_SHIM = r"""
set -eo pipefail
mysql_note() { echo "$*"; }
mysql_error() { echo "$*" >&2; exit 1; }
docker_process_sql() { "$PYTHON" -c "$RUN_SQL" "$@"; }
docker_sql_escape_string_literal() {
	local newline=$'\n'
	local escaped=${1//\\/\\\\}
	escaped="${escaped//$newline/\\n}"
	echo "${escaped//\'/\\\'}"
}
case "$INIT_FILE" in
	*.sh) . "$INIT_FILE" ;;
	*.sql) docker_process_sql < "$INIT_FILE" ;;
esac
"""
# docker_process_sql: run stdin as root in MARIADB_DATABASE, or in the --database given.
RUN_SQL = """
import os, sys, pymysql
from pymysql.constants import CLIENT
from sqlalchemy.engine import make_url
admin = make_url(os.environ["ADMIN_URL"])
names = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--database=")]
conn = pymysql.connect(host=admin.host, port=admin.port or 3306, user=admin.username,
    password=admin.password or "", database=(names or [os.environ["MARIADB_DATABASE"]])[-1],
    client_flag=CLIENT.MULTI_STATEMENTS)
with conn.cursor() as cursor:
    cursor.execute(sys.stdin.read())
    while cursor.nextset():
        pass
conn.commit()
"""


def run_init_file(init_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", ENTRYPOINT_SHIM],
        env={**env, "INIT_FILE": str(init_file), "RUN_SQL": RUN_SQL, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )


def mariadb_init_files() -> list[Path]:
    """The files compose mounts into docker-entrypoint-initdb.d, in the order they run."""
    mounts = load_yaml("docker-compose.yml")["services"]["mariadb"]["volumes"]
    targets = {}
    for mount in mounts:
        source, target = mount.split(":")[:2]
        if target.startswith("/docker-entrypoint-initdb.d/"):
            targets[target] = REPO / source
    return [targets[target] for target in sorted(targets)]


@pytest.fixture
def init_accounts(mariadb_url: str) -> Iterator[tuple[str, str]]:
    """The compose stack's init files run against a fresh database: (reader URL, writer URL)."""
    url = sqlalchemy.engine.make_url(mariadb_url)
    tag = uuid.uuid4().hex[:10]
    reader, writer = f"ro_{tag}", f"rw_{tag}"
    password = "it's a \\secret"
    env = {
        "PATH": os.environ["PATH"],
        "ADMIN_URL": mariadb_url,
        "MARIADB_DATABASE": str(url.database),
        "API_DB_USER": reader,
        "API_DB_PASSWORD": password,
        "WRITER_DB_USER": writer,
        "WRITER_DB_PASSWORD": password,
    }
    init_files = mariadb_init_files()
    assert [path.name for path in init_files] == [
        "mariadb.sql",
        "mariadb-readonly-user.sh",
        "mariadb-writer-user.sh",
    ]
    admin = sqlalchemy.create_engine(mariadb_url)
    try:
        for init_file in init_files:
            result = run_init_file(init_file, env)
            assert result.returncode == 0, result.stderr
        yield tuple(  # type: ignore[misc]
            url.set(username=name, password=password).render_as_string(hide_password=False)
            for name in (reader, writer)
        )
    finally:
        with admin.begin() as conn:
            for name in (reader, writer):
                conn.execute(sqlalchemy.text(f"DROP USER IF EXISTS '{name}'@'%'"))
        admin.dispose()


@pytest.mark.mariadb
def test_init_files_make_an_account_that_can_only_read(init_accounts: tuple[str, str]) -> None:
    from lookalike.tasks.database import connect_checked

    reader = connect_checked(init_accounts[0])
    with reader.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM image_names").scalar() == 0
        with pytest.raises(sqlalchemy.exc.OperationalError, match="INSERT command denied"):
            conn.exec_driver_sql(
                "INSERT INTO runs (started_at, status, weights) VALUES (NOW(), 'ok', 'x')"
            )
        with pytest.raises(sqlalchemy.exc.OperationalError, match="INSERT command denied"):
            conn.exec_driver_sql(
                "INSERT INTO judgements (image_id, other_id, user_id, verdict, updated_at) "
                "VALUES (1, 2, 1, 'similar', NOW())"
            )
    reader.dispose()


@pytest.mark.mariadb
def test_init_files_make_a_writer_that_can_only_add_and_change_judgements(
    init_accounts: tuple[str, str],
) -> None:
    from lookalike.tasks.database import create_db_engine

    writer = create_db_engine(init_accounts[1])
    with writer.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO judgements (image_id, other_id, user_id, verdict, updated_at) "
            "VALUES (1, 2, 1, 'similar', NOW())"
        )
        conn.exec_driver_sql("UPDATE judgements SET verdict = NULL WHERE image_id = 1")
        conn.exec_driver_sql(
            "INSERT INTO judgement_audit (image_id, other_id, user_id, changed_at) "
            "VALUES (1, 2, 1, NOW())"
        )
    refused = [
        ("DELETE command denied", "DELETE FROM judgements"),
        ("UPDATE command denied", "UPDATE judgement_audit SET note = 'x'"),
        ("DELETE command denied", "DELETE FROM judgement_audit"),
        (
            "INSERT command denied",
            "INSERT INTO users (name, role, credential_version, "
            "created_at) VALUES ('eve', 'admin', 1, NOW())",
        ),
        ("SELECT command denied", "SELECT * FROM users"),
        ("UPDATE command denied", "UPDATE image_names SET status = 'ok'"),
    ]
    for message, statement in refused:
        with writer.connect() as conn, pytest.raises(sqlalchemy.exc.DBAPIError, match=message):
            conn.exec_driver_sql(statement)
    writer.dispose()


def test_readonly_init_script_refuses_to_run_without_credentials() -> None:
    env = {"PATH": os.environ["PATH"], "ADMIN_URL": "unused", "MARIADB_DATABASE": "lookalike"}
    result = run_init_file(REPO / "sql" / "mariadb-readonly-user.sh", env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "API_DB_USER and API_DB_PASSWORD must be set to create the API's read-only account"
    )
