"""Datasets, bad-sample policy, collation and a resumable length-grouped sampler.

* :class:`ConversationDataset` encodes samples on access. Under ``on_bad_sample: error`` the first bad
  sample raises a :class:`~mmlora.data.samples.BadSample` naming file, line/id and problem; under
  ``skip`` it is dropped, counted and kept for the skip report (:func:`write_skip_report`; the trainer
  writes it to the run's ``bad_samples.jsonl``).
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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmlora.data.processing import IGNORE, ConversationEncoder, image_token_ids, sequence_major
from mmlora.data.samples import BadSample, Sample
from mmlora.errors import MmloraError

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

    def image_tokens(self) -> int:
        """Tokens one image takes in the processed text, for the length estimates of grouping: every
        token the processor puts for images (wrappers such as Gemma 3's ``<start_of_image>`` or
        Idefics3's ``<fake_token_around_image>`` included), per image of the first sample that has any."""
        processor = getattr(self.encoder, "processor", None)  # CLIP's encoders have none
        if processor is None:
            return 0
        ids = torch.tensor(sorted(image_token_ids(processor)), dtype=torch.long)
        for i, s in enumerate(self.samples):
            if s.images:
                item = self[i]
                if item is not None:
                    return int(torch.isin(item["input_ids"], ids).sum()) // len(s.images)
        return 0

    def skip_entries(self) -> dict[str, dict[str, Any]]:
        """The skipped samples so far as plain JSON values, by key (file/line#id): what the report
        lists, and what processes exchange to agree on one report."""
        return {key: skip_entry(bad) for key, bad in self.skipped.items()}

    def write_skip_report(self, path: str | Path) -> Path:
        return write_skip_report(path, self.skip_entries().values())


def skip_entry(bad: BadSample) -> dict[str, Any]:
    """One line of a skip report: where the sample is (file and line or index), its id, the reason."""
    return {"where": bad.where, "id": bad.sample_id, "problem": bad.problem}


def write_skip_report(path: str | Path, entries: Iterable[dict[str, Any]]) -> Path:
    """``bad_samples.jsonl``: one JSON object per skipped sample (see :func:`skip_entry`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
    return path


class Collator:
    """Pads ``input_ids``/``attention_mask``/``labels`` to the batch's longest sample.

    Every other tensor a processor returned reaches the model too. Per-token ones (1-D, as long as the
    sample's ``input_ids``: ``token_type_ids``, ``mm_token_type_ids``, ...) are padded like the
    sequence with 0 (text / prefix in every family that has them; padded positions are masked anyway),
    and 0 for samples that lack them; so are per-sample ones with a row per token (``[1, L, ...]``:
    mllama's ``cross_attention_mask``), zero-padded in their later dims too. Per-image ones are
    concatenated along dim 0 in sample order: Qwen's patch rows (``pixel_values [patches, dim]``,
    ``image_grid_thw``), stacked images or tiles (``[images, tiles, C, H, W]``, ``image_sizes``,
    ``pixel_attention_mask``, mllama's ``aspect_ratio_ids``); where samples differ in a later dim (a
    different number of tiles or images), the smaller ones are zero-padded to the largest, as the
    processors do inside one call (all-zero tiles are the families' padding; mllama's aspect ratio id
    0 is "no image").
    """

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
        for key in extra:
            have = [it for it in items if key in it]
            if all(self._per_token(it, key) for it in have):
                for it in items:
                    if key not in it:
                        it[key] = torch.zeros_like(it["input_ids"])
                batch[key] = pad(key, 0)
            elif all(sequence_major(key, it[key], len(it["input_ids"])) for it in have):
                batch[key] = self._pad_rows(items, key, longest)
            else:  # image tensors (pixel_values, image_grid_thw, ...) in sample order
                batch[key] = self._concat([it[key] for it in have], key)
        return batch

    @staticmethod
    def _per_token(item: dict[str, torch.Tensor], key: str) -> bool:
        v = item[key]
        return (torch.is_tensor(v) and v.dim() == 1 and len(v) == len(item["input_ids"]) > 1
                and not key.startswith("pixel"))

    def _pad_rows(self, items: list[dict[str, torch.Tensor]], key: str, longest: int) -> torch.Tensor:
        """``[1, L, ...]`` per-sample rows (one per token) → ``[B, longest, ...]``: zeros where the text is
        padded (on its side) and in the later dims a sample lacks (fewer images), as the processor pads."""
        ref = next(it[key] for it in items if key in it)
        shape = [max(it[key].shape[d] for it in items if key in it) for d in range(2, ref.dim())]
        out = ref.new_zeros((len(items), longest, *shape))
        for row, it in enumerate(items):
            if key not in it:  # a text-only sample: nothing to attend to
                continue
            t = it[key][0]
            start = 0 if self.padding_side == "right" else longest - t.shape[0]
            out[(row, slice(start, start + t.shape[0]), *(slice(0, n) for n in t.shape[1:]))] = t
        return out

    @staticmethod
    def _concat(tensors: list[torch.Tensor], key: str) -> torch.Tensor:
        if len({t.dim() for t in tensors}) != 1:
            raise MmloraError(f"the processor returned {key} with different numbers of dimensions across samples")
        shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = []
        for t in tensors:
            if list(t.shape[1:]) != shape:
                grown = t.new_zeros((t.shape[0], *shape))
                grown[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
                t = grown
            padded.append(t)
        return torch.cat(padded)


def batch_cost(lengths: Sequence[int], packed: bool) -> int:
    """Token cells a batch of samples this long takes: their sum when packed, else the padded
    ``samples x longest``."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def cut_by_tokens(lengths: Sequence[int], budget: int, packed: bool) -> list[list[int]]:
    """Positions ``0..n-1`` cut in order into runs whose :func:`batch_cost` stays within ``budget``
    (a sample over the budget alone is a run of its own)."""
    runs: list[list[int]] = []
    total = longest = 0  # of the open run
    for i, n in enumerate(lengths):
        cost = total + n if packed else (len(runs[-1]) + 1) * max(longest, n) if runs else n
        if runs and cost <= budget:
            runs[-1].append(i)
            total, longest = total + n, max(longest, n)
        else:
            runs.append([i])
            total, longest = n, n
    return runs


class SamplerStateError(MmloraError, ValueError):
    """A sampler state saved by a run with another seed (a user error, and a ValueError as before)."""


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
                chunk = self._chunk()
                idx = [i for c in range(0, len(idx), chunk) for i in sorted(idx[c:c + chunk], key=lambda i: -self.lengths[i])]
            out += self._cut(idx)
        rng.shuffle(out)
        return out

    def _chunk(self) -> int:
        """Samples sorted by length together: ``group`` batches' worth."""
        return self.batch_size * self.group

    def _cut(self, idx: list[int]) -> list[list[int]]:
        out = []
        for b in range(0, len(idx), self.batch_size):
            batch = idx[b:b + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                out.append(batch)
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
            raise SamplerStateError(f"the checkpoint's sampler state is for seed {state['seed']}, this run uses seed "
                                    f"{self.seed}: resume with train.seed={state['seed']}, or start over with train.resume=never")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def batch_sampler(lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, batch_tokens: int | None,
                  packed: bool, seed: int = 0, group_by_length: bool = True) -> GroupedBatchSampler:
    """The sampler a run's batches come from: :class:`TokenBudgetBatchSampler` with ``batch_tokens``
    token cells when set (``packed``: cells are token sums), else ``batch_size`` samples."""
    if batch_tokens:
        return TokenBudgetBatchSampler(lengths, has_image, batch_tokens, packed, seed=seed, group_by_length=group_by_length)
    return GroupedBatchSampler(lengths, has_image, batch_size, seed=seed, group_by_length=group_by_length)


class TokenBudgetBatchSampler(GroupedBatchSampler):
    """:class:`GroupedBatchSampler` with global batches cut by tokens instead of samples
    (``train.batch_tokens``): in the same seeded, length-grouped order, a global batch takes samples
    while its :func:`batch_cost` (estimated lengths, image tokens included) stays within
    ``budget`` — short samples make big batches, long ones small. The state and resume are the
    parent's."""

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], budget: int, packed: bool, seed: int = 0,
                 group: int = 8, group_by_length: bool = True):
        mean = max(1, sum(lengths) // max(1, len(lengths)))
        super().__init__(lengths, has_image, max(1, budget // mean), seed=seed, group=group,
                         group_by_length=group_by_length)
        self.budget, self.packed = budget, packed

    def _cut(self, idx: list[int]) -> list[list[int]]:
        return [[idx[j] for j in run] for run in cut_by_tokens([self.lengths[i] for i in idx], self.budget, self.packed)]
