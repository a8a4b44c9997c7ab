"""The Celery app (`celery -A worker.app worker`), configured from `store.settings`.

The database, not Celery, holds job state: results are ignored, messages are acknowledged only
after the task ends (a worker that dies leaves the message for another), and each worker takes
one message at a time so a long training never holds a second job hostage.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from store.dispatch import TASK_NAME
from store.settings import get_settings

QUEUES = ("cuda", "cpu", "any")
# Kombu's SQLAlchemy transport polls its table; its default of 1 s would add up to 1 s to every
# dispatch on the embedded broker.
SQLA_POLLING_INTERVAL_S = 0.1


def broker_transport_options(broker_url: str, visibility_timeout_s: float = 60.0) -> dict[str, Any]:
    """Per-transport options. The SQLAlchemy transport hands its options to create_engine, so it
    gets none (its polling interval is set on the transport class instead).

    Redis re-delivers an unacknowledged message after `visibility_timeout_s` (settings: a little
    above the lease timeout), so the message of a worker that died comes back soon. A job that runs
    longer is redelivered too, and that delivery is a no-op: the lease, not the broker, decides who
    runs a job (claim_job), and the reaper re-sends a job whose lease expired anyway."""
    if broker_url.startswith("redis"):
        return {
            "visibility_timeout": visibility_timeout_s,
            "socket_connect_timeout": 5,
            # Kombu looks for overdue messages every 10 s but scans only on every 10th look (so ~100 s
            # late); scan on each look, a few times per visibility timeout (one small ZRANGE each).
            "unacked_restore_interval": max(1.0, min(10.0, visibility_timeout_s / 4)),
            "unacked_restore_throttle": 1,
        }
    return {}


def _tune_sqla_transport() -> None:
    """Poll the embedded SQLite broker every 0.1 s instead of every 1 s."""
    from kombu.transport.sqlalchemy import Transport

    Transport.polling_interval = SQLA_POLLING_INTERVAL_S


def make_app() -> Celery:
    settings = get_settings()
    broker_url = settings.broker_url
    if broker_url.startswith(("sqla+", "sqlalchemy+")):
        _tune_sqla_transport()
    embedded = broker_url.startswith(("sqla+", "sqlalchemy+"))
    celery_app = Celery("icd", broker=broker_url, include=["worker.tasks"])
    celery_app.conf.update(
        broker_transport_options=broker_transport_options(broker_url, settings.visibility_timeout_s),
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_default_queue="any",
        task_routes={TASK_NAME: {"queue": "any"}},  # the API names the queue per job (store.dispatch.queue_for)
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",  # see worker.supervisor: DataLoader processes cannot start inside prefork children
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_timeout=5,
        # Remote control needs fanout exchanges, which the SQLAlchemy transport lacks.
        worker_enable_remote_control=not embedded,
    )
    return celery_app


app = make_app()
