"""Convert segmentation datasets to mmlora's folder layout (see mmlora/data/segmentation.py).

Run:
    python data_prep/seg_layouts.py voc      VOCdevkit/VOC2012            --out data/voc
    python data_prep/seg_layouts.py ade20k   ADEChallengeData2016         --out data/ade20k
    python data_prep/seg_layouts.py context  VOCdevkit/VOC2010 --classes context59.txt --out data/context

Layouts read:
- VOC: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette, 255 = boundary/ignore),
  ``ImageSets/Segmentation/{train,val}.txt``; the 21 VOC classes.
- ADE20K (SceneParsing): ``images/{training,validation}/*.jpg``, ``annotations/{...}/*.png`` where 0 is
  "other": written with ``meta.json`` ``{"reduce_zero_label": true}`` and the 150 class names given by
  ``--classes`` (one per line; default: numbered names).
- Pascal-Context (mmsegmentation's layout): ``JPEGImages``, ``SegmentationClassContext/*.png``,
  ``ImageSets/SegmentationContext/{train,val}.txt``; class names from ``--classes``.
Files are hard-linked where possible (copied otherwise); masks are written unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write(out: Path, splits: dict[str, list[tuple[str, Path, Path]]], classes: list[str], meta: dict) -> dict[str, int]:
    (out / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        for sid, img, mask in items:
            _place(img, out / "images" / split / f"{sid}{img.suffix}")
            _place(mask, out / "masks" / split / f"{sid}.png")
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{s}\n" for s, _, _ in items))
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {s: len(v) for s, v in splits.items()}


def _ids_layout(root: Path, image_dir: str, mask_dir: str, sets_dir: str) -> dict[str, list[tuple[str, Path, Path]]]:
    splits = {}
    for split_file in sorted((root / sets_dir).glob("*.txt")):
        ids = split_file.read_text().split()
        items = [(i, root / image_dir / f"{i}.jpg", root / mask_dir / f"{i}.png") for i in ids]
        items = [it for it in items if it[2].is_file()]
        if items:
            splits[split_file.stem] = items
    return splits


def convert_voc(root: Path, out: Path) -> dict[str, int]:
    splits = _ids_layout(root, "JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
    return _write(out, splits, VOC_CLASSES, {"source": "voc", "reduce_zero_label": False, "ignore_index": 255})


def convert_context(root: Path, out: Path, classes: list[str]) -> dict[str, int]:
    splits = _ids_layout(root, "JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext")
    return _write(out, splits, classes, {"source": "pascal-context", "reduce_zero_label": False, "ignore_index": 255})


def convert_ade20k(root: Path, out: Path, classes: list[str]) -> dict[str, int]:
    splits = {}
    for src, split in (("training", "train"), ("validation", "val")):
        masks = sorted((root / "annotations" / src).glob("*.png"))
        splits[split] = [(m.stem, root / "images" / src / f"{m.stem}.jpg", m) for m in masks]
    return _write(out, splits, classes, {"source": "ade20k", "reduce_zero_label": True, "ignore_index": 255})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("layout", choices=["voc", "ade20k", "context"])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=Path, help="class names, one per line (ADE20K, Pascal-Context)")
    args = p.parse_args(argv)
    names = [c for c in args.classes.read_text().splitlines() if c.strip()] if args.classes else None
    if args.layout == "voc":
        counts = convert_voc(args.root, args.out)
    elif args.layout == "ade20k":
        counts = convert_ade20k(args.root, args.out, names or [f"class_{i}" for i in range(150)])
    else:
        if not names:
            p.error("context needs --classes (e.g. the 59 or 459 Pascal-Context names)")
        counts = convert_context(args.root, args.out, names)
    print(", ".join(f"{s}: {n}" for s, n in counts.items()), "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
