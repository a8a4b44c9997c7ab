"""Exports in a child process, so the job's own process stays responsive while they run.

torch's exporters (TorchScript scripting, the ONNX exporter's graph passes) hold the interpreter lock
for seconds at a time, and nothing can interrupt them midway. In the worker's process that starved the
heartbeat thread that renews the job's lease: the job was reaped and started again elsewhere while
this attempt was still exporting. Here the parent only waits: it calls `check` (which raises to stop,
e.g. on a cancel or a lost lease) a few times a second and kills the child when it does.

    python -m icd_core.export_process INPUT.pt OUT_DIR FORMAT...       (a run's model, for its latency)
    python -m icd_core.export_process --request OUT_DIR/request.json  (a verified export: an export job)

The child dies with its parent (a worker killed with SIGKILL leaves no export running behind it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .detectors import Detector, build_detector
from .export import ExportError, export_meta, write_export
from .spec import saved_model_spec

ERRORS_FILE = "export_errors.json"
REQUEST_FILE = "export_request.json"
PARENT_ENV = "ICD_EXPORT_PARENT_PID"


def export_in_child(
    detector: Detector, out_dir: Path, formats: Sequence[str], check: Callable[[], None], poll_s: float = 0.2
) -> dict[str, str]:
    """Write `out_dir/model.<format>` for each format from a child process; {format: why} for those that
    could not export. `check()` runs while the child works; if it raises, the child is killed first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "export_input.pt"
    transform = detector.model.transform
    torch.save(
        {
            "model_spec": detector.spec.model_dump(mode="json"),
            "num_classes": detector.num_classes,
            "min_size": [int(s) for s in transform.min_size],
            "max_size": int(transform.max_size),
            "state": {k: v.detach().cpu() for k, v in detector.state_dict().items()},
        },
        source,
    )
    cmd = [sys.executable, "-m", "icd_core.export_process", str(source), str(out_dir), *formats]
    try:
        return _run_child(cmd, out_dir, formats, check, poll_s)
    finally:
        source.unlink(missing_ok=True)


def export_checkpoint_in_child(
    checkpoint: Path,
    out_dir: Path,
    formats: Sequence[str],
    cache_dir: Path,
    verify_images: int,
    eval_images: int | None,
    check: Callable[[], None],
    poll_s: float = 0.2,
) -> dict[str, str]:
    """`icd_core.export.export_checkpoint` for each format, verified against the eager model, from a child
    process: `out_dir/model.<suffix>` with its metadata beside it; {format: why} for those that failed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    request = out_dir / REQUEST_FILE
    request.write_text(
        json.dumps(
            {
                "checkpoint": str(checkpoint),
                "formats": list(formats),
                "cache_dir": str(cache_dir),
                "verify_images": verify_images,
                "eval_images": eval_images,
            }
        )
    )
    cmd = [sys.executable, "-m", "icd_core.export_process", "--request", str(request)]
    return _run_child(cmd, out_dir, formats, check, poll_s)


def _run_child(
    cmd: list[str], out_dir: Path, formats: Sequence[str], check: Callable[[], None], poll_s: float
) -> dict[str, str]:
    """Run the child, calling `check` while it works (the child is killed when `check` raises); its
    {format: why} file, or its log's tail for every format when it crashed."""
    (out_dir / ERRORS_FILE).unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), PARENT_ENV: str(os.getpid())}
    with open(out_dir / "export.log", "wb") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while child.poll() is None:
                check()
                time.sleep(poll_s)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    if child.returncode != 0:
        tail = (out_dir / "export.log").read_text(errors="replace")[-500:]
        return {fmt: f"the export process failed (exit {child.returncode}): {tail}" for fmt in formats}
    return json.loads((out_dir / ERRORS_FILE).read_text())


def _export_from_file(source: Path, out_dir: Path, formats: Sequence[str]) -> dict[str, str]:
    """The child's side: rebuild the detector from the saved spec and weights, export each format."""
    saved = torch.load(source, map_location="cpu", weights_only=True)
    spec = saved_model_spec(saved["model_spec"])  # weights: from `state`
    detector = build_detector(spec, int(saved["num_classes"]), tuple(saved["min_size"]), int(saved["max_size"]))
    detector.load_state_dict(saved["state"])
    detector.eval()
    errors = {}
    for fmt in formats:
        try:
            write_export(detector, export_meta(detector, {}, fmt), out_dir / f"model.{fmt}")
        except ExportError as err:
            errors[fmt] = str(err)
    return errors


def _export_requested(request: Path) -> dict[str, str]:
    """The child's side of an export job: each format exported from the checkpoint and verified."""
    from .export import export_checkpoint

    req = json.loads(request.read_text())
    errors = {}
    for fmt in req["formats"]:
        try:
            export_checkpoint(
                req["checkpoint"], fmt, request.parent, req["cache_dir"], req["verify_images"], req["eval_images"]
            )
        except (ExportError, ValueError, FileNotFoundError) as err:  # what the user can act on
            errors[fmt] = str(err)
    return errors


def _die_with_parent() -> None:
    """SIGKILL this child when the process that started it dies; exit now if it died already."""
    from .engine.distributed import die_with_parent

    die_with_parent()
    parent = os.environ.get(PARENT_ENV)
    if parent is not None and str(os.getppid()) != parent:
        os._exit(1)


def main(args: list[str]) -> None:
    _die_with_parent()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # Fault tests only: a slow export (a large model's) without a large model.
    time.sleep(float(os.environ.get("ICD_TEST_EXPORT_DELAY_S", "0")))
    if args[0] == "--request":
        request = Path(args[1])
        out_dir, found = request.parent, _export_requested(request)
    else:
        source_arg, out_arg, *format_args = args
        out_dir, found = Path(out_arg), _export_from_file(Path(source_arg), Path(out_arg), format_args)
    (out_dir / ERRORS_FILE).write_text(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1:])
