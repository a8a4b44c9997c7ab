"""ICD core: instance-conditional knowledge distillation for torchvision detectors (pure PyTorch)."""

__version__ = "0.1.0"
