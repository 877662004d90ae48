"""CLIP's text side for open-vocabulary work: prompt templates, class-text embeddings, image input.

Each class name (with optional synonyms, ``"cat|kitten"``) is put into every prompt template,
embedded, normalised and averaged (the prompt ensemble). ``imagenet`` is CLIP's 80 ImageNet
templates (the default for real models); ``shapes`` is a short set of plain object prompts ("a {}.",
"a large {}.", ...), the language the tiny bases were pretrained on. A class named ``background`` is
embedded from background words.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
]


SHAPES_TEMPLATES = ["a {}.", "a large {}.", "a small {}.", "there is a {}.", "an image of a {}.", "this picture shows a {}."]


# The tiny bases' caption language (world A: "a small red triangle in the top left."), every size x
# colour x position: a class word alone ("a triangle.") is out of the base CLIP's distribution, and on
# it the base is at chance even on whole single-object images; in its own caption frame it is right.
_POSITIONS = ["top left", "top center", "top right", "middle left", "center", "middle right",
              "bottom left", "bottom center", "bottom right"]
SHAPES_CAPTION_TEMPLATES = [f"a {size} {colour} {{}} in the {position}." for size in ("small", "large")
                            for colour in ("red", "green", "blue", "yellow") for position in _POSITIONS]


TEMPLATES = {"imagenet": IMAGENET_TEMPLATES, "shapes": SHAPES_TEMPLATES, "shapes-captions": SHAPES_CAPTION_TEMPLATES}


BACKGROUND_WORDS = ["background", "plain background", "textured background", "grey background"]


def class_text_embeddings(model, tokenizer, classes: list[str], templates: list[str]) -> torch.Tensor:
    """``[C, E]``: per class, the normalised mean over synonyms x templates of normalised text
    embeddings (with gradient: the dense training objective trains the text tower through it)."""
    out = []
    for name in classes:
        words = BACKGROUND_WORDS if name == "background" else [w.strip() for w in name.split("|") if w.strip()]
        prompts = [t.format(w) for w in words for t in templates]
        emb = F.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=0))
    return torch.stack(out)


@torch.no_grad()
def class_embeddings(model, tokenizer, classes: list[str], templates: list[str]) -> torch.Tensor:
    """:func:`class_text_embeddings` without gradient (evaluation)."""
    return class_text_embeddings(model, tokenizer, classes, templates)


def preprocess(image, short_side: int, mean, std) -> torch.Tensor:
    """PIL image → normalised ``[3, H', W']`` with the short side resized to ``short_side``."""
    import numpy as np

    w, h = image.size
    scale = short_side / min(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=3)  # bicubic
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]



def template_list(templates: str) -> list[str]:
    """A named template set (``imagenet``, ``shapes``) or ``;``-separated templates → the list."""
    return TEMPLATES.get(templates, templates.split(";"))
