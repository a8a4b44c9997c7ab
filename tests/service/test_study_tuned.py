"""A tuned study in the service: a sweep child per method first, then the seeds at each one's best setting,
then a report with the tuned settings and the tuning section. Real database, the worker's own functions."""

from __future__ import annotations

import json
from typing import Any

from store.artifacts import ArtifactStore
from store.jobs import claim_job, create_job, fail_job, finish_job, finish_study, park_study
from store.models import Job
from store.settings import get_settings
from tests.service.test_worker_task import _spec, sessions  # noqa: F401  (fixture)


def tuned_study() -> dict[str, Any]:
    base = _spec("train")
    return {
        "kind": "study",
        "name": "tuned",
        "device": "cpu",
        "data": base["data"],
        "teacher": base["model"],
        "student": base["model"],
        "methods": ["fitnet", "fgd"],
        "seeds": [0, 1],
        "teacher_schedule": {"iterations": 2, "batch_size": 2},
        "schedule": {"iterations": 4, "batch_size": 2, "eval_every": 2},
        "require_teacher_better": False,
        "tune": {"trials": 3, "split": 0.5},
    }


def _succeed(s: Any, job: Job, metrics: dict[str, Any]) -> None:
    claim_job(s, job.id, "w1")
    finish_job(s, job.id, metrics)


def test_a_tuned_study_sweeps_each_method_then_runs_the_seeds_at_the_best(sessions: Any) -> None:  # noqa: F811
    from worker.study import child_ended, start_study
    from worker.study_tuning import start_seeds

    with sessions() as s:
        job = create_job(s, tuned_study(), "study", "tuned", "cpu", [])
        job.status = "running"
        s.commit()
        (teacher,) = start_study(s, job, lambda ref: ref)  # only the teacher can run now
        sweeps = s.query(Job).filter_by(parent_id=job.id, kind="sweep").order_by(Job.id).all()
        assert [sw.name for sw in sweeps] == ["tuned/tune/fitnet", "tuned/tune/fgd"]
        assert all(sw.depends_on == [teacher.id] and sw.status == "waiting" for sw in sweeps)
        assert s.query(Job).filter_by(parent_id=job.id, kind="distill").count() == 0  # no seed before tuning
        for sw in sweeps:  # each sweep tunes on the split of data.train, never on data.val
            base = sw.spec["base"]
            assert base["data"]["val"]["subset"] == {"fraction": 0.5, "seed": 0, "part": "held_out"}
            assert base["data"]["val"]["seed"] == base["data"]["train"]["seed"] != job.spec["data"]["val"].get("seed")
            assert base["teacher"]["checkpoint"] == f"job:{teacher.id}"

        _succeed(s, teacher, {"AP": 30.0})
        child_ended(s, teacher.id)
        fitnet, fgd = (s.get(Job, sw.id) for sw in sweeps)
        assert fitnet.status == fgd.status == "queued"  # the teacher released them

        claim_job(s, fitnet.id, "w1")
        park_study(s, fitnet.id, 3)
        best = {"distill.weight": 0.25}
        finish_study(
            s, fitnet.id, {"best_AP": 12.5, "best_params": best, "trials": 3, "trials_succeeded": 2,
                           "trials_pruned": 1, "steps_total": 10},
        )  # fmt: skip
        child_ended(s, fitnet.id)
        assert s.query(Job).filter_by(parent_id=job.id, kind="distill").count() == 0  # fgd still tuning
        fail_job(s, fgd.id, "no trial finished with an AP")
        child_ended(s, fgd.id)

        seeds = s.query(Job).filter_by(parent_id=job.id, kind="distill").order_by(Job.id).all()
        weights = {(c.spec["distill"]["method"], c.spec["seed"]): c.spec["distill"]["weight"] for c in seeds}
        assert weights == {
            ("none", 0): None, ("fitnet", 0): 0.25, ("fgd", 0): None,
            ("none", 1): None, ("fitnet", 1): 0.25, ("fgd", 1): None,
        }  # fmt: skip
        for c in seeds:  # the seeds train on all of data.train and are evaluated on data.val
            assert c.spec["data"]["train"]["subset"] is None and c.spec["data"]["val"]["subset"] is None
            assert c.spec["data"]["val"]["seed"] == job.spec["data"]["val"]["seed"]
        s.expire_all()
        study = s.get(Job, job.id)
        assert study.status == "waiting" and study.progress_total == 9 and study.lease_expires_at is None
        from icd_core.spec import parse_spec

        assert start_seeds(s, study, parse_spec(study.spec), s.query(Job).filter_by(parent_id=job.id).all())
        s.commit()
        assert s.query(Job).filter_by(parent_id=job.id, kind="distill").count() == 6  # idempotent

        for c in seeds:
            ap = {"none": 10.0, "fitnet": 14.0, "fgd": 9.0}[c.spec["distill"]["method"]] + c.spec["seed"]
            _succeed(s, c, {"AP": ap, "AP50": ap, "AP75": ap, "APs": ap, "APm": ap, "APl": ap})
            child_ended(s, c.id)
        assert s.get(Job, job.id).status == "succeeded"

    report_dir = ArtifactStore(get_settings().artifact_root).report_dir(job.id)
    report = json.loads((report_dir / "report.json").read_text())
    rows = {m["method"]: m for m in report["methods"]}
    assert rows["fitnet"]["setting"] == best and rows["fgd"]["setting"] is None
    tuning = report["tuning"]
    assert tuning["methods"]["fitnet"]["best_params"] == best and tuning["methods"]["fgd"]["status"] == "failed"
    assert tuning["split"] == {"of": "data.train", "fraction": 0.5, "seed": 0}
    md = (report_dir / "report.md").read_text()
    assert "Tuned on a split of data.train" in md and "| fitnet | weight 0.25 | 12.5 |" in md
