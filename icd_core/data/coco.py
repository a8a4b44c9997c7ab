"""A COCO-format detection dataset for torchvision detectors.

Resizing is deliberately absent: the detector's own GeneralizedRCNNTransform resizes (and does
multi-scale training from a tuple of min sizes), so boxes stay in original image pixels here and
evaluation maps predictions back to the same pixels.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

log = logging.getLogger(__name__)

Target = dict[str, object]


def decode_rgb(path: str | Path) -> torch.Tensor:
    """Decode an image file to uint8 [3, H, W] RGB (grey and RGBA converted).

    torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they are still the fastest
    option here, so that one DeprecationWarning is silenced locally instead of flooding logs per image.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


class ImageUnreadable(ValueError):
    """An image of the dataset is missing, truncated or undecodable; the message names it and its id.

    DataLoader worker processes re-raise a worker's exception as `type(traceback_text)`; the constructor
    keeps only this class's own message, so a job's error stays one line, not a 23-frame traceback.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def load_coco(annotations_json: str | Path) -> COCO:
    """Load a COCO annotation file without pycocotools' progress prints on stdout; a file that is not
    COCO JSON is a ValueError naming it."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(annotations_json))
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as err:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; the others come from wrong shapes
        reason = f"{type(err).__name__}: {err}"
        raise ValueError(
            f"{annotations_json} is not a valid COCO annotation file ({reason}); fix or replace it"
        ) from err


class CocoDataset(Dataset):
    """Images and box targets of a COCO instances file.

    Items are (image, target): image a float tensor [3, H, W] in 0..1 at its original size; target a
    dict with boxes float32 [n, 4] (xyxy, original pixels), labels int64 [n] (contiguous, 0-based),
    image_id int and orig_size (h, w). Crowd boxes never become targets; boxes thinner than 1 px after
    clipping to the image are dropped (and counted in the log). A training split skips images left
    without boxes, as detectron2 (FILTER_EMPTY_ANNOTATIONS) and torchvision's references do:
    torchvision's RetinaNet divides an image's focal loss by max(1, foreground anchors), so an empty
    image's loss over every anchor is divided by 1. Evaluation keeps every image.

    An item may be requested as `dataset[i]` (the flip decision comes from torch's global RNG) or as
    `dataset[(i, sample_seed)]` (the decision comes from a generator seeded with `sample_seed`), which
    is what `ResumableSampler` yields so that a resumed run flips the same samples the same way.
    """

    def __init__(self, images_dir: str | Path, annotations_json: str | Path, train: bool, hflip: float = 0.5):
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be in [0, 1], got {hflip}")
        self.images_dir = Path(images_dir)
        self.annotations_json = Path(annotations_json)
        self.train = train
        self.hflip = hflip
        self.coco = load_coco(self.annotations_json)

        cat_ids = sorted(self.coco.getCatIds())
        self.label_to_cat_id: list[int] = cat_ids
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(cat_ids)}
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in cat_ids]
        self.image_ids: list[int] = sorted(self.coco.getImgIds())

        self.num_crowd = 0
        self.num_degenerate = 0
        # Small per-image arrays only (boxes and labels), never pixels.
        self._boxes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        kept_ids: list[int] = []
        for img_id in self.image_ids:
            boxes, labels = self._parse_annotations(img_id)
            if train and len(boxes) == 0:
                continue
            kept_ids.append(img_id)
            self._boxes.append(boxes)
            self._labels.append(labels)
        self.num_empty_skipped = len(self.image_ids) - len(kept_ids)
        self.image_ids = kept_ids
        if not self.image_ids:
            raise ValueError(f"{self.annotations_json}: no image has a usable box to train on")
        if self.num_degenerate:
            log.warning(
                "%s: dropped %d degenerate boxes (< 1 px wide or high after clipping)",
                self.annotations_json,
                self.num_degenerate,
            )
        log.info(
            "%s: %d images (%d without boxes skipped), %d boxes, %d classes, %d crowd boxes ignored",
            self.annotations_json,
            len(self.image_ids),
            self.num_empty_skipped,
            self.num_boxes,
            self.num_classes,
            self.num_crowd,
        )

    def _parse_annotations(self, img_id: int) -> tuple[np.ndarray, np.ndarray]:
        info = self.coco.imgs[img_id]
        w, h = float(info["width"]), float(info["height"])
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(img_id, []):
            if ann.get("iscrowd", 0):
                self.num_crowd += 1
                continue
            x, y, bw, bh = ann["bbox"]
            x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
            x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
            if x2 - x1 < 1.0 or y2 - y1 < 1.0:
                self.num_degenerate += 1
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self.cat_id_to_label[ann["category_id"]])
        return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self._boxes)

    def image_size(self, index: int) -> tuple[int, int]:
        """(h, w) from the annotation file, without decoding the image."""
        info = self.coco.imgs[self.image_ids[index]]
        return int(info["height"]), int(info["width"])

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes xyxy [n, 4], labels [n]) of one image, as the targets hold them (for class statistics)."""
        return self._boxes[index], self._labels[index]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        if isinstance(item, tuple):
            index, sample_seed = item
            generator = torch.Generator().manual_seed(int(sample_seed))
        else:
            index, generator = item, None
        flip = False
        if self.train and self.hflip > 0.0:
            flip = bool(torch.rand((), generator=generator) < self.hflip)
        return self.load(int(index), flip)

    def load(self, index: int, flip: bool = False) -> tuple[torch.Tensor, Target]:
        """Decode image `index` and build its target, optionally mirrored left-right."""
        img_id = self.image_ids[index]
        path = self.images_dir / self.coco.imgs[img_id]["file_name"]
        try:
            image = decode_rgb(path).float().div_(255.0)
        except (OSError, RuntimeError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ImageUnreadable(
                f"image {img_id} ({path}) in {self.annotations_json} cannot be read: {reason}; "
                "replace the file or remove the image from the annotations"
            ) from None

        h, w = image.shape[-2:]
        boxes = torch.from_numpy(self._boxes[index].copy())
        labels = torch.from_numpy(self._labels[index].copy())
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        target: Target = {"boxes": boxes, "labels": labels, "image_id": img_id, "orig_size": (int(h), int(w))}
        return image, target
