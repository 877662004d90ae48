"""Exact sequence packing: the samples of a micro-batch laid end to end in rows of at most ``max_tokens``.

A packed batch gives every sample the loss and gradients it gets alone. Three things make it so:

* **positions restart per sample** — ``position_ids`` count from 0 in every sample (and in the
  padding run that ends a row), so rotary embeddings see what they see unpacked; for families with
  multi-dimensional rotary positions (Qwen2/2.5/3-VL's mRoPE) the model's own positions of each
  sample alone (``positions``) follow the restarting text row, ``[1 + k, B, L]``, the layout those
  models read packed positions in;
* **attention never crosses samples** — the batch carries no ``attention_mask``; transformers then
  reads the sample boundaries from the restarting ``position_ids`` and builds a block-diagonal causal
  mask (``masking_utils.find_packed_sequence_indices``), and FlashAttention-2 / mmlora's varlen SDPA
  (:mod:`mmlora.models.varlen`) take the same boundaries as segments;
* **no label crosses a boundary** — the first token of every sample is unlabelled, so the next-token
  loss never asks a sample's last token to predict the next sample's first.

Images and their per-image tensors stay with their sample: samples are concatenated row by row, and
the image tensors in that same order, which is the order the families fill image-token positions in.

Rows are filled first-fit-decreasing (longest sample first, into the first row with room; ties by
position in the micro-batch), deterministic for a given micro-batch, so the seeded length-grouped
sampler's order and its resumable position stay what they are without packing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmlora.data.batching import Collator
from mmlora.data.processing import IGNORE
from mmlora.errors import MmloraError


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows whose lengths sum to at most ``capacity``: longest
    first, each into the first row it fits (a new row when none has room). Each row lists its
    indices in the order they were placed."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise MmloraError(f"a sample of {lengths[i]} tokens is longer than train.packing.max_tokens={capacity}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


class PackedCollator(Collator):
    """:class:`Collator`'s inputs, packed: rows of samples end to end, ``position_ids`` restarting per
    sample, no ``attention_mask``. Per-token tensors (``mm_token_type_ids``, ...) are concatenated
    like the text; per-image tensors in the samples' packed order."""

    def __init__(self, pad_token_id: int, max_tokens: int,
                 positions: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None):
        """``positions``: a sample → its model positions ``[k, L]`` (mRoPE), for families whose rotary
        positions are not one count per token."""
        super().__init__(pad_token_id, padding_side="right")
        self.max_tokens = max_tokens
        self.positions = positions

    def __call__(self, items: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
        items = [it for it in items if it is not None]
        if not items:
            return None
        rows = first_fit_decreasing([len(it["input_ids"]) for it in items], self.max_tokens)
        ordered = [items[i] for row in rows for i in row]
        per_token = sorted({k for it in items for k in it if k not in ("input_ids", "attention_mask", "labels")
                            and self._per_token(it, k)})
        longest = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "labels", "position_ids", *per_token)}
        for row in rows:
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in out}
            for i in row:
                it = items[i]
                n = len(it["input_ids"])
                labels = it["labels"].clone()
                labels[0] = IGNORE  # nothing predicts a sample's first token: the row's previous token is another sample's
                parts["input_ids"].append(it["input_ids"])
                parts["labels"].append(labels)
                here = torch.arange(n)
                if self.positions is not None:
                    here = torch.cat([here[None], self.positions(it).to(here.dtype)])
                parts["position_ids"].append(here)
                for k in per_token:
                    parts[k].append(it[k] if k in it else torch.zeros_like(it["input_ids"]))
            pad = longest - sum(len(t) for t in parts["input_ids"])
            if pad:  # the padding run is a segment of its own: it follows the row's samples causally, so they never see it
                parts["input_ids"].append(torch.full((pad,), self.pad_token_id, dtype=parts["input_ids"][0].dtype))
                parts["labels"].append(torch.full((pad,), IGNORE, dtype=parts["labels"][0].dtype))
                rows_of = parts["position_ids"][0].shape[0] if self.positions is not None else None
                parts["position_ids"].append(torch.arange(pad) if rows_of is None else torch.arange(pad).expand(rows_of, -1))
                for k in per_token:
                    parts[k].append(torch.zeros(pad, dtype=parts[k][0].dtype))
            for k, pieces in parts.items():
                out[k].append(torch.cat(pieces, dim=-1))
        batch = {k: torch.stack(v, dim=-2) for k, v in out.items()}
        for key in sorted({k for it in ordered for k in it} - set(batch) - {"attention_mask"}):
            have = [it[key] for it in ordered if key in it]
            batch[key] = self._concat(have, key)
        return batch


def segment_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of the segments a packed ``position_ids`` ``[B, L]`` (or ``[1 + k, B, L]``,
    text row first) describes (a segment starts wherever the position does not follow the previous one)."""
    if position_ids.dim() == 3:
        position_ids = position_ids[0]
    out = []
    for row in position_ids.tolist():
        starts = [j for j, p in enumerate(row) if j == 0 or p != row[j - 1] + 1]
        out.append([b - a for a, b in zip(starts, starts[1:] + [len(row)])])
    return out
