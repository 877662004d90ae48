"""A global batch as one process trains on it: its slice of the samples, encoded and cut into
``grad_accum`` micro-batches (or token-budget micro-batches, ``train.batch_tokens``), and the stand-in
a process runs when nothing in its slice is usable.

Layer: train. Imports data, config and the foundation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mmlora.config.schema import TrainSpec
from mmlora.data.batching import ConversationDataset, cut_by_tokens
from mmlora.errors import MmloraError
from mmlora.train.skips import SkipLedger

Batch = dict[str, torch.Tensor]
Collate = Callable[[list], dict[str, torch.Tensor] | None]


def process_slice(indices: list[int], rank: int, world: int) -> list[int]:
    """Process ``rank``'s share of a global batch: contiguous, the last ones shorter (or empty)."""
    per_process = math.ceil(len(indices) / world)
    return indices[rank * per_process:(rank + 1) * per_process]


def micro_batches(dataset: ConversationDataset, mine: list[int], collate: Collate, train: TrainSpec,
                  unit: str) -> tuple[list[Batch], int, int]:
    """``mine`` encoded and cut into micro-batches of ``train.batch_size`` samples, or of at most
    ``train.batch_tokens`` token cells (cut by the encoded lengths; packed rows count their tokens).

    Returns ``(batches, bad, tokens)``: the usable micro-batches (none when the slice is empty or all
    of it was skipped as bad), how many of its samples were skipped, and the tokens of its usable
    samples (their sequences' lengths, image tokens included; 0 when ``unit`` is not ``token``).
    """
    if train.batch_tokens:
        encoded = [item for item in (dataset[i] for i in mine) if item is not None]
        bad = len(mine) - len(encoded)
        runs = cut_by_tokens([len(it["input_ids"]) for it in encoded], train.batch_tokens, train.packing.enabled)
        groups = [[encoded[j] for j in run] for run in runs]
    else:
        groups = [[dataset[i] for i in mine[k:k + train.batch_size]] for k in range(0, len(mine), train.batch_size)]
        bad = sum(item is None for g in groups for item in g)
    batches = [b for b in (collate(items) for items in groups) if b is not None]
    tokens = sum(len(it["input_ids"]) for g in groups for it in g if it is not None) if unit == "token" else 0
    return batches, bad, tokens


def stand_in(dataset: ConversationDataset, indices: list[int], collate: Collate, skips: SkipLedger, step: int) -> Batch:
    """A one-sample batch of the global batch's modality for a process with nothing usable: it runs
    with weight 0, so that every process takes part in each forward and backward as DDP requires (and
    the same modules run as on the other processes). ``step`` (0-based) names the step in an error."""
    for i in reversed(indices):
        batch = collate([dataset[i]])
        if batch is not None:
            return batch
    found = skips.first_usable(dataset.samples[indices[0]].has_image if indices else None)
    if found is None:
        found = skips.first_usable(None)
    if found is None:  # the other processes had units, so some sample encodes
        raise MmloraError(f"step {step + 1}: this process found no usable training sample to take part with")
    return collate([dataset[found]])
