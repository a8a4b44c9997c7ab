"""Offline interactive docs (/docs, /redoc) and the ready-to-run example specs shown in "Try it out".

FastAPI's defaults load Swagger UI and ReDoc from a public CDN (a blank page without internet), and the
old `swagger-ui-bundle` wheel ships Swagger UI 4, which refuses FastAPI's OpenAPI 3.1 documents. Both
UIs are vendored instead, pinned, from npm (`swagger-ui-dist` 5, `redoc` 2; see
api/static/vendor/package.json and scripts/vendor_assets.sh), so what renders is what was tested.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

VENDOR = "/static/vendor"

# A small detector pair on generated shapes: trains on 2 CPU cores in minutes.
_SHAPES_DATA: dict[str, Any] = {
    "train": {"format": "shapes", "num_images": 256, "image_size": 128, "seed": 1, "max_object": 48},
    "val": {"format": "shapes", "num_images": 64, "image_size": 128, "seed": 2, "max_object": 48},
    "min_size": 128,
    "max_size": 128,
    "workers": 0,
}
_SMALL_NECK: dict[str, Any] = {
    "fpn_channels": 64,
    "levels": ["p3", "p4", "p5"],
    "anchor_sizes": [16, 32, 64],
    "head_convs": 2,
}
_SCHEDULE: dict[str, Any] = {
    "iterations": 300,
    "batch_size": 8,
    "lr": 0.01,
    "warmup_iters": 50,
    "eval_every": 100,
    "checkpoint_every": 100,
}

TRAIN_EXAMPLE: dict[str, Any] = {
    "name": "teacher-r34-shapes",
    "kind": "train",
    "seed": 0,
    "data": _SHAPES_DATA,
    "model": {"detector": "retinanet", "backbone": "resnet34", **_SMALL_NECK},
    "schedule": _SCHEDULE,
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
    "schedule": _SCHEDULE,
    "device": "auto",
}

# Self-contained: the study trains its own teacher first, so it runs on a fresh server.
STUDY_EXAMPLE: dict[str, Any] = {
    "name": "study-r34-to-r18-shapes",
    "kind": "study",
    "seed": 0,
    "data": _SHAPES_DATA,
    "teacher": {"detector": "retinanet", "backbone": "resnet34", **_SMALL_NECK},
    "teacher_schedule": _SCHEDULE,
    "student": {"detector": "retinanet", "backbone": "resnet18", **_SMALL_NECK},
    "methods": ["none", "icd"],
    "seeds": [0],
    "distill": {"inherit": True, "icd": {"max_queries": 100}},
    "schedule": _SCHEDULE,
    "device": "auto",
}

# Dict order is the order of Swagger UI's example picker; the first one fills "Try it out".
SUBMIT_EXAMPLES: dict[str, dict[str, Any]] = {
    "train_teacher": {
        "summary": "Train a small teacher on shapes (runs on a fresh server)",
        "description": "A ResNet-34 RetinaNet on generated shapes; its final checkpoint is `job:<id>`.",
        "value": TRAIN_EXAMPLE,
    },
    "distill_icd": {
        "summary": "ICD distillation on shapes (teacher = job 1)",
        "description": "Distills the teacher trained by job 1 into a ResNet-18 student with ICD. "
        "Submit the train example first if job 1 does not exist; this job waits for it.",
        "value": DISTILL_EXAMPLE,
    },
    "study": {
        "summary": "A study: teacher, then no-KD and ICD students, then a leaderboard",
        "description": "Trains its teacher (teacher_schedule), then one child distill job per method and seed.",
        "value": STUDY_EXAMPLE,
    },
}

_SWAGGER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" type="image/png" href="{vendor}/swagger-ui/favicon-32x32.png">
<link rel="stylesheet" href="{vendor}/swagger-ui/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{vendor}/swagger-ui/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: {openapi_url}, dom_id: "#swagger-ui", deepLinking: true, persistAuthorization: true,
  displayRequestDuration: true, tryItOutEnabled: false, layout: "BaseLayout", validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis], plugins: [SwaggerUIBundle.plugins.DownloadUrl],
}});
</script></body></html>
"""

_REDOC_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" type="image/png" href="{vendor}/swagger-ui/favicon-32x32.png"></head>
<body><div id="redoc"></div>
<script src="{vendor}/redoc/redoc.standalone.js"></script>
<script>Redoc.init({openapi_url}, {{disableSearch: false, hideDownloadButton: false}},
  document.getElementById("redoc"));</script>
</body></html>
"""


def install_offline_docs(app: FastAPI) -> None:
    """Serve /docs (Swagger UI 5) and /redoc (ReDoc 2) from the vendored assets under /static
    (create the app with docs_url=None and redoc_url=None; the caller mounts /static)."""
    openapi_url = json.dumps(app.openapi_url or "/openapi.json")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return HTMLResponse(_SWAGGER_PAGE.format(title=f"{app.title} - docs", vendor=VENDOR, openapi_url=openapi_url))

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return HTMLResponse(_REDOC_PAGE.format(title=f"{app.title} - ReDoc", vendor=VENDOR, openapi_url=openapi_url))
