"""Named API tokens: create (the secret is shown once), list, revoke, and look up a presented secret."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from icd_core.spec import DEFAULT_PRIORITY, INT32_MAX, PRIORITY_MAX, PRIORITY_MIN
from store.models import ApiToken, Job, JobStatus

SECRET_PREFIX = "icd_"  # recognisable in logs and secret scanners
LEGACY_OWNER = "ICD_API_TOKEN"  # the owner recorded for the shared admin token (settings.api_token)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


class TokenError(ValueError):
    """A token name that is invalid, taken, or unknown."""


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Quota:
    """A token's limits; None: unlimited (max_priority None: the default priority)."""

    max_running: int | None = None
    max_gpus: int | None = None
    max_priority: int | None = None

    def problems(self) -> list[str]:
        limits = {"max_running": self.max_running, "max_gpus": self.max_gpus}
        out = [f"{n} must be at least 1 (or none: no limit)" for n, v in limits.items() if v is not None and v < 1]
        if self.max_priority is not None and not PRIORITY_MIN <= self.max_priority <= PRIORITY_MAX:
            out.append(f"max_priority must be within {PRIORITY_MIN}..{PRIORITY_MAX}")
        return out


def create_token(
    s: Session, name: str, admin: bool = False, takes_over_jobs: bool = False, quota: Quota | None = None
) -> tuple[ApiToken, str]:
    """A new token and its secret (256 random bits); only the secret's sha256 is stored.

    A name is an owner: jobs keep it after their token is revoked, so a new token under a revoked
    name would see and manage them. That takes `takes_over_jobs`, said on purpose by an admin.
    """
    if not _NAME.match(name):
        raise TokenError(f"token name {name!r}: 1-100 letters, digits, '.', '_', '@' or '-', starting alphanumeric")
    if s.execute(select(ApiToken.id).where(ApiToken.name == name)).first() is not None:
        raise TokenError(f"a token named {name!r} exists; revoke it first or choose another name")
    if not takes_over_jobs and s.execute(select(Job.id).where(Job.owner == name).limit(1)).first() is not None:
        raise TokenError(
            f"jobs are owned by {name!r} (a revoked token's name): a new token under it would see and manage "
            "them; choose another name, or pass --takes-over-jobs to give them to the new token"
        )
    quota = quota or Quota()
    if quota.problems():
        raise TokenError("; ".join(quota.problems()))
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name,
        secret_sha256=secret_hash(secret),
        admin=admin,
        max_running=quota.max_running,
        max_gpus=quota.max_gpus,
        max_priority=quota.max_priority,
    )
    s.add(token)
    s.commit()
    return token, secret


def list_tokens(s: Session) -> list[ApiToken]:
    return list(s.execute(select(ApiToken).order_by(ApiToken.name)).scalars())


def revoke_token(s: Session, name: str) -> None:
    """Delete the token: its secret stops working at once; the jobs it owns keep its name as owner."""
    res = s.execute(delete(ApiToken).where(ApiToken.name == name))
    s.commit()
    if not res.rowcount:  # type: ignore[attr-defined]
        raise TokenError(f"no token named {name!r} (see `icd token list`)")


def set_quota(s: Session, name: str, quota: Quota) -> ApiToken:
    """Replace a token's quotas (None: no limit). Jobs already running keep running; queued ones start
    as the new limits allow."""
    if quota.problems():
        raise TokenError("; ".join(quota.problems()))
    res = s.execute(
        update(ApiToken)
        .where(ApiToken.name == name)
        .values(max_running=quota.max_running, max_gpus=quota.max_gpus, max_priority=quota.max_priority)
    )
    s.commit()
    if not res.rowcount:  # type: ignore[attr-defined]
        raise TokenError(f"no token named {name!r} (see `icd token list`)")
    token = s.execute(select(ApiToken).where(ApiToken.name == name)).scalar_one()
    return token


def priority_cap(s: Session, name: str | None) -> int:
    """The highest priority a non-admin token may give its jobs: its max_priority, else the default."""
    cap = s.execute(select(ApiToken.max_priority).where(ApiToken.name == name)).scalar_one_or_none()
    return DEFAULT_PRIORITY if cap is None else int(cap)


def usage(s: Session) -> dict[str | None, tuple[int, int, int]]:
    """{owner: (running jobs, devices they hold, queued jobs)} for every owner with active jobs."""
    out: dict[str | None, tuple[int, int, int]] = {}
    rows = s.execute(
        select(Job.owner, Job.status, func.count(), func.coalesce(func.sum(Job.gpus), 0))
        .where(Job.status.in_((JobStatus.RUNNING, JobStatus.QUEUED)))
        .group_by(Job.owner, Job.status)
    ).all()
    for owner, status, n, devices in rows:
        running, held, queued = out.get(owner, (0, 0, 0))
        out[owner] = (n, int(devices), queued) if status == JobStatus.RUNNING else (running, held, n)
    return out


def owner_is_admin(s: Session, owner: str | None) -> bool:
    """Whether jobs of `owner` were submitted with admin rights: the anonymous local admin (None), the
    shared admin token, or a named admin token that still exists."""
    if owner is None or owner == LEGACY_OWNER:
        return True
    return bool(s.execute(select(ApiToken.admin).where(ApiToken.name == owner)).scalar_one_or_none())


def may_read_job(s: Session, reader: str | None, job_id: int) -> bool:
    """Whether a job owned by `reader` may use job `job_id`'s files: its own jobs, or any as an admin.
    The API's Caller.can_see is the same rule for a live request."""
    job = s.get(Job, job_id) if 0 < job_id <= INT32_MAX else None
    return job is not None and (job.owner == reader or owner_is_admin(s, reader))


def find_token(s: Session, secret: str) -> ApiToken | None:
    """The token whose secret this is, or None."""
    return s.execute(select(ApiToken).where(ApiToken.secret_sha256 == secret_hash(secret))).scalar_one_or_none()


def has_tokens(s: Session) -> bool:
    return s.execute(select(ApiToken.id).limit(1)).first() is not None
