"""The deployment commands: `icd export` (a verified TorchScript/ONNX file of a run's model: here from a
checkpoint file, or as an export job on the service for `job:<id>`) and `icd predict` (COCO-format
detections and annotated PNGs). torch loads only when a local command runs."""

from __future__ import annotations

from pathlib import Path

import click

from icd_core.spec import EXPORT_SUFFIX, parse_job_ref
from store.models import JobStatus

from .client import EXIT_CODES, Client, fetch_checkpoint, server_options
from .core import _setup_logging, default_cache_dir


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="File (.onnx/.ts) or folder (default: exports/ in the checkpoint's run folder).",
)
@click.option(
    "--verify-images",
    default=4,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Validation images whose detections must match the eager model's.",
)
@click.option("--eval-images", default=None, type=click.IntRange(1), help="Limit the AP check (default: all).")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (>= 11).")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Generated datasets (default: $ICD_CACHE_DIR or the service's cache).",
)
@server_options
def export_cmd(
    checkpoint: Path,
    fmt: str,
    output: Path | None,
    verify_images: int,
    eval_images: int | None,
    opset: int,
    cache_dir: Path | None,
    server: str,
    token: str | None,
) -> None:
    """Export a train/distill CHECKPOINT's model (the student only) and verify it against the eager model.

    CHECKPOINT `job:<id>` exports that service job's model as an export job run by a worker (--server),
    waits for it and downloads the verified file."""
    job_id = parse_job_ref(str(checkpoint))
    if job_id is not None:
        body = {"format": fmt, "verify_images": verify_images, "eval_images": eval_images}
        raise SystemExit(_export_on_server(Client(server, token), job_id, body, output))
    _setup_logging()
    from icd_core.export import ExportError, export_checkpoint

    output = output or checkpoint.resolve().parent.parent / "exports"
    try:
        result = export_checkpoint(
            checkpoint, fmt, output, cache_dir or default_cache_dir(), verify_images, eval_images, opset
        )
    except (ExportError, ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    v = result.verification
    click.echo(f"exported {fmt}: {result.path}")
    diff = "–" if v.max_box_diff_px is None else f"{v.max_box_diff_px:.2g} px"
    click.echo(
        f"verified: detections on {v.images} images match (max box difference {diff}); "
        f"COCO AP {v.exported_AP:.2f} exported vs {v.eager_AP:.2f} eager on {v.eval_images} images"
    )


def _export_on_server(c: Client, job_id: int, body: dict[str, object], output: Path | None) -> int:
    """POST /jobs/{id}/exports, wait for the export job, download its file; the exit code of its outcome."""
    from .client import _wait

    export = c.post(f"/jobs/{job_id}/exports", json=body)
    click.echo(f"export job {export['job_id']} {export['status']}", err=True)
    code = _wait(c, export["job_id"], timeout=None, interval=2.0)
    if code != EXIT_CODES[JobStatus.SUCCEEDED]:
        return code
    done = c.get(f"/jobs/{job_id}/exports/{body['format']}")
    name = f"job{job_id}{EXPORT_SUFFIX[str(body['format'])]}"
    dest = (output / name) if output is not None and output.is_dir() else (output or Path(name))
    fetch_checkpoint(c, done["url"], dest, done["sha256"], done["size_bytes"])
    click.echo(f"exported {body['format']}: {dest}  sha256 {done['sha256']} (verified)")
    return 0


@click.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for detections.json (COCO format) and one annotated PNG per image.",
)
@click.option(
    "--score-min",
    default=0.3,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Draw boxes scoring at least this (the JSON keeps all).",
)
@click.option("--device", default="cpu", show_default=True, help="For a checkpoint (exports run on the CPU).")
def predict_cmd(model: Path, images: tuple[Path, ...], out_dir: Path, score_min: float, device: str) -> None:
    """Detect objects in IMAGES with MODEL (a checkpoint, or a .onnx/.ts export)."""
    from icd_core.predict import predict_files

    try:
        written = predict_files(model, images, out_dir, device=device, score_min=score_min)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    for line in written.undrawn_lines():
        click.echo(line, err=True)
    click.echo(
        f"detections: {written.path}\nimages: {len(written.pngs)} PNGs in {out_dir}, "
        f"{sum(written.drawn)} boxes drawn (score at least {score_min:g}; detections.json keeps all)"
    )
