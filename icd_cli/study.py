"""`icd study SPEC`: run a `kind: study` spec in this process (teacher check, every child, a leaderboard)."""

from __future__ import annotations

from pathlib import Path

import click

from icd_core.engine.callbacks import TrainingDiverged
from icd_core.spec import StudySpec

from .core import ProgressBar, _load, default_cache_dir


@click.command("study")
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--output",
    "output",
    type=click.Path(file_okay=False),
    default=None,
    help="Result folder (default: runs/<study name>). Rerunning into it resumes.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Generated datasets and class priors (default: $ICD_CACHE_DIR or .icd/cache).",
)
def study_command(spec_path: str, output: str | None, cache_dir: str | None) -> None:
    """Run a `kind: study` spec locally: teacher check, every (method, seed) child in turn, a leaderboard."""
    from icd_core.leaderboard import leaderboard_markdown
    from icd_core.study import run_study_local

    spec = _load(Path(spec_path))  # COCO paths resolved in ICD_DATA_ROOTS; one-line errors
    if not isinstance(spec, StudySpec):
        raise click.UsageError(f"{spec_path} is a '{spec.kind}' spec; `icd study` runs kind: study")
    out = Path(output) if output else Path("runs") / spec.name.replace("/", "_")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        report = run_study_local(spec, out, cache, callbacks_factory=lambda name: [ProgressBar(name)])
    except (ValueError, FileNotFoundError, TrainingDiverged) as exc:
        raise click.ClickException(f"{exc} (rerun the same command to resume)") from exc
    click.echo(report["verdict"] + "\n")
    click.echo(leaderboard_markdown(report))
    click.echo(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
