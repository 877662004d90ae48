"""Continual learning recipes (``continual:``) on the tiny LLaVA: sequential continuation starts from the
earlier run's adapters; O-LoRA keeps the earlier adapters frozen and active, pushes the new ones
orthogonal and reloads in plain PEFT; a router run trains only its router, saves and reloads to the same
outputs and resumes exactly; distillation's loss is the hand-computed KL and falls."""

from __future__ import annotations

import json

import pytest
import torch

from mmlora.config.loading import load_recipe
from mmlora.errors import MmloraError
from mmlora.train.continual import orthogonality
from mmlora.train.loop import Trainer
from tests.adapter_runs import plain_peft
from tests.train.conftest import interrupt_then_resume, read_metrics, run_training

LORA = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0], "rank": 4},
        "projector": {"mode": "frozen"}, "language": {"mode": "lora", "rank": 4}}
FROZEN = {"vision": {"mode": "frozen"}, "projector": {"mode": "frozen"}, "language": {"mode": "frozen"}}


@pytest.fixture(scope="module")
def stage_b(tmp_path_factory, shapes_small):
    """An adapter-only LoRA run on world B (the earlier stage every method builds on)."""
    import yaml

    tmp = tmp_path_factory.mktemp("continual-b")
    world = shapes_small / "world_B"
    recipe = {"model": {"name": "tiny-llava"}, "placement": LORA,
              "data": {"train": [{"format": "llava", "path": str(world / "llava_train.json")}], "max_length": 256},
              "train": {"max_steps": 3, "batch_size": 4, "lr": 5e-3, "seed": 0, "output_dir": str(tmp / "b")}}
    path = tmp / "b.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_training(path)
    return tmp / "b"


def _world(recipe_changes: dict, shapes_small, world: str = "world_C") -> dict:
    w = shapes_small / world
    return recipe_changes | {"data.train": [{"format": "llava", "path": str(w / "llava_train.json")}],
                             "data.val": [{"format": "llava", "path": str(w / "llava_val.json")}]}


def _adapter_weights(model, name="default") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n}


def test_sequential_starts_from_the_earlier_adapters(make_recipe, stage_b, shapes_small):
    from safetensors.torch import load_file

    path = make_recipe("seq", **_world({"placement": LORA, "continual": {"method": "sequential", "previous": [str(stage_b)]},
                                        "train.max_steps": 2}, shapes_small))
    trainer = Trainer(load_recipe(path), recipe_name="seq")
    trainer.setup()
    start = _adapter_weights(trainer.accelerator.unwrap_model(trainer.model))
    saved = load_file(str(stage_b / "final/adapters/default/adapter_model.safetensors"))
    assert len(start) == len(saved) > 0
    for n, t in start.items():  # every adapter tensor is stage B's trained one
        key = n.replace(".default", "")
        assert torch.equal(t, saved[key]), n
    trainer.train()
    after = _adapter_weights(trainer.accelerator.unwrap_model(trainer.model))
    assert any(not torch.equal(after[n], start[n]) for n in start)  # and it trains on


def test_sequential_refuses_another_placement(make_recipe, stage_b, shapes_small):
    placement = LORA | {"language": {"mode": "lora", "rank": 8}}
    path = make_recipe("seq8", **_world({"placement": placement, "continual": {"method": "sequential",
                                                                           "previous": [str(stage_b)]}}, shapes_small))
    trainer = Trainer(load_recipe(path), recipe_name="seq8")
    with pytest.raises(MmloraError, match="does not fit this placement"):
        trainer.setup()


@pytest.mark.slow
def test_olora_keeps_the_earlier_adapters_and_pushes_the_new_ones_orthogonal(make_recipe, stage_b, shapes_small):
    from mmlora.runs.reference import load_reference
    from tests.placement.test_mixture import _batch

    penalties = {}
    for weight in (0.0, 50.0):
        name = f"olora{int(weight)}"
        path = make_recipe(name, **_world({"placement": LORA, "train.max_steps": 6, "train.eval_every": None,
                                           "continual": {"method": "olora", "previous": [str(stage_b)],
                                                         "orth_weight": weight}}, shapes_small))
        trainer, result = run_training(path)
        model = trainer.accelerator.unwrap_model(trainer.model)
        earlier = load_file_of(stage_b)
        for n, p in model.named_parameters():  # the earlier adapter is in the model, untouched
            if ".earlier0_default." in n:
                assert not p.requires_grad and torch.equal(p.detach(), earlier[n.replace(".earlier0_default", "")]), n
        penalties[weight] = float(orthogonality(model, ["default"], ["earlier0_default"]))
        manifest = json.loads((result["final"] / "manifest.json").read_text())
        assert [a["name"] for a in manifest["adapters"]] == ["default", "earlier0_default"]
    assert penalties[50.0] < 0.5 * penalties[0.0]  # the penalty did push the new subspace away
    batch = _batch(shapes_small, 2)
    with torch.no_grad():  # the saved run = both adapters active, in plain PEFT
        ours = load_reference(result["final"]).model(**batch).logits
        plain = plain_peft(result["final"].parent)(**batch).logits
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)


def load_file_of(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final/adapters/default/adapter_model.safetensors"))


def test_a_router_run_trains_its_router_alone_and_reloads_the_same(make_recipe, stage_b, shapes_small):
    from mmlora.runs.reference import load_reference
    from tests.placement.test_mixture import _batch

    changes = _world({"placement": FROZEN, "train.max_steps": 3, "train.eval_every": None,
                      "continual": {"method": "router", "router": {"experts": {"B": str(stage_b)}}}}, shapes_small)
    path = make_recipe("router", **changes)
    trainer, result = run_training(path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"mmlora_mixture.router.linear.weight", "mmlora_mixture.router.linear.bias"}
    assert float(model.mmlora_mixture.router.linear.weight.abs().sum()) > 0  # it learned something
    manifest = json.loads((result["final"] / "manifest.json").read_text())
    assert manifest["adapters"] == [] and [e["name"] for e in manifest["router"]["experts"]] == ["base", "B"]
    assert (result["final"] / "experts/B/adapter_config.json").is_file()
    batch = _batch(shapes_small, 2)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        loaded = load_reference(result["final"])
        after = loaded.model(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_the_router_reads_the_prompt_not_the_answer(make_recipe, stage_b, shapes_small):
    """In training the answers are in the inputs; the router must route by what it will see when it
    answers: the same prompt and image with another answer get the same weights."""
    changes = _world({"placement": FROZEN, "continual": {"method": "router", "router": {
        "experts": {"B": str(stage_b)}, "objective": "mixture"}}}, shapes_small)
    trainer = Trainer(load_recipe(make_recipe("router-prompt", **changes)), recipe_name="router-prompt")
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        model.mmlora_mixture.router.linear.weight.normal_(std=0.05)  # a gate that reads its inputs
    batch = trainer.collate([trainer.train_set[0]])
    other = {k: v.clone() for k, v in batch.items()}
    answer = other["labels"] != -100
    other["input_ids"][answer] = (other["input_ids"][answer] + 7) % 400 + 5  # another answer, same length
    weights = []
    for b in (batch, other):
        with torch.no_grad():
            trainer.objective.loss_sum(model, b)
        weights.append(model.mmlora_mixture.weights.clone())
    torch.testing.assert_close(weights[0], weights[1])
    with torch.no_grad():  # without the prompt mask the answer would change them
        model.mmlora_mixture.text_mask = None
        model(**{k: v for k, v in other.items() if k != "labels"})
    assert not torch.allclose(model.mmlora_mixture.weights, weights[0])


def test_the_router_learns_each_samples_best_expert(make_recipe, stage_b, shapes_small):
    """``objective: best-expert``: the target of each sample is the expert under which its answer has the
    lowest loss (each alone), and the loss is the router's negative log-weight there, per sample."""
    from mmlora.objectives.route import per_sample_loss

    changes = _world({"placement": FROZEN, "continual": {"method": "router", "router": {"experts": {"B": str(stage_b)}}}},
                     shapes_small, "world_B")
    trainer = Trainer(load_recipe(make_recipe("router-best", **changes)), recipe_name="router-best")
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    mixture = model.mmlora_mixture
    with torch.no_grad():
        mixture.router.linear.weight.normal_(std=0.05)
    batch = trainer.collate([trainer.train_set[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    got, n = trainer.objective.loss_sum(model, batch)
    losses = []
    for name in ("base", "B"):  # each expert alone, through plain PEFT
        with torch.no_grad():
            losses.append(per_sample_loss(plain_peft(stage_b if name == "B" else None), inputs, batch["labels"]))
    best = torch.stack(losses, 1).argmin(1)
    assert n == 4 and best.tolist() == [1, 1, 1, 1]  # world B's answers: B's adapter explains them best
    mixture.text_mask = batch["labels"] == -100
    image, text = mixture.features(model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    mixture.text_mask = None
    want = -torch.log(mixture.router(image, text)[torch.arange(4), best]).sum()
    torch.testing.assert_close(got, want)
    got.backward()
    assert mixture.router.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("mmlora_mixture.router"))


def test_a_router_run_resumes_exactly(make_recipe, stage_b, shapes_small):
    changes = _world({"placement": FROZEN, "train.max_steps": 4, "train.save_every": 2, "train.eval_every": None,
                      "continual": {"method": "router", "router": {"experts": {"B": str(stage_b)}}}}, shapes_small)
    _, _ = run_training(make_recipe("whole", **changes))
    whole = [r["loss"] for r in read_metrics(make_recipe("whole", **changes).parent / "whole")]
    resumed = interrupt_then_resume(make_recipe("cut", **changes), stop_after=2)
    resumed.train()
    cut = [r["loss"] for r in read_metrics(resumed.out)]
    assert cut == whole


def test_distillation_loss_is_the_hand_kl_and_falls(make_recipe, stage_b, shapes_small):
    import torch.nn.functional as F

    path = make_recipe("distill", **_world({"placement": {"language": {"mode": "lora", "rank": 2}, "vision": {"mode": "frozen"},
                                                        "projector": {"mode": "frozen"}},
                                          "train.max_steps": 6, "train.lr": 2e-2, "train.eval_every": None,
                                          "continual": {"method": "distill", "teacher": str(stage_b), "temperature": 2.0}},
                                         shapes_small, "world_B"))
    trainer = Trainer(load_recipe(path), recipe_name="distill")
    trainer.setup()
    batch = trainer.collate([trainer.train_set[i] for i in range(3)])
    model = trainer.accelerator.unwrap_model(trainer.model)
    teacher = trainer.objective.teacher
    with torch.no_grad():
        got, n = trainer.objective.loss_sum(model, batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        zs, zt = model(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
        mask = batch["labels"][:, 1:] != -100
        hand = 0.0
        for b, t in mask.nonzero().tolist():  # token by token: KL(p_t || p_s) at temperature 2, times 4
            pt, ls = F.softmax(zt[b, t] / 2, -1), F.log_softmax(zs[b, t] / 2, -1)
            hand += float((pt * (pt.log() - ls)).sum()) * 4
    assert n == int(mask.sum()) and abs(float(got) - hand) < 1e-4 * max(1.0, hand)
    trainer.train()
    losses = [r["loss"] for r in read_metrics(trainer.out)]
    assert losses[-1] < losses[0]


def test_continual_sections_are_checked(make_recipe):
    from pydantic import ValidationError

    from mmlora.config.schema import ContinualSpec

    with pytest.raises(ValidationError, match="previous: \\[exactly one run\\]"):
        ContinualSpec(method="sequential")
    with pytest.raises(ValidationError, match="takes no teacher"):
        ContinualSpec(method="olora", previous=["a"], teacher="t")
    with pytest.raises(ValidationError, match="'base' is the base itself"):
        ContinualSpec(method="router", router={"experts": {"base": "x"}})
