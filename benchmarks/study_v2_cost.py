"""Per-step cost of the shapes study v2 regime, and the whole study's runtime estimate from it.

Builds the study's teacher and student from a study YAML (random weights: the cost does not depend on
them), times the median of `--steps` training steps of each kind on shapes-sized random batches, and
prints the estimate: teacher train + one decoder pre-training (per teacher) + children × steps.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/study_v2_cost.py benchmarks/shapes_study_v2.yaml --threads 2

Kinds: `teacher` (a train step of the teacher), `none` (a student step), `distill` (student + teacher
features + ICD + both optimizers: the dearest distill step; the baselines cost less or the same),
`pretrain` (decoder side only, on cached teacher features). Evaluation is added from the measured
per-image inference time over the validation set, twice per child (eval_every = half the schedule).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from icd_core.detectors import build_detector
from icd_core.distill import build_distiller
from icd_core.distill.base import DistillBatch
from icd_core.distill.icd_pretrain import TeacherBatch
from icd_core.spec import DistillSpec, ICDPretrainSpec, StudySpec, load_spec


def shapes_batch(n: int, size: int, classes: int, lo: int, hi: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=g))
        k = 3
        wh = torch.randint(lo, hi + 1, (k, 2), generator=g).float()
        xy = torch.rand(k, 2, generator=g) * (size - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, classes, (k,), generator=g)})
    return images, targets


def median_seconds(step: Callable[[], None], steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=str)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    study = load_spec(args.study)
    assert isinstance(study, StudySpec)
    train = study.data.train
    size, classes = int(train.image_size), int(train.num_classes)
    bs = study.schedule.batch_size
    images, targets = shapes_batch(bs, size, classes, train.min_object, train.max_object, 0)

    teacher = build_detector(study.teacher, classes, size, size)
    student = build_detector(study.student, classes, size, size)
    teacher_opt = torch.optim.SGD([p for p in teacher.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    student_opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train_step(model, opt) -> Callable[[], None]:
        def run() -> None:
            model.train()
            out = model.forward_train(images, targets)
            opt.zero_grad()
            sum(out.losses.values()).backward()
            opt.step()

        return run

    total = study.schedule.total_iterations()
    dspec = DistillSpec.model_validate({**study.distill.model_dump(), "method": "icd"})
    distiller = build_distiller(dspec, teacher, student, total, None)
    icd_opt, _ = distiller.make_optimizer(total)
    teacher.eval()

    def distill_step() -> None:
        student.train()
        out = student.forward_train(images, targets)
        feats = teacher.teacher_features(out.image_list, source=student)
        batch = DistillBatch(
            out.features,
            feats,
            out.targets,
            [tuple(s) for s in out.image_list.image_sizes],
            tuple(out.image_list.tensors.shape[-2:]),
            step=10_000,
        )
        loss = sum(out.losses.values()) + sum(distiller.losses(batch).values())
        student_opt.zero_grad()
        icd_opt.zero_grad()
        loss.backward()
        student_opt.step()
        icd_opt.step()

    with torch.no_grad():
        image_list, prepared = teacher.prepare(images, targets)
        cached = TeacherBatch(
            teacher.extract_features(image_list),
            [{"boxes": t["boxes"], "labels": t["labels"]} for t in prepared],
            [tuple(s) for s in image_list.image_sizes],
            tuple(image_list.tensors.shape[-2:]),
        )
    dec_opt = torch.optim.AdamW(distiller.decoder_parameters(), lr=1e-3)

    def pretrain_step() -> None:
        losses, _ = distiller.aux_step(cached.as_distill_batch(5))
        dec_opt.zero_grad()
        sum(losses.values()).backward()
        dec_opt.step()

    def infer() -> None:
        student.eval()
        with torch.no_grad():
            student.predict(images)

    cost = {
        "teacher": median_seconds(train_step(teacher, teacher_opt), args.steps),
        "none": median_seconds(train_step(student, student_opt), args.steps),
        "distill": median_seconds(distill_step, args.steps),
        "pretrain": median_seconds(pretrain_step, args.steps * 4),
        "eval_image": median_seconds(infer, args.steps) / bs,
    }
    load = os.getloadavg()[0]
    print(
        f"{args.study}: {size} px, batch {bs}, {args.threads} thread(s), load average {load:.1f} "
        f"on {os.cpu_count()} cores (a busy machine inflates every figure)"
    )
    for kind, seconds in cost.items():
        print(f"  {kind:>10}: {seconds:.3f} s/{'image' if kind == 'eval_image' else 'step'}")

    tsched = study.teacher_schedule
    teacher_steps = tsched.total_iterations() if tsched else 0
    pre = study.distill.icd.pretrain or ICDPretrainSpec()
    methods = ["none", *[m for m in dict.fromkeys(study.methods) if m != "none"]]
    seeds = len(set(study.seeds))
    val_images = int(study.data.val.num_images)
    evals = 2 * val_images * cost["eval_image"]
    child = {m: total * (cost["none"] if m == "none" else cost["distill"]) + evals for m in methods}
    teacher_s = teacher_steps * cost["teacher"] + 2 * val_images * cost["eval_image"]
    pretrain_s = pre.steps * cost["pretrain"] if "icd_pretrained" in methods else 0.0
    children_s = seeds * sum(child.values())
    whole = teacher_s + pretrain_s + children_s
    print(
        f"  estimate: teacher {teacher_s / 60:.0f} min + decoder pre-training (≤ {pre.steps} steps) "
        f"{pretrain_s / 60:.0f} min + {seeds} seeds × {len(methods)} children {children_s / 60:.0f} min "
        f"= {whole / 3600:.2f} h (distill children costed at ICD's step, an upper bound)"
    )


if __name__ == "__main__":
    main()
