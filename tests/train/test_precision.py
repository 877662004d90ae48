import pytest
import torch

from mmlora.config.schema import ModelSpec, PlacementSpec, QuantSpec
from mmlora.errors import MmloraError
from mmlora.models.precision import load_for_training, verify_precision
from tests.train.conftest import read_metrics

pytestmark = pytest.mark.bnb


def _load(placement: dict):
    return load_for_training(ModelSpec(name="tiny-llava"), PlacementSpec.model_validate(placement), QuantSpec())


def _kinds(model, prefix: str) -> set[str]:
    return {type(m).__name__ for n, m in model.named_modules()
            if n.startswith(prefix) and type(m).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")}


@pytest.mark.parametrize("bits, cls", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_language_quantized_towers_untouched(bits, cls):
    model, mmap = _load({"vision": {"mode": "frozen", "precision": "bf16"}, "language": {"mode": "lora", "precision": bits}})
    assert _kinds(model, "model.language_model.") == {cls}
    assert _kinds(model, "model.vision_tower.") == {"Linear"} and _kinds(model, "model.multi_modal_projector") == {"Linear"}
    assert type(model.lm_head).__name__ == "Linear"  # the head is never quantized
    assert {p.dtype for n, p in model.named_parameters() if n.startswith("model.vision_tower.")} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if n.startswith("model.multi_modal_projector.")} == {torch.float32}


def test_precision_check_catches_a_mismatch():
    model, mmap = _load({"language": {"mode": "lora"}})  # fp32 everywhere
    with pytest.raises(MmloraError, match=r"model.language_model.layers.0.self_attn.q_proj is Linear, not Linear4bit"):
        verify_precision(model, mmap, {"vision": None, "projector": None, "language": "4bit"})
    with pytest.raises(MmloraError, match=r"is torch.float32, not torch.bfloat16 \(vision: bf16\)"):
        verify_precision(model, mmap, {"vision": "bf16", "projector": None, "language": None})


def test_mixing_4bit_and_8bit_is_refused():
    with pytest.raises(MmloraError, match="4bit and 8bit modalities in one model"):
        _load({"vision": {"mode": "frozen", "precision": "8bit"}, "language": {"mode": "lora", "precision": "4bit"}})


@pytest.mark.slow
def test_qlora_lowers_validation_loss_close_to_full_precision(make_recipe):
    from mmlora.config.loading import load_recipe
    from mmlora.train.loop import Trainer

    common = {"train.max_steps": 12, "train.eval_every": 12, "train.lr": 1.0e-2, "train.batch_size": 8}
    runs = {
        "fp32": {},
        "qlora": {"placement.language.precision": "4bit"},
        "qdora": {"placement.language.precision": "4bit", "placement.language.mode": "dora"},
    }
    before, after, trainers = {}, {}, {}
    for name, changes in runs.items():
        trainer = Trainer(load_recipe(make_recipe(name, **common, **changes)), recipe_name=name)
        trainer.setup()
        before[name] = trainer.evaluate()
        trainer.train()
        after[name] = [r["val_loss"] for r in read_metrics(trainer.out) if "val_loss" in r][-1]
        trainers[name] = trainer
    for name in ("qlora", "qdora"):
        assert after[name] < before[name] - 0.1  # it learns
        # ... and ends within 5% of the full-precision run
        assert abs(after[name] - after["fp32"]) / after["fp32"] < 0.05, (after, before)
    model = trainers["qlora"].accelerator.unwrap_model(trainers["qlora"].model)
    assert type(model.get_base_model().model.language_model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
