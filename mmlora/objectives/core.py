"""Training objectives: what a batch is and what its loss is, per model kind.

* :class:`CaptionLM` (image-text-to-text models): conversations encoded by the model's processor,
  next-token cross-entropy on the answers, normalised by supervised tokens.
* :class:`Contrastive` (open_clip CLIP): image-caption pairs (the last answer of each sample is the
  caption), CLIP's symmetric InfoNCE within each micro-batch, normalised by samples.

Each gives ``encoder`` (``encode(sample)``, ``tokenizer``), ``collate(items)``,
``loss_sum(model, batch) -> (sum, units)``, ``units(batch)`` and ``save_processor(folder)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmlora.data.batching import Collator
from mmlora.data.processing import IGNORE, ConversationEncoder
from mmlora.data.samples import MAX_IMAGE_PIXELS, BadSample, Sample, load_image
from mmlora.errors import MmloraError


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


def stack_collate(items: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
    """Fixed-size samples (skipped ones are None) → one tensor per key, stacked; None if all were skipped."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class CaptionLM:
    unit = "token"
    #: ``train.chunked_loss``: the head and the loss in chunks (``use_chunked_loss``); off until asked for
    chunked, chunk_size = False, None

    def __init__(self, model_path: Path | str, max_length: int, max_image_pixels: int = MAX_IMAGE_PIXELS):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_path)
        self.encoder = ConversationEncoder(self.processor, max_length, max_image_pixels)
        self.collate = Collator(self.processor.tokenizer.pad_token_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def use_chunked_loss(self, chunk_size: int | None = None) -> None:
        self.chunked, self.chunk_size = True, chunk_size

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if self.chunked:
            from mmlora.objectives.chunked_loss import chunked_supervised_loss_sum

            out = chunked_supervised_loss_sum(model, batch, self.chunk_size)
            if out is not None:  # None: the model's logits are more than its head's output
                return out
        return supervised_loss_sum(model, batch)

    def save_processor(self, folder: Path) -> None:
        self.processor.save_pretrained(folder)


class _ClipEncoder:
    image_token_id = None

    def __init__(self, preprocess, tokenizer, max_image_pixels: int):
        self.preprocess, self.clip_tokenizer, self.max_image_pixels = preprocess, tokenizer, max_image_pixels
        self.tokenizer = tokenizer.tokenizer  # the HF tokenizer inside open_clip's wrapper (for lengths)

    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        if len(sample.images) != 1:
            raise BadSample(sample.where, sample.id, f"contrastive training needs one image per sample, got {len(sample.images)}")
        answers = [p["text"] for m in sample.messages if m["role"] == "assistant" for p in m["content"] if p["type"] == "text"]
        image = load_image(sample.images[0], sample.where, sample.id, self.max_image_pixels)
        return {"image": self.preprocess(image), "text": self.clip_tokenizer([answers[-1]])[0]}


class Contrastive:
    unit = "sample"

    def __init__(self, model_path: Path, max_image_pixels: int = MAX_IMAGE_PIXELS):
        from mmlora.models.loading import load_clip

        self.path = Path(model_path)
        _, preprocess, tokenizer = load_clip(self.path)
        self.encoder = _ClipEncoder(preprocess, tokenizer, max_image_pixels)

    collate = staticmethod(stack_collate)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["image"])

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        out = model(image=batch["image"], text=batch["text"])  # forward, so DDP hooks see it
        if isinstance(out, dict):
            img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        else:
            img, txt, scale = out[:3]
        logits = scale * img @ txt.T
        target = torch.arange(len(img), device=logits.device)
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        return loss * len(img), len(img)

    def save_processor(self, folder: Path) -> None:
        from mmlora.models.clip import save_clip_processor

        save_clip_processor(self.path, self.encoder.tokenizer, folder)


def objective_for(model: Any, model_path: Path | str, data, dense=None, base_dir: Path | None = None):
    """The objective for a model and a recipe's ``data`` section: ``seg`` data → :class:`DenseSeg`
    (open_clip only); other open_clip data → :class:`Contrastive`; else :class:`CaptionLM`."""
    from mmlora.models.modality import is_open_clip, unwrap
    from mmlora.objectives.dense import DenseSeg, uses_dense

    max_length, max_image_pixels = data.max_length, data.max_image_pixels
    if uses_dense(data):
        if not is_open_clip(unwrap(model)):
            raise MmloraError("seg data trains CLIP (open_clip) models with the dense objective; this model is not one")
        from mmlora.config.schema import DenseSpec

        return DenseSeg(Path(model_path), data, dense or DenseSpec(), base_dir, max_image_pixels)
    if is_open_clip(unwrap(model)):
        return Contrastive(Path(model_path), max_image_pixels)
    return CaptionLM(model_path, max_length, max_image_pixels)

