"""Pick the objective for a model and a recipe's data section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmlora.config.schema import DenseSpec
from mmlora.data.image_budget import apply_image_budget
from mmlora.errors import MmloraError
from mmlora.models.modality import is_open_clip, unwrap
from mmlora.objectives.base import Objective
from mmlora.objectives.caption import CaptionLM
from mmlora.objectives.contrastive import Contrastive
from mmlora.objectives.dense import DenseSeg, uses_dense


def objective_for(model: Any, model_path: Path | str, data, dense=None, base_dir: Path | None = None) -> Objective:
    """The objective for a model and a recipe's ``data`` section: ``seg`` data → :class:`DenseSeg`
    (open_clip only); other open_clip data → :class:`Contrastive`; else :class:`CaptionLM`."""
    max_length, max_image_pixels = data.max_length, data.max_image_pixels
    if is_open_clip(unwrap(model)):
        apply_image_budget(None, data)  # refuses a budget key: open_clip's preprocessing has no such setting
    if uses_dense(data):
        if not is_open_clip(unwrap(model)):
            raise MmloraError("seg data trains CLIP (open_clip) models with the dense objective; this model is not one")
        return DenseSeg(Path(model_path), data, dense or DenseSpec(), base_dir, max_image_pixels)
    if is_open_clip(unwrap(model)):
        return Contrastive(Path(model_path), max_image_pixels)
    return CaptionLM(model_path, max_length, max_image_pixels, data)
