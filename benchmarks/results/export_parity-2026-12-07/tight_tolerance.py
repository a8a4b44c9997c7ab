import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from export_parity import load_photos, partner_diffs, tiny_detector

from icd_core.export import (
    ExportedDetector,
    Tolerance,
    _score_floor,
    compare_detections,
    detection_cap,
    export_meta,
    write_export,
)

torch.set_num_threads(1)
photos = load_photos(Path(sys.argv[1]))
print("tolerance", Tolerance())
for kind in sys.argv[2:]:
    det = tiny_detector(kind, 320, 512, 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        ex = ExportedDetector(write_export(det, export_meta(det, {}, "onnx"), Path(tmp) / "m.onnx"), threads=1)
        fails, bmax, smax = 0, 0.0, 0.0
        for img in photos:
            with torch.inference_mode():
                e = det.predict([img])[0]
            g = ex.predict([img])[0]
            cap = detection_cap(det)
            fails += compare_detections(e, g, Tolerance(), cap) is not None
            floor = _score_floor(e, g, Tolerance(), cap)
            ke, kg = e["scores"] >= floor, g["scores"] >= floor
            _, s, b = partner_diffs({k: v[ke] for k, v in e.items()}, {k: v[kg] for k, v in g.items()})
            bmax, smax = max(bmax, b), max(smax, s)
        print(
            f"{kind} onnx 320/512: {len(photos)} photos, {fails} fail compare_detections(Tolerance()); "
            f"above the floor max |dscore| {smax:.3g}, max |dbox| {bmax:.3g} px"
        )
