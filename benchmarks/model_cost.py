"""What a student buys at inference: student vs teacher cost for a study's pairing, and the student's
latency in eager PyTorch vs TorchScript vs ONNX Runtime.

Both models are built from the study spec at its evaluation size (random weights: cost does not depend
on them, except that an untrained detector returns few boxes, so NMS is cheap for both). Latency is
batch 1, warm, the median over `--repeats` forwards of one validation-sized image; GFLOPs from
torch.utils.flop_counter; peak inference memory as icd_core.model_cost measures it. Prints a table
and the ratios measured in this one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/model_cost.py benchmarks/shapes_study.yaml --threads 1
    .venv/bin/python benchmarks/model_cost.py benchmarks/shapes_study.yaml --device cuda --size 800 --amp
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from icd_core.detectors import Detector, build_detector
from icd_core.export import ExportedDetector, export_meta, write_export
from icd_core.model_cost import ModelCost, measure_cost
from icd_core.spec import StudySpec, load_spec


def build_pair(study: StudySpec, num_classes: int, size: int, max_size: int) -> tuple[Detector, Detector]:
    torch.manual_seed(0)
    teacher_spec = study.teacher.model_copy(update={"pretrained_backbone": False, "checkpoint": None})
    teacher = build_detector(teacher_spec, num_classes, size, max_size).eval()
    student = build_detector(study.student.model_copy(update={"checkpoint": None}), num_classes, size, max_size)
    return teacher, student.eval()


def exported_runtimes(student: Detector, folder: Path, threads: int) -> dict:
    runners = {}
    for fmt, name in (("torchscript", "torchscript"), ("onnx", "onnxruntime")):
        path = write_export(student, export_meta(student, {}, fmt), folder / f"student.{fmt}")
        runners[name] = ExportedDetector(path, threads=threads).run
    return runners


def eager_runner(det: Detector, image: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> Callable:
    model, x = det.model.to(device).eval(), image.to(device)

    def run() -> object:
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return model([x])

    return run


def interleaved_ms(runners: dict[str, Callable], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median ms per runner, each called once per repeat in turn (batch 1, after `warmup` calls each)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for run in runners.values():
        for _ in range(warmup):
            run()
    sync()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            sync()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}


def row(name: str, c: ModelCost) -> str:
    lat = " | ".join(
        f"{c.latency_ms[k]:.1f}" if k in c.latency_ms else "–" for k in ("eager", "torchscript", "onnxruntime")
    )
    return f"| {name} | {c.params_m:.2f} | {c.gflops:.2f} | {c.peak_inference_mb:.0f} | {lat} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path, help="A study spec (teacher + student).")
    ap.add_argument("--size", type=int, default=None, help="Short side (default: the study's evaluation size).")
    ap.add_argument("--max-size", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="Eager forward under bf16 autocast (GPU).")
    ap.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads.")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--classes", type=int, default=None, help="Default: the study's shapes num_classes, or 80.")
    args = ap.parse_args()

    study = load_spec(args.study)
    if not isinstance(study, StudySpec):
        raise SystemExit(f"{args.study}: not a study spec")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or study.data.test_size
    max_size = args.max_size or max(study.data.max_size, size)
    classes = args.classes or getattr(study.data.val, "num_classes", None) or 80
    device = torch.device(args.device)
    teacher, student = build_pair(study, classes, size, max_size)
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    amp = torch.bfloat16 if args.amp else None
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp:
        exported = exported_runtimes(student, Path(tmp), threads) if device.type == "cpu" else {}
        # Params, FLOPs and memory (latency timed below); then every runtime once per repeat, interleaved,
        # so a load change on a shared machine hits all of them alike.
        s_cost = measure_cost(student.model.to(device), image, device, 1, 0, autocast=amp)
        t_cost = measure_cost(teacher.model.to(device), image, device, 1, 0, autocast=amp)
        runners = {
            "teacher eager": eager_runner(teacher, image, device, amp),
            "student eager": eager_runner(student, image, device, amp),
            **{f"student {k}": (lambda run=run: run(image)) for k, run in exported.items()},
        }
        times = interleaved_ms(runners, args.repeats, args.warmup, device)
    t_cost.latency_ms = {"eager": times["teacher eager"]}
    s_cost.latency_ms = {k.removeprefix("student "): v for k, v in times.items() if k.startswith("student ")}
    s_cost.repeats = t_cost.repeats = args.repeats

    t, s = f"{study.teacher.detector} {study.teacher.backbone}", f"{study.student.detector} {study.student.backbone}"
    print(
        f"{args.study.name}: {size} px image, device {device}, {threads} thread(s), amp {'bf16' if amp else 'off'}, "
        f"median of {args.repeats} interleaved forwards per runtime after {args.warmup} warm-up"
    )
    print("| model | params M | GFLOPs | peak infer MB | eager ms | TorchScript ms | ONNX Runtime ms |")
    print("|---|---|---|---|---|---|---|")
    print(row(f"teacher ({t})", t_cost))
    print(row(f"student ({s})", s_cost))
    te, se = t_cost.latency_ms["eager"], s_cost.latency_ms["eager"]
    print(
        f"student vs teacher: {te / se:.2f}x the speed (eager), {s_cost.gflops / t_cost.gflops:.2f}x the FLOPs, "
        f"{s_cost.params_m / t_cost.params_m:.2f}x the parameters"
    )
    for name in ("torchscript", "onnxruntime"):
        if name in s_cost.latency_ms:
            print(f"student {name} vs eager: {se / s_cost.latency_ms[name]:.2f}x the speed")


if __name__ == "__main__":
    main()
