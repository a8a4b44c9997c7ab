"""Tiny specs for the trainer, resume and CLI tests (imported by those test files; not a test module)."""

from __future__ import annotations

from typing import Any

TINY_MODEL: dict[str, Any] = {
    "detector": "retinanet",
    "backbone": "resnet18",
    "fpn_channels": 32,
    "levels": ["p3", "p4", "p5"],
    "anchor_sizes": [8, 16, 32],
    "head_convs": 1,
}


# Deployment figures on, but cheap: eager latency over 2 runs, no exported-runtime timing (tests of
# icd_core.run_report turn that on), one rendered validation image.
CHEAP_DEPLOY: dict[str, Any] = {
    "latency_repeats": 2,
    "latency_warmup": 0,
    "exported_latency": False,
    "prediction_images": 1,
}


def tiny_data(num_images: int = 16) -> dict[str, Any]:
    shapes = {"format": "shapes", "image_size": 64, "min_object": 6, "max_object": 32, "max_objects": 4}
    return {
        "train": {**shapes, "num_images": num_images, "seed": 1},
        "val": {**shapes, "num_images": 4, "seed": 2},
        "min_size": 64,
        "max_size": 64,
        "workers": 0,
    }


def tiny_schedule(iterations: int = 4, **over: Any) -> dict[str, Any]:
    return {
        "iterations": iterations,
        "batch_size": 2,
        "lr": 0.01,
        "warmup_iters": 2,
        "eval_every": 0,
        "checkpoint_every": 0,
        "log_every": 1,
        **over,
    }


def train_spec(iterations: int = 4, **schedule: Any) -> dict[str, Any]:
    return {
        "kind": "train",
        "name": "tiny-teacher",
        "seed": 0,
        "device": "cpu",
        "data": tiny_data(),
        "model": dict(TINY_MODEL),
        "schedule": tiny_schedule(iterations, **schedule),
        "deploy": dict(CHEAP_DEPLOY),
    }


def distill_spec(teacher_checkpoint: str, method: str = "icd", iterations: int = 4, **schedule: Any) -> dict[str, Any]:
    return {
        "kind": "distill",
        "name": f"tiny-{method}",
        "seed": 0,
        "device": "cpu",
        "data": tiny_data(),
        "teacher": {**TINY_MODEL, "checkpoint": teacher_checkpoint},
        "student": dict(TINY_MODEL),
        "distill": {"method": method, "icd": {"bypass_iters": 1}},
        "schedule": tiny_schedule(iterations, grad_clip=1.0, **schedule),
        "deploy": dict(CHEAP_DEPLOY),
    }
