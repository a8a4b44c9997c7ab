"""Send a job to the broker by task name, without importing worker/ (the API stays light).

A message wakes a worker of its queue; the worker then claims the job the database puts first on all its
queues (docs/scheduling.md), which need not be the job the message names.

Queues: "cuda" for specs that ask for a GPU, "cpu" for CPU-only, "any" for device: auto.
GPU workers consume "cuda,any" and CPU workers "cpu,any".
A job of resources.gpus N > 1 goes to "<queue>-gN" (e.g. cuda-g4): routing, not a claim rule, so the
broker never offers it to a worker that owns fewer devices. A worker owning N devices consumes its
plain queues and their -g2 .. -gN groups (`group_queues`).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any

from sqlalchemy.engine import make_url

TASK_NAME = "icd.run_job"


class BrokerUnavailable(RuntimeError):
    """The message could not be published (broker down or unreachable)."""


_GROUP_QUEUE = re.compile(r"^(?P<base>.+)-g(?P<gpus>\d+)$")


def queue_for(spec: Any) -> str:
    """The queue a spec (model or dict) runs on, from its `device` and `resources.gpus`."""
    device = spec.get("device", "auto") if isinstance(spec, dict) else getattr(spec, "device", "auto")
    device = str(device or "auto")
    base = "cuda" if device.startswith("cuda") else "cpu" if device == "cpu" else "any"
    gpus = group_size(spec)
    return f"{base}-g{gpus}" if gpus > 1 else base


def group_size(spec: Any) -> int:
    """resources.gpus of a spec (model or dict); 1 when absent."""
    resources = spec.get("resources") if isinstance(spec, dict) else getattr(spec, "resources", None)
    if resources is None:
        return 1
    gpus = resources.get("gpus", 1) if isinstance(resources, dict) else getattr(resources, "gpus", 1)
    return int(gpus or 1)


def group_queues(queues: str, gpus: int) -> str:
    """The queues of a worker owning `gpus` devices: `queues` plus each plain one's -g2 .. -g<gpus>."""
    names = [q for q in queues.split(",") if q]
    plain = [q for q in names if not _GROUP_QUEUE.match(q)]
    groups = [f"{q}-g{n}" for n in range(2, gpus + 1) for q in plain]
    return ",".join(dict.fromkeys([*names, *groups]))


def gpus_served(queues: str) -> int:
    """The largest group a worker consuming `queues` runs (1: single-device jobs only)."""
    sizes = [int(m["gpus"]) for q in queues.split(",") if (m := _GROUP_QUEUE.match(q))]
    return max([1, *sizes])


@lru_cache(maxsize=8)
def _client(broker_url: str) -> Any:
    """One Celery client per broker URL, reused so a POST does not reconnect from scratch."""
    import celery

    app = celery.Celery("icd-client", broker=broker_url)
    app.conf.broker_connection_timeout = 2.0
    app.conf.broker_connection_retry_on_startup = False
    # Fail fast (about 1 s) instead of Celery's default retry loop when the broker is down.
    app.conf.task_publish_retry_policy = {
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": 0.3,
        "interval_max": 0.5,
    }
    if broker_url.startswith("redis"):
        app.conf.broker_transport_options = {"socket_connect_timeout": 2, "socket_timeout": 5}
    return app


def enqueue(job_id: int, queue: str, broker_url: str) -> str:
    """Publish icd.run_job(job_id) on `queue`; returns the Celery task id. Raises BrokerUnavailable.

    A failed publish is tried once more on a fresh client: a cached client's channel can come back
    broken (seen in CI with the embedded SQLite broker: "'NoneType' object has no attribute 'client'"
    on the first POST), and a duplicate message is harmless because claiming a job is guarded.
    """
    try:
        return _publish(job_id, queue, broker_url)
    except Exception:  # noqa: BLE001 - tried again below, where the error is reported
        _drop_client(broker_url)
    try:
        return _publish(job_id, queue, broker_url)
    except Exception as exc:  # kombu/redis raise many types; the caller only needs "not sent"
        raise BrokerUnavailable(f"broker unreachable ({_safe(broker_url)}): {exc}") from exc


def _publish(job_id: int, queue: str, broker_url: str) -> str:
    return str(_client(broker_url).send_task(TASK_NAME, args=[int(job_id)], queue=queue).id)


def _drop_client(broker_url: str) -> None:
    """Forget the cached client (and close its connections) so the next call builds a new one."""
    try:
        _client(broker_url).close()
    except Exception:  # noqa: BLE001, S110 - it is being thrown away
        pass
    _client.cache_clear()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url.replace("sqla+", "", 1)).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def check_broker(broker_url: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(ok, detail) for /health: connect once to a server broker; for the embedded SQLite broker,
    check that its file (or folder) is writable."""
    if broker_url.startswith("sqla+sqlite"):
        db = broker_url.split("sqlite:///", 1)[-1]
        if not db or db == ":memory:":
            return True, "embedded sqlite broker (in memory)"
        path = os.path.abspath(db)
        target = path if os.path.exists(path) else os.path.dirname(path) or "."
        if os.path.exists(target) and os.access(target, os.W_OK):
            return True, f"embedded sqlite broker at {path}"
        return False, f"embedded broker file not writable: {path}"
    from kombu import Connection

    try:
        with Connection(broker_url, connect_timeout=timeout_s) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s)
        return True, f"connected to {_safe(broker_url)}"
    except Exception as exc:
        return False, f"cannot connect to {_safe(broker_url)}: {exc}"
