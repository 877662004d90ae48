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

from mmlora.errors import MmloraError

#: Distinct colours (tab10-like), one per class in order.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def colour(i: int) -> tuple[int, int, int]:
    if i < len(PALETTE):
        return PALETTE[i]
    rng = np.random.default_rng(i)  # more classes than the palette: stable random colours
    return tuple(int(v) for v in rng.integers(40, 230, 3))


class ClipSegmenter:
    """A CLIP (preset, folder or run) and class names, loaded once: ``segmenter(image)`` is the class
    index per pixel, ``[H, W]`` at the image's own size."""

    def __init__(self, classes: list[str], clip_ref: str = "shapes-clip-base", mode: str = "clearclip",
                 templates: str = "shapes", crop: int | None = None, stride: int | None = None,
                 short_side: int | None = None):
        from mmlora.models.text import template_list, class_embeddings
        from mmlora.eval.segmentation import load_clip_for_eval
        from mmlora.models.clip import image_settings

        self.model, tokenizer = load_clip_for_eval(clip_ref)
        size, self.mean, self.std = image_settings(self.model)
        self.text = class_embeddings(self.model, tokenizer, classes, template_list(templates))
        self.mode, self.crop, self.stride, self.short_side = mode, crop, stride, short_side or size

    def __call__(self, image) -> np.ndarray:
        from mmlora.models.dense import segment_logits
        from mmlora.models.text import preprocess

        x = preprocess(image, self.short_side, self.mean, self.std)
        with torch.no_grad():
            logits = segment_logits(self.model, x, self.text, self.mode, self.crop, self.stride,
                                    out_size=(image.height, image.width))
        return logits.argmax(0).numpy().astype(np.uint8)


def render_overlay(image, mask: np.ndarray, classes: list[str], alpha: float = 0.5):
    """The image blended with the class colours, a legend of the classes present in the top-left
    corner; same size as ``image``."""
    from PIL import Image, ImageDraw, ImageFont

    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = np.array([colour(i) for i in range(len(classes))], dtype=np.float32)
    blended = (1 - alpha) * base + alpha * colours[mask]
    out = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    present = [i for i in range(len(classes)) if (mask == i).any()]
    font_size = max(8, min(out.width, out.height) // 18)
    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(out, "RGBA")
    pad, line = 2, font_size + 3
    width = max(draw.textlength(classes[i], font=font) for i in present) + line + 3 * pad if present else 0
    draw.rectangle([0, 0, width, pad * 2 + line * len(present)], fill=(255, 255, 255, 190))
    for row, i in enumerate(present):
        y = pad + row * line
        draw.rectangle([pad, y + 1, pad + line - 4, y + line - 3], fill=colour(i) + (255,))
        draw.text((pad * 2 + line - 2, y), classes[i], fill=(0, 0, 0, 255), font=font)
    return out


def save_mask(mask: np.ndarray, classes: list[str], path: Path) -> None:
    """A palette PNG: pixel value = class index (readable as an index mask), colours as the overlay."""
    from PIL import Image

    img = Image.fromarray(mask, mode="P")
    flat = [c for i in range(len(classes)) for c in colour(i)]
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)


def run_seg_demo(image_path: str | Path, classes: list[str], out: str | Path, clip_ref: str | None = None,
                 mode: str = "clearclip", templates: str = "shapes", crop: int | None = None,
                 stride: int | None = None) -> tuple[Path, Path, dict[str, float]]:
    """Segment ``image_path`` and write the overlay and mask; returns their paths and each class's
    share of the pixels."""
    from mmlora.data.samples import load_image

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
