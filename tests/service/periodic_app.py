"""An API app whose one periodic task appends this process's pid to $ICD_TEST_TICKS (test_multiprocess.py
starts it in several uvicorn processes to see which of them runs the task)."""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

from api.main import create_app
from api.periodic import PeriodicTask


def _tick(_session: Any) -> None:
    with open(os.environ["ICD_TEST_TICKS"], "a") as f:
        f.write(f"{os.getpid()}\n")


def make() -> FastAPI:
    return create_app(periodic=[PeriodicTask("tick", float(os.environ.get("ICD_TEST_TICK_S", "0.1")), _tick)])
