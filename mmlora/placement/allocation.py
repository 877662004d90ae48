"""AdaLoRA's rank allocation, read from PEFT: the effective rank of every module, the allocator's
state (for an exact resume) and the orthogonality regulariser.

PEFT keeps AdaLoRA's decision in ``peft_config[adapter].rank_pattern``: per module, a boolean mask over
its ``init_r`` singular values (``lora_E``), True where a value is kept. The *effective rank* of a module
is the count of kept values; before the first allocation every value is kept. PEFT strips the adapter
name from the pattern's keys when it saves, so both spellings are read here.

The regulariser is PEFT's own (``AdaLoraModel.forward`` adds it to ``outputs.loss``), restated here
because mmlora computes the loss outside the model's forward (logits only at supervised positions,
chunked heads), so PEFT never sees a loss to add it to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _adalora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name (the base model's own, as the plan names it) → AdaLoRA layer."""
    from peft.tuners.adalora.layer import AdaLoraLayer

    inner = model.base_model.model if hasattr(model, "base_model") else model
    return {n: m for n, m in inner.named_modules() if isinstance(m, AdaLoraLayer)}


def allocation_config(model: nn.Module) -> Any | None:
    """The model's ``AdaLoraConfig`` (None when the model carries no AdaLoRA adapter)."""
    configs = getattr(model, "peft_config", None) or {}
    return next((c for c in configs.values() if type(c).__name__ == "AdaLoraConfig"), None)


def _adapter(model: nn.Module) -> str:
    return next(n for n, c in model.peft_config.items() if type(c).__name__ == "AdaLoraConfig")


def effective_ranks(model: nn.Module) -> dict[str, int]:
    """Module name → the number of singular values PEFT's rank mask keeps (all ``lora_E`` rows before
    the first allocation, or in a pruned reload where the rows are the kept ones)."""
    config, adapter = allocation_config(model), _adapter(model)
    pattern = config.rank_pattern or {}
    out = {}
    for name, layer in _adalora_layers(model).items():
        mask = pattern.get(f"{name}.lora_E.{adapter}", pattern.get(f"{name}.lora_E"))
        out[name] = int(sum(bool(v) for v in mask)) if mask is not None else int(layer.lora_E[adapter].shape[0])
    return out


def allocation_step(model: nn.Module, step: int) -> tuple[bool, int]:
    """``(allocates, budget)``: whether PEFT's ``update_and_allocate(step)`` masks singular values at
    this step, and the total rank its budget schedule sets for it."""
    config = allocation_config(model)
    allocator = model.base_model.rankallocator
    budget, masks = allocator.budget_schedule(step)
    final = config.total_step - config.tfinal
    return (masks and step < final) or step == final, int(budget)


def allocator_state(model: nn.Module) -> dict[str, Any]:
    """What PEFT's rank allocator learns across steps (importance scores and their running averages)
    and the current rank pattern: the part of an AdaLoRA run that is not in its parameters."""
    allocator = model.base_model.rankallocator
    pattern = allocation_config(model).rank_pattern
    return {"ipt": dict(allocator.ipt), "exp_avg_ipt": dict(allocator.exp_avg_ipt),
            "exp_avg_unc": dict(allocator.exp_avg_unc),
            "rank_pattern": {k: [bool(v) for v in mask] for k, mask in pattern.items()} if pattern else None}


def load_allocator_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Put :func:`allocator_state`'s result back (on resume)."""
    allocator = model.base_model.rankallocator
    device = next(model.parameters()).device
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, key, {k: v.to(device) for k, v in state[key].items()})
    allocation_config(model).rank_pattern = state["rank_pattern"]


def orthogonal_regularizer(model: nn.Module) -> torch.Tensor | None:
    """``orth_reg_weight`` × the mean over AdaLoRA factors of ‖PPᵀ − I‖_F (P = ``lora_A``) and
    ‖QᵀQ − I‖_F (Q = ``lora_B``), as PEFT's ``AdaLoraModel.forward`` computes it; None when the weight
    is 0 or nothing trains."""
    config, adapter = allocation_config(model), _adapter(model)
    if not config.orth_reg_weight:
        return None
    terms = []
    for n, p in model.named_parameters():
        if not p.requires_grad or not (".lora_A." in n or ".lora_B." in n) or adapter not in n:
            continue
        cov = p @ p.T if ".lora_A." in n else p.T @ p
        terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
    if not terms:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean()
