"""Every VLM family with a processor recipe (``mmlora.models.families``) trains on image batches end to
end: the tiny folder ``mmlora models tiny TYPE`` writes, the family's recipe in recipes/families/,
two steps at batch size 2 on shapes world B. Each step's batch must hold pixel values and image tokens,
the gradient audit at step 1 must pass (the trainer raises if a vision adapter gets no gradient), and
the loss must be finite. The trained ``final/`` then reloads with plain transformers + PEFT in a subprocess
that never imports mmlora (tests/train/plain_peft_reload.py), to the same logits within 1e-5; and each
family trains a step with a 4-bit language model and an fp32 vision tower, checked layer by layer. The
results go to ``MMLORA_FAMILY_RESULTS`` (a JSON file) when it is set, for ``scripts/family_matrix.py``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmlora.config.loading import load_recipe
from mmlora.data.processing import image_token_ids
from mmlora.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]
#: One row per family, in the issue's order (smolvlm's processor needs the smolvlm extra, num2words).
TRAINED = ["llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "gemma3", "llava_next", "llava_onevision", "internvl",
           "qwen3_vl", "mllama", "gemma4"]
#: Image tokens at least per image in a training batch: a run of features (>= 4) in most families;
#: mllama's text holds one ``<|image|>`` per image, its features enter through cross-attention instead.
MIN_IMAGE_TOKENS = {"mllama": 1}
#: Reload jobs the training test leaves for :func:`test_final_reloads_in_plain_peft` (family → files).
RELOAD_JOBS: dict[str, dict[str, str]] = {}
RELOAD_TOLERANCE = 1e-5


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
    seen, first_batch = [], {}
    real = trainer.objective.loss_sum

    def recording(model, batch):
        import torch

        loss, units = real(model, batch)
        if not first_batch:
            first_batch.update({k: v.detach().cpu().clone() for k, v in batch.items() if k != "labels"})
        seen.append({"pixels": "pixel_values" in batch and batch["pixel_values"].numel() > 0,
                     "rows": int(batch["input_ids"].shape[0]),
                     "image_tokens": int(torch.isin(batch["input_ids"], torch.tensor(image_ids)).sum()),
                     "loss": float(loss.detach()) / max(units, 1)})
        return loss, units

    trainer.objective.loss_sum = recording
    result = trainer.train()
    assert result["steps"] == 2 and len(seen) == 2
    for batch in seen:
        assert batch["pixels"] and batch["rows"] == 2 and batch["image_tokens"] >= 2 * MIN_IMAGE_TOKENS.get(model_type, 4)
        assert math.isfinite(batch["loss"]) and batch["loss"] > 0
    record(model_type, "train", "✓")
    record(model_type, "audit", "✓")  # the trainer raises at step 1 when a planned modality gets no gradient
    _leave_reload_job(model_type, trainer, first_batch, family_dirs(model_type), tmp_path)


def _leave_reload_job(model_type, trainer, batch, base: Path, tmp_path: Path) -> None:
    """The trained model's logits on a fixed processed batch (the first training batch), for the reload."""
    import torch
    from safetensors.torch import save_file

    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        logits = model(**batch).logits.float().contiguous()
    final = tmp_path / "run" / "final"
    assert (final / "adapters" / "default" / "adapter_config.json").is_file()
    save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp_path / "batch.safetensors"))
    save_file({"logits": logits}, str(tmp_path / "logits.safetensors"))
    RELOAD_JOBS[model_type] = {"base": str(base), "final": str(final), "batch": str(tmp_path / "batch.safetensors"),
                               "logits": str(tmp_path / "logits.safetensors")}


def test_final_reloads_in_plain_peft(tmp_path):
    """One subprocess for every family trained above: base folder + full_modules.safetensors +
    ``PeftModel.from_pretrained(final/adapters/default)``, no mmlora, same logits within 1e-5."""
    if not RELOAD_JOBS:
        pytest.skip("no family trained in this session (run the whole file)")
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps(RELOAD_JOBS))
    script = Path(__file__).with_name("plain_peft_reload.py")
    run = subprocess.run([sys.executable, str(script), str(jobs)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found.pop("mmlora_imported") is False, "the plain-PEFT reload imported mmlora"
    problems = []
    for model_type in RELOAD_JOBS:
        found_diffs = found[model_type]
        if isinstance(found_diffs, str):
            problems.append(f"{model_type}: {found_diffs}")
            record(model_type, "reload", f"✗ ({found_diffs})")
            continue
        diff, untrained = found_diffs
        # the trained logits must differ from the untrained base's, else the comparison proves nothing
        ok = diff <= RELOAD_TOLERANCE < untrained
        record(model_type, "reload", "✓" if ok else f"✗ (max diff {diff:.1e}, untrained base {untrained:.1e})")
        if not ok:
            problems.append(f"{model_type}: max logit diff {diff:.1e} (untrained base: {untrained:.1e})")
    assert not problems, "; ".join(problems)


@pytest.mark.bnb
@pytest.mark.parametrize("model_type", TRAINED)
def test_family_trains_with_4bit_language_and_fp32_vision(model_type, family_dirs, shapes_small, tmp_path):
    """``placement.language.precision: 4bit`` with the vision tower in fp32: one step, then every
    language linear layer (the output head aside) is a bitsandbytes Linear4bit and no vision one is."""
    import torch
    from bitsandbytes.nn import Linear4bit

    from mmlora.train.optim import base_name

    world = shapes_small / "world_B"
    overrides = [f"model.name={family_dirs(model_type)}", f"train.output_dir={tmp_path / 'run'}",
                 "train.max_steps=1", "train.batch_size=2", "train.eval_every=null", "train.save_every=null",
                 "train.warmup_steps=0", f"data.train=[{{format: llava, path: {world / 'llava_train.json'}}}]",
                 "data.val=[]", "placement.language.precision=4bit", "placement.vision.precision=fp32"]
    trainer = Trainer(load_recipe(ROOT / "recipes" / "families" / f"{model_type}.yaml", overrides), recipe_name=model_type)
    trainer.setup()  # load_for_training verifies each modality's precision right after loading
    result = trainer.train()
    assert result["steps"] == 1
    model = trainer.accelerator.unwrap_model(trainer.model)
    kinds: dict[str, set[str]] = {"language": set(), "vision": set()}
    vision_dtypes = set()
    for name, module in model.named_modules():
        if ".lora_" in name or not isinstance(module, torch.nn.Linear):
            continue
        path = base_name(name).removesuffix(".base_layer")
        modality = trainer.mmap.modality_of(path)
        if modality not in kinds or path in trainer.mmap.heads:
            continue
        if any(isinstance(m, torch.nn.Linear) for n, m in module.named_children() if n == "base_layer"):
            continue  # a PEFT wrapper: its base_layer is checked itself
        kinds[modality].add("Linear4bit" if isinstance(module, Linear4bit) else type(module).__name__)
        if modality == "vision":
            vision_dtypes.add(module.weight.dtype)
    assert kinds["language"] == {"Linear4bit"}, kinds
    assert kinds["vision"] and "Linear4bit" not in kinds["vision"], kinds
    assert vision_dtypes == {torch.float32}
    record(model_type, "qlora", "✓")
