"""``mmlora demo``: run the embedded default on the shapes world (see ``mmlora.demo``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--num-images", type=int, default=16, help="world-A val images to use (default: 16)")


def run(args: argparse.Namespace) -> int:
    from mmlora.demo import main

    return main(n=args.num_images)
