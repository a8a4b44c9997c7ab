"""resources.gpus without running a group: validation, queue routing, worker plans, outcome mapping."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from icd_core.engine.callbacks import TrainingStopped
from icd_core.spec import parse_spec
from store.dispatch import gpus_served, group_queues, queue_for
from worker.ddp_rank import outcome_path
from worker.group import read_outcome

TRAIN = {
    "kind": "train",
    "data": {"train": {"format": "shapes"}, "val": {"format": "shapes"}},
    "model": {"backbone": "resnet18"},
    "schedule": {"batch_size": 4},
}


def test_gpus_default_one_and_must_divide_the_global_batch() -> None:
    assert parse_spec(TRAIN).resources.gpus == 1
    assert parse_spec({**TRAIN, "resources": {"gpus": 4}}).resources.gpus == 4
    for bad, words in (
        ({"gpus": 3}, "divide evenly over 3"),
        ({"gpus": 0}, "greater than or equal"),
        ({"gpus": 65}, "less than or equal"),
        ({"cpus": 2}, "Extra inputs"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_spec({**TRAIN, "resources": bad})
    with pytest.raises(ValueError, match="names one GPU"):
        parse_spec({**TRAIN, "device": "cuda:1", "resources": {"gpus": 2}})


def test_a_group_job_has_its_own_queue_which_only_big_enough_workers_consume() -> None:
    assert queue_for({"device": "cuda", "resources": {"gpus": 4}}) == "cuda-g4"
    assert queue_for(parse_spec({**TRAIN, "device": "cpu", "resources": {"gpus": 2}})) == "cpu-g2"
    assert queue_for({"device": "auto", "resources": {"gpus": 1}}) == "any"
    four = group_queues("cuda,any", 4)
    assert four.split(",") == ["cuda", "any", "cuda-g2", "any-g2", "cuda-g3", "any-g3", "cuda-g4", "any-g4"]
    assert group_queues("cpu,any", 1) == "cpu,any" and group_queues(four, 2) == four
    assert "cuda-g4" not in group_queues("cuda,any", 2).split(",")
    assert (gpus_served(four), gpus_served("cpu,any"), gpus_served("my-gpus")) == (4, 1, 1)


def test_icd_worker_group_plans_one_worker_owning_every_gpu() -> None:
    from icd_cli.service import plan_workers

    (spec,) = plan_workers("0,1", False, None, None, "host", group=True)
    assert spec.name == "gpu0-1@host" and gpus_served(spec.queues) == 2
    assert spec.env == {"CUDA_VISIBLE_DEVICES": "0,1", "ICD_WORKER_GPUS": "2"}
    (cpu,) = plan_workers(None, True, None, None, "host", worker_gpus=2)
    assert cpu.queues == "cpu,any,cpu-g2,any-g2"
    assert [gpus_served(w.queues) for w in plan_workers("0,1", False, None, None, "host")] == [1, 1]
    with pytest.raises(click.UsageError, match="--group needs --gpus"):
        plan_workers(None, True, None, None, "host", group=True)


def _outcomes(folder: Path, log: str, **by_rank: dict) -> tuple[Path, Path]:
    group = folder / "group"
    group.mkdir(parents=True)
    for rank, outcome in by_rank.items():
        outcome_path(group, int(rank[1:])).write_text(json.dumps(outcome))
    (folder / "job.log").write_text(log)
    return group, folder / "job.log"


def test_outcomes_map_to_result_stop_user_error_or_the_rank_that_died(tmp_path: Path) -> None:
    ok = {
        "status": "succeeded",
        "step": 4,
        "total": 4,
        "final_metrics": {"loss": 1.0},
        "sec_per_step": 0.1,
        "evaluation": {"step": 4, "metrics": {"AP": 1.0}, "per_class": {}},
        "peak_memory_mb": 1.0,
    }
    group, log = _outcomes(tmp_path / "a", "", r0=ok)
    result, main = read_outcome(group, 2, 0, log)
    assert result.evaluation.metrics == {"AP": 1.0} and main["step"] == 4

    group, log = _outcomes(tmp_path / "b", "", r0={"status": "stopped", "step": 7, "canceled": True})
    with pytest.raises(TrainingStopped) as stop:
        read_outcome(group, 2, 0, log)
    assert stop.value.step == 7 and stop.value.canceled

    bad = {"status": "failed", "type": "ValueError", "error": "data.train: no such file", "message": "m"}
    group, log = _outcomes(tmp_path / "c", "", r1=bad)
    with pytest.raises(ValueError, match="data.train: no such file"):
        read_outcome(group, 2, 1, log)

    torchrun_summary = (
        "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n"
        "  exitcode  : -9 (pid: 42)\n  traceback : Signal 9 (SIGKILL) received by PID 42\n"
    )
    peer_lost = {"status": "failed", "type": "RuntimeError", "error": "gloo: Connection reset by peer"}
    group, log = _outcomes(tmp_path / "d", torchrun_summary, r0=peer_lost)
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 died before reporting \(Signal 9 \(SIGKILL\)"):
        read_outcome(group, 2, 1, log)
