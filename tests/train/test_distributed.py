"""DDP through Accelerate: 2 CPU processes (gloo, started by torchrun) train to the same adapters as
1 process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_two_process_ddp_matches_one_process(make_recipe):
    common = {"train.max_steps": 2, "train.eval_every": 2, "train.scheduler": "constant", "train.max_grad_norm": None}
    single = make_recipe("single", **common, **{"train.batch_size": 4})
    double = make_recipe("ddp", **common, **{"train.batch_size": 2})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for recipe, procs in ((single, 1), (double, 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               str(29500 + procs), "-m", "mmlora", "train", str(recipe)]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    out = single.parent
    import json

    info = json.loads((out / "ddp" / "run_info.json").read_text())
    assert info["processes"] == 2 and info["global_batch"] == 4
    a = load_file(out / "single" / "checkpoints" / "step-000002" / "trainable.safetensors")
    b = load_file(out / "ddp" / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    rows = [[json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()] for n in ("single", "ddp")]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-5)
    assert rows[0][-1]["val_loss"] == pytest.approx(rows[1][-1]["val_loss"], rel=1e-5)
