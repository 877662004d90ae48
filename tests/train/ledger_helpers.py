"""A ConversationDataset over stand-in samples: ``bad`` ids fail to encode (as a missing image
would), the others encode to ``length`` tokens with one supervised token."""

from __future__ import annotations

import torch

from mmlora.data.batching import ConversationDataset
from mmlora.data.samples import BadSample, Sample


class StubEncoder:
    def __init__(self, bad: set[str], lengths: dict[str, int]):
        self.bad, self.lengths = bad, lengths

    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        if sample.id in self.bad:
            raise BadSample(sample.where, sample.id, "image not found")
        n = self.lengths.get(sample.id, 4)
        return {"input_ids": torch.arange(1, n + 1), "attention_mask": torch.ones(n, dtype=torch.long),
                "labels": torch.tensor([-100] * (n - 1) + [7])}


def stub_dataset(ids: list[str], bad: set[str] = frozenset(), images: set[str] = frozenset(),
                 lengths: dict[str, int] | None = None) -> ConversationDataset:
    samples = [Sample(id=i, where=f"train.json:{k + 1}", messages=[], images=["x.png"] if i in images else [])
               for k, i in enumerate(ids)]
    return ConversationDataset(samples, StubEncoder(set(bad), lengths or {}), on_bad_sample="skip")
