"""Image-to-text retrieval with CLIP (what the shipped CLIP base's scores report)."""

from __future__ import annotations

import torch


@torch.no_grad()
def image_to_text_top1(model, preprocess, tokenizer, images, captions: list[str]) -> float:
    """Top-1 accuracy of retrieving each image's own caption (``captions[i]`` for ``images[i]``)
    among all the captions given."""
    dtype = next(model.parameters()).dtype
    img = model.encode_image(torch.stack([preprocess(i) for i in images]).to(dtype), normalize=True)
    txt = model.encode_text(tokenizer(captions), normalize=True)
    pred = (img @ txt.T).argmax(dim=1)
    return float((pred == torch.arange(len(images))).float().mean())
