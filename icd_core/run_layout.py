"""The files of one run's folder, named once: every writer and reader (CLI, worker, API, studies) uses these.

<run>/spec.json        the validated spec the run was started with
<run>/summary.json     final metrics, costs and what the run loaded (written last, atomically)
<run>/job.log          the run's log (service jobs)
<run>/checkpoints/     step checkpoints and the final one
<run>/exports/         an export job's verified files (exports.json lists them with their sha256)
"""

from __future__ import annotations

SPEC_FILE = "spec.json"
SUMMARY_FILE = "summary.json"
LOG_FILE = "job.log"
CHECKPOINT_DIR = "checkpoints"
EXPORTS_DIR = "exports"
EXPORTS_RECORD = "exports.json"  # an export job's files: {format: {file, sha256, size_bytes}}
