"""AdaLoRA's budget report from a real run: the logged ranks are PEFT's own masks, the totals add up,
the run folder and model card carry the allocation, the saved adapter is the pruned one, and a
resumed run allocates exactly as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.conftest import interrupt_then_resume, read_metrics

ADALORA = {"placement.projector": {"mode": "lora", "rank": 4},
           "placement.adalora": {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "delta_t": 1},
           "train.max_steps": 8, "train.eval_every": 100}


def _masks(model) -> dict[str, tuple[int, int]]:
    """Module → (values PEFT's rank_pattern keeps, non-zero singular values), read from PEFT directly."""
    config = model.peft_config["default"]
    pattern = config.rank_pattern or {}
    out = {}
    for name, p in model.base_model.model.named_parameters():
        if ".lora_E." in name:
            module = name.split(".lora_E.")[0]
            mask = pattern.get(f"{module}.lora_E.default", pattern.get(f"{module}.lora_E"))
            kept = sum(mask) if mask is not None else p.shape[0]
            out[module] = (int(kept), int((p != 0).sum()))
    return out


@pytest.fixture(scope="module")
def adalora_run(shapes_small, tmp_path_factory):
    """One 8-step AdaLoRA run on vision, projector and language, with PEFT's masks read after every step."""
    seen: dict[int, dict[str, tuple[int, int]]] = {}
    tmp = tmp_path_factory.mktemp("adalora")
    recipe = _recipe(shapes_small, tmp, "run")
    from mmlora.config.loading import load_recipe
    from mmlora.train.loop import Trainer

    trainer = Trainer(load_recipe(recipe), recipe_name="run")

    def on_event(where, step):
        if where == "after-step":
            seen[step] = _masks(trainer.accelerator.unwrap_model(trainer.model))

    trainer.on_event = on_event
    trainer.setup()
    result = trainer.train()
    return trainer, result, seen


def _recipe(shapes_small, tmp, name, **more):
    import copy

    import yaml

    from tests.train.conftest import BASE

    data = copy.deepcopy(BASE)
    world = shapes_small / "world_B"
    data["data"]["train"] = [{"format": "llava", "path": str(world / "llava_train.json")}]
    data["data"]["val"] = [{"format": "llava", "path": str(world / "llava_val.json")}]
    data["train"]["output_dir"] = str(tmp / name)
    for key, value in {**ADALORA, **more}.items():
        section, leaf = key.rsplit(".", 1)
        node = data
        for part in section.split("."):
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_logged_ranks_are_pefts_masks(adalora_run):
    trainer, _, seen = adalora_run
    record = json.loads((trainer.out / "rank_allocation.json").read_text())
    assert record["steps"][0] == 0 and all(r == 6 for m in record["modules"] for r in m["ranks"][:1])
    allocation_steps = record["steps"][1:]
    assert allocation_steps == [3, 4, 5, 6, 7]  # tinit 1 < step ≤ total - tfinal (PEFT counts from 0)
    for k, step in enumerate(record["steps"][1:], start=1):
        for m in record["modules"]:
            kept, nonzero = seen[step][m["name"]]
            assert m["ranks"][k] == kept == nonzero, (step, m["name"])
        # PEFT masks to the budget: the kept values sum to it exactly
        assert sum(m["ranks"][k] for m in record["modules"]) == record["budgets"][k]
    assert record["budgets"][-1] == 2 * len(record["modules"])  # target_r per module at the final allocation


def test_modality_totals_sum_to_the_modules(adalora_run):
    trainer, _, _ = adalora_run
    record = json.loads((trainer.out / "rank_allocation.json").read_text())
    assert set(record["totals"]) == {"vision", "projector", "language"}
    for k in range(len(record["steps"])):
        for name, totals in record["totals"].items():
            assert totals[k] == sum(m["ranks"][k] for m in record["modules"] if m["modality"] == name)
    logged = {r["step"]: r["adalora_rank"] for r in read_metrics(trainer.out) if "adalora_rank" in r}
    assert sorted(logged) == record["steps"][1:]
    for k, step in enumerate(record["steps"][1:], start=1):
        assert logged[step] == {**{n: t[k] for n, t in record["totals"].items()}, "budget": record["budgets"][k]}


def test_the_run_reports_its_allocation(adalora_run):
    trainer, result, _ = adalora_run
    record = json.loads((trainer.out / "rank_allocation.json").read_text())
    final = {n: t[-1] for n, t in record["totals"].items()}
    text = result["allocation"]
    assert text.startswith("AdaLoRA rank allocation")
    for name, total in final.items():
        line = next(row for row in text.splitlines() if row.startswith(name))
        assert f"{total} of " in line
    card = (trainer.out / "final" / "README.md").read_text()
    assert "## AdaLoRA rank allocation" in card
    assert f"| language | {sum(m['modality'] == 'language' for m in record['modules'])} | {final['language']} of " in card
    for picture in ("rank_heatmap.png", "rank_shares.png"):
        assert (trainer.out / picture).read_bytes()[:4] == b"\x89PNG"


def test_the_saved_adapter_is_pruned_and_reloads_in_plain_peft(adalora_run, tiny_llava_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    trainer, _, _ = adalora_run
    record = json.loads((trainer.out / "rank_allocation.json").read_text())
    folder = trainer.out / "final" / "adapters" / "default"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    for m in record["modules"]:
        assert saved[f"base_model.model.{m['name']}.lora_E"].shape[0] == m["ranks"][-1]
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = trainer.collate([trainer.train_set[i] for i in range(2)])
    batch.pop("labels")
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir), folder).eval()
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    with torch.no_grad():
        trained, reloaded, untouched = model(**batch).logits, plain(**batch).logits, base(**batch).logits
    assert (trained - untouched).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)


def test_a_step_has_pefts_loss_and_regulariser_gradients(shapes_small, tmp_path):
    """The loop computes the loss itself (PEFT would add its orthogonality term inside forward only
    when the model computes the loss): a step's gradients equal plain PEFT's forward with labels,
    whose loss is the mean token loss plus the regulariser."""
    from mmlora.config.loading import load_recipe
    from mmlora.train.loop import Trainer

    recipe = _recipe(shapes_small, tmp_path, "grads", **{"train.max_grad_norm": None, "train.max_steps": 3,
                                                          "placement.adalora": {"init_r": 4, "target_r": 2, "tinit": 1,
                                                                                "tfinal": 1}})
    trainer = Trainer(load_recipe(recipe), recipe_name="grads")
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():  # AdaLoRA starts E at zero: give every factor a gradient
        for n, p in model.named_parameters():
            if ".lora_E." in n:
                p.normal_(0, 0.5)
    captured = {}
    trainer.optimizer.step = lambda *a, **k: captured.update(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    indices = next(iter(trainer.sampler))
    trainer.train_step(indices)
    model.zero_grad(set_to_none=True)
    batch = trainer.collate([trainer.train_set[i] for i in indices])
    model.train()
    out = model(**batch)  # PEFT's AdaLoraModel.forward: outputs.loss += orth_reg_weight * regulariser
    out.loss.backward()
    assert captured and len(captured) == sum(p.requires_grad for p in model.parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(captured[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_an_interrupted_adalora_run_resumes_exactly(adalora_run, shapes_small, tmp_path):
    reference, _, _ = adalora_run
    second = interrupt_then_resume(_recipe(shapes_small, tmp_path, "resumed", **{"train.save_every": 4}), stop_after=6)
    assert second.step == 4
    second.train()
    expected, resumed = read_metrics(reference.out), read_metrics(second.out)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]
    assert [r.get("adalora_rank") for r in resumed] == [r.get("adalora_rank") for r in expected]
    assert (json.loads((second.out / "rank_allocation.json").read_text())
            == json.loads((reference.out / "rank_allocation.json").read_text()))


def test_the_trained_adapter_exports_as_lora_with_the_trained_logits(adalora_run, tiny_llava_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mmlora.runs.export import export_run

    trainer, _, _ = adalora_run
    record = json.loads((trainer.out / "rank_allocation.json").read_text())
    export_run(trainer.out, tmp_path / "lora", as_lora=True)
    folder = tmp_path / "lora" / "adapters" / "default"
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir), folder).eval()
    ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in plain.named_modules()
             if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    assert ranks == {m["name"]: m["ranks"][-1] for m in record["modules"] if m["ranks"][-1] > 0}
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = trainer.collate([trainer.train_set[i] for i in range(2)])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
