"""A run killed with SIGKILL (between steps, or in the middle of writing a checkpoint) and resumed
reproduces the uninterrupted run's losses exactly (CPU, fixed seed)."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import read_metrics, run_training

pytestmark = pytest.mark.slow


def _train_in_subprocess(recipe, kill: str | None = None) -> int:
    result = subprocess.run([sys.executable, "-m", "tests.train.kill_run", str(recipe), *([kill] if kill else [])],
                            capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    if result.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(result.stderr[-3000:])
    return result.returncode


@pytest.mark.parametrize("kill", ["after-step@3", "during-save@4"])
def test_sigkill_and_resume_reproduce_the_losses(make_recipe, kill):
    changes = {"train.max_steps": 6, "train.save_every": 2, "train.eval_every": 3, "train.keep_last": 5,
               "train.scheduler": "cosine", "train.warmup_steps": 2, "placement.language.dropout": 0.1}
    reference, _ = run_training(make_recipe("reference", **changes))
    expected = read_metrics(reference.out)

    recipe = make_recipe("killed", **changes)
    assert _train_in_subprocess(recipe, kill) == -signal.SIGKILL
    out = reference.out.parent / "killed"
    checkpoints = out / "checkpoints"
    complete = sorted(p.name for p in checkpoints.glob("step-*"))
    assert complete == ["step-000002"]  # nothing half-written is ever visible as a checkpoint
    assert (checkpoints / "latest").read_text().strip() == "step-000002"
    assert _train_in_subprocess(recipe) == 0
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in expected]
