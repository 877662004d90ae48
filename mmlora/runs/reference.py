"""Any model argument → model + processor: the one loader behind every ``--model``/``--base``/``RUN``.

A reference is a preset name, a model folder (transformers or open_clip), a cached hub id, a run
(its root, ``final/`` or a checkpoint: the base in the run's precision with the run's adapters and
fully trained modules), a bare PEFT adapter folder (on the base its ``adapter_config.json`` names; keys
saved under transformers 4.x module names renamed, ``mmlora.runs.legacy``), a merged export (an
ordinary transformers folder, or mmlora's INT4 format), or a composition of runs
(``RUN_A+RUN_B[:METHOD...]``, ``mmlora.runs.compose``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmlora.adapters.int4 import INT4_MANIFEST, load_int4_model
from mmlora.config.schema import Recipe
from mmlora.data.image_budget import apply_image_budget
from mmlora.errors import MmloraError
from mmlora.models.loading import clip_tokenizer, is_clip_folder, load_clip, resolve_pretrained
from mmlora.models.modality import ModalityMap, discover_modalities, is_open_clip, unwrap
from mmlora.models.precision import dequantize, load_for_training
from mmlora.runs.compose import load_composition, parse_composition
from mmlora.runs.layout import Weights, find_weights
from mmlora.runs.legacy import ADAPTER_CONFIG, in_layout_of
from mmlora.runs.save import load_placement


@dataclass
class Loaded:
    """What a reference loads to. ``processor``: the transformers processor of an image-text-to-text
    model (None for CLIP); ``tokenizer``: the open_clip tokenizer of a CLIP (None otherwise);
    ``recipe``: the run's recipe (None for a base or an export); ``adapters``: the adapters a mixed
    composition routes samples to (None: one adapter, or a merge, serves every sample)."""

    model: nn.Module
    processor: Any | None = None
    tokenizer: Any | None = None
    recipe: Recipe | None = None
    adapters: list[str] | None = None

    @property
    def is_clip(self) -> bool:
        return is_open_clip(unwrap(self.model))

    def route(self, n: int) -> list[str] | None:
        """Round-robin adapter names for ``n`` samples (None: no routing)."""
        return None if self.adapters is None else [self.adapters[i % len(self.adapters)] for i in range(n)]

    def modality_map(self) -> ModalityMap:
        overrides = self.recipe.model.modalities if self.recipe is not None else None
        return discover_modalities(unwrap(self.model), overrides)


def load_run(weights: Weights, dequantize_base: bool = False) -> Loaded:
    """A run's weights folder → its base (in the precision the run trained it in) carrying the run's
    adapters (PEFT), full modules and QA-LoRA layers, in eval mode."""
    from transformers import AutoProcessor

    recipe = weights.recipe()
    base, _ = load_for_training(recipe.model, recipe.placement, recipe.train.quantization)
    if dequantize_base:
        dequantize(base)
    model = load_placement(base, weights.folder).eval()
    processor = AutoProcessor.from_pretrained(weights.folder) if weights.has_processor else None
    if processor is not None:  # the saved processor carries the budget already; the recipe is the record
        apply_image_budget(processor, recipe.data)
    tokenizer = clip_tokenizer(recipe.model.name) if is_open_clip(unwrap(model)) else None
    return Loaded(model, processor, tokenizer, recipe)


def load_peft_folder(folder: Path) -> Loaded:
    """A PEFT adapter folder saved by any tool → its base (``base_model_name_or_path``: a preset, a
    folder or a cached hub id) carrying the adapter, in eval mode. Keys under transformers 4.x module
    names are renamed to the base's layout; keys naming no module of it are refused by name (PEFT
    would load them as silently missing and give the base model's outputs)."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise MmloraError(f"{folder / ADAPTER_CONFIG}: not a readable PEFT adapter config ({err})") from None
    base_ref = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base_ref:
        raise MmloraError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path; cannot tell which base this "
                          "adapter adapts (write it into the file, or load the base yourself)")
    resolved = resolve_pretrained(base_ref)
    if isinstance(resolved, Path) and is_clip_folder(resolved):
        raise MmloraError(f"{folder}: a bare PEFT adapter on an open_clip model; train it with mmlora (a run folder) to "
                          "load it here")
    try:
        base = AutoModelForImageTextToText.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise MmloraError(f"{folder}: its base {base_ref!r} is not an image-text-to-text model ({err})") from None
    with in_layout_of(base, folder) as (current,):
        model = PeftModel.from_pretrained(base, current)
    has_processor = any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))
    return Loaded(model.eval(), AutoProcessor.from_pretrained(folder if has_processor else resolved))


def load_reference(ref: str | Path, dequantize_base: bool = False) -> Loaded:
    """See the module docstring. ``dequantize_base`` (runs only): replace the base's bitsandbytes
    layers by the float weights they compute with (for merging)."""
    comp = parse_composition(str(ref))
    if comp is not None:
        model, processor, recipe, adapters = load_composition(comp)
        tokenizer = clip_tokenizer(recipe.model.name) if is_open_clip(unwrap(model)) else None
        return Loaded(model, processor, tokenizer, recipe, adapters)
    weights = find_weights(ref)
    if weights is not None:
        return load_run(weights, dequantize_base)
    path = Path(ref)
    if (path / ADAPTER_CONFIG).is_file():
        return load_peft_folder(path)
    if (path / INT4_MANIFEST).is_file():
        from transformers import AutoProcessor

        return Loaded(load_int4_model(path), AutoProcessor.from_pretrained(path))
    resolved = resolve_pretrained(ref)
    if isinstance(resolved, Path) and is_clip_folder(resolved):
        model, _, tokenizer = load_clip(resolved)
        return Loaded(model, tokenizer=tokenizer)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise MmloraError(f"{ref}: not a run, a composition or an image-text-to-text model ({err})") from None
    return Loaded(model.eval(), AutoProcessor.from_pretrained(resolved))
