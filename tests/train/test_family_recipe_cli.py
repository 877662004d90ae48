"""The README's family command, as a user runs it: ``mmlora train recipes/families/qwen2_5_vl.yaml``
(the recipe's own batch size, 4; the preset built into the cache on first use) trains on image
batches, and its ``final/`` reloads in plain transformers + PEFT in a process that never imports
mmlora, to the logits mmlora's own loader gives (1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mmlora.cli import main
from tests.train.conftest import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_qwen2_5_vl_recipe_trains_on_images_and_reloads_without_mmlora(shapes_small, tmp_path, capsys):
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from mmlora.generate import image_prompt
    from mmlora.models.presets import preset_path
    from mmlora.runs.reference import load_reference

    recipe = ROOT / "recipes" / "families" / "qwen2_5_vl.yaml"
    world = shapes_small / "world_B"
    run = tmp_path / "run"
    assert main(["train", str(recipe), f"train.output_dir={run}", "train.max_steps=2", "train.eval_every=null",
                 f"data.train=[{{format: llava, path: {world / 'llava_train.json'}}}]",
                 f"data.val=[{{format: llava, path: {world / 'llava_val.json'}}}]"]) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["global_batch"] == 4
    # said before training: the plan, and what each step trains on
    assert "batches: 2 steps of 4 samples (4 samples per process x 1 micro-step x 1 process)" in capsys.readouterr().out
    steps = [m for m in read_metrics(run) if "loss" in m and "step" in m]
    assert steps and all(m["loss"] > 0 for m in steps)

    loaded = load_reference(run)
    images = [Image.open(p).convert("RGB") for p in sorted((world / "images" / "val").glob("*.png"))[:2]]
    batch = loaded.processor(images=images, text=[image_prompt(loaded.processor, "Describe.")] * 2, padding=True,
                             return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**batch).logits.float().contiguous()
    save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp_path / "batch.safetensors"))
    save_file({"logits": logits}, str(tmp_path / "logits.safetensors"))
    job = {"qwen2_5_vl": {"base": str(preset_path("tiny-qwen2_5_vl")), "final": str(run / "final"),
                          "batch": str(tmp_path / "batch.safetensors"), "logits": str(tmp_path / "logits.safetensors")}}
    (tmp_path / "jobs.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train" / "plain_peft_reload.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["mmlora_imported"] is False
    diff, untrained = found["qwen2_5_vl"]
    assert diff <= 1e-5 < untrained
