"""``mmlora.train.record``: what ``run_info.json`` says (the fingerprint is tested through training
runs in ``test_resume_check.py``)."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
from pathlib import Path

from mmlora.train.optim import GroupInfo
from mmlora.config.schema import TrainSpec
from mmlora.train.record import batching_line, run_info


def test_run_info_records_versions_commit_and_the_runs_shape():
    group = GroupInfo.__new__(GroupInfo)
    group.__dict__.update({"name": "language", "lr": 1e-3})
    info = run_info(2, "936 token cells", 40, [group], {"chunked_loss": True})
    assert info["versions"]["torch"] == md.version("torch") and info["versions"]["peft"] == md.version("peft")
    here = Path(__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=here).stdout.strip()
    assert info["git_commit"] == (head or None)
    assert (info["processes"], info["global_batch"], info["total_steps"]) == (2, "936 token cells", 40)
    assert info["groups"] == [{"name": "language", "lr": 1e-3}] and info["speedups"] == {"chunked_loss": True}


def test_the_batching_line_says_what_a_step_trains_on():
    assert batching_line(TrainSpec(batch_size=4), 1, 40, None) == \
        "batches: 40 steps of 4 samples (4 samples per process x 1 micro-step x 1 process)"
    packed = TrainSpec(batch_tokens=900, grad_accum=2, packing={"enabled": True})
    assert batching_line(packed, 2, 10, {"max_tokens": 2048, "attention": "mmlora_varlen"}) == (
        "batches: 10 steps of 3600 token cells (900 token cells per process x 2 micro-steps x 2 processes); "
        "packed in rows of 2048 tokens, attention mmlora_varlen")
