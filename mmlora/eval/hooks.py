"""The in-training evaluations a recipe asks for, built for the trainer (``mmlora.train.hooks``)."""

from __future__ import annotations

from mmlora.config.schema import Recipe
from mmlora.eval.caption import CaptionMetrics, ExtraScorer
from mmlora.train.hooks import Evaluator


def training_evaluators(recipe: Recipe, extra: ExtraScorer | None = None) -> list[Evaluator]:
    """``train.caption_eval`` → :class:`~mmlora.eval.caption.CaptionMetrics` (with ``extra`` scores,
    e.g. the shapes world's slot accuracy); nothing when the recipe asks for no evaluation."""
    spec = recipe.train.caption_eval
    return [CaptionMetrics(spec, extra)] if spec is not None else []
