"""The README's segmentation picture: world-A test images with the unseen class, segmented by the
base CLIP (training-free) and by the dense LoRA and full fine-tuning runs.

Run: python scripts/seg_figure.py --out docs/seg_overlay.png   (after training the two seg recipes)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from PIL import Image

    from mmlora.data.segmentation import SegmentationFolder
    from mmlora.showcase.demo import overlay_figure
    from mmlora.showcase.seg_demo import ClipSegmenter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shapes/world_A"))
    parser.add_argument("--lora", default="runs/shapes-clip-seg-lora")
    parser.add_argument("--full", default="runs/shapes-clip-seg-full")
    parser.add_argument("--images", type=int, default=2, help="rows: test images showing the unseen class")
    parser.add_argument("--unseen", default="triangle")
    parser.add_argument("--out", type=Path, default=Path("docs/seg_overlay.png"))
    args = parser.parse_args(argv)

    folder = SegmentationFolder(args.data, "test")
    classes, unseen = folder.classes, folder.classes.index(args.unseen)
    segmenters = [ClipSegmenter(classes, "shapes-clip-base", "clearclip"), ClipSegmenter(classes, args.lora, "vanilla"),
                  ClipSegmenter(classes, args.full, "vanilla")]
    rows = []
    for i in range(len(folder)):
        image, truth = folder.load(i)
        if (truth == unseen).sum() < 150:
            continue
        masks = [segment(image) for segment in segmenters]
        row = args.out.with_name(f"{args.out.stem}_{len(rows)}.png")
        overlay_figure(folder.samples[i].image, np.asarray(truth), masks, classes, row,
                       ("input", "ground truth", "base (ClearCLIP)", "LoRA q/v (dense)", "full q/v (dense)"))
        rows.append(Image.open(row))
        row.unlink()
        if len(rows) == args.images:
            break
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for k, r in enumerate(rows):
        sheet.paste(r, (0, k * rows[0].height))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
