"""``train.lean_dora``: mmlora's DoRA forward gives PEFT's outputs and gradients (case table: a
linear layer with bias, with dropout, in eval mode; the tiny LLaVA; 4-bit QDoRA), and merges as PEFT's."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mmlora.adapters.lean_dora import LeanDoraLinearVariant, use_lean_dora
from tests.train.speed_helpers import assert_same_grads, grads_of


class _Toy(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.up, self.down = nn.Linear(12, 20, bias=bias), nn.Linear(20, 12, bias=bias)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@dataclass
class Case:
    id: str
    bias: bool = True
    dropout: float = 0.0
    train: bool = True


CASES = [Case("bias"), Case("no-bias", bias=False), Case("dropout", dropout=0.3), Case("eval", train=False)]


def _pair(case: Case):
    torch.manual_seed(0)
    base = _Toy(case.bias)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=case.dropout, target_modules=["up", "down"], use_dora=True)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name or "magnitude" in name:
                p.add_(0.2 * torch.randn_like(p))
    lean = copy.deepcopy(peft_model)
    assert use_lean_dora(lean) == 2
    return peft_model.train(case.train), lean.train(case.train)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_lean_dora_equals_peft(case):
    peft_model, lean = _pair(case)
    x = torch.randn(3, 5, 12)
    torch.manual_seed(1)
    want = peft_model(x)
    torch.manual_seed(1)
    got = lean(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if case.train:
        assert_same_grads(grads_of(lean, got.square().sum()), grads_of(peft_model, want.square().sum()), rtol=1e-5)


def test_merged_weights_give_the_lean_forward():
    _, lean = _pair(Case("bias", train=False))
    x = torch.randn(4, 12)
    out = lean(x)
    merged = lean.merge_and_unload()  # PEFT's merge (DoraLinearVariant's), unchanged
    torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-6)


def test_tiny_llava_dora_equals_peft(shapes_small, tiny_llava_dir):
    from transformers import AutoProcessor

    from mmlora.objectives.caption import supervised_loss_sum
    from tests.placement.conftest import llava_batch
    from tests.train.speed_helpers import placed_llava

    spec = {"vision": {"mode": "dora", "targets": ["q", "v"], "rank": 2}, "projector": {"mode": "full"},
            "language": {"mode": "dora", "rank": 4}}
    batch = llava_batch(AutoProcessor.from_pretrained(tiny_llava_dir), shapes_small, n=2)
    peft_model, _ = placed_llava(spec)
    lean = copy.deepcopy(peft_model)
    assert use_lean_dora(lean) == 4 + 14
    want, got = supervised_loss_sum(peft_model, batch)[0], supervised_loss_sum(lean, batch)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads_of(lean, got), grads_of(peft_model, want))


@pytest.mark.bnb
def test_qdora_4bit_equals_peft():
    from mmlora.config.schema import ModelSpec, PlacementSpec, QuantSpec
    from mmlora.placement.apply import apply_placement
    from mmlora.placement.plan import plan_placement
    from mmlora.models.precision import load_for_training

    spec = PlacementSpec.model_validate({"language": {"mode": "dora", "rank": 4, "precision": "4bit"}})
    model, mmap = load_for_training(ModelSpec(name="tiny-llava"), spec, QuantSpec())
    model = apply_placement(model, plan_placement(model, mmap, spec)).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 200, (2, 12))
    want = model(input_ids=ids).logits
    grads_want = grads_of(model, want.square().mean())
    assert use_lean_dora(model) == 14
    assert all(isinstance(v, LeanDoraLinearVariant) for m in model.modules() for v in getattr(m, "lora_variant", {}).values())
    got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_same_grads(grads_of(model, got.square().mean()), grads_want, rtol=1e-3, atol=1e-5)
