"""A service study pre-trains the ICD decoder once per teacher: the first icd_pretrained child does it,
the other icd_pretrained children wait for that child and load the cached artifact."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from store.jobs import create_job
from store.models import Job
from tests.helpers import one_child_study_spec
from tests.service.test_worker_task import _spec, sessions  # noqa: F401  (fixture)


def test_icd_pretrained_children_wait_for_the_first_one(sessions: Any) -> None:  # noqa: F811
    from worker.study import start_study

    base = _spec("train")
    study = {
        "kind": "study",
        "name": "st",
        "device": "cpu",
        "data": base["data"],
        "teacher": base["model"],
        "student": base["model"],
        "methods": ["icd", "icd_pretrained"],
        "seeds": [0, 1],
        "teacher_schedule": {"iterations": 2, "batch_size": 2},
        "schedule": {"iterations": 2, "batch_size": 2},
        "distill": {"icd": {"heads": 8, "pretrain": {"steps": 5}}},
    }
    with sessions() as s:
        job = create_job(s, study, "study", "st", "cpu", [])
        job.status = "running"
        s.commit()
        queued = start_study(s, job, lambda ref: ref)
        assert [q.kind for q in queued] == ["train"]  # only the teacher runs now; every child waits
        rows = s.query(Job).filter_by(parent_id=job.id).order_by(Job.id).all()
    teacher = next(r for r in rows if r.kind == "train")
    distill = [r for r in rows if r.kind == "distill"]
    pre = [r for r in distill if r.spec["distill"]["icd"].get("pretrain")]
    joint = [r for r in distill if r.spec["distill"]["method"] == "icd" and r not in pre]
    assert len(pre) == 2 and len(joint) == 2
    assert pre[0].depends_on == [teacher.id]
    assert pre[1].depends_on == [teacher.id, pre[0].id]
    assert all(j.depends_on == [teacher.id] for j in joint)


def test_a_study_whose_children_were_ended_by_a_reaper_is_closed_by_the_sweep(sessions: Any) -> None:  # noqa: F811
    """The API's reaper fails a child at max_attempts without running the study's bookkeeping; the
    workers' sweep then closes the study instead of leaving it waiting forever."""
    from store.jobs import claim_job, fail_job, reap_expired_leases, utcnow
    from worker.study import close_ended_studies, start_study

    base = _spec("train")
    study = one_child_study_spec(base, "reaped")
    with sessions() as s:
        job = create_job(s, study, "study", "reaped", "cpu", [])
        job.status = "running"
        s.commit()
        (teacher,) = start_study(s, job, lambda ref: ref)
        assert close_ended_studies(s) == []  # children still to run: nothing to close
        claim_job(s, teacher.id, "w1", lease_s=1)
        later = utcnow() + timedelta(seconds=60)
        assert reap_expired_leases(s, later, max_attempts=1).ended == [teacher.id]  # by the reaper, no task
        for child in s.query(Job).filter_by(parent_id=job.id, status="waiting"):
            fail_job(s, child.id, f"dependency {teacher.id} failed")  # what release_dependents does
        assert s.get(Job, job.id).status == "waiting"  # premise: nobody has closed the study

        assert close_ended_studies(s) == [job.id]
        s.expire_all()
        closed = s.get(Job, job.id)
        assert closed.status == "failed" and closed.error, closed.error
        assert close_ended_studies(s) == []  # closed once
