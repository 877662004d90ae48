"""The recipe's image budget → the processor's own settings, the same for every path that encodes images.

``data.image_min_pixels`` / ``data.image_max_pixels`` bound the pixels a dynamic-resolution processor
resizes an image to (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``size.shortest_edge`` / ``size.longest_edge`` of
``Qwen2VLImageProcessor``, read by its ``smart_resize``), so they set the number of image tokens:
``(h / patch) * (w / patch) / merge**2`` for the resized ``h x w``. ``data.image_max_tiles`` bounds the
crops a tiling processor cuts an image into, besides its global view: Idefics3 and SmolVLM split an
image into at most ``k x k`` crops of ``max_image_size`` (so the count is a square; 1 turns splitting
off), InternVL's ``GotOcr2ImageProcessor`` into at most ``max_patches`` crops.

:func:`apply_image_budget` is the one place the budget reaches a processor: training (the objective),
a run reloaded for evaluation, predict or serving (its recipe is saved with it, and so is the
processor), and ``mmlora data check`` of a recipe. A key the processor has no setting for is refused
in one line that names the key, the processor and what to do, never ignored: a fixed-size processor
(LLaVA's CLIP, PaliGemma's SigLIP) has no pixel budget; LLaVA-NeXT and OneVision pick a grid from
``image_grid_pinpoints`` that the model's config repeats, and mllama's tile embeddings are built for
the model's ``max_num_tiles``, so neither takes a tile count.

Layer: data. The processor is an argument; its classes are recognised by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mmlora.config.schema import DataSpec
from mmlora.errors import MmloraError

PIXEL_KEYS = ("image_min_pixels", "image_max_pixels")
TILE_KEY = "image_max_tiles"
BUDGET_KEYS = (*PIXEL_KEYS, TILE_KEY)

#: Image processors that resize to a pixel budget (``smart_resize`` between shortest and longest edge).
PIXEL_BUDGET = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil")
#: Image processors that split an image into square crops of ``max_image_size`` (``do_image_splitting``).
SPLITTING = ("Idefics3ImageProcessor", "Idefics3ImageProcessorPil", "SmolVLMImageProcessor", "SmolVLMImageProcessorPil")
#: Image processors that crop an image into a grid of at most ``max_patches`` tiles.
CROPPING = ("GotOcr2ImageProcessor", "GotOcr2ImageProcessorPil")
#: Tiling image processors whose tile count the model fixes: why, for the one-line refusal.
FIXED_TILES = {
    "MllamaImageProcessor": "tiles up to the model's vision_config.max_num_tiles, which its tile position "
                            "embeddings and aspect-ratio ids are built for",
    "LlavaNextImageProcessor": "picks each image's grid from image_grid_pinpoints, which the model's config "
                               "repeats to unpad the features: a set of resolutions, not a tile count",
    "LlavaOnevisionImageProcessor": "picks each image's grid from image_grid_pinpoints, which the model's config "
                                    "repeats to unpad the features: a set of resolutions, not a tile count",
}
FIXED_TILES |= {f"{name}Pil": why for name, why in FIXED_TILES.items()}

PIXEL_FAMILIES = "Qwen2-VL, Qwen2.5-VL and Qwen3-VL (Qwen2VLImageProcessor)"
TILE_FAMILIES = "Idefics3 and SmolVLM (image splitting) and InternVL (GotOcr2ImageProcessor crops)"


def image_budget(data: DataSpec | None) -> dict[str, int]:
    """The budget keys ``data`` sets (``{}``: the processor's own defaults)."""
    if data is None:
        return {}
    return {k: getattr(data, k) for k in BUDGET_KEYS if getattr(data, k, None) is not None}


def _classes(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _who(processor: Any) -> str:
    if processor is None:
        return "open_clip CLIP (its preprocessing resizes every image to the tower's fixed size)"
    image = getattr(processor, "image_processor", None)
    if image is None:
        return f"{type(processor).__name__} (a tokenizer: the model takes no images)"
    return f"{type(processor).__name__} ({type(image).__name__})"


def _refuse(key: str, processor: Any, why: str, fix: str) -> MmloraError:
    return MmloraError(f"data.{key}: {_who(processor)} {why}; {fix}")


def _with_size(size: Any, keep: bool = True, **fields: int) -> Any:
    """``size`` (a transformers ``SizeDict`` or a plain dict) with ``fields`` set, of the same type;
    ``keep=False``: ``fields`` only."""
    if dataclasses.is_dataclass(size):
        return dataclasses.replace(size, **fields) if keep else type(size)(**fields)
    return {**(dict(size or {}) if keep else {}), **fields}


def _pixel_budget(processor: Any, data: DataSpec) -> None:
    image = getattr(processor, "image_processor", None)
    if image is None or not _classes(image) & set(PIXEL_BUDGET):
        key = next(k for k in PIXEL_KEYS if getattr(data, k) is not None)
        raise _refuse(key, processor, "has no pixel budget (it resizes images to a fixed size or grid)",
                      f"remove the key; pixel budgets apply to {PIXEL_FAMILIES}")
    lo, hi = data.image_min_pixels, data.image_max_pixels
    old_lo, old_hi = image.size.get("shortest_edge", lo or hi), image.size.get("longest_edge", hi or lo)
    # One bound given alone moves the processor's other bound when it would cross it: smart_resize
    # checks the maximum first, so a minimum above the old maximum would otherwise do nothing.
    new_lo = lo if lo is not None else min(old_lo, hi)
    new_hi = hi if hi is not None else max(old_hi, lo)
    image.size = _with_size(image.size, shortest_edge=new_lo, longest_edge=new_hi)


def _tile_budget(processor: Any, data: DataSpec) -> None:
    n = data.image_max_tiles
    image = getattr(processor, "image_processor", None)
    names = _classes(image) if image is not None else set()
    if names & set(SPLITTING):
        k = math.isqrt(n)
        if k * k != n:
            raise _refuse(TILE_KEY, processor, f"splits an image into at most k x k crops, not {n}",
                          f"give a square ({', '.join(str(i * i) for i in range(1, 5))}, ...; 1 turns splitting off)")
        tile = image.max_image_size["longest_edge"]
        # The image's longest edge is resized to size.longest_edge, then cut into crops of `tile`:
        # k x k crops for a square image, fewer for any other aspect ratio.
        image.do_image_splitting = k > 1
        image.size = _with_size(image.size, keep=False, longest_edge=k * tile)
        return
    if names & set(CROPPING):
        # InternVLProcessor passes crop_to_patches=True with every call, over the image processor's own value.
        crops = getattr(processor, "images_kwargs", {}).get("crop_to_patches", image.crop_to_patches)
        if not crops:
            raise _refuse(TILE_KEY, processor, "does not crop images (crop_to_patches is false)",
                          "remove the key, or set crop_to_patches: true in the processor's config")
        image.max_patches = n
        image.min_patches = min(image.min_patches, n)
        return
    why = next((w for name, w in FIXED_TILES.items() if name in names), None)
    if why is not None:
        raise _refuse(TILE_KEY, processor, why, "remove the key")
    raise _refuse(TILE_KEY, processor, "does not tile images", f"remove the key; tile counts apply to {TILE_FAMILIES}")


def apply_image_budget(processor: Any | None, data: DataSpec | None) -> Any | None:
    """Set ``data``'s image budget on ``processor`` (in place; also returned) or raise :class:`MmloraError`.

    ``processor`` is a transformers processor, a tokenizer, or None for an open_clip CLIP. Without
    budget keys nothing changes; applying the same budget twice changes nothing more."""
    if data is None:
        return processor
    if any(getattr(data, k, None) is not None for k in PIXEL_KEYS):
        _pixel_budget(processor, data)
    if getattr(data, TILE_KEY, None) is not None:
        _tile_budget(processor, data)
    return processor
