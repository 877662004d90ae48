"""``mmlora predict REF --image IMG [--image IMG ...] [--prompt TEXT]``: answer images with a run, an
export, or a composition of runs (``mmlora.runs.compose``).

    mmlora predict runs/tiny-llava-train --image data/shapes/world_B/images/test/B_test_00000.png
    mmlora predict exports/merged --image photo.jpg --prompt "What is in the picture?"
    mmlora predict runs/a+runs/b:linear:0.5,0.5 --image photo.jpg            # a weighted merge
    mmlora predict runs/a+runs/b --image x.png --adapter a --image y.png --adapter b   # one mixed batch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run folder (its final/), a checkpoint folder, a merged export, or "
                        "RUN_A+RUN_B[:mixed | :linear|ties|dare_linear|dare_ties|svd|...:W1,W2[:density=D]]")
    parser.add_argument("--image", required=True, action="append", help="repeat for several images (one batch)")
    parser.add_argument("--adapter", action="append", default=None,
                        help="with a mixed composition: the adapter of each --image, in order (default round robin; "
                             "__base__ = no adapter)")
    parser.add_argument("--prompt", default=None, help="default: the captioning protocol prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    from mmlora.data.samples import CAPTION_PROMPT, load_image
    from mmlora.errors import MmloraError
    from mmlora.generate import generate_answers
    from mmlora.runs.compose import check_adapter_names
    from mmlora.runs.reference import load_reference

    loaded = load_reference(args.run)
    model, processor, route = loaded.model, loaded.processor, loaded.route
    if processor is None or not hasattr(model, "generate"):
        raise MmloraError(f"{args.run} is not an image-text-to-text run; predict answers with VLM runs")
    names = route(len(args.image))
    if args.adapter:
        if names is None:
            raise MmloraError("--adapter needs a mixed composition of runs, e.g. runs/a+runs/b")
        if len(args.adapter) != len(args.image):
            raise MmloraError(f"{len(args.adapter)} --adapter for {len(args.image)} --image: give one per image")
        check_adapter_names(args.adapter, loaded.adapters or [])
        names = args.adapter
    images = [load_image(Path(p), p, None) for p in args.image]
    answers = generate_answers(model, processor, images, args.prompt or CAPTION_PROMPT, batch_size=len(images),
                                max_new_tokens=args.max_new_tokens, adapter_names=names)
    for k, answer in enumerate(answers):
        if len(answers) == 1 and not names:
            print(answer)
        else:
            print(f"{args.image[k]}\t{names[k] if names else '-'}\t{answer}")
    empty = [args.image[k] for k, answer in enumerate(answers) if not answer]
    if empty:
        which = f"for {empty[0]}" if len(answers) == 1 else \
            f"for {len(empty)} of {len(answers)} images: {', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}"
        print(f"mmlora: warning: the model produced an empty answer ({which}): the base may not have learned to "
              "answer this prompt; try --max-new-tokens or another prompt", file=sys.stderr)
    return 0
