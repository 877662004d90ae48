"""Datasets, bad-sample policy, collation and a resumable length-grouped sampler.

* :class:`ConversationDataset` encodes samples on access. Under ``on_bad_sample: error`` the first bad
  sample raises a :class:`~mmlora.data.samples.BadSample` naming file, line/id and problem; under
  ``skip`` it is dropped, counted and kept for :meth:`ConversationDataset.write_skip_report`.
* :class:`Collator` pads to the longest sample in the batch (``labels`` with ``-100``) and
  concatenates image tensors in sample order, so batches can mix image and text-only samples.
* :class:`GroupedBatchSampler` yields batches of one modality (all with images, or all text-only)
  and similar lengths, shuffled from a seed; its position is part of a checkpoint, so a resumed run
  continues mid-epoch with the very next batch.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmlora.data.processing import IGNORE, ConversationEncoder
from mmlora.data.samples import BadSample, Sample

log = logging.getLogger(__name__)


class ConversationDataset(torch.utils.data.Dataset):
    def __init__(self, records: Sequence[Sample | BadSample], encoder: ConversationEncoder, on_bad_sample: str = "error"):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be error or skip, not {on_bad_sample!r}")
        self.encoder = encoder
        self.on_bad_sample = on_bad_sample
        self.samples: list[Sample] = [r for r in records if isinstance(r, Sample)]
        self.skipped: dict[str, BadSample] = {}
        bad = [r for r in records if isinstance(r, BadSample)]
        if bad and on_bad_sample == "error":
            more = f" (and {len(bad) - 1} more bad samples; `mmlora data check` lists them)" if len(bad) > 1 else ""
            raise BadSample(bad[0].where, bad[0].sample_id, bad[0].problem + more)
        for b in bad:
            self._skip(b)

    def _skip(self, bad: BadSample) -> None:
        key = f"{bad.where}#{bad.sample_id}"
        if key not in self.skipped:
            self.skipped[key] = bad
            log.warning("skipping bad sample %s", bad)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        sample = self.samples[index]
        try:
            return self.encoder.encode(sample)
        except BadSample as bad:
            if self.on_bad_sample == "error":
                raise
            self._skip(bad)
            return None

    def has_image(self) -> list[bool]:
        return [s.has_image for s in self.samples]

    def lengths(self, image_tokens: int) -> list[int]:
        """Cheap length estimates for grouping: text tokens + ``image_tokens`` per image."""
        tok = self.encoder.tokenizer
        texts = [s.text() for s in self.samples]
        counts = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
        return [c + image_tokens * len(s.images) for c, s in zip(counts, self.samples)]

    def write_skip_report(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for bad in self.skipped.values():
                f.write(json.dumps({"id": bad.sample_id, "where": bad.where, "problem": bad.problem}) + "\n")
        return path


class Collator:
    """Pads ``input_ids``/``attention_mask``/``labels`` to the batch's longest sample."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, items: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
        items = [it for it in items if it is not None]
        if not items:
            return None
        longest = max(len(it["input_ids"]) for it in items)

        def pad(key: str, value: int) -> torch.Tensor:
            rows = []
            for it in items:
                t = it[key]
                fill = torch.full((longest - len(t),), value, dtype=t.dtype)
                rows.append(torch.cat([t, fill] if self.padding_side == "right" else [fill, t]))
            return torch.stack(rows)

        batch = {"input_ids": pad("input_ids", self.pad_token_id), "attention_mask": pad("attention_mask", 0),
                 "labels": pad("labels", IGNORE)}
        extra = sorted({k for it in items for k in it} - set(batch))
        for key in extra:  # image tensors (pixel_values, image_grid_thw, ...) in sample order
            batch[key] = torch.cat([it[key] for it in items if key in it])
        return batch


class GroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one modality and similar length, deterministic from ``seed`` and the epoch.

    Within each modality, indices are shuffled, cut into chunks of ``batch_size * group`` and sorted
    by length inside each chunk (less padding, still random across chunks); the batches of all
    modalities are then shuffled together. ``state_dict`` saves ``(epoch, batches done)``.
    """

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, seed: int = 0,
                 group: int = 8, drop_last: bool = False, group_by_length: bool = True):
        self.lengths, self.has_image = list(lengths), list(has_image)
        self.batch_size, self.seed, self.group = batch_size, seed, group
        self.drop_last, self.group_by_length = drop_last, group_by_length
        self.epoch, self.position = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        out: list[list[int]] = []
        for modality in (True, False):
            idx = [i for i, h in enumerate(self.has_image) if h == modality]
            rng.shuffle(idx)
            if self.group_by_length:
                chunk = self.batch_size * self.group
                idx = [i for c in range(0, len(idx), chunk) for i in sorted(idx[c:c + chunk], key=lambda i: -self.lengths[i])]
            for b in range(0, len(idx), self.batch_size):
                batch = idx[b:b + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    out.append(batch)
        rng.shuffle(out)
        return out

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state is for seed {state['seed']}, this run uses seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
