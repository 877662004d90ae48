"""The one segmentation renderer: a colour per class, overlays with a legend, palette mask PNGs.

``mmlora demo seg``, ``make demo``'s picture and the server's ``/segment`` answers all draw masks here,
so a class has the same colour everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Distinct colours (tab10-like), one per class in order.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def colour(i: int) -> tuple[int, int, int]:
    if i < len(PALETTE):
        return PALETTE[i]
    rng = np.random.default_rng(i)  # more classes than the palette: stable random colours
    return tuple(int(v) for v in rng.integers(40, 230, 3))


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



def colour_mask(mask: np.ndarray, n_classes: int):
    """An RGB image of ``mask`` (``[H, W]`` class indices) in the class colours."""
    from PIL import Image

    colours = np.array([colour(i) for i in range(max(n_classes, 1))], dtype=np.uint8)
    return Image.fromarray(colours[np.asarray(mask)])
