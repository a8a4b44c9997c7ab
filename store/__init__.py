"""The database (ORM models, sessions, queries) and the artifact store.

Everything others call is re-exported here: `from store import claim_job, add_metrics, ...`.
Mutating query functions commit their own unit of work.
"""

from store.artifacts import ArtifactStore
from store.db import (
    DatabaseNotMigrated,
    current_revision,
    downgrade_database,
    ensure_migrated,
    head_revision,
    make_engine,
    session_factory,
    session_scope,
    upgrade_database,
)
from store.dispatch import BrokerUnavailable, check_broker, enqueue, queue_for
from store.jobs import (
    JobNotFound,
    JobStateError,
    claim_job,
    count_jobs,
    create_job,
    delete_job,
    expire_leases_of,
    fail_job,
    finish_job,
    get_job,
    is_cancel_requested,
    list_jobs,
    mark_canceled,
    reap_expired_leases,
    release_dependents,
    renew_lease,
    request_cancel,
    retry_job,
    settle_waiting,
    update_progress,
)
from store.models import Attempt, Checkpoint, Evaluation, Job, Metric, Worker
from store.results import (
    add_checkpoint,
    add_evaluation,
    add_metrics,
    final_checkpoint_path,
    get_checkpoint,
    get_metrics,
    list_checkpoints,
    list_evaluations,
)
from store.settings import Settings, get_settings
from store.workers import heartbeat, list_workers, remove_worker

__all__ = [
    "ArtifactStore", "Attempt", "BrokerUnavailable", "Checkpoint", "DatabaseNotMigrated", "Evaluation", "Job",
    "JobNotFound", "JobStateError", "Metric", "Settings", "Worker", "add_checkpoint", "add_evaluation", "add_metrics",
    "check_broker", "claim_job", "count_jobs", "create_job", "current_revision", "delete_job", "downgrade_database",
    "enqueue", "ensure_migrated", "expire_leases_of", "fail_job", "final_checkpoint_path", "finish_job",
    "get_checkpoint", "get_job", "get_metrics", "get_settings", "head_revision", "heartbeat", "is_cancel_requested",
    "list_checkpoints", "list_evaluations", "list_jobs", "list_workers", "make_engine", "mark_canceled", "queue_for",
    "reap_expired_leases", "release_dependents", "remove_worker", "renew_lease", "request_cancel", "retry_job",
    "session_factory", "session_scope",
    "settle_waiting", "update_progress", "upgrade_database",
]
