"""What a caller can plug into the trainer: in-training evaluations and event callbacks.

The loop knows no evaluation: ``mmlora.eval.caption.CaptionMetrics`` (the recipe's
``train.caption_eval``) and anything else with this shape are passed in by the caller
(``mmlora train`` does it; ``mmlora.eval.hooks.training_evaluators(recipe)`` builds the recipe's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Evaluator(Protocol):
    #: Run every this many optimizer steps (and after the last one).
    every: int

    def __call__(self, model: Any, processor: Any) -> dict[str, float]:
        """Metrics of ``model`` (eval mode, unwrapped) by name; called on the main process only."""


#: ``on_event(where, step)``: called at ``"after-step"`` (after each logged step) and at
#: ``"during-save"`` (a checkpoint's weights are written, its trainer state not yet).
EventHook = Callable[[str, int], None]
