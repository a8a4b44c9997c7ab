"""The artifact folder: one run folder per job (checkpoints, the job log, reports).

The database stores paths relative to the root, so the folder can be moved or mounted elsewhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from icd_core.hashing import sha256_file
from icd_core.run_layout import CHECKPOINT_DIR, EXPORTS_DIR, LOG_FILE

REPORT_DIR = "report"  # a study's leaderboard files: report.json / .md / .png


class ArtifactStore:
    """Paths under one root: root/jobs/<id>/ (checkpoints/, job.log and a study's report/ inside)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def job_dir(self, job_id: int) -> Path:
        """The job's run folder (the trainer's output_dir); created on first use."""
        d = self.root / "jobs" / str(int(job_id))
        d.mkdir(parents=True, exist_ok=True)
        return d

    def log_path(self, job_id: int) -> Path:
        return self.root / "jobs" / str(int(job_id)) / LOG_FILE

    def checkpoint_dir(self, job_id: int) -> Path:
        return self.root / "jobs" / str(int(job_id)) / CHECKPOINT_DIR

    def exports_dir(self, job_id: int) -> Path:
        """Where an export job writes its verified files (the worker) and the API serves them from."""
        return self.root / "jobs" / str(int(job_id)) / EXPORTS_DIR

    def report_dir(self, job_id: int) -> Path:
        """Where a study's leaderboard report is written (the worker) and served from (the API)."""
        return self.root / "jobs" / str(int(job_id)) / REPORT_DIR

    def relative(self, path: str | Path) -> str:
        """Path as stored in the database (POSIX, relative to the root)."""
        return Path(path).expanduser().resolve().relative_to(self.root).as_posix()

    def absolute(self, rel: str | Path) -> Path:
        """Resolve a stored path; refuses anything that escapes the root (a tampered row, '..')."""
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:
            raise ValueError(f"artifact path escapes the artifact root: {rel}")
        return p

    def delete_job(self, job_id: int) -> None:
        """Remove the job's run folder (no error if it never existed)."""
        shutil.rmtree(self.root / "jobs" / str(int(job_id)), ignore_errors=True)

    sha256_file = staticmethod(sha256_file)
