"""Generation per family through the one path (``mmlora.generate.generate_answers``): answers of a
left-padded batch equal the answers of each image alone (Qwen's multimodal RoPE deltas, any-resolution
tiles, PaliGemma's prefix types all survive padding). Images of two sizes make the prompts differ in
length where the family's image token count depends on the size."""

from __future__ import annotations

import pytest
from PIL import Image

from mmlora.generate import generate_answers
from tests.train.test_families_train import TRAINED, record


@pytest.mark.parametrize("model_type", TRAINED)
def test_batched_answers_equal_one_by_one(model_type, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmlora.models.families import save_family

    save_family(model_type, tmp_path / "model")
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    images = [Image.new("RGB", (128, 128), (200, 30, 30)), Image.new("RGB", (128, 64), (20, 160, 40)),
              Image.new("RGB", (96, 128), (30, 30, 200))]
    prompts = ["Describe the image.", "What is there?", "Describe the image."]
    batched = generate_answers(model, processor, images, prompts, batch_size=3, max_new_tokens=6)
    alone = [generate_answers(model, processor, [img], [p], batch_size=1, max_new_tokens=6)[0]
             for img, p in zip(images, prompts)]
    assert len(batched) == 3 and all(isinstance(a, str) for a in batched)
    assert batched == alone
    record(model_type, "generate", "✓")
