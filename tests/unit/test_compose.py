"""compose/: the Dockerfile, the Compose files and haproxy.cfg, checked without Docker.

Every command a karma8 container runs (its ``command``, its healthcheck, the image's
ENTRYPOINT and CMD) must be a real ``karma8`` command with real options; every variable
must be a setting of karma8/config.py that validates; ports, hosts and volumes must agree
with what that configuration makes each process do. The other services (the PostgreSQL
registry, the HAProxy load balancer) must agree with the karma8 ones: the registry URL
with the database, haproxy.cfg's servers with the API services. tests/integration/
test_compose_processes.py runs the karma8 services as plain processes.
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
HAPROXY_CFG = COMPOSE / "haproxy.cfg"
#: The command that adds bucket-9 and bucket-10 to a running stack, as the docs give it.
ADD_BUCKETS = (
    "docker compose -f compose/compose.yaml -f compose/compose.more-buckets.yaml up -d bucket-9 bucket-10"
)
#: Where every container keeps its state (the Dockerfile creates it, owned by its user).
DATA = "/data"
#: The process each service role runs, and the configuration it reads.
ROLES: dict[str, type[ApiConfig] | type[BucketConfig]] = {"api": ApiConfig, "bucket": BucketConfig}
#: The services that run another image than karma8's, and that image: PostgreSQL pinned
#: by its major version (its data directory's format), HAProxy by its minor.
OTHERS = {"postgres": r"postgres:1[56]", "lb": r"haproxy:2\.[89]"}
#: Where the postgres image keeps its database, and the haproxy image reads its config.
PGDATA = "/var/lib/postgresql/data"
HAPROXY_CFG_TARGET = "/usr/local/etc/haproxy/haproxy.cfg"
#: The value of the variables docker compose reads from its own environment.
COMPOSE_ENV = {
    "KARMA8_SECRET": secrets.token_urlsafe(24),
    "KARMA8_DB_PASSWORD": secrets.token_urlsafe(24),
}


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
    """The karma8 services of ``model`` (all but OTHERS); fails on one that is not a karma8 role."""
    found: dict[str, Service] = {}
    for name, raw in model["services"].items():
        if name in OTHERS:
            continue
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


def apis_of(found: Mapping[str, Service]) -> list[Service]:
    return [s for s in found.values() if s.role == "api"]


def api_of(found: Mapping[str, Service]) -> Service:
    """The first API server: the one buckets heartbeat to first."""
    return apis_of(found)[0]


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


#: The keywords that open a section of an HAProxy configuration.
HAPROXY_SECTIONS = frozenset(
    {"global", "defaults", "frontend", "backend", "listen", "resolvers", "peers", "userlist"}
    | {"mailers", "program", "http-errors", "ring", "cache", "log-forward", "crt-store"}
)


@dataclass(frozen=True)
class HaproxySection:
    """One section of an HAProxy configuration: ``backend api`` and its lines, split in words."""

    kind: str
    name: str
    lines: list[list[str]]

    def find(self, *words: str) -> list[list[str]]:
        """The lines that start with ``words``."""
        return [line for line in self.lines if line[: len(words)] == list(words)]


def haproxy_sections(path: Path = HAPROXY_CFG) -> list[HaproxySection]:
    """The sections of ``path``, in order (comments and blank lines left out)."""
    sections: list[HaproxySection] = []
    for text in path.read_text().splitlines():
        words = text.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] in HAPROXY_SECTIONS:
            sections.append(HaproxySection(words[0], " ".join(words[1:]), []))
        else:
            assert sections, f"{path.name}: {text!r} outside any section"
            sections[-1].lines.append(words)
    return sections


def haproxy_proxies(kind: str, path: Path = HAPROXY_CFG) -> dict[str, HaproxySection]:
    """The frontends or backends of ``path``, each with the lines of the ``defaults`` before it."""
    found: dict[str, HaproxySection] = {}
    defaults: list[list[str]] = []
    for section in haproxy_sections(path):
        if section.kind == "defaults":
            defaults = section.lines
        elif section.kind in (kind, "listen"):
            found[section.name] = HaproxySection(section.kind, section.name, [*defaults, *section.lines])
    return found


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
            if name in OTHERS:
                continue
            build = service["build"]
            assert (COMPOSE / build["context"]).resolve() == ROOT, name
            assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
    assert len({s.raw["image"] for s in compose_services(BASE, MORE).values()}) == 1


def test_the_other_images_are_pinned() -> None:
    model = load_compose(BASE, MORE)
    for name, image in OTHERS.items():
        assert re.fullmatch(image, model["services"][name]["image"]), name
        assert "build" not in model["services"][name], name


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


def test_the_secrets_come_from_the_environment_of_docker_compose() -> None:
    for api in apis_of(compose_services(BASE)):
        assert isinstance(api.config, ApiConfig)
        assert api.config.bucket_secret.get_secret_value() == COMPOSE_ENV["KARMA8_SECRET"], api.name
        assert not api.config.insecure
        registry = urlsplit(api.config.registry_url.get_secret_value())
        assert registry.password == COMPOSE_ENV["KARMA8_DB_PASSWORD"], api.name
    for bucket in buckets_of(compose_services(BASE, MORE)):
        assert isinstance(bucket.config, BucketConfig)
        assert bucket.config.secret.get_secret_value() == COMPOSE_ENV["KARMA8_SECRET"], bucket.name
        assert not bucket.config.insecure
    postgres = load_compose(BASE)["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD"] == COMPOSE_ENV["KARMA8_DB_PASSWORD"]
    # Each one is required: docker compose stops, saying which is missing.
    for variable in COMPOSE_ENV:
        without = {k: v for k, v in COMPOSE_ENV.items() if k != variable}
        with pytest.raises(MissingVariable, match=variable):
            load_compose(BASE, environ=without)
    with pytest.raises(MissingVariable, match="KARMA8_SECRET"):
        load_compose(MORE, environ={})


# -- ports, hosts, volumes --------------------------------------------------------------


def _published(raw: Mapping[str, Any]) -> dict[int, str]:
    """Container port -> what it is published on (``8080``, ``127.0.0.1:9090``)."""
    ports: dict[int, str] = {}
    for entry in raw.get("ports") or []:
        if isinstance(entry, dict):
            target, host = entry["target"], f"{entry.get('host_ip', '')}:{entry['published']}"
        else:
            host, _, target = str(entry).rpartition(":")
        ports[int(str(target).split("/")[0])] = host.removeprefix(":")
    return ports


@BOTH
def test_only_the_load_balancer_publishes_a_port(files: Files) -> None:
    model = load_compose(*files)
    # Where clients connected before there were several API servers.
    assert _published(model["services"]["lb"]) == {8080: "8080"}
    for name, raw in model["services"].items():
        if name != "lb":
            assert not _published(raw), f"{name}: reached by service name, through lb for clients"


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
def test_buckets_heartbeat_to_every_api_server_by_service_name(files: Files) -> None:
    found = compose_services(*files)
    apis = apis_of(found)
    membership = [
        f"{api.name}:{api.config.membership_port}" for api in apis if isinstance(api.config, ApiConfig)
    ]
    assert len(membership) == len(apis) > 1
    for bucket in buckets_of(found):
        assert isinstance(bucket.config, BucketConfig)
        assert bucket.config.advertised_host == bucket.name, bucket.name
        # Directly, not through lb: a bucket fails over from one API server to the next.
        listed = [a.strip() for a in bucket.env["KARMA8_BUCKET_API"].split(",")]
        assert listed == membership, bucket.name
        assert bucket.raw["depends_on"] == {api.name: {"condition": "service_started"} for api in apis}


@BOTH
def test_each_bucket_keeps_its_state_on_its_own_named_volume(files: Files) -> None:
    found = compose_services(*files)
    model = load_compose(*files)
    owners: dict[str, str] = {}
    for service in found.values():
        if isinstance(service.config, ApiConfig):
            # Its state is in the registry: the API servers keep nothing of their own.
            assert not service.mounts, f"{service.name}: the API servers share PostgreSQL"
            assert service.config.registry_url.get_secret_value(), service.name
            continue
        assert len(service.mounts) == 1, f"{service.name}: one volume per bucket"
        ((source, target),) = service.mounts
        assert source in model["volumes"], f"{service.name}: {source} is not a named volume"
        assert target == str(service.config.data_dir) == DATA, service.name
        assert source not in owners, f"{service.name} shares {source} with {owners.get(source)}"
        owners[source] = service.name
    postgres = [_mount(v) for v in model["services"]["postgres"]["volumes"]]
    assert len(postgres) == 1
    ((source, target),) = postgres
    assert target == PGDATA
    assert source in model["volumes"], f"postgres: {source} is not a named volume"
    assert source not in owners, f"postgres shares {source} with {owners.get(source)}"
    owners[source] = "postgres"
    assert set(owners) == set(model["volumes"]), "every declared volume is used"


@BOTH
def test_every_service_restarts_and_has_a_healthcheck(files: Files) -> None:
    for name, raw in load_compose(*files)["services"].items():
        assert raw["restart"] == "unless-stopped", name
        assert raw["healthcheck"]["interval"], name
        assert raw["healthcheck"]["test"][0] == "CMD", name


def test_the_stack_has_two_api_servers_and_eight_buckets_and_two_more_can_join() -> None:
    assert [a.name for a in apis_of(compose_services(BASE, MORE))] == ["api-1", "api-2"]
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


# -- the registry and the API servers ---------------------------------------------------


def test_the_registry_is_postgres_with_a_healthcheck() -> None:
    postgres = load_compose(BASE)["services"]["postgres"]
    env = postgres["environment"]
    assert env["POSTGRES_USER"] == env["POSTGRES_DB"] == "karma8"
    test = postgres["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"], test
    # Over TCP, as the API servers connect: the image's first-run setup listens on its
    # Unix socket only, so a socket check would pass before the database is ready.
    assert test[test.index("--host") + 1] == "127.0.0.1"
    assert test[test.index("--username") + 1] == env["POSTGRES_USER"]
    assert test[test.index("--dbname") + 1] == env["POSTGRES_DB"]


def test_the_api_servers_share_the_registry_each_under_its_own_id() -> None:
    model = load_compose(BASE)
    postgres = model["services"]["postgres"]["environment"]
    apis = apis_of(compose_services(BASE))
    assert len(apis) > 1
    urls: set[str] = set()
    for api in apis:
        assert isinstance(api.config, ApiConfig)
        # Stable across restarts and distinct: the service name.
        assert api.config.server_id == api.name
        url = api.config.registry_url.get_secret_value()
        urls.add(url)
        parts = urlsplit(url)
        assert parts.scheme in ("postgresql", "postgres"), url
        assert parts.hostname == "postgres", f"{api.name}: the registry is the postgres service"
        assert parts.port in (None, 5432)
        assert (parts.username, parts.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
        assert parts.path == f"/{postgres['POSTGRES_DB']}"
        assert api.raw["depends_on"] == {"postgres": {"condition": "service_healthy"}}, api.name
    assert len(urls) == 1, "every API server on the same registry"
    assert len({a.config.server_id for a in apis if isinstance(a.config, ApiConfig)}) == len(apis)


# -- the load balancer ------------------------------------------------------------------


def test_the_load_balancer_mounts_haproxy_cfg_read_only() -> None:
    lb = load_compose(BASE)["services"]["lb"]
    (mount,) = lb["volumes"]
    source, target, mode = mount.split(":")
    assert (COMPOSE / source).resolve() == HAPROXY_CFG
    assert (target, mode) == (HAPROXY_CFG_TARGET, "ro")
    apis = apis_of(compose_services(BASE))
    assert lb["depends_on"] == {api.name: {"condition": "service_started"} for api in apis}


def test_the_load_balancer_takes_websockets_on_8080() -> None:
    (frontend,) = haproxy_proxies("frontend").values()
    (published,) = _published(load_compose(BASE)["services"]["lb"])
    assert [line[1] for line in frontend.find("bind")] == [f":{published}"]
    assert frontend.find("mode") == [["mode", "http"]]
    timeouts = {line[1]: line[2] for line in frontend.find("timeout")}
    # A WebSocket is a tunnel once upgraded; its own timeout, not the client's, applies.
    for name in ("client", "server", "connect", "tunnel"):
        assert name in timeouts, f"haproxy.cfg: set timeout {name}"
    assert timeouts["tunnel"] == "1h"


def test_every_api_server_is_a_checked_server_of_every_backend() -> None:
    apis = apis_of(compose_services(BASE))
    backends = haproxy_proxies("backend")
    (frontend,) = haproxy_proxies("frontend").values()
    used = {line[1] for line in frontend.find("default_backend") + frontend.find("use_backend")}
    assert used == set(backends), "every backend is used, and only backends that exist"
    (default,) = (line[1] for line in frontend.find("default_backend"))
    assert backends[default].find("option", "httpchk") == [["option", "httpchk", "GET", "/ready"]]
    for backend in backends.values():
        assert backend.find("mode") == [["mode", "http"]], backend.name
        assert backend.find("balance") == [["balance", "leastconn"]], backend.name
        (check,) = backend.find("option", "httpchk")
        assert check[2:] in (["GET", "/ready"], ["GET", "/healthz"]), backend.name
        defaults = [word for line in backend.find("default-server") for word in line[1:]]
        servers = {line[1]: [*defaults, *line[3:]] for line in backend.find("server")}
        addresses = {line[1]: line[2] for line in backend.find("server")}
        assert set(servers) == {api.name for api in apis}, backend.name
        for api in apis:
            assert isinstance(api.config, ApiConfig)
            assert addresses[api.name] == f"{api.name}:{api.config.port}", backend.name
            options = servers[api.name]
            assert "check" in options, f"{backend.name}/{api.name}"
            # The checks ask the metrics endpoint, where /ready and /healthz are.
            assert options[options.index("port") + 1] == str(api.config.metrics_port), api.name


def _haproxy() -> str | None:
    return shutil.which("haproxy")


@pytest.mark.skipif(_haproxy() is None, reason="haproxy is not installed")
def test_haproxy_accepts_its_configuration() -> None:
    result = subprocess.run(
        [str(_haproxy()), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
    assert set(json.loads(result.stdout)["services"]) == set(load_compose(BASE, MORE)["services"])
