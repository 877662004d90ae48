"""``mmlora eval caption``: caption a dataset with one or several models and score them side by side.

    mmlora eval caption --coco data/shapes/world_B/annotations/captions_test.json \
        --model base=tiny-llava --model adapted=runs/tiny-llava-train --out evals/world_B
    mmlora eval caption --coco ... --model m=exports/merged --num-beams 3 --limit 50
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="TASK", required=True)
    cap = sub.add_parser("caption", help="generate captions and score them with pycocoevalcap")
    cap.add_argument("--coco", required=True, help="COCO caption annotations (references; images relative to it)")
    cap.add_argument("--images", help="image root (default: beside the annotations)")
    cap.add_argument("--model", action="append", required=True, metavar="NAME=REF",
                     help="a base (preset, folder, hub id), a run folder or a merged export; repeat to compare")
    cap.add_argument("--out", required=True, help="folder for results, metrics.json and table.md")
    cap.add_argument("--split", default="test", help="recorded in the protocol")
    cap.add_argument("--prompt", default=None, help="default: the common protocol prompt")
    cap.add_argument("--max-new-tokens", type=int, default=64)
    cap.add_argument("--num-beams", type=int, default=1)
    cap.add_argument("--batch-size", type=int, default=16)
    cap.add_argument("--limit", type=int, default=None, help="first N images only")


def run(args: argparse.Namespace) -> int:
    from mmlora.data.shapes import CAPTION_PROMPT
    from mmlora.errors import MmloraError
    from mmlora.eval.caption import CaptionSet, evaluate_models

    models = {}
    for item in args.model:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise MmloraError(f"--model {item!r}: use NAME=REF, e.g. base=tiny-llava")
        models[name] = ref
    data = CaptionSet.from_coco(args.coco, args.images, args.limit)
    report = evaluate_models(models, data, args.out, args.split, args.prompt or CAPTION_PROMPT,
                             args.max_new_tokens, args.num_beams, args.batch_size)
    from mmlora.eval.caption import markdown_table

    print(markdown_table(report))
    print(f"results, per-image captions and metrics.json in {args.out}")
    return 0
