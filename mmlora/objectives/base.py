"""What every training objective gives the trainer: the :class:`Objective` protocol.

An objective says what a batch is and what its loss is for one model kind: ``mmlora.objectives.caption``
(image-text-to-text models), ``.contrastive`` (CLIP pairs), ``.dense`` (CLIP segmentation);
``.select.objective_for`` picks one for a model and a recipe's data.

Layer: objectives. Imports config, models, data, runs and the foundation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class Objective(Protocol):
    #: What the loss is normalised by: "token", "sample" or "pixel".
    unit: str
    #: ``encode(sample) -> dict of tensors`` (raises BadSample), with ``tokenizer`` and ``image_token_id``.
    encoder: Any
    #: The transformers processor, for objectives whose model generates text (else None).
    processor: Any | None

    def collate(self, items: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None: ...

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss units (supervised tokens, samples, pixels) in ``batch``."""

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """``(sum of the loss over the batch's units, units)``."""

    def use_chunked_loss(self, chunk_size: int | None = None) -> bool:
        """Compute the head and the loss in chunks (``train.chunked_loss``); False where unsupported."""

    def save_processor(self, folder: Path) -> None:
        """Write what a run needs to rebuild the preprocessing into ``folder``."""


def stack_collate(items: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
    """Fixed-size samples (skipped ones are None) → one tensor per key, stacked; None if all were skipped."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
