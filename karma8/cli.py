"""The ``karma8`` command line (typer).

Errors are one line on stderr and a non-zero exit status, never a traceback.

Modules beyond typer are imported by the commands that use them, so that a command
that does little starts fast (``karma8 health`` runs every few seconds in containers).
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from karma8.cli_registry import registry_app
from karma8.errors import Karma8Error
from karma8.logs import FORMATS, configure_logging

if TYPE_CHECKING:
    from karma8.client import Client, FileInfo, Progress

app = typer.Typer(
    name="karma8",
    help="karma8: a distributed file store. Files are cut into parts on distinct buckets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(registry_app, name="registry")

T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")]
LogFormatOpt = Annotated[
    str,
    typer.Option("--log-format", envvar="KARMA8_LOG_FORMAT", help="text (default) or json (JSON lines)."),
]
MetricsPortOpt = Annotated[
    int | None, typer.Option(help="Port of /metrics, /healthz and /ready (0: any free port).")
]
ApiOpt = Annotated[
    str | None, typer.Option("--api", help="API server URL (env KARMA8_API, default ws://127.0.0.1:8080).")
]


def fail(message: str, status: int = 1) -> NoReturn:
    """Print one error line and exit."""
    typer.echo(f"karma8: error: {message}", err=True)
    raise typer.Exit(status)


@contextmanager
def _errors_as_one_line() -> Iterator[None]:
    try:
        yield
    except Karma8Error as exc:
        fail(f"{exc.code}: {exc.message}" if exc.code not in ("config", "stack") else exc.message)
    except OSError as exc:  # a local file: missing source, unwritable destination, ...
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    except KeyboardInterrupt:
        typer.echo("karma8: interrupted", err=True)
        raise typer.Exit(130) from None


def _configure_logging(level: str, role: str, log_format: str) -> None:
    if log_format not in FORMATS:
        fail(f"--log-format (or KARMA8_LOG_FORMAT) must be {' or '.join(FORMATS)}, not {log_format!r}")
    try:
        configure_logging(level, role, log_format)
    except ValueError:
        fail(f"--log-level must be debug, info, warning or error, not {level!r}")


async def _until_signal(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives, then let it clean up.

    The receiver stays open until ``main`` has finished its cleanup, so a second Ctrl-C
    (or a SIGTERM after a SIGINT) cannot interrupt the shutdown half-way.
    """
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            async def run() -> None:
                await main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(run)


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    import trio

    with _errors_as_one_line():
        try:
            return trio.run(fn)
        except BaseExceptionGroup as group:
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            if isinstance(first, Karma8Error | KeyboardInterrupt | OSError):
                raise first from group
            raise


def _client(config: Path | None, api: str | None) -> Client:
    from karma8.client import Client
    from karma8.config import ClientConfig, load

    with _errors_as_one_line():
        return Client(load(ClientConfig, config, api=api))


# -- servers ---------------------------------------------------------------------------


@app.command()
def up(
    buckets: Annotated[int | None, typer.Option(help="Number of buckets (default 8).")] = None,
    data: Annotated[Path | None, typer.Option(help="Data directory (default ./karma8-data).")] = None,
    port: Annotated[int | None, typer.Option(help="WebSocket port (default 8080).")] = None,
    workers: Annotated[int | None, typer.Option(help="API processes (default: one per core).")] = None,
    registry: Annotated[
        str | None, typer.Option(help="postgresql:// URL of the registry (default: SQLite in DATA/api).")
    ] = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = "warning",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run the local stack: an API server (a process per core) and N buckets as child processes."""
    import trio

    from karma8.config import StackConfig, load
    from karma8.stack import run_stack

    with _errors_as_one_line():
        cfg = load(
            StackConfig, config, buckets=buckets, data=data, port=port, api_workers=workers, registry=registry
        )
    _configure_logging(log_level, "up", log_format)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_stack, cfg, log_level, config, log_format)
            typer.echo(f"karma8 is up: {info.url} ({info.buckets} buckets, data in {info.data})")
            if info.metrics_url is not None:
                typer.echo(f"Metrics: {info.metrics_url}")
            typer.echo("Ctrl-C stops it.")

    _run(functools.partial(_until_signal, main))
    typer.echo("karma8 stopped.", err=True)


@app.command()
def api(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="WebSocket port.")] = None,
    membership_port: Annotated[int | None, typer.Option(help="Port buckets register on.")] = None,
    metrics_port: MetricsPortOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="Directory of the registry.")] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Write bound ports here.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="API processes sharing the ports and the registry (one per core).")
    ] = None,
    server_id: Annotated[
        str | None, typer.Option(help="This server's name among those sharing the registry.")
    ] = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run the API server (with --workers N, N processes on one port)."""
    from karma8.api.app import serve_api
    from karma8.config import ApiConfig, load

    with _errors_as_one_line():
        cfg = load(
            ApiConfig,
            config,
            host=host,
            port=port,
            membership_port=membership_port,
            metrics_port=metrics_port,
            data_dir=data_dir,
            ready_file=ready_file,
            workers=workers,
            server_id=server_id,
        )
    _configure_logging(log_level, "api", log_format)
    if cfg.workers > 1 and not cfg.share_ports:
        from karma8.workers import run_workers

        _run(
            functools.partial(
                _until_signal, functools.partial(run_workers, cfg, config, log_level, log_format)
            )
        )
        return
    if cfg.share_ports:
        from karma8.workers import serve_worker

        _run(functools.partial(_until_signal, functools.partial(serve_worker, cfg)))
        return
    _run(functools.partial(_until_signal, functools.partial(serve_api, cfg)))


@app.command()
def bucket(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (0: any free port).")] = None,
    metrics_port: MetricsPortOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="Fragment directory.")] = None,
    api: Annotated[
        str | None, typer.Option("--api", help="host:port of the API server's membership endpoint.")
    ] = None,
    capacity: Annotated[str | None, typer.Option(help="Capacity, e.g. 100GiB.")] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Write the bound ports here.")] = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run a bucket server."""
    from karma8.bucket.app import run_bucket
    from karma8.config import BucketConfig, load

    with _errors_as_one_line():
        cfg = load(
            BucketConfig,
            config,
            host=host,
            port=port,
            metrics_port=metrics_port,
            data_dir=data_dir,
            api=api,
            capacity=capacity,
            ready_file=ready_file,
        )
    _configure_logging(log_level, "bucket", log_format)
    with _errors_as_one_line():
        run_bucket(cfg)


@app.command()
def health(
    target: Annotated[
        str,
        typer.Argument(
            help="http://HOST:PORT/PATH (healthy: status 200) or grpc://HOST:PORT (healthy: SERVING)."
        ),
    ],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 3.0,
) -> None:
    """Check a server, for container health checks: exit status 0 if healthy, else 1.

    http:// asks for one URL, such as the /ready or /healthz of an API server or a
    bucket. grpc:// calls the standard gRPC health check (grpc.health.v1.Health/Check)
    of the whole server, as a bucket serves it (no secret needed).
    """
    from karma8.cli_health import ProbeFailed, probe

    try:
        line = probe(target, timeout)
    except ProbeFailed as exc:
        fail(str(exc))
    typer.echo(line)


# -- client commands -------------------------------------------------------------------


@contextmanager
def _progress(label: str) -> Iterator[Progress | None]:
    """A rich progress bar on a terminal; None (no bar) otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    with Bar(
        f"[bold]{label}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


@app.command()
def upload(
    src: Annotated[Path, typer.Argument(help="File to upload.")],
    name: Annotated[str | None, typer.Option(help="Name to store it as (default: the file name).")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 (checked before commit).")] = None,
    api: ApiOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Upload a file."""
    client = _client(config, api)

    async def main() -> FileInfo:
        with _progress(f"upload {src.name}") as progress:
            return await client.upload(src, name, sha256=sha256, progress=progress)

    info = _run(main)
    typer.echo(f"{info.name}  {info.size} bytes  sha256 {info.sha256}")


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="Name of the stored file.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Destination (default: last segment of NAME).")
    ] = None,
    api: ApiOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Download a file (written to a temporary file, renamed once verified)."""
    client = _client(config, api)
    dst = out if out is not None else Path(name.rsplit("/", 1)[-1] or "download")
    if dst.is_dir():
        dst = dst / name.rsplit("/", 1)[-1]

    async def main() -> FileInfo:
        with _progress(f"download {name}") as progress:
            return await client.download(name, dst, progress=progress)

    info = _run(main)
    typer.echo(f"{dst}  {info.size} bytes  sha256 {info.sha256}")


@app.command("ls")
def list_files(
    prefix: Annotated[str, typer.Argument(help="Only names starting with this.")] = "",
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Every name under PREFIX, not one level.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line.")] = False,
    api: ApiOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List stored files one level deep, as `aws s3 ls` does: the files under PREFIX whose
    name has no further `/`, and `PRE dir/` for each deeper level (all names with -r).
    Prints page by page as they arrive."""
    client = _client(config, api)

    async def main() -> None:
        async for entry in client.walk(prefix, delimiter="" if recursive else "/"):
            if as_json:
                typer.echo(json.dumps(entry, sort_keys=True))
            elif "prefix" in entry:
                typer.echo(f"{'PRE':>14}  {'':12}  {entry['prefix']}")
            else:
                typer.echo(f"{entry['size']:>14}  {entry['sha256'][:12]}  {entry['name']}")

    _run(main)


@app.command()
def stat(
    name: Annotated[str, typer.Argument(help="Name of the stored file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    api: ApiOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show a file: size, sha256, scheme, health, and each fragment's role, bucket and state."""
    from karma8.cli_report import print_stat

    st = _run(functools.partial(_client(config, api).stat, name))
    if as_json:
        _print_json(st)
    else:
        print_stat(st)


@app.command("rm")
def remove(
    name: Annotated[str, typer.Argument(help="Name of the stored file.")],
    api: ApiOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Delete a file."""
    _run(functools.partial(_client(config, api).delete, name))
    typer.echo(f"deleted {name}")


@app.command()
def verify(
    name: Annotated[str, typer.Argument(help="Only this file (default: every file).")] = "",
    api: ApiOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Scrub: read every fragment and report damaged ones (exit status 1 if any)."""
    report = _run(functools.partial(_client(config, api).verify, name))
    for d in report["damaged"]:
        typer.echo(f"DAMAGED {d['name']} part {d['part']} on bucket {d['bucket']}: {d['problem']}")
    typer.echo(
        f"checked {report['files']} file(s), {report['fragments']} fragment(s): "
        f"{len(report['damaged'])} damaged"
    )
    if report["damaged"]:
        raise typer.Exit(1)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    api: ApiOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show the buckets, the spread, the rebalancer, the protection of files and the repair queue."""
    from karma8.cli_report import (
        human_size,
        percent,
        protection_lines,
        rebalancer_line,
        servers_line,
        spread_text,
    )

    st = _run(_client(config, api).status)
    if as_json:
        _print_json(st)
        return
    typer.echo(f"{st['live']} live bucket(s), {st['parts']} parts per file")
    typer.echo(
        f"{'bucket':<18}{'address':<24}{'live':<6}{'used':>11}{'free':>11}{'capacity':>11}"
        f"{'fill':>8}{'frags':>8}"
    )
    for b in st["buckets"]:
        typer.echo(
            f"{b['id']:<18}{b['address']:<24}{'yes' if b['live'] else 'NO':<6}"
            f"{human_size(b['used']):>11}{human_size(b['free']):>11}{human_size(b['capacity']):>11}"
            f"{percent(b.get('fill')):>8}{b['fragments']:>8}"
        )
    typer.echo(f"spread: {spread_text(st.get('spread'))} (fullest / emptiest fill of the live buckets)")
    typer.echo(rebalancer_line(st.get("rebalancer")))
    for line in protection_lines(st):
        typer.echo(line)
    if (servers := servers_line(st)) is not None:
        typer.echo(servers)


@app.command("repair")
def repair_cmd(
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Start and return at once.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    api: ApiOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Repair now: rebuild lost, damaged and owed fragments, most at-risk files first.

    The repairs run in the API server (they also run by themselves); this command asks
    for every queued file to be tried now and shows the progress until the queue is
    empty. Ctrl-C stops watching, not the repairs. Exit status 1 if files are left that
    cannot be repaired now (too few buckets or readable fragments).
    """
    from karma8.cli_report import RepairWatch, repair_line

    client = _client(config, api)
    summary = _run(client.repair)
    if no_wait:
        if as_json:
            _print_json(summary)
        else:
            typer.echo(f"repair: {summary['files']} file(s) queued; started")
        return
    watch = RepairWatch(client)
    _run(watch.run)
    final = watch.status
    if as_json:
        _print_json(final)
    else:
        typer.echo(repair_line(final))
    if final["files"]:
        raise typer.Exit(1)


@app.command("rebalance")
def rebalance_cmd(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; move nothing.")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Start the run and return at once.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    api: ApiOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Even out the buckets: move fragments from the fullest to the emptiest.

    The moves run in the API server; this command shows their progress.
    Ctrl-C stops watching, not the rebalance.
    Exit status 1 if any move failed.
    """
    from karma8.cli_report import (
        Watch,
        moving_text,
        placed_spread,
        plan_summary,
        print_plan,
        run_summary,
        spread_text,
    )

    client = _client(config, api)
    if dry_run:
        plan = _run(functools.partial(client.rebalance, dry_run=True))
        if as_json:
            _print_json(plan)
        else:
            print_plan(plan)
        return

    async def request() -> tuple[dict[str, Any], dict[str, Any]]:
        # The rebalancer before the request tells its run from earlier ones.
        before: dict[str, Any] = (await client.status())["rebalancer"]
        return before, await client.rebalance()

    before, reply = _run(request)
    under_way = before["state"] == "moving"
    if not reply["started"] and not under_way:
        if as_json:
            _print_json(reply)
        else:
            typer.echo(f"nothing to move (spread {spread_text(reply['spread'])})")
        return
    if not as_json:
        if under_way:  # the run under way goes on with the plan; this command watches it
            typer.echo(f"a rebalance is under way ({before['reason']}): {moving_text(before)}")
        else:
            typer.echo(f"rebalance started: {plan_summary(reply)}")
    if no_wait:
        if as_json:
            _print_json(reply)
        else:
            typer.echo("it runs in the API server: karma8 status shows its progress")
        return

    watch = Watch(client, before)
    _run(functools.partial(_until_signal, watch.run))
    if watch.status is None:
        typer.echo(
            "karma8: stopped watching; the rebalance goes on in the server (karma8 status shows it)",
            err=True,
        )
        raise typer.Exit(130)
    run = watch.run_result
    now = placed_spread(watch.status)
    spread = spread_text(now)
    if as_json:
        _print_json({**reply, "run": run, "spread_now": now})
    elif run is None:
        typer.echo(f"nothing left to move; spread now {spread}")
    else:
        typer.echo(f"{run_summary(run)}; spread now {spread}")
    if run is not None and run["failed"]:
        raise typer.Exit(1)


def main() -> None:
    """Console entry point."""
    from karma8 import speedups

    speedups.tune_malloc()  # before the first large buffer: see karma8.speedups
    app()
