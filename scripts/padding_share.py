"""How much padding HF Trainer's ``group_by_length`` leaves on the packing benchmark's mixture, by
dataset size: what removing padding (packing) can gain over it on work proportional to tokens.

Run: python scripts/padding_share.py [--sizes 96,400,800,4000] [--out DIR]

The mixture (``train_bench/mixture.py``) is built at each size and encoded with the ``llava7b-shape``
processor (144 image tokens), as ``scripts/bench_train.py --data mixture`` does; the sampler is HF's
own, 20 shuffles per size. HF groups lengths within mega-batches of ``min(n // (4 x batch), 50)``
batches: a 96-sample pass sorts 24 samples at a time, a dataset of 800 or more 200 at a time. Beside
it, what ``mmlora data check`` reports for mmlora's own sampler (seed 0): batches of ``--batch-size``
samples padded and packed into rows of 2048, and token budgets of batch x mean length, packed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmlora.data.check import Batching, padding_shares
from train_bench.mixture import padding_share, prepare_mixture
from train_bench.shapes import SHAPES, build_model_folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="96,400,800,4000", help="dataset sizes (samples), comma-separated")
    p.add_argument("--batch-size", type=int, default=4, help="per-device batch of the reference (the benchmark's: 4)")
    p.add_argument("--out", type=Path, default=None, help="write padding.md here")
    args = p.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sizes: comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1 or args.batch_size < 1:
        p.error("--sizes and --batch-size: positive integers")
    from transformers import AutoProcessor

    from mmlora.data.batching import ConversationDataset
    from mmlora.data.processing import ConversationEncoder
    from mmlora.data.readers import read_llava
    from mmlora.showcase.shapes import cached_worlds

    work = Path(tempfile.mkdtemp(prefix="padding-"))
    processor = AutoProcessor.from_pretrained(build_model_folder(SHAPES["llava7b-shape"], work / "model"))
    world = cached_worlds(scale=0.05) / "world_A"
    rows = ["| samples | HF mega-batch (samples) | mean length | padding share, mean (min–max of 20 shuffles) "
            f"| mmlora, batches of {args.batch_size}: padded, packed | mmlora, token budgets, packed |",
            "|---|---|---|---|---|---|"]
    for n in sizes:
        ds = ConversationDataset(read_llava(prepare_mixture(n, world, work, name=f"mixture-{n}.json"), world),
                                 ConversationEncoder(processor, 2048))
        lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
        mean, low, high = padding_share(lengths, args.batch_size)
        mega = max(1, min(n // (4 * args.batch_size), 50)) * args.batch_size  # as HF computes it
        has_image = ds.has_image()
        padded, packed = padding_shares(lengths, has_image, Batching(args.batch_size))
        budget = args.batch_size * round(sum(lengths) / n)  # the benchmark's batch_tokens
        _, budget_packed = padding_shares(lengths, has_image, Batching(batch_tokens=budget))
        rows.append(f"| {n} | {mega} | {sum(lengths) / n:.0f} | {mean:.1%} ({low:.1%}–{high:.1%}) "
                    f"| {padded:.1%}, {packed:.1%} | {budget_packed:.1%} ({budget} cells) |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "padding.md").write_text(f"HF group_by_length on the mixture, batch {args.batch_size}\n\n{table}\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
