"""Optimizer parameter groups per modality, and the learning-rate schedule.

Each modality's trainable parameters get its own learning rate (the recipe's ``lr``, or
``lr_multiplier`` x the base rate). With LoRA+ (``train.lora_plus_ratio``) the B matrices get
``ratio`` x their modality's rate. Norm weights, biases and DoRA magnitudes get no weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmlora.config.schema import TrainSpec
from mmlora.models.modality import ModalityMap
from mmlora.placement.plan import PlacementPlan


@dataclass
class GroupInfo:
    name: str
    modality: str
    lr: float
    weight_decay: float
    n_params: int


def base_name(name: str) -> str:
    """Parameter name → the base model's module path (strip PEFT's wrapper and adapter parts)."""
    name = name.removeprefix("base_model.model.")
    if ".lora_" in name:
        return name.split(".lora_")[0]
    return name.replace(".base_layer.", ".")


def _no_decay(name: str, module_types: dict[str, str]) -> bool:
    if name.endswith(".bias") or "lora_magnitude_vector" in name:
        return True
    owner = name.rsplit(".", 1)[0]
    return "Norm" in module_types.get(owner, "") or "norm" in owner.rsplit(".", 1)[-1].lower()


def param_groups(model: nn.Module, mmap: ModalityMap, plan: PlacementPlan, train: TrainSpec) -> tuple[list[dict], list[GroupInfo]]:
    """Optimizer groups per modality x (decay, no decay, LoRA+ B): each modality's learning rate from the plan."""
    module_types = {n: type(m).__name__ for n, m in model.named_modules()}
    buckets: dict[tuple[str, str], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        modality = mmap.modality_of(base_name(name)) or "other"
        if (".lora_B." in name or ".qalora_B." in name) and train.lora_plus_ratio:
            kind = "lora_B"
        elif _no_decay(name, module_types):
            kind = "no_decay"
        else:
            kind = "decay"
        buckets.setdefault((modality, kind), []).append(p)
    groups, infos = [], []
    for (modality, kind), params in sorted(buckets.items()):
        m = plan.modalities.get(modality)
        lr = (m.lr if m and m.lr else train.lr * (m.lr_multiplier if m and m.lr_multiplier else 1.0))
        if kind == "lora_B":
            lr *= train.lora_plus_ratio
        wd = 0.0 if kind == "no_decay" else train.weight_decay
        name = f"{modality}/{kind}"
        groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": name})
        infos.append(GroupInfo(name, modality, lr, wd, sum(p.numel() for p in params)))
    return groups, infos


def lr_lambda(scheduler: str, warmup: int, total: int):
    """Multiplier of each group's base rate at step ``s`` (0-based optimizer steps)."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def build_optimizer(groups: list[dict], train: TrainSpec, total_steps: int):
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train.scheduler, train.warmup_steps, total_steps))
    return optimizer, scheduler
