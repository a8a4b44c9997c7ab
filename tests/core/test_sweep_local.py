"""`icd sweep` runs a sweep in this process: the third trial is pruned at its first evaluation, the report
names the best, and a rerun into the same folder resumes (nothing is trained again)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from icd_cli.main import main
from tests.helpers import hot_checkpoint, tiny_train_spec


@pytest.mark.slow
def test_icd_sweep_prunes_reports_and_resumes(tmp_path: Path) -> None:
    base = tiny_train_spec("base", iterations=4, every=2)
    base["model"]["checkpoint"] = str(hot_checkpoint(tmp_path))
    spec = {
        "kind": "sweep",
        "name": "local",
        "base": base,
        "space": {"schedule.lr": {"log_uniform": [1.0e-5, 1.0]}},
        "pruner": {"kind": "median", "startup_trials": 2},
        "trials": 3,
        "enqueue": [{"schedule.lr": 1.0e-5}, {"schedule.lr": 2.0e-5}, {"schedule.lr": 0.5}],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    args = ["sweep", str(path), "--output", str(out), "--cache-dir", str(tmp_path / "c")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [t["status"] for t in report["trials"]] == ["succeeded", "succeeded", "pruned"]
    pruned = report["trials"][2]
    assert pruned["steps"] == 2 and pruned["reason"].startswith("AP 0.0 at step 2, below the median")
    assert report["best"]["number"] in (0, 1) and "Best: trial" in result.output
    # every trial, the pruned one too, kept what it ran on; one code, one data: listed once, no warning
    assert all(t["lineage"]["data"]["train"].startswith("sha256:") for t in report["trials"])
    assert report["lineage"]["differs"] == [] and "## Lineage" in (out / "report.md").read_text()
    trials_before = (out / "trials.json").read_text()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (out / "trials.json").read_text() == trials_before  # resumed: nothing ran again
