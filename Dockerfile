# One image for every role: `icd db upgrade` (migrate), `icd serve --no-worker` (api), `icd worker`.
# torch's Linux wheels from PyPI carry their CUDA runtime, so the same image runs on CPU and GPU hosts
# (the GPU host needs the NVIDIA container toolkit).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ICD_HOME=/data \
    ICD_ARTIFACT_ROOT=/data/artifacts \
    ICD_CACHE_DIR=/data/cache

# libgomp: OpenMP runtime for torch on CPU; libgl/glib are not needed (no OpenCV).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, so code edits do not reinstall torch: install the pinned requirements from
# pyproject with a stub package, then the real source.
COPY pyproject.toml ./
RUN mkdir -p icd_core store api worker migrations \
    && touch icd_core/__init__.py store/__init__.py api/__init__.py worker/__init__.py migrations/__init__.py \
    && pip install . \
    && pip uninstall -y icd-service \
    && rm -rf icd_core store api worker migrations build *.egg-info

COPY icd_core ./icd_core
COPY store ./store
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-deps . && rm -rf build *.egg-info

RUN useradd --create-home --uid 1000 icd && mkdir -p /data /datasets && chown icd:icd /data
USER icd
VOLUME ["/data"]
EXPOSE 8000

CMD ["icd", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
