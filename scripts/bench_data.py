"""Measure the data pipeline alone: samples/s from records to padded batches, to compare with a
training step's time.

Run: python scripts/bench_data.py [--model shapes-llava] [--batch-size 16] [--batches 30] [--workers 0]

It reads world-B LLaVA JSON from the cached shapes world, encodes every sample with the model's
processor (image decode + resize + normalise, chat template, tokenization, label spans) and collates
batches through a DataLoader with the grouped sampler; reported: samples/s and ms per batch.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoProcessor

    from mmlora.data.batching import Collator, ConversationDataset, GroupedBatchSampler
    from mmlora.data.processing import ConversationEncoder
    from mmlora.data.readers import read_llava
    from mmlora.showcase.shapes import cached_worlds
    from mmlora.models.loading import resolve_pretrained

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-llava")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)

    processor = AutoProcessor.from_pretrained(resolve_pretrained(args.model))
    records = read_llava(cached_worlds() / "world_B" / "llava_train.json")
    ds = ConversationDataset(records, ConversationEncoder(processor))
    sampler = GroupedBatchSampler(ds.lengths(64), ds.has_image(), args.batch_size)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(processor.tokenizer.pad_token_id),
                                         num_workers=args.workers)
    n, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        n += batch["input_ids"].shape[0]
        if i + 1 == args.batches:
            break
    elapsed = time.perf_counter() - start
    print(f"data pipeline ({args.model}, batch {args.batch_size}, workers {args.workers}): "
          f"{n / elapsed:.1f} samples/s, {1000 * elapsed / (i + 1):.1f} ms per batch over {i + 1} batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
