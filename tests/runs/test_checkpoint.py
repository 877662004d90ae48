"""``mmlora.runs.checkpoint`` and the run layout without a trainer: an atomic checkpoint is found again
by ``train.resume`` only when complete and written by the same setup; a resumed run's metrics keep the
rows up to its checkpoint (the trainer's side is ``tests/train/test_resume*.py``)."""

from __future__ import annotations

import json

import pytest

from mmlora.errors import MmloraError
from mmlora.runs import checkpoint as ckpt
from mmlora.runs.layout import Run

FINGERPRINT = {"base": "tiny-llava", "plan": {"language": {"rank": 4}}, "seed": 0}


def _checkpoint(root, step: int, fingerprint=FINGERPRINT):
    tmp = ckpt.begin(root, step)
    if fingerprint is not None:
        ckpt.save_fingerprint(tmp, fingerprint)
    return ckpt.commit(root, tmp, step, keep_last=3)


def test_resume_finds_the_latest_complete_checkpoint_of_the_same_setup(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.resumable("auto", root, FINGERPRINT) is None  # nothing yet
    _checkpoint(root, 2)
    latest = _checkpoint(root, 4)
    assert ckpt.resumable("auto", root, FINGERPRINT) == latest
    assert ckpt.resumable("never", root, FINGERPRINT) is None
    assert ckpt.resumable(str(root / ckpt.step_name(2)), root, FINGERPRINT) == root / ckpt.step_name(2)
    old = _checkpoint(tmp_path / "old", 1, fingerprint=None)  # from before fingerprints: taken as it is
    assert ckpt.resumable(str(old), root, {"anything": 1}) == old


def test_resume_refuses_an_incomplete_or_different_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    done = _checkpoint(root, 2)
    with pytest.raises(MmloraError, match=r"different setup \(plan\.language\.rank: 4 -> 8\)"):
        ckpt.resumable("auto", root, FINGERPRINT | {"plan": {"language": {"rank": 8}}})
    (done / ckpt.COMPLETE).unlink()
    with pytest.raises(MmloraError, match="is not a complete checkpoint"):
        ckpt.resumable(str(done), root, FINGERPRINT)


def test_keep_metrics_drops_the_rows_after_the_step(tmp_path):
    run = Run(tmp_path)
    run.metrics_file.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    run.keep_metrics(3)
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]
    missing = Run(tmp_path / "new")
    missing.root.mkdir()
    missing.keep_metrics(3)  # no metrics yet: an empty file
    assert missing.metrics() == []
