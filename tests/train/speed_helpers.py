"""Shared by the speed-switch tests: the tiny LLaVA placed as the trainer places it, with adapters
made non-zero (so no comparison passes trivially), and gradients of a loss."""

from __future__ import annotations

import torch

from mmlora.config.schema import ModelSpec, PlacementSpec, QuantSpec
from mmlora.placement.apply import apply_placement
from mmlora.placement.plan import plan_placement
from mmlora.models.precision import load_for_training


def placed_llava(placement: dict, seed: int = 0):
    """``(peft_model, modality map)`` for the tiny LLaVA, adapters and DoRA magnitudes perturbed."""
    spec = PlacementSpec.model_validate(placement)
    model, mmap = load_for_training(ModelSpec(name="tiny-llava"), spec, QuantSpec())
    model = apply_placement(model, plan_placement(model, mmap, spec))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model.train(), mmap


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Equal within ``rtol``, and an absolute ``atol`` or 1e-5 of the tensor's largest entry (float
    summation order, e.g. with several threads, moves near-zero entries by more than ``atol``)."""
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            tol = max(atol, 1e-5 * float(b[name].abs().max()))
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
