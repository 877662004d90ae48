"""Batches and losses for placement tests: a real image-caption batch for the tiny LLaVA, an
image-text contrastive batch for the tiny CLIP, and text-only batches for other VLM families."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmlora.data.samples import CAPTION_PROMPT


def llava_batch(processor, shapes_small, n: int = 2) -> dict:
    root = shapes_small / "world_A"
    import json

    items = json.loads((root / "llava_val.json").read_text())[:n]
    conv = [
        [
            {"role": "user", "content": [{"type": "image", "image": Image.open(root / it["image"])},
                                         {"type": "text", "text": CAPTION_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": it["conversations"][1]["value"]}]},
        ]
        for it in items
    ]
    batch = processor.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                          return_tensors="pt", processor_kwargs={"padding": True})
    mask = batch.pop("assistant_masks").bool()
    batch["labels"] = batch["input_ids"].masked_fill(~mask, -100)
    return dict(batch)


def clip_batch(preprocess, tokenizer, shapes_small, n: int = 3) -> dict:
    root = shapes_small / "world_A"
    import json

    items = json.loads((root / "llava_val.json").read_text())[:n]
    images = torch.stack([preprocess(Image.open(root / it["image"])) for it in items])
    return {"image": images, "text": tokenizer([it["conversations"][1]["value"] for it in items])}


def clip_loss(model, batch) -> torch.Tensor:
    img = model.encode_image(batch["image"], normalize=True)
    txt = model.encode_text(batch["text"], normalize=True)
    logits = 10.0 * img @ txt.T
    target = torch.arange(len(img))
    return (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def text_batch(model, n: int = 2, length: int = 9) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def tiny_llava(tiny_llava_dir):
    from mmlora.models.loading import load_llava

    return load_llava(tiny_llava_dir)


@pytest.fixture
def tiny_clip(tiny_clip_dir):
    from mmlora.models.loading import load_clip
    from mmlora.models.unfuse import unfuse_attention

    model, preprocess, tokenizer = load_clip(tiny_clip_dir)
    unfuse_attention(model)
    return model, preprocess, tokenizer
