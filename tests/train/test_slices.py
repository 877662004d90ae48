"""``mmlora.train.slices``: a process's share of a global batch, its micro-batches by samples and by
token cells (padded or packed), the tokens and skipped samples it counts, and the stand-in."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from mmlora.config.schema import TrainSpec
from mmlora.data.batching import Collator
from mmlora.data.packing import PackedCollator
from mmlora.errors import MmloraError
from mmlora.train.processes import Processes
from mmlora.train.skips import SkipLedger
from mmlora.train.slices import micro_batches, process_slice, stand_in
from tests.train.ledger_helpers import stub_dataset


def test_process_slices_cover_the_batch_in_order():
    indices = [7, 3, 9, 1, 4]
    slices = [process_slice(indices, rank, 2) for rank in range(2)]
    assert slices == [[7, 3, 9], [1, 4]]
    assert [process_slice([5], rank, 3) for rank in range(3)] == [[5], [], []]


def test_micro_batches_by_samples_count_bad_samples_and_tokens():
    ds = stub_dataset(["a", "b", "c", "d", "e"], bad={"b"}, lengths={"a": 3, "c": 5, "d": 2, "e": 6})
    train = TrainSpec(batch_size=2)
    batches, bad, tokens = micro_batches(ds, [0, 1, 2, 3, 4], Collator(0), train, "token")
    assert bad == 1 and tokens == 3 + 5 + 2 + 6
    assert [tuple(b["input_ids"].shape) for b in batches] == [(1, 3), (2, 5), (1, 6)]  # [a, bad b], [c, d], [e]
    assert micro_batches(ds, [0], Collator(0), train, "sample")[2] == 0


@pytest.mark.parametrize(("packed", "cells"), [(False, [6, 2, 8]), (True, [8, 8])])
def test_micro_batches_by_token_cells(packed, cells):
    ds = stub_dataset(list("abcd"), lengths={"a": 3, "b": 3, "c": 2, "d": 8})
    train = TrainSpec(batch_tokens=8, packing={"enabled": packed})
    collate = PackedCollator(0, max_tokens=8) if packed else Collator(0)
    batches, bad, tokens = micro_batches(ds, [0, 1, 2, 3], collate, train, "token")
    assert bad == 0 and tokens == 16
    # padded: [a, b] is 2 x 3 cells ([a, b, c] would be 3 x 3), then c, then d; packed: a + b + c = 8, then d
    assert [b["input_ids"].numel() for b in batches] == cells


def test_the_stand_in_is_the_last_encodable_sample_of_the_batch_or_one_of_its_kind(tmp_path):
    ds = stub_dataset(["t0", "i1", "i2", "i3"], bad={"i2", "i3"}, images={"i1", "i2", "i3"},
                      lengths={"t0": 2, "i1": 5, "i2": 6, "i3": 7})
    processes = Processes(Accelerator(cpu=not torch.cuda.is_available()), tmp_path)
    ledger = SkipLedger(ds, None, processes, tmp_path / "b.jsonl", True)
    assert stand_in(ds, [1, 0, 3], Collator(0), ledger, step=0)["input_ids"].shape == (1, 2)  # t0: the last that encodes
    # nothing in the batch encodes: the first usable sample with images, as the batch's first has
    assert stand_in(ds, [2, 3], Collator(0), ledger, step=0)["input_ids"].shape == (1, 5)
    text_only = stub_dataset(["t0", "i1"], bad={"t0"}, images={"i1"}, lengths={"i1": 5})
    ledger = SkipLedger(text_only, None, processes, tmp_path / "c.jsonl", True)
    assert stand_in(text_only, [0], Collator(0), ledger, step=0)["input_ids"].shape == (1, 5)  # no text-only one: any
    none = stub_dataset(["x"], bad={"x"})
    with pytest.raises(MmloraError, match=r"step 4: this process found no usable training sample"):
        stand_in(none, [0], Collator(0), SkipLedger(none, None, processes, tmp_path / "d.jsonl", True), step=3)
