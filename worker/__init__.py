"""Celery workers: run one job per task with `icd_core` and report into the database.

`worker.app` is the Celery app (`celery -A worker.app worker`), `worker.tasks` the task and its signal
handlers (the only Celery code), `worker.run_job` / `worker.outcome` running a job and recording its outcome,
`worker.reporter` the trainer callback that writes progress, `worker.supervisor` the worker processes
that `icd worker` (in `icd_cli.service`) starts.
"""
