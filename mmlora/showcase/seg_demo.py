"""``mmlora demo seg``: segment any image into the class names a user types, and show it.

Writes two PNGs: the overlay (the input blended with one colour per class, a legend in the corner,
at the input's size) and the raw mask (``<out stem>_mask.png``: a palette PNG of the input's size
whose pixel values are class indices, in the order given). The default model is the shipped
``shapes-clip-base``; ``--run`` takes a CLIP run (e.g. the dense LoRA one) instead.

Run: ``mmlora demo seg photo.png --classes "background,circle,square" --out overlay.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmlora.data.samples import load_image
from mmlora.errors import MmloraError
from mmlora.eval.overlay import render_overlay, save_mask
from mmlora.eval.segmentation import load_clip_for_eval
from mmlora.models.clip import image_settings
from mmlora.models.dense import segment_logits
from mmlora.models.text import class_embeddings, preprocess, template_list





class ClipSegmenter:
    """A CLIP (preset, folder or run) and class names, loaded once: ``segmenter(image)`` is the class
    index per pixel, ``[H, W]`` at the image's own size."""

    def __init__(self, classes: list[str], clip_ref: str = "shapes-clip-base", mode: str = "clearclip",
                 templates: str = "shapes", crop: int | None = None, stride: int | None = None,
                 short_side: int | None = None):
        self.model, tokenizer = load_clip_for_eval(clip_ref)
        size, self.mean, self.std = image_settings(self.model)
        self.text = class_embeddings(self.model, tokenizer, classes, template_list(templates))
        self.mode, self.crop, self.stride, self.short_side = mode, crop, stride, short_side or size

    def __call__(self, image) -> np.ndarray:
        x = preprocess(image, self.short_side, self.mean, self.std)
        with torch.no_grad():
            logits = segment_logits(self.model, x, self.text, self.mode, self.crop, self.stride,
                                    out_size=(image.height, image.width))
        return logits.argmax(0).numpy().astype(np.uint8)






def run_seg_demo(image_path: str | Path, classes: list[str], out: str | Path, clip_ref: str | None = None,
                 mode: str = "clearclip", templates: str = "shapes", crop: int | None = None,
                 stride: int | None = None) -> tuple[Path, Path, dict[str, float]]:
    """Segment ``image_path`` and write the overlay and mask; returns their paths and each class's
    share of the pixels."""
    if not classes or any(not c for c in classes):
        raise MmloraError("--classes needs comma-separated class names, e.g. 'background,circle,square'")
    image = load_image(Path(image_path), str(image_path), Path(image_path).name)
    mask = ClipSegmenter(classes, clip_ref or "shapes-clip-base", mode, templates, crop, stride)(image)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(image, mask, [c.split("|")[0] for c in classes]).save(out)
    mask_path = out.with_name(f"{out.stem}_mask.png")
    save_mask(mask, classes, mask_path)
    shares = {c: float((mask == i).mean()) for i, c in enumerate(classes)}
    return out, mask_path, shares
