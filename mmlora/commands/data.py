"""``mmlora data``: generate the shapes world; check a dataset before training on it.

    mmlora data shapes --out data/shapes                 # worlds A, B and C, default sizes
    mmlora data shapes --out /tmp/s --worlds A --scale 0.1 --image-size 96
    mmlora data check data/shapes/world_B/llava_train.json --model tiny-llava
    mmlora data check recipes/tiny/llava-train.yaml      # the recipe's train and val data, its model
    mmlora data check data/shapes/world_A                # a segmentation folder (has classes.txt)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    shapes = sub.add_parser("shapes", help="generate the synthetic shapes worlds A, B and C")
    shapes.add_argument("--out", type=Path, required=True, help="output folder (world_A/, world_B/, world_C/ inside)")
    shapes.add_argument("--worlds", default="A,B,C", help="comma-separated worlds (default: A,B,C)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=128, help="pixels per side (default: 128)")
    shapes.add_argument("--scale", type=float, default=1.0, help="multiply every split's size (default: 1)")
    check = sub.add_parser("check", help="validate a dataset: counts, token lengths, image sizes, bad samples")
    check.add_argument("spec", help="a data file (LLaVA JSON/JSONL, COCO captions, messages JSONL), a recipe, "
                       "a datasets folder, or a segmentation folder")
    check.add_argument("--format", choices=["llava", "coco", "messages", "hf"], help="default: guessed from the file")
    check.add_argument("--images", help="image root (default: the data file's folder)")
    check.add_argument("--model", default="tiny-llava", help="whose processor counts tokens (default: tiny-llava)")
    check.add_argument("--max-length", type=int, default=2048)
    check.add_argument("--batch-size", type=int, default=4,
                       help="the batch size whose padding is reported, padded and packed (a recipe: its train section)")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "check":
        return _check(args)
    from mmlora.showcase.shapes import WORLDS, generate
    from mmlora.errors import MmloraError

    worlds = tuple(w.strip() for w in args.worlds.split(",") if w.strip())
    unknown = [w for w in worlds if w not in WORLDS]
    if unknown:
        raise MmloraError(f"unknown world(s) {', '.join(unknown)}; known: {', '.join(WORLDS)}")
    if args.image_size < 32:
        raise MmloraError(f"--image-size {args.image_size} is too small; use at least 32")
    for world, root in generate(args.out, worlds, seed=args.seed, image_size=args.image_size, scale=args.scale).items():
        print(f"world {world}: {root}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from transformers import AutoProcessor

    from mmlora.config.loading import load_recipe
    from mmlora.config.schema import DatasetSpec
    from mmlora.data.build import read_dataset
    from mmlora.data.check import Batching, check_records, check_segmentation, padding_line
    from mmlora.data.image_budget import apply_image_budget
    from mmlora.data.processing import ConversationEncoder
    from mmlora.data.readers import guess_format
    from mmlora.errors import MmloraError
    from mmlora.models.loading import resolve_pretrained

    spec = Path(args.spec)
    if not spec.exists():
        raise MmloraError(f"nothing at {spec}")
    padding = None  # the padding line of image-text training data
    if spec.is_dir() and (spec / "classes.txt").is_file():
        reports = check_segmentation(spec)
    else:
        if args.batch_size < 1:
            raise MmloraError(f"--batch-size {args.batch_size}: use 1 or more")
        model, max_length, budget = args.model, args.max_length, None
        batching = Batching(args.batch_size, max_tokens=max_length)
        is_recipe = spec.suffix in (".yaml", ".yml")
        if is_recipe:
            recipe = load_recipe(spec)
            if recipe.data is None:
                raise MmloraError(f"{spec}: the recipe has no data section")
            model, max_length, budget = recipe.model.name, recipe.data.max_length, recipe.data
            t = recipe.train
            batching = Batching(t.batch_size, t.batch_tokens, t.packing.max_tokens or max_length, t.seed,
                                recipe.data.group_by_length)
            sets = [("train", d) for d in recipe.data.train] + [("val", d) for d in recipe.data.val]
        else:
            fmt = args.format or guess_format(spec)
            sets = [("data", DatasetSpec(format=fmt, path=str(spec), images=args.images))]
        # Paths resolve as `mmlora train` resolves them: against the working directory.
        seg_roots = dict.fromkeys(Path(d.path) for _, d in sets if d.format == "seg")  # every split, once
        reports = [r for root in seg_roots for r in check_segmentation(root)]
        others = [(name, d) for name, d in sets if d.format != "seg"]
        if others:
            model_path = Path(resolve_pretrained(model))
            if (model_path / "open_clip_config.json").is_file():  # CLIP: image-caption pairs
                from mmlora.objectives.contrastive import Contrastive

                apply_image_budget(None, budget)
                encoder = Contrastive(model_path).encoder
                batching = None  # contrastive batches have no sequences to pad or pack
            else:  # the recipe's image budget, as training applies it: the same image tokens
                encoder = ConversationEncoder(apply_image_budget(AutoProcessor.from_pretrained(model_path), budget),
                                              max_length)
            checked = [(name, d, check_records(f"{name}: {d.path} ({d.format})", read_dataset(d), encoder))
                       for name, d in others]
            reports += [r for _, _, r in checked]
            if batching is not None:  # the training data as the trainer mixes it (weights applied), batched
                padding = padding_line([(r, d.weight) for name, d, r in checked if name != "val"], batching,
                                       "the training mix" if is_recipe else "data")
    for r in reports:
        print(r.format())
    if padding:
        print(padding)
    return 0 if all(r.ok for r in reports) else 1
