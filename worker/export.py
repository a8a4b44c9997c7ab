"""kind=export: a finished run's model exported and verified (icd_core.export) in a child process.

The job's own folder holds the files (`exports/model.onnx`, `model.ts`, their metadata beside them, and
`exports.json` with each file's sha256 and size), which the API serves at /jobs/{source}/exports. An export
keeps no checkpoint: every attempt (a retry after a lost worker, or a user's retry) clears the folder and
starts over. The child runs the exporters, which hold the interpreter lock for seconds at a time, so this
process keeps renewing the lease and hears a cancel, a shutdown or a lost lease, and kills the child then.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from icd_core.atomic_files import write_text_atomic
from icd_core.run_layout import EXPORTS_DIR, EXPORTS_RECORD
from icd_core.spec import ExportSpec
from store.artifacts import ArtifactStore
from store.jobs import LeaseLost
from store.settings import get_settings
from worker.reporter import DbReporter

log = logging.getLogger(__name__)


class ExportFailed(ValueError):
    """A format could not be exported or did not verify; the message says which and why."""


def run_export(spec_dict: dict[str, Any], owner: str | None, job_dir: Path, reporter: DbReporter) -> dict[str, float]:
    """Export every format the spec names into `job_dir/exports/`; the job's final metrics (size, and the
    exported model's AP on the check) when all of them verified, else ExportFailed naming each failure."""
    from icd_core.engine.callbacks import TrainingStopped
    from icd_core.export_process import export_checkpoint_in_child
    from worker.run_job import confine, resolve_checkpoint

    spec: ExportSpec = confine(ExportSpec.model_validate(spec_dict), owner)
    checkpoint = resolve_checkpoint(spec.checkpoint)
    out = job_dir / EXPORTS_DIR
    shutil.rmtree(out, ignore_errors=True)  # checkpoint-free: an earlier attempt's files are not this one's
    log.info("exporting %s as %s", spec.checkpoint, ", ".join(spec.formats))

    def check() -> None:
        if reporter.should_stop():
            raise TrainingStopped(0)

    failed = export_checkpoint_in_child(
        checkpoint, out, spec.formats, get_settings().cache_dir, spec.verify_images, spec.eval_images, check
    )
    if failed:
        raise ExportFailed("; ".join(f"{fmt}: {why}" for fmt, why in failed.items()))
    if not reporter.confirm_ownership():
        raise LeaseLost(f"job {reporter.job_id}: attempt {reporter.attempt} lost the job before recording its exports")
    return _record(out, spec.formats)


def export_file(out: Path, fmt: str) -> Path:
    from icd_core.export import SUFFIX

    return out / f"model{SUFFIX[fmt]}"


def _record(out: Path, formats: list[str]) -> dict[str, float]:
    """exports.json (what the API serves) and the job's final metrics."""
    from icd_core.export import meta_sidecar

    record: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for fmt in formats:
        path = export_file(out, fmt)
        size = path.stat().st_size
        record[fmt] = {"file": path.name, "sha256": ArtifactStore.sha256_file(path), "size_bytes": size}
        verification = json.loads(meta_sidecar(path).read_text()).get("verification") or {}
        metrics[f"{fmt}_size_mb"] = size / 2**20
        if isinstance(verification.get("exported_AP"), (int, float)):
            metrics[f"{fmt}_AP"] = float(verification["exported_AP"])
        log.info("exported %s: %s (%d bytes, sha256 %s)", fmt, path, size, record[fmt]["sha256"])
    write_text_atomic(out / EXPORTS_RECORD, json.dumps(record, indent=2))
    return metrics
