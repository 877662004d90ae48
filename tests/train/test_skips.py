"""``mmlora.train.skips`` in one process: what is new, the report (training and validation lines),
reading it back on resume, the all-skipped error, and the first usable sample of a kind (the
multi-process union runs in ``test_distributed.py``)."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator

from mmlora.errors import MmloraError
from mmlora.train.processes import Processes
from mmlora.train.skips import SkipLedger
from tests.train.ledger_helpers import stub_dataset


def _ledger(tmp_path, train, val=None, enabled=True) -> SkipLedger:
    processes = Processes(Accelerator(cpu=not torch.cuda.is_available()), tmp_path / "checkpoints")
    return SkipLedger(train, val, processes, tmp_path / "bad_samples.jsonl", enabled)


def test_new_skips_are_reported_once_with_their_split(tmp_path):
    train = stub_dataset(["a", "b", "c"], bad={"b"})
    val = stub_dataset(["v1", "v2"], bad={"v2"})
    ledger = _ledger(tmp_path, train, val)
    assert train[1] is None and val[1] is None  # encoding finds them bad
    new = ledger.new()
    assert list(new) == ["train.json:2#b"] and new["train.json:2#b"]["problem"] == "image not found"
    ledger.add(new)
    assert len(ledger) == 1 and ledger.new() == {}
    path = ledger.write()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"split": "train", "where": "train.json:2", "id": "b", "problem": "image not found"},
                     {"split": "val", "where": "train.json:2", "id": "v2", "problem": "image not found"}]


def test_a_resumed_ledger_reads_back_the_training_lines(tmp_path):
    report = tmp_path / "bad_samples.jsonl"
    report.write_text('{"split": "train", "where": "t.json:4", "id": "x", "problem": "p"}\n'
                      "not json\n"
                      '{"split": "val", "where": "v.json:1", "id": "y", "problem": "q"}\n'
                      '{"where": "t.json:9", "id": "z", "problem": "r"}\n')  # an older report: no split
    ledger = _ledger(tmp_path, stub_dataset(["a"]))
    ledger.read_back()
    assert sorted(ledger.entries) == ["t.json:4#x", "t.json:9#z"]
    off = _ledger(tmp_path, stub_dataset(["a"]), enabled=False)
    off.read_back()
    assert len(off) == 0 and off.write() is None


def test_all_skipped_writes_the_report_and_names_it(tmp_path):
    train = stub_dataset(["a", "b"], bad={"a", "b"})
    ledger = _ledger(tmp_path, train)
    assert ledger.first_usable(None) is None  # encodes both, finds them bad
    err = ledger.all_skipped()
    assert isinstance(err, MmloraError)
    assert "every sample of the training data was skipped as bad (2)" in str(err) and "bad_samples.jsonl" in str(err)
    assert len((tmp_path / "bad_samples.jsonl").read_text().splitlines()) == 2


def test_first_usable_of_a_kind(tmp_path):
    train = stub_dataset(["t0", "i1", "i2", "t3"], bad={"i1"}, images={"i1", "i2"})
    ledger = _ledger(tmp_path, train)
    assert ledger.first_usable(True) == 2  # i1 has an image but does not encode
    assert ledger.first_usable(False) == 0
    assert ledger.first_usable(None) == 0
    train.samples[2] = train.samples[1]  # cached: not read again
    assert ledger.first_usable(True) == 2
