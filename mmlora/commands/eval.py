"""``mmlora eval caption|seg|fewshot``: caption metrics side by side; open-vocabulary segmentation
mIoU; few-shot CLIP classification.

    mmlora eval caption --coco data/shapes/world_B/annotations/captions_test.json \
        --model base=tiny-llava --model adapted=runs/tiny-llava-train --out runs/evals/world_B
    mmlora eval caption --coco ... --model m=exports/merged --num-beams 3 --limit 50
    mmlora eval seg --data data/shapes/world_A --split test --clip shapes-clip-base --unseen triangle --out runs/evals/seg
    mmlora eval seg --data data/shapes/world_A --model base=shapes-clip-base --model lora=runs/shapes-clip-seg-lora \
        --modes vanilla --unseen triangle --out runs/evals/seg
    mmlora eval fewshot --data data/shapes/world_B --model base=shapes-clip-base --shots 1,4,16 --out runs/evals/fewshot
"""

from __future__ import annotations

import argparse
import sys


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
    seg = sub.add_parser("seg", help="open-vocabulary segmentation with CLIP dense modes, scored by mIoU")
    seg.add_argument("--data", required=True, help="a segmentation folder (classes.txt, images/, masks/)")
    seg.add_argument("--split", default="test")
    seg.add_argument("--clip", default=None, help="one open_clip model (preset or folder) or run; default shapes-clip-base")
    seg.add_argument("--model", action="append", default=[], metavar="NAME=REF",
                     help="a named CLIP (preset, folder or run); repeat to compare; rows are NAME/MODE")
    seg.add_argument("--modes", default="vanilla,maskclip,sclip,clearclip,naclip")
    seg.add_argument("--templates", default="shapes", help="shapes | shapes-captions | imagenet | 'a {}.;a photo of a {}.'")
    seg.add_argument("--crop", type=int, default=None, help="sliding-window size (default: whole image)")
    seg.add_argument("--stride", type=int, default=None)
    seg.add_argument("--short-side", type=int, default=None, help="default: the CLIP's input size")
    seg.add_argument("--bg-threshold", type=float, default=None)
    seg.add_argument("--unseen", default="", help="comma-separated classes reported as unseen")
    seg.add_argument("--limit", type=int, default=None)
    seg.add_argument("--out", required=True)
    few = sub.add_parser("fewshot", help="few-shot classification with CLIP: zero-shot vs k-shot prototypes")
    few.add_argument("--data", required=True, help="a segmentation folder (label: dominant class) or an image "
                     "folder (SPLIT/CLASS/*.png)")
    few.add_argument("--model", action="append", required=True, metavar="NAME=REF",
                     help="a CLIP (preset, folder or run); repeat to compare")
    few.add_argument("--shots", default="1,4,16", help="comma-separated shots per class")
    few.add_argument("--seeds", type=int, default=3, help="support sets drawn per shot count")
    few.add_argument("--templates", default="shapes", help="shapes | shapes-captions | imagenet | 'a {}.;a photo of a {}.'")
    few.add_argument("--train-split", default="train")
    few.add_argument("--test-split", default="test")
    few.add_argument("--limit", type=int, default=None, help="first N test images only")
    few.add_argument("--out", required=True)


def _named(values: list[str]) -> dict[str, str]:
    from mmlora.errors import MmloraError

    bad = [m for m in values if "=" not in m]
    if bad:
        raise MmloraError(f"--model takes NAME=REF, got {bad[0]!r}")
    return dict(m.split("=", 1) for m in values)


def run(args: argparse.Namespace) -> int:
    if args.eval_command == "seg":
        return _seg(args)
    if args.eval_command == "fewshot":
        return _fewshot(args)
    from mmlora.data.samples import CAPTION_PROMPT
    from mmlora.errors import MmloraError
    from mmlora.eval.caption import CaptionSet, empty_caption_warnings, evaluate_models, markdown_table
    from mmlora.showcase.slots import slot_scores

    models = {}
    for item in args.model:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise MmloraError(f"--model {item!r}: use NAME=REF, e.g. base=tiny-llava")
        models[name] = ref
    data = CaptionSet.from_coco(args.coco, args.images, args.limit)
    report = evaluate_models(models, data, args.out, args.split, args.prompt or CAPTION_PROMPT,
                             args.max_new_tokens, args.num_beams, args.batch_size, extra=slot_scores)

    print(markdown_table(report))
    print(f"results, per-image captions and metrics.json in {args.out}")
    for line in empty_caption_warnings(report):
        print(f"mmlora: warning: {line}", file=sys.stderr)
    return 0


def _seg(args: argparse.Namespace) -> int:
    from mmlora.errors import MmloraError
    from mmlora.models.dense import MODES
    from mmlora.eval.segmentation import evaluate_segmentation, seg_table

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise MmloraError(f"unknown mode(s) {', '.join(bad)}; known: {', '.join(MODES)}")
    if args.model and args.clip:
        raise MmloraError("give --clip or --model NAME=REF, not both")
    models: str | dict[str, str] = args.clip or "shapes-clip-base"
    if args.model:
        models = _named(args.model)
    report = evaluate_segmentation(models, args.data, args.split, modes, args.out, args.templates, args.crop,
                                   args.stride, args.short_side, args.bg_threshold, args.limit,
                                   [c for c in args.unseen.split(",") if c])
    print(seg_table(report))
    print(f"metrics.json and table.md in {args.out}")
    return 0


def _fewshot(args: argparse.Namespace) -> int:
    from mmlora.errors import MmloraError
    from mmlora.eval.fewshot import evaluate_fewshot, fewshot_table

    try:
        shots = [int(k) for k in args.shots.split(",") if k.strip()]
    except ValueError:
        raise MmloraError(f"--shots takes comma-separated integers, got {args.shots!r}") from None
    if not shots or min(shots) < 1:
        raise MmloraError(f"--shots needs positive shot counts, got {args.shots!r}")
    report = evaluate_fewshot(_named(args.model), args.data, args.out, shots, args.seeds, args.templates,
                              args.train_split, args.test_split, args.limit)
    print(fewshot_table(report))
    print(f"metrics.json and table.md in {args.out}")
    return 0
