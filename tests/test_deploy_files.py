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
SOURCE_VARS = {
    "LOOKALIKE_SOURCE_1_NAME",
    "LOOKALIKE_SOURCE_1_ROOT",
    "LOOKALIKE_SOURCE_2_NAME",
    "LOOKALIKE_SOURCE_2_ROOT",
}
DEPLOY_VARS = {"LOOKALIKE_PROJECT_DIR", "LOOKALIKE_IMAGE_ROOT", *SOURCE_VARS}
# The deployments of the process-images flow: by hand, one per source, one list of sources.
BY_HAND = "process-images"
PER_SOURCE = ("process-source-1", "process-source-2")
ARCHIVE = "process-archive"


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


def image_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> mount entry of each folder of this machine (a ${VARIABLE} source)."""
    return {m.split(":")[-2]: m for m in service["volumes"] if m.startswith("${")}


def test_two_image_folders_are_mounted_read_only_at_the_same_paths_in_worker_and_api() -> None:
    services = load_yaml("docker-compose.yml")["services"]
    mounts = image_mounts(services["worker"])
    # The API serves each source's files from the root the worker stored: the same paths.
    assert image_mounts(services["api"]) == mounts
    assert mounts == {
        "/images": "${IMAGE_DIR:?set IMAGE_DIR in .env}:/images:ro",
        "/images-2": "${IMAGE_DIR_2:?set IMAGE_DIR_2 in .env}:/images-2:ro",
    }
    assert services["worker"]["environment"]["LOOKALIKE_IMAGE_ROOT"] == "/images"


def test_the_stacks_deployments_index_both_mounted_folders_as_two_sources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.utilities.templating import apply_values

    from lookalike.sql.migrations import source_name_for

    worker = load_yaml("docker-compose.yml")["services"]["worker"]
    assert set(worker["environment"]) >= DEPLOY_VARS
    for key in DEPLOY_VARS:  # `prefect deploy` in the worker: its environment
        monkeypatch.setenv(key, worker["environment"][key])
    resolved = apply_values(deployments(), dict(os.environ))
    mounted = set(image_mounts(worker))
    sources = resolved[ARCHIVE]["parameters"]["sources"]
    per_source = [resolved[name]["parameters"] for name in PER_SOURCE]
    # Both ways name the same two sources, one for each mounted folder.
    assert sources == [{"name": p["source"], "root": p["root"]} for p in per_source]
    assert {source["root"] for source in sources} == mounted
    assert resolved[BY_HAND]["parameters"]["root"] in mounted
    # The folder at /images keeps the name a one-folder database of this stack was given when
    # it became source 1 (sql/migrations.py), so an upgraded stack goes on where it was.
    for source in sources:
        assert source["name"] == source_name_for(source["root"]), source


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
    entrypoints = {
        BY_HAND: "lookalike.flows.process.process_images",
        **{name: "lookalike.flows.process.process_images" for name in (*PER_SOURCE, ARCHIVE)},
        "remove-source": "lookalike.flows.sources.remove_source",
        "rebuild-neighbours": "lookalike.flows.neighbours.rebuild_neighbours",
    }
    assert {name: d["entrypoint"] for name, d in found.items()} == entrypoints
    for name, deployment in found.items():
        assert len(deployment["description"].split()) >= 8, name
        flow = resolve_entrypoint(deployment["entrypoint"])
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment["parameters"]) <= accepted, name
        assert deployment["work_pool"]["name"] == "lookalike"
        assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    # `prefect deployment run 'process-images/process-images'` (and remove-source/remove-source,
    # rebuild-neighbours/rebuild-neighbours) need these names.
    for name in (BY_HAND, "remove-source", "rebuild-neighbours"):
        assert resolve_entrypoint(found[name]["entrypoint"]).name == name


def test_prefect_reads_every_deployment_of_the_file() -> None:
    # Prefect skips a prefect.yaml it cannot validate with a warning, deploying nothing.
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(load_yaml("prefect.yaml"))
    assert [d.name for d in model.deployments] == list(deployments())


def test_prefect_loads_the_entrypoints_from_the_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(tmp_path)  # no source folder here: only the installed package can answer
    for name, deployment in deployments().items():
        flow: Any = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
        assert flow is resolve_entrypoint(deployment["entrypoint"]), name


def flow_parameters(name: str, /, **run: Any) -> dict[str, Any]:
    """The parameters a run of the deployment gets (its own, then the run's -p ones), checked
    as the Prefect server checks them against the flow's schema and as the flow takes them."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    deployment = deployments()[name]
    flow = resolve_entrypoint(deployment["entrypoint"])
    schema = parameter_schema(flow).model_dump_for_openapi()
    validate(deployment["parameters"], schema, raise_on_error=True, ignore_required=True)
    merged = {**deployment["parameters"], **run}
    validate(merged, schema, raise_on_error=True)
    return dict(flow.validate_parameters(merged))


def template_variables(text: Any) -> set[str]:
    return set(re.findall(r"\{\{ \$(\w+) \}\}", str(text)))


def test_one_deployment_per_source_names_its_root_and_source() -> None:
    from lookalike.flows.process import source_specs

    seen = set()
    for name in PER_SOURCE:
        parameters = deployments()[name]["parameters"]
        number = name.rpartition("-")[2]
        assert parameters["root"] == f"{{{{ $LOOKALIKE_SOURCE_{number}_ROOT }}}}"
        assert parameters["source"] == f"{{{{ $LOOKALIKE_SOURCE_{number}_NAME }}}}"
        assert "sources" not in parameters
        taken = flow_parameters(name)
        (spec,) = source_specs(taken["root"], taken["source"], taken["sources"])
        seen.add((spec.name, spec.root))
    assert len(seen) == len(PER_SOURCE)


def test_one_deployment_takes_the_list_of_sources() -> None:
    from lookalike.flows.process import source_specs
    from lookalike.tasks.sources import SourceError, SourceSpec

    parameters = deployments()[ARCHIVE]["parameters"]
    assert "root" not in parameters and "source" not in parameters
    assert [set(entry) for entry in parameters["sources"]] == [{"name", "root"}] * 2
    assert template_variables(parameters["sources"]) == SOURCE_VARS
    taken = flow_parameters(ARCHIVE)
    assert [type(spec) for spec in taken["sources"]] == [SourceSpec, SourceSpec]
    specs = source_specs(taken["root"], taken["source"], taken["sources"])
    assert [(s.name, s.root) for s in specs] == [
        (d["parameters"]["source"], d["parameters"]["root"])
        for d in map(deployments().get, PER_SOURCE)
    ]
    # Why the list lives in a deployment of its own: a run naming a root there is refused.
    merged = flow_parameters(ARCHIVE, root="/other/images")
    with pytest.raises(SourceError, match="not both"):
        source_specs(merged["root"], merged["source"], merged["sources"])


def test_process_images_by_hand_adds_or_updates_the_source_a_run_names() -> None:
    from lookalike.flows.process import source_specs

    parameters = deployments()[BY_HAND]["parameters"]
    assert parameters["root"] == "{{ $LOOKALIKE_IMAGE_ROOT }}"
    assert parameters["source"] is None and parameters["sources"] is None
    # `prefect deployment run process-images/process-images -p root=/other/images`
    taken = flow_parameters(BY_HAND, root="/other/images")
    (spec,) = source_specs(taken["root"], taken["source"], taken["sources"])
    assert (spec.root, spec.name) == ("/other/images", None)  # named after the folder
    taken = flow_parameters(BY_HAND, root="/other/images", source="scans")
    (spec,) = source_specs(taken["root"], taken["source"], taken["sources"])
    assert (spec.root, spec.name) == ("/other/images", "scans")


def test_per_source_schedules_are_staggered_and_the_archives_is_paused() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    found = deployments()
    crons = {}
    for name in (*PER_SOURCE, ARCHIVE):
        (schedule,) = found[name]["schedules"]
        cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        assert cron.cron.split()[2:] == ["*", "*", "*"], name  # every day
        crons[name] = (cron.cron, schedule["active"])
    # Each source is indexed by one active schedule of its own, never by both ways at once:
    # the per-source ones are active, at different times; the list's waits to be resumed.
    assert [active for _, active in crons.values()] == [True, True, False]
    assert crons[PER_SOURCE[0]][0] != crons[PER_SOURCE[1]][0]
    for name in (BY_HAND, "remove-source", "rebuild-neighbours"):
        assert "schedules" not in found[name], name


def test_remove_source_is_run_by_hand_with_a_name() -> None:
    from prefect.utilities.schema_tools.validation import ValidationError

    deployment = deployments()["remove-source"]
    flow = resolve_entrypoint(deployment["entrypoint"])
    assert "name" not in deployment["parameters"]
    assert inspect.signature(flow.fn).parameters["name"].default is inspect.Parameter.empty
    assert flow_parameters("remove-source", name="old-scans")["name"] == "old-scans"
    with pytest.raises(ValidationError, match="'name' is a required property"):
        flow_parameters("remove-source")


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
    for number, name in (("1", "photos"), ("2", "scans")):
        monkeypatch.setenv(f"LOOKALIKE_SOURCE_{number}_NAME", name)
        monkeypatch.setenv(f"LOOKALIKE_SOURCE_{number}_ROOT", f"/srv/{name}")
    config = load_yaml("prefect.yaml")
    assert template_variables(config) == DEPLOY_VARS
    pull = apply_values(config["pull"], dict(os.environ))
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
    found = apply_values(deployments(), dict(os.environ))
    assert found[BY_HAND]["parameters"]["root"] == "/images"
    assert found[ARCHIVE]["parameters"]["sources"] == [
        {"name": "photos", "root": "/srv/photos"},
        {"name": "scans", "root": "/srv/scans"},
    ]
    assert [
        (found[n]["parameters"]["source"], found[n]["parameters"]["root"]) for n in PER_SOURCE
    ] == [
        ("photos", "/srv/photos"),
        ("scans", "/srv/scans"),
    ]


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
