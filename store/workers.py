"""Worker registry: each worker upserts a heartbeat row; 'alive' means a recent heartbeat."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.orm import Session

from store.models import Worker, utcnow
from store.upsert import dialect_insert


def heartbeat(
    s: Session,
    name: str,
    hostname: str,
    device: str,
    queues: str,
    pid: int | None,
    current_job_id: int | None,
) -> None:
    """Insert or refresh this worker's row (started_at is kept from the first beat)."""
    now = utcnow()
    values = dict(
        name=name,
        hostname=hostname,
        device=device,
        queues=queues,
        pid=pid,
        current_job_id=current_job_id,
        started_at=now,
        last_heartbeat=now,
    )
    ins = dialect_insert(s, Worker).values(**values)
    update_cols: dict[str, Any] = {k: v for k, v in values.items() if k not in ("name", "started_at")}
    # A new process under the same name (a restart) gets a new started_at.
    update_cols["started_at"] = case((Worker.pid == ins.excluded.pid, Worker.started_at), else_=ins.excluded.started_at)
    s.execute(ins.on_conflict_do_update(index_elements=[Worker.name], set_=update_cols))
    s.commit()


def list_workers(s: Session, alive_within_s: float | None = None) -> list[Worker]:
    """Workers by name; with alive_within_s only those that beat that recently."""
    q = select(Worker).order_by(Worker.name)
    if alive_within_s is not None:
        q = q.where(Worker.last_heartbeat >= utcnow() - timedelta(seconds=alive_within_s))
    return list(s.scalars(q))


def remove_worker(s: Session, name: str) -> None:
    """Forget a worker at clean shutdown so /workers does not list it until its heartbeat ages out."""
    w = s.get(Worker, name)
    if w is not None:
        s.delete(w)
        s.commit()


def live_queues(s: Session, alive_within_s: float) -> set[str]:
    """Every queue that at least one live worker consumes."""
    return {q.strip() for w in list_workers(s, alive_within_s) for q in (w.queues or "").split(",") if q.strip()}
