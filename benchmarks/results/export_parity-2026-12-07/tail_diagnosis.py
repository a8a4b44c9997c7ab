import sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, "benchmarks")
from export_parity import tiny_detector, partner_diffs, load_photos
from icd_core.export import write_export, export_meta, ExportedDetector, _score_floor, Tolerance, detection_cap
torch.set_num_threads(1)
det = tiny_detector("retinanet", 320, 512, 0.05)
photos = load_photos(Path("/work/shared/data/coco128/images"))
with tempfile.TemporaryDirectory() as tmp:
    ex = ExportedDetector(write_export(det, export_meta(det, {}, "onnx"), Path(tmp)/"m.onnx"), threads=1)
    worst = []
    for i, img in enumerate(photos):
        with torch.inference_mode(): e = det.predict([img])[0]
        g = ex.predict([img])[0]
        floor = _score_floor(e, g, Tolerance(), detection_cap(det))
        _, s_all, b_all = partner_diffs(e, g)
        ke, kg = e["scores"] >= floor, g["scores"] >= floor
        _, s_f, b_f = partner_diffs({k: v[ke] for k, v in e.items()}, {k: v[kg] for k, v in g.items()})
        worst.append((b_all, s_all, b_f, s_f, floor, float(e["scores"].min()), i))
    worst.sort(reverse=True)
    for w in worst[:5]: print("all box %.3g score %.3g | above floor: box %.3g score %.3g | floor %.3f min score %.3f photo %d" % w)
    print("max above floor: box %.3g score %.3g" % (max(w[2] for w in worst), max(w[3] for w in worst)))
