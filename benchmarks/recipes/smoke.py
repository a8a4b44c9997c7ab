"""Prove each recipe under benchmarks/recipes/ starts: random-init weights of the right layouts, the
recipe accepted unchanged by `icd validate`, then a short run of each at a small image size on the CPU.

    python benchmarks/recipes/smoke.py --images tests/fixtures/coco_mini/images \
        --annotations tests/fixtures/coco_mini/instances.json --work /tmp/recipes-smoke [--iterations 20]

The work folder gets the layout the recipes name (datasets/coco/..., weights/...): the photos serve as
both splits, the teachers are imported with `icd import-teacher` from random state dicts in torchvision's
and detectron2's formats (`--classes` keeps the photos' categories), and the students' ImageNet trunk is a
random torchvision ResNet-50 state dict. Prints one line per recipe: iterations run, s/step, student AP,
teacher AP (random weights: the APs only show the evaluation ran).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "benchmarks" / "recipes"
sys.path.insert(0, str(REPO))


def icd(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "icd_cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"icd {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def lay_out_data(work: Path, images: Path, annotations: Path) -> None:
    coco = work / "datasets" / "coco"
    for split in ("train2017", "val2017"):
        if not (coco / split).exists():
            shutil.copytree(images, coco / split)
        (coco / "annotations").mkdir(parents=True, exist_ok=True)
        shutil.copy(annotations, coco / "annotations" / f"instances_{split}.json")


def random_weights(work: Path, annotations: Path) -> None:
    """The three files the recipes name, from random state dicts in their sources' own formats."""
    import torch
    import torchvision

    from benchmarks.recipes.detectron2_pkl import random_detectron2_pkl

    weights = work / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights / "resnet50-0676ba61.pth")
    tv = weights / "source_retinanet_resnet50_fpn_v2.pth"
    model = torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), tv)
    icd("import-teacher", str(tv), "--from", "torchvision", "--arch", "retinanet_resnet50_fpn_v2",
        "--classes", str(annotations), "-o", str(weights / "retinanet_resnet50_fpn_v2.pt"), cwd=work)  # fmt: skip
    d2 = random_detectron2_pkl(weights / "source_retinanet_R_101_FPN_3x.pkl", "retinanet_R_101_FPN")
    icd("import-teacher", str(d2), "--from", "detectron2", "--arch", "retinanet_R_101_FPN",
        "--classes", str(annotations), "-o", str(weights / "retinanet_R_101_FPN_3x.pt"), cwd=work)  # fmt: skip


def shrunk(spec: dict[str, Any], iterations: int, size: int) -> dict[str, Any]:
    """The recipe at CPU scale: small images, a few iterations, one process, no periodic evaluation."""
    spec = json.loads(json.dumps(spec))
    multi = isinstance(spec["data"]["min_size"], list)
    spec["data"].update(min_size=[size - 32, size] if multi else size, max_size=size + 32, workers=0)
    spec["schedule"].update(iterations=iterations, batch_size=2, eval_every=0, checkpoint_every=0)
    spec["resources"] = {"gpus": 1}
    spec["device"] = "cpu"
    spec["deploy"] = {"cost": False, "prediction_images": 0}
    if "teacher_min_ap" in spec:  # random weights: the gate would (rightly) refuse them
        spec["teacher_min_ap"] = None
    return spec


def run_recipe(path: Path, work: Path, iterations: int, size: int) -> dict[str, Any]:
    from icd_core.runner import run_spec
    from icd_core.spec import parse_spec

    icd("validate", str(path), cwd=work)  # the recipe as shipped
    spec = parse_spec(shrunk(yaml.safe_load(path.read_text()), iterations, size))
    out = work / "runs" / path.stem
    shutil.rmtree(out, ignore_errors=True)
    cwd, start = Path.cwd(), time.perf_counter()
    os.chdir(work)  # the recipes' relative paths
    try:
        result = run_spec(spec, out, cache_dir=work / "cache")
        summary = json.loads((out / "summary.json").read_text())
        return {"runs": 1, "steps": result.final_metrics.get("step"), "sec_per_step": result.sec_per_step,
                "AP": result.final_metrics.get("AP"), "teacher_AP": summary["final_metrics"].get("teacher_AP"),
                "seconds": time.perf_counter() - start}  # fmt: skip
    finally:
        os.chdir(cwd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--annotations", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--only", default="", help="comma-separated recipe file stems")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    lay_out_data(args.work, args.images.resolve(), args.annotations.resolve())
    random_weights(args.work, args.annotations.resolve())
    wanted = {s for s in args.only.split(",") if s}
    for path in sorted(RECIPES.glob("*.yaml")):
        if wanted and path.stem not in wanted:
            continue
        print(f"{path.name}: {json.dumps(run_recipe(path, args.work, args.iterations, args.size))}", flush=True)


if __name__ == "__main__":
    main()
