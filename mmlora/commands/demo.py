"""``mmlora demo``: run the embedded default on the shapes world (see ``mmlora.showcase.demo``);
``mmlora demo seg IMAGE --classes ...``: segment any image into typed class names (``mmlora.showcase.seg_demo``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="runs, evaluations and the overlay (default: runs/demo)")
    parser.add_argument("--data", default="data/shapes", help="the shapes worlds (generated there if missing)")
    sub = parser.add_subparsers(dest="demo_command", metavar="DEMO")
    seg = sub.add_parser("seg", help="segment an image into the given class names; write an overlay and a mask")
    seg.add_argument("image", help="any image file (PNG, JPEG, ...)")
    seg.add_argument("--classes", required=True, help="comma-separated class names; 'cat|kitten' for synonyms; "
                     "'background' uses background words")
    seg.add_argument("--method", default="clearclip", help="dense mode: vanilla, maskclip, sclip, clearclip, naclip")
    seg.add_argument("--run", default=None, help="a CLIP run or model folder/preset (default: shapes-clip-base)")
    seg.add_argument("--templates", default="shapes", help="shapes | shapes-captions | imagenet | 'a {}.;a photo of a {}.'")
    seg.add_argument("--crop", type=int, default=None, help="sliding-window size (default: whole image)")
    seg.add_argument("--stride", type=int, default=None)
    seg.add_argument("--out", default="overlay.png", help="overlay PNG; the mask goes beside it as <stem>_mask.png")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "demo_command", None) == "seg":
        from mmlora.errors import MmloraError
        from mmlora.models.dense import MODES
        from mmlora.showcase.seg_demo import run_seg_demo

        if args.method not in MODES:
            raise MmloraError(f"unknown --method {args.method!r}; known: {', '.join(MODES)}")
        classes = [c.strip() for c in args.classes.split(",")]
        overlay, mask, shares = run_seg_demo(args.image, classes, args.out, args.run, args.method, args.templates,
                                             args.crop, args.stride)
        print(f"segmented {args.image} with {args.run or 'shapes-clip-base'} ({args.method})")
        for c, share in shares.items():
            print(f"  {c:<20} {share:6.1%} of pixels")
        print(f"overlay: {overlay}\nmask:    {mask} (pixel value = class index in --classes order)")
        return 0
    from mmlora.showcase.demo import main

    return main(args.out, args.data)
