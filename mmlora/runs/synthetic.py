"""Runs written without training, for tests and load tests: a placement applied to a base, its adapters
given seeded random non-zero weights and its fully trained modules moved off the base's values, so that
every such run really changes the model's answers; saved in the layout ``mmlora train`` writes.

    placed, plan = place(recipe)                   # once per placement
    write_random_run(placed, plan, recipe, "runs/a0", seed=0)

Layer: runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmlora.config.schema import Recipe
from mmlora.models.build import load_model
from mmlora.models.modality import discover_modalities
from mmlora.placement.apply import apply_placement
from mmlora.placement.plan import PlacementPlan, plan_placement
from mmlora.runs.layout import Run
from mmlora.runs.save import save_placement


def place(recipe: Recipe) -> tuple[nn.Module, PlacementPlan]:
    """The recipe's model with its placement applied, and the plan."""
    model = load_model(recipe.model)
    plan = plan_placement(model, discover_modalities(model), recipe.placement)
    return apply_placement(model, plan), plan


def write_random_run(placed: nn.Module, plan: PlacementPlan, recipe: Recipe, out: str | Path, seed: int,
                     scale: float = 0.3, processor_from: str | Path | None = None) -> Path:
    """Give ``placed``'s adapters seeded random weights (``scale`` × N(0, 1)) and add noise of ``scale`` ×
    each full tensor's spread to its full modules, then save it as the run folder ``out`` (``final/``:
    adapters, full modules, manifest, recipe; the processor of ``processor_from`` if given). The full
    modules of ``placed``'s base are changed in place: place once per run if that matters."""
    g = torch.Generator().manual_seed(seed)
    base = placed.get_base_model() if hasattr(placed, "get_base_model") else placed
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, p in placed.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name in plan.full_params:
            p = params[name]
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=0.02))
    final = Run(out).final
    save_placement(placed, plan, final.folder, recipe.model.name)
    final.write_recipe(recipe)
    if processor_from is not None:
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(processor_from).save_pretrained(final.folder)
    return Path(out)
