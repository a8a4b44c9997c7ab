"""The local-run commands: `icd train`, `icd eval`, `icd shapes make`.

Nothing here imports torch at import time: the runner is imported when a command runs, so the
service commands that share the `icd` group start fast and never initialise CUDA.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from icd_core.data_roots import resolve_data_roots
from icd_core.engine.callbacks import Callback, CheckpointInfo, EvalResult, TrainingDiverged, TrainingStopped
from icd_core.run_layout import SUMMARY_FILE
from icd_core.spec import EvaluateSpec, SpecSyntaxError, StudySpec, load_spec, parse_spec
from store.settings import Settings

METRIC_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def default_cache_dir() -> Path:
    """ICD_CACHE_DIR, else $ICD_HOME/cache, else ./.icd/cache: the service's own setting."""
    return Settings().cache_dir


def data_roots() -> list[Path]:
    """ICD_DATA_ROOTS (colon-separated), read as the service reads it."""
    return Settings().data_roots


class ProgressBar(Callback):
    """tqdm bar over training steps (tqdm shows the ETA), with loss and lr; evaluations printed above it.

    The one progress bar of the command line: `icd train`/`icd eval` show one, `icd study` one per child
    (named after it).
    """

    def __init__(self, name: str = "train") -> None:
        self.name = name
        self.bar: tqdm | None = None
        self.stop_requested = False

    def on_start(self, step: int, total_steps: int) -> None:
        if total_steps > 0:
            self.bar = tqdm(total=total_steps, initial=step, desc=self.name, unit="step", dynamic_ncols=True)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            lr=f"{metrics['lr']:.2e}",
            s_step=f"{metrics['sec_per_step']:.3f}",
            refresh=False,
        )
        self.bar.update(step - self.bar.n)

    def on_evaluation(self, result: EvalResult) -> None:
        text = "  ".join(f"{k} {result.metrics[k]:.2f}" for k in METRIC_ORDER if k in result.metrics)
        tqdm.write(f"eval @ step {result.step}: {text}")

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        tqdm.write(f"checkpoint {info.path} ({info.size_bytes / 2**20:.1f} MiB)")

    def on_end(self, step: int, final_metrics: dict[str, float]) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def should_stop(self) -> bool:
        return self.stop_requested


def summary_table(metrics: dict[str, float], extra: dict[str, Any] | None = None) -> str:
    """A plain two-column table: COCO metrics first, then the rest."""
    rows = [(k, metrics[k]) for k in METRIC_ORDER if k in metrics]
    rows += [(k, v) for k, v in metrics.items() if k not in METRIC_ORDER]
    rows += list((extra or {}).items())
    width = max((len(k) for k, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for k, v in rows:
        counted = k == "step" or k.startswith("inherit_")
        shown = str(int(v)) if counted and isinstance(v, float) else f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {shown}")
    return "\n".join(lines)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _load(path: Path) -> Any:
    """The spec at `path`, its COCO paths found in (and kept inside) ICD_DATA_ROOTS; a CLI error naming the field."""
    try:
        return resolve_data_roots(load_spec(path), data_roots())
    except FileNotFoundError as err:
        raise click.ClickException(f"spec file not found: {path}") from err
    except SpecSyntaxError as err:  # already `path:line:column: problem`
        raise click.ClickException(str(err)) from err
    except ValueError as err:  # pydantic's ValidationError is a ValueError: names the field
        raise click.ClickException(f"{path}: invalid spec:\n{err}") from err


def _run(spec: Any, output: Path, resume: bool, cache_dir: Path, bar: ProgressBar) -> Any:
    """run_spec with user errors as one-line CLI errors and Ctrl-C as a cooperative, resumable stop."""
    from icd_core.runner import run_spec  # heavy imports (torch) only when a command runs

    def request_stop(signum: int, frame: Any) -> None:
        if bar.stop_requested:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        bar.stop_requested = True
        tqdm.write("stopping after this step (Ctrl-C again to abort without a checkpoint)")

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        return run_spec(spec, output, callbacks=[bar], resume=resume, cache_dir=cache_dir)
    except TrainingStopped as stop:
        raise click.ClickException(f"{stop}; continue with: icd train <spec> --output {output} --resume") from stop
    except TrainingDiverged as err:
        raise click.ClickException(str(err)) from err
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        raise click.ClickException(str(err)) from err
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()


def _run_group(spec: Any, output: Path, resume: bool, cache_dir: Path) -> None:
    """resources.gpus > 1: the same run as `resources.gpus` torchrun ranks on this machine (DDP)."""
    import json
    import subprocess

    from icd_core.torchrun import torchrun_argv

    output.mkdir(parents=True, exist_ok=True)
    spec_file = output / "group-spec.json"
    spec_file.write_text(json.dumps(spec.model_dump(mode="json")))
    gpus = spec.resources.gpus
    cmd = torchrun_argv(
        gpus,
        "icd_core.ddp_main",
        str(spec_file),
        str(output),
        "--cache-dir",
        str(cache_dir),
        *(["--resume"] if resume else []),
    )
    click.echo(f"{gpus} ranks: {' '.join(cmd[1:])}")
    code = subprocess.call(cmd)
    if code != 0:
        raise click.ClickException(
            f"the {gpus}-rank group failed (exit code {code}); the ranks' errors are "
            f"above; continue with: icd train <spec> --output {output} --resume"
        )
    summary = json.loads((output / SUMMARY_FILE).read_text())
    click.echo(
        summary_table(
            summary["final_metrics"],
            {"ranks": gpus, "checkpoint": summary["final_checkpoint"], "sec_per_step": summary.get("sec_per_step")},
        )
    )


def _default_output(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _latest_run(name: str) -> Path | None:
    runs = sorted(Path("runs").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime) if Path("runs").is_dir() else []
    return runs[-1] if runs else None


@click.command("train")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Run folder (default: runs/<name>-<timestamp>).",
)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the run folder.")
@click.option("--device", default=None, help="Override the spec's device (auto, cpu, cuda, cuda:N).")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Generated datasets and class priors (default: $ICD_CACHE_DIR or .icd/cache).",
)
def train_cmd(spec_path: Path, output: Path | None, resume: bool, device: str | None, cache_dir: Path | None) -> None:
    """Run a train or distill SPEC (YAML or JSON)."""
    _setup_logging()
    spec = _load(spec_path)
    if isinstance(spec, (EvaluateSpec, StudySpec)):
        raise click.ClickException(
            f"{spec_path}: icd train runs train or distill specs (this is kind "
            f"{spec.kind}; use icd eval for evaluate specs)"
        )
    if device:
        spec = parse_spec({**spec.model_dump(mode="json"), "device": device})
    if output is None:
        if resume:
            output = _latest_run(spec.name)
            if output is None:
                raise click.ClickException(f"--resume: no runs/{spec.name}-* folder found; give --output DIR")
        else:
            output = _default_output(spec.name)
    click.echo(f"run folder: {output}")
    if spec.resources.gpus > 1:
        _run_group(spec, output, resume, cache_dir or default_cache_dir())
        return
    bar = ProgressBar()
    result = _run(spec, output, resume, cache_dir or default_cache_dir(), bar)
    extra: dict[str, Any] = {"checkpoint": str(result.final_checkpoint)}
    if result.sec_per_step is not None:
        extra["sec_per_step"] = round(result.sec_per_step, 4)
    if result.peak_memory_mb is not None:
        extra["peak_memory_mb"] = round(result.peak_memory_mb, 1)
    click.echo(summary_table(result.final_metrics, extra))


def _eval_data(
    checkpoint: Path,
    run_data: dict[str, Any],
    images: Path | None,
    annotations: Path | None,
    data_spec: Path | None,
    sizes_from: str = "the checkpoint's run",
) -> tuple[dict[str, Any], str]:
    """data for evaluating a checkpoint, and where its sizes come from: the flags' COCO files at the run's
    sizes (or an imported model's input size), another spec's data with its sizes, or the checkpoint's own run."""
    if images or annotations:
        if not (images and annotations):
            raise click.ClickException("give both --data-val-images and --data-val-annotations")
        val = {"format": "coco", "images": str(images), "annotations": str(annotations)}
        sizes = {k: run_data[k] for k in ("min_size", "max_size") if k in run_data}
        origin = sizes_from if sizes else "the defaults: the checkpoint records no run sizes"
        return {"train": val, "val": val, **sizes}, origin
    if data_spec is not None:
        return dict(_load(data_spec).data.model_dump(mode="json")), str(data_spec)
    if "val" in run_data:
        return dict(run_data), "the checkpoint's run"
    raise click.ClickException(
        f"{checkpoint} records no dataset; give --data-val-images and --data-val-annotations, or --spec"
    )


def _eval_spec_from_checkpoint(
    checkpoint: Path,
    images: Path | None,
    annotations: Path | None,
    data_spec: Path | None,
    device: str,
    batch_size: int,
) -> tuple[EvaluateSpec, str]:
    """An evaluate spec for a checkpoint, and where its image sizes come from (see `_eval_data`).

    The sizes matter as much as the weights: a model trained at short side 64 and evaluated at the
    DataSpec default 320 sees objects 5× larger than it learned, and its AP says nothing about the run.
    """
    from icd_core.detectors import read_checkpoint

    try:
        saved = read_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    run_data = dict((saved.get("spec") or {}).get("data") or {})
    sizes_from = "the checkpoint's run"
    if not run_data and saved.get("input_size"):  # an imported model: the sizes of the project it came from
        size, sizes_from = saved["input_size"], "the imported model's input size"
        run_data = {"min_size": int(size["test_size"]), "max_size": int(size["max_size"])}
    data, origin = _eval_data(checkpoint, run_data, images, annotations, data_spec, sizes_from)
    data["train"] = data["val"]  # an evaluate run reads only data.val
    spec = parse_spec(
        {
            "kind": "evaluate",
            "name": f"eval-{checkpoint.stem}",
            "data": data,
            "model": {**saved["model_spec"], "checkpoint": str(checkpoint)},
            "schedule": {"batch_size": batch_size},
            "device": device,
        }
    )
    return spec, origin


def _override_sizes(spec: EvaluateSpec, min_size: int | None, max_size: int | None, origin: str) -> tuple[Any, str]:
    """The spec with --min-size/--max-size applied (when given), and the origin line updated."""
    if min_size is None and max_size is None:
        return spec, origin
    data = spec.data.model_dump(mode="json")
    data.update({k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None})
    try:
        spec = parse_spec({**spec.model_dump(mode="json"), "data": data})
    except ValueError as err:
        raise click.ClickException(f"--min-size/--max-size: {err}") from err
    return spec, f"--min-size/--max-size over {origin}"


@click.command("eval")
@click.argument("target", metavar="SPEC|CHECKPOINT", type=click.Path(path_type=Path))
@click.option("--data-val-images", type=click.Path(path_type=Path), default=None, help="COCO images folder.")
@click.option("--data-val-annotations", type=click.Path(path_type=Path), default=None, help="COCO instances JSON.")
@click.option(
    "--spec",
    "data_spec",
    type=click.Path(path_type=Path),
    default=None,
    help="Take data.val (and sizes) from this spec.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for summary.json (default: runs/<name>-<timestamp>).",
)
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option(
    "--min-size",
    type=click.IntRange(32),
    default=None,
    help="Short side to evaluate at (default: the checkpoint's run, or the spec's data.min_size).",
)
@click.option(
    "--max-size",
    type=click.IntRange(32),
    default=None,
    help="Long-side limit (default: the checkpoint's run, or the spec's data.max_size).",
)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
def eval_cmd(
    target: Path,
    data_val_images: Path | None,
    data_val_annotations: Path | None,
    data_spec: Path | None,
    output: Path | None,
    device: str,
    batch_size: int,
    min_size: int | None,
    max_size: int | None,
    cache_dir: Path | None,
) -> None:
    """COCO-evaluate a CHECKPOINT (on the given data, or the data it was trained with) or an evaluate SPEC.

    A checkpoint is evaluated at the image sizes its run used unless --min-size/--max-size say otherwise.
    """
    _setup_logging()
    if target.suffix in (".yaml", ".yml", ".json"):
        spec, origin = _load(target), str(target)
        if not isinstance(spec, EvaluateSpec):
            raise click.ClickException(f"{target} is a {spec.kind} spec; give an evaluate spec or a checkpoint")
        if device != "auto":
            spec = parse_spec({**spec.model_dump(mode="json"), "device": device})
    else:
        spec, origin = _eval_spec_from_checkpoint(
            target, data_val_images, data_val_annotations, data_spec, device, batch_size
        )
    spec, origin = _override_sizes(spec, min_size, max_size, origin)
    click.echo(f"image sizes: short side {spec.data.test_size}, long side at most {spec.data.max_size} (from {origin})")
    output = output or _default_output(spec.name)
    result = _run(spec, output, False, cache_dir or default_cache_dir(), ProgressBar())
    click.echo(summary_table(result.final_metrics))
    if result.evaluation is not None and result.evaluation.per_class:
        click.echo("\nper-class AP")
        click.echo(summary_table(dict(result.evaluation.per_class)))


@click.group("shapes")
def shapes_group() -> None:
    """The synthetic shapes dataset."""


@shapes_group.command("make")
@click.argument("out_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--num-images", default=512, show_default=True, type=int)
@click.option("--image-size", default=256, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--num-classes", default=6, show_default=True, type=int)
@click.option("--min-object", default=8, show_default=True, type=int)
@click.option("--max-object", default=96, show_default=True, type=int)
@click.option("--max-objects", default=8, show_default=True, type=int)
def shapes_make(
    out_dir: Path,
    num_images: int,
    image_size: int,
    seed: int,
    num_classes: int,
    min_object: int,
    max_object: int,
    max_objects: int,
) -> None:
    """Generate a COCO-format shapes dataset into DIR (images/ + instances JSON)."""
    from icd_core.data import make_shapes

    try:
        images, annotations = make_shapes(
            out_dir,
            num_images=num_images,
            image_size=image_size,
            seed=seed,
            num_classes=num_classes,
            min_object=min_object,
            max_object=max_object,
            max_objects=max_objects,
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"images: {images}\nannotations: {annotations}")
