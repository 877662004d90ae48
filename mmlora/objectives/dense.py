"""The dense segmentation objective: CLIP tuned on masks of seen classes, for open-vocabulary use.

Fine-tuned open-vocabulary segmenters tune CLIP's attention in both towers on the classes a dataset
labels, and are judged on classes it never labelled. Here a batch is images with index masks
(``format: seg`` data); each step embeds the seen classes' prompts with the text tower (with
gradient, so text-tower adapters train), takes the image tower's patch features from its last block
in ``train.dense.mode`` (``mmlora.models.dense``: the same path evaluation uses), and scores every
pixel by the cosine between its (bilinearly upsampled) patch logits and each class text, scaled by
the CLIP's logit scale: cross-entropy against the mask, summed over supervised pixels (the loss
unit). Pixels of ``ignore_classes`` (the unseen classes) and 255 are never supervised.

The patch path calls the image tower's blocks directly rather than the model's ``forward``, so DDP's
gradient hooks would not see it: this objective trains in one process (multi-process is refused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmlora.config.schema import DataSpec, DenseSpec
from mmlora.data.samples import MAX_IMAGE_PIXELS, BadSample, Sample
from mmlora.data.segmentation import IGNORE_INDEX, SegmentationFolder, load_seg_pair
from mmlora.errors import MmloraError
from mmlora.models.clip import image_settings, save_clip_processor
from mmlora.models.dense import dense_features
from mmlora.models.loading import load_clip
from mmlora.models.text import class_text_embeddings, template_list
from mmlora.objectives.base import stack_collate


def seg_classes(data: DataSpec, base_dir: Path | None = None) -> tuple[list[str], list[str], bool]:
    """``(classes, ignored classes, reduce_zero_label)`` shared by every ``seg`` dataset of a recipe."""
    def rel(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() or base_dir is None else base_dir / path

    specs = [d for d in [*data.train, *data.val] if d.format == "seg"]
    folders = [SegmentationFolder(rel(d.path), d.split) for d in specs]
    classes, zero = folders[0].classes, folders[0].reduce_zero_label
    for d, f in zip(specs, folders):
        if f.classes != classes or f.reduce_zero_label != zero:
            raise MmloraError(f"seg dataset {d.path} has classes {f.classes} (reduce_zero_label {f.reduce_zero_label}); "
                              f"{specs[0].path} has {classes} ({zero}): all seg datasets of a recipe must agree")
    ignored = sorted({c for d in specs for c in d.ignore_classes})
    unknown = [c for c in ignored if c not in classes]
    if unknown:
        raise MmloraError(f"ignore_classes {unknown} are not classes of {specs[0].path} (classes: {', '.join(classes)})")
    return classes, ignored, zero


class _SegEncoder:
    """Image + mask → ``{"image": [3, S, S], "mask": [S, S] long}``: the image's short side resized to
    the CLIP's input size ``S`` (bicubic; the mask nearest), both centre-cropped to ``S x S``, mask values
    mapped to seen-class indices (unseen and ignored pixels → 255)."""

    image_token_id = None

    def __init__(self, size: int, mean, std, classes: list[str], seen: list[str], zero_label: bool,
                 tokenizer, max_image_pixels: int):
        self.size, self.mean, self.std = size, torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        self.num_classes, self.zero_label, self.max_image_pixels = len(classes), zero_label, max_image_pixels
        self.tokenizer = tokenizer  # for the sampler's length estimate (seg samples have no text: 0)
        lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
        for i, c in enumerate(classes):
            if c in seen:
                lut[i] = seen.index(c)
        self.lut = lut

    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        from PIL import Image

        if sample.target is None or len(sample.images) != 1:
            raise BadSample(sample.where, sample.id, "the dense objective needs seg samples (an image and its mask)")
        image, mask = load_seg_pair(sample.images[0], sample.target, sample.id, self.num_classes, self.zero_label,
                                    self.max_image_pixels)
        w, h = image.size
        scale = self.size / min(w, h)
        new = (max(self.size, round(w * scale)), max(self.size, round(h * scale)))
        image = image.resize(new, resample=Image.BICUBIC)
        mask = np.asarray(Image.fromarray(mask).resize(new, resample=Image.NEAREST))
        left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = x[:, top:top + self.size, left:left + self.size]
        m = torch.from_numpy(self.lut[mask[top:top + self.size, left:left + self.size]])
        return {"image": (x - self.mean) / self.std, "mask": m}


class DenseSeg:
    unit = "pixel"
    processor = None

    def __init__(self, model_path: Path | str, data: DataSpec, dense: DenseSpec, base_dir: Path | None = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.path = Path(model_path)
        model, _, self.clip_tokenizer = load_clip(self.path)
        classes, ignored, zero = seg_classes(data, base_dir)
        self.seen = [c for c in classes if c not in ignored]
        if not self.seen:
            raise MmloraError("ignore_classes leaves no class to train on")
        self.mode = dense.mode
        self._text_trains: bool | None = None
        self._text: torch.Tensor | None = None
        self.templates = template_list(dense.templates)
        size, mean, std = image_settings(model)
        self.encoder = _SegEncoder(size, mean, std, classes, self.seen, zero, self.clip_tokenizer.tokenizer,
                                   max_image_pixels)

    collate = staticmethod(stack_collate)

    def use_chunked_loss(self, chunk_size: int | None = None) -> bool:
        return False

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["mask"] != IGNORE_INDEX).sum())

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise MmloraError("the dense segmentation objective trains in one process (see mmlora.objectives.dense)")
        if self._text_trains is None:  # a frozen text tower gives the same class embeddings every step
            image_tower = {id(p) for p in model.visual.parameters()}
            self._text_trains = any(p.requires_grad and id(p) not in image_tower for p in model.parameters())
        if self._text_trains:
            text = class_text_embeddings(model, self.clip_tokenizer, self.seen, self.templates)  # [C, E]
        else:
            if self._text is None:
                self._text = class_text_embeddings(model, self.clip_tokenizer, self.seen, self.templates).detach()
            text = self._text
        images, mask = batch["image"], batch["mask"]
        feats = dense_features(model, images, self.mode)  # [B, gh, gw, E], normalised
        logits = torch.einsum("bhwe,ce->bchw", feats, text.to(feats.dtype))
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        scale = model.logit_scale.exp().detach() if hasattr(model, "logit_scale") else 100.0
        loss = F.cross_entropy(logits.float() * scale, mask, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, int((mask != IGNORE_INDEX).sum())

    def save_processor(self, folder: Path) -> None:
        save_clip_processor(self.path, self.encoder.tokenizer, folder)


def uses_dense(data: DataSpec | None) -> bool:
    """Whether a recipe's data asks for the dense objective (every train dataset ``format: seg``)."""
    if data is None:
        return False
    kinds = {d.format == "seg" for d in [*data.train, *data.val]}
    if kinds == {True, False}:
        raise MmloraError("a recipe's data mixes seg datasets with caption/conversation datasets: "
                          "train them in separate runs (different objectives)")
    return kinds == {True}
