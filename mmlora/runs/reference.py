"""Any model argument → model + processor: the one loader behind every ``--model``/``--base``/``RUN``.

A reference is a preset name, a model folder (transformers or open_clip), a cached hub id, a run
(its root, ``final/`` or a checkpoint: the base in the run's precision with the run's adapters and
fully trained modules), a merged export (an ordinary transformers folder, or mmlora's INT4 format),
or a composition of runs (``RUN_A+RUN_B[:METHOD...]``, ``mmlora.runs.compose``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmlora.adapters.int4 import INT4_MANIFEST, load_int4_model
from mmlora.config.schema import Recipe
from mmlora.errors import MmloraError
from mmlora.models.loading import clip_tokenizer, is_clip_folder, load_clip, resolve_pretrained
from mmlora.models.modality import ModalityMap, discover_modalities, is_open_clip, unwrap
from mmlora.models.precision import dequantize, load_for_training
from mmlora.runs.compose import load_composition, parse_composition
from mmlora.runs.layout import Weights, find_weights
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
    tokenizer = clip_tokenizer(recipe.model.name) if is_open_clip(unwrap(model)) else None
    return Loaded(model, processor, tokenizer, recipe)


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
