"""``mmlora.train.record``: what ``run_info.json`` says (the fingerprint is tested through training
runs in ``test_resume_check.py``)."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
from pathlib import Path

from mmlora.train.optim import GroupInfo
from mmlora.train.record import run_info


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
