"""Segmentation folders: images + index masks + class names, VOC style.

mmlora's layout (what ``data_prep/seg_layouts.py`` converts VOC, ADE20K and Pascal-Context into, and
what the shapes world is written in)::

    root/classes.txt                        one class name per line; line i = mask value i
    root/images/<split>/<id>.(png|jpg)      RGB images
    root/masks/<split>/<id>.png             index masks (palette or grey PNG), 255 = ignore
    root/ImageSets/Segmentation/<split>.txt image ids
    root/meta.json (optional)               {"reduce_zero_label": true} for ADE20K-style masks

``reduce_zero_label`` (ADE20K): value 0 means "other" and is ignored; every other value shifts down
by one (so class list line i is mask value i+1 on disk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmlora.data.samples import MAX_IMAGE_PIXELS, BadSample, Sample, load_image
from mmlora.errors import MmloraError

IGNORE_INDEX = 255


@dataclass
class SegSample:
    id: str
    image: Path
    mask: Path


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """ADE20K convention: 0 → ignore, v → v - 1 (ignore stays ignore)."""
    out = mask.astype(np.int64) - 1
    out[mask == 0] = IGNORE_INDEX
    out[mask == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


class SegmentationFolder:
    def __init__(self, root: str | Path, split: str, reduce_zero_label: bool | None = None):
        self.root, self.split = Path(root), split
        classes = self.root / "classes.txt"
        if not classes.is_file():
            raise MmloraError(f"{self.root}: no classes.txt (one class name per line)")
        self.classes = [c for c in classes.read_text(encoding="utf-8").splitlines() if c.strip()]
        meta_path = self.root / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.reduce_zero_label = meta.get("reduce_zero_label", False) if reduce_zero_label is None else reduce_zero_label
        ids_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if ids_file.is_file():
            ids = [i for i in ids_file.read_text().split() if i]
        else:
            ids = sorted(p.stem for p in (self.root / "masks" / split).glob("*.png"))
        if not ids:
            raise MmloraError(f"{self.root}: no samples for split {split!r}")
        self.samples = [SegSample(i, self._image_path(i), self.root / "masks" / split / f"{i}.png") for i in ids]

    def _image_path(self, sample_id: str) -> Path:
        folder = self.root / "images" / self.split
        for ext in (".png", ".jpg", ".jpeg"):
            if (folder / f"{sample_id}{ext}").is_file():
                return folder / f"{sample_id}{ext}"
        return folder / f"{sample_id}.png"

    def __len__(self) -> int:
        return len(self.samples)

    def as_samples(self) -> list[Sample]:
        """One :class:`Sample` per image for training (``images=[image]``, ``target=mask``, no text)."""
        return [Sample(s.id, str(s.mask), [], [s.image], target=s.mask) for s in self.samples]

    def load(self, index: int):
        """``(RGB image, mask [H, W] uint8)``; a mask/image size mismatch or a value outside the class
        list (other than 255) is a :class:`BadSample` naming the file."""
        s = self.samples[index]
        return load_seg_pair(s.image, s.mask, s.id, len(self.classes), self.reduce_zero_label)


def load_seg_pair(image_path: Path, mask_path: Path, sample_id: str, num_classes: int, zero_label: bool = False,
                  max_image_pixels: int = MAX_IMAGE_PIXELS):
    """``(RGB image, mask [H, W] uint8)`` checked as :meth:`SegmentationFolder.load` says."""
    from PIL import Image

    where = str(mask_path)
    image = load_image(image_path, str(image_path), sample_id, max_image_pixels)
    if not Path(mask_path).is_file():
        raise BadSample(where, sample_id, "mask file not found")
    with Image.open(mask_path) as m:
        mask = np.array(m)
    if mask.ndim != 2:
        raise BadSample(where, sample_id, f"mask must be single-channel (index) PNG, got shape {mask.shape}")
    if mask.shape != (image.height, image.width):
        raise BadSample(where, sample_id, f"mask is {mask.shape[1]}x{mask.shape[0]} but image is {image.width}x{image.height}")
    if zero_label:
        mask = reduce_zero_label(mask)
    values = np.unique(mask)
    bad = [int(v) for v in values if v != IGNORE_INDEX and v >= num_classes]
    if bad:
        raise BadSample(where, sample_id, f"mask values {bad} are outside the {num_classes} classes (and not 255)")
    return image, mask
