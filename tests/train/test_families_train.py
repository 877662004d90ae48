"""Every VLM family with a processor recipe (``mmlora.models.families``) trains on image batches end to
end: the tiny folder ``mmlora models tiny TYPE`` writes, the family's recipe in recipes/families/,
two steps at batch size 2 on shapes world B. Each step's batch must hold pixel values and image tokens,
the gradient audit at step 1 must pass (the trainer raises if a vision adapter gets no gradient), and
the loss must be finite. The results go to ``MMLORA_FAMILY_RESULTS`` (a JSON file) when it is set, for
``scripts/family_matrix.py``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from mmlora.config.loading import load_recipe
from mmlora.data.processing import image_token_ids
from mmlora.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]
#: One row per family, in the issue's order (smolvlm's processor needs the smolvlm extra, num2words).
TRAINED = ["qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "gemma3", "llava_next", "llava_onevision", "internvl",
           "qwen3_vl"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from mmlora.models.families import save_family

    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            out = tmp_path_factory.mktemp(model_type) / "model"
            save_family(model_type, out)
            built[model_type] = out
        return built[model_type]

    return get


def record(model_type: str, column: str, value: str) -> None:
    path = os.environ.get("MMLORA_FAMILY_RESULTS")
    if not path:
        return
    p = Path(path)
    data = json.loads(p.read_text()) if p.is_file() else {}
    data.setdefault(model_type, {})[column] = value
    p.write_text(json.dumps(data, indent=1, sort_keys=True))


@pytest.mark.parametrize("model_type", TRAINED)
def test_family_trains_on_image_batches(model_type, family_dirs, shapes_small, tmp_path):
    world = shapes_small / "world_B"
    overrides = [f"model.name={family_dirs(model_type)}", f"train.output_dir={tmp_path / 'run'}",
                 "train.max_steps=2", "train.batch_size=2", "train.eval_every=null", "train.save_every=null",
                 "train.warmup_steps=0", f"data.train=[{{format: llava, path: {world / 'llava_train.json'}}}]",
                 "data.val=[]"]
    trainer = Trainer(load_recipe(ROOT / "recipes" / "families" / f"{model_type}.yaml", overrides), recipe_name=model_type)
    trainer.setup()
    image_ids = sorted(image_token_ids(trainer.objective.processor))
    seen = []
    real = trainer.objective.loss_sum

    def recording(model, batch):
        import torch

        loss, units = real(model, batch)
        seen.append({"pixels": "pixel_values" in batch and batch["pixel_values"].numel() > 0,
                     "rows": int(batch["input_ids"].shape[0]),
                     "image_tokens": int(torch.isin(batch["input_ids"], torch.tensor(image_ids)).sum()),
                     "loss": float(loss.detach()) / max(units, 1)})
        return loss, units

    trainer.objective.loss_sum = recording
    result = trainer.train()
    assert result["steps"] == 2 and len(seen) == 2
    for batch in seen:
        assert batch["pixels"] and batch["rows"] == 2 and batch["image_tokens"] >= 2 * 4
        assert math.isfinite(batch["loss"]) and batch["loss"] > 0
    record(model_type, "train", "✓")
    record(model_type, "audit", "✓")  # the trainer raises at step 1 when a planned modality gets no gradient
