"""The command-line client of a running service: `icd submit | jobs | status | logs | wait | download |
cancel | retry` talk to `--server` (or ICD_SERVER) over HTTP with httpx, sending ICD_TOKEN as the bearer
token; `icd validate` checks a spec file locally, without a server.

API errors are printed as `field: reason`, one line each. `icd wait` (and `submit --wait`) exits with the
job's final state: 0 succeeded, 1 failed, 2 canceled (3 when --timeout passes first).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import httpx

from icd_cli.status_format import duration as _duration
from icd_cli.status_format import status_lines, wait_postfix
from icd_core.spec import PRIORITY_MAX, PRIORITY_MIN
from store.models import JOB_KINDS, JOB_STATUSES, JobStatus

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.PRUNED)
# pruned: a sweep's trial its pruner stopped (docs/sweeps.md#pruned-trials), an outcome rather than a failure.
EXIT_CODES = {JobStatus.SUCCEEDED: 0, JobStatus.FAILED: 1, JobStatus.CANCELED: 2, JobStatus.PRUNED: 4}
EXIT_TIMEOUT = 3
YAML = "application/yaml"


class ApiError(click.ClickException):
    """An HTTP error from the service, printed as one `field: reason` line per problem."""

    def __init__(self, response: httpx.Response) -> None:
        try:
            detail: Any = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = response.text.strip() or response.reason_phrase
        super().__init__(
            f"{response.request.method} {response.request.url.path}: HTTP {response.status_code}\n"
            + format_detail(detail)
        )


def format_detail(detail: Any) -> str:
    """FastAPI's `detail`: a list of {field, msg} (422) or a sentence."""
    if isinstance(detail, list):
        lines = []
        for d in detail:
            if isinstance(d, dict):
                field = d.get("field") or ".".join(str(x) for x in d.get("loc", []) if x != "body") or "(spec)"
                msg = str(d.get("msg", d))
                msg = msg.removeprefix(f"{field}: ")  # some reasons already name their field
                lines.append(f"  {field}: {msg}")
            else:
                lines.append(f"  {d}")
        return "\n".join(lines)
    return f"  {detail}"


class Client:
    """The service's HTTP API, raising ApiError on any error response."""

    def __init__(self, server: str, token: str | None, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise click.ClickException(
                f"cannot reach the service at {self.server} ({exc.__class__.__name__}: {exc}); "
                "start it with `icd serve` or point --server / ICD_SERVER at it"
            ) from exc
        if r.status_code >= 400:
            raise ApiError(r)
        return r

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw).json()


def server_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--server / ICD_SERVER and --token / ICD_TOKEN on every command that talks to the service."""
    fn = click.option(
        "--token", envvar="ICD_TOKEN", default=None, show_envvar=True, help="Bearer token, sent with every request."
    )(fn)
    return click.option(
        "--server",
        envvar="ICD_SERVER",
        default=DEFAULT_SERVER,
        show_default=True,
        show_envvar=True,
        help="The service's base URL.",
    )(fn)


def _connect(server: str, token: str | None) -> Client:
    return Client(server, token)


def _read_spec(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from exc


def _job_line(job: dict[str, Any]) -> str:
    pct = f"{job['percent']:.0f}%" if job.get("percent") is not None else ""
    eta = f"ETA {_duration(job['eta_s'])}" if job.get("status") == JobStatus.RUNNING and job.get("eta_s") else ""
    ap = (job.get("final_metrics") or {}).get("AP")
    return "  ".join(
        x
        for x in (
            f"{job['id']:>5}",
            f"{job['status']:<9}",
            f"{job['kind']:<8}",
            f"p{job.get('priority', 0):<4}",
            job["name"],
            pct,
            eta,
            f"AP {ap:.2f}" if isinstance(ap, int | float) else "",
        )
        if x
    )


# --- commands -------------------------------------------------------------------------------------


@click.command("submit")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to finish; exit code from its final state.")
@server_options
def submit_cmd(spec: Path, wait_: bool, server: str, token: str | None) -> None:
    """Submit the job spec file SPEC (YAML or JSON); prints the job's id and its dashboard URL."""
    c = _connect(server, token)
    text = _read_spec(spec)
    is_json = spec.suffix == ".json"
    job = c.post("/jobs", content=text.encode(), headers={"Content-Type": "application/json" if is_json else YAML})
    click.echo(f"job {job['id']} {job['status']}: {c.server}/#/jobs/{job['id']}")
    if wait_:
        sys.exit(_wait(c, job["id"], timeout=None, interval=2.0))


def _check_statuses(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Unknown statuses fail here, in one sentence that lists the valid ones (store.models.JobStatus)."""
    if not value:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in names if v not in JOB_STATUSES]
    if bad:
        raise click.ClickException(
            f"--status: unknown status {', '.join(map(repr, bad))}; valid statuses: {', '.join(JOB_STATUSES)}"
        )
    return ",".join(names)


@click.command("jobs")
@click.option("--status", default=None, callback=_check_statuses, help="One status or several, comma-separated.")
@click.option("--kind", default=None, type=click.Choice(JOB_KINDS))
@click.option("--search", default=None, help="Name contains this, or the id.")
@click.option("--parent", "parent_id", default=None, type=int, help="Only the children of this study.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500))
@click.option(
    "--sort",
    default="newest",
    show_default=True,
    type=click.Choice(["newest", "priority"]),
    help="priority: highest first, oldest first within one (with --status queued: the order workers take).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@server_options
def jobs_cmd(
    status: str | None,
    kind: str | None,
    search: str | None,
    parent_id: int | None,
    limit: int,
    sort: str,
    as_json: bool,
    server: str,
    token: str | None,
) -> None:
    """List jobs, newest first (or by priority)."""
    data = _connect(server, token).get(
        "/jobs", status=status, kind=kind, search=search, parent_id=parent_id, limit=limit, sort=sort
    )
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for job in data["items"]:
        click.echo(_job_line(job))
    click.echo(f"({len(data['items'])} of {data['total']})", err=True)


@click.command("status")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@server_options
def status_cmd(job_id: int, as_json: bool, server: str, token: str | None) -> None:
    """One job: status, progress, timing, key metrics rounded (AP, loss, ICD's diagnostics) and any error;
    --json prints everything."""
    c = _connect(server, token)
    job = c.get(f"/jobs/{job_id}")
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    evals = [] if job.get("final_metrics") else c.get(f"/jobs/{job_id}/evaluations")
    for line in status_lines(job, evals[-1] if evals else None):
        click.echo(line)


@click.command("logs")
@click.argument("job_id", type=int)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job is finished.")
@click.option("--tail", default=None, type=click.IntRange(1, 100_000), help="Only the last N lines.")
@server_options
def logs_cmd(job_id: int, follow: bool, tail: int | None, server: str, token: str | None) -> None:
    """Print a job's log (with --follow: stream it while the job runs)."""
    c = _connect(server, token)
    params = {"tail": tail} if tail else {}
    if not follow:
        click.echo(c.request("GET", f"/jobs/{job_id}/logs", params=params).text, nl=False)
        return
    c.get(f"/jobs/{job_id}")  # a clear 404 before streaming
    try:
        with c.http.stream("GET", f"/jobs/{job_id}/logs", params={**params, "follow": "true"}, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiError(r)
            for chunk in r.iter_text():
                click.echo(chunk, nl=False)
                sys.stdout.flush()
    except httpx.TransportError as exc:
        raise click.ClickException(f"the log stream from {c.server} broke: {exc}") from exc


@click.command("wait")
@click.argument("job_id", type=int)
@click.option("--timeout", default=None, type=float, help="Give up after this many seconds (exit 3).")
@click.option("--interval", default=2.0, show_default=True, type=float, help="Seconds between polls.")
@server_options
def wait_cmd(job_id: int, timeout: float | None, interval: float, server: str, token: str | None) -> None:
    """Wait for a job with a progress bar; exit 0 succeeded, 1 failed, 2 canceled, 3 timed out."""
    sys.exit(_wait(_connect(server, token), job_id, timeout, interval))


def _wait(c: Client, job_id: int, timeout: float | None, interval: float) -> int:
    from tqdm import tqdm

    deadline = None if timeout is None else time.monotonic() + timeout
    # tqdm's own rate and remaining time count from when this command attached: the postfix carries the
    # job's step time and ETA from the server instead.
    bar = tqdm(
        total=None,
        unit="step",
        desc=f"job {job_id}",
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",
    )
    try:
        while True:
            job = c.get(f"/jobs/{job_id}")
            total = job.get("progress_total")
            if total and bar.total != total:
                bar.total = total
            bar.n = job.get("progress_step") or 0
            bar.set_postfix_str(wait_postfix(job))
            bar.refresh()
            if job["status"] in TERMINAL:
                break
            if deadline is not None and time.monotonic() >= deadline:
                bar.close()
                click.echo(f"job {job_id} is still {job['status']} after {timeout:.0f} s", err=True)
                return EXIT_TIMEOUT
            time.sleep(interval)
    finally:
        bar.close()
    line = f"job {job_id} {job['status']}"
    ap = (job.get("final_metrics") or {}).get("AP")
    if isinstance(ap, int | float):
        line += f": AP {ap:.2f}"
    if job.get("error"):
        line += f": {job['error']}"
    click.echo(line)
    return EXIT_CODES[job["status"]]


@click.command("download")
@click.argument("job_id", type=int)
@click.argument("checkpoint", required=False)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=True, path_type=Path),
    default=None,
    help="File or folder to write to (default: the checkpoint's name here).",
)
@server_options
def download_cmd(job_id: int, checkpoint: str | None, output: Path | None, server: str, token: str | None) -> None:
    """Download a checkpoint (default: the final one), resuming a partial download with HTTP ranges and
    verifying its sha256."""
    c = _connect(server, token)
    cks = c.get(f"/jobs/{job_id}/checkpoints")
    if not cks:
        raise click.ClickException(f"job {job_id} has no checkpoints yet")
    if checkpoint is None:
        ck = next((k for k in cks if k["final"]), max(cks, key=lambda k: k["step"]))
    else:
        ck = next((k for k in cks if k["name"] == checkpoint), None)
        if ck is None:
            raise click.ClickException(
                f"job {job_id} has no checkpoint {checkpoint!r}; it has: " + ", ".join(k["name"] for k in cks)
            )
    dest = (output / ck["name"]) if output is not None and output.is_dir() else (output or Path(ck["name"]))
    fetch_checkpoint(c, f"/jobs/{job_id}/checkpoints/{ck['name']}", dest, ck["sha256"], ck["size_bytes"])
    click.echo(f"{dest}  {ck['size_bytes']} bytes  sha256 {ck['sha256']} (verified)")


def fetch_checkpoint(c: Client, path: str, dest: Path, sha256: str, size: int) -> None:
    """Stream `path` to `dest` through `dest.part`, continuing a previous partial file with a Range request;
    the file is renamed into place only when its sha256 matches."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with c.http.stream("GET", path, headers=headers, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ApiError(r)
                mode = "ab" if have and r.status_code == 206 else "wb"  # a 200 restarts from byte 0
                if have and mode == "ab":
                    click.echo(f"resuming at byte {have} of {size}", err=True)
                with open(part, mode) as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
        except httpx.TransportError as exc:
            raise click.ClickException(f"download interrupted ({exc}); run the same command again to resume") from exc
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        part.unlink()
        raise click.ClickException(
            f"sha256 mismatch for {dest.name}: got {digest.hexdigest()}, the service recorded "
            f"{sha256}; the partial file was removed, download again"
        )
    os.replace(part, dest)


@click.command("cancel")
@click.argument("job_id", type=int)
@server_options
def cancel_cmd(job_id: int, server: str, token: str | None) -> None:
    """Cancel a job (a running one stops at its next step)."""
    job = _connect(server, token).post(f"/jobs/{job_id}/cancel")
    click.echo(f"job {job_id} {job['status']}" + (" (cancel requested)" if job["status"] == JobStatus.RUNNING else ""))


@click.command("priority")
@click.argument("job_id", type=int)
@click.argument("priority", type=click.IntRange(PRIORITY_MIN, PRIORITY_MAX))
@server_options
def priority_cmd(job_id: int, priority: int, server: str, token: str | None) -> None:
    """Re-prioritise a queued or waiting job (a study: with its unstarted children); higher runs first."""
    job = _connect(server, token).post(f"/jobs/{job_id}/priority", json={"priority": priority})
    click.echo(_job_line(job))
    if job.get("status_detail"):
        click.echo(f"  {job['status_detail']}")


@click.command("retry")
@click.argument("job_id", type=int)
@server_options
def retry_cmd(job_id: int, server: str, token: str | None) -> None:
    """Requeue a failed or canceled job; it resumes from its last checkpoint."""
    job = _connect(server, token).post(f"/jobs/{job_id}/retry")
    click.echo(f"job {job_id} {job['status']}")


@click.command("validate")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate_cmd(spec: Path) -> None:
    """Check a spec file without running it or asking a server: schema, study compatibility, paths, and
    that every checkpoint file is this service's and of the spec's architecture."""
    from pydantic import ValidationError

    from icd_core.checkpoint_gate import checkpoint_problems
    from icd_core.spec import SpecSyntaxError, StudySpec, check_paths, load_spec
    from icd_core.study import check_study

    try:
        parsed = load_spec(spec)
    except SpecSyntaxError as exc:  # already `path:line:column: problem`
        raise click.ClickException(str(exc)) from exc
    except ValidationError as exc:
        lines = [f"  {_field(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise click.ClickException(f"{spec} is not a valid job spec:\n" + "\n".join(lines)) from exc
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"{spec}: {exc}") from exc
    path_problems = check_paths(parsed)
    problems = [f"  {field}: {reason}" for field, reason in path_problems]
    skip = {field for field, _ in path_problems}
    problems += [f"  {field}: {reason}" for field, reason in checkpoint_problems(parsed, skip=skip)]
    if isinstance(parsed, StudySpec):
        try:
            check_study(parsed)
        except ValueError as exc:
            problems.append(f"  student: {exc}")
    if problems:
        raise click.ClickException(f"{spec}: valid schema, but:\n" + "\n".join(problems))
    click.echo(f"{spec}: valid {parsed.kind} spec {parsed.name!r}")


def _field(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the spec's dotted field, without the union's kind tag."""
    parts = [str(x) for x in loc]
    if parts and parts[0] in ("train", "distill", "evaluate", "study", "sweep"):
        parts = parts[1:]
    return ".".join(parts) or "(spec)"


CLIENT_COMMANDS: list[click.Command] = [
    submit_cmd,
    jobs_cmd,
    status_cmd,
    logs_cmd,
    wait_cmd,
    download_cmd,
    cancel_cmd,
    retry_cmd,
    priority_cmd,
    validate_cmd,
]
