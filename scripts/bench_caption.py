"""Captions per second, batched vs one by one, for a captioning model on shapes-world test images.

Run: python scripts/bench_caption.py [--model shapes-llava] [--images 32] [--batch-size 16] [--max-new-tokens 32]

Both paths use the same greedy protocol (and produce the same captions); the report is the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from mmlora.data.samples import load_image
    from mmlora.showcase.shapes import cached_worlds
    from mmlora.eval.caption import CaptionSet, load_captioner
    from mmlora.generate import generate_answers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-llava")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    model, processor, _ = load_captioner(args.model)
    data = CaptionSet.from_coco(cached_worlds() / "world_B" / "annotations" / "captions_test.json", limit=args.images)
    images = [load_image(data.files[i], "", None) for i in data.image_ids]
    t0 = time.perf_counter()
    batched = generate_answers(model, processor, images, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    t1 = time.perf_counter()
    single = [generate_answers(model, processor, [im], batch_size=1, max_new_tokens=args.max_new_tokens)[0] for im in images]
    t2 = time.perf_counter()
    b, s = len(images) / (t1 - t0), len(images) / (t2 - t1)
    print(f"{args.model}, {len(images)} images, {args.max_new_tokens} new tokens max: batched ({args.batch_size}) "
          f"{b:.1f} captions/s, one by one {s:.1f} captions/s, ratio {b / s:.2f}x; same captions: {batched == single}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
