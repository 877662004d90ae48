"""DDP through Accelerate: 2 CPU processes (gloo, started by torchrun) train to the same adapters as
1 process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _train(recipe, procs: int, port: int, driver=None) -> subprocess.CompletedProcess:
    """``mmlora train recipe`` (or ``driver train recipe``) in ``procs`` processes (torchrun, gloo), one
    torch thread each."""
    entry = [str(driver)] if driver is not None else ["-m", "mmlora"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port),
           *entry, "train", str(recipe)]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _same_training(one, two) -> None:
    """Runs ``one`` and ``two`` (folders) logged the same losses and saved the same trainable tensors at step 2."""
    rows = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-5)
    a, b = (load_file(run / "checkpoints" / "step-000002" / "trainable.safetensors") for run in (one, two))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, (a[k] - b[k]).abs().max())


def test_two_process_ddp_matches_one_process(make_recipe):
    common = {"train.max_steps": 2, "train.eval_every": 2, "train.scheduler": "constant", "train.max_grad_norm": None}
    single = make_recipe("single", **common, **{"train.batch_size": 4})
    double = make_recipe("ddp", **common, **{"train.batch_size": 2})
    _train(single, 1, 29501)
    _train(double, 2, 29502)
    out = single.parent
    info = json.loads((out / "ddp" / "run_info.json").read_text())
    assert info["processes"] == 2 and info["global_batch"] == 4
    _same_training(out / "single", out / "ddp")
    val = [json.loads((out / n / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"] for n in ("single", "ddp")]
    assert val[0] == pytest.approx(val[1], rel=1e-5)


def test_a_process_whose_slice_is_all_bad_samples_takes_part(make_recipe, shapes_small, tmp_path):
    """With on_bad_sample: skip, process 1's half of every global batch is two broken images: it runs
    a zero-weight stand-in so that DDP's all-reduce is not left waiting, and the run finishes."""
    import json
    import shutil

    folder = tmp_path / "half_bad"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"this is not a png")
    images = sorted((shapes_small / "world_B" / "images" / "train").glob("*.png"))[:2]
    prompt = {"from": "human", "value": "<image>\nProvide a one-sentence caption for the provided image."}
    items = []
    for i, image in enumerate(images):  # long answers: sorted first in the (length-grouped) batch → process 0
        shutil.copy(image, folder / f"good{i}.png")
        items.append({"id": f"good{i}", "image": f"good{i}.png", "conversations": [
            prompt, {"from": "gpt", "value": "top center holds a large red star; bottom center holds a small blue cross."}]})
    for i in range(2):  # short answers: last in the batch → process 1
        items.append({"id": f"bad{i}", "image": "broken.png", "conversations": [prompt, {"from": "gpt", "value": "a star."}]})
    (folder / "data.json").write_text(json.dumps(items))
    recipe = make_recipe("ddp_bad", **{"data.train": [{"format": "llava", "path": str(folder / "data.json")}],
                                       "data.val": [], "data.on_bad_sample": "skip", "train.batch_size": 2,
                                       "train.max_steps": 2, "train.eval_every": None})
    driver = tmp_path / "train_then_count.py"  # `mmlora train`, then what the interpreter's exit would free
    driver.write_text(_COUNT_DDP_AFTER_TRAIN)
    result = _train(recipe, 2, 29507, driver)
    # the DDP wrapper (and the process group its reducer holds) is gone before the process exits: left
    # to the interpreter's exit, gloo aborted the process now and then after a finished run
    assert result.stdout.count("DDP wrappers alive after train: 0") == 2, result.stdout[-2000:]
    out = tmp_path / "ddp_bad"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["skipped"] == 2 for r in rows)
    reported = [json.loads(x) for x in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in reported) == ["bad0", "bad1"]
    assert (out / "checkpoints" / "step-000002" / ".complete").is_file()


_COUNT_DDP_AFTER_TRAIN = """
import gc
import sys

import torch

from mmlora.cli import main

status = main(sys.argv[1:])
# no collection here: what is still in gc's lists now is what the interpreter's exit would destroy
alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
print(f"DDP wrappers alive after train: {alive}", flush=True)
sys.exit(status)
"""


def test_two_processes_train_on_mixed_image_and_text_only_data(make_recipe, shapes_small, tmp_path):
    """Text-only batches leave the vision tower and the projector unused: DDP is told to expect it, and
    the audit judges them at the first batch with images."""
    from tests.train.test_mixed_modalities import mixed_train_data, seed_with_text_only_first_batch

    train = mixed_train_data(shapes_small, tmp_path)
    seed = seed_with_text_only_first_batch(train, 4)
    recipe = make_recipe("ddp_mixed", **{"data.train": train, "data.val": [], "train.batch_size": 2, "train.seed": seed,
                                         "train.max_steps": 9, "train.eval_every": None})  # 9 steps: a whole epoch
    result = _train(recipe, 2, 29509)
    assert "gradient audit: vision, projector checked at step" in result.stdout
    rows = [json.loads(x) for x in (tmp_path / "ddp_mixed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10))


def test_two_packed_processes_match_one(make_recipe):
    """Packing under DDP: each process packs its own slice of the global token budget (half its samples)
    into rows, and the adapters equal one process's with the same global budget (the loss is still
    normalised by the supervised tokens of the whole global batch, whatever the rows or micro-batches
    per process)."""
    common = {"train.max_steps": 2, "train.eval_every": None, "train.scheduler": "constant", "train.max_grad_norm": None,
              "train.packing.enabled": True}
    single = make_recipe("packed_single", **common, **{"train.batch_tokens": 400, "train.packing.max_tokens": 512})
    double = make_recipe("packed_ddp", **common, **{"train.batch_tokens": 200})
    _train(single, 1, 29511)
    _train(double, 2, 29512)
    out = single.parent
    info = json.loads((out / "packed_ddp" / "run_info.json").read_text())
    assert info["global_batch"] == "400 token cells" and info["speedups"]["packing"]["attention"] == "mmlora_varlen"
    rows = [[json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()] for n in ("packed_single", "packed_ddp")]
    assert [r["tokens"] for r in rows[0]] == [r["tokens"] for r in rows[1]]  # the same global batches
    _same_training(out / "packed_single", out / "packed_ddp")
