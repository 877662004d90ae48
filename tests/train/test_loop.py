import json

import pytest
import torch

from mmlora.config.loading import load_recipe
from mmlora.train.loop import Trainer
from tests.train.conftest import capture_gradients, read_metrics, run_training


def _trainable(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_run_folder_and_learning(make_recipe):
    trainer, result = run_training(make_recipe("run", **{"train.max_steps": 8, "train.save_every": 4}))
    out = trainer.out
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all({"step", "loss", "lr"} <= set(r) for r in rows)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0]  # validation loss goes down
    info = json.loads((out / "run_info.json").read_text())
    assert {"torch", "transformers", "peft", "accelerate"} <= set(info["versions"]) and "git_commit" in info
    assert (out / "recipe.yaml").is_file() and (out / "loss_curve.png").stat().st_size > 1000
    final = out / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["base_model"] == "tiny-llava" and manifest["full_modules"]["modalities"] == ["projector"]
    assert (final / "adapters" / "default" / "adapter_config.json").is_file()
    assert "# Adapters for tiny-llava" in (final / "README.md").read_text()
    assert (final / "tokenizer.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000004", "step-000008"]
    assert result["steps"] == 8


def test_each_modality_trains_at_its_learning_rate(make_recipe):
    path = make_recipe("lr", **{"placement.vision.lr": 1.0e-4, "train.lora_plus_ratio": 4.0, "train.weight_decay": 0.1,
                                "train.max_steps": 1})
    trainer, _ = run_training(path)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    base = 5.0e-3
    assert groups["vision/decay"]["lr"] == pytest.approx(1.0e-4)
    assert groups["vision/lora_B"]["lr"] == pytest.approx(4.0e-4)
    assert groups["language/decay"]["lr"] == pytest.approx(base)
    assert groups["language/lora_B"]["lr"] == pytest.approx(4 * base)
    assert groups["projector/decay"]["lr"] == pytest.approx(base * 0.5)
    assert groups["projector/no_decay"]["weight_decay"] == 0.0 and groups["projector/decay"]["weight_decay"] == 0.1
    names = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    assert all(".bias" in names[id(p)] for p in groups["projector/no_decay"]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups["language/lora_B"]["params"])
    assert read_metrics(trainer.out)[0]["lr"]["vision/decay"] == pytest.approx(1.0e-4)


def test_accumulation_equals_one_big_batch(make_recipe):
    """batch 2 x accumulation 4 gives the gradient of batch 8: the loss is normalised by the
    supervised tokens of the whole global batch, not averaged per micro-batch."""
    results = []
    for name, bs, accum in (("big", 8, 1), ("accum", 2, 4)):
        path = make_recipe(name, **{"train.batch_size": bs, "train.grad_accum": accum, "train.max_steps": 2,
                                    "train.eval_every": None, "train.max_grad_norm": None})
        trainer = Trainer(load_recipe(path), recipe_name=name)
        trainer.setup()
        grads = capture_gradients(trainer)
        trainer.train()
        results.append((grads, read_metrics(trainer.out)))
    (ga, rows_a), (gb, rows_b) = results
    assert [r["loss"] for r in rows_a] == pytest.approx([r["loss"] for r in rows_b], rel=1e-5)
    assert [r["tokens"] for r in rows_a] == [r["tokens"] for r in rows_b]
    for step_a, step_b in zip(ga, gb):
        for n in step_a:
            assert torch.allclose(step_a[n], step_b[n], rtol=1e-4, atol=1e-8), n
    assert any(g.abs().sum() > 0 for g in ga[1].values())


def test_nan_loss_stops_with_a_clear_message(make_recipe, monkeypatch):
    trainer = Trainer(load_recipe(make_recipe("nan", **{"train.save_every": 1})), recipe_name="nan")
    trainer.setup()
    real = trainer.objective.loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        s, n = real(model, batch)
        calls["n"] += 1
        return (s * float("nan"), n) if trainer.step >= 2 else (s, n)

    monkeypatch.setattr(trainer.objective, "loss_sum", poisoned)
    from mmlora.errors import MmloraError

    with pytest.raises(MmloraError, match=r"loss is nan at step 3.*step-000002"):
        trainer.train()
    assert (trainer.out / "checkpoints" / "step-000002" / ".complete").is_file()


def test_init_from_starts_stage_two_from_stage_one(make_recipe):
    """LLaVA's recipe: stage 1 aligns the projector, stage 2 tunes the language model on top of it."""
    from safetensors.torch import load_file

    stage1, _ = run_training(make_recipe("stage1", **{"placement.vision": {"mode": "frozen"},
                                                      "placement.language": {"mode": "frozen"},
                                                      "placement.projector": {"mode": "full"}, "train.max_steps": 2}))
    aligned = load_file(stage1.out / "final" / "full_modules.safetensors")
    stage2 = Trainer(load_recipe(make_recipe("stage2", **{"placement.vision": {"mode": "frozen"},
                                                          "placement.projector": {"mode": "frozen"},
                                                          "train.init_from": str(stage1.out), "train.max_steps": 2})),
                     recipe_name="stage2")
    stage2.setup()
    params = dict(stage2.accelerator.unwrap_model(stage2.model).get_base_model().named_parameters())
    assert aligned and all(torch.equal(params[k], v) for k, v in aligned.items())
    stage2.train()
    assert all(torch.equal(params[k], v) for k, v in aligned.items())  # frozen in stage 2


def test_adalora_with_gradient_checkpointing_trains(make_recipe):
    path = make_recipe("ada", **{"placement.vision": {"mode": "frozen"}, "placement.projector": {"mode": "frozen"},
                                 "placement.language": {"mode": "lora", "targets": ["q", "v"]},
                                 "placement.adalora": {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1},
                                 "train.gradient_checkpointing": True, "train.max_steps": 4})
    trainer, _ = run_training(path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert type(model.peft_config["default"]).__name__ == "AdaLoraConfig"
    assert model.peft_config["default"].total_step == 4  # filled in from the run's length
    assert model.get_base_model().is_gradient_checkpointing
    assert len(read_metrics(trainer.out)) == 4
