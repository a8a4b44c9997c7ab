"""The deployment part of a finished train/distill run: what its model costs, and what it detects.

Called by the runner after training. Writes `predictions/` (COCO JSON + PNGs of the first validation
images; `predictions/teacher/` too for a distill run) and returns the cost figures twice: structured
for summary.json (`model_cost`, `teacher_model_cost`) and flat (`cost_*`, `teacher_cost_*` floats)
for the run's final metrics, which the service stores per job and the study leaderboard reads.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .detectors import Detector
from .model_cost import measure_cost
from .predict import LoadedModel, write_predictions
from .spec import DeploySpec

log = logging.getLogger(__name__)


RUNTIME_OF = {"torchscript": "torchscript", "onnx": "onnxruntime"}


def _exported_runners(
    detector: Detector, tmp: Path, threads: int, check: Callable[[], None]
) -> tuple[dict[str, Any], dict[str, str]]:
    """TorchScript and ONNX Runtime callables of `detector` (CPU), and the formats that could not export.
    The exports run in a child process (icd_core.export_process); `check` may stop them."""
    from .export import ExportedDetector, ExportError
    from .export_process import export_in_child

    failed = export_in_child(detector, tmp, list(RUNTIME_OF), check)
    runners, errors = {}, {RUNTIME_OF[fmt]: why for fmt, why in failed.items()}
    for fmt, name in RUNTIME_OF.items():
        if fmt in failed:
            continue
        try:
            runners[name] = ExportedDetector(tmp / f"model.{fmt}", threads=threads).run
        except ExportError as err:
            errors[name] = str(err)
    return runners, errors


def _no_stop() -> None:
    """The default `check`: a local run is never stopped from outside."""


def model_cost(
    detector: Detector,
    image: torch.Tensor,
    device: torch.device,
    deploy: DeploySpec,
    check: Callable[[], None] = _no_stop,
) -> dict[str, Any]:
    """Cost of `detector` on `image` (see icd_core.model_cost), exported runtimes timed on the CPU.
    `check` runs between the phase's parts and while the exports run; it raises to stop the phase."""
    was_training = detector.training
    detector.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runners, errors = ({}, {})
            if deploy.exported_latency:
                runners, errors = _exported_runners(detector, Path(tmp), torch.get_num_threads(), check)
                check()
            cost = measure_cost(
                detector.model, image, device, deploy.latency_repeats, deploy.latency_warmup, exported=runners
            ).as_dict()
    finally:
        detector.train(was_training)
    cost["exported_device"] = "cpu"
    if errors:
        cost["export_errors"] = errors
    return cost


def flat_cost(cost: dict[str, Any], prefix: str = "cost_") -> dict[str, float]:
    """`cost_params_m`, `cost_gflops`, `cost_peak_inference_mb`, `cost_latency_ms[_torchscript|_onnxruntime]`."""
    out = {
        f"{prefix}params_m": cost["params_m"],
        f"{prefix}gflops": cost["gflops"],
        f"{prefix}peak_inference_mb": cost["peak_inference_mb"],
    }
    for runtime, ms in cost["latency_ms"].items():
        out[f"{prefix}latency_ms" + ("" if runtime == "eager" else f"_{runtime}")] = ms
    return {k: float(v) for k, v in out.items()}


def render_predictions(detector: Detector, val: Any, count: int, out_dir: Path) -> Path | None:
    """detections.json + one PNG per image (and raw/, without boxes) for the first `count` validation images
    (None when count is 0)."""
    if count <= 0:
        return None
    images = []
    for i in range(min(count, len(val))):
        image_id = val.image_ids[i]
        images.append((image_id, val.coco.imgs[image_id]["file_name"], val.load(i)[0]))
    was_training = detector.training
    detector.eval()
    try:
        loaded = LoadedModel(detector, list(val.class_names), list(val.label_to_cat_id), "run")
        path = write_predictions(loaded, images, out_dir, raw=True).path
    finally:
        detector.train(was_training)
    return path


def deploy_report(
    student: Detector,
    teacher: Detector | None,
    val: Any,
    deploy: DeploySpec,
    device: torch.device,
    output_dir: Path,
    check: Callable[[], None] = _no_stop,
) -> tuple[dict[str, Any], dict[str, float]]:
    """(summary.json entries, flat final-metric entries) for a finished run; see the module docstring.
    `check` runs before each part (and during exports) and raises to stop the phase: a canceled job or
    a lost lease must not go on writing files that another attempt now owns."""
    summary: dict[str, Any] = {}
    flat: dict[str, float] = {}
    check()
    if deploy.prediction_images:
        render_predictions(student, val, deploy.prediction_images, output_dir / "predictions")
        if teacher is not None:
            render_predictions(teacher, val, deploy.prediction_images, output_dir / "predictions" / "teacher")
        summary["predictions"] = str(output_dir / "predictions")
    if deploy.cost:
        image = val.load(0)[0]
        check()
        summary["model_cost"] = model_cost(student, image, device, deploy, check)
        flat.update(flat_cost(summary["model_cost"]))
        if teacher is not None:
            check()
            summary["teacher_model_cost"] = model_cost(teacher, image, device, deploy, check)
            flat.update(flat_cost(summary["teacher_model_cost"], "teacher_cost_"))
        log.info("model cost: %s", ", ".join(f"{k} {v:.3g}" for k, v in flat.items()))
    return summary, flat
