"""`icd sweep SPEC`: run a `kind: sweep` spec in this process (trials one after another, pruned at evaluations)."""

from __future__ import annotations

from pathlib import Path

import click

from icd_core.spec import SweepSpec

from .core import ProgressBar, _load, default_cache_dir


@click.command("sweep")
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--output",
    "output",
    type=click.Path(file_okay=False),
    default=None,
    help="Result folder (default: runs/<sweep name>). Rerunning into it resumes.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Generated datasets and class priors (default: $ICD_CACHE_DIR or .icd/cache).",
)
def sweep_command(spec_path: str, output: str | None, cache_dir: str | None) -> None:
    """Run a `kind: sweep` spec locally: each trial in turn into <output>/trial<N>/, then report.md/json.

    The same sampler and pruner as the service (`icd submit` runs the trials as jobs, `parallel` at once).
    """
    from icd_core.sweep import report_markdown, run_sweep_local

    spec = _load(Path(spec_path))
    if not isinstance(spec, SweepSpec):
        raise click.UsageError(f"{spec_path} is a '{spec.kind}' spec; `icd sweep` runs kind: sweep")
    out = Path(output) if output else Path("runs") / spec.name.replace("/", "_")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        report = run_sweep_local(spec, out, cache, callbacks_factory=lambda name: [ProgressBar(name)])
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(f"{exc} (rerun the same command to resume)") from exc
    except KeyboardInterrupt:
        raise click.ClickException(f"stopped; rerun the same command to resume the sweep in {out}") from None
    click.echo(report_markdown(report))
    click.echo(f"report: {out / 'report.md'}, {out / 'report.json'}")
