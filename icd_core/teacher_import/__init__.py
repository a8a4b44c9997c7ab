"""Import detectors trained elsewhere (torchvision, detectron2, MMDetection) as checkpoints of this service.

Each source layout has its own module (`torchvision_layout`, `detectron2_layout`, `mmdet_layout`) that maps
the source's keys onto a model built by `icd_core.detectors.build_detector`; `layout.ImportedDetector`
is what they all return and `write.write_imported` turns it into a checkpoint `load_detector` reads.
"""
