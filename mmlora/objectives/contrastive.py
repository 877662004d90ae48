"""Contrastive objective for open_clip CLIP: image-caption pairs (the last answer of each sample is
the caption), CLIP's symmetric InfoNCE within each micro-batch, normalised by samples (so gradient
accumulation is not a bigger batch here: the negatives are the micro-batch's)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmlora.data.samples import MAX_IMAGE_PIXELS, BadSample, Sample, load_image
from mmlora.models.clip import save_clip_processor
from mmlora.models.loading import load_clip
from mmlora.objectives.base import stack_collate


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
    processor = None

    def __init__(self, model_path: Path, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.path = Path(model_path)
        _, preprocess, tokenizer = load_clip(self.path)
        self.encoder = _ClipEncoder(preprocess, tokenizer, max_image_pixels)

    collate = staticmethod(stack_collate)

    def use_chunked_loss(self, chunk_size: int | None = None) -> bool:
        return False

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
        save_clip_processor(self.path, self.encoder.tokenizer, folder)
