"""One confinement and ownership rule for every path a spec names (issue 23, items 1 and 2).

A non-admin must not reach another owner's checkpoint by its artifact path, in any checkpoint field,
including `distill.icd.decoder`; a path field added to the spec later must be confined without anyone
remembering to: the walker test below fails on a string field that is neither marked nor declared.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from api.docs import DISTILL_EXAMPLE, TRAIN_EXAMPLE
from api.main import create_app
from icd_core import spec as spec_module
from icd_core.data_roots import confine_spec_paths
from icd_core.spec import UserPath, iter_user_paths, parse_spec
from store.db import make_engine, session_factory
from store.settings import Settings
from store.tokens import create_token, may_read_job
from tests.helpers import succeed_with_checkpoint

# String fields that are not paths, by "<Model>.<field>": anything else typed str must carry UserPath.
NOT_PATHS = {"_JobBase.name", "_JobBase.device", "ModelSpec.levels", "DistillSpec.options", "ExportSpec.name"}
# A sweep's space and enqueued values set fields of its base spec: each trial is a child job whose spec the
# worker confines again with the owner's rights before it opens a file (worker.run_job.confined_spec).
NOT_PATHS |= {"SweepSpec.name", "SweepSpec.space", "SweepSpec.enqueue", "ChoiceDim.choice"}
# A study's per-method settings and tuning spaces likewise set fields of its children (and of their sweeps).
NOT_PATHS |= {"StudySpec.settings", "TuneSpec.space"}


def _has_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    return any(_has_str(a) for a in get_args(annotation) if a is not type(None))


def _models(root: type[BaseModel], seen: set[type[BaseModel]]) -> Iterator[type[BaseModel]]:
    if root in seen:
        return
    seen.add(root)
    yield root
    for info in root.model_fields.values():
        stack = [info.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _models(t, seen)
            stack += list(get_args(t))


def _declaring_class(model: type[BaseModel], name: str) -> str:
    for klass in model.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return klass.__name__
    return model.__name__


def test_every_string_field_of_the_spec_is_a_confined_path_or_declared_not_one() -> None:
    seen: set[type[BaseModel]] = set()
    unmarked, marked = [], []
    for top in (*get_args(get_args(spec_module.JobSpec)[0]), spec_module.ExportSpec):
        for model in _models(top, seen):
            for name, info in model.model_fields.items():
                if not _has_str(info.annotation):
                    continue
                key = f"{_declaring_class(model, name)}.{name}"
                if spec_module._path_kind(info.annotation, list(info.metadata)) is not None:
                    marked.append(key)
                elif key not in NOT_PATHS and get_origin(info.annotation) is not type(None):
                    unmarked.append(key)
    assert sorted(set(unmarked)) == []
    assert {"CocoSource.images", "CocoSource.annotations", "ModelSpec.checkpoint", "ICDOptions.decoder"} <= set(marked)
    assert "ExportSpec.checkpoint" in marked


def test_the_walker_finds_the_decoder_and_every_checkpoint() -> None:
    spec = copy.deepcopy(DISTILL_EXAMPLE)
    spec["student"]["checkpoint"] = "s.pt"
    spec["distill"]["icd"]["decoder"] = "d.pt"
    found = {(f, k) for f, _, k in iter_user_paths(parse_spec(spec))}
    assert found == {
        ("teacher.checkpoint", "checkpoint"),
        ("student.checkpoint", "checkpoint"),
        ("distill.icd.decoder", "checkpoint"),
    }
    assert isinstance(UserPath("data"), UserPath)


def _as(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _finished_job(client: TestClient, settings: Settings, secret: str) -> tuple[int, Path]:
    """A succeeded train job of the token's owner, with a final.pt in its artifact folder."""
    r = client.post("/jobs", json=copy.deepcopy(TRAIN_EXAMPLE), headers=_as(secret))
    assert r.status_code == 201, r.text
    jid = r.json()["id"]
    return jid, succeed_with_checkpoint(settings.database_url, settings.artifact_root, jid)  # type: ignore[arg-type]


def _distill(teacher: str, decoder: str | None = None) -> dict[str, Any]:
    spec = copy.deepcopy(DISTILL_EXAMPLE)
    spec["teacher"]["backbone"] = "resnet34"
    spec["teacher"]["checkpoint"] = teacher
    if decoder is not None:
        spec["distill"]["icd"]["decoder"] = decoder
    return spec


def _refused(resp: Any, field: str) -> str:
    assert resp.status_code == 422, resp.text
    fields = [e["field"] for e in resp.json()["detail"]]
    assert field in fields, resp.json()
    return next(e["msg"] for e in resp.json()["detail"] if e["field"] == field)


def test_another_owners_checkpoint_cannot_be_named_by_its_artifact_path(
    public: TestClient, settings: Settings, secrets_by_name: dict[str, str]
) -> None:
    alice_job, alice_file = _finished_job(public, settings, secrets_by_name["alice"])
    bob_job, bob_file = _finished_job(public, settings, secrets_by_name["bob"])
    bob = _as(secrets_by_name["bob"])
    relative = alice_file.relative_to(settings.artifact_root)  # type: ignore[arg-type]
    for given in (
        str(alice_file),
        str(relative),
        f"{settings.artifact_root}/jobs/{alice_job}/../{alice_job}/checkpoints/final.pt",
    ):
        train = copy.deepcopy(TRAIN_EXAMPLE)
        train["model"]["checkpoint"] = given
        msg = _refused(public.post("/jobs", json=train, headers=bob), "model.checkpoint")
        assert str(settings.artifact_root) not in msg.split("roots:")[-1], msg  # the store is not advertised
        _refused(public.post("/jobs", json=_distill(given), headers=bob), "teacher.checkpoint")
        student = _distill(str(bob_file))
        student["student"]["checkpoint"] = given
        _refused(public.post("/jobs", json=student, headers=bob), "student.checkpoint")
    # bob's own file by path, and an admin naming alice's, are accepted and stored resolved
    r = public.post("/jobs", json=_distill(str(bob_file)), headers=bob)
    assert r.status_code == 201 and r.json()["spec"]["teacher"]["checkpoint"] == str(bob_file.resolve())
    assert public.post("/jobs", json=_distill(str(alice_file)), headers=_as(secrets_by_name["root"])).status_code == 201
    assert bob_job != alice_job


@pytest.mark.parametrize(
    "decoder",
    ["/etc/passwd", "../../../../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "ALICE_FILE", "job:ALICE", "\ud800x"],
)
def test_the_icd_decoder_field_is_confined_and_owned(
    public: TestClient, settings: Settings, secrets_by_name: dict[str, str], decoder: str
) -> None:
    alice_job, alice_file = _finished_job(public, settings, secrets_by_name["alice"])
    _, bob_file = _finished_job(public, settings, secrets_by_name["bob"])
    decoder = decoder.replace("ALICE_FILE", str(alice_file)).replace("ALICE", str(alice_job))
    body = json.dumps(_distill(str(bob_file), decoder))  # ASCII escapes: a lone surrogate travels as \ud800
    headers = {**_as(secrets_by_name["bob"]), "Content-Type": "application/json"}
    msg = _refused(public.post("/jobs", content=body, headers=headers), "distill.icd.decoder")
    assert "passwd" not in msg or "outside the allowed roots" in msg


def test_the_worker_applies_the_same_rule_to_a_stored_spec(settings: Settings, session: Any) -> None:
    """A spec stored before this rule (or edited in the database) is checked again where it runs."""
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as s:
        _, alice_secret = create_token(s, "alice2")
    engine.dispose()
    app = create_app(settings)
    with TestClient(app) as c:
        alice_job, alice_file = _finished_job(c, settings, alice_secret)
    app.state.engine.dispose()
    spec = parse_spec(_distill(str(alice_file)))
    roots, art = settings.allowed_data_roots(), settings.artifact_root
    _, errors = confine_spec_paths(spec, roots, art, lambda j: may_read_job(session, "mallory", j))
    assert [f for f, _ in errors] == ["teacher.checkpoint"]
    confined, errors = confine_spec_paths(spec, roots, art, lambda j: may_read_job(session, "alice2", j))
    assert errors == [] and confined.teacher.checkpoint == str(alice_file.resolve())
    assert may_read_job(session, None, alice_job)  # the anonymous local admin


def test_a_data_root_that_holds_the_artifact_store_grants_nothing_more(
    settings: Settings, secrets_by_name: dict[str, str], tmp_path: Path
) -> None:
    """The embedded default's root is the working folder, which holds `.icd/artifacts`: reaching the store
    through a data root must not skip the owner check, for checkpoints or for data paths."""
    wide = settings.model_copy(update={"listen_host": "0.0.0.0", "data_roots": [tmp_path]})
    assert Path(wide.artifact_root).is_relative_to(tmp_path)  # type: ignore[arg-type]
    app = create_app(wide)
    with TestClient(app) as client:
        _, alice_file = _finished_job(client, wide, secrets_by_name["alice"])
        bob = _as(secrets_by_name["bob"])
        train = copy.deepcopy(TRAIN_EXAMPLE)
        train["model"]["checkpoint"] = str(alice_file)
        _refused(client.post("/jobs", json=train, headers=bob), "model.checkpoint")
        coco = copy.deepcopy(TRAIN_EXAMPLE)
        coco["data"]["train"] = {"format": "coco", "images": str(tmp_path), "annotations": str(alice_file)}
        _refused(client.post("/jobs", json=coco, headers=bob), "data.train.annotations")
        assert client.post("/jobs", json=train, headers=_as(secrets_by_name["alice"])).status_code == 201
    app.state.engine.dispose()
