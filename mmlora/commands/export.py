"""``mmlora export RUN --out DIR [--merge]``: adapters only (PEFT folders + manifest), or merged.

    mmlora export runs/tiny-llava-train --out exports/adapters
    mmlora export runs/tiny-llava-train --out exports/merged --merge   # 4-bit bases are dequantized first
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run folder (its final/) or a checkpoint folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--merge", action="store_true", help="merge the adapters into the base model")


def run(args: argparse.Namespace) -> int:
    from mmlora.export import export_run

    result = export_run(args.run, args.out, merge=args.merge)
    extra = f" (merge check: max |diff| {result['max_abs_diff']:.2e})" if result["merged"] else ""
    print(f"exported {'merged model' if result['merged'] else 'adapters'} to {result['out']}{extra}")
    return 0
