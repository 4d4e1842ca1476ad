"""compose/: the Dockerfile and the Compose files, checked without Docker.

Every command a container runs (its ``command``, its healthcheck, the image's
ENTRYPOINT and CMD) must be a real ``karma8`` command with real options; every variable
must be a setting of karma8/config.py that validates; ports, hosts and volumes must agree
with what that configuration makes each process do. tests/integration/
test_compose_processes.py runs the same services as plain processes.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.core
import typer.main
import yaml
from typer.testing import CliRunner

from karma8.cli import app
from karma8.config import SECTIONS, ApiConfig, BucketConfig, load

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "compose"
DOCKERFILE = COMPOSE / "Dockerfile"
BASE = COMPOSE / "compose.yaml"
MORE = COMPOSE / "compose.more-buckets.yaml"
#: The command that adds bucket-9 and bucket-10 to a running stack, as the docs give it.
ADD_BUCKETS = (
    "docker compose -f compose/compose.yaml -f compose/compose.more-buckets.yaml up -d bucket-9 bucket-10"
)
#: Where every container keeps its state (the Dockerfile creates it, owned by its user).
DATA = "/data"
#: The process each service role runs, and the configuration it reads.
ROLES: dict[str, type[ApiConfig] | type[BucketConfig]] = {"api": ApiConfig, "bucket": BucketConfig}
#: The value of the variables docker compose reads from its own environment.
COMPOSE_ENV = {"KARMA8_SECRET": secrets.token_urlsafe(24)}


# -- reading the files -----------------------------------------------------------------


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is not set: docker compose refuses the file."""


_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?+])([^}]*))?\}|(\w+))")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Docker Compose's ``$VAR``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$`` (and friends)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        name = match.group(2) or match.group(5)
        operator, argument = match.group(3), match.group(4)
        value = environ.get(name)
        unset = value is None or (value == "" and operator is not None and operator.startswith(":"))
        if operator is None:
            return value or ""
        if operator.endswith("-"):
            return argument if unset or value is None else value
        if operator.endswith("?"):
            if unset or value is None:
                raise MissingVariable(f"{name}: {argument}")
            return value
        return "" if unset else argument  # ":+" / "+"

    return _VARIABLE.sub(substitute, text)


def _interpolated(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, environ)
    if isinstance(node, list):
        return [_interpolated(item, environ) for item in node]
    if isinstance(node, dict):
        return {key: _interpolated(value, environ) for key, value in node.items()}
    return node


def load_compose(*paths: Path, environ: Mapping[str, str] = COMPOSE_ENV) -> dict[str, Any]:
    """The services and volumes of ``paths`` as ``docker compose -f A -f B`` sees them.

    The files here only add services and volumes to each other, so merging them is a
    union; a name defined twice fails (it would need Compose's merge rules).
    """
    model: dict[str, Any] = {"services": {}, "volumes": {}}
    for path in paths:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict), path
        unknown = {k for k in data if not k.startswith("x-")} - {"name", "services", "volumes"}
        assert not unknown, f"{path.name}: unexpected top-level keys {sorted(unknown)}"
        data = _interpolated({k: v for k, v in data.items() if not k.startswith("x-")}, environ)
        for table in ("services", "volumes"):
            added = data.get(table) or {}
            twice = set(added) & set(model[table])
            assert not twice, f"{path.name} redefines {table} {sorted(twice)}"
            model[table].update(added)
    return model


@dataclass(frozen=True)
class Service:
    """One service of a Compose file, with the configuration its process would load."""

    name: str
    raw: dict[str, Any]
    #: The karma8 arguments (the image's ENTRYPOINT is ``karma8``).
    argv: list[str]
    env: dict[str, str]
    config: ApiConfig | BucketConfig
    #: (source, target) of each mount.
    mounts: list[tuple[str, str]]
    #: The karma8 arguments of the healthcheck.
    health: list[str]

    @property
    def role(self) -> str:
        return self.argv[0]


def _mount(entry: str | dict[str, Any]) -> tuple[str, str]:
    if isinstance(entry, dict):
        assert entry.get("type", "volume") == "volume", entry
        return str(entry["source"]), str(entry["target"])
    source, target, *_mode = entry.split(":")
    return source, target


def services(model: Mapping[str, Any]) -> dict[str, Service]:
    """Every service of ``model``; fails on one that is not a karma8 role."""
    found: dict[str, Service] = {}
    for name, raw in model["services"].items():
        argv = raw.get("command")
        assert isinstance(argv, list), f"{name}: command must be a list"
        assert argv, f"{name}: command must not be empty"
        assert argv[0] in ROLES, f"{name}: runs {argv[0]!r}, not one of {sorted(ROLES)}"
        environment = raw.get("environment") or {}
        assert isinstance(environment, dict), f"{name}: environment must be a mapping"
        assert None not in environment.values(), f"{name}: every variable needs a value"
        env = {str(k): str(v) for k, v in environment.items()}
        test = (raw.get("healthcheck") or {}).get("test")
        assert isinstance(test, list), f"{name}: healthcheck test must be a list"
        assert test[:2] == ["CMD", "karma8"], f"{name}: healthcheck {test!r}"
        found[name] = Service(
            name=name,
            raw=raw,
            argv=[str(a) for a in argv],
            env=env,
            config=load(ROLES[argv[0]], environ=env),
            mounts=[_mount(v) for v in raw.get("volumes") or []],
            health=[str(a) for a in test[2:]],
        )
    return found


def api_of(found: Mapping[str, Service]) -> Service:
    (api,) = (s for s in found.values() if s.role == "api")
    return api


def buckets_of(found: Mapping[str, Service]) -> list[Service]:
    return [s for s in found.values() if s.role == "bucket"]


def port_fields(config: ApiConfig | BucketConfig) -> list[str]:
    """The keys of ``config`` that are a port it listens on."""
    return [k for k in type(config).model_fields if k == "port" or k.endswith("_port")]


def _command(name: str) -> Any:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    assert name in group.commands, f"karma8 has no command {name!r} (it has {sorted(group.commands)})"
    return group.commands[name]


def check_cli(args: Sequence[str]) -> None:
    """Fail unless ``karma8 ARGS`` names a real subcommand with real options and values."""
    name, *rest = args
    command = _command(name)
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")}
    used = {a.split("=", 1)[0] for a in rest if a.startswith("-")}
    assert used <= known, f"karma8 {name} has no option {sorted(used - known)} (it has {sorted(known)})"
    command.make_context(name, list(rest))  # parses the values too: types, arguments


def cli_variables(name: str) -> set[str]:
    """The variables that options of ``karma8 NAME`` read (``--log-format``: KARMA8_LOG_FORMAT)."""
    found: set[str] = set()
    for param in _command(name).params:
        envvar = param.envvar
        found.update([envvar] if isinstance(envvar, str) else envvar or [])
    return found


def dockerfile(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (pending + line).strip().partition(" ")
        instructions.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def dockerignored(path: str, patterns: Sequence[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last matching pattern wins)."""
    ignored = False
    parts = path.split("/")
    for line in patterns:
        keep = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        if any(
            fnmatch.fnmatchcase("/".join(parts[:i]), p) for i in range(1, len(parts) + 1) for p in candidates
        ):
            ignored = not keep
    return ignored


@functools.cache
def compose_services(*paths: Path) -> dict[str, Service]:
    """The services of ``paths`` (``docker compose -f A -f B``), with COMPOSE_ENV."""
    return services(load_compose(*paths))


#: Run a test on compose.yaml alone, and with compose.more-buckets.yaml added.
BOTH = pytest.mark.parametrize("files", [(BASE,), (BASE, MORE)], ids=["compose.yaml", "more-buckets"])
Files = tuple[Path, ...]


# -- the image --------------------------------------------------------------------------


def test_the_image_is_slim_python_and_runs_karma8_as_a_user() -> None:
    instructions = dockerfile()
    assert [a for i, a in instructions if i == "FROM"] == ["python:3.11-slim"]
    entrypoint = [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"]
    assert entrypoint == [["karma8"]]  # exec form: signals reach karma8 itself
    users = [a for i, a in instructions if i == "USER"]
    assert users, "the image must not run as root"
    assert users[-1] not in ("root", "0")
    assert any(i == "RUN" and "pip install --no-cache-dir" in a for i, a in instructions), (
        "install the package without keeping pip's cache"
    )


def test_the_default_command_works() -> None:
    (cmd,) = [json.loads(a) for i, a in dockerfile() if i == "CMD"]
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 0, result.output


def test_the_data_directory_belongs_to_the_user() -> None:
    instructions = dockerfile()
    user = [a for i, a in instructions if i == "USER"][-1]
    assert ("WORKDIR", DATA) in instructions
    assert any(i == "RUN" and f"-o {user}" in a and a.split()[-1] == DATA for i, a in instructions), (
        f"{DATA} must be created owned by {user} (an empty named volume copies its owner)"
    )


def test_the_build_context_holds_only_the_package() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (
        "pyproject.toml",
        "README.md",
        "karma8/cli.py",
        "karma8/py.typed",
        "karma8/rpc/gen/__init__.py",
    ):
        assert not dockerignored(needed, patterns), needed
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "karma8-data/api/registry.sqlite3",
        "data/bucket-1/bucket-id",
        ".mypy_cache/3.11/x.json",
        "karma8/__pycache__/cli.cpython-311.pyc",
        "tests/unit/test_compose.py",
    ):
        assert dockerignored(left_out, patterns), left_out


def test_every_service_builds_and_runs_the_same_image() -> None:
    for raw in (yaml.safe_load(p.read_text()) for p in (BASE, MORE)):
        for name, service in raw["services"].items():
            build = service["build"]
            assert (COMPOSE / build["context"]).resolve() == ROOT, name
            assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
    assert len({s.raw["image"] for s in compose_services(BASE, MORE).values()}) == 1


# -- commands and settings --------------------------------------------------------------


@BOTH
def test_every_command_is_a_karma8_command(files: Files) -> None:
    found = compose_services(*files)
    for service in found.values():
        check_cli(service.argv)
        check_cli(service.health)


@BOTH
def test_configuration_comes_only_from_karma8_variables(files: Files) -> None:
    found = compose_services(*files)
    known = {
        *(f"{cls.env_prefix}{key.upper()}" for cls in SECTIONS for key in cls.model_fields),
        *(alias for cls in SECTIONS for alias in cls.env_aliases),
    }
    for service in found.values():
        read = cli_variables(service.role)  # KARMA8_LOG_FORMAT
        unknown = set(service.env) - known - read
        assert not unknown, f"{service.name}: not karma8 settings: {sorted(unknown)}"
        # Other roles' variables would be ignored silently; a role reads only its prefix.
        prefix = ROLES[service.role].env_prefix
        stray = {k for k in service.env if not k.startswith(prefix)} - read
        assert not stray, f"{service.name}: variables of another role: {sorted(stray)}"
        assert service.env.get("KARMA8_LOG_FORMAT") == "json", f"{service.name}: logs as JSON lines"
        options = {a.split("=", 1)[0] for a in service.argv if a.startswith("-")}
        assert options <= {"--log-level"}, f"{service.name}: settings belong in the environment"


def test_the_secret_comes_from_the_environment_of_docker_compose() -> None:
    api = api_of(compose_services(BASE)).config
    assert isinstance(api, ApiConfig)
    assert api.bucket_secret.get_secret_value() == COMPOSE_ENV["KARMA8_SECRET"]
    assert not api.insecure
    for bucket in buckets_of(compose_services(BASE, MORE)):
        assert isinstance(bucket.config, BucketConfig)
        assert bucket.config.secret.get_secret_value() == COMPOSE_ENV["KARMA8_SECRET"], bucket.name
        assert not bucket.config.insecure
    for path in (BASE, MORE):
        with pytest.raises(MissingVariable, match="KARMA8_SECRET"):
            load_compose(path, environ={})


# -- ports, hosts, volumes --------------------------------------------------------------


def _published(service: Service) -> set[int]:
    ports: set[int] = set()
    for entry in service.raw.get("ports") or []:
        target = entry["target"] if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


@BOTH
def test_published_ports_are_the_ports_the_api_serves(files: Files) -> None:
    found = compose_services(*files)
    api = api_of(found)
    assert isinstance(api.config, ApiConfig)
    served = {api.config.port, api.config.metrics_port}
    assert _published(api) == served, f"{api.name} publishes {sorted(_published(api))}, serves {served}"
    for bucket in buckets_of(found):
        assert not _published(bucket), f"{bucket.name}: buckets are reached by service name"


@BOTH
def test_servers_bind_every_interface(files: Files) -> None:
    found = compose_services(*files)
    for service in found.values():
        for key in type(service.config).model_fields:
            if key == "host" or (key.endswith("_host") and key != "advertise_host"):
                assert getattr(service.config, key) == "0.0.0.0", f"{service.name}: {key}"


@BOTH
def test_healthchecks_ask_the_ports_the_services_serve(files: Files) -> None:
    found = compose_services(*files)
    for service in found.values():
        (url,) = (a for a in service.health[1:] if not a.startswith("-"))
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1", f"{service.name}: the check runs inside the container"
        if isinstance(service.config, ApiConfig):
            assert (parts.scheme, parts.port, parts.path) == ("http", service.config.metrics_port, "/ready")
        else:
            assert (parts.scheme, parts.port) == ("grpc", service.config.port), service.name


@BOTH
def test_buckets_are_reached_by_service_name(files: Files) -> None:
    found = compose_services(*files)
    api = api_of(found)
    assert isinstance(api.config, ApiConfig)
    for bucket in buckets_of(found):
        assert isinstance(bucket.config, BucketConfig)
        assert bucket.config.advertised_host == bucket.name, bucket.name
        assert bucket.config.api == f"{api.name}:{api.config.membership_port}", bucket.name
        assert bucket.raw["depends_on"] == {api.name: {"condition": "service_started"}}, bucket.name


@BOTH
def test_each_service_keeps_its_state_on_its_own_named_volume(files: Files) -> None:
    found = compose_services(*files)
    model = load_compose(*files)
    owners: dict[str, str] = {}
    for service in found.values():
        assert len(service.mounts) == 1, f"{service.name}: one volume per service"
        ((source, target),) = service.mounts
        assert source in model["volumes"], f"{service.name}: {source} is not a named volume"
        assert target == str(service.config.data_dir) == DATA, service.name
        assert source not in owners, f"{service.name} shares {source} with {owners.get(source)}"
        owners[source] = service.name
    assert set(owners) == set(model["volumes"]), "every declared volume is used"


@BOTH
def test_every_service_restarts_and_has_a_healthcheck(files: Files) -> None:
    found = compose_services(*files)
    for service in found.values():
        assert service.raw["restart"] == "unless-stopped", service.name
        assert service.raw["healthcheck"]["interval"], service.name


def test_the_stack_has_an_api_and_eight_buckets_and_two_more_can_join() -> None:
    assert [b.name for b in buckets_of(compose_services(BASE))] == [f"bucket-{i}" for i in range(1, 9)]
    assert [b.name for b in buckets_of(compose_services(BASE, MORE))] == [f"bucket-{i}" for i in range(1, 11)]
    api = api_of(compose_services(BASE)).config
    assert isinstance(api, ApiConfig)
    # Every fragment of a file (data and parity) on a bucket of its own: new files get
    # their full protection, not parity owed to repair (docs/durability.md).
    assert len(buckets_of(compose_services(BASE))) == api.parts + api.parity
    # The added buckets hold none of a file stored before: a lost bucket's fragments can
    # be rebuilt on them.
    assert len(buckets_of(compose_services(BASE, MORE))) > api.parts + api.parity


def test_the_added_buckets_are_defined_like_the_others() -> None:
    """The override file repeats the bucket definition (anchors do not cross files)."""

    def shape(service: Service) -> dict[str, Any]:
        raw = dict(service.raw)
        raw["environment"] = {**raw["environment"], "KARMA8_BUCKET_ADVERTISE_HOST": "NAME"}
        raw["volumes"] = [f"VOLUME:{target}" for _, target in service.mounts]
        return raw

    first = shape(compose_services(BASE, MORE)["bucket-1"])
    for bucket in buckets_of(compose_services(BASE, MORE)):
        assert shape(bucket) == first, f"{bucket.name} differs from bucket-1"


# -- docs and recipes -------------------------------------------------------------------


def _recipes() -> dict[str, tuple[str, list[str]]]:
    """justfile recipe name -> (its comment, its body lines)."""
    recipes: dict[str, tuple[str, list[str]]] = {}
    comment, name = "", ""
    for line in (ROOT / "justfile").read_text().splitlines():
        if line.startswith("#"):
            comment = line.lstrip("# ")
        elif header := re.match(r"([a-z][\w-]*)[^:=]*:(?!=)", line):
            name = header.group(1)
            recipes[name] = (comment, [])
        elif line.startswith((" ", "\t")) and name:
            recipes[name][1].append(line.strip())
        else:
            comment, name = "", ""
    return recipes


def test_the_docs_and_the_justfile_give_the_same_commands() -> None:
    recipes = _recipes()
    for name in ("up", "down", "logs", "add-buckets", "dev", "test", "check", "proto", "bench", "chaos"):
        assert name in recipes, f"just {name} is missing"
    for name, (comment, _) in recipes.items():
        assert comment, f"just {name} has no comment (just --list shows it)"
    assert ADD_BUCKETS in recipes["add-buckets"][1]
    for doc in ("README.md", "docs/operations.md", "compose/compose.more-buckets.yaml"):
        assert ADD_BUCKETS in (ROOT / doc).read_text(), doc
    # CI, `just test` and the README run the same script.
    assert recipes["test"][1] == ["scripts/test.sh {{ARGS}}"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "just up" in (ROOT / "README.md").read_text()


def _docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return result.returncode == 0


@pytest.mark.skipif(not _docker_compose(), reason="docker compose is not installed")
def test_docker_compose_accepts_the_files() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(BASE), "-f", str(MORE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **COMPOSE_ENV},
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)["services"]) == set(compose_services(BASE, MORE))
