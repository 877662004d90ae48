"""``mmlora predict RUN --image IMG [--prompt TEXT]``: answer one image with a run or an export.

    mmlora predict runs/tiny-llava-train --image data/shapes/world_B/images/test/B_test_00000.png
    mmlora predict exports/merged --image photo.jpg --prompt "What is in the picture?"
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run folder (its final/), a checkpoint folder, or a merged export")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default=None, help="default: the captioning protocol prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    from mmlora.data.shapes import CAPTION_PROMPT
    from mmlora.errors import MmloraError
    from mmlora.export import load_run, predict

    model, processor, _ = load_run(args.run)
    if processor is None or not hasattr(model, "generate"):
        raise MmloraError(f"{args.run} is not an image-text-to-text run; predict answers with VLM runs")
    print(predict(model, processor, args.image, args.prompt or CAPTION_PROMPT, args.max_new_tokens))
    return 0
