"""``mmlora export RUN --out DIR [--merge]``: adapters only (PEFT folders + manifest), or merged.

    mmlora export runs/tiny-llava-train --out exports/adapters
    mmlora export runs/tiny-llava-train --out exports/merged --merge   # 4-bit bases are dequantized first
    mmlora export runs/qalora --out exports/int4 --merge                # QA-LoRA: stays INT4
    mmlora export runs/qlora --out exports/int4 --merge --int4 32       # merge, then re-quantize to INT4
    mmlora export runs/adalora --out exports/lora --as-lora             # AdaLoRA → LoRA at the allocated ranks
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run folder (its final/) or a checkpoint folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--merge", action="store_true", help="merge the adapters into the base model")
    parser.add_argument("--int4", type=int, default=None, metavar="GROUP_SIZE",
                        help="with --merge: re-quantize the quantized modalities' merged layers to INT4")
    parser.add_argument("--as-lora", action="store_true",
                        help="an AdaLoRA run: write its adapter as plain LoRA at the allocated per-module ranks")


def run(args: argparse.Namespace) -> int:
    from mmlora.runs.export import export_run

    result = export_run(args.run, args.out, merge=args.merge, int4_group_size=args.int4, as_lora=args.as_lora)
    what = "adapters"
    if result.get("as_lora"):
        what = f"AdaLoRA adapter as LoRA ({result['modules']} modules; check: max |diff| {result['max_abs_diff']:.2e})"
    if result["merged"]:
        what = f"merged INT4 model ({result['int4_layers']} INT4 layers)" if result["int4_layers"] else "merged model"
        label = "re-quantization error" if result["requantized"] else "merge check"
        what += f" ({label}: max |diff| {result['max_abs_diff']:.2e})"
    print(f"exported {what} to {result['out']}")
    return 0
