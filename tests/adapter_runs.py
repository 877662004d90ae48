"""Adapter-only runs made without training, for composition and serving tests: a tiny base, one
PEFT LoRA adapter with random non-zero weights (so each run really changes the outputs), saved in the
run layout that ``mmlora train`` writes (``final/``: adapters, manifest, recipe, processor)."""

from __future__ import annotations

from pathlib import Path

import torch

LLAVA_PLACEMENT = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0], "rank": 4},
                   "language": {"mode": "lora", "rank": 4}}
CLIP_PLACEMENT = {"vision": {"mode": "lora", "targets": ["q", "v"], "rank": 4},
                  "text": {"mode": "lora", "targets": ["q", "v"], "rank": 4}}


def make_run(out: Path, preset: str, placement: dict, seed: int, scale: float = 0.3) -> Path:
    """Write a run folder at ``out`` whose adapter has seeded random A and B; returns ``out``."""
    from mmlora.config.schema import Recipe
    from mmlora.models.build import load_model
    from mmlora.models.modality import discover_modalities
    from mmlora.placement.apply import apply_placement
    from mmlora.placement.plan import plan_placement
    from mmlora.runs.layout import Run
    from mmlora.runs.save import save_placement

    recipe = Recipe.model_validate({"model": {"name": preset}, "placement": placement})
    model = load_model(recipe.model)
    plan = plan_placement(model, discover_modalities(model), recipe.placement)
    placed = apply_placement(model, plan)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in placed.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    final = Run(out).final
    save_placement(placed, plan, final.folder, preset)
    final.write_recipe(recipe)
    if preset.endswith("llava"):
        from transformers import AutoProcessor

        from mmlora.models.presets import preset_path

        AutoProcessor.from_pretrained(preset_path(preset)).save_pretrained(final.folder)
    return out


def caption_alone(run: Path | None, image, max_new_tokens: int = 5) -> str:
    """``image``'s caption by ``run``'s adapter alone in plain PEFT on tiny-llava (``None``: the base)."""
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmlora.generate import generate_answers
    from mmlora.models.presets import preset_path

    base = LlavaForConditionalGeneration.from_pretrained(preset_path("tiny-llava"), dtype=torch.float32)
    model = base if run is None else PeftModel.from_pretrained(base, run / "final/adapters/default").eval()
    return generate_answers(model, AutoProcessor.from_pretrained(preset_path("tiny-llava")), [image],
                            max_new_tokens=max_new_tokens)[0]
