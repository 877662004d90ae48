"""``mmlora.train.processes`` in one process: the local operations, a failed main-process write as one
line naming the last good checkpoint, and the end of a run (the multi-process side runs in
``test_distributed.py``: the all-reduces, the skip-report union and the DDP wrapper freed before exit)."""

from __future__ import annotations

import errno

import pytest
import torch
from accelerate import Accelerator

from mmlora.errors import MmloraError
from mmlora.train.processes import Processes


def test_one_process_sums_unites_and_writes(tmp_path):
    # as the Trainer makes it: Accelerate's state is one per process, shared with the other tests
    processes = Processes(Accelerator(cpu=not torch.cuda.is_available()), tmp_path / "checkpoints")
    assert not processes.many and processes.is_main
    assert processes.all_sums(1, 2.5, 0) == [1.0, 2.5, 0.0]
    entries = {"a": {"id": "a"}}
    united = processes.unite(entries)
    assert united == entries and united is not entries
    assert processes.on_main("x.txt", tmp_path / "x.txt", lambda: (tmp_path / "x.txt").write_text("ok")) == 2

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "y.txt"))

    with pytest.raises(MmloraError, match=r"cannot write y\.txt: .*no checkpoint was written yet; free space there"):
        processes.on_main("y.txt", tmp_path / "y.txt", full_disk)
    processes.end()  # a single process: trackers finished, no group to destroy
