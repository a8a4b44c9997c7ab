"""Planning a `kind: study`: pure functions from a study spec to its jobs, checks and leaderboard rows.

No torch and no click: the API imports this at submit time (`check_study`), the service's study task
and the local runner (`icd_core.study`) expand and judge a study with the same functions:

- `child_specs` expands a study into its distill jobs, in the order they should start;
- `teacher_train_spec` is the train job for a teacher the study must train first;
- `preflight` refuses a teacher that cannot teach (the usual reason distillation "does nothing" is a
  wrongly loaded teacher);
- `child_result` / `result_from_job` turn a finished child into the row `icd_core.leaderboard` aggregates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .engine.callbacks import EvalResult
from .leaderboard import BASELINE, TEACHER_AP_METRICS
from .spec import (
    ICD_PRETRAINED,
    PAPER_WARMUP_ITERS,
    PRESET_ITERS_AT_16,
    DistillJobSpec,
    ICDOptions,
    ICDPretrainSpec,
    StudySpec,
    TrainSpec,
)
from .sweep_space import apply_params

# The paper fixes iteration counts for COCO 1x (90k iterations at batch 16): LR warm-up 1000 and the
# ICD bypass 1000 (docs/method/icd.md#bypass). A study keeps the warm-up's share of training (see `scaled_iterations`).
REFERENCE_ITERS = PRESET_ITERS_AT_16["1x"]


# --- expanding a study ----------------------------------------------------------------------------------
def scaled_iterations(paper_iters: int, total: int) -> int:
    """The one scaling rule: an iteration count the paper sets for 1x keeps its share of training.

    n' = max(1, round(n · total / 90000)); 0 stays 0. At 1x and batch 16 nothing changes; a 1,500-step
    CPU study gets 17 warm-up and 17 bypass iterations (1.1 % of training, as in the paper). LR steps
    follow the same principle through the schedule's own default (2/3 and 8/9 of training).
    """
    if paper_iters <= 0:
        return 0
    return max(1, round(paper_iters * total / REFERENCE_ITERS))


def child_folder(method: str, seed: int) -> str:
    """Folder (CLI) or artifact sub-name of one child: '<method>-seed<seed>'."""
    return f"{method}-seed{seed}"


def child_specs(study: StudySpec, teacher_checkpoint: str) -> list[tuple[str, int, DistillJobSpec]]:
    """(method, seed, spec) of every child, in start order: per seed, `none` first, then the methods.

    Every child shares the study's data, schedule, device, student, teacher (with `teacher_checkpoint`
    filled in: a path or job:<id>) and distill options (inherit, weight, icd, options); only
    `distill.method` and `seed` differ. `none` is always included: it is the baseline of every Δ and
    of the pre-flight's "teacher better than student" check, so it runs first.

    With `study.scale_iterations` (the default) the paper's 1x iteration counts are scaled by
    `scaled_iterations`: `schedule.warmup_iters` when null. The ICD bypass is not scaled: it is the
    decoder's head start in absolute steps (see `icd_core.distill.icd.bypass_steps`). LR steps are
    written out explicitly (null: 2/3 and 8/9 of training), so each child spec states the full schedule it ran.
    `icd_pretrained` children are `icd` with `distill.icd.pretrain` set (the study's, else its defaults);
    plain `icd` children never pre-train (the paper's joint protocol). A method named in `study.settings`
    has those dotted fields set (its own, e.g. tuned, setting).
    """
    total = study.schedule.total_iterations()
    schedule = study.schedule.model_copy(update={"steps": study.schedule.resolved_steps()})
    distill = study.distill
    if study.scale_iterations:
        if schedule.warmup_iters is None:
            schedule = schedule.model_copy(update={"warmup_iters": scaled_iterations(PAPER_WARMUP_ITERS, total)})
    teacher = study.teacher.model_copy(update={"checkpoint": teacher_checkpoint})
    methods = [BASELINE] + [m for m in dict.fromkeys(study.methods) if m != BASELINE]
    joint_icd = distill.icd.model_copy(update={"pretrain": None})  # the paper's protocol
    pretrained_icd = distill.icd.model_copy(update={"pretrain": distill.icd.pretrain or ICDPretrainSpec()})

    children = []
    for seed in dict.fromkeys(study.seeds):
        for method in methods:
            data = {
                "name": f"{study.name}/{method}/seed{seed}"[-200:],
                "kind": "distill",
                "seed": seed,
                "data": study.data.model_dump(mode="json"),
                "schedule": schedule.model_dump(mode="json"),
                "device": study.device,
                "priority": study.priority,
                "deploy": study.deploy.model_dump(mode="json"),
                "teacher": teacher.model_dump(mode="json"),
                "student": study.student.model_dump(mode="json"),
                "distill": {
                    **distill.model_dump(mode="json"),
                    "method": "icd" if method == ICD_PRETRAINED else method,
                    "icd": (pretrained_icd if method == ICD_PRETRAINED else joint_icd).model_dump(mode="json"),
                },
            }
            spec = DistillJobSpec.model_validate(data)
            if study.settings.get(method):
                spec = apply_params(spec, study.settings[method])
            children.append((method, seed, spec))
    return children


def check_study(study: StudySpec) -> None:
    """Raise the ValueError a child would raise (teacher/student mismatch, inherit, ICD heads) before any work.

    Run at submit time (the API) and before the teacher is trained (the CLI), so an incompatible pair is
    a message within a second, not a failed child after the teacher's training.
    """
    child_specs(study, study.teacher.checkpoint or "job:0")


def teacher_train_spec(study: StudySpec) -> TrainSpec | None:
    """The train job for the study's teacher, or None when the teacher already has a checkpoint."""
    if study.teacher.checkpoint or study.teacher_schedule is None:
        return None
    return TrainSpec.model_validate(
        {
            "name": f"{study.name}/teacher"[-200:],
            "kind": "train",
            "seed": study.seed,
            "data": study.data.model_dump(mode="json"),
            "schedule": study.teacher_schedule.model_dump(mode="json"),
            "device": study.device,
            "priority": study.priority,
            "deploy": study.deploy.model_dump(mode="json"),
            "model": study.teacher.model_dump(mode="json"),
        }
    )


# --- the teacher pre-flight -----------------------------------------------------------------------------
def preflight(
    teacher_eval: EvalResult | Mapping[str, Any],
    baseline_ap: float | None,
    min_ap: float,
    require_better: bool = True,
    min_lead: float = 0.0,
) -> None:
    """Refuse (ValueError with the teacher's AP) a teacher below `min_ap`, or not above the `none` student
    (by more than `min_lead` AP points when that is set).

    teacher_eval: an EvalResult or a plain metrics dict (as stored by the service). baseline_ap: the
    AP of the first finished `none` child, or None before it has run.
    """
    metrics = teacher_eval.metrics if isinstance(teacher_eval, EvalResult) else teacher_eval
    ap = float(metrics["AP"])
    if ap < min_ap:
        raise ValueError(
            f"teacher AP {ap:.1f} is below teacher_min_ap {min_ap:.1f} (AP50 {float(metrics.get('AP50', 0.0)):.1f}, "
            "on data.val): check teacher.checkpoint (the file, that the teacher fields describe it, and that it "
            "knows data.val's categories: icd import-teacher --classes) or train the teacher longer (a study: "
            "teacher_schedule); lower teacher_min_ap only if this AP is expected"
        )
    if require_better and baseline_ap is not None and min_lead > 0 and ap < baseline_ap + min_lead:
        raise ValueError(
            f"teacher AP {ap:.1f} leads the student baseline {baseline_ap:.1f} by {ap - baseline_ap:.1f}, less "
            f"than teacher_lead_ap {min_lead:.1f}: give the student less capacity or fewer steps, or the teacher "
            "more, so there is something to distil (or lower teacher_lead_ap)"
        )
    if require_better and baseline_ap is not None and ap <= baseline_ap:
        raise ValueError(
            f"teacher AP {ap:.1f} is not above the student baseline {baseline_ap:.1f}: check teacher.checkpoint "
            "(a wrong or undertrained teacher cannot teach), train the teacher longer, or set "
            "require_teacher_better: false to run the study anyway"
        )


# --- results --------------------------------------------------------------------------------------------
def child_result(
    method: str,
    seed: int,
    summary: Mapping[str, Any] | None,
    error: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict:
    """The leaderboard row of one child from its runner summary.json (None: the child did not finish).

    params: the method's own setting (`StudySpec.settings`), shown in the row."""
    setting = {"params": dict(params)} if params else {}
    if summary is None:
        return {"method": method, "seed": seed, "metrics": None, "status": "failed", "error": error, **setting}
    evaluation = summary.get("evaluation") or {}
    metrics = evaluation.get("metrics") or summary.get("final_metrics") or {}
    diagnostics = {k: v for k, v in (summary.get("final_metrics") or {}).items() if k.startswith("icd_")}
    return {
        "method": method,
        "seed": seed,
        "metrics": dict(metrics),
        "sec_per_step": summary.get("sec_per_step"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "status": "succeeded",
        **setting,
        "lineage": summary.get("lineage"),
        **diagnostics,
        # model cost (cost_*, teacher_cost_*) and the teacher's AP (teacher_AP, ...) live in final_metrics,
        # next to but not in the evaluation
        **{k: v for k, v in (summary.get("final_metrics") or {}).items() if "cost_" in k or k in TEACHER_AP_METRICS},
    }


def study_method(spec: Mapping[str, Any]) -> str:
    """The leaderboard row of a distill spec: its method, or `icd_pretrained` when its decoder is pre-trained."""
    distill = spec["distill"]
    icd = distill.get("icd") or {}
    if distill["method"] == "icd" and (icd.get("pretrain") or icd.get("decoder")):
        return ICD_PRETRAINED
    return str(distill["method"])


# ICD optimisation knobs a study may change; a row whose value differs from the paper's is a labelled variant
# ("icd_pretrained (adapter_lr=0.001)"), so a tuned ICD is never shown as the paper's protocol. The
# architecture and schedule knobs (heads, bypass_iters, ...) are stated in the spec and not labelled, nor
# is distill.weight: a study applies it to every method alike.
LABELLED_ICD_KNOBS = ("lr", "adapter_lr", "weight_decay", "grad_clip", "temperature")


def row_label(method: str, spec: DistillJobSpec | Mapping[str, Any]) -> str:
    """The leaderboard row of a child: its method, plus every ICD knob set away from the paper's value."""
    if not method.startswith("icd"):
        return method
    data = spec.model_dump(mode="json") if isinstance(spec, DistillJobSpec) else spec
    icd, paper = data["distill"].get("icd") or {}, ICDOptions().model_dump(mode="json")
    knobs = [f"{k}={icd[k]:g}" for k in LABELLED_ICD_KNOBS if icd.get(k) is not None and icd[k] != paper[k]]
    return f"{method} ({', '.join(knobs)})" if knobs else method


def result_from_job(
    spec: Mapping[str, Any],
    status: str,
    final_metrics: Mapping[str, Any] | None,
    sec_per_step: float | None = None,
    peak_memory_mb: float | None = None,
    error: str | None = None,
    job_id: int | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The leaderboard row of a child job stored by the service (method and seed read from its spec).

    settings: the study's per-method settings; the child's method's one is shown in its row."""
    ok = status == "succeeded" and final_metrics is not None
    params = (settings or {}).get(study_method(spec))
    return {
        **({"params": dict(params)} if params else {}),
        "method": row_label(study_method(spec), spec),
        "seed": int(spec["seed"]),
        "metrics": dict(final_metrics) if ok else None,
        "sec_per_step": sec_per_step,
        "peak_memory_mb": peak_memory_mb,
        "status": status,
        "error": error,
        "job_id": job_id,
        "lineage": dict(lineage) if lineage is not None else None,
    }
