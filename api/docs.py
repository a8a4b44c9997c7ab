"""Offline interactive docs and the ready-to-run example specs shown in "Try it out".

FastAPI's default /docs loads Swagger UI from a public CDN, which is a blank page without internet;
here the assets come from the installed `swagger-ui-bundle` package instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

SWAGGER_STATIC = "/static/swagger"

# A small detector pair on generated shapes: trains on 2 CPU cores in minutes.
_SHAPES_DATA: dict[str, Any] = {
    "train": {"format": "shapes", "num_images": 256, "image_size": 128, "seed": 1, "max_object": 48},
    "val": {"format": "shapes", "num_images": 64, "image_size": 128, "seed": 2, "max_object": 48},
    "min_size": 128,
    "max_size": 128,
    "workers": 0,
}
_SMALL_NECK: dict[str, Any] = {"fpn_channels": 64, "levels": ["p3", "p4", "p5"], "anchor_sizes": [16, 32, 64],
                               "head_convs": 2}

TRAIN_EXAMPLE: dict[str, Any] = {
    "name": "teacher-r34-shapes",
    "kind": "train",
    "seed": 0,
    "data": _SHAPES_DATA,
    "model": {"detector": "retinanet", "backbone": "resnet34", **_SMALL_NECK},
    "schedule": {"iterations": 300, "batch_size": 8, "lr": 0.01, "warmup_iters": 50, "eval_every": 100,
                 "checkpoint_every": 100},
    "device": "auto",
}

DISTILL_EXAMPLE: dict[str, Any] = {
    "name": "icd-r34-to-r18-shapes",
    "kind": "distill",
    "seed": 0,
    "data": _SHAPES_DATA,
    "teacher": {"detector": "retinanet", "backbone": "resnet34", "checkpoint": "job:1", **_SMALL_NECK},
    "student": {"detector": "retinanet", "backbone": "resnet18", **_SMALL_NECK},
    "distill": {"method": "icd", "inherit": True, "icd": {"bypass_iters": 50, "max_queries": 100}},
    "schedule": {"iterations": 300, "batch_size": 8, "lr": 0.01, "warmup_iters": 50, "eval_every": 100,
                 "checkpoint_every": 100},
    "device": "auto",
}

SUBMIT_EXAMPLES: dict[str, dict[str, Any]] = {
    "distill_icd": {
        "summary": "ICD distillation on shapes (teacher = job 1)",
        "description": "Distills the teacher trained by job 1 into a ResNet-18 student with ICD. "
        "Submit the train example first if job 1 does not exist; this job waits for it.",
        "value": DISTILL_EXAMPLE,
    },
    "train_teacher": {
        "summary": "Train a small teacher on shapes",
        "description": "A ResNet-34 RetinaNet on generated shapes; its final checkpoint is `job:<id>`.",
        "value": TRAIN_EXAMPLE,
    },
}


def install_offline_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /docs from local static files (create the app with docs_url=None)."""
    import swagger_ui_bundle

    app.mount(SWAGGER_STATIC, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - docs",
            swagger_js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_STATIC}/favicon-32x32.png",
        )
