import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from export_parity import load_photos, partner_diffs, tiny_detector

from icd_core.export import ExportedDetector, Tolerance, _score_floor, detection_cap, export_meta, write_export

torch.set_num_threads(1)
det = tiny_detector("retinanet", 320, 512, 0.05)
photos = load_photos(Path("/work/shared/data/coco128/images"))
with tempfile.TemporaryDirectory() as tmp:
    ex = ExportedDetector(write_export(det, export_meta(det, {}, "onnx"), Path(tmp) / "m.onnx"), threads=1)
    worst = []
    for i, img in enumerate(photos):
        with torch.inference_mode():
            e = det.predict([img])[0]
        g = ex.predict([img])[0]
        floor = _score_floor(e, g, Tolerance(), detection_cap(det))
        _, s_all, b_all = partner_diffs(e, g)
        ke, kg = e["scores"] >= floor, g["scores"] >= floor
        _, s_f, b_f = partner_diffs({k: v[ke] for k, v in e.items()}, {k: v[kg] for k, v in g.items()})
        worst.append((b_all, s_all, b_f, s_f, floor, float(e["scores"].min()), i))
    worst.sort(reverse=True)
    for w in worst[:5]:
        b_all, s_all, b_f, s_f, floor, low, i = w
        print(
            f"all box {b_all:.3g} score {s_all:.3g} | above floor: box {b_f:.3g} score {s_f:.3g} | "
            f"floor {floor:.3f} min score {low:.3f} photo {i}"
        )
    print(f"max above floor: box {max(w[2] for w in worst):.3g} score {max(w[3] for w in worst):.3g}")
