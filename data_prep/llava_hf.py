"""Convert LLaVA conversation JSON to a Hugging Face ``datasets`` folder, and back.

Run:
    python data_prep/llava_hf.py to-hf llava_train.json --out hf_train      # images embedded
    python data_prep/llava_hf.py from-hf hf_train --out llava_back.json       # images written beside it

The ``datasets`` table has columns ``id``, ``image`` (an Image feature; null for text-only samples)
and ``conversations`` (the LLaVA turns), which ``mmlora``'s ``hf`` reader takes as is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def to_hf(llava_json: Path, out: Path) -> int:
    import datasets

    items = json.loads(llava_json.read_text())
    root = llava_json.parent
    table = datasets.Dataset.from_dict({
        "id": [str(it["id"]) for it in items],
        "image": [str(root / it["image"]) if it.get("image") else None for it in items],
        "conversations": [it["conversations"] for it in items],
    }).cast_column("image", datasets.Image())
    table.save_to_disk(str(out))
    return len(table)


def from_hf(folder: Path, out: Path) -> int:
    import datasets

    table = datasets.load_from_disk(str(folder))
    image_dir = out.parent / f"{out.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for row in table:
        item = {"id": row["id"], "conversations": row["conversations"]}
        if row["image"] is not None:
            name = f"{row['id']}.png"
            row["image"].save(image_dir / name)
            item["image"] = f"{image_dir.name}/{name}"
        items.append(item)
    out.write_text(json.dumps(items, indent=1) + "\n")
    return len(items)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("direction", choices=["to-hf", "from-hf"])
    p.add_argument("source", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    n = to_hf(args.source, args.out) if args.direction == "to-hf" else from_hf(args.source, args.out)
    print(f"{n} samples -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
