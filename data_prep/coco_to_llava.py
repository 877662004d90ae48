"""Convert COCO caption annotations to LLaVA conversation JSON.

Run:
    python data_prep/coco_to_llava.py annotations/captions_train2017.json --out llava_train.json \
        [--images-prefix train2017/] [--captions first|all] [--prompt "Provide a one-sentence caption ..."]

Image paths in the output are the COCO ``file_name`` with ``--images-prefix`` prepended, relative to
the output file's folder (where mmlora resolves them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def convert(coco: dict, prompt: str, images_prefix: str = "", captions: str = "all") -> list[dict]:
    images = {img["id"]: img for img in coco["images"]}
    out, seen = [], set()
    for ann in coco["annotations"]:
        img = images[ann["image_id"]]
        if captions == "first" and img["id"] in seen:
            continue
        seen.add(img["id"])
        out.append({
            "id": f"{img['id']}_{ann['id']}",
            "image": images_prefix + img["file_name"],
            "conversations": [
                {"from": "human", "value": f"<image>\n{prompt}"},
                {"from": "gpt", "value": ann["caption"].strip()},
            ],
        })
    return out


def main(argv: list[str] | None = None) -> int:
    from mmlora.data.samples import CAPTION_PROMPT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("annotations", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images-prefix", default="")
    p.add_argument("--captions", choices=["all", "first"], default="all")
    p.add_argument("--prompt", default=CAPTION_PROMPT)
    args = p.parse_args(argv)
    items = convert(json.loads(args.annotations.read_text()), args.prompt, args.images_prefix, args.captions)
    args.out.write_text(json.dumps(items, indent=1) + "\n")
    print(f"{len(items)} samples -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
