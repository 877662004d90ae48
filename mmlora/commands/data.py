"""``mmlora data``: generate the shapes world (more dataset tools come with the data pipeline).

    mmlora data shapes --out data/shapes                 # worlds A and B, default sizes
    mmlora data shapes --out /tmp/s --worlds A --scale 0.1 --image-size 96
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    shapes = sub.add_parser("shapes", help="generate the synthetic shapes worlds A and B")
    shapes.add_argument("--out", type=Path, required=True, help="output folder (world_A/, world_B/ inside)")
    shapes.add_argument("--worlds", default="A,B", help="comma-separated worlds (default: A,B)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=128, help="pixels per side (default: 128)")
    shapes.add_argument("--scale", type=float, default=1.0, help="multiply every split's size (default: 1)")


def run(args: argparse.Namespace) -> int:
    from mmlora.data.shapes import WORLDS, generate
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
