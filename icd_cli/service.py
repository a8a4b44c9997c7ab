"""The service commands: `icd serve`, `icd worker`, `icd check-worker`, `icd db upgrade|current`.

Nothing here imports torch: the service commands start fast, and a parent process that forks or
spawns GPU workers must never have initialised CUDA.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import click

EMBEDDED_WORKER = "embedded@{host}"


def _settings() -> Any:
    """Fresh settings from the current environment (after this command set its own defaults)."""
    from store.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- icd serve ----------------------------------------------------------------------------------


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--no-worker", is_flag=True, help="API only (production: workers run on GPU hosts via `icd worker`).")
@click.option(
    "--stop-grace",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds the local worker gets to checkpoint its job on shutdown.",
)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1, 1024),
    help="torch threads of the local worker [default: ICD_WORKER_THREADS, else OMP_NUM_THREADS, else the "
    "cores this process may use less one for the API].",
)
@click.option(
    "--workers",
    "api_processes",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="API processes sharing the port (uvicorn workers); periodic work runs in exactly one.",
)
def serve(
    host: str, port: int, no_worker: bool, stop_grace: float, log_level: str, threads: int | None, api_processes: int
) -> None:
    """Run the API; without --no-worker also one local worker (the zero-setup embedded mode:
    SQLite database and SQLite broker under ICD_HOME, migrated automatically). SIGTERM, SIGINT and
    SIGHUP all stop everything it started: the server, then the worker (its job checkpointed).

    With --workers N the API runs in N processes built from the same ICD_* environment; the schema is
    migrated once here first. On SQLite that works too (WAL: reads in parallel, writes take turns), but
    one process is the better choice there; PostgreSQL is the backend for N > 1."""
    import uvicorn

    from store.db import DatabaseNotMigrated

    _setup_logging(log_level)
    if not no_worker:
        os.environ.setdefault("ICD_AUTO_MIGRATE", "1")
    os.environ["ICD_LISTEN_HOST"] = host  # beyond loopback: tokens and ICD_DATA_ROOTS are required
    settings = _settings()
    settings.ensure_dirs()
    # The worker subprocess must see the same (absolute) locations as this process.
    os.environ["ICD_HOME"] = str(settings.home)

    from api.auth import StartupRefused
    from api.main import create_app

    try:
        app = create_app(settings)
    except (DatabaseNotMigrated, StartupRefused) as exc:
        raise click.ClickException(str(exc)) from exc

    local = None
    if not no_worker:
        local = _start_local_worker(settings, threads)
    click.echo(f"ICD service on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    click.echo(
        f"database {_safe_url(settings.database_url)}, broker {_safe_url(settings.broker_url)}, "
        f"artifacts {settings.artifact_root}"
    )
    try:
        if api_processes == 1:
            run_server_until_signal(app, host, port, log_level.lower())
        else:
            app.state.engine.dispose()  # the N processes build their own app; migrated already
            os.environ["ICD_AUTO_MIGRATE"] = "0"
            # uvicorn's process supervisor stops on SIGTERM/SIGINT and returns here (SIGHUP reloads its workers).
            uvicorn.run(
                "api.main:create_app",
                factory=True,
                workers=api_processes,
                host=host,
                port=port,
                log_level=log_level.lower(),
            )
    finally:
        if local is not None:
            _stop_local_worker(local, settings, stop_grace)


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def run_server_until_signal(app: Any, host: str, port: int, log_level: str) -> None:
    """uvicorn, with the stop signals handled here: each one ends the server gracefully and returns,
    so the caller's cleanup always runs. (uvicorn's own handling re-raises SIGTERM once it has shut
    down, which killed `serve` before it stopped its worker, and it ignores SIGHUP.) A second signal
    forces the exit of open connections."""
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        def capture_signals(self) -> Any:
            import contextlib

            return contextlib.nullcontext()

    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))

    def _stop(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("received %s: stopping", signal.Signals(signum).name)
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    old = {sig: signal.signal(sig, _stop) for sig in (getattr(signal, n) for n in STOP_SIGNALS)}
    try:
        server.run()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _start_local_worker(settings: Any, threads: int | None = None) -> Any:
    from store.dispatch import group_queues
    from worker.supervisor import WorkerProcess, WorkerSpec, visible_gpu_count
    from worker.threads import choose_threads

    # The only worker of an embedded service takes every queue: a job asking for a device this
    # machine lacks fails with a clear message instead of waiting forever.
    queues = "cuda,any,cpu" if visible_gpu_count() else "cpu,any,cuda"
    queues = group_queues(queues, settings.worker_gpus or max(1, visible_gpu_count()))  # resources.gpus jobs
    # The API runs beside this worker: the default leaves it a core (worker.threads.default_threads).
    choice = choose_threads(threads or settings.worker_threads, workers=1, api_beside=True)
    click.echo(f"local worker: {choice.threads} torch thread(s) ({choice.reason})")
    proc = WorkerProcess(WorkerSpec(EMBEDDED_WORKER.format(host=socket.gethostname()), queues, threads=choice.threads))
    proc.start()
    return proc


def _stop_local_worker(proc: Any, settings: Any, grace_s: float) -> None:
    """Warm stop (the job is checkpointed and re-queued); a job still 'running' under it (the worker
    had to be killed) is re-queued too, so the next start resumes it."""
    click.echo("stopping the local worker ...")
    proc.stop(grace_s)
    from store.db import make_engine, session_factory
    from store.jobs import expire_leases_of
    from store.reaper import reaper_pass

    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine)() as s:
            if expire_leases_of(s, proc.spec.name):
                reaper_pass(s, settings)  # queued in the database; the next worker's sweep sends it
    finally:
        engine.dispose()


def _safe_url(url: str) -> str:
    from store.dispatch import _safe

    return _safe(url)


# --- icd worker ---------------------------------------------------------------------------------


@click.command("worker")
@click.option("--gpus", default=None, help="GPU indices, e.g. 0,1: one worker process per GPU.")
@click.option("--cpu", "cpu_only", is_flag=True, help="A CPU-only worker (GPUs hidden; queues cpu,any).")
@click.option(
    "--queues", "-Q", default=None, help="Queues to consume (default: cuda,any on GPU workers, cpu,any on CPU workers)."
)
@click.option("--name", default=None, help="Worker name prefix (default gpu<N>, cpu or worker); @host is added.")
@click.option(
    "--group",
    is_flag=True,
    help="One worker owning all of --gpus: it runs jobs of resources.gpus up to that many (torchrun). "
    "On a CPU worker, ICD_WORKER_GPUS=N gives N-process gloo groups.",
)
@click.option(
    "--stop-grace",
    default=60.0,
    show_default=True,
    type=float,
    help="Seconds a running job gets to checkpoint on shutdown before the worker is killed.",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1, 1024),
    help="torch threads of each worker process [default: ICD_WORKER_THREADS, else OMP_NUM_THREADS, else "
    "the cores this process may use shared among the workers started].",
)
@click.option("--loglevel", default="INFO", show_default=True)
def worker_cmd(
    gpus: str | None,
    cpu_only: bool,
    queues: str | None,
    name: str | None,
    group: bool,
    stop_grace: float,
    threads: int | None,
    loglevel: str,
) -> None:
    """Start Celery workers against ICD_BROKER_URL / ICD_DATABASE_URL (add a GPU machine: run this
    on it with the shared settings)."""
    from worker.supervisor import WorkerProcess, wait_for_signal
    from worker.threads import choose_threads

    _setup_logging(loglevel)
    settings = _settings()
    specs = plan_workers(
        gpus, cpu_only, queues, name, socket.gethostname(), loglevel, group=group, worker_gpus=settings.worker_gpus
    )
    click.echo(f"broker {_safe_url(settings.broker_url)}, database {_safe_url(settings.database_url)}")
    # The workers started here share this host's cores (no API beside them).
    choice = choose_threads(threads or settings.worker_threads, workers=len(specs))
    click.echo(f"{choice.threads} torch thread(s) per worker ({choice.reason})")
    for spec in specs:
        spec.threads = choice.threads
    procs = [WorkerProcess(spec) for spec in specs]
    for p, spec in zip(procs, specs, strict=True):
        click.echo(
            f"worker {spec.name}: queues {spec.queues}"
            + (
                f", CUDA_VISIBLE_DEVICES={spec.env['CUDA_VISIBLE_DEVICES']}"
                if "CUDA_VISIBLE_DEVICES" in spec.env
                else ""
            )
        )
        p.start()
    wait_for_signal(procs, stop_grace)


def plan_workers(
    gpus: str | None,
    cpu_only: bool,
    queues: str | None,
    name: str | None,
    host: str,
    loglevel: str = "INFO",
    group: bool = False,
    worker_gpus: int | None = None,
) -> list[Any]:
    """The worker processes `icd worker` starts (pure: tested without starting anything).

    --group: one worker owning every listed GPU, consuming their -g2..-gN group queues as well.
    worker_gpus (ICD_WORKER_GPUS) > 1 on a worker without --gpus: it runs groups of that many processes.
    """
    from store.dispatch import group_queues
    from worker.supervisor import WorkerSpec, visible_gpu_count

    if gpus and cpu_only:
        raise click.UsageError("--gpus and --cpu exclude each other")
    if group and not gpus:
        raise click.UsageError("--group needs --gpus (the GPUs the worker owns); on CPU set ICD_WORKER_GPUS")
    if gpus:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not ids or not all(g.isdigit() for g in ids):
            raise click.BadParameter("give GPU indices like 0,1", param_hint="--gpus")
        if len(set(ids)) != len(ids):
            raise click.BadParameter("a GPU is listed twice", param_hint="--gpus")
        prefix = name or "gpu"
        if group:
            env = {"CUDA_VISIBLE_DEVICES": ",".join(ids), "ICD_WORKER_GPUS": str(len(ids))}
            return [
                WorkerSpec(
                    f"{prefix}{'-'.join(ids)}@{host}", group_queues(queues or "cuda,any", len(ids)), env, loglevel
                )
            ]
        return [
            WorkerSpec(f"{prefix}{g}@{host}", queues or "cuda,any", {"CUDA_VISIBLE_DEVICES": g}, loglevel) for g in ids
        ]
    ranks = worker_gpus or 1
    if cpu_only:
        return [
            WorkerSpec(
                f"{name or 'cpu'}@{host}",
                group_queues(queues or "cpu,any", ranks),
                {"CUDA_VISIBLE_DEVICES": ""},
                loglevel,
            )
        ]
    default_queues = "cuda,any" if visible_gpu_count() else "cpu,any"
    return [WorkerSpec(f"{name or 'worker'}@{host}", group_queues(queues or default_queues, ranks), {}, loglevel)]


@click.command("check-worker")
@click.option("--host", "host", default=None, help="Hostname whose workers count (default: this machine).")
@click.option("--name", default=None, help="One worker name, e.g. gpu0@host (default: any on the host).")
def check_worker(host: str | None, name: str | None) -> None:
    """Exit 0 when a worker on this host sent a heartbeat recently (a container healthcheck that
    keeps working while the worker is busy training, unlike a broker ping)."""
    from store.db import make_engine, session_factory
    from store.workers import list_workers

    settings = _settings()
    host = host or socket.gethostname()
    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine)() as s:
            alive = [
                w
                for w in list_workers(s, alive_within_s=3 * settings.worker_heartbeat_s)
                if (w.name == name if name else w.hostname == host)
            ]
    finally:
        engine.dispose()
    if not alive:
        raise click.ClickException(f"no live worker {name or 'on ' + host}")
    click.echo(", ".join(f"{w.name} ({w.device})" for w in alive))


# --- icd db -------------------------------------------------------------------------------------


@click.group("db")
def db() -> None:
    """The database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or upgrade the schema of ICD_DATABASE_URL."""
    from store.db import current_revision, make_engine, upgrade_database

    settings = _settings()
    if settings.database_url.startswith("sqlite"):
        settings.ensure_dirs()
    upgrade_database(settings.database_url, revision)
    engine = make_engine(settings.database_url)
    try:
        click.echo(f"database {_safe_url(settings.database_url)} is at revision {current_revision(engine)}")
    finally:
        engine.dispose()


@db.command("current")
def db_current() -> None:
    """Show the schema revision; exits 1 when the database needs `icd db upgrade`."""
    from store.db import current_revision, head_revision, make_engine

    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        have, need = current_revision(engine), head_revision()
    finally:
        engine.dispose()
    click.echo(f"database {_safe_url(settings.database_url)}: revision {have or '<empty>'}, code needs {need}")
    if have != need:
        click.echo("run: icd db upgrade", err=True)
        raise SystemExit(1)
