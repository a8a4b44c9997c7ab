"""Write the study's icd/seed0 child spec with distill.icd.lr 1e-4 (as run) and 1e-3 (the probe) to OUT_DIR."""

import json
import sys
from pathlib import Path

from icd_core.spec import load_spec
from icd_core.study_plan import child_specs

teacher, out = sys.argv[1], Path(sys.argv[2])
study = load_spec("benchmarks/shapes_study.yaml")
for method, seed, spec in child_specs(study, teacher):
    if method == "icd" and seed == 0:
        for lr in (1e-4, 1e-3):
            d = spec.model_dump(mode="json")
            d["name"] = f"diag-icd-lr{lr:g}"
            d["distill"]["icd"]["lr"] = lr
            (out / f"icd_lr{lr:g}.json").write_text(json.dumps(d, indent=1))
