"""Captioning / instruction objective for image-text-to-text models: conversations encoded by the
model's processor, next-token cross-entropy on the answers, normalised by supervised tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from mmlora.config.schema import DataSpec
from mmlora.data.batching import Collator
from mmlora.data.image_budget import apply_image_budget
from mmlora.data.processing import IGNORE, ConversationEncoder
from mmlora.data.samples import MAX_IMAGE_PIXELS
from mmlora.objectives.chunked_loss import chunked_supervised_loss_sum


def supervised_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over supervised tokens, computing logits only where a label
    follows (``logits_to_keep``). Returns ``(sum, number of supervised tokens)``."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    positions = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=positions).logits  # [B, P, V]
    picked = targets[:, positions]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), picked.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((picked != IGNORE).sum())


class CaptionLM:
    unit = "token"
    #: ``train.chunked_loss``: the head and the loss in chunks (``use_chunked_loss``); off until asked for
    chunked, chunk_size = False, None

    def __init__(self, model_path: Path | str, max_length: int, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 data: DataSpec | None = None):
        """``data``: the recipe's data section, whose image budget (``data.image_max_pixels``, ...) the
        processor takes before it encodes anything, and keeps in the run's saved processor."""
        from transformers import AutoProcessor

        self.processor = apply_image_budget(AutoProcessor.from_pretrained(model_path), data)
        self.encoder = ConversationEncoder(self.processor, max_length, max_image_pixels)
        self.collate = Collator(self.processor.tokenizer.pad_token_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def use_chunked_loss(self, chunk_size: int | None = None) -> bool:
        self.chunked, self.chunk_size = True, chunk_size
        return True

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if self.chunked:
            out = chunked_supervised_loss_sum(model, batch, self.chunk_size)
            if out is not None:  # None: the model's logits are more than its head's output
                return out
        return supervised_loss_sum(model, batch)

    def save_processor(self, folder: Path) -> None:
        self.processor.save_pretrained(folder)
