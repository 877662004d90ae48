"""Runs made without training, for composition and serving tests: a tiny base, PEFT adapters with
random non-zero weights and modules trained in place moved off the base's values (so each run really
changes the outputs), saved in the run layout that ``mmlora train`` writes (``final/``: adapters,
full modules, manifest, recipe, processor)."""

from __future__ import annotations

from pathlib import Path

import torch

LLAVA_PLACEMENT = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0], "rank": 4},
                   "language": {"mode": "lora", "rank": 4}}
CLIP_PLACEMENT = {"vision": {"mode": "lora", "targets": ["q", "v"], "rank": 4},
                  "text": {"mode": "lora", "targets": ["q", "v"], "rank": 4}}


def make_run(out: Path, preset: str, placement: dict, seed: int, scale: float = 0.3) -> Path:
    """Write a run folder at ``out`` whose adapters have seeded random A and B (and full modules moved
    off the base's values); returns ``out``."""
    from mmlora.config.schema import Recipe
    from mmlora.models.presets import preset_path
    from mmlora.runs.synthetic import place, write_random_run

    recipe = Recipe.model_validate({"model": {"name": preset}, "placement": placement})
    placed, plan = place(recipe)
    return write_random_run(placed, plan, recipe, out, seed, scale,
                            processor_from=preset_path(preset) if preset.endswith("llava") else None)


def plain_peft(run: Path | None, preset: str = "tiny-llava"):
    """``run`` reassembled on its base with plain transformers + PEFT, as the README shows (``None``: the
    base): full modules loaded into the base, then every adapter, all active."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from mmlora.models.presets import preset_path

    base = LlavaForConditionalGeneration.from_pretrained(preset_path(preset), dtype=torch.float32)
    if run is None:
        return base.eval()
    folder = run / "final"
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("full_modules"):
        missing, unexpected = base.load_state_dict(load_file(folder / manifest["full_modules"]["path"]), strict=False)
        assert not unexpected
    adapters = manifest["adapters"]
    if not adapters:
        return base.eval()
    model = PeftModel.from_pretrained(base, folder / adapters[0]["path"], adapter_name=adapters[0]["name"])
    for a in adapters[1:]:
        model.load_adapter(folder / a["path"], adapter_name=a["name"])
    model.base_model.set_adapter([a["name"] for a in adapters])
    return model.eval()


def caption_alone(run: Path | None, image, max_new_tokens: int = 5, prompt: str | None = None) -> str:
    """``image``'s caption by ``run`` alone in plain PEFT on tiny-llava (``None``: the base)."""
    from transformers import AutoProcessor

    from mmlora.data.samples import CAPTION_PROMPT
    from mmlora.generate import generate_answers
    from mmlora.models.presets import preset_path

    return generate_answers(plain_peft(run), AutoProcessor.from_pretrained(preset_path("tiny-llava")), [image],
                            prompt or CAPTION_PROMPT, max_new_tokens=max_new_tokens)[0]
