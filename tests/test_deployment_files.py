"""Dockerfile, .dockerignore and compose.yaml checked against the code, without Docker.

Every `pocketllm` command they run must parse with the real command-line parser, and every variable they
set for the server must be a setting. compose.yaml must form the scale-out topology of docs/deployment.md:
PostgreSQL, Redis, S3-compatible storage, a one-shot migration, two API containers and two workers
behind a TLS proxy.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography.fernet import Fernet

from pocketllm.cli import build_parser
from pocketllm.config import Settings

ROOT = Path(__file__).resolve().parent.parent
POCKETLLM_SERVICES = ("migrate", "api", "worker")
SECRET_VARIABLES = ("JWT_SECRET", "ENCRYPTION_KEY", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD")
# `${NAME}`, `${NAME:-default}` and `${NAME:?message}`, as Compose interpolates them.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::(?P<kind>[-?])(?P<text>[^}]*))?\}")


# -- helpers -------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs of the Dockerfile, with continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def instruction_arguments(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions() if name == keyword]


def setting_names() -> set[str]:
    """Return the environment variable names that Settings reads, aliases included."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        names.add(name.upper())
        alias = field.validation_alias
        choices = getattr(alias, "choices", [alias]) if alias is not None else []
        names.update(choice.upper() for choice in choices if isinstance(choice, str))
    return names


def parse_pocketllm_command(command: list[str]) -> Any:
    """Parse a container command with the real `pocketllm` parser, and fail the test on an unknown command or
    option."""
    assert command[0] == "pocketllm", f"{command} does not run pocketllm"
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(command)}` is not a valid pocketllm command (argparse printed why above)")


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return document


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    assert name in services, f"compose.yaml has no {name!r} service"
    definition: dict[str, Any] = services[name]
    return definition


def interpolate(value: str, values: dict[str, str]) -> str:
    """Resolve Compose variables as `docker compose` would with `values` set, then unescape `$$`."""

    def resolve(match: re.Match[str]) -> str:
        name, kind, text = match.group("name"), match.group("kind"), match.group("text")
        if name in values:
            return values[name]
        if kind == "-":
            return text
        raise AssertionError(f"compose.yaml needs {name} and the test gave no value for it")

    return INTERPOLATION.sub(resolve, value).replace("$$", "$")


def sample_secrets() -> dict[str, str]:
    return {
        "JWT_SECRET": "a" * 48,
        "ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "POSTGRES_PASSWORD": "postgres-password-0123",
        "MINIO_ROOT_PASSWORD": "minio-password-0123",
    }


def server_environment(name: str) -> dict[str, str]:
    environment = service(name)["environment"]
    assert isinstance(environment, dict), f"{name}: environment must be a mapping"
    secrets = sample_secrets()
    return {key: interpolate(str(value), secrets) for key, value in environment.items()}


# -- Dockerfile ----------------------------------------------------------------------------------------------


def test_dockerfile_installs_package_from_repository() -> None:
    copies = [shlex.split(arguments) for arguments in instruction_arguments("COPY")]
    sources = [source for *paths, _destination in copies for source in paths if not source.startswith("--")]
    destinations = {copy[-1].rstrip("/") for copy in copies}
    installs = [arguments for arguments in instruction_arguments("RUN") if "pip install" in arguments]

    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
    for needed in ("pyproject.toml", "README.md", "src"):
        assert needed in sources, f"the package build needs {needed}, which the Dockerfile does not copy"
    assert len(installs) == 1
    install_target = shlex.split(installs[0].split("pip install", 1)[1].split("&&")[0])[-1].rstrip("/")
    assert install_target in destinations | {"."}, f"pip installs {install_target}, not the copied repository files"


def test_dockerfile_copies_declared_readme() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.MULTILINE)
    copied = " ".join(instruction_arguments("COPY"))

    assert readme is not None
    assert readme.group(1) in copied


def test_dockerfile_base_image_is_slim_python() -> None:
    base = instruction_arguments("FROM")

    assert len(base) == 1
    assert re.fullmatch(r"python:3\.1[1-9]-slim", base[0]), base[0]


def test_dockerfile_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    users = [arguments for name, arguments in instructions if name == "USER"]
    user_index = max(index for index, (name, _) in enumerate(instructions) if name == "USER")
    install_index = max(index for index, (name, arguments) in enumerate(instructions) if "pip install" in arguments)

    assert users
    assert users[-1] not in {"root", "0", "0:0"}
    assert user_index > install_index, "USER must come after the installation, which needs root"


def test_dockerfile_default_command_serves_exposed_port() -> None:
    commands = instruction_arguments("CMD")
    exposed = instruction_arguments("EXPOSE")

    assert len(commands) == 1
    command = json.loads(commands[0])
    arguments = parse_pocketllm_command(command)
    assert arguments.command == "serve"
    assert arguments.host == "0.0.0.0"  # noqa: S104  (a container must listen on all its interfaces)
    assert exposed == [str(arguments.port)]


def test_dockerfile_healthcheck_requests_health() -> None:
    healthchecks = instruction_arguments("HEALTHCHECK")

    assert len(healthchecks) == 1
    command = json.loads(healthchecks[0].split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]
    code = command[2]
    compile(code, "<HEALTHCHECK>", "exec")
    exposed_port = instruction_arguments("EXPOSE")[0]
    assert f"http://127.0.0.1:{exposed_port}/health'" in code


def test_dockerfile_env_names_are_settings() -> None:
    names = [
        assignment.split("=", 1)[0]
        for arguments in instruction_arguments("ENV")
        for assignment in shlex.split(arguments)
    ]
    server_names = [name for name in names if not name.startswith(("PYTHON", "PIP_"))]

    assert server_names
    unknown = sorted(set(server_names) - setting_names())
    assert unknown == [], f"the Dockerfile sets {unknown}, which are not settings in pocketllm.config.Settings"


def test_dockerignore_keeps_build_files_and_drops_secrets() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/") for pattern in patterns)

    for needed in ("pyproject.toml", "README.md", "src", "src/pocketllm/__init__.py"):
        assert not ignored(needed), f".dockerignore drops {needed}, which the image build needs"
    for secret in (".env", "pocketllm-data", ".venv", ".git"):
        assert ignored(secret), f".dockerignore lets {secret} into the build context"


# -- compose.yaml --------------------------------------------------------------------------------------------


def test_compose_has_scale_out_services() -> None:
    services = compose()["services"]

    for name in ("postgres", "redis", "minio", "create-bucket", "migrate", "api", "worker", "caddy"):
        assert name in services, f"compose.yaml has no {name!r} service"


@pytest.mark.parametrize(("name", "command"), [("migrate", "migrate"), ("api", "serve"), ("worker", "worker")])
def test_compose_commands_are_cli_commands(name: str, command: str) -> None:
    arguments = parse_pocketllm_command(service(name)["command"])

    assert arguments.command == command


def test_compose_api_and_worker_are_separate() -> None:
    api = parse_pocketllm_command(service("api")["command"])

    assert api.no_worker, "the api service must run `serve --no-worker`, because the worker service runs jobs"
    assert api.host == "0.0.0.0"  # noqa: S104  (a container must listen on all its interfaces)


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_runs_two_replicas(name: str) -> None:
    replicas = service(name).get("deploy", {}).get("replicas", 1)

    assert replicas >= 2


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_starts_after_migration(name: str) -> None:
    depends_on = service(name)["depends_on"]

    assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    assert depends_on["create-bucket"]["condition"] == "service_completed_successfully"
    assert server_environment(name)["MIGRATE_ON_START"] == "false"


def test_compose_migration_waits_for_postgres() -> None:
    assert service("migrate")["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service("postgres")["healthcheck"]["test"]


@pytest.mark.parametrize("name", POCKETLLM_SERVICES)
def test_compose_environment_names_are_settings(name: str) -> None:
    unknown = sorted(set(server_environment(name)) - setting_names())

    assert unknown == [], f"{name} sets {unknown}, which are not settings in pocketllm.config.Settings"


@pytest.mark.parametrize("name", POCKETLLM_SERVICES)
def test_compose_environment_passes_production_checks(name: str) -> None:
    values = {key.lower(): value for key, value in server_environment(name).items()}

    settings = Settings(_env_file=None, **values)

    assert settings.is_production
    settings.check_production_safety()
    assert not settings.is_sqlite
    assert settings.redis_url is not None
    assert settings.storage_url is not None
    assert settings.storage_url.startswith("s3://")


def test_compose_secrets_have_no_defaults() -> None:
    text = (ROOT / "compose.yaml").read_text()

    for variable in SECRET_VARIABLES:
        uses = [match for match in INTERPOLATION.finditer(text) if match.group("name") == variable]
        assert uses, f"compose.yaml never uses {variable}"
        for use in uses:
            assert use.group("kind") == "?", f"{use.group(0)} must be required (${{{variable}:?message}})"


def test_compose_urls_point_at_services() -> None:
    environment = server_environment("api")
    postgres = service("postgres")["environment"]
    database = urlsplit(environment["DATABASE_URL"])
    redis = urlsplit(environment["REDIS_URL"])
    storage_endpoint = urlsplit(environment["STORAGE_S3_ENDPOINT"])
    bucket = urlsplit(environment["STORAGE_URL"]).netloc
    bucket_script = "\n".join(service("create-bucket")["command"])

    assert database.scheme == "postgresql+asyncpg"
    assert database.hostname == "postgres"
    assert database.username == postgres["POSTGRES_USER"]
    assert database.path == f"/{postgres['POSTGRES_DB']}"
    assert redis.hostname == "redis"
    assert storage_endpoint.hostname == "minio"
    assert environment["STORAGE_S3_ACCESS_KEY_ID"] == service("minio")["environment"]["MINIO_ROOT_USER"]
    assert f"mc mb --ignore-existing local/{bucket}" in bucket_script


def test_compose_only_proxy_publishes_ports() -> None:
    services = compose()["services"]
    published = sorted(name for name, definition in services.items() if definition.get("ports"))

    assert published == ["caddy"]
    assert "443:443" in service("caddy")["ports"]


def test_compose_proxy_is_trusted_and_reaches_api() -> None:
    document = compose()
    address = ipaddress.ip_address(service("caddy")["networks"]["default"]["ipv4_address"])
    network = document["networks"]["default"]["ipam"]["config"][0]
    caddyfile = document["configs"]["caddyfile"]["content"]
    api_port = parse_pocketllm_command(service("api")["command"]).port

    assert server_environment("api")["TRUSTED_PROXIES"] == str(address)
    assert address in ipaddress.ip_network(network["subnet"])
    assert address not in ipaddress.ip_network(network["ip_range"]), "other containers could be given this address"
    assert re.search(r"^\s*name api$", caddyfile, re.MULTILINE)
    assert re.search(rf"^\s*port {api_port}$", caddyfile, re.MULTILINE)
    assert "respond /metrics* 404" in caddyfile
